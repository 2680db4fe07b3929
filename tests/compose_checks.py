"""Static checks of docker-compose.yml, its Dockerfile and .env.example: no Docker engine needed.

Each check takes parsed values and returns its problems as sentences (an empty list: no problem), so a
test can feed it the real files or a deliberately broken copy.
"""

from __future__ import annotations

import ipaddress
import json
import re
import shlex
import urllib.parse
from pathlib import Path
from typing import Any

import yaml

from cdr_webhook.endpoint_config import EndpointConfigError, parse_endpoint
from cdr_webhook.networks import parse_networks
from cdr_webhook.routing import CLIENT_CONN_PREFIX
from cdr_webhook.setting_values import PARSERS, parse_settings
from cdr_webhook.settings import CDR_DB_CONN_ID, DEFAULT_ENDPOINT_CONN_ID, SettingsError

ROOT = Path(__file__).resolve().parents[1]

#: The Airflow components of the official file, each with its command.
AIRFLOW_COMMANDS = {
    "airflow-apiserver": "api-server",
    "airflow-scheduler": "scheduler",
    "airflow-dag-processor": "dag-processor",
    "airflow-triggerer": "triggerer",
    "airflow-worker": "celery worker",
}
#: What every Airflow component must agree on (workers cannot authenticate otherwise).
SHARED_ENV = (
    "AIRFLOW__API_AUTH__JWT_SECRET",
    "AIRFLOW__API__SECRET_KEY",
    "AIRFLOW__CORE__EXECUTION_API_SERVER_URL",
    "AIRFLOW__CORE__EXECUTOR",
    "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN",
    "AIRFLOW__CELERY__BROKER_URL",
    "AIRFLOW__CELERY__RESULT_BACKEND",
)
SETTING_PREFIX = "AIRFLOW__CDR_WEBHOOK__"
CONN_PREFIX = "AIRFLOW_CONN_"
CONDITIONS = ("service_started", "service_healthy", "service_completed_successfully")
LONG_RUNNING = ("always", "unless-stopped")
SECRET_NAME = re.compile(r"PASSWORD|SECRET|_KEY$")
# Compose interpolation: $$ (a literal $), ${NAME}, ${NAME<op><argument>} with op :- - :? ? :+ +, $NAME.
_VARIABLE = re.compile(
    r"\$\$|\$\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?+])(?P<arg>[^}]*))?\}|\$(?P<bare>[A-Za-z_]\w*)"
)


class InterpolationError(ValueError):
    """A ``${NAME:?message}`` whose variable is unset, as compose reports it."""


# -- loading -------------------------------------------------------------------------------------------


def load_compose(text: str) -> dict[str, Any]:
    """Parse the compose file; anchors, aliases and ``<<`` merge keys resolve as compose resolves them."""
    return yaml.safe_load(text)


def load_env_file(text: str) -> dict[str, str]:
    """Parse a ``.env`` file: ``NAME=value`` lines; blank lines and ``#`` comments are skipped."""
    env = {}
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            name, sep, value = line.partition("=")
            if sep:
                env[name.strip()] = value.strip()
    return env


def strings(node: Any) -> list[str]:
    """Every string (values and keys) in a parsed YAML tree."""
    if isinstance(node, dict):
        return [s for key, value in node.items() for s in (*strings(key), *strings(value))]
    if isinstance(node, list):
        return [s for item in node for s in strings(item)]
    return [node] if isinstance(node, str) else []


def references(compose: dict[str, Any]) -> list[tuple[str, str | None, str | None]]:
    """Every variable the compose file interpolates: ``(name, operator, argument)``."""
    found = []
    for text in strings(compose):
        for match in _VARIABLE.finditer(text):
            if match.group(0) != "$$":
                found.append((match["name"] or match["bare"], match["op"], match["arg"]))
    return found


