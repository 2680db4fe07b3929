"""Secrets, everywhere at once: every workflow on one real Airflow, then a search for the secrets.

One deployment (LocalExecutor, PostgreSQL metadata, the triggerer and its commit watcher, an hourly
schedule) with secrets of its own: x-api-keys, ``whsec_`` signing secrets (one endpoint rotating two),
credentials and a token in an endpoint's URL, an mTLS client key (a real HTTPS receiver that
requires the client certificate), an invalid signing secret in a held endpoint's connection, and a
password for the CDR database (a PostgreSQL role of its own).

The workflows: deliveries that succeed, a 503 and a 429 retried, a 400 failed then cleared, a 400
failed then redelivered from the Deliveries page, a receiver that echoes its x-api-key, signing
secret and URL back in its body, headers and reason phrase (503 then 400, and 200), a held
endpoint, an event-started run, a backfill, a Params run from the page, pause and resume from the
page, every page of the plugin, the CLI's endpoint and source commands (one given a DSN with the
password that cannot connect).

Then, with the stack stopped, each place is searched for every secret in every form
(:mod:`tests.support.secrets_sweep`): every file of the Airflow home (logs, the components' stdout and stderr,
the temporary directory the tasks wrote their TLS files in), every table of the metadata and CDR
databases, the REST API's runs, task instances (rendered fields), task logs, XComs and event log,
every page's HTML and headers, and the CLI's output. A finding names the place and shows an excerpt
with the secrets masked. docs/reliability.md states what was searched and found.
"""

from __future__ import annotations

import base64
import dataclasses
import datetime as dt
import json
import os
import re
import subprocess
import sys
import time
import traceback
import uuid
from collections import Counter
from html import unescape
from typing import TYPE_CHECKING, Any

import psycopg
import pytest
import requests
from cryptography.x509.oid import ExtendedKeyUsageOID
from psycopg import sql
from psycopg.conninfo import make_conninfo

from demo.connections import http_conn, postgres_conn
from demo.dialer import Dialer
from demo.receiver import Receiver
from tests.conftest import ROOT
from tests.support import deployments
from tests.support.page import csrf_of
from tests.support.pki import issue, pem, tls_context
from tests.support.secrets_sweep import Sweep, fernet_key_of

if TYPE_CHECKING:
    from demo.stack import AirflowStack

pytestmark = [pytest.mark.e2e, pytest.mark.scheduler]


