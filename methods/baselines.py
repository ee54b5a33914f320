"""The methods SeLoRA is compared with (SeLoRA paper, section 4): LoRA, DyLoRA and AdaLoRA.

Each is an `adapters.Adapter` (frozen base W0, b0; factors A in R^{d_in x r}, B in R^{r x d_out}; the
update applied as x A B) plus an `adapters.Controller`, which a training loop drives the same way for every
method (its docstring shows the loop). LoRA's controller is `Controller` itself: a fixed rank needs nothing.

Read top to bottom:
- `LoRALinear` (Hu et al. 2022): fixed rank r, scale alpha / r.
- `DyLoRALinear`, `DyLoRA` (Valipour et al. 2022): nested ranks, one b ~ U{1..r} per step, scale alpha / b.
- `AdaLoRALinear`, `orthogonal_regulariser`, `budget_schedule`, `AdaLoRA` (Zhang et al. 2023): SVD form
  P Lambda Q, sensitivity-times-uncertainty importance, a cubic budget, masking, then truncation.
The AdaLoRA formulas follow peft's `adalora` tuner (peft 0.21); where ours differ, the docstring says so.
"""
from __future__ import annotations

import json
from contextlib import contextmanager
from typing import Callable, Iterator

import numpy as np
import torch
from torch import nn

from methods.adapters import Adapter, Controller, add_to_grads, factor_dtype, lora_factors


# ---------------------------------------------------------------- LoRA

class LoRALinear(Adapter):
    """f(x) = x W0 + b0 + (alpha / r) x A B with a fixed rank r: A Kaiming-uniform, B zero (Hu et al. 2022).

    The paper setting for the comparison is r = 4. alpha defaults to 8, the lora_alpha of the SeLoRA
    authors' script, so LoRA's scale is 2. A is drawn as SeLoRA's A is (`adapters.kaiming_uniform`,
    gain sqrt(2)); peft draws it with a = sqrt(5), a bound sqrt(3) times smaller.
    """
    method = "lora"

    def __init__(self, base: nn.Linear, r: int = 4, alpha: float = 8.0, generator: torch.Generator | None = None):
        super().__init__(base)
        self.A, self.B = lora_factors(base, r, generator)
        self.register_buffer("scale", self.A.new_tensor(alpha / r))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        return y + (self.scale * ((self.factor_input(x) @ self.A) @ self.B)).to(y.dtype).view_as(y)

    def factors(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(A, B, alpha / r)."""
        return self.A, self.B, self.scale


# ---------------------------------------------------------------- DyLoRA

DYLORA_MODES = ("full", "frozen")


class DyLoRALinear(Adapter):
    """Nested ranks: f(x) = x W0 + b0 + (alpha / b) x A[:, :b] B[:b] (DyLoRA eq. 7), any b in 1..r.

    `b` is the rank in use: None (the default, and outside training) means the full rank r; the
    `DyLoRA` controller sets it for each training step, and at inference `set_rank` picks any rank.
    The scale alpha / b is the paper's (eq. 7; the author confirmed it in kohya-ss/sd-scripts issue
    394); the forward really is truncated to b ranks (kohya's implementation runs the full rank, which
    LyCORIS issue 101 reports as wrong). In "frozen" mode only the b-th rank (A's column b, B's row b) receives gradient, the first
    b - 1 are detached (the paper's frozen update; Adam's momentum still moves them a little, as in
    any detached-gradient scheme); "full" trains all first b. A buffer keeps alpha, so saved files
    carry it. (At a fixed capacity, train.py --compile, the forward masks instead of slicing: capacity.FixedDyLoRA.)
    """
    method = "dylora"

    def __init__(self, base: nn.Linear, r: int = 4, alpha: float = 8.0, mode: str = "full",
                 generator: torch.Generator | None = None):
        super().__init__(base)
        if mode not in DYLORA_MODES:
            raise ValueError(f"mode must be one of {DYLORA_MODES}, got {mode!r}")
        self.A, self.B = lora_factors(base, r, generator)
        self.register_buffer("alpha", self.A.new_tensor(float(alpha)))
        self.mode = mode
        self.b: int | None = None

    def set_rank(self, b: int | None) -> None:
        """Use the first b ranks (None: all r) from now on, e.g. to sample or merge at a smaller rank."""
        if b is not None and not 1 <= b <= self.rank:
            raise ValueError(f"rank b must be in 1..{self.rank}, got {b}")
        self.b = b

    def factors(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(A[:, :b], B[:b], alpha / b): the ranks in use (b = r outside training unless `set_rank` chose one)."""
        b = self.rank if self.b is None else self.b
        return self.A[:, :b], self.B[:b], self.alpha / b

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        A, B, scale = self.factors()
        if self.mode == "frozen" and self.training:  # only the b-th rank receives gradient
            b = A.shape[1]
            A = torch.cat([A[:, :b - 1].detach(), A[:, b - 1:]], dim=1)
            B = torch.cat([B[:b - 1].detach(), B[b - 1:]], dim=0)
        return y + (scale * ((self.factor_input(x) @ A) @ B)).to(y.dtype).view_as(y)