def interpolate(node: Any, env: dict[str, str]) -> Any:
    """Substitute variables the way compose does (a copy); raise :class:`InterpolationError` on ``:?``."""
    if isinstance(node, dict):
        return {interpolate(key, env): interpolate(value, env) for key, value in node.items()}
    if isinstance(node, list):
        return [interpolate(item, env) for item in node]
    if not isinstance(node, str):
        return node

    def substitute(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        name, op, arg = match["name"] or match["bare"], match["op"], match["arg"] or ""
        value = env.get(name)
        empty = value is None or (value == "" and op is not None and op.startswith(":"))
        if op in (":-", "-"):
            return arg if empty else value or ""
        if op in (":?", "?"):
            if empty:
                raise InterpolationError(f"{name}: {arg}")
            return value or ""
        if op in (":+", "+"):
            return "" if empty else arg
        return value or ""

    return _VARIABLE.sub(substitute, node)


def environment(service: dict[str, Any]) -> dict[str, str]:
    """A service's environment as a mapping (compose accepts a mapping or ``NAME=value`` items)."""
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.partition("=")[::2] for item in env)
    return {str(name): "" if value is None else str(value) for name, value in env.items()}


def command(service: dict[str, Any]) -> str:
    value = service.get("command", "")
    return " ".join(value) if isinstance(value, list) else str(value)


def airflow_services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The Airflow services: named ``airflow-*``, running the shared image, or configuring Airflow."""
    image = compose["x-airflow-common"]["image"]
    return {
        name: svc
        for name, svc in compose["services"].items()
        if name.startswith("airflow-")
        or svc.get("image") == image
        or any(key.startswith("AIRFLOW__CORE__") for key in environment(svc))
    }


# -- the checks ----------------------------------------------------------------------------------------


def variable_problems(compose: dict[str, Any], example: dict[str, str]) -> list[str]:
    """Every variable is documented in .env.example; no secret has a default in the compose file."""
    problems = []
    for name, op, arg in references(compose):
        if name not in example:
            problems.append(f"${{{name}}} is used in docker-compose.yml but not defined in .env.example")
        if SECRET_NAME.search(name) and op not in (None, ":?", "?"):
            problems.append(
                f"secret ${{{name}}} must have no default (use ${{{name}:?message}}), not {op}{arg}"
            )
    return sorted(set(problems))


def healthcheck_problems(services: dict[str, dict[str, Any]]) -> list[str]:
    """A long-running service has a health check; any other is a one-shot a service waits for, or a tool."""
    waited_for = {
        target
        for svc in services.values()
        for target, dep in _dependencies(svc).items()
        if isinstance(dep, dict) and dep.get("condition") == "service_completed_successfully"
    }
    problems = []
    for name, svc in services.items():
        if svc.get("restart") in LONG_RUNNING:
            if not _has_healthcheck(svc):
                problems.append(f"service {name} runs with restart: {svc['restart']} but has no healthcheck")
        elif name not in waited_for and not svc.get("profiles"):
            problems.append(
                f"service {name} is neither long-running (restart: always, with a healthcheck) nor a "
                "one-shot that another service waits for (service_completed_successfully)"
            )
    return problems


def _dependencies(service: dict[str, Any]) -> dict[str, Any]:
    """A service's ``depends_on`` as a mapping (compose also accepts a list of names, with no condition)."""
    depends_on = service.get("depends_on") or {}
    return dict.fromkeys(depends_on, None) if isinstance(depends_on, list) else depends_on


def _has_healthcheck(service: dict[str, Any]) -> bool:
    check = service.get("healthcheck") or {}
    return bool(check.get("test")) and not check.get("disable")


def depends_on_problems(services: dict[str, dict[str, Any]]) -> list[str]:
    """Every ``depends_on`` names a service with a condition that service can meet."""
    problems = []
    for name, svc in services.items():
        depends_on = svc.get("depends_on") or {}
        if isinstance(depends_on, list):
            problems.append(f"service {name}: depends_on is a list; give each dependency a condition")
            continue
        for target, dep in depends_on.items():
            condition = dep.get("condition") if isinstance(dep, dict) else None
            if target not in services:
                problems.append(f"service {name} depends on {target}, which is not a service")
            elif condition not in CONDITIONS:
                problems.append(f"service {name} depends on {target} without a condition ({condition!r})")
            elif condition == "service_healthy" and not _has_healthcheck(services[target]):
                problems.append(f"service {name} waits for {target} to be healthy; it has no healthcheck")
            elif (
                condition == "service_completed_successfully"
                and services[target].get("restart") in LONG_RUNNING
            ):
                problems.append(f"service {name} waits for {target} to complete; {target} restarts forever")
    return problems


