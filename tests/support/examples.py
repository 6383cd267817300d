"""Hypothesis examples drawn up front, for tests that push them through a node in batches."""

from __future__ import annotations

from typing import Any

from hypothesis import HealthCheck, Phase, given, settings

__all__ = ["examples"]


def examples(strategy: Any, count: int) -> list[Any]:
    """
    C{count} examples of C{strategy}, drawn by Hypothesis (derandomized, so
    every run pushes the same). The examples are then pushed through a node
    in batches: a node per example would be too slow, and pytest-twisted runs
    tests in the reactor's greenlet, so a @given test cannot wait on one.
    """
    drawn: list[Any] = []

    @settings(
        derandomize=True,
        max_examples=count,
        deadline=None,
        database=None,
        phases=[Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    @given(strategy)
    def draw(example: Any) -> None:
        drawn.append(example)

    draw()
    return drawn
