"""Notifiers for the endpoint tests: each appends the event it gets to the file CDR_NOTIFIER_PROBE names."""

from __future__ import annotations

import json
import os
from typing import Any

from airflow.sdk import BaseNotifier


def _record(kind: str, context: Any) -> None:
    with open(os.environ["CDR_NOTIFIER_PROBE"], "a") as out:
        out.write(json.dumps({"kind": kind, "event": context["cdr_webhook_event"]}, default=str) + "\n")


class EndpointProbeNotifier(BaseNotifier):
    def notify(self, context: Any) -> None:
        _record("notifier", context)


def plain(context: Any) -> None:
    _record("callable", context)


def broken(context: Any) -> None:
    raise RuntimeError("the pager is down")


notifier = EndpointProbeNotifier()
