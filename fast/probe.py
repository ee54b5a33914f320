"""What the fast test step (fast/fisher.py) reads from a training step's own forward and backward, compiled or not:
each tested layer's input x and the gradient g = dL/dy of its output, which the literal test step (selora.py) reads
with hooks (FastSeLoRA.capture puts the probes; its `_fisher_sums` turns them into the Fisher sums after backward).

A `Probe` on a layer keeps x and adds a zero P to the layer's output y: y + P is y, and backward hands P's gradient,
which is g, to the probe (`Zero`). This is plain autograd, so TorchDynamo compiles it into the model's graph with no
break: x becomes one more output of the graph, P one more input, and P's gradient one more output of the compiled
backward. (A tensor hook registered on y in the forward would break the compiled graph at every tested layer.)

P must be made before a compiled forward, in y's shape: a zero made inside the graph would be one of its
intermediates, whose gradient stays inside the compiled backward. A probe is given zeros in the shapes an earlier
forward showed; without them it makes each from y, which only an uncompiled forward can use: the first test step
of a run (fast.fisher.FastSeLoRA.needs_uncompiled).
"""
from __future__ import annotations

import torch


class Probe:
    """One tested layer's x and g in one forward and backward (module docstring); `tap` is called by the layer's
    forward, `seen` after backward. `shapes`: (shape, dtype) of a zero for each call, made before the forward."""

    def __init__(self, name: str, batch_size: int, base_zero: torch.Tensor, shapes: list[tuple]):
        self.name, self.batch_size, self.base_zero = name, batch_size, base_zero
        self.inputs: list[torch.Tensor] = []
        self.grads: list[list[torch.Tensor]] = []  # per call: [g], once backward has reached that call's output
        self.zeros = [self.zero(shape, dtype) for shape, dtype in shapes]

    def zero(self, shape: torch.Size, dtype: torch.dtype) -> torch.Tensor:
        """A zero P of `shape` for the next call, whose gradient backward hands to this probe (`Zero`)."""
        self.grads.append([])
        return Zero.apply(self.base_zero, shape, dtype, self.grads[-1])

    def tap(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """y + P, keeping x: the layer's output, unchanged."""
        if x.shape[0] != self.batch_size:
            raise ValueError(f"layer '{self.name}': input of shape {tuple(x.shape)} does not have the batch size "
                             f"{self.batch_size} first; the per-sample Fisher needs samples along dimension 0")
        call = len(self.inputs)
        self.inputs.append(x)
        if call == len(self.zeros):  # none made before the forward: only an uncompiled forward gets here
            self.zeros.append(self.zero(y.shape, y.dtype))
        return y + self.zeros[call]

    def seen(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(x, g) of each call whose output backward reached. Under gradient checkpointing backward calls the layer
        again, to recompute it: a call whose output backward never reaches, so each call counts once."""
        return [(x, g[0]) for x, g in zip(self.inputs, self.grads) if g]


class Zero(torch.autograd.Function):
    """A zero of `shape` that needs grad because `base_zero`, a zero that needs grad, does: a view of the base_zero (no
    memory). Backward appends its gradient to `kept` and goes no further (no gradient for the base_zero: no op)."""

    @staticmethod
    def forward(ctx, base_zero: torch.Tensor, shape: torch.Size, dtype: torch.dtype,
                kept: list[torch.Tensor]) -> torch.Tensor:
        ctx.kept = kept
        return base_zero.to(dtype).expand(shape)

    @staticmethod
    def backward(ctx, g: torch.Tensor) -> tuple[None, None, None, None]:
        ctx.kept.append(g)
        return None, None, None, None
