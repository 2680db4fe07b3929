"""The secrets sweep: look for secrets, in every form they could take, in files, databases and texts.

Each secret is looked for as written and in the forms the scrub knows (JSON-escaped, URL-encoded,
base64 at every offset: :func:`cdr_webhook.redact.secret_forms`), and in forms the scrub does not
produce: its bytes in hex, a ``whsec_`` secret's key without the prefix and as raw bytes, a PEM key's
body line by line and as DER. A finding names the place (a file, a table's column, a page) and shows
an excerpt with every secret's forms replaced by the secret's name: a failing test never prints one.
"""

from __future__ import annotations

import base64
import binascii
import configparser
import dataclasses
import functools
import zlib
from collections import Counter
from typing import TYPE_CHECKING, Any

import psycopg
from cryptography.fernet import Fernet, InvalidToken
from psycopg import sql

from cdr_webhook.redact import secret_forms

if TYPE_CHECKING:
    from collections.abc import Iterable, Iterator, Mapping
    from pathlib import Path

#: Shorter forms are not looked for: they could match by chance.
MIN_FORM_BYTES = 8
#: Characters of context shown on each side of a finding.
CONTEXT_BYTES = 60
_SIGNING_PREFIX = "whsec_"
#: How every Fernet token starts (its version byte, base64url-encoded, and the timestamp's high bytes).
_FERNET_TOKEN = "gAAAAA"


def forms_of(secret: str) -> set[bytes]:
    """Every form ``secret`` is looked for in (see the module's docstring)."""
    forms = {form.encode() for form in secret_forms((secret,))}
    forms.add(secret.encode().hex().encode())
    if secret.startswith(_SIGNING_PREFIX):
        key = secret.removeprefix(_SIGNING_PREFIX)
        forms.add(key.encode())
        forms |= _decoded(key)
    if "-----BEGIN " in secret:
        body = [line.strip() for line in secret.splitlines() if line.strip() and "-----" not in line]
        forms |= {line.encode() for line in body}
        forms |= _decoded("".join(body))
    return {form for form in forms if len(form) >= MIN_FORM_BYTES}


def _decoded(text: str) -> set[bytes]:
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        return set()
    return {raw, raw.hex().encode()}


@dataclasses.dataclass(frozen=True)
class Finding:
    """A secret found: which one (by name), where, and the excerpt around it with every secret masked."""

    secret: str
    where: str
    excerpt: str

    def __str__(self) -> str:
        return f"{self.secret} in {self.where}: …{self.excerpt}…"