def path_problems(compose: dict[str, Any], root: Path) -> list[str]:
    """Build contexts, Dockerfiles and bind-mounted host paths exist in the repository."""
    problems = []
    for name, svc in compose["services"].items():
        build = svc.get("build")
        if build is not None:
            build = {"context": build} if isinstance(build, str) else build
            context = root / build.get("context", ".")
            dockerfile = context / build.get("dockerfile", "Dockerfile")
            if not context.is_dir():
                problems.append(f"service {name}: build context {build.get('context')} does not exist")
            elif not dockerfile.is_file():
                problems.append(f"service {name}: {dockerfile.relative_to(root)} does not exist")
        for volume in svc.get("volumes") or []:
            if isinstance(volume, dict):
                kind, source = volume.get("type"), volume.get("source", "")
            else:
                source = volume.split(":")[0]
                kind = "bind" if source.startswith((".", "/", "~")) else "volume"
            if kind == "bind" and not (root / source).exists():
                problems.append(
                    f"service {name} bind-mounts {source}, which does not exist in the repository"
                )
            elif kind == "volume" and source not in (compose.get("volumes") or {}):
                problems.append(
                    f"service {name} mounts volume {source}, which is not declared under volumes:"
                )
    return problems


def dockerfile_problems(dockerfile: str, requirements: str, root: Path) -> list[str]:
    """
    ``FROM apache/airflow:<the pinned version>``; the package built into a wheel from its source and
    installed with the pins; every COPY source exists; nothing copied into the plugins folder (the
    package's entry point loads the plugin: a copy there would load it twice); the DAG file compiled to
    bytecode in the image (task processes then load it).
    """
    problems = []
    text = re.sub(r"\\\n\s*", " ", dockerfile)  # continuation lines joined
    pin = re.search(r"^apache-airflow==(\S+)", requirements, re.MULTILINE)
    froms = re.findall(r"^FROM\s+(\S+)", text, re.MULTILINE)
    base = froms[0] if froms else ""
    image, _, tag = base.partition(":")
    if image != "apache/airflow" or pin is None or tag.split("-")[0] != pin.group(1):
        problems.append(
            f"the Dockerfile's first FROM is {base!r}: it must be apache/airflow:<the apache-airflow pin of "
            f"requirements.txt, {pin.group(1) if pin else 'missing'}>"
        )
    if not re.search(r"pip wheel .*--no-deps .*--wheel-dir (\S+) /opt/cdr-webhook/src", text):
        problems.append("the Dockerfile does not build the package's wheel from /opt/cdr-webhook/src")
    if not re.search(r"pip install .*\.whl .*-r \S*requirements\.txt -c \S*constraints\.txt", text):
        problems.append(
            "the Dockerfile does not pip install the wheel -r requirements.txt -c constraints.txt"
        )
    copied = set()
    for line in re.findall(r"^COPY\s+(.+)$", text, re.MULTILINE):
        args = [arg for arg in shlex.split(line) if not arg.startswith("--")]
        if args and args[-1].startswith("/opt/airflow/plugins"):
            problems.append(f"the Dockerfile copies {' '.join(args[:-1])} into the plugins folder")
        for source in args[:-1]:
            copied.add(source.rstrip("/"))
            if not (root / source).exists():
                problems.append(f"the Dockerfile copies {source}, which does not exist in the repository")
    for needed in ("dags", "plugins/cdr_webhook", "pyproject.toml", "README.md"):
        if needed not in copied:
            problems.append(f"the Dockerfile does not copy {needed} into the image")
    if not re.search(r"python -m compileall .*/opt/airflow/dags", text):
        problems.append("the Dockerfile does not compile the DAG file's bytecode (compileall)")
    return problems


def package_source_copies(dockerfile: str) -> list[tuple[str, str]]:
    """The (source, destination) of each COPY into the wheel's build folder, /opt/cdr-webhook/src."""
    text = re.sub(r"\\\n\s*", " ", dockerfile)
    found = []
    for line in re.findall(r"^COPY\s+(.+)$", text, re.MULTILINE):
        args = [arg for arg in shlex.split(line) if not arg.startswith("--")]
        if args[-1].startswith("/opt/cdr-webhook/src/"):
            found.extend((source, args[-1]) for source in args[:-1])
    return found


