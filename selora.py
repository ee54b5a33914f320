"""SeLoRA: Self-Expanding Low-Rank Adaptation ("SeLoRA: Self-Expanding Low-Rank Adaptation of Latent Diffusion
Model for Medical Image Synthesis", section 3).

Every adapted layer starts at rank 1. Every t training steps each layer is tested: would appending one
rank, A <- [A K], B <- [B; 0] (eq. 2), raise the empirical Fisher information of its weights (eq. 3-4)
by more than a factor lambda (the FI-ratio, expanded over original: eq. 5 prints its inverse)? If so, the
layer grows by that rank. Appending a zero row to B leaves the output unchanged, and the random column K lets
gradient reach the new row.

Read top to bottom:
- `SeLoRALinear`: x W0 + b0 + s x A B (eq. 1-2) on a frozen nn.Linear.
- `expand`: eq. 2, with the optimizer's state resized (adapters.resize_parameter).
- `per_sample_grads`: each sample's gradients of A, B and of K's row, from a layer's input x and output
  gradient g, which the training step's own backward produces (as sums over tokens of outer products);
  `per_sample_grads_of_layers`: the same for a stack of layers of equal shapes, as the training step computes them.
- `fisher_score` (eq. 3-4, as the paper writes them), `fi_ratio` (eq. 5, printed upside down in the paper:
  see its docstring); `fisher_sums`, `as_numbers` and `score_from_sums`: the same score from sums that the
  processes of a data-parallel run can add.
- `literal_fisher_scores`, `literal_fi_ratios`: the same numbers by definition, one backward per sample
  on an expanded copy of the model (for readers, and the tests' oracle).
- `SeLoRA`: the schedule (test every t steps, expand above lambda, log; optionally up to a maximum rank) as a
  training loop calls it.

This is the paper's rule (`expansion_test="paper"`, train.py's default). The authors' script tests differently
(a second forward and backward one optimizer step later, a zero candidate until a layer first grows, `>=` 1.3):
that rule, `--expansion-test script`, is `selora_script.py`, a subclass of `SeLoRA` that replaces the four
pieces where the rules differ (`candidate`, `scores`, `passes`, `grow`).

Per-sample gradient convention. The training loss is the batch mean of per-sample losses,
L = (1/b) sum_i l_i, with l_i the MSE of sample i (mean over its elements). Eq. 3 uses the gradient of
each sample's own loss l_i, so the output gradient dL/dy that backward gives is multiplied by b to
undo the batch mean. Tokens and spatial positions of one sample (the N of an input [b, N, d_in]) are
summed into that sample's gradient. This assumes l_i depends only on sample i's rows of every layer's
output, true for Stable Diffusion (GroupNorm and LayerNorm are per sample; there is no BatchNorm).
"""
from __future__ import annotations

import copy
import dataclasses
import math
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

import distributed
from adapters import Adapter, Controller, draw_candidate, lora_factors
from probe import Probe

BLOCK = 8  # ranks per matmul block in SeLoRALinear's forward; see `low_rank`
FISHER_MODES = ("sample", "batch")


