# The image of every Airflow service in docker-compose.yml: Airflow with the project's pins, the
# cdr_webhook DAG and its package. Its Python is the one constraints.txt was frozen with (3.11).
FROM apache/airflow:3.3.2-python3.11 AS airflow

USER airflow
COPY --chown=airflow:0 requirements.txt constraints.txt /opt/cdr-webhook/
# Installed as the airflow user (the image sets PIP_USER), within the project's tested pins; the
# requirements pin apache-airflow itself, so pip cannot move Airflow away from the image's version.
RUN pip install --no-cache-dir -r /opt/cdr-webhook/requirements.txt -c /opt/cdr-webhook/constraints.txt
COPY --chown=airflow:0 dags/ /opt/airflow/dags/
# plugins/.airflowignore comes along: it keeps the plugin loader out of the cdr_webhook package.
COPY --chown=airflow:0 plugins/ /opt/airflow/plugins/
# Bytecode compiled once, here: every task process imports the DAG file and the package, and one
# that cannot write __pycache__ (PYTHONDONTWRITEBYTECODE, another runtime user) would compile them
# again each time (about 40 ms of CPU per task try measured, of a try's ~150).
RUN python -m compileall -q /opt/airflow/dags /opt/airflow/plugins

# The demo's services (cdr-seed, receiver): the same image plus demo/, sql/ and the receiver's
# signature library. Airflow's services never run this stage.
FROM airflow AS demo

RUN pip install --no-cache-dir standardwebhooks -c /opt/cdr-webhook/constraints.txt
COPY --chown=airflow:0 demo/ /opt/cdr-webhook/demo/
COPY --chown=airflow:0 sql/ /opt/cdr-webhook/sql/
WORKDIR /opt/cdr-webhook