def airflow_problems(compose: dict[str, Any]) -> list[str]:
    """Every component exists, runs the shared image and agrees on secrets, URLs and executor."""
    services = compose["services"]
    common = compose["x-airflow-common"]
    airflow = airflow_services(compose)
    problems = [f"service {name} is missing" for name in AIRFLOW_COMMANDS if name not in airflow]
    problems += [
        f"service {name} runs {command(airflow[name])!r}, not {want!r}"
        for name, want in AIRFLOW_COMMANDS.items()
        if name in airflow and command(airflow[name]) != want
    ]
    if "airflow-init" not in airflow:
        problems.append("service airflow-init (database migration, admin user) is missing")
    common_env = environment(common)
    for name, svc in airflow.items():
        if svc.get("build") != common["build"] or svc.get("image") != common["image"]:
            problems.append(f"service {name} does not build the shared image ({svc.get('build')})")
        env = environment(svc)
        for key in SHARED_ENV:
            if not common_env.get(key):
                problems.append(f"x-airflow-common does not set {key}")
            elif env.get(key) != common_env[key]:
                problems.append(f"service {name}: its {key} is not x-airflow-common's")
    if common_env.get("AIRFLOW__CORE__EXECUTOR") != "CeleryExecutor":
        problems.append("the executor is not CeleryExecutor")
    api = urllib.parse.urlsplit(common_env.get("AIRFLOW__CORE__EXECUTION_API_SERVER_URL", ""))
    if command(services.get(api.hostname or "", {})) != "api-server" or api.path.rstrip("/") != "/execution":
        problems.append(f"the execution API URL {api.geturl()!r} is not the api-server service's /execution/")
    for key in ("AIRFLOW__CELERY__BROKER_URL", "AIRFLOW__CELERY__RESULT_BACKEND"):
        host = urllib.parse.urlsplit(common_env.get(key, "")).hostname
        if host not in services:
            problems.append(f"{key} points at {host!r}, which is not a service")
    return problems


def setting_problems(compose: dict[str, Any]) -> list[str]:
    """Every ``AIRFLOW__CDR_WEBHOOK__*`` is a setting the DAG reads, parses, and is the same everywhere."""
    problems = []
    seen: dict[str, dict[str, str]] = {}
    for name, svc in compose["services"].items():
        raw = {}
        for key, value in environment(svc).items():
            if key.startswith(SETTING_PREFIX):
                setting = key.removeprefix(SETTING_PREFIX).lower()
                if setting not in PARSERS:
                    problems.append(f"service {name} sets {key}, which is not a [cdr_webhook] setting")
                else:
                    raw[setting] = value
        try:
            parse_settings(raw)
        except SettingsError as err:
            problems.append(f"service {name}: {err}")
        seen[name] = raw
    for name in airflow_services(compose):
        if seen[name] != seen.get("airflow-scheduler"):
            problems.append(f"service {name} has other [cdr_webhook] settings than airflow-scheduler")
    return problems


def _conn_fields(conn_id: str, value: str) -> dict[str, Any]:
    """An ``AIRFLOW_CONN_*`` value's fields, from its JSON form or its URI form."""
    if value.lstrip().startswith("{"):
        fields = json.loads(value)
        if not isinstance(fields, dict):
            raise ValueError("the JSON form must be an object")
        extra = fields.get("extra")
        if isinstance(extra, str):
            fields["extra"] = json.loads(extra) if extra else {}
        return fields
    uri = urllib.parse.urlsplit(value)
    if not uri.scheme or not uri.hostname:
        raise ValueError("neither a JSON object nor a connection URI")
    query = dict(urllib.parse.parse_qsl(uri.query))
    extra = json.loads(query.pop("__extra__")) if "__extra__" in query else query
    return {
        "conn_type": uri.scheme.replace("-", "_"),
        "host": urllib.parse.unquote(uri.hostname),
        "port": uri.port,
        "login": urllib.parse.unquote(uri.username or "") or None,
        "password": urllib.parse.unquote(uri.password or "") or None,
        "schema": uri.path.lstrip("/") or None,
        "extra": extra,
    }


def _allowed_networks(env: dict[str, str]) -> tuple[Any, ...]:
    try:
        return parse_networks(env.get(SETTING_PREFIX + "ALLOWED_NETWORKS", ""))
    except ValueError:
        return ()  # setting_problems reports it


