"""A notifier for tests: records each failed run it is told about in the file CDR_NOTIFIER_PROBE names."""

from __future__ import annotations

import json
import os

from airflow.sdk import BaseNotifier


class ProbeNotifier(BaseNotifier):
    def notify(self, context) -> None:
        with open(os.environ["CDR_NOTIFIER_PROBE"], "a") as out:
            out.write(json.dumps({"run_id": context["dag_run"].run_id}) + "\n")


notifier = ProbeNotifier()
