"""SeLoRA: Self-Expanding Low-Rank Adaptation ("SeLoRA: Self-Expanding Low-Rank Adaptation of Latent Diffusion
Model for Medical Image Synthesis", section 3).

Every adapted layer starts at rank 1. Every t training steps each layer is tested: would appending one
rank, A <- [A K], B <- [B; 0] (eq. 2), raise the empirical Fisher information of its weights (eq. 3-4)
by more than a factor lambda (the FI-ratio, expanded over original: eq. 5 prints its inverse)? If so, the
layer grows by that rank. Appending a zero row to B leaves the output unchanged, and the random column K lets
gradient reach the new row.

Read top to bottom, in the paper's order:
- `SeLoRALinear`: x W0 + b0 + s x A B (eq. 1-2) on a frozen nn.Linear.
- `expand`: eq. 2, with the optimizer's state resized (adapters.resize_parameter).
- `per_sample_grads`: each sample's gradients of A, B and of the new row of B, from a layer's input x and output
  gradient g, which the training step's own backward produces (three einsums over tokens).
- `fisher_score` (eq. 3-4), `fi_ratio` (eq. 5, printed upside down in the paper: see its docstring).
- `literal_fisher_scores`, `literal_fi_ratios`: the same numbers by definition, one backward per sample
  on an expanded copy of the model (for readers, and the tests' oracle).
- `SeLoRA`: the test step as a training loop calls it, around and after every step: `capture` hooks each layer
  for x and g, `after_backward` turns them into the FI-scores, `step` decides (ratio > lambda) and expands.

This path is the one every run takes, unless it needs the fast one (fast/fisher.py: the same test for all layers
of equal shapes at once, compiled, summed over data-parallel processes), which tests prove equal to this one.

This is the paper's rule (`expansion_test="paper"`, train.py's default). The authors' script tests differently
(a second forward and backward one optimizer step later, a zero candidate until a layer first grows, `>=` 1.3):
that rule, `--expansion-test script`, is methods/selora_script.py, a subclass of `SeLoRA` that changes the
candidate K, the threshold, which scores are compared, and the growth.

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
import operator
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from methods.adapters import Adapter, Controller, draw_candidate, lora_factors

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
    as the authors' runs did: the scale is theirs, not their expansion rule (that is `methods/selora_script.py`).
    s is a buffer, so saved adapters carry it.
    """
    method = "selora"

    def __init__(self, base: nn.Linear, scale: float = 8.0, generator: torch.Generator | None = None):
        super().__init__(base)
        self.A, self.B = lora_factors(base, 1, generator)  # rank 1: A Kaiming-uniform, B zero
        self.register_buffer("scale", self.A.new_tensor(float(scale)))
        self.probe = None  # set by the fast test step (fast.probe.Probe)

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
        return y if self.probe is None else self.probe.tap(x, y)  # the fast test step (fast/fisher.py)

    def factors(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(A, B, s): the update s A B (eq. 1)."""
        return self.A, self.B, self.scale


def expand(layer: SeLoRALinear, K: torch.Tensor, optimizer: torch.optim.Optimizer | None = None) -> None:
    """Grow the layer by one rank: A <- [A K], B <- [B; 0] (eq. 2). The output does not change.

    K is a column, d_in x 1. With an optimizer, the state of A and B grows with them: existing moments kept, new
    entries zero, same param group (Adapter.resize: adapters.resize_parameter for each).
    """
    d_in, d_out = layer.base.in_features, layer.base.out_features
    if K.numel() != d_in:
        raise ValueError(f"K must have d_in = {d_in} entries (a {d_in} x 1 column), got shape {tuple(K.shape)}")
    A, B, _ = layer.factors()
    layer.resize({"A": torch.cat([A.detach(), K.reshape(d_in, 1).to(A)], dim=1),
                  "B": torch.cat([B.detach(), B.new_zeros(1, d_out)], dim=0)}, optimizer)


@torch.no_grad()
def per_sample_grads(x: torch.Tensor, g: torch.Tensor, A: torch.Tensor, B: torch.Tensor, K: torch.Tensor,
                     s: torch.Tensor | float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Each sample's gradients of A, B and of the row that eq. 2 appends to B, from one layer's input and output
    gradient, for eq. 3.

    x: the layer's input [b, n, d_in]; g: the gradient of each sample's own loss l_i with respect to the layer's
    output [b, n, d_out] (b times the dL/dy of the batch-mean loss that backward gives); A [d_in, r], B [r, d_out],
    K [d_in, 1] and the scale s of y = s x A B. The layer expanded by eq. 2, A' = [A K] and B' = [B; 0], computes
    the same y, and summing over the n tokens or positions of each sample:
        dl_i/dA' = s sum_n x_n^T (g_n B'^T) = [dl_i/dA, 0]              dl_i/dA [b, d_in, r]
        dl_i/dB' = s sum_n (x_n A')^T g_n   = [dl_i/dB; dl_i/db_new]    [b, r, d_out] and [b, 1, d_out]
    K's own gradient is zero, since its row of B' is zero, and the gradients of A and B are the original layer's:
    these three give the Fisher of both layers (`SeLoRA.after_backward`). No per-sample copy of a weight is made.
    Leading dimensions broadcast: fast.fisher calls it once for a stack of L layers of equal shapes (x [L, b, n,
    d_in], A [L, 1, d_in, r], s [L, 1, 1, 1], ...).
    """
    A_expanded = torch.cat([A, K], dim=-1)  # eq. 2
    grad_A = torch.einsum("...nd,...nr->...dr", x, g @ (s * B).mT)
    grad_B_expanded = torch.einsum("...nr,...ne->...re", x @ (s * A_expanded), g)
    return grad_A, grad_B_expanded[..., :-1, :], grad_B_expanded[..., -1:, :]


def fisher_score(per_sample: list[torch.Tensor], fisher: str = "sample") -> float:
    """The FI-score (eq. 4) of some parameters: their empirical Fisher information (eq. 3), summed over entries.

        eq. 3:  F(w) = (1/b) sum_i (dl_i/dw)^2          the batch mean of squared per-sample gradients
        eq. 4:  FI-score = sum over the entries w of F(w)

    per_sample: one tensor [b, ...] per parameter, each sample's gradient of its own loss l_i (from
    `per_sample_grads`, or from one backward per sample). fisher="batch" squares the batch-mean gradient
    instead, (mean_i dl_i/dw)^2, as the authors' script does (the sum of squared .grad after one backward
    of the batch-mean loss). Summed in float64.
    """
    if fisher == "sample":
        return sum(float(g.double().square().mean(0).sum()) for g in per_sample)
    if fisher == "batch":
        return sum(float(g.double().mean(0).square().sum()) for g in per_sample)
    raise ValueError(f"fisher must be one of {FISHER_MODES}, got {fisher!r}")


def fi_ratio(score_original: float, score_expanded: float) -> float:
    """The FI-ratio: FI-score(expanded) / FI-score(original). A layer expands when it exceeds lambda.

    The paper's eq. 5 prints this fraction upside down (original / expanded). Its section 3.2 (lambda = 1
    "accepts any improvement") and 3.3 ((rank + 1) / rank favours expansion at small rank) need expanded
    over original, and the authors' script computes it so (get_ratio: temp-weight gradients over the
    recorded ones). Under the paper's rule the expanded score is never smaller, so the ratio is >= 1. A layer
    whose original score is zero gets ratio inf if the candidate has any Fisher, else 1.
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

    A training loop calls it as every method's controller (adapters.Controller); around one step:

        with selora.capture(step, batch_size=len(batch)):   # test steps: hooks keep each layer's x and g
            loss = mse(model(batch), target)                 # batch mean of per-sample MSE
            optimizer.zero_grad()
            loss.backward()
        selora.after_backward()                              # test steps: each layer's FI-scores (eq. 3-4)
        optimizer.step()
        selora.step()                                        # test steps: FI-ratio (eq. 5), expand (eq. 2), log

    No extra forward or backward: the test reads the layer inputs x and output gradients g of the step's own
    backward (`per_sample_grads`). Expansion comes after optimizer.step(): the gradient just computed belongs to
    the old shapes and is used by the step as plain LoRA would use it; the expansion then re-parameterises without
    changing the function, and the new entries, with zero moments, train from the next step. (The test is measured
    at the weights before the step, the expansion applied at the weights after it: a one-step lag the authors'
    script also has.) A layer expands when its ratio exceeds (>) lambda, by at most one rank per test; each test is
    logged in `log`.

    max_rank: none by default, as in the paper; a layer that reaches it stops growing and is no longer tested
    (logged once, as an event with "reached_max_rank"). A fixed capacity (train.py --compile) needs one. A layer
    stops so at min(d_in, d_out) in any case (`rank_cap`): there its update A B has full rank already, and an
    adapter of more ranks would be refused where it is loaded (kohya.check_update).
    """
    expansion_test = "paper"  # which rule decides growth (methods.selora_script.ScriptSeLoRA: "script")
    exceeds = staticmethod(operator.gt)  # the threshold: a layer grows when its FI-ratio > lambda (section 3.2)

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
        self.rank_cap = {name: min(a.base.in_features, a.base.out_features, max_rank or math.inf)
                         for name, a in adapters.items()}  # each layer's most ranks
        self.log: list[RankTest] = []
        self._tested_step: int | None = None
        self._candidates: dict[str, torch.Tensor] = {}  # the layers tested this step, each with its K (eq. 2)
        self._kept: dict[str, list[tuple[torch.Tensor, list[torch.Tensor]]]] = {}  # per layer, per call: x, [g]
        self._scores: dict[str, tuple[float, float]] = {}  # per tested layer: FI-scores, original and expanded

    def is_test_step(self, step: int) -> bool:
        return step % self.t == 0

    def capacity(self, name: str) -> int | None:
        return self.max_rank

    @contextmanager
    def capture(self, step: int, batch_size: int) -> Iterator[None]:
        """Around the forward and backward of training step `step` (counted from 1). On a test step: a candidate K
        (eq. 2, Kaiming-uniform, drawn from (seed, step, layer), so resumed and data-parallel runs draw the same) for
        every layer below its cap (`rank_cap`), and a forward hook on each that keeps its input x and, once backward
        reaches its output, the gradient g (`_keep`). Other steps: nothing. (A second capture of the same test step,
        the script rule's second pass, keeps the candidates it has.)"""
        self.last_step = step
        if self.is_test_step(step) and step != self._tested_step:
            self._tested_step = step
            self._candidates = {name: draw_candidate(a.base.in_features, self.seed, step, name)
                                for name, a in self.adapters.items() if a.rank < self.rank_cap[name]}
        hooks = [self.adapters[name].register_forward_hook(partial(self._keep, name, batch_size))
                 for name in self._candidates] if step == self._tested_step else []
        try:
            yield
        finally:
            for hook in hooks:
                hook.remove()

    def _keep(self, name: str, batch_size: int, layer: SeLoRALinear, inputs: tuple, y: torch.Tensor) -> None:
        """The forward hook of a tested layer: keep its input x and, in a list that backward fills, g = dL/dy. Under
        gradient checkpointing backward runs the layer again to recompute it; that call's y is not on backward's
        path, so its list stays empty and the call counts once."""
        x = inputs[0]
        if x.shape[0] != batch_size:
            raise ValueError(f"layer '{name}': input of shape {tuple(x.shape)} does not have the batch size "
                             f"{batch_size} first; the per-sample Fisher needs samples along dimension 0")
        grads: list[torch.Tensor] = []
        if y.requires_grad:
            y.register_hook(grads.append)
        self._kept.setdefault(name, []).append((x, grads))

    @torch.no_grad()
    def after_backward(self) -> None:
        """After backward, before optimizer.step(), on a test step: each tested layer's FI-scores (eq. 3-4) of the
        original layer and of the layer expanded with its K, at the weights of that backward, into `_scores`. A
        layer that no gradient reached is not tested. Other steps: nothing."""
        kept, self._kept, self._scores = self._kept, {}, {}
        for name, K in self._candidates.items():
            calls = [(x, grads[0]) for x, grads in kept.get(name, []) if grads]
            if not calls:
                continue
            layer = self.adapters[name]
            b = calls[0][0].shape[0]
            x, g = (torch.cat([t.reshape(b, -1, t.shape[-1]).to(layer.A.dtype) for t in part], 1)  # [b, n, d]
                    for part in zip(*calls))  # a layer called twice in the forward: the tokens of both calls
            # b g: each sample's own gradient (the module's docstring)
            grad_A, grad_B, grad_new = per_sample_grads(x, b * g, layer.A, layer.B, K.to(layer.A), layer.scale)
            original = fisher_score([grad_A, grad_B], self.fisher)  # eq. 3-4
            # the expanded layer's: the same gradients of A and B, K's own is zero, and B's new row
            self._scores[name] = (original, original + fisher_score([grad_new], self.fisher))

    def step(self) -> list[dict]:
        """After optimizer.step(), on a test step: each tested layer's FI-ratio (eq. 5), and the expansion (eq. 2) of
        those above lambda, the optimizer's state resized; the tests logged in `log` and returned as dicts (and an
        event for a layer that reaches its cap, max_rank or min(d_in, d_out)). Other steps: nothing."""
        if self._tested_step is None:
            return []
        tests, events = [], []
        for name, (original, expanded) in self._scores.items():
            ratio = fi_ratio(original, expanded)  # eq. 5
            layer, grow = self.adapters[name], self.exceeds(ratio, self.lam)
            if grow:
                expand(layer, self._candidates[name], self.optimizer)  # eq. 2
            tests.append(RankTest(self._tested_step, name, original, ratio, layer.rank, grow))
            if grow and layer.rank == self.rank_cap[name]:
                events.append({"step": self._tested_step, "layer": name, "rank": layer.rank, "reached_max_rank": True})
        self.log += tests
        self._tested_step, self._candidates, self._scores = None, {}, {}
        return [dataclasses.asdict(test) for test in tests] + events

    def metadata(self) -> dict[str, str]:
        """The schedule's settings and the last step, for adapters.save_adapters (add the base model's name)."""
        return {"lambda": repr(self.lam), "t": str(self.t), "fisher": self.fisher, "seed": str(self.seed),
                "step": str(self.last_step), "expansion_test": self.expansion_test,
                **({} if self.max_rank is None else {"max_rank": str(self.max_rank)})}
