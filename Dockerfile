# The image of every Airflow service in docker-compose.yml: Airflow with the project's pins, the
# cdr_webhook package installed from its wheel, and the DAG file. Its Python is the one constraints.txt
# was frozen with (3.11).
FROM apache/airflow:3.3.2-python3.11 AS airflow

USER airflow
COPY --chown=airflow:0 requirements.txt constraints.txt /opt/cdr-webhook/
# The package's source, as the wheel's build needs it (pyproject.toml, its README, plugins/cdr_webhook).
COPY --chown=airflow:0 pyproject.toml README.md /opt/cdr-webhook/src/
COPY --chown=airflow:0 plugins/cdr_webhook/ /opt/cdr-webhook/src/plugins/cdr_webhook/
# The wheel, built as a user builds it, installed as the airflow user (the image sets PIP_USER) within
# the project's tested pins; the requirements pin apache-airflow itself, so pip cannot move Airflow away
# from the image's version. pip compiles the package's bytecode as it installs it. Airflow finds the
# plugin and the provider (settings, trigger, `airflow cdr-webhook`) through the package's entry
# points: the plugins folder stays empty (a copy there would load the plugin twice).
RUN pip wheel --no-cache-dir --no-deps --wheel-dir /tmp/cdr-webhook-dist /opt/cdr-webhook/src \
    && pip install --no-cache-dir /tmp/cdr-webhook-dist/*.whl \
        -r /opt/cdr-webhook/requirements.txt -c /opt/cdr-webhook/constraints.txt \
    && rm -rf /tmp/cdr-webhook-dist
COPY --chown=airflow:0 dags/ /opt/airflow/dags/
# Bytecode compiled once, here: every task process imports the DAG file and the package, and one
# that cannot write __pycache__ (PYTHONDONTWRITEBYTECODE, another runtime user) would compile them
# again each time (about 40 ms of CPU per task try measured, of a try's ~150).
RUN python -m compileall -q /opt/airflow/dags

# The demo's services (cdr-seed, receiver): the same image plus demo/, sql/ and the receiver's
# signature library. Airflow's services never run this stage.
FROM airflow AS demo

RUN pip install --no-cache-dir standardwebhooks -c /opt/cdr-webhook/constraints.txt
COPY --chown=airflow:0 demo/ /opt/cdr-webhook/demo/
COPY --chown=airflow:0 sql/ /opt/cdr-webhook/sql/
WORKDIR /opt/cdr-webhook
