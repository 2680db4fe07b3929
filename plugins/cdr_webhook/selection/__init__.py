"""Selecting: a run's ``select_cdrs`` step scans the source relation, queues new CDRs in the ledger,
claims its fair share of the queue and returns what ``post_cdr`` is mapped over (ids only).
"""
