"""One worker process's try of a ``post_cdr`` chunk, through the real operator, lanes and hook.

    python -m tests.integration.oauth2_worker MAP_INDEX CDR_ID...

It imports everything, prints ``ready``, waits for a line on stdin (so that two workers start sending
at the same moment), runs the try, and prints what ``execute`` returned as JSON. The endpoint and
the CDR database are the environment's ``AIRFLOW_CONN_*`` variables, as in a worker.
"""

from __future__ import annotations

import json
import sys

from cdr_webhook.deliver.operator import CdrWebhookOperator
from tests.support.task_instances import ENDPOINT, FakeTaskInstance


def main(argv: list[str]) -> int:
    map_index, cdr_ids = int(argv[0]), argv[1:]
    operator = CdrWebhookOperator(
        task_id="post_cdr", cdr_ids=cdr_ids, http_conn_id=ENDPOINT, cdrs_per_task=100, retries=2
    )
    print("ready", flush=True)
    sys.stdin.readline()
    returned = operator.execute({"ti": FakeTaskInstance(map_index=map_index)})
    print(json.dumps({"returned": returned}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
