"""The package's provider info: what Airflow learns of it from the ``apache_airflow_provider`` entry point.

Airflow reads it in every process that discovers providers: the ``[cdr_webhook]`` configuration
section (each option's default, type and description, from :mod:`cdr_webhook.settings`), the commit
watcher's trigger, and the ``airflow cdr-webhook`` command. The page is the ``airflow.plugins`` entry
point's: the provider info's ``plugins`` key is read only with ``lazy_discover_providers`` off.
"""

from __future__ import annotations

from typing import Any

#: The distribution's name, normalised as Airflow compares it (it refuses a provider whose info differs).
PACKAGE_NAME = "airflow-provider-cdr-webhook"
INTEGRATION = "CDR webhook"


def get_provider_info() -> dict[str, Any]:
    from cdr_webhook import __version__
    from cdr_webhook.setting_docs import config_options
    from cdr_webhook.settings import SECTION

    return {
        "package-name": PACKAGE_NAME,
        "name": "CDR webhook",
        "description": "Every new call detail record POSTed to its customer's webhook endpoint.",
        "versions": [__version__],
        "integrations": [{"integration-name": INTEGRATION, "tags": ["service"]}],
        "triggers": [{"integration-name": INTEGRATION, "python-modules": ["cdr_webhook.watch.trigger"]}],
        "cli": ["cdr_webhook.airflow_cli.get_cli_commands"],
        "config": {
            SECTION: {
                "description": "CDR webhook delivery (docs/settings.md of the project says more of each).",
                "options": config_options(),
            }
        },
    }
