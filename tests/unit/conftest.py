"""Hypothesis for the property tests: no example database in the work tree, no per-example deadline
(a shared CI machine is slow at times), and in CI the same examples on every run (a failure there
reproduces; a developer's runs keep drawing new ones)."""

from __future__ import annotations

import os

from hypothesis import settings

settings.register_profile(
    "cdr_webhook", database=None, deadline=None, derandomize=os.environ.get("CI") == "true", print_blob=True
)
settings.load_profile("cdr_webhook")
