"""Counting the aten ops a training step dispatches (forward, backward, optimizer and controller alike), shared by
bench/train_step.py and tests/test_op_counts.py. On a device bound by kernel launches, a step's time follows this
count (docs/performance.md)."""
from __future__ import annotations

from collections import Counter
from typing import Callable

from torch.utils._python_dispatch import TorchDispatchMode


class OpCounter(TorchDispatchMode):
    """Counts the aten ops dispatched while active, in all (`count`) and by overload name (`names`, e.g.
    "aten.mm.default"). An op counts once however its kernel works inside (a _foreach op is one op)."""

    def __init__(self):
        super().__init__()
        self.names: Counter[str] = Counter()

    @property
    def count(self) -> int:
        return sum(self.names.values())

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names[str(func)] += 1
        return func(*args, **(kwargs or {}))


def count_ops(step: Callable[[], object]) -> OpCounter:
    """The ops that one call of `step` dispatches."""
    with OpCounter() as ops:
        step()
    return ops
