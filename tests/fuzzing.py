"""Hypothesis settings shared by the fuzz tests (issue 26): bounded in examples and time, reproducible.

`derandomize=True` draws the same examples on every run (the seed comes from the test's name), so a failure found
in CI fails again on a laptop; Hypothesis prints the falsifying example and a `@reproduce_failure` blob to replay
it. No example database: nothing is written to the work tree. The deadline is per example and generous, since
the 2 cores are shared: it catches a hang or an unbounded allocation, not a slow machine.
"""

from __future__ import annotations

from datetime import timedelta

from hypothesis import HealthCheck, settings


def fuzz_settings(max_examples: int) -> settings:
    return settings(
        max_examples=max_examples,
        deadline=timedelta(seconds=20),
        derandomize=True,
        database=None,
        print_blob=True,
        suppress_health_check=[
            HealthCheck.too_slow,
            HealthCheck.data_too_large,
            HealthCheck.filter_too_much,
            HealthCheck.function_scoped_fixture,  # tmp paths and monkeypatch: each example cleans up its own
        ],
    )
