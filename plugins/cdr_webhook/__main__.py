"""The operator's command line: python -m cdr_webhook endpoints list|pause|resume|check|test, source
check|preview|install-notify|remove-notify, watch status.

Installed from the package, it is also ``airflow cdr-webhook ...`` (in a source checkout, plugins/ on
sys.path). The CDR database is ``--dsn``, else ``CDR_DATABASE_URL``, else the Airflow
connection ``cdr_db``; ``endpoints check`` and ``source preview`` read endpoint connections the way the
DAG does, through Airflow.
"""

from __future__ import annotations

import argparse
import datetime as dt
import getpass
import os
import re
import sys
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import psycopg
from psycopg.conninfo import conninfo_to_dict

from cdr_webhook.adapters import load_endpoint, notify_endpoint_event
from cdr_webhook.db import connect as airflow_connect
from cdr_webhook.endpoint_config import EndpointConfig, EndpointConfigError, EndpointFilters
from cdr_webhook.ledger import endpoints, schema
from cdr_webhook.redact import scrub
from cdr_webhook.settings import CDR_DB_CONN_ID

if TYPE_CHECKING:
    from collections.abc import Sequence

DSN_ENV = "CDR_DATABASE_URL"


class CliError(Exception):
    """A failure to report as one line on stderr, with exit status 1."""


def _non_empty(text: str) -> str:
    if not text.strip():
        raise argparse.ArgumentTypeError("must not be empty")
    return text.strip()


def _reason(text: str) -> str:
    text = _non_empty(text)
    if len(text) > endpoints.MAX_REASON_CHARS:
        raise argparse.ArgumentTypeError(f"{len(text)} characters, at most {endpoints.MAX_REASON_CHARS}")
    return text


def build_parser(prog: str = "python -m cdr_webhook") -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--dsn",
        help=f"libpq conninfo or URL of the CDR database (default: ${DSN_ENV}, "
        f"else the Airflow connection {CDR_DB_CONN_ID!r})",
    )
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.splitlines()[0])
    groups = parser.add_subparsers(dest="group", required=True, metavar="endpoints|source|watch")
    group = groups.add_parser("endpoints", help="pause, resume and list webhook endpoints")
    commands = group.add_subparsers(dest="command", required=True, metavar="list|pause|resume|check|test")
    commands.add_parser("list", parents=[common], help="every endpoint: state, backlog and failures")
    pause = commands.add_parser("pause", parents=[common], help="stop sending to an endpoint")
    resume = commands.add_parser("resume", parents=[common], help="send to a paused endpoint again")
    for sub in (pause, resume):
        sub.add_argument("endpoint", type=_non_empty, help="the endpoint's Airflow connection id")
        sub.add_argument("--by", type=_non_empty, help="who does it (default: the OS user)")
    check = commands.add_parser(
        "check", help="parse endpoint connections as the DAG does and say what is wrong (no secret shown)"
    )
    check.add_argument("endpoint", nargs="+", type=_non_empty, help="Airflow connection ids")
    test = commands.add_parser(
        "test", parents=[common], help="POST one test CDR to an endpoint now (paused or not), not retried"
    )
    test.add_argument("endpoint", type=_non_empty, help="the endpoint's Airflow connection id")
    test.add_argument("--by", type=_non_empty, help="who does it (default: the OS user)")
    pause.add_argument("--reason", type=_reason, required=True, help="why, for the audit trail")
    resume.add_argument("--reason", type=_reason, help="why, for the audit trail")
    _add_source_commands(groups, common)
    watch = groups.add_parser("watch", help="the commit watcher that starts a run on new CDRs")
    watch_commands = watch.add_subparsers(dest="command", required=True, metavar="status")
    watch_commands.add_parser(
        "status", parents=[common], help="its heartbeat, state and last error; exit status 1 unless watching"
    )
    return parser


def _add_source_commands(groups: Any, common: argparse.ArgumentParser) -> None:
    """``source check`` and ``source preview`` (the source relation, before a run reads it), and
    ``source install-notify|remove-notify`` (the commit watcher's NOTIFY trigger)."""
    group = groups.add_parser(
        "source", help="check the source relation, preview what a run would send, the NOTIFY trigger"
    )
    commands = group.add_subparsers(
        dest="command", required=True, metavar="check|preview|install-notify|remove-notify"
    )
    check = commands.add_parser(
        "check", parents=[common], help="columns, types, query, index and the newest rows' mapping"
    )
    check.add_argument("--sample", type=_positive, default=1000, help="newest rows to map (default 1000)")
    preview = commands.add_parser(
        "preview", parents=[common], help="print the requests a run over a window would send; sends nothing"
    )
    preview.add_argument("--from", dest="start", required=True, help="first created_at (ISO 8601, UTC)")
    preview.add_argument("--to", dest="end", help="created_at to stop before (default: now)")
    preview.add_argument("--client", type=int, help="only this client_id's CDRs")
    preview.add_argument("--limit", type=_positive, default=100, help="CDRs to show at most (default 100)")
    for name, text in NOTIFY_COMMANDS.items():
        notify = commands.add_parser(name, parents=[common], help=text)
        notify.add_argument(
            "table", type=_non_empty, help="the table the dialer inserts CDRs into, e.g. dialer.cdr"
        )