def _token(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def _signing_secret() -> str:
    return "whsec_" + base64.b64encode(os.urandom(32)).decode()


CA = issue("secrets-sweep test CA")
CA_PEM = pem(CA[0])[0]
CLIENT_CERT_PEM, CLIENT_KEY_PEM = pem(
    *issue("secrets-sweep-client", issuer=CA, usage=ExtendedKeyUsageOID.CLIENT_AUTH)
)
#: name → secret: a finding shows the name in the secret's place.
SECRETS = {
    "API_KEY_7": _token("swp-key7"),
    "SIGNING_SECRET_7": _signing_secret(),
    "SIGNING_SECRET_7_NEXT": _signing_secret(),
    "API_KEY_8_MTLS": _token("swp-key8"),
    "TLS_CLIENT_KEY": CLIENT_KEY_PEM,
    "API_KEY_9_ECHOED": _token("swp-key9"),
    "SIGNING_SECRET_9_ECHOED": _signing_secret(),
    "URL_TOKEN_9": _token("swp-urltoken"),
    "URL_PASSWORD_9": _token("swp-urlpass"),
    "API_KEY_3_HELD": _token("swp-key3"),
    "BAD_SIGNING_SECRET_3": "whsec_" + _token("not-base64!"),
    "CDR_DB_PASSWORD": _token("swp-dbpass"),
    "API_KEY_DEFAULT": deployments.API_KEY,
    "SIGNING_SECRET_DEFAULT": deployments.SIGNING_SECRET,
}
#: Masks every secret in what a failure shows.
SHOWN = Sweep(SECRETS)
ROLE = f"secrets_sweep_{uuid.uuid4().hex[:10]}"
HOUR = dt.timedelta(hours=1)
BASE = (dt.datetime.now(dt.UTC) - dt.timedelta(days=2)).replace(minute=0, second=0, microsecond=0)
BACKFILL_HOUR = BASE + 2 * HOUR


@dataclasses.dataclass
class Receivers:
    default: Receiver
    seven: Receiver  # plain http, two signing secrets
    eight: Receiver  # https, mutual TLS
    nine: Receiver  # echoes what it was given


@dataclasses.dataclass
class Worked:
    """What the workflows did and the texts they produced that no file or table holds."""

    stack: AirflowStack
    receivers: Receivers
    cdrs: dict[str, str]
    texts: list[tuple[str, str]] = dataclasses.field(default_factory=list, repr=False)


@pytest.fixture(scope="module")
def cdr_role(pg_server, cdr_dsn):
    """A login role with a password for the CDR database (dropped at the end); its conninfo."""
    with psycopg.connect(pg_server, autocommit=True) as admin:
        admin.execute(
            sql.SQL("CREATE ROLE {} LOGIN SUPERUSER PASSWORD {}").format(
                sql.Identifier(ROLE), sql.Literal(SECRETS["CDR_DB_PASSWORD"])
            )
        )
    try:
        yield make_conninfo(cdr_dsn, user=ROLE, password=SECRETS["CDR_DB_PASSWORD"])
    finally:
        with psycopg.connect(cdr_dsn, autocommit=True) as conn:
            conn.execute(sql.SQL("REASSIGN OWNED BY {} TO CURRENT_USER").format(sql.Identifier(ROLE)))
        with psycopg.connect(pg_server, autocommit=True) as admin:
            admin.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(ROLE)))


@pytest.fixture(scope="module")
def deployment(deploy, cdr_role, tmp_path_factory):
    seven = Receiver(secret=SECRETS["SIGNING_SECRET_7"], api_key=SECRETS["API_KEY_7"]).start()
    eight = Receiver(api_key=SECRETS["API_KEY_8_MTLS"], tls=mutual_tls(tmp_path_factory)).start()
    nine = Receiver(
        secret=SECRETS["SIGNING_SECRET_9_ECHOED"], api_key=SECRETS["API_KEY_9_ECHOED"], echo=True
    ).start()
    home = tmp_path_factory.mktemp("airflow-secrets-sweep")
    (home / "tmp").mkdir()
    env = {
        "PYTHONPATH": str(ROOT),
        "TMPDIR": str(home / "tmp"),  # the tasks' TLS files: searched with the rest of the home
        "AIRFLOW__CDR_WEBHOOK__SCHEDULE": "0 * * * *",  # hourly: the runs here are started by hand
        "AIRFLOW__CDR_WEBHOOK__RETRY_DELAY_SECONDS": "1",
        "AIRFLOW__CDR_WEBHOOK__MAX_RETRY_DELAY_SECONDS": "2",
        "AIRFLOW__CDR_WEBHOOK__FAILURE_NOTIFIER": "tests.support.notifier_probe:notifier",
        "CDR_NOTIFIER_PROBE": str(home / "notified.jsonl"),
        "AIRFLOW_CONN_CDR_DB": postgres_conn(cdr_role),
        **endpoint_connections(seven, eight, nine),
    }
    with deploy(home, env, seven, eight, nine) as (stack, default):
        yield stack, Receivers(default, seven, eight, nine)


def mutual_tls(tmp_path_factory) -> Any:
    """The mTLS receiver's context: a certificate for 127.0.0.1, client certificates of the test CA."""
    directory = tmp_path_factory.mktemp("secrets-sweep-pki")
    cert, key = pem(*issue("127.0.0.1", issuer=CA, usage=ExtendedKeyUsageOID.SERVER_AUTH))
    (directory / "server.crt").write_text(cert)
    (directory / "server.key").write_text(key)
    (directory / "ca.crt").write_text(CA_PEM)
    return tls_context((directory / "server.crt", directory / "server.key"), client_ca=directory / "ca.crt")


