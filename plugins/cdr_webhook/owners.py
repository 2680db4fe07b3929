"""An endpoint's owner: who is told when it is paused, resumed or failing, and what they are told. Pure.

The contact lives in the endpoint's connection extras (``owner_email``, ``owner_webhook_url``,
``owner_webhook_secret``), parsed here apart from :func:`cdr_webhook.endpoint_config.parse_endpoint`:
a mistyped owner address must not hold the endpoint's deliveries, only its alerts (which show the
error). The
sender is :mod:`cdr_webhook.deliver.owner`; the outbox :mod:`cdr_webhook.ledger.owner_alerts`.
"""

from __future__ import annotations

import dataclasses
import html
import re
import urllib.parse
from typing import TYPE_CHECKING, Any

from cdr_webhook.endpoint_config import SIGNING_SECRET_EXTRA, EndpointConfigError
from cdr_webhook.signing import InvalidSigningSecret, secret_key

if TYPE_CHECKING:
    import datetime as dt
    from collections.abc import Mapping

EMAIL_EXTRA = "owner_email"
WEBHOOK_URL_EXTRA = "owner_webhook_url"
WEBHOOK_SECRET_EXTRA = "owner_webhook_secret"
#: Where the Deliveries page is mounted in the api-server (``cdr_webhook.plugin.URL_PREFIX``).
PAGE_PREFIX = "/cdr-webhook"
MAX_EMAILS = 20

# A deliberately plain check (one @, a dotted domain, no spaces or angle brackets): it catches typos
# and header injection; the SMTP server is the judge of the rest.
_EMAIL = re.compile(r"[^@\s<>,;\"]{1,64}@[A-Za-z0-9.-]{1,253}\.[A-Za-z0-9-]{2,63}")

TITLES = {
    "paused": "paused",
    "resumed": "resumed",
    "failure_rate": "failing",
}


@dataclasses.dataclass(frozen=True)
class OwnerContact:
    """Who owns an endpoint: email addresses and/or a URL that gets a signed POST."""

    endpoint: str
    emails: tuple[str, ...] = ()
    webhook_url: str | None = None
    webhook_secrets: tuple[str, ...] = ()

    def masked(self) -> list[str]:
        """The contact as the page shows it: ``j•••@example.com``, and the URL's origin only."""
        shown = [mask_email(address) for address in self.emails]
        if self.webhook_url:
            parts = urllib.parse.urlsplit(self.webhook_url)
            shown.append(f"POST {parts.scheme}://{parts.netloc.rpartition('@')[2]}")
        return shown

    def secrets(self) -> tuple[str, ...]:
        """What never goes in a log or an error: the signing secrets, the URL's path, query and user."""
        found: list[str] = list(self.webhook_secrets)
        if self.webhook_url:
            parts = urllib.parse.urlsplit(self.webhook_url)
            found += [parts.username or "", parts.password or "", parts.query]
            if parts.path not in ("", "/"):
                found.append(parts.path)
        return tuple(secret for secret in dict.fromkeys(found) if secret)


def mask_email(address: str) -> str:
    """``jane.doe@example.com`` → ``j•••@example.com``: enough to recognise, not to harvest."""
    local, _, domain = address.partition("@")
    return f"{local[:1]}•••@{domain}"


def parse_owner(conn_id: str, extra: Mapping[str, Any]) -> OwnerContact | None:
    """
    The owner contact of an endpoint's extras, or None when it names none. Raises
    :class:`~cdr_webhook.endpoint_config.EndpointConfigError` naming the extra (never quoting a secret).
    """
    emails = _emails(conn_id, extra.get(EMAIL_EXTRA))
    url = extra.get(WEBHOOK_URL_EXTRA)
    if url in (None, ""):
        url = None
    elif not isinstance(url, str) or not _is_http_url(url):
        raise EndpointConfigError(
            conn_id, f"extra {WEBHOOK_URL_EXTRA!r}", "must be an http(s) URL with a host"
        )
    secrets: tuple[str, ...] = ()
    if url:
        own = extra.get(WEBHOOK_SECRET_EXTRA)
        field = WEBHOOK_SECRET_EXTRA if own not in (None, "") else SIGNING_SECRET_EXTRA
        raw = own if own not in (None, "") else extra.get(SIGNING_SECRET_EXTRA)
        secrets = _secrets(conn_id, field, raw)
        if not secrets:
            raise EndpointConfigError(
                conn_id,
                f"extra {WEBHOOK_URL_EXTRA!r}",
                f"needs a signing secret: set extra {WEBHOOK_SECRET_EXTRA!r} (or the endpoint's "
                f"{SIGNING_SECRET_EXTRA!r}), a whsec_ secret",
            )
    if not emails and not url:
        return None
    return OwnerContact(endpoint=conn_id, emails=emails, webhook_url=url, webhook_secrets=secrets)