def _subnets(compose: dict[str, Any], service: dict[str, Any]) -> list[Any]:
    networks = service.get("networks") or ["default"]
    subnets = []
    for network in networks:
        ipam = ((compose.get("networks") or {}).get(network) or {}).get("ipam") or {}
        subnets += [ipaddress.ip_network(c["subnet"]) for c in ipam.get("config") or [] if "subnet" in c]
    return subnets


def connection_problems(compose: dict[str, Any]) -> list[str]:
    """Every ``AIRFLOW_CONN_*`` is one the DAG reads, of its type, valid, and reachable as configured."""
    services = compose["services"]
    problems = []
    for name, svc in compose["services"].items():
        env = environment(svc)
        for key, value in env.items():
            if not key.startswith(CONN_PREFIX):
                continue
            conn_id = key.removeprefix(CONN_PREFIX).lower()
            client = conn_id.removeprefix(CLIENT_CONN_PREFIX)
            if conn_id == CDR_DB_CONN_ID:
                want = ("postgres", "postgresql")
            elif conn_id == DEFAULT_ENDPOINT_CONN_ID or (
                conn_id.startswith(CLIENT_CONN_PREFIX) and client.isdigit()
            ):
                want = ("http",)
            else:
                problems.append(f"service {name} sets {key}: the DAG reads no connection {conn_id!r}")
                continue
            try:
                fields = _conn_fields(conn_id, value)
            except ValueError as err:
                problems.append(f"service {name} {key}: {err}")
                continue
            if fields.get("conn_type") not in want:
                problems.append(f"service {name} {key}: conn_type {fields.get('conn_type')!r}, not {want[0]}")
            elif want == ("http",):
                problems += [
                    f"service {name} {key}: {p}" for p in _endpoint_problems(compose, env, conn_id, fields)
                ]
            elif fields.get("host") in services:
                db = environment(services[fields["host"]])
                for field, var in (
                    ("login", "POSTGRES_USER"),
                    ("password", "POSTGRES_PASSWORD"),
                    ("schema", "POSTGRES_DB"),
                ):
                    if db.get(var) is not None and fields.get(field) != db[var]:
                        problems.append(
                            f"service {name} {key}: its {field} is not service {fields['host']}'s {var}"
                        )
    return problems


def _endpoint_problems(
    compose: dict[str, Any], env: dict[str, str], conn_id: str, fields: dict[str, Any]
) -> list[str]:
    try:
        endpoint = parse_endpoint(
            conn_id,
            host=fields.get("host"),
            schema=fields.get("schema"),
            port=fields.get("port"),
            password=fields.get("password"),
            extra=fields.get("extra"),
        )
    except EndpointConfigError as err:
        return [str(err)]
    url = urllib.parse.urlsplit(endpoint.url)
    target = compose["services"].get(url.hostname or "")
    if target is None:
        return []  # an outside endpoint: the egress guard checks it when it resolves
    problems = []
    subnets = _subnets(compose, target)
    allowed = _allowed_networks(env)
    if not subnets or not all(
        any(s.subnet_of(a) for a in allowed if a.version == s.version) for s in subnets
    ):
        where = ", ".join(map(str, subnets)) or "no fixed subnet"
        problems.append(
            f"{url.hostname} is a compose service, on a private network ({where}) that "
            f"{SETTING_PREFIX}ALLOWED_NETWORKS does not allow, so the egress guard refuses it"
        )
    receiver = environment(target)
    if "RECEIVER_API_KEY" in receiver and endpoint.api_key != receiver["RECEIVER_API_KEY"]:
        problems.append(f"its password is not service {url.hostname}'s RECEIVER_API_KEY")
    if (
        "RECEIVER_SIGNING_SECRET" in receiver
        and receiver["RECEIVER_SIGNING_SECRET"] not in endpoint.signing_secrets
    ):
        problems.append(f"its extra signing_secret is not service {url.hostname}'s RECEIVER_SIGNING_SECRET")
    return problems


def gitignore_problems(gitignore: str) -> list[str]:
    lines = {line.strip() for line in gitignore.splitlines()}
    return [] if lines & {".env", "/.env"} else [".env is not in .gitignore: a real .env could be committed"]