def endpoint_connections(seven: Receiver, eight: Receiver, nine: Receiver) -> dict[str, str]:
    """Clients 7 (two signing secrets), 8 (mutual TLS), 9 (echoing; credentials and a token in its URL),
    3 (held)."""
    return {
        "AIRFLOW_CONN_CDR_WEBHOOK_CLIENT_7": http_conn(
            seven.url,
            api_key=SECRETS["API_KEY_7"],
            signing_secret=[SECRETS["SIGNING_SECRET_7"], SECRETS["SIGNING_SECRET_7_NEXT"]],
        ),
        "AIRFLOW_CONN_CDR_WEBHOOK_CLIENT_8": http_conn(
            eight.url,
            api_key=SECRETS["API_KEY_8_MTLS"],
            ca_bundle=CA_PEM,
            client_cert=CLIENT_CERT_PEM,
            client_key=CLIENT_KEY_PEM,
        ),
        "AIRFLOW_CONN_CDR_WEBHOOK_CLIENT_9": http_conn(
            nine.url.replace("://", f"://cdr:{SECRETS['URL_PASSWORD_9']}@") + f"/{SECRETS['URL_TOKEN_9']}",
            api_key=SECRETS["API_KEY_9_ECHOED"],
            signing_secret=SECRETS["SIGNING_SECRET_9_ECHOED"],
        ),
        # Held: its signing secret is not base64 (the connection's other secrets are in it too).
        "AIRFLOW_CONN_CDR_WEBHOOK_CLIENT_3": http_conn(
            seven.url, api_key=SECRETS["API_KEY_3_HELD"], signing_secret=SECRETS["BAD_SIGNING_SECRET_3"]
        ),
    }


def at(minutes: int, hour: dt.datetime = BASE) -> dt.datetime:
    return hour + dt.timedelta(minutes=minutes)


def window(start: dt.datetime, end: dt.datetime, **more: Any) -> dict[str, Any]:
    return {"window_start": start.isoformat(), "window_end": end.isoformat(), **more}


def first_wave(stack: AirflowStack, receivers: Receivers, dialer: Dialer) -> tuple[str, dict[str, str]]:
    """One run over the first hour: every endpoint, every kind of answer; it fails (two 400s, the echo)."""
    cdrs = {
        "ok_7": dialer.cdr(client_id=7, created_at=at(1)),
        "503_7": dialer.cdr(client_id=7, created_at=at(2)),
        "429_7": dialer.cdr(client_id=7, created_at=at(3)),
        "cleared_7": dialer.cdr(client_id=7, created_at=at(4)),
        "redelivered_7": dialer.cdr(client_id=7, created_at=at(5)),
        "mtls_8": dialer.cdr(client_id=8, created_at=at(6)),
        "echo_failed_9": dialer.cdr(client_id=9, created_at=at(7)),
        "echo_ok_9": dialer.cdr(client_id=9, created_at=at(8)),
        "held_3": dialer.cdr(client_id=3, created_at=at(9)),
        "default_1": dialer.cdr(client_id=1, created_at=at(10)),
    }
    receivers.seven.script(cdrs["503_7"], [503])
    receivers.seven.script(cdrs["429_7"], [(429, {"retry-after": "1"})])
    receivers.seven.script(cdrs["cleared_7"], [400])
    receivers.seven.script(cdrs["redelivered_7"], [400])
    receivers.nine.script(cdrs["echo_failed_9"], [503, 400])
    run_id = stack.trigger(conf=window(BASE, BASE + HOUR))
    assert stack.wait_run(run_id, timeout=180) == "failed", stack.dump()
    return run_id, cdrs