def _emails(conn_id: str, raw: Any) -> tuple[str, ...]:
    field = f"extra {EMAIL_EXTRA!r}"
    if raw in (None, ""):
        return ()
    items = [part.strip() for part in raw.split(",")] if isinstance(raw, str) else raw
    if not isinstance(items, list) or not all(isinstance(item, str) for item in items):
        raise EndpointConfigError(
            conn_id, field, "must be an address, a comma-separated list, or a JSON list"
        )
    items = [item.strip() for item in items if item.strip()]
    if len(items) > MAX_EMAILS:
        raise EndpointConfigError(conn_id, field, f"holds {len(items)} addresses; at most {MAX_EMAILS}")
    for position, item in enumerate(items, 1):
        if not _EMAIL.fullmatch(item):
            raise EndpointConfigError(
                conn_id, field, f"address {position} ({mask_email(item)}) is not an email address"
            )
    return tuple(dict.fromkeys(items))


def _secrets(conn_id: str, name: str, raw: Any) -> tuple[str, ...]:
    if raw in (None, ""):
        return ()
    secrets = [raw] if isinstance(raw, str) else raw
    if not isinstance(secrets, list) or not all(isinstance(item, str) for item in secrets):
        raise EndpointConfigError(conn_id, f"extra {name!r}", "must be a whsec_ string or a list of them")
    for secret in secrets:
        try:
            secret_key(secret)
        except InvalidSigningSecret as err:  # its message never quotes the secret
            raise EndpointConfigError(conn_id, f"extra {name!r}", f"is invalid: {err}") from None
    return tuple(secrets)


def _is_http_url(url: str) -> bool:
    try:
        parts = urllib.parse.urlsplit(url)
        parts.port  # noqa: B018 (raises ValueError for a port out of range)
    except ValueError:
        return False
    return parts.scheme in ("http", "https") and bool(parts.hostname) and not any(c.isspace() for c in url)


def page_link(base_url: str, endpoint: str) -> str | None:
    """The endpoint's page on the Deliveries page, from Airflow's ``[api] base_url`` (None: not set)."""
    if not base_url:
        return None
    query = urllib.parse.urlencode({"endpoint": endpoint})
    return f"{base_url.rstrip('/')}{PAGE_PREFIX}/endpoint?{query}"


def message(
    *,
    endpoint: str,
    kind: str,
    reason: str | None,
    actor: str | None,
    at: dt.datetime,
    counts: Mapping[str, Any],
    window_minutes: int,
    link: str | None,
) -> dict[str, Any]:
    """The alert as data: the webhook's body (``type``, ``timestamp``, ``data``) and the email's source."""
    data = {
        "endpoint": endpoint,
        "event": kind,
        "reason": reason,
        "by": actor,
        "at": at.isoformat(),
        "window_minutes": window_minutes,
        **{name: _plain(value) for name, value in counts.items()},
        "page": link,
    }
    return {"type": f"endpoint.{kind}", "timestamp": at.isoformat(), "data": data}


_LABELS = {
    "attempts": "attempts in the window",
    "delivered": "delivered in the window",
    "failures": "failed attempts in the window",
    "queued": "CDRs waiting (queued)",
    "failed": "CDRs failed for good",
    "consecutive_failures": "failed deliveries in a row",
    "failing_since": "failing since",
    "first_failing_cdr_at": "first failing CDR created at",
}


def subject(body: Mapping[str, Any]) -> str:
    """The email's subject line (one line: the endpoint name cannot carry a newline, it is checked)."""
    data = body["data"]
    return f"[CDR webhook] endpoint {data['endpoint']} {TITLES.get(data['event'], data['event'])}"


def email_html(body: Mapping[str, Any]) -> str:
    """The email's HTML (the SMTP provider sends HTML): every value escaped."""
    data = body["data"]
    rows = "".join(
        f"<tr><th align='left'>{html.escape(label)}</th><td>{html.escape(_text(data.get(name)))}</td></tr>"
        for name, label in _LABELS.items()
    )
    link = data.get("page")
    page = f"<p><a href='{html.escape(link, quote=True)}'>The endpoint's page</a></p>" if link else ""
    return (
        f"<p>Endpoint <b>{html.escape(data['endpoint'])}</b> was "
        f"<b>{html.escape(TITLES.get(data['event'], data['event']))}</b> at {html.escape(data['at'])}"
        f"{' by ' + html.escape(data['by']) if data.get('by') else ''}.</p>"
        f"<p>Why: {html.escape(data.get('reason') or 'no reason given')}</p>"
        f"<p>Window: the last {data['window_minutes']} minutes.</p><table>{rows}</table>{page}"
    )


def _plain(value: Any) -> Any:
    return value.isoformat() if hasattr(value, "isoformat") else value


def _text(value: Any) -> str:
    return "–" if value is None else str(value)
