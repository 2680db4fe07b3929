"""Telling an endpoint's owner: the one sender that drains the owner-alert outbox.

Pauses and resumes happen in task processes (a 410, the pause rules), in the api-server (the page) and
in the CLI; each owes its alert in the ledger in the pause's own transaction
(:mod:`cdr_webhook.ledger.owner_alerts`). This module sends them, from one light task a minute (the
``cdr_webhook_owner_alerts`` DAG), so no pause waits on an SMTP server and no process sends twice:

* email through Airflow's SMTP provider (``SmtpHook`` on ``owner_alert_smtp_conn_id``), so the owner's
  mail goes exactly where Airflow's own email goes, with that connection's TLS, login (or OAuth2),
  ``from_email``, timeout and retries, and no SMTP code of ours (Airflow core requires the provider);
* a Standard Webhooks POST (signed like a CDR's POST) to ``owner_webhook_url`` through the egress guard.

A channel that took the alert is marked and not sent again; one that failed leaves the alert pending
with its error (on the Endpoints page), tried again with a growing delay, and fails the task.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import logging
import time
from typing import TYPE_CHECKING, Any

import requests

from cdr_webhook import adapters, owners, redact
from cdr_webhook.deliver.egress import GuardedAdapter
from cdr_webhook.endpoint_config import EndpointConfigError
from cdr_webhook.ledger import owner_alerts
from cdr_webhook.networks import parse_networks
from cdr_webhook.signing import BASE_HEADERS, build_headers

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence

    import psycopg

    from cdr_webhook.settings import Settings

    #: ``(addresses, subject, html)``: raises when the mail was not accepted.
    SendEmail = Callable[[Sequence[str], str, str], None]
    #: ``(contact, webhook id, body)``: raises when the POST was not answered 2xx.
    PostWebhook = Callable[[owners.OwnerContact, str, bytes], None]

log = logging.getLogger(__name__)

#: The most alerts one drain sends (a minute's task): the rest wait for the next minute.
DRAIN_LIMIT = 200
#: A failed alert is tried again after 1, 2, 4 … minutes, at most an hour apart.
FIRST_RETRY = dt.timedelta(minutes=1)
LONGEST_RETRY = dt.timedelta(hours=1)


class OwnerAlertError(Exception):
    """A channel that did not take an alert; the message names the channel and never a secret."""


@dataclasses.dataclass
class Drained:
    """What one drain did: alerts sent, suppressed as repeats, without an owner, and still owed."""

    added: int = 0
    sent: int = 0
    suppressed: int = 0
    held: int = 0
    no_contact: int = 0
    failed: list[str] = dataclasses.field(default_factory=list)


def retry_delay(attempts: int) -> dt.timedelta:
    """The wait after a failed send of an alert tried ``attempts`` times before."""
    return min(FIRST_RETRY * 2 ** min(attempts, 10), LONGEST_RETRY)


def smtp_sender(conn_id: str) -> SendEmail:
    """Send through Airflow's SMTP provider on connection ``conn_id`` (its password is never logged)."""

    def send(addresses: Sequence[str], subject: str, html: str) -> None:
        from airflow.providers.smtp.hooks.smtp import SmtpHook

        hook = SmtpHook(smtp_conn_id=conn_id)
        try:
            with hook:
                hook.send_email_smtp(to=list(addresses), subject=subject, html_content=html)
        except Exception as err:
            # The error is stored and shown: a server's reply quoting the login would leak it there.
            connection = hook.smtp_connection
            secrets = [connection.password, connection.login] if connection is not None else []
            text = redact.scrub(f"{type(err).__name__}: {err}", [s for s in secrets if s])
            raise OwnerAlertError(text or type(err).__name__) from None

    return send


def webhook_poster(*, allowed_networks: Sequence[str], timeout: float) -> PostWebhook:
    """POST through the egress guard: no proxy, no redirect, no internal address unless allowed."""
    networks = parse_networks(",".join(allowed_networks))

    def post(contact: owners.OwnerContact, msg_id: str, body: bytes) -> None:
        assert contact.webhook_url is not None
        headers = build_headers(
            msg_id=msg_id,
            timestamp=int(time.time()),
            body=body,
            api_key=None,
            signing_secrets=contact.webhook_secrets,
        )
        with requests.Session() as session:
            session.trust_env = False
            session.headers.clear()
            session.headers.update(BASE_HEADERS)
            guard = GuardedAdapter(networks)
            session.mount("http://", guard)
            session.mount("https://", guard)
            response = session.post(
                contact.webhook_url, data=body, headers=headers, timeout=timeout, allow_redirects=False
            )
            response.close()
        if not 200 <= response.status_code < 300:
            raise OwnerAlertError(f"HTTP {response.status_code} {response.reason or ''}".strip())

    return post


def drain(
    conn: psycopg.Connection[Any],
    settings: Settings,
    *,
    contact_of: Callable[[str], owners.OwnerContact | None] = adapters.load_owner,
    send_email: SendEmail | None = None,
    post_webhook: PostWebhook | None = None,
    base_url: str | None = None,
    limit: int = DRAIN_LIMIT,
) -> Drained:
    """
    Owe the failure-rate alerts due now, then send every pending alert that is due, one transaction
    each (its row locked against another sender meanwhile); prune finished alerts past retention.
    """
    send_email = send_email or smtp_sender(settings.owner_alert_smtp_conn_id)
    post_webhook = post_webhook or webhook_poster(
        allowed_networks=settings.allowed_networks, timeout=settings.request_timeout_seconds
    )
    link_base = adapters.page_base_url() if base_url is None else base_url
    window = dt.timedelta(minutes=settings.owner_alert_window_minutes)
    interval = dt.timedelta(minutes=settings.owner_alert_interval_minutes)
    done = Drained()
    if settings.owner_alert_failure_rate > 0:
        done.added = len(
            owner_alerts.add_failure_rate_alerts(
                conn,
                window=window,
                threshold=settings.owner_alert_failure_rate,
                min_attempts=settings.owner_alert_min_attempts,
                interval=interval,
            )
        )
    for _ in range(limit):
        with conn.transaction():
            due = owner_alerts.take_due(conn, limit=1)
            if not due:
                break
            _send_one(conn, due[0], contact_of, send_email, post_webhook, link_base, window, interval, done)
    if settings.retention_days:
        before = dt.datetime.now(dt.UTC) - dt.timedelta(days=settings.retention_days)
        owner_alerts.prune(conn, before=before)
    return done


