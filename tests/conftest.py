"""Test order for two workers.

`make test` hands whole files to two workers (``--dist loadfile``), in the order the tests
are collected (``--no-loadscope-reorder``).  The files marked ``heavy(minutes)`` -- each
grades a whole class or builds the book -- are collected first, longest first, so that both
workers start on one and the many short files fill in around them; otherwise a long file
handed out last would run alone at the end.  The minutes are rough, measured on two busy
cores; only their order matters.
"""

import pytest


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    def minutes(item: pytest.Item) -> float:
        heavy = item.get_closest_marker("heavy")
        return heavy.args[0] if heavy else 0.0

    items.sort(key=minutes, reverse=True)  # stable: the rest keep their order