class SeLoRALinear(Adapter):
    """A frozen nn.Linear (W0, b0) plus a trainable rank-r update: f(x) = x W0 + b0 + s x A B (eq. 1, 2).

    A (d_in x r) starts Kaiming-uniform, B (r x d_out) at zero, r = 1 (section 3), so the layer starts
    equal to the base layer. The scale s is a constant that does not depend on r: a LoRA-style alpha / r
    would change the output whenever r grows, which eq. 2 forbids. The default s = 8 is the value the
    authors' script uses in effect (lora_alpha = 8 divided by the initial r = 1, computed once and never
    updated when the rank grows); the paper's eq. 1 writes no scale (s = 1). With Adam, s multiplies the
    step size of the update x A B, so s = 8 at lr 1e-4 (the script's learning rate, script:96) moves the update
    as the authors' runs did: the scale is theirs, not their expansion rule (that is `selora_script.py`).
    s is a buffer, so saved adapters carry it.
    """
    method = "selora"

    def __init__(self, base: nn.Linear, scale: float = 8.0, generator: torch.Generator | None = None):
        super().__init__(base)
        self.A, self.B = lora_factors(base, 1, generator)  # rank 1: A Kaiming-uniform, B zero
        self.register_buffer("scale", self.A.new_tensor(float(scale)))
        self.probe: Probe | None = None

    def low_rank(self, x: torch.Tensor) -> torch.Tensor:
        """x A B (eq. 1): in real arithmetic exactly the plain `(x @ A) @ B`, computed here as a sum over blocks of
        BLOCK = 8 ranks with A and B zero-padded to whole blocks, so that growth leaves the output bit for bit.

        Why: the matmul kernels pick their summation order from the shapes, so going from r to r + 1 in a plain
        (x @ A) @ B changes the rounding of the ranks that were already there. With fixed-width blocks, appending
        a rank either fills a zero padding column (the block's shapes do not change) or opens a new block whose
        product is exactly zero. The cost: rank 1 does rank 8's multiply-adds (a layer below rank 8 pays for 8).
        A whole block is not padded, and a single block is not sliced: the same products with fewer dispatched ops.
        """
        pad = -self.A.shape[1] % BLOCK
        A, B = (F.pad(self.A, (0, pad)), F.pad(self.B, (0, 0, 0, pad))) if pad else (self.A, self.B)
        if A.shape[1] == BLOCK:
            return (x @ A) @ B
        out = None
        for i in range(0, A.shape[1], BLOCK):
            part = (x @ A[:, i:i + BLOCK].contiguous()) @ B[i:i + BLOCK]
            out = part if out is None else out + part
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        y = y + (self.scale * self.low_rank(self.factor_input(x))).to(y.dtype).view_as(y)
        return y if self.probe is None else self.probe.tap(x, y)  # a test step's probe (SeLoRA.capture)

    def factors(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(A, B, s): the update s A B (eq. 1)."""
        return self.A, self.B, self.scale


def expand(layer: SeLoRALinear, K: torch.Tensor, optimizer: torch.optim.Optimizer | None = None) -> None:
    """Grow the layer by one rank: A <- [A K], B <- [B; 0] (eq. 2). The output does not change.

    With an optimizer, the state of A and B grows with them: existing moments kept, new entries zero,
    same param group (Adapter.resize: adapters.resize_parameter for each).
    """
    d_in, d_out = layer.base.in_features, layer.base.out_features
    if K.numel() != d_in:
        raise ValueError(f"K must have d_in = {d_in} entries (a {d_in} x 1 column), got shape {tuple(K.shape)}")
    A, B, _ = layer.factors()
    layer.resize({"A": torch.cat([A.detach(), K.reshape(d_in, 1).to(A)], dim=1),
                  "B": torch.cat([B.detach(), B.new_zeros(1, d_out)], dim=0)}, optimizer)


@torch.no_grad()
def per_sample_grads_of_layers(layers: list[SeLoRALinear], x: torch.Tensor, g: torch.Tensor, K: torch.Tensor,
                               times: float = 1.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`per_sample_grads` of L layers of equal shapes at once, stacked: x [L, b, n, d_in], g [L, b, n, d_out],
    K [L, d_in] give [L, b, ...] per factor, in one batched product each instead of one per layer (the training
    step calls this once per group of equal shapes, `SeLoRA._fisher_sums`). B's and b_new's gradients, both
    sum_n u_n^T g_n, come from one product with u = s x [A K]; `times` goes onto the small factors, not onto g.
    """
    A, B = (torch.stack(f) for f in zip(*(layer.factors()[:2] for layer in layers)))  # [L, d_in, r], [L, r, d_out]
    s = (torch.stack([layer.scale for layer in layers]) * times).to(A.dtype)[:, None, None]
    x, g = x.to(A.dtype), g.to(A.dtype)
    AK = torch.cat([A, K.to(A)[..., None]], dim=2)  # [L, d_in, r + 1]: eq. 2's expanded A
    grad_A = torch.einsum("lbnd,lbne->lbde", x, g @ (s * B).transpose(1, 2)[:, None])
    grad_BK = torch.einsum("lbnr,lbne->lbre", x @ (s * AK)[:, None], g)
    return grad_A, grad_BK[:, :, :-1], grad_BK[:, :, -1]


def per_sample_grads(layer: SeLoRALinear, x: torch.Tensor, g: torch.Tensor, K: torch.Tensor,
                     times: float = 1.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-sample gradients of A, B and of the candidate row of B, from the layer's input and output gradient.

    x: the input [b, ..., d_in]; g: the gradient of each sample's own loss l_i with respect to the
    layer's output [b, ..., d_out] (the captured dL/dy of the batch-mean loss times b; or give that dL/dy
    and times=b). With y = s x A B:
        dl_i/dA = s sum_n x_n^T (g_n B^T)          [b, d_in, r]
        dl_i/dB = s sum_n (x_n A)^T g_n            [b, r, d_out]
        dl_i/db_new = s sum_n (x_n K) g_n          [b, d_out]  (the zero row that eq. 2 appends to B)
    The expanded layer's gradient of K is zero because its row of B is zero, and the gradients of A and
    B are those of the original layer, so these three give the Fisher of both. Sums over n (tokens,
    positions) are einsums (`per_sample_grads_of_layers` of this one layer): no per-sample copy of a weight.
    """
    b, d_in, d_out = x.shape[0], layer.base.in_features, layer.base.out_features
    grads = per_sample_grads_of_layers([layer], x.reshape(1, b, -1, d_in), g.reshape(1, b, -1, d_out),
                                       K.reshape(1, d_in), times)
    return tuple(grad[0] for grad in grads)


def fisher_score(per_sample: list[torch.Tensor], fisher: str = "sample") -> float:
    """The FI-score (eq. 4) of some parameters: their empirical Fisher information (eq. 3), summed over entries.

        eq. 3:  F(w) = (1/b) sum_i (dl_i/dw)^2          the batch mean of squared per-sample gradients
        eq. 4:  FI-score = sum over the entries w of F(w)

    per_sample: one tensor [b, ...] per parameter, each sample's gradient of its own loss l_i (from
    `per_sample_grads`, or from one backward per sample). fisher="batch" squares the batch-mean gradient
    instead, (mean_i dl_i/dw)^2, as the authors' script does (the sum of squared .grad after one backward
    of the batch-mean loss).
    """
    if fisher == "sample":
        return sum(float(g.double().square().mean(0).sum()) for g in per_sample)
    if fisher == "batch":
        return sum(float(g.double().mean(0).square().sum()) for g in per_sample)
    raise ValueError(f"fisher must be one of {FISHER_MODES}, got {fisher!r}")


def fisher_sums(per_sample: list[torch.Tensor], fisher: str = "sample") -> list[torch.Tensor]:
    """`fisher_score` in two halves, for a batch split over data-parallel processes: the sums over samples, in
    float64, of L layers' stacked per-sample gradients ([L, b, ...] per parameter, `per_sample_grads_of_layers`).
    Sums over disjoint sets of samples add up, so the processes' sums added (`SeLoRA.reduce`) are the whole
    batch's.

    fisher="sample": the squared gradients summed over samples and entries, [L];
    fisher="batch": the gradients summed over samples, [L, ...].
    """
    if fisher == "sample":
        return [p.double().square().flatten(1).sum(1) for p in per_sample]
    if fisher == "batch":
        return [p.double().sum(1) for p in per_sample]
    raise ValueError(f"fisher must be one of {FISHER_MODES}, got {fisher!r}")


def as_numbers(sums: dict[str, list[torch.Tensor]]) -> dict[str, list[float]]:
    """Each layer's sample counts and `fisher_sums` (added over the processes) as Python numbers, in one transfer
    from the device for all layers. A number stays itself (a count; fisher="sample": a sum of squared
    gradients); a tensor with entries (fisher="batch": gradients summed over samples) becomes the sum of its
    squares."""
    numbers = [t if t.dim() == 0 else t.square().sum() for parts in sums.values() for t in parts]
    flat = iter(torch.stack(numbers).tolist() if numbers else [])
    return {name: [next(flat) for _ in parts] for name, parts in sums.items()}


def score_from_sums(sums: list[float], n: int, fisher: str = "sample") -> float:
    """The FI-score (eq. 4) of n samples from their `fisher_sums` (`as_numbers`): sum / n (eq. 3's batch mean of
    the squares), or for fisher="batch" the squares of the summed gradients / n^2 (the square of their mean)."""
    return sum(sums) / (n if fisher == "sample" else n * n)


def fi_ratio(score_original: float, score_expanded: float) -> float:
    """The FI-ratio: FI-score(expanded) / FI-score(original). A layer expands when it exceeds lambda.

    The paper's eq. 5 prints this fraction upside down (original / expanded). Its section 3.2 (lambda = 1
    "accepts any improvement") and 3.3 ((rank + 1) / rank favours expansion at small rank) need expanded
    over original, and the authors' script computes it so (get_ratio: temp-weight gradients over the
    recorded ones). The expanded score is never smaller, so the ratio is >= 1. A layer whose original
    score is zero gets ratio inf if the candidate has any Fisher, else 1.
    """
    if score_original == 0:
        return math.inf if score_expanded > 0 else 1.0
    return score_expanded / score_original


def literal_fisher_scores(model: nn.Module, adapters: dict[str, SeLoRALinear],
                          per_sample_losses: Callable[[nn.Module], torch.Tensor],
                          fisher: str = "sample") -> dict[str, float]:
    """FI-score (eq. 3-4) of each adapter by definition: one backward of every sample's own loss l_i.

    per_sample_losses(model) runs the model on the batch and returns the vector [l_1 .. l_b].
    """
    losses = per_sample_losses(model)
    params = [p for a in adapters.values() for p in (a.A, a.B)]
    per_sample = [torch.autograd.grad(l, params, retain_graph=True) for l in losses]
    stacked = [torch.stack(gs) for gs in zip(*per_sample)]
    return {name: fisher_score(stacked[2 * i:2 * i + 2], fisher) for i, name in enumerate(adapters)}


def literal_fi_ratios(model: nn.Module, adapters: dict[str, SeLoRALinear],
                      per_sample_losses: Callable[[nn.Module], torch.Tensor],
                      candidates: dict[str, torch.Tensor], fisher: str = "sample") -> dict[str, float]:
    """FI-ratio of each adapter by definition: score an expanded copy of the model against the original.

    Each adapter is expanded with its candidate K in a deep copy (eq. 2); both are scored on the same
    batch at the same weights with `literal_fisher_scores`. Slow (b backward passes, twice), exact.
    """
    original = literal_fisher_scores(model, adapters, per_sample_losses, fisher)
    expanded_model = copy.deepcopy(model)
    expanded = {name: expanded_model.get_submodule(name) for name in adapters}
    for name, layer in expanded.items():
        expand(layer, candidates[name])
    scores = literal_fisher_scores(expanded_model, expanded, per_sample_losses, fisher)
    return {name: fi_ratio(original[name], scores[name]) for name in adapters}


@dataclass(frozen=True)
class RankTest:
    """One expansion test: at `step`, `layer` had FI-score `score` (eq. 4, original layer) and FI-ratio
    `ratio` (expanded over original: the inverse of eq. 5 as printed, see `fi_ratio`), and has `rank` after the
    decision."""
    step: int
    layer: str
    score: float
    ratio: float
    rank: int
    expanded: bool


class SeLoRA(Controller):
    """The expansion schedule (section 3.2): every t steps test every layer, expand those above lambda.

    A training loop calls it as every method's controller (adapters.Controller):

        selora = SeLoRA(adapters, optimizer, lam=1.1, t=40)
        for step, batch in enumerate(loader, start=1):
            with selora.capture(step, batch_size=len(batch)):   # test steps: probes, then each layer's Fisher sums
                loss = mse(model(batch), target)                 # batch mean of per-sample MSE
                optimizer.zero_grad()
                loss.backward()                                  # probes keep each layer's x and g
            optimizer.step()
            selora.step()                                        # test steps: FI-ratios, expand, log

    No extra forward or backward: the test reads the layer inputs x and output gradients g of the
    step's own backward (`per_sample_grads`, for the layers of equal shapes at once). Expansion comes after
    optimizer.step(): the gradient just computed belongs to the old shapes and is used by the step as plain
    LoRA would use it; the expansion then re-parameterises without changing the function, and the new entries,
    with zero moments, train from the next step. (The test is measured at the weights before the step, the
    expansion applied at the weights after it: a one-step lag the authors' script also has.) A layer expands
    when its ratio exceeds (>) lambda, by at most one rank per test; each test is logged in `log`.

    A test step is, in the paper's order: `candidate` (K, eq. 2), `scores` (eq. 3-4: the FI-scores of the original
    and the expanded layer), `fi_ratio` (eq. 5), `passes` (ratio > lambda) and `grow` (eq. 2).
    `selora_script.ScriptSeLoRA` replaces them with the authors' script's rule.

    max_rank: none by default, as in the paper; a layer that reaches it stops growing and is no longer
    tested (logged once, as an event with "reached_max_rank"). A fixed capacity (train.py --compile) needs one.
    """
    expansion_test = "paper"  # which rule decides growth (selora_script.ScriptSeLoRA: "script")

    def __init__(self, adapters: dict[str, SeLoRALinear], optimizer: torch.optim.Optimizer | None = None,
                 total_steps: int | None = None, reduce=None, lam: float = 1.1, t: int = 40, fisher: str = "sample",
                 seed: int = 0, insist: bool = False, max_rank: int | None = None, expansion_test: str = "paper"):
        if not adapters or not all(isinstance(a, SeLoRALinear) for a in adapters.values()):
            raise ValueError("adapters must be a non-empty dict of SeLoRALinear layers (from adapters.inject)")
        if expansion_test != self.expansion_test:
            raise ValueError(f"{type(self).__name__} runs expansion_test={self.expansion_test!r}, got "
                             f"{expansion_test!r} (the script's rule is selora_script.ScriptSeLoRA)")
        if isinstance(t, bool) or not isinstance(t, int) or t < 1:
            raise ValueError(f"t must be an integer >= 1 (test for expansion every t steps), got {t!r}")
        if isinstance(lam, bool) or not isinstance(lam, (int, float)) or not math.isfinite(lam):
            raise ValueError(f"lam (lambda) must be a finite number, got {lam!r}")
        if lam < 1:
            message = (f"lam = {lam} < 1: the FI-ratio is never below 1, so every layer would expand at every test "
                       "(the paper uses 1.1; 1 accepts any improvement)")
            if not insist:
                raise ValueError(message + "; pass insist=True to run so anyway")
            warnings.warn(message, stacklevel=2)
        if fisher not in FISHER_MODES:
            raise ValueError(f"fisher must be one of {FISHER_MODES}, got {fisher!r}")
        if optimizer is not None:
            held = {id(p) for group in optimizer.param_groups for p in group["params"]}
            missing = [name for name, a in adapters.items() if id(a.A) not in held or id(a.B) not in held]
            if missing:
                raise ValueError(f"the optimizer does not hold A and B of {len(missing)} adapters, e.g. '{missing[0]}'")
        if max_rank is not None and (isinstance(max_rank, bool) or not isinstance(max_rank, int) or max_rank < 1):
            raise ValueError(f"max_rank must be None or an integer >= 1, got {max_rank!r}")
        super().__init__(adapters, optimizer, total_steps, reduce)
        self.lam, self.t, self.fisher, self.seed, self.max_rank = float(lam), t, fisher, seed, max_rank
        self.log: list[RankTest] = []
        self._tested_step = None
        self._candidates: dict[str, torch.Tensor] = {}  # the layers tested this step, with their K
        self._sums: dict[str, list[torch.Tensor]] = {}  # each tested layer's count and Fisher sums (`_fisher_sums`)
        self._shapes: dict[str, list[tuple]] | None = None  # each tested layer's outputs' shapes, per sample

    def is_test_step(self, step: int) -> bool:
        return step % self.t == 0

    def needs_uncompiled(self, step: int) -> bool:
        """The run's first test step: its probes make their zeros in the forward (probe.Probe)."""
        return self.is_test_step(step) and self._shapes is None

    def capacity(self, name: str) -> int | None:
        return self.max_rank

    def candidate(self, name: str, step: int) -> torch.Tensor:
        """K for layer `name` at test step `step` (eq. 2): Kaiming-uniform, from a generator seeded by (seed, step,
        layer), so resumed and data-parallel runs draw the same K (adapters.draw_candidate)."""
        return draw_candidate(self.adapters[name].base.in_features, self.seed, step, name)

    @contextmanager
    def capture(self, step: int, batch_size: int) -> Iterator[None]:
        """Around the forward and backward of training step `step` (counted from 1): on test steps, probe
        every adapter below max_rank so that backward shows it its input x and output gradient g, and after
        backward reduce them to each layer's Fisher sums (`_probed`). Other steps: nothing."""
        self.last_step = step
        if not self.is_test_step(step):
            yield
            return
        self._tested_step = step
        self._candidates = {name: self.candidate(name, step) for name, a in self.adapters.items()
                            if self.max_rank is None or a.rank < self.max_rank}
        with self._probed(batch_size):
            yield

    @contextmanager
    def _probed(self, batch_size: int) -> Iterator[None]:
        """A `Probe` on every layer in `_candidates` for one forward and backward; after them, in `_sums`, every such
        layer's Fisher sums at the weights of that backward (`_fisher_sums`), and in `_shapes` its outputs' shapes."""
        anchor = next(iter(self.adapters.values())).A.new_zeros((), requires_grad=True)  # for every `Probe`'s zeros
        probes = {name: Probe(name, batch_size, anchor, [((batch_size, *shape), dtype) for shape, dtype in
                                                         (self._shapes or {}).get(name, [])])
                  for name in self._candidates}
        for name, probe in probes.items():
            self.adapters[name].probe = probe
        try:
            yield
        finally:
            for name in probes:
                self.adapters[name].probe = None
        self._shapes = {name: [(P.shape[1:], P.dtype) for P in probe.zeros] for name, probe in probes.items()}
        seen = {name: probe.seen() for name, probe in probes.items()}
        self._sums = self._fisher_sums({name: calls for name, calls in seen.items() if calls}, batch_size)

    @torch.no_grad()
    def _fisher_sums(self, seen: dict[str, list[tuple[torch.Tensor, torch.Tensor]]],
                     batch_size: int) -> dict[str, list[torch.Tensor]]:
        """[number of samples, fisher_sums of A, B and of the candidate row] of this process's batch for every
        tested layer, from the inputs x and output gradients g that its probe saw (a layer called twice: both
        calls' tokens). The per-sample gradients are computed for all layers of equal shapes at once
        (`per_sample_grads_of_layers`), one group at a time; a layer that received no gradient gets zero samples
        and zero sums. In the order of `_candidates`, the same in every process (`SeLoRA.reduce`)."""
        groups: dict[tuple, list[tuple[str, torch.Tensor, torch.Tensor]]] = {}
        for name, calls in seen.items():
            x, g = (parts[0] if len(parts) == 1  # a layer called twice: the tokens of both calls
                    else torch.cat([t.reshape(batch_size, -1, t.shape[-1]) for t in parts], 1) for parts in zip(*calls))
            key = (x.shape, g.shape, x.dtype, g.dtype, x.device, self.adapters[name].rank)
            groups.setdefault(key, []).append((name, x, g))
        sums = {}
        for group in groups.values():
            names, x, g = zip(*group)
            L, d_in, d_out = len(names), x[0].shape[-1], g[0].shape[-1]
            K = torch.stack([self._candidates[name] for name in names]).reshape(L, d_in)  # each K: d_in x 1
            grads = per_sample_grads_of_layers([self.adapters[name] for name in names],
                                               torch.stack(x).reshape(L, batch_size, -1, d_in),
                                               torch.stack(g).reshape(L, batch_size, -1, d_out), K, batch_size)
            count = grads[0].new_full((len(names),), float(batch_size), dtype=torch.float64)
            for name, *parts in zip(names, *(t.unbind(0) for t in [count, *fisher_sums(grads, self.fisher)])):
                sums[name] = parts
        return {name: sums.get(name) or self._no_sums(name) for name in self._candidates}

    def _no_sums(self, name: str) -> list[torch.Tensor]:
        """`_fisher_sums` of a layer that no sample reached: zero samples, zero sums."""
        A, B, _ = self.adapters[name].factors()
        none = [A.new_zeros(1, 0, *A.shape), B.new_zeros(1, 0, *B.shape), B.new_zeros(1, 0, B.shape[1])]
        return [A.new_zeros((), dtype=torch.float64), *(t[0] for t in fisher_sums(none, self.fisher))]

    def scores(self, sums: list[float]) -> tuple[float, float] | None:
        """The FI-scores (eq. 3-4) of the original and of the expanded layer from one layer's `_fisher_sums` over
        all processes (`as_numbers`), or None when no sample reached the layer. FI-score(expanded) =
        FI-score(original) + the candidate row's Fisher, since K's own gradient is zero (its row of B is zero)."""
        n, sum_A, sum_B, sum_new = sums
        if n == 0:
            return None
        original = score_from_sums([sum_A, sum_B], int(n), self.fisher)
        return original, original + score_from_sums([sum_new], int(n), self.fisher)

    def passes(self, ratio: float) -> bool:
        """The paper's threshold: expand when the FI-ratio exceeds lambda (section 3.2)."""
        return ratio > self.lam

    def grow(self, name: str, step: int) -> None:
        """Append the tested candidate K (eq. 2), the optimizer's moments kept for the old entries (`expand`)."""
        expand(self.adapters[name], self._candidates[name], self.optimizer)

    def step(self) -> list[dict]:
        """After optimizer.step(): on a test step, compute each tested layer's FI-ratio (eq. 5), expand those
        above lambda (eq. 2, resizing the optimizer's state), log the tests in `log` and return them as dicts
        (and a layer that reaches max_rank). Layers that received no gradient this step are not tested.
        Other steps: nothing.

        Each layer's sample count and Fisher sums go through `reduce` first: the identity in one process, a
        sum over the processes of a data-parallel run, so that the FI-ratio is the global batch's and every
        process decides alike. (The per-sample gradients use each process's own batch size in `capture`,
        which is right: each process's loss is the mean over its own samples.)"""
        if self._tested_step is None:
            return []
        sums = distributed.sum_over_processes(self._sums, self.reduce)  # each layer's count and sums, global batch
        sums = as_numbers(sums)  # one transfer for all layers
        tests, events = [], []
        for name, layer_sums in sums.items():
            scores = self.scores(layer_sums)  # eq. 3-4, original and expanded layer
            if scores is None:
                continue
            original, expanded = scores
            ratio = fi_ratio(original, expanded)  # eq. 5
            layer, grow = self.adapters[name], self.passes(ratio)
            if grow:
                self.grow(name, self._tested_step)  # eq. 2
            tests.append(RankTest(self._tested_step, name, original, ratio, layer.rank, grow))
            if grow and layer.rank == self.max_rank:
                events.append({"step": self._tested_step, "layer": name, "rank": layer.rank, "reached_max_rank": True})
        self.log += tests
        self._tested_step, self._candidates, self._sums = None, {}, {}
        return [dataclasses.asdict(test) for test in tests] + events

    def metadata(self) -> dict[str, str]:
        """The schedule's settings and the last step, for adapters.save_adapters (add the base model's name)."""
        return {"lambda": repr(self.lam), "t": str(self.t), "fisher": self.fisher, "seed": str(self.seed),
                "step": str(self.last_step), "expansion_test": self.expansion_test,
                **({} if self.max_rank is None else {"max_rank": str(self.max_rank)})}