def _send_one(
    conn: psycopg.Connection[Any],
    alert: owner_alerts.Alert,
    contact_of: Callable[[str], owners.OwnerContact | None],
    send_email: SendEmail,
    post_webhook: PostWebhook,
    link_base: str,
    window: dt.timedelta,
    interval: dt.timedelta,
    done: Drained,
) -> None:
    try:
        contact = contact_of(alert.endpoint)
    except EndpointConfigError as err:
        if err.field is None:  # the connection is gone: nobody to tell, and nothing will change that
            owner_alerts.finish(conn, alert.id, "no_contact", note=str(err))
            done.no_contact += 1
            return
        _failed(conn, alert, f"owner contact: {err}", done)
        return
    except Exception as err:  # a secrets backend away: the alert stays owed, the others go on
        _failed(conn, alert, f"owner contact: {type(err).__name__}: {err}", done)
        return
    if contact is None:
        owner_alerts.finish(conn, alert.id, "no_contact", note="the connection names no owner")
        done.no_contact += 1
        return
    if _not_now(conn, alert, interval, done):
        return
    snap = owner_alerts.snapshot(conn, alert.endpoint, window=window)
    counts = dataclasses.asdict(snap)
    counts.pop("paused")
    body = owners.message(
        endpoint=alert.endpoint,
        kind=alert.kind,
        reason=alert.reason,
        actor=alert.actor,
        at=alert.at,
        counts=counts,
        window_minutes=round(window.total_seconds() / 60),
        link=owners.page_link(link_base, alert.endpoint),
    )
    errors = []
    if contact.emails and alert.email_sent_at is None:
        try:
            send_email(contact.emails, owners.subject(body), owners.email_html(body))
            owner_alerts.mark_sent_channel(conn, alert.id, "email")
        except Exception as err:  # any SMTP or connection trouble: the alert stays owed
            errors.append(f"email: {_described(err)}")
    if contact.webhook_url and alert.webhook_sent_at is None:
        try:
            payload = json.dumps(body, separators=(",", ":")).encode()
            post_webhook(contact, f"msg_owner_alert_{alert.id}", payload)
            owner_alerts.mark_sent_channel(conn, alert.id, "webhook")
        except Exception as err:  # refused by the egress guard, unreachable, not 2xx
            errors.append(f"webhook: {_described(err)}")
    if errors:
        text = redact.scrub("; ".join(errors), contact.secrets()) or ""
        for address in contact.emails:  # a server's refusal quotes the address: shown as the page shows it
            text = text.replace(address, owners.mask_email(address))
        _failed(conn, alert, text, done)
        return
    owner_alerts.finish(conn, alert.id, "sent", message=body)
    done.sent += 1
    log.info("Owner alert %d sent: endpoint %s %s", alert.id, alert.endpoint, alert.kind)


def _not_now(
    conn: psycopg.Connection[Any], alert: owner_alerts.Alert, interval: dt.timedelta, done: Drained
) -> bool:
    """
    Whether the alert is not sent now: suppressed, as the owner knows already or a later pause or resume
    says more, or held until its kind's interval is over. A pause or resume is never merely dropped
    while it is the endpoint's news: held, it goes once the interval has passed (the failure-rate
    alert is deduplicated when it is owed: :func:`~cdr_webhook.ledger.owner_alerts.add_failure_rate_alerts`).
    """
    note = None
    if (
        alert.kind in ("paused", "resumed")
        and owner_alerts.last_state_told(conn, alert.endpoint) == alert.kind
    ):
        note = f"the owner's last alert said {alert.kind} already"
    repeated = owner_alerts.last_sent(conn, alert.endpoint, alert.kind, within=interval)
    if note is None and repeated is not None:
        if alert.kind == "failure_rate" or owner_alerts.superseded(conn, alert):
            note = f"the same alert went at {repeated:%Y-%m-%d %H:%M:%S}, and a later one says more"
        else:
            owner_alerts.hold(conn, alert.id, until=repeated + interval)
            done.held += 1
            return True
    if note is None:
        return False
    owner_alerts.finish(conn, alert.id, "suppressed", note=note)
    done.suppressed += 1
    log.info("Owner alert %d (%s %s) not sent: %s", alert.id, alert.endpoint, alert.kind, note)
    return True


def _described(err: Exception) -> str:
    return str(err) if isinstance(err, OwnerAlertError) else f"{type(err).__name__}: {err}"


def _failed(conn: psycopg.Connection[Any], alert: owner_alerts.Alert, error: str, done: Drained) -> None:
    delay = retry_delay(alert.attempts)
    owner_alerts.failed_try(conn, alert.id, error, retry_in=delay)
    done.failed.append(f"alert {alert.id} ({alert.endpoint} {alert.kind}): {error}")
    log.warning(
        "Owner alert %d (%s %s) not sent, tried again in %s: %s",
        alert.id,
        alert.endpoint,
        alert.kind,
        delay,
        error,
    )