class Sweep:
    """
    Named secrets and their forms; each search records its findings and counts what it read.

    :param secrets: name → secret; the name is what a finding shows in the secret's place.
    """

    def __init__(self, secrets: Mapping[str, str]) -> None:
        pairs = {(form, name) for name, secret in secrets.items() for form in forms_of(secret)}
        self.forms = sorted(pairs, key=lambda pair: len(pair[0]), reverse=True)
        self.findings: list[Finding] = []
        self.searched: Counter[str] = Counter()

    def text(self, where: str, data: str | bytes) -> None:
        """Search one text or byte string; ``where`` names it in findings."""
        raw = data.encode("utf-8", "surrogatepass") if isinstance(data, str) else bytes(data)
        self.searched["bytes"] += len(raw)
        reported: set[str] = set()
        for form, name in self.forms:
            at = raw.find(form)
            if at >= 0 and name not in reported:
                reported.add(name)
                shown = f"{self.mask(where)} (byte {at})"
                self.findings.append(Finding(name, shown, self.masked(raw, at, len(form))))

    def masked(self, raw: bytes, at: int, length: int) -> str:
        """The excerpt around ``raw[at:at + length]``, widened over every form it cuts, all masked."""
        start, end = max(0, at - CONTEXT_BYTES), min(len(raw), at + length + CONTEXT_BYTES)
        for position, size in self._occurrences(raw):
            if position < end and position + size > start:
                start, end = min(start, position), max(end, position + size)
        return self.mask(raw[start:end])

    def mask(self, data: str | bytes) -> str:
        """``data`` with every form of every secret replaced by ``<name>``: safe to show."""
        raw = data.encode("utf-8", "surrogatepass") if isinstance(data, str) else bytes(data)
        for form, name in self.forms:
            raw = raw.replace(form, f"<{name}>".encode())
        return raw.decode("utf-8", "replace")

    def _occurrences(self, raw: bytes) -> Iterator[tuple[int, int]]:
        for form, _ in self.forms:
            at = raw.find(form)
            while at >= 0:
                yield at, len(form)
                at = raw.find(form, at + 1)

    def files(self, root: Path, label: str | None = None) -> None:
        """Search every regular file under ``root`` (its name relative to ``root`` in findings)."""
        for path in sorted(root.rglob("*")):
            if path.is_file() and not path.is_symlink():
                self.searched["files"] += 1
                self.text(f"{label or root.name}/{path.relative_to(root)}", path.read_bytes())

    def database(self, dsn: str, label: str, fernet_key: str | None = None) -> None:
        """
        Search every row of every table of every schema but the catalogs: each column as text, a
        ``bytea`` column as its bytes and, when they are zlib data, decompressed.

        ``fernet_key``: Airflow's ``[core] fernet_key``; a value it encrypted (a trigger's kwargs, a
        connection's password and extra, a variable) is searched decrypted too.
        """
        readings = functools.partial(_readings, fernet=Fernet(fernet_key) if fernet_key else None)
        with psycopg.connect(dsn, autocommit=True) as conn:
            for schema, table, columns in _tables(conn):
                self.searched["tables"] += 1
                query = sql.SQL("SELECT {} FROM {}.{}").format(
                    sql.SQL(", ").join(_as_text_or_bytes(name, kind) for name, kind in columns),
                    sql.Identifier(schema),
                    sql.Identifier(table),
                )
                for row in conn.execute(query):
                    self.searched["rows"] += 1
                    for (column, _), value in zip(columns, row, strict=True):
                        for data in readings(value):
                            self.text(f"{label} {schema}.{table}.{column}", data)

    def report(self) -> str:
        """The findings, one a line (masked), or an empty string."""
        return "\n".join(str(finding) for finding in self.findings)


def fernet_key_of(airflow_home: Path) -> str:
    """The ``[core] fernet_key`` Airflow wrote to the home's ``airflow.cfg`` (it encrypts with it)."""
    config = configparser.ConfigParser(interpolation=None)
    config.read(airflow_home / "airflow.cfg")
    return config.get("core", "fernet_key")


def _tables(conn: psycopg.Connection[Any]) -> Iterator[tuple[str, str, list[tuple[str, str]]]]:
    tables = conn.execute(
        "SELECT c.table_schema, c.table_name, array_agg(c.column_name::text ORDER BY c.ordinal_position), "
        "array_agg(c.data_type::text ORDER BY c.ordinal_position) "
        "FROM information_schema.columns c JOIN information_schema.tables t "
        "USING (table_catalog, table_schema, table_name) "
        "WHERE t.table_type = 'BASE TABLE' AND c.table_schema NOT IN ('pg_catalog', 'information_schema') "
        "GROUP BY 1, 2 ORDER BY 1, 2"
    ).fetchall()
    for schema, table, names, kinds in tables:
        yield schema, table, list(zip(names, kinds, strict=True))


def _as_text_or_bytes(column: str, kind: str) -> sql.Composable:
    if kind == "bytea":
        return sql.Identifier(column)
    return sql.SQL("{}::text").format(sql.Identifier(column))


def _readings(value: Any, fernet: Fernet | None) -> Iterable[bytes | str]:
    """A column's value as searched: as it is, decompressed, decrypted."""
    if value is None:
        return []
    if isinstance(value, (bytes, memoryview)):
        raw = bytes(value)
        try:
            return [raw, zlib.decompress(raw)]
        except zlib.error:
            return [raw]
    if fernet is not None and value.startswith(_FERNET_TOKEN):
        try:
            return [value, fernet.decrypt(value.encode())]
        except InvalidToken:
            pass
    return [value]