#: ``source install-notify|remove-notify TABLE``: the NOTIFY trigger that wakes the commit watcher.
NOTIFY_COMMANDS = {
    "install-notify": "wake the commit watcher on every INSERT statement into TABLE",
    "remove-notify": "drop that trigger (the watcher polls again)",
}


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError("must be a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


def _secrets(dsn: str) -> list[str]:
    # The DSN may be malformed, so every way of finding its password is tried.
    found = re.findall(r"password\s*=\s*'?([^\s']+)", dsn)
    try:
        found.append(conninfo_to_dict(dsn).get("password") or "")
    except psycopg.Error:
        pass
    try:
        found.append(urlsplit(dsn).password or "")
    except ValueError:
        pass
    return [secret for secret in found if secret]


def _one_line(err: BaseException, secrets: list[str]) -> str:
    return scrub(" ".join(str(err).split()), secrets) or type(err).__name__


def connect(dsn: str | None) -> psycopg.Connection[Any]:
    """Open the CDR database from the first source given; :class:`CliError` names the source on failure."""
    if dsn is None and os.environ.get(DSN_ENV):
        dsn, source = os.environ[DSN_ENV], f"${DSN_ENV}"
    else:
        source = "--dsn"
    try:
        if dsn is not None:
            return psycopg.connect(dsn, autocommit=True)
        source = f"Airflow connection {CDR_DB_CONN_ID!r}"
        return airflow_connect()
    except Exception as err:
        raise CliError(
            f"cannot connect to the CDR database (from {source}): {_one_line(err, _secrets(dsn or ''))}"
        ) from err


def _when(value: dt.datetime | None) -> str:
    return value.astimezone(dt.UTC).strftime("%Y-%m-%d %H:%M:%S UTC") if value else "-"


def print_table(statuses: list[endpoints.EndpointStatus]) -> None:
    if not statuses:
        print("no endpoints yet: none paused and nothing in the ledger")
        return
    header = ("endpoint", "state", "since", "by", "queued", "failed", "consecutive failures", "reason")
    rows = [
        (
            s.endpoint,
            "paused" if s.paused else "active",
            _when(s.changed_at),
            s.changed_by or "-",
            str(s.queued),
            str(s.failed),
            str(s.consecutive_failures),
            s.reason or "",
        )
        for s in statuses
    ]
    widths = [max(len(row[i]) for row in (header, *rows)) for i in range(len(header) - 1)]
    numeric = {4, 5, 6}

    def line(row: Sequence[str]) -> str:
        cells = [
            cell.rjust(w) if i in numeric else cell.ljust(w)
            for i, (cell, w) in enumerate(zip(row[:-1], widths, strict=True))
        ]
        return "  ".join([*cells, row[-1]]).rstrip()

    print(line(header))
    print("-" * len(line(header)))
    for row in rows:
        print(line(row))


def _status(conn: psycopg.Connection[Any], endpoint: str) -> endpoints.EndpointStatus | None:
    found = endpoints.list_endpoints(conn, endpoint=endpoint)
    return found[0] if found else None


def describe(endpoint: EndpointConfig) -> str:
    """One line on an endpoint's configuration: where it posts and what it uses, never a secret's value."""
    filters = endpoint.filters or EndpointFilters(endpoint.conn_id)
    wanted = {
        "leg_types": sorted(filters.leg_types) if filters.leg_types is not None else None,
        "min_billed_duration": filters.min_billed_duration,
        "campaign_ids": sorted(filters.campaign_ids) if filters.campaign_ids is not None else None,
    }
    parts = [
        endpoint.origin,
        f"x-api-key {'set' if endpoint.api_key else 'not set'}",
        f"{len(endpoint.signing_secrets)} signing secret(s)",
        "mutual TLS" if endpoint.client_cert else "no client certificate",
        f"max_in_flight {endpoint.max_in_flight or 'default'}",
        *([endpoint.auth.describe()] if endpoint.auth.describe() else []),
        *(f"{name}={value}" for name, value in wanted.items() if value is not None),
    ]
    return ", ".join(parts)


def check(conn_ids: Sequence[str]) -> None:
    """Parse each endpoint connection; raise :class:`CliError` naming those that cannot be used."""
    broken = []
    for conn_id in conn_ids:
        try:
            print(f"ok     {conn_id}: {describe(load_endpoint(conn_id))}")
        except EndpointConfigError as err:
            print(f"error  {err}")
            broken.append(conn_id)
    if broken:
        raise CliError(f"{len(broken)} of {len(conn_ids)} endpoint(s) cannot be used: {', '.join(broken)}")


def send_test(conn: psycopg.Connection[Any], endpoint: str, actor: str) -> None:
    """``endpoints test``: POST a test CDR, print what came of it; :class:`CliError` unless delivered."""
    from cdr_webhook.deliver.sample import send_test as post_test_cdr

    try:
        outcome = post_test_cdr(conn, endpoint, actor=actor)
    except endpoints.EndpointNameError as err:
        raise CliError(str(err)) from None
    status = outcome.http_status if outcome.http_status is not None else "-"
    took = f"{outcome.latency_ms} ms" if outcome.latency_ms is not None else "-"
    print(f"test CDR {outcome.cdr_id} to {endpoint!r}: {outcome.verdict}")
    print(f"  HTTP status {status}, took {took}, by {outcome.event.actor} at {_when(outcome.event.at)}")
    if outcome.excerpt:
        print(f"  reply: {outcome.excerpt}")
    if not outcome.delivered:
        raise CliError(f"the test CDR was not delivered: {outcome.verdict}")


def source_command(args: argparse.Namespace) -> None:
    from cdr_webhook.watch import notify

    with connect(args.dsn) as conn:
        try:
            if args.command == "install-notify":
                notify.install(conn, args.table)
                print(
                    f"installed trigger {notify.TRIGGER_NAME} on {args.table}: every INSERT statement "
                    "wakes the commit watcher (it polls only as a fallback now)"
                )
            elif notify.remove(conn, args.table):
                print(f"removed trigger {notify.TRIGGER_NAME} from {args.table}: the watcher polls again")
            else:
                print(f"{args.table} has no trigger {notify.TRIGGER_NAME}: nothing to remove")
        except notify.NotifyError as err:
            raise CliError(str(err)) from err


def watch_status(dsn: str | None) -> None:
    """``watch status``: what the commit watcher last recorded; :class:`CliError` unless it watches."""
    from cdr_webhook.adapters import load_settings
    from cdr_webhook.ledger import watch_health as health

    settings = load_settings()
    with connect(dsn) as conn:
        schema.migrate(conn)
        recorded = health.read(conn, settings.source_relation)
    verdict = health.assess(recorded, interval_seconds=settings.watch_interval_seconds)
    print(f"commit watcher on {settings.source_relation}: {verdict.state}")
    if recorded.seen_at is not None:
        age = health.ago((recorded.now - recorded.seen_at).total_seconds())
        beat = recorded.heartbeat_seconds
        every = f", it reports at least every {beat:g} s" if beat else ""
        print(f"  last heartbeat  {_when(recorded.seen_at)} ({age} ago{every})")
    if recorded.state is not None:
        print(f"  recorded state  {recorded.state} since {_when(recorded.since)}")
    if recorded.error:
        print(f"  last error      {recorded.error}")
    if not verdict.ok:
        raise CliError(f"{verdict.headline} {verdict.advice}")
    print(verdict.headline)


def run(args: argparse.Namespace) -> None:
    if args.group == "watch":
        watch_status(args.dsn)
        return
    if args.group == "source":
        if args.command in NOTIFY_COMMANDS:
            source_command(args)
            return
        from cdr_webhook.selection import cli as source_cli
        from cdr_webhook.watch import notify

        with connect(args.dsn) as conn:
            problem = source_cli.run(conn, args, also=[notify.source_finding])
        if problem:
            raise CliError(problem)
        return
    if args.command == "check":
        check(args.endpoint)
        return
    with connect(args.dsn) as conn:
        schema.migrate(conn)
        if args.command == "list":
            print_table(endpoints.list_endpoints(conn))
            return
        actor = args.by or getpass.getuser()
        if args.command == "test":
            send_test(conn, args.endpoint, actor)
            return
        if args.command == "pause":
            try:
                endpoints.check_pausable(conn, args.endpoint)
            except endpoints.EndpointNameError as err:
                raise CliError(str(err)) from None
            event = endpoints.pause(conn, args.endpoint, reason=args.reason, actor=actor)
            if event is None:
                status = _status(conn, args.endpoint)
                assert status is not None
                print(
                    f"endpoint {args.endpoint!r} already paused since {_when(status.changed_at)} "
                    f"by {status.changed_by}: {status.reason}"
                )
        else:
            event = endpoints.resume(conn, args.endpoint, actor=actor, reason=args.reason)
            if event is None:
                print(f"endpoint {args.endpoint!r} is not paused: nothing to resume")
    if event is not None:
        why = f": {event.reason}" if event.reason else ""
        print(f"{event.action} endpoint {event.endpoint!r} at {_when(event.at)} by {event.actor}{why}")
        notify_endpoint_event(event)


def main(argv: Sequence[str] | None = None, *, prog: str = "python -m cdr_webhook") -> int:
    args = build_parser(prog).parse_args(argv)  # exits 2 with the usage on bad usage
    try:
        run(args)
    except CliError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except psycopg.Error as err:
        print(f"error: the CDR database refused: {_one_line(err, [])}", file=sys.stderr)
        return 1
    return 0


def airflow_command(args: argparse.Namespace) -> None:
    """``airflow cdr-webhook ...`` (:mod:`cdr_webhook.airflow_cli`): the same commands and exit status."""
    sys.exit(main(args.arguments, prog="airflow cdr-webhook"))


if __name__ == "__main__":
    sys.exit(main())
