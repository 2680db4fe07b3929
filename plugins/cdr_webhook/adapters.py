"""What the package reads from Airflow, and what it hands to it: the one module of the core's Airflow calls.

The core (:mod:`cdr_webhook.settings`, :mod:`cdr_webhook.endpoint_config`) parses strings and
connection fields and imports no Airflow; here its inputs are read from Airflow's configuration and
connections, and an endpoint's pause or resume reaches the ``failure_notifier``. Airflow is imported
inside each function: the CLI imports this module, and importing ``airflow.sdk`` would set Airflow's
logging on its output.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from typing import TYPE_CHECKING, Any

from cdr_webhook import endpoint_config, owners, setting_values, settings

if TYPE_CHECKING:
    from collections.abc import Callable

    from cdr_webhook.ledger.endpoints import EndpointEvent

log = logging.getLogger(__name__)


@functools.cache
def load_settings() -> settings.Settings:
    """Read ``[cdr_webhook]`` from Airflow's configuration (file or environment), once per process."""
    from airflow.sdk import conf

    raw = {}
    for name in setting_values.OPTION_NAMES:
        value = conf.get(settings.SECTION, name, fallback=None)
        if value is not None:
            raw[name] = value
    return setting_values.parse_settings(
        raw, max_map_length=conf.getint("core", "max_map_length", fallback=1024)
    )


def load_endpoint(
    conn_id: str, get_connection: Callable[[str], Any] | None = None
) -> endpoint_config.EndpointConfig:
    """
    Look the Airflow connection up and parse it; a missing one is an
    :class:`~cdr_webhook.endpoint_config.EndpointConfigError`.

    ``get_connection`` defaults to Airflow's ``BaseHook.get_connection``.
    """
    connection = _airflow_connection(conn_id, get_connection)
    if connection is None:
        raise endpoint_config.EndpointConfigError.missing(conn_id)
    return endpoint_config.from_connection(connection)


def endpoint_configs() -> Callable[[str], endpoint_config.EndpointConfig | None]:
    """
    A run's lookup of endpoint configurations, each connection read once: None for a connection that
    does not exist, :class:`~cdr_webhook.endpoint_config.EndpointConfigError` (raised again on each call) for
    one that cannot be used.
    """
    cache: dict[str, endpoint_config.EndpointConfig | endpoint_config.EndpointConfigError | None] = {}

    def config_of(conn_id: str) -> endpoint_config.EndpointConfig | None:
        if conn_id not in cache:
            connection = _airflow_connection(conn_id)
            try:
                cache[conn_id] = None if connection is None else endpoint_config.from_connection(connection)
            except endpoint_config.EndpointConfigError as err:
                cache[conn_id] = err
        found = cache[conn_id]
        if isinstance(found, endpoint_config.EndpointConfigError):
            raise found
        return found

    return config_of


def _airflow_connection(conn_id: str, get_connection: Callable[[str], Any] | None = None) -> Any:
    """The Airflow connection (``BaseHook.get_connection`` unless given), None when it does not exist."""
    from airflow.sdk import BaseHook
    from airflow.sdk.exceptions import AirflowNotFoundException

    try:
        return (get_connection or BaseHook.get_connection)(conn_id)
    except AirflowNotFoundException:
        return None


def load_owner(conn_id: str) -> owners.OwnerContact | None:
    """
    The owner contact of an endpoint's connection (None: it names none); a missing connection or a
    malformed owner extra is an :class:`~cdr_webhook.endpoint_config.EndpointConfigError`.
    """
    import json

    from airflow.sdk import BaseHook
    from airflow.sdk.exceptions import AirflowNotFoundException

    try:
        connection = BaseHook.get_connection(conn_id)
    except AirflowNotFoundException:
        raise endpoint_config.EndpointConfigError.missing(conn_id) from None
    try:
        extra = json.loads(connection.extra) if connection.extra else {}
    except ValueError:
        raise endpoint_config.EndpointConfigError(conn_id, "extra", "is not valid JSON") from None
    if not isinstance(extra, dict):
        raise endpoint_config.EndpointConfigError(conn_id, "extra", "must be a JSON object")
    return owners.parse_owner(conn_id, extra)


def page_base_url() -> str:
    """Airflow's ``[api] base_url`` (the owners' alerts link to the endpoint's page there); '' if unset."""
    from airflow.sdk import conf

    return (conf.get("api", "base_url", fallback="") or "").strip()


def notify_endpoint_event(event: EndpointEvent) -> None:
    """Log the event and hand it to the ``failure_notifier``, if set; a notifier's error is only logged."""
    level = logging.WARNING if event.action == "paused" else logging.INFO
    log.log(
        level,
        "Endpoint %s %s by %s at %s: %s",
        event.endpoint,
        event.action,
        event.actor,
        event.at,
        event.reason or "no reason given",
    )
    try:
        path = load_settings().failure_notifier
        if not path:
            return
        notifier = setting_values.resolve_import_path("failure_notifier", path)
        context: dict[str, Any] = {}
        try:
            from airflow.sdk import get_current_context

            context.update(get_current_context())
        except RuntimeError:
            pass  # not inside a task (the CLI): the event alone is the context
        context["cdr_webhook_event"] = dataclasses.asdict(event)
        # A BaseNotifier's __call__ would render its templates against a task context we may lack.
        if hasattr(notifier, "notify"):
            notifier.notify(context)
        else:
            notifier(context)
    except Exception:
        log.exception(
            "The failure notifier could not be told that endpoint %s was %s", event.endpoint, event.action
        )