class Page:
    """The Deliveries page over HTTP, as the api-server serves it; every response kept for the sweep."""

    def __init__(self, stack: AirflowStack, texts: list[tuple[str, str]]) -> None:
        self.base = f"{stack.base}/cdr-webhook"
        self.headers = stack.auth_headers()
        self.texts = texts

    def get(self, path: str, expect: int = 200, **params: Any) -> str:
        return self._keep("GET", path, expect, params=params)

    def post(self, path: str, expect: int = 200, **data: Any) -> str:
        return self._keep("POST", path, expect, data=data)

    def _keep(self, method: str, path: str, expect: int, **kwargs: Any) -> str:
        response = requests.request(
            method, f"{self.base}{path}", headers=self.headers, timeout=60, allow_redirects=False, **kwargs
        )
        assert response.status_code == expect, (method, path, response.status_code, SHOWN.mask(response.text))
        headers = "\n".join(f"{name}: {value}" for name, value in response.headers.items())
        self.texts.append((f"page {method} {response.url}", f"{headers}\n\n{response.text}"))
        return response.text


def page_actions(page: Page, run_id: str, cdrs: dict[str, str], day: str) -> str:
    """Redeliver from a delivery's page, pause and resume from Endpoints, a Params run from Completeness."""
    detail = page.get("/delivery", cdr_id=cdrs["redelivered_7"], endpoint="cdr_webhook_client_7")
    key = re.search(r'name="key" value=\'([^\']+)\'', detail).group(1)
    result = page.post("/redeliver", key=key, csrf=csrf_of(detail))
    assert "Cleared 1 <code>post_cdr</code> task(s) of run" in result, result
    for action in ("pause", "resume"):
        endpoints = page.get("/endpoints")
        page.post(
            f"/endpoints/{action}", 303, endpoint="cdr_webhook_client_9", reason=f"{action} in the sweep",
            csrf=csrf_of(endpoints),
        )  # fmt: skip
    # A test CDR to the echoing receiver: its reply (the echoed key) is shown and recorded, scrubbed.
    confirm = page.get("/test-cdr", endpoint="cdr_webhook_client_9")
    assert "delivered" in page.post("/test-cdr", endpoint="cdr_webhook_client_9", csrf=csrf_of(confirm))
    completeness = page.get("/completeness", since=day, to=day, client="8")
    ran = page.post("/runs", policy="missing", since=day, to=day, client="8", csrf=csrf_of(completeness))
    return unescape(re.search(r"Triggered run <a [^>]*>([^<]+)</a>", ran).group(1))


def every_page(page: Page, stack: AirflowStack, cdr_conn: Any, run_id: str, cdrs: dict[str, str]) -> None:
    """Every page of the plugin once the runs are done: lists, each delivery, task tabs, errors."""
    day = BASE.date().isoformat()
    page.get("/")
    page.get("/", status="failed")
    page.get("/", client="9", since=day, to=day)
    page.get("/", q=cdrs["echo_failed_9"])
    page.get("/", endpoint="cdr_webhook_client_3")
    for cdr_id, endpoint in cdr_conn.execute("SELECT cdr_id, endpoint FROM cdr_webhook.delivery").fetchall():
        page.get("/delivery", cdr_id=cdr_id, endpoint=endpoint)
    for ti in stack.task_instances(run_id):
        expect = 303 if ti["task_id"] == "post_cdr" else 200  # one delivery: straight to it
        page.get(
            "/task",
            expect,
            dag_id="cdr_webhook",
            run_id=run_id,
            task_id=ti["task_id"],
            map_index=ti["map_index"],
        )
    page.get("/completeness")
    page.get("/completeness", since=day, to=day)
    page.get("/endpoints")
    for (endpoint,) in cdr_conn.execute("SELECT DISTINCT endpoint FROM cdr_webhook.delivery").fetchall():
        for period in ("hour", "day", "week"):
            page.get("/endpoint", endpoint=endpoint, period=period)
        page.get("/test-cdr", endpoint=endpoint)
    page.get("/delivery", 404, cdr_id="no-such-cdr", endpoint="cdr_webhook_client_9")
    page.get("/", 400, client="not-a-number")
    page.get("/completeness", 400, since="yesterday")
    page.get("/static/nothing.css", 404)


def backfill(stack: AirflowStack, dialer: Dialer) -> str:
    """A backfill of one hour of the schedule with a CDR of the default endpoint; its CDR id."""
    cdr = dialer.cdr(client_id=1, created_at=at(10, BACKFILL_HOUR))
    hour = BACKFILL_HOUR.isoformat()
    stack.api("POST", "/backfills", json={"dag_id": "cdr_webhook", "from_date": hour, "to_date": hour})
    return cdr


