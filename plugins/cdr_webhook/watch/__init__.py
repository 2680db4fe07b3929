"""Event-driven pick-up: a watcher in Airflow's triggerer starts a run as soon as new CDRs are committed.

:mod:`.firing` (pure) decides when to fire, :mod:`.state` holds its SQL, :mod:`.trigger` is the
``BaseEventTrigger``, :mod:`.health` its heartbeat and what it means for an operator, :mod:`.schedule`
builds the DAG's schedule (the timetable or the asset), and :mod:`.notify` installs the optional
NOTIFY trigger on the dialer's table.
"""
