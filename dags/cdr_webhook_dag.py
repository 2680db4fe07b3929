"""The cdr_webhook Airflow DAG: its code ships in the cdr_webhook package (``cdr_webhook.dag``).

This file is all a deployment's dags folder needs (docs/install.md). Airflow's DAG-file safe mode
parses only files that mention both "airflow" and "dag", as this docstring does.
"""

from cdr_webhook.dag import cdr_webhook_dag, owner_alerts_dag

cdr_webhook_dag()
owner_alerts_dag()