def draw_rank(seed: int, step: int, r: int) -> int:
    """b ~ U{1..r} for training step `step`, from a generator seeded by (seed, step): a resumed run draws
    the same b without saving any generator state."""
    return int(np.random.default_rng([seed, step]).integers(1, r + 1))


class DyLoRA(Controller):
    """Samples one b ~ U{1..r} per training step for all layers together (as in the DyLoRA paper, whose
    p_B is one draw per step) and sets it on every adapter for the step's forward and backward only.
    A layer of smaller rank than b (only when adapters of several ranks are mixed) uses its full rank."""

    def __init__(self, adapters: dict[str, DyLoRALinear], optimizer: torch.optim.Optimizer | None = None,
                 total_steps: int | None = None, reduce=None, seed: int = 0):
        super().__init__(adapters, optimizer, total_steps, reduce)
        if not all(isinstance(a, DyLoRALinear) for a in adapters.values()):
            raise ValueError("DyLoRA controls DyLoRALinear adapters only")
        self.seed = seed
        self.r = max(a.rank for a in adapters.values())
        self.b: int | None = None

    @contextmanager
    def capture(self, step: int, batch_size: int) -> Iterator[None]:
        self.last_step = step
        self.b = draw_rank(self.seed, step, self.r)
        for a in self.adapters.values():
            a.set_rank(min(self.b, a.rank))
        try:
            yield
        finally:
            for a in self.adapters.values():
                a.set_rank(None)

    def metadata(self) -> dict[str, str]:
        modes = {a.mode for a in self.adapters.values()}
        return {**super().metadata(), "seed": str(self.seed), "mode": ",".join(sorted(modes))}


# ---------------------------------------------------------------- AdaLoRA

