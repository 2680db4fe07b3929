"""The Deliveries page: a FastAPI app that Airflow's api-server mounts at ``/cdr-webhook`` (see
``plugins/cdr_webhook_plugin.py``). Server-rendered HTML; every route checks the Airflow user."""
