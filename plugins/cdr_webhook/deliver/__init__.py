"""Delivering: the mapped ``post_cdr`` task sends its CDRs (one, or a chunk) and records each attempt.

The operator adapts Airflow's context to the delivery steps; the hook owns every byte of a POST,
behind the egress guard and one wall-clock deadline per request; slots cap an endpoint's requests
in flight across tasks.
"""
