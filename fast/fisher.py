"""SeLoRA's test step, fast: the FI-scores of `selora.SeLoRA.after_backward`, computed where the literal test step
would be slow or could not run. train.py takes it for --compile, under torchrun and with --fast-test-step; tests
prove it equal to the literal one (tests/test_fast_path.py: the same decisions, FI-ratios within 1e-9 in float64).

What it changes, and why:
- compiled: a forward hook breaks a compiled graph at every tested layer, so each layer's forward hands its x and y
  to a probe (fast/probe.py), whose zero added to y gets g from backward as plain autograd;
- batched: the per-sample gradients of all tested layers of equal shapes come from one call of
  `selora.per_sample_grads` on their stacked inputs and factors, a few batched products per group of layers instead
  of a few per layer;
- data-parallel: each process sums eq. 3's squares over its own samples (`fisher_sums`); the sums of all layers
  are added over the processes with one all-reduce (fast/distributed.py) before the scores are formed
  (`scores_from_sums`), in one transfer to Python numbers for all layers.

`FastSeLoRA` is `SeLoRA` with this test step; `FastScriptSeLoRA` the script rule's.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch

from fast import distributed
from fast.probe import Probe
from methods.adapters import draw_candidate
from methods.selora_script import ScriptSeLoRA
from selora import FISHER_MODES, SeLoRA, per_sample_grads


def fisher_sums(per_sample: list[torch.Tensor], fisher: str = "sample") -> list[torch.Tensor]:
    """The sums over this process's samples, in float64, that `selora.fisher_score` divides (eq. 3-4), of L layers'
    stacked per-sample gradients ([L, b, ...] per parameter). Sums over disjoint sets of samples add up, so the
    processes' sums added are the whole batch's.

    fisher="sample": the squared gradients summed over samples and entries, [L];
    fisher="batch": the gradients summed over samples, [L, ...] (squared once they are added: `scores_from_sums`).
    """
    if fisher == "sample":
        return [p.double().square().flatten(1).sum(1) for p in per_sample]
    if fisher == "batch":
        return [p.double().sum(1) for p in per_sample]
    raise ValueError(f"fisher must be one of {FISHER_MODES}, got {fisher!r}")


def scores_from_sums(sums: dict[str, list[torch.Tensor]], fisher: str = "sample") -> dict[str, tuple[float, float]]:
    """Each layer's FI-scores (eq. 4), original and expanded, from its sample count n and `fisher_sums` of A, B and
    the new row of B over the whole batch, in one transfer for all layers: the sums of squares / n (eq. 3's mean),
    or for fisher="batch" the squares of the summed gradients / n^2 (the square of their mean). A layer that no
    sample reached (n = 0) is left out."""
    numbers = [t if fisher == "sample" or i == 0 else t.square().sum()
               for parts in sums.values() for i, t in enumerate(parts)]
    flat = torch.stack(numbers).tolist() if numbers else []
    scores = {}
    for i, name in enumerate(sums):
        n, sum_A, sum_B, sum_new = flat[4 * i:4 * i + 4]
        if n > 0:
            divisor = n if fisher == "sample" else n * n
            original = (sum_A + sum_B) / divisor
            scores[name] = (original, original + sum_new / divisor)
    return scores


class FastSeLoRA(SeLoRA):
    """`SeLoRA` with the fast test step (module docstring): its `capture` puts probes where the literal one puts
    hooks, and its `after_backward` forms the same FI-scores from batched, all-reduced sums."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._probes: dict[str, Probe] = {}
        self._shapes: dict[str, list[tuple]] | None = None  # each tested layer's outputs' shapes, per sample

    def needs_uncompiled(self, step: int) -> bool:
        """The run's first test step: its probes make their zeros in the forward (fast.probe.Probe)."""
        return self.is_test_step(step) and self._shapes is None

    @contextmanager
    def capture(self, step: int, batch_size: int) -> Iterator[None]:
        """`SeLoRA.capture` with a `Probe` on each tested layer instead of a hook, given zeros in the shapes that the
        run's first test step showed (a compiled forward cannot make them)."""
        self.last_step = step
        if self.is_test_step(step) and step != self._tested_step:  # K, as SeLoRA.capture draws it
            self._tested_step = step
            self._candidates = {name: draw_candidate(a.base.in_features, self.seed, step, name)
                                for name, a in self.adapters.items() if a.rank < self.rank_cap[name]}
        if step != self._tested_step:
            yield
            return
        base_zero = next(iter(self.adapters.values())).A.new_zeros((), requires_grad=True)  # the probes' zeros: views
        shapes = self._shapes or {}
        self._probes = {name: Probe(name, batch_size, base_zero, [((batch_size, *shape), dtype)
                                                                  for shape, dtype in shapes.get(name, [])])
                        for name in self._candidates}
        for name, probe in self._probes.items():
            self.adapters[name].probe = probe
        try:
            yield
        finally:
            for name in self._probes:
                self.adapters[name].probe = None

    @torch.no_grad()
    def after_backward(self) -> None:
        """`SeLoRA.after_backward`'s FI-scores: this process's Fisher sums of every tested layer (`_fisher_sums`),
        added over the processes (one all-reduce; the identity in one process), then the scores."""
        probes, self._probes, self._scores = self._probes, {}, {}
        if not probes:
            return
        self._shapes = {name: [(P.shape[1:], P.dtype) for P in probe.zeros] for name, probe in probes.items()}
        sums = self._fisher_sums({name: probe.seen() for name, probe in probes.items()},
                                 next(iter(probes.values())).batch_size)
        self._scores = scores_from_sums(distributed.sum_over_processes(sums, self.reduce), self.fisher)

    def _fisher_sums(self, seen: dict[str, list[tuple[torch.Tensor, torch.Tensor]]],
                     batch_size: int) -> dict[str, list[torch.Tensor]]:
        """[number of samples, fisher_sums of A, B and of the new row of B] of this process's batch for every tested
        layer, from the inputs x and output gradients g its probe saw (a layer called twice: both calls' tokens), in
        the order of `_candidates`, the same in every process. The per-sample gradients of the layers of equal
        shapes come from one call of `selora.per_sample_grads` on the stack, with b (each sample's own gradient)
        folded into the scale. A layer that received no gradient gets zero samples and zero sums."""
        groups: dict[tuple, list[tuple[str, torch.Tensor, torch.Tensor]]] = {}
        for name, calls in seen.items():
            if not calls:
                continue
            x, g = (parts[0] if len(parts) == 1
                    else torch.cat([t.reshape(batch_size, -1, t.shape[-1]) for t in parts], 1) for parts in zip(*calls))
            key = (x.shape, g.shape, x.dtype, g.dtype, x.device, self.adapters[name].rank)
            groups.setdefault(key, []).append((name, x, g))
        sums = {}
        for group in groups.values():
            names, x, g = zip(*group)
            layers = [self.adapters[name] for name in names]
            A, B = (torch.stack(f) for f in zip(*(layer.factors()[:2] for layer in layers)))  # [L, d_in, r], [L, r, d_out]
            s = (torch.stack([layer.scale for layer in layers]) * batch_size).to(A.dtype)  # b: each sample's own
            K = torch.stack([self._candidates[name] for name in names]).to(A)  # [L, d_in, 1]
            x, g = (torch.stack(t).reshape(len(names), batch_size, -1, t[0].shape[-1]).to(A.dtype) for t in (x, g))
            grads = per_sample_grads(x, g, A[:, None], B[:, None], K[:, None], s[:, None, None, None])
            count = A.new_full((len(names),), float(batch_size), dtype=torch.float64)
            for name, *parts in zip(names, *(t.unbind(0) for t in [count, *fisher_sums(grads, self.fisher)])):
                sums[name] = parts
        return {name: sums.get(name) or self._zero_sums(name) for name in self._candidates}

    def _zero_sums(self, name: str) -> list[torch.Tensor]:
        """`_fisher_sums` of a layer that no sample reached: zero samples, zero sums."""
        A, B, _ = self.adapters[name].factors()
        shapes = [A.shape, B.shape, (1, B.shape[1])] if self.fisher == "batch" else [(), (), ()]
        return [A.new_zeros((), dtype=torch.float64)] + [A.new_zeros(shape, dtype=torch.float64) for shape in shapes]


class FastScriptSeLoRA(ScriptSeLoRA, FastSeLoRA):
    """The script rule (methods.selora_script.ScriptSeLoRA) with the fast test step: its `capture` and `step` wrap
    `FastSeLoRA`'s (the method resolution order puts FastSeLoRA between ScriptSeLoRA and SeLoRA)."""
