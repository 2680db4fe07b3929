"""CDR webhook delivery on Apache Airflow: the package the ``cdr_webhook`` DAG imports."""

from __future__ import annotations

__version__ = "0.1.0"
