"""The ``source`` commands of ``python -m cdr_webhook``: ``source check`` and ``source preview``.

Both only read: the source relation, the catalog, the endpoint connections. Neither writes to the
ledger nor sends a request.
"""

from __future__ import annotations

import datetime as dt
from typing import TYPE_CHECKING, Any

from cdr_webhook.selection.source import SourceError

if TYPE_CHECKING:
    import argparse
    from collections.abc import Callable, Sequence

    import psycopg

    from cdr_webhook.selection.dry_run import PreviewedCdr
    from cdr_webhook.selection.source_check import Finding

    #: One more check of ``source check``: the connection and the relation to its finding.
    Check = Callable[[psycopg.Connection[Any], str], Finding]


def run(conn: psycopg.Connection[Any], args: argparse.Namespace, *, also: Sequence[Check] = ()) -> str | None:
    """Run ``source <args.command>``; return what failed (for the exit status 1), or None.

    :param also: ``source check``'s checks beyond the select step's own (the commit watcher's).
    """
    from cdr_webhook.adapters import load_settings

    settings = load_settings()
    try:
        if args.command == "check":
            return check(conn, settings.source_relation, sample=args.sample, also=also)
        return preview(conn, settings, args)
    except SourceError as err:
        print(f"error  {err}")
        return f"source relation {settings.source_relation!r} cannot be delivered as it stands"


def check(
    conn: psycopg.Connection[Any], relation: str, *, sample: int, also: Sequence[Check] = ()
) -> str | None:
    """Print each check's finding; return the checks that failed, or None when the source is deliverable."""
    from cdr_webhook.selection.source_check import run_checks

    print(f"source relation {relation}")
    findings = run_checks(conn, relation, sample=sample) + [extra(conn, relation) for extra in also]
    for finding in findings:
        first, *rest = finding.lines
        verdict = ("WARN " if finding.warn else "ok   ") if finding.ok else "FAIL "
        print(f"{finding.check:<8} {verdict} {first}")
        for line in rest:
            print(f"{'':<14} {line}")
    failed = [finding.check for finding in findings if not finding.ok]
    if not failed:
        print("the source can be delivered as it stands")
        return None
    return f"source relation {relation!r}: {', '.join(failed)} check(s) failed"


def preview(conn: psycopg.Connection[Any], settings: Any, args: argparse.Namespace) -> str | None:
    """Print the requests a run over the window would send, secrets masked; send and write nothing."""
    from cdr_webhook.adapters import endpoint_configs
    from cdr_webhook.selection.dry_run import previews
    from cdr_webhook.window import InvalidRunRequest, plan_window

    now = dt.datetime.now(dt.UTC)
    params = {"window_start": args.start, "window_end": args.end or now, "policy": "all"}
    try:
        window = plan_window(
            params={**params, "client_id": args.client}, interval_start=None, interval_end=None, now=now
        )
    except InvalidRunRequest as err:
        return str(err).replace("window_start", "--from").replace("window_end", "--to")
    shown = sent = 0
    for item in previews(
        conn,
        settings,
        start=window.start,
        end=window.end,
        client_id=window.client_id,
        connections=endpoint_configs(),
        limit=args.limit,
    ):
        shown += 1
        sent += item.body is not None
        _print_request(item)
    client = f", client {window.client_id}" if window.client_id is not None else ""
    more = f" (--limit {args.limit} reached: later CDRs not shown)" if shown == args.limit else ""
    print(
        f"{shown} CDR(s) created in [{window.start.isoformat()}, {window.end.isoformat()}){client}: "
        f"{sent} request(s) a run would send, {shown - sent} not sent{more}; nothing was sent or written"
    )
    return None


def _print_request(item: PreviewedCdr) -> None:
    print(f"=== CDR {item.cdr_id} -> {item.endpoint}" + (f" ({item.origin})" if item.origin else ""))
    if item.body is None:
        print(f"not sent: {item.not_sent}")
        print()
        return
    print(f"POST {item.origin}/… (the URL's path is not shown: it may hold a token)")
    for name, value in item.headers.items():
        print(f"{name}: {value}")
    print()
    print(item.body.decode("utf-8"))
    print()