def wait_for(what: str, predicate: Any, timeout: float = 180) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if found := predicate():
            return found
        time.sleep(0.5)
    raise TimeoutError(what)


#: The CLI commands of :func:`cli_runs` and their exit statuses (client 3's endpoint cannot be used).
CLI_EXITS = (
    ("endpoints check", 1),
    ("endpoints list", 0),
    ("source preview", 0),
    ("list, unreachable", 1),
    ("endpoints test", 0),
)


def cli_runs(stack: AirflowStack, cdr_role: str) -> list[subprocess.Popen[str]]:
    """The CLI's commands that read connections and the CDR database, one given a DSN it cannot use."""
    env = stack.env | {"PYTHONPATH": f"{ROOT / 'plugins'}{os.pathsep}{ROOT}"}
    env.pop("CDR_DATABASE_URL", None)
    unreachable = make_conninfo(cdr_role, host="127.0.0.1", port="1", connect_timeout="3")
    commands = [
        ["endpoints", "check", *(f"cdr_webhook_client_{n}" for n in (3, 7, 8, 9)), "cdr_webhook"],
        ["endpoints", "list"],
        ["source", "preview", "--from", BASE.isoformat(), "--to", (BASE + HOUR).isoformat()],
        ["endpoints", "list", "--dsn", unreachable],
        ["endpoints", "test", "cdr_webhook_client_9", "--by", "sweep"],  # to the echoing receiver
    ]
    return [
        subprocess.Popen(
            [sys.executable, "-m", "cdr_webhook", *command],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for command in commands
    ]


@pytest.fixture(scope="module")
def worked(deployment, cdr_role, cdr_dsn) -> Worked:
    """Every workflow, then every page; the stack is stopped before the tests search it."""
    stack, receivers = deployment
    texts: list[tuple[str, str]] = []
    failure = None
    try:
        cdrs = workflows(stack, receivers, cdr_role, cdr_dsn, texts)
    except Exception:  # shown with every secret masked, the traceback's messages included
        failure = SHOWN.mask(traceback.format_exc())
    if failure:
        pytest.fail(failure, pytrace=False)
    assert not stack.stop()  # every log line written before the files are searched
    return Worked(stack, receivers, cdrs, texts)


def workflows(
    stack: AirflowStack, receivers: Receivers, cdr_role: str, cdr_dsn: str, texts: list[tuple[str, str]]
) -> dict[str, str]:
    """Run every workflow, then fetch every page and the REST API's view; return the CDRs by role."""
    page = Page(stack, texts)
    with psycopg.connect(cdr_dsn, autocommit=True) as conn:
        dialer = Dialer(conn)
        run_id, cdrs = first_wave(stack, receivers, dialer)
        stack.clear_mapped_task(run_id, post_cdr(stack, run_id, cdrs["cleared_7"])["map_index"])
        cdrs["page_run_8"] = dialer.cdr(client_id=8, created_at=at(20))
        page_run = page_actions(page, run_id, cdrs, BASE.date().isoformat())
        cdrs["backfilled_1"] = backfill(stack, dialer)
        wait_for(
            "the commit watcher", lambda: "Watching cdr_webhook_source" in stack.log_tail("triggerer", 10**6)
        )
        cdrs["event_1"] = dialer.cdr(client_id=1)
        cli = cli_runs(stack, cdr_role)
        # The echoed CDR failed for good: the run ends failed again, once the cleared tasks ran.
        assert stack.wait_run(run_id, timeout=180) == "failed", stack.dump()
        assert stack.wait_run(page_run, timeout=180) == "success", stack.dump()
        wait_for(
            "the backfill", lambda: [r for r in stack.runs(run_type="backfill") if r["state"] == "success"]
        )
        wait_for("the event run", lambda: receivers.default.received(cdrs["event_1"]), timeout=120)
        stack.wait_backfills()
        every_page(page, stack, conn, run_id, cdrs)
        texts += rest_texts(stack)
        for (name, exit_code), process in zip(CLI_EXITS, cli, strict=True):
            output, _ = process.communicate(timeout=120)
            texts.append((f"cli {name}", output))
            assert process.returncode == exit_code, (name, process.returncode, output)
    return cdrs


def post_cdr(stack: AirflowStack, run_id: str, cdr_id: str) -> dict[str, Any]:
    [ti] = [t for t in stack.task_instances(run_id) if t["rendered_map_index"] == cdr_id]
    return ti


def rest_texts(stack: AirflowStack) -> list[tuple[str, str]]:
    """The REST API's view: runs, task instances (rendered fields), every try's log, XComs, events."""
    texts = []

    def keep(path: str, **params: Any) -> Any:
        found = stack.api("GET", path, params=params, headers={"accept": "application/json"})
        texts.append((f"REST {path} {params or ''}", json.dumps(found)))
        return found

    for path in ("/dags/cdr_webhook/details", "/backfills", "/eventLogs", "/connections", "/variables"):
        keep(path, **({"dag_id": "cdr_webhook"} if path == "/backfills" else {"limit": 1000}))
    for run in keep("/dags/cdr_webhook/dagRuns", limit=100)["dag_runs"]:
        run_path = f"/dags/cdr_webhook/dagRuns/{run['dag_run_id']}"
        for ti in keep(f"{run_path}/taskInstances", limit=1000)["task_instances"]:
            for attempt in range(1, ti["try_number"] + 1):
                keep(
                    f"{run_path}/taskInstances/{ti['task_id']}/logs/{attempt}",
                    map_index=ti["map_index"],
                    full_content=True,
                )
    xcoms = keep("/dags/~/dagRuns/~/taskInstances/~/xcomEntries", limit=1000)["xcom_entries"]
    for xcom in xcoms:
        ti_path = f"/dags/{xcom['dag_id']}/dagRuns/{xcom['run_id']}/taskInstances/{xcom['task_id']}"
        keep(f"{ti_path}/xcomEntries/{xcom['key']}", map_index=xcom["map_index"], deserialize=True)
    return texts


def statuses(receiver: Receiver, cdr_id: str) -> list[int]:
    return [request.answered for request in receiver.received(cdr_id)]


def test_every_workflow_did_what_it_should(worked, cdr_conn):
    """The search below means something only if the secrets were in play: each workflow's outcome."""
    receivers, cdrs = worked.receivers, worked.cdrs
    seven, eight, nine, default = receivers.seven, receivers.eight, receivers.nine, receivers.default
    sent_to_seven = ("ok_7", "503_7", "429_7", "cleared_7", "redelivered_7")
    assert [statuses(seven, cdrs[name]) for name in sent_to_seven] == [
        [200], [503, 200], [429, 200], [400, 200], [400, 200],
    ]  # fmt: skip
    assert all(r.signature_ok and r.headers["x-api-key"] == SECRETS["API_KEY_7"] for r in seven.received())
    assert len(seven.received()[0].headers["webhook-signature"].split()) == 2  # both secrets sign
    assert [statuses(eight, cdrs[name]) for name in ("mtls_8", "page_run_8")] == [[200], [200]]
    keyed = eight.received()[0].headers["x-api-key"] == SECRETS["API_KEY_8_MTLS"]
    assert keyed  # over mutual TLS (no secret in an assertion's message)
    assert [statuses(nine, cdrs[name]) for name in ("echo_failed_9", "echo_ok_9")] == [[503, 400], [200]]
    tokened = nine.received()[0].path.endswith(SECRETS["URL_TOKEN_9"])
    assert tokened
    assert [statuses(default, cdrs[name]) for name in ("default_1", "backfilled_1", "event_1")] == [[200]] * 3
    ledger = dict(cdr_conn.execute("SELECT cdr_id, status FROM cdr_webhook.delivery").fetchall())
    assert ledger.pop(cdrs["held_3"]) == "queued"
    assert ledger.pop(cdrs["echo_failed_9"]) == "failed"
    assert set(ledger.values()) == {"delivered"}
    excerpts = cdr_conn.execute(
        "SELECT string_agg(response_excerpt, ' ') FROM cdr_webhook.delivery_attempt WHERE cdr_id = ANY(%s)",
        ([cdrs["echo_failed_9"], cdrs["echo_ok_9"]],),
    ).fetchone()[0]
    scrubbed = '"api-key": "***"' in excerpts
    assert scrubbed  # the echo reached the ledger, scrubbed
    events = cdr_conn.execute(
        "SELECT endpoint, action FROM cdr_webhook.endpoint_event ORDER BY at"
    ).fetchall()
    assert ("cdr_webhook_client_3", "paused") in events  # held
    assert [a for e, a in events if e == "cdr_webhook_client_9"] == ["paused", "resumed", "tested", "tested"]
    tested = cdr_conn.execute(
        "SELECT string_agg(response_excerpt, ' ') FROM cdr_webhook.endpoint_event WHERE action = 'tested'"
    ).fetchone()[0]
    assert '"api-key": "***"' in tested  # the test CDRs' echo reached the events, scrubbed
    assert len(worked.texts) >= 60, len(worked.texts)
    assert not list((worked.stack.home / "tmp").glob("cdr-webhook-tls-*"))  # every TLS file removed


def assert_nothing_found(sweep: Sweep, place: str) -> None:
    print(f"{place}: searched {dict(sweep.searched)}")
    if sweep.findings:
        pytest.fail(f"secrets found in {place}:\n{sweep.report()}", pytrace=False)


def test_no_secret_in_any_file_of_the_airflow_home(worked):
    sweep = Sweep(SECRETS)
    sweep.files(worked.stack.home, "AIRFLOW_HOME")
    logs = list((worked.stack.home / "logs").rglob("*.log"))
    assert len(logs) >= 15, logs  # the first run alone writes 15 tries; the dag-processor one
    assert all((worked.stack.home / f"{name}.log").stat().st_size for name in worked.stack.processes)
    assert_nothing_found(sweep, "the Airflow home")


def test_no_secret_in_any_table_of_the_metadata_database(worked, pg_server):
    sweep = Sweep(SECRETS)
    dsn = make_conninfo(pg_server, dbname=worked.stack.meta_db)
    sweep.database(dsn, "metadata", fernet_key_of(worked.stack.home))  # the trigger's kwargs decrypted
    assert sweep.searched["tables"] >= 50, sweep.searched
    assert sweep.searched["rows"] >= 100, sweep.searched
    assert_nothing_found(sweep, "the metadata database")


def test_no_secret_in_any_table_of_the_cdr_database(worked, cdr_dsn):
    sweep = Sweep(SECRETS)
    sweep.database(cdr_dsn, "cdr")
    assert sweep.searched["tables"] >= 10, sweep.searched
    assert_nothing_found(sweep, "the CDR database (ledger included)")


def test_no_secret_in_the_rest_api_the_pages_or_the_cli(worked):
    sweep = Sweep(SECRETS)
    for where, text in worked.texts:
        sweep.text(where, text)
    kinds = Counter(where.split()[0] for where, _ in worked.texts)
    print(f"{len(SECRETS)} secrets in {len(sweep.forms)} forms; texts: {dict(kinds)}")
    assert set(kinds) == {"page", "REST", "cli"}, kinds
    assert_nothing_found(sweep, f"{len(worked.texts)} REST responses, pages and CLI outputs")


def test_the_sweep_sees_the_secrets_where_they_belong(worked):
    """A control: what the receivers were sent holds the secrets, and the sweep finds them there."""
    sweep = Sweep(SECRETS)
    for name in ("seven", "eight", "nine"):
        for request in getattr(worked.receivers, name).received():
            sweep.text(f"what {name} received", json.dumps(request.headers))
    assert {finding.secret for finding in sweep.findings} == {
        "API_KEY_7",
        "API_KEY_8_MTLS",
        "API_KEY_9_ECHOED",
    }
    assert not any(secret in sweep.report() for secret in SECRETS.values())
