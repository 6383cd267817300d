"""
CPython's cyclic garbage collector, tuned for a process that holds many
long-lived objects (a node: several per connection) and makes few cycles.

With CPython's defaults (a young-generation collection every 700 net
allocations, and an oldest-generation one whenever the heap grew by a
quarter), a node taking 5,000 connections spent about a fifth of its CPU
in the collector, mostly walking connections that were alive anyway
(bench/README.md, connect-rate). So: young collections every
L{YOUNG} allocations, and what the process built while starting (modules,
the node itself) is frozen out of every later collection (C{gc.freeze}).
Cycles are still collected; only less often, which holds back at most a
few MB of garbage.
"""

from __future__ import annotations

import gc
from typing import Any

__all__ = ["YOUNG", "tune"]

#: Net allocations between young-generation collections (CPython's default: 700).
YOUNG = 10_000


def tune(reactor: Any) -> None:
    """Set the thresholds now; once the reactor runs, collect once and freeze what is left."""
    gc.set_threshold(YOUNG, 10, 10)
    reactor.callWhenRunning(_freeze)


def _freeze() -> None:
    gc.collect()
    gc.freeze()