class AdaLoRALinear(Adapter):
    """SVD-form update Delta W = P Lambda Q (AdaLoRA eq. 3): f(x) = x W0 + b0 + s x A diag(E) B.

    In our layout A = Q^T (d_in x r) and B = P^T (r x d_out); E (peft's lora_E) is the diagonal Lambda,
    started at zero, A and B drawn N(0, 0.02^2) as in peft, so the layer starts equal to its base.
    s = alpha / init_r stays fixed when ranks are masked or truncated (peft: lora_alpha / ranknum;
    peft adds 1e-5 to ranknum, we do not).
    """
    method = "adalora"
    rank_dims = {"A": 1, "E": 0, "B": 0}

    def __init__(self, base: nn.Linear, init_r: int = 6, alpha: float = 8.0, generator: torch.Generator | None = None):
        super().__init__(base)
        if isinstance(init_r, bool) or not isinstance(init_r, int) or init_r < 1:
            raise ValueError(f"init_r must be an integer >= 1, got {init_r!r}")
        dev, dtype = factor_dtype(base)
        self.A = nn.Parameter((0.02 * torch.randn(base.in_features, init_r, generator=generator)).to(dev, dtype))
        self.E = nn.Parameter(torch.zeros(init_r, device=dev, dtype=dtype))
        self.B = nn.Parameter((0.02 * torch.randn(init_r, base.out_features, generator=generator)).to(dev, dtype))
        self.register_buffer("scale", torch.tensor(alpha / init_r, device=dev, dtype=dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        return y + (self.scale * (((self.factor_input(x) @ self.A) * self.E) @ self.B)).to(y.dtype).view_as(y)

    def factors(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(A diag(E), B, s): the update s A diag(E) B; a masked triplet (E_i = 0) is a zero column."""
        return self.A * self.E, self.B, self.scale


def by_shape(tensors: list[torch.Tensor]) -> list[list[int]]:
    """The positions of `tensors` grouped by shape, in order of first appearance."""
    groups: dict[tuple, list[int]] = {}
    for i, t in enumerate(tensors):
        groups.setdefault(tuple(t.shape), []).append(i)
    return list(groups.values())


def per_shape(fn: Callable[[torch.Tensor], torch.Tensor], tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """fn of every tensor, computed as fn of each stack of equal shapes ([n, ...] -> [n, ...]) and split back."""
    out = list(tensors)
    for group in by_shape(tensors):
        for i, result in zip(group, fn(torch.stack([tensors[i] for i in group])).unbind()):
            out[i] = result
    return out


def stacked(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """`tensors` stacked by shape, one [n, ...] tensor per shape (`by_shape`), so that a sum over hundreds of layers'
    factors runs as a few batched ops (SD 1.5's layers have a few dozen shapes)."""
    return [torch.stack([tensors[i] for i in group]) for group in by_shape(tensors)]


def factors_in_use(adapters: dict[str, AdaLoRALinear]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Every layer's A and B at its rank: sliced only where fast/capacity.py stores more (a slice is a dispatched op)."""
    layers = list(adapters.values())
    return ([a.A if a.A.shape[1] == a.rank else a.A[:, :a.rank] for a in layers],
            [a.B if a.B.shape[0] == a.rank else a.B[:a.rank] for a in layers])


def orthogonal_regulariser(adapters: dict[str, AdaLoRALinear]) -> torch.Tensor:
    """R(P, Q) = mean over all P and Q of ||P^T P - I||_F and ||Q Q^T - I||_F (peft's form).

    With P = B^T and Q = A^T both Gram matrices are r x r: B B^T and A^T A. As in peft the norms are
    not squared (the AdaLoRA paper's eq. 4 squares them) and the mean runs over the 2n matrices of n
    adapters. Factors of equal shape are stacked (`stacked`) and go through one batched product and norm: at SD
    1.5's widths the same norms and gradients bit for bit as one layer at a time; for small products (contraction
    x r x r < 400) torch's CPU bmm sums in another order than mm, a difference of rounding
    (docs/performance.md). The mean adds the norms in another order, which moves its value by rounding only.
    """
    As, Bs = factors_in_use(adapters)
    grams = [A.mT @ A for A in stacked(As)] + [B @ B.mT for B in stacked(Bs)]
    return torch.cat([torch.linalg.matrix_norm(g - torch.eye(g.shape[-1], device=g.device, dtype=g.dtype))
                      for g in grams]).mean()


def orthogonal_gradient(P: torch.Tensor) -> torch.Tensor:
    """d ||P^T P - I||_F / dP = P (M + M^T) / ||M||_F = 2 P M / ||M||_F (M = P^T P - I is symmetric), for a stack of
    factors P [n, d, r] at once; zero where M = 0 (an orthonormal P), autograd's choice for the norm there too."""
    M = P.mT @ P - torch.eye(P.shape[-1], device=P.device, dtype=P.dtype)
    norm = torch.linalg.matrix_norm(M, keepdim=True).clamp_min(torch.finfo(M.dtype).tiny)
    return 2 * (P @ (M / norm))


def budget_schedule(step: int, init_budget: int, target_budget: int, total_steps: int,
                    tinit: int, tfinal: int, delta_t: int) -> tuple[int, bool]:
    """(total rank budget b(t), whether to mask at this step): AdaLoRA eq. 10 as peft computes it.

    b(t) = init_budget for t <= tinit; target_budget for t > T - tfinal; in between
    int((init_budget - target_budget) (1 - (t - tinit) / (T - tfinal - tinit))^3 + target_budget),
    masking every delta_t steps.
    """
    if step <= tinit:
        return init_budget, False
    if step > total_steps - tfinal:
        return target_budget, True
    progress = 1 - (step - tinit) / (total_steps - tfinal - tinit)
    return int((init_budget - target_budget) * progress ** 3 + target_budget), step % delta_t == 0


class AdaLoRA(Controller):
    """Importance, budget and masking (AdaLoRA section 3), and the orthogonal regulariser as the penalty.

    Settings as peft's AdaLoraConfig (delta_t is its deltaT), except the defaults of the phases, which
    peft leaves at 0 (no warm-up, no final phase, masking every step): here tinit = 10 % and tfinal =
    20 % of total_steps, and masking every delta_t = 10 steps (peft's examples use deltaT = 10).

    After optimizer.step() (gradients still present) each step until T - tfinal:
      I = |w * grad w| for every entry of A, E, B (eq. 8); sensitivity EMA
      Ibar <- beta1 Ibar + (1 - beta1) I; uncertainty Ubar <- beta2 Ubar + (1 - beta2) |I - Ibar| (eq. 9);
      score s = Ibar * Ubar; triplet score S_i = s(E_i) + mean_j s(A_ji) + mean_k s(B_ik) (eq. 7).
    On masking steps the (init budget - b(t)) lowest triplet scores over all layers set their E_i to 0
    (peft: kthvalue threshold, ties at the threshold masked too). At step T - tfinal the target budget
    is masked once more, and then, where peft keeps masking the same pattern every step, we truncate
    each layer to its kept triplets (A's columns, E, B's rows, with their optimizer state:
    adapters.select_parameter), so the final phase trains, and saved files hold, the final ranks
    (a layer may reach rank 0). At a fixed capacity (train.py --compile; the capacity is init_r) the
    kept triplets move to the first positions instead and the others become zero, moments included
    (capacity.FixedCapacity.select): they contribute nothing and get no gradient, as if cut off. One consequence:
    in the final phase the regulariser no longer sees the pruned rows, which peft's still includes. Unlike peft (issue 745: only added when the model
    output has a `.loss`, so a diffusers UNet trains without it), `penalty()` is always the
    regulariser times orth_reg_weight and the loop adds it.
    """

    def __init__(self, adapters: dict[str, AdaLoRALinear], optimizer: torch.optim.Optimizer | None = None,
                 total_steps: int | None = None, reduce=None, target_r: int = 4, tinit: int | None = None,
                 tfinal: int | None = None, delta_t: int = 10, beta1: float = 0.85, beta2: float = 0.85,
                 orth_reg_weight: float = 0.5):
        super().__init__(adapters, optimizer, total_steps, reduce)
        if not all(isinstance(a, AdaLoRALinear) for a in adapters.values()):
            raise ValueError("AdaLoRA controls AdaLoRALinear adapters only")
        if isinstance(total_steps, bool) or not isinstance(total_steps, int) or total_steps < 1:
            raise ValueError(f"AdaLoRA needs the run's total_steps (an integer >= 1), got {total_steps!r}")
        tinit = total_steps // 10 if tinit is None else tinit
        tfinal = total_steps // 5 if tfinal is None else tfinal
        if not 0 <= tinit < total_steps - tfinal or tfinal < 0:
            raise ValueError(f"tinit={tinit}, tfinal={tfinal}, total_steps={total_steps} leave no budgeting phase "
                             "(need 0 <= tinit < total_steps - tfinal)")
        if not (0 < beta1 < 1 and 0 < beta2 < 1):
            raise ValueError(f"beta1 and beta2 must be in (0, 1), got {beta1}, {beta2}")
        if delta_t < 1 or orth_reg_weight < 0:
            raise ValueError(f"delta_t must be >= 1 and orth_reg_weight >= 0, got {delta_t}, {orth_reg_weight}")
        self.init_budget = sum(a.rank for a in adapters.values())
        self.init_r = max(a.rank for a in adapters.values())
        self.target_r, self.target_budget = target_r, target_r * len(adapters)
        if not 0 <= self.target_budget <= self.init_budget:
            raise ValueError(f"target_r={target_r} must be in 0..init_r (budget {self.init_budget} over "
                             f"{len(adapters)} layers)")
        self.tinit, self.tfinal, self.delta_t = tinit, tfinal, delta_t
        self.beta1, self.beta2, self.orth_reg_weight = beta1, beta2, orth_reg_weight
        self.ema: dict[str, torch.Tensor] = {}  # "{layer}.{A|E|B}.{sensitivity|uncertainty}"
        self.kept = {name: torch.ones(a.rank, dtype=torch.bool) for name, a in adapters.items()}

    def penalty(self) -> torch.Tensor:
        return self.orth_reg_weight * orthogonal_regulariser(self.adapters)

    @torch.no_grad()
    def add_penalty_gradient(self) -> None:
        """penalty()'s gradient added to every A's and B's, for all layers at once: `orthogonal_gradient` of each
        stack of equal shapes (P = A, and P = B^T), times orth_reg_weight over the 2n matrices of the mean."""
        layers = list(self.adapters.values())
        As, Bs = factors_in_use(self.adapters)
        grads = per_shape(orthogonal_gradient, As) + per_shape(lambda B: orthogonal_gradient(B.mT).mT.contiguous(), Bs)
        add_to_grads([a.A for a in layers] + [a.B for a in layers], grads,
                     alpha=self.orth_reg_weight / (2 * len(layers)))

    def update_importance(self) -> None:
        """Eq. 8-9: the EMAs of sensitivity and uncertainty of every entry of A, E, B, for all of them at once
        (torch._foreach_*: one dispatched op per stage, the same values as one tensor at a time)."""
        keys = [(f"{name}.{key}", getattr(a, key)) for name, a in self.adapters.items() for key in ("A", "E", "B")]
        keys = [(key, p) for key, p in keys if p.grad is not None]
        if not keys:
            return
        params = [p for _, p in keys]
        with torch.no_grad():
            ipt = torch._foreach_abs(torch._foreach_mul(params, [p.grad for p in params]))
            sens, unc = ([self.ema[f"{key}.{kind}"] if f"{key}.{kind}" in self.ema else torch.zeros_like(p)
                          for key, p in keys] for kind in ("sensitivity", "uncertainty"))
            sens = torch._foreach_add(torch._foreach_mul(sens, self.beta1), torch._foreach_mul(ipt, 1 - self.beta1))
            spread = torch._foreach_abs(torch._foreach_sub(ipt, sens))
            unc = torch._foreach_add(torch._foreach_mul(unc, self.beta2), torch._foreach_mul(spread, 1 - self.beta2))
        for (key, _), s, u in zip(keys, sens, unc):
            self.ema[f"{key}.sensitivity"], self.ema[f"{key}.uncertainty"] = s, u

    def triplet_scores(self) -> dict[str, torch.Tensor]:
        """Eq. 7: S_i = s(E_i) + mean_j s(A_ji) + mean_k s(B_ik), s = sensitivity * uncertainty."""
        def s(name, key):
            p = getattr(self.adapters[name], key)
            sens = self.ema.get(f"{name}.{key}.sensitivity", torch.zeros_like(p))
            return sens * self.ema.get(f"{name}.{key}.uncertainty", torch.zeros_like(p))
        return {name: s(name, "E") + s(name, "A").mean(0) + s(name, "B").mean(1) for name in self.adapters}

    def mask_to_budget(self, budget: int) -> None:
        """Zero E_i of the (init budget - budget) lowest-scoring triplets over all layers (peft's rule)."""
        scores = self.triplet_scores()
        n_masked = self.init_budget - budget
        if n_masked <= 0:
            return
        threshold = torch.kthvalue(torch.cat([v.double().cpu() for v in scores.values()]), n_masked).values
        with torch.no_grad():
            for name, a in self.adapters.items():
                keep = scores[name].double().cpu() > threshold
                a.E.masked_fill_(~keep.to(a.E.device), 0.0)
                self.kept[name] = keep

    def truncate(self) -> None:
        """Drop every layer's masked triplets from A, E, B and the optimizer's state."""
        for name, a in self.adapters.items():
            index = torch.nonzero(self.kept[name]).flatten()
            a.select(index, self.optimizer)
            self.kept[name] = torch.ones(len(index), dtype=torch.bool)

    def step(self) -> list[dict]:
        step, final = self.last_step, self.total_steps - self.tfinal
        if step > final:
            return []
        if step < final:
            self.update_importance()
        budget, mask = budget_schedule(step, self.init_budget, self.target_budget, self.total_steps,
                                       self.tinit, self.tfinal, self.delta_t)
        if not (mask or step == final):
            return []
        self.mask_to_budget(budget)
        if step == final:
            self.truncate()
            self.ema = {}
        return [{"step": step, "layer": name, "rank": rank, "budget": budget} for name, rank in self.ranks().items()]

    def ranks(self) -> dict[str, int]:
        """Triplets kept by the last masking (all before the first; the final ranks after truncation)."""
        return {name: int(keep.sum()) for name, keep in self.kept.items()}

    def metadata(self) -> dict[str, str]:
        """Settings, and `kept_ranks`: the ranks after masking (a file saved before the final phase holds
        init_r ranks per layer, the masked ones with Lambda entries at zero)."""
        return {**super().metadata(), "init_r": str(self.init_r),
                "target_r": str(self.target_r), "tinit": str(self.tinit), "tfinal": str(self.tfinal),
                "deltaT": str(self.delta_t), "beta1": repr(self.beta1), "beta2": repr(self.beta2),
                "orth_reg_weight": repr(self.orth_reg_weight), "total_steps": str(self.total_steps),
                "kept_ranks": json.dumps(self.ranks())}

    def state(self) -> dict[str, torch.Tensor]:
        return {**{f"ema.{k}": v for k, v in self.ema.items()},
                **{f"kept.{name}": keep.to(torch.uint8) for name, keep in self.kept.items()}}

    def load_state(self, tensors: dict[str, torch.Tensor]) -> None:
        kept = {k[len("kept."):]: v.bool() for k, v in tensors.items() if k.startswith("kept.")}
        if set(kept) != set(self.adapters):
            raise ValueError(f"AdaLoRA state holds masks for {sorted(kept)[:3]}..., expected the layers "
                             f"{sorted(self.adapters)[:3]}...")
        unknown = [k for k in tensors if not k.startswith(("kept.", "ema."))]
        if unknown:
            raise ValueError(f"AdaLoRA state: unexpected tensors {unknown[:5]}")
        ema = {k[len("ema."):]: v for k, v in tensors.items() if k.startswith("ema.")}
        for key, value in ema.items():
            name, param, _ = key.rsplit(".", 2)
            own = getattr(self.adapters[name], param) if name in self.adapters else None
            if own is None or value.shape != own.shape:
                raise ValueError(f"AdaLoRA state 'ema.{key}' of shape {tuple(value.shape)} fits no adapter tensor")
            ema[key] = value.to(own)
        self.kept, self.ema = kept, ema
