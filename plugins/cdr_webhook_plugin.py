"""The Deliveries page's Airflow plugin, for a source checkout whose plugins folder is this folder.

Installed from the package, Airflow finds the plugin through its ``airflow.plugins`` entry point
instead: a deployment that installs the package keeps neither this file nor ``cdr_webhook/`` in its
plugins folder, or the plugin is loaded twice (docs/install.md).
"""

from cdr_webhook.plugin import CdrWebhookPlugin

__all__ = ["CdrWebhookPlugin"]
