"""The secrets sweep reads every table of a real PostgreSQL: text, JSON, bytea (zlib'd too), Fernet tokens."""

from __future__ import annotations

import json
import zlib

from cryptography.fernet import Fernet

from tests.support.secrets_sweep import Sweep

API_KEY = "swp-db-key-8a31f07c55e2"


def test_every_table_and_column_is_read_and_a_secret_found_in_each_kind(cdr_db, cdr_dsn):
    cdr_db.execute("CREATE SCHEMA sweep_probe")
    cdr_db.execute("CREATE TABLE sweep_probe.t (id int, note text, extra jsonb, blob bytea, packed bytea)")
    cdr_db.execute(
        "INSERT INTO sweep_probe.t VALUES (1, 'clean', '{}', NULL, NULL), (2, %s, %s, %s, %s)",
        (
            f"key {API_KEY}",
            json.dumps({"password": API_KEY}),
            b"\x00" + API_KEY.encode() + b"\x00",
            zlib.compress(json.dumps({"k": API_KEY}).encode()),
        ),
    )
    key = Fernet.generate_key()
    encrypted = Fernet(key).encrypt(json.dumps({"api_key": API_KEY}).encode()).decode()
    cdr_db.execute("INSERT INTO sweep_probe.t (id, note) VALUES (3, %s)", (encrypted,))
    sweep = Sweep({"API_KEY": API_KEY})
    blind = Sweep({"API_KEY": API_KEY})

    try:
        sweep.database(cdr_dsn, "cdr", fernet_key=key.decode())
        blind.database(cdr_dsn, "cdr")
    finally:
        cdr_db.execute("DROP SCHEMA sweep_probe CASCADE")

    assert sorted(f.where.split(" (")[0] for f in sweep.findings) == [
        f"cdr sweep_probe.t.{column}" for column in ("blob", "extra", "note", "note", "packed")
    ]
    assert len(blind.findings) == 4  # without the key the encrypted value is opaque
    assert sweep.searched["tables"] >= 2  # the probe and the reference schema's own
    assert sweep.searched["rows"] >= 2
    assert API_KEY not in sweep.report()
