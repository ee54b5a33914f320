"""LoRA^2 (Shenaj, Errica, Carta: "Not All Layers Are Created Equal: Adaptive LoRA Ranks for Personalized Image
Generation").

Each layer learns its own rank during fine-tuning by imposing an order of importance on the rank
positions, following the variational adaptive-width networks of Errica et al. (reference code:
nec-research/Adaptive-Width-Neural-Networks, files distribution.py and model.py, which we read and
follow in the points cited below; the LoRA^2 paper itself is not available here, only its abstract):

- Each layer has a rate nu = softplus(rho) > 0 (rho learnable; the reference's `Exponential._rate`)
  of an exponential distribution with cdf F(x) = 1 - exp(-nu x), discretised over rank positions
  i = 0, 1, ...: f(i) = F(i + 1) - F(i), renormalised over the truncated support i < D
  (reference: DiscretizedDistribution.log_prob, compute_probability_vector). Renormalised,
  f = softmax(-nu * [0, 1, .., D-1]): the constant 1 - exp(-nu) cancels. (The reference adds 1e-6
  to every f(i) before renormalising; we do not.)
- The update is B diag(f) A: f(x) = x W0 + b0 + s x A diag(f) B, so rank position i is weighted by
  f(i), which decreases with i: the first ranks matter most. Gradient reaches nu through f.
- The rank is the k-quantile of the distribution, D = ceil(-ln(1 - k) / nu), k = 0.9, recomputed
  after every optimizer step (the reference takes floor(q) + 2 for its widths; we follow the issue's
  ceil). A layer whose D rose grows with new ranks of zero impact: Kaiming-uniform columns of A and
  zero rows of B (as SeLoRA's eq. 2); one whose D fell is truncated to its first D ranks. Either way
  the kept rows of B are rescaled by Z_new / Z_old (Z_D = sum_{i<D} exp(-nu i), the normaliser of
  f) so that the kept ranks contribute exactly what they did: growth leaves the output unchanged,
  truncation removes only the dropped ranks' part. The optimizer's state is resized with the
  parameters (adapters.resize_parameter); the moments of the rescaled rows are kept as they were.
  At a fixed capacity (train.py --compile; the capacity is max_rank) the ranks change in place and f is
  masked beyond D (capacity.FixedLoRA2).
- The prior, added to the loss as the rank penalty (the reference's ELBO, model.py AWN.forward and
  metric.py, divided by its n_observations): a Gaussian N(mu, sigma_nu^2) on each rate and N(0,
  sigma_theta^2) on every entry of A and B,
      penalty = [sum_l (nu_l - mu)^2 / (2 sigma_nu^2) + sum (A^2 + B^2) / (2 sigma_theta^2)] / n_obs.
  A rate pulled up towards mu shrinks the rank; the default mu is the rate of rank 1, so the prior
  prefers small ranks and the data must pay for every rank a layer keeps. The paper's own weights
  are not available here: sigma_nu, sigma_theta, n_obs and mu are documented parameters.
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from methods.adapters import Adapter, Controller, add_to_grads, draw_candidate, lora_factors
from methods.baselines import stacked


def rate_for_rank(rank: int, k: float = 0.9) -> float:
    """A rate nu whose k-quantile rank is `rank`: the middle of the interval where ceil(-ln(1-k)/nu) = rank."""
    return -math.log(1 - k) / (rank - 0.5)


def quantile_rank(rate: float, k: float = 0.9, max_rank: int | None = None) -> int:
    """D = ceil(-ln(1 - k) / nu), at least 1 and at most max_rank."""
    rank = max(1, math.ceil(-math.log(1 - k) / rate))
    return rank if max_rank is None else min(rank, max_rank)


def inverse_softplus(y: float) -> float:
    return y + math.log(-math.expm1(-y))


class LoRA2Linear(Adapter):
    """f(x) = x W0 + b0 + s x A diag(f) B, f = softmax(-nu [0..D-1]), nu = softplus(rho), D = A's columns.

    Starts at rank `rank` with the rate whose 0.9-quantile is that rank (`rate_for_rank`), A
    Kaiming-uniform and B zero, so the layer starts equal to its base. s (default 8, SeLoRA's) is a
    constant buffer; f sums to one, so s plays the role of LoRA's alpha.
    """
    method = "lora2"

    def __init__(self, base: nn.Linear, rank: int = 4, k: float = 0.9, scale: float = 8.0,
                 generator: torch.Generator | None = None):
        super().__init__(base)
        self.A, self.B = lora_factors(base, rank, generator, name="rank")
        self.rho = nn.Parameter(self.A.new_tensor(inverse_softplus(rate_for_rank(rank, k))))
        self.register_buffer("scale", self.A.new_tensor(float(scale)))
        self.step_weights: torch.Tensor | None = None  # f of this training step, set by LoRA2.capture

    @property
    def rate(self) -> torch.Tensor:
        """nu = softplus(rho) > 0."""
        return F.softplus(self.rho)

    def weights(self) -> torch.Tensor:
        """f(i) = F(i + 1) - F(i) over i < D, renormalised: softmax(-nu i)."""
        positions = torch.arange(self.A.shape[1], device=self.A.device, dtype=self.A.dtype)
        return torch.softmax(-self.rate * positions, dim=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        f = self.weights() if self.step_weights is None else self.step_weights
        return y + (self.scale * (((self.factor_input(x) @ self.A) * f) @ self.B)).to(y.dtype).view_as(y)

    def factors(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(A diag(f), B, s): the update s A diag(f) B."""
        return self.A * self.weights(), self.B, self.scale


def rates(layers: list[LoRA2Linear]) -> torch.Tensor:
    """Every layer's nu = softplus(rho) in one op. (Vectorised, softplus rounds some rates 1 ulp away from one
    layer's own `rate`.)"""
    return F.softplus(torch.stack([layer.rho for layer in layers]))


def all_weights(layers: list[LoRA2Linear], nu: torch.Tensor) -> list[torch.Tensor]:
    """Every layer's f (`LoRA2Linear.weights`, at its true rank) from their rates nu (`rates`), as one softmax per
    group of layers of equal rank instead of a few ops per layer: a step dispatches a few dozen ops for them."""
    groups: dict[int, list[int]] = {}
    for i, layer in enumerate(layers):
        groups.setdefault(layer.rank, []).append(i)
    out: list[torch.Tensor] = [nu] * len(layers)
    for rank, members in groups.items():
        positions = torch.arange(rank, device=nu.device, dtype=layers[members[0]].A.dtype)
        group = nu if len(members) == len(layers) else nu[members]
        for i, f in zip(members, torch.softmax(-group[:, None] * positions, dim=1).unbind()):
            out[i] = f
    return out


def normaliser(rate: float, rank: int) -> float:
    """Z_D = sum_{i<D} exp(-nu i), the sum that renormalises f over the truncated support."""
    return sum(math.exp(-rate * i) for i in range(rank))


def resize(layer: LoRA2Linear, rank: int, new_columns: torch.Tensor | None = None,
           optimizer: torch.optim.Optimizer | None = None) -> None:
    """Grow or truncate `layer` to `rank` ranks; the kept ranks' contribution stays the same.

    Growth appends `new_columns` (d_in x (rank - old rank)) to A and zero rows to B; truncation keeps
    the first `rank`. The kept rows of B are multiplied by Z_new / Z_old so that f(i) B_i, which f's
    renormalisation would otherwise change, stays put. The optimizer's state follows the shapes.
    """
    old = layer.rank
    if rank == old:
        return
    kept = min(rank, old)
    rate = float(layer.rate.detach())
    ratio = normaliser(rate, rank) / normaliser(rate, old)
    with torch.no_grad():
        B = layer.B[:kept] * ratio
        A = layer.A[:, :kept]
        if rank > old:
            if new_columns is None or new_columns.shape != (layer.base.in_features, rank - old):
                raise ValueError(f"growing from rank {old} to {rank} needs new A columns of shape "
                                 f"({layer.base.in_features}, {rank - old}), got "
                                 f"{None if new_columns is None else tuple(new_columns.shape)}")
            A = torch.cat([A, new_columns.to(A)], dim=1)
            B = torch.cat([B, B.new_zeros(rank - old, B.shape[1])], dim=0)
    layer.resize({"A": A, "B": B}, optimizer)


def param_groups(adapters: dict[str, LoRA2Linear], lr: float, rate_lr: float) -> list[dict]:
    """Optimizer param groups: A and B at `lr`, the rates (rho) at `rate_lr`.

    With Adam a parameter moves by about its learning rate per step whatever its gradient's size, so
    at a LoRA learning rate (1e-4) a rate would move by ~0.1 in 1000 steps and the ranks would hardly
    change; give the rates a learning rate of their own (the reference code uses one learning rate for
    everything, on networks trained at 1e-3 to 1e-2). Pass the groups to the optimizer's constructor.
    """
    rates = [a.rho for a in adapters.values()]
    factors = [p for a in adapters.values() for p in (a.A, a.B)]
    return [{"params": factors, "lr": lr}, {"params": rates, "lr": rate_lr}]


class LoRA2(Controller):
    """After every optimizer step, sets each layer's rank to the k-quantile of its distribution; the prior
    is the penalty. Stateless: ranks follow from the rates, which are saved with the adapters, and new
    columns of A are drawn from (seed, step, layer, rank position) (adapters.draw_candidate).

    k: the quantile (0.9). max_rank: a cap on every layer's rank (also min(d_in, d_out)).
    rate_prior_mean (mu, default: rate_for_rank(1, k) = 2 ln 10 ~ 4.61), rate_prior_scale (sigma_nu, 1),
    weight_prior_scale (sigma_theta, 1: the reference's theta_prior_scale), n_obs (1000: the reference
    divides the log prior by its training-set size).
    """

    def __init__(self, adapters: dict[str, LoRA2Linear], optimizer: torch.optim.Optimizer | None = None,
                 total_steps: int | None = None, reduce=None, k: float = 0.9, max_rank: int = 32,
                 rate_prior_mean: float | None = None, rate_prior_scale: float = 1.0,
                 weight_prior_scale: float = 1.0, n_obs: float = 1000.0, seed: int = 0):
        super().__init__(adapters, optimizer, total_steps, reduce)
        if not all(isinstance(a, LoRA2Linear) for a in adapters.values()):
            raise ValueError("LoRA2 controls LoRA2Linear adapters only")
        if not 0 < k < 1:
            raise ValueError(f"k (the quantile) must be in (0, 1), got {k}")
        if max_rank < 1 or rate_prior_scale <= 0 or weight_prior_scale <= 0 or n_obs <= 0:
            raise ValueError(f"need max_rank >= 1 and positive prior scales and n_obs, got {max_rank}, "
                             f"{rate_prior_scale}, {weight_prior_scale}, {n_obs}")
        self.k, self.max_rank, self.seed = k, max_rank, seed
        self.rate_prior_mean = rate_for_rank(1, k) if rate_prior_mean is None else rate_prior_mean
        self.rate_prior_scale, self.weight_prior_scale, self.n_obs = rate_prior_scale, weight_prior_scale, n_obs
        self.step_rates: torch.Tensor | None = None  # inside capture: the rates of the step's forward

    @contextmanager
    def capture(self, step: int, batch_size: int) -> Iterator[None]:
        """Every layer's f for this step's forward and backward, computed for all layers at once (`all_weights`).
        At a fixed capacity (train.py --compile) each layer computes its own, which the compiler fuses."""
        self.last_step = step
        layers = list(self.adapters.values())
        if any(getattr(layer, "capacity", None) for layer in layers):  # capacity.FixedCapacity
            yield
            return
        self.step_rates = rates(layers)
        for layer, f in zip(layers, all_weights(layers, self.step_rates)):
            layer.step_weights = f
        try:
            yield
        finally:
            self.step_rates = None
            for layer in layers:
                layer.step_weights = None

    def rates(self) -> torch.Tensor:
        """Every layer's nu: inside capture the step's (those of the forward), else computed (`rates`)."""
        return rates(list(self.adapters.values())) if self.step_rates is None else self.step_rates

    def penalty(self) -> torch.Tensor:
        """The negative log prior over n_obs (constants dropped): Gaussian on each rate and on A, B. The squares of
        factors of equal shape are summed stacked (baselines.stacked): the same gradients as one at a time. Inside
        capture, the rates are the step's (those of the forward)."""
        layers = list(self.adapters.values())
        factors = [a.A for a in layers] + [a.B for a in layers]  # ranks not in use (fast/capacity.py) are zero
        weights = sum(X.square().sum() for X in stacked(factors))
        nu = self.rates()
        rate_term = (nu - self.rate_prior_mean).square().sum() / (2 * self.rate_prior_scale ** 2)
        return (rate_term + weights / (2 * self.weight_prior_scale ** 2)) / self.n_obs

    @torch.no_grad()
    def add_penalty_gradient(self) -> None:
        """penalty()'s gradient added to every A's, B's and rho's, for all layers at once, in closed form: the
        weights' Gaussian gives A / (sigma_theta^2 n_obs) (one op for all A and B), the rates' gives
        (nu - mu) / sigma_nu^2 * sigmoid(rho) / n_obs (d softplus(rho) / d rho = sigmoid(rho) = 1 - exp(-nu))."""
        layers = list(self.adapters.values())
        factors = [a.A for a in layers] + [a.B for a in layers]
        add_to_grads(factors, factors, alpha=1 / (self.weight_prior_scale ** 2 * self.n_obs))
        nu = self.rates()
        d_rho = (nu - self.rate_prior_mean) * -torch.expm1(-nu)
        add_to_grads([a.rho for a in layers], list(d_rho.unbind()), alpha=1 / (self.rate_prior_scale ** 2 * self.n_obs))

    def capacity(self, name: str) -> int:
        layer = self.adapters[name]
        return min(self.max_rank, layer.base.in_features, layer.base.out_features)

    def step(self) -> list[dict]:
        events = []
        with torch.no_grad():
            nu = rates(list(self.adapters.values())).cpu().numpy().tolist()  # numpy: no op per element
        for (name, layer), rate in zip(self.adapters.items(), nu):
            old, rank = layer.rank, quantile_rank(rate, self.k, self.capacity(name))
            if rank == old:
                continue
            columns = None
            if rank > old:
                columns = torch.cat([draw_candidate(layer.base.in_features, self.seed, self.last_step, f"{name}#{i}")
                                     for i in range(old, rank)], dim=1)
            resize(layer, rank, columns, self.optimizer)
            events.append({"step": self.last_step, "layer": name, "rank": rank, "previous": old,
                           "rate": rate, **({"reached_max_rank": True}
                                                                  if rank == self.capacity(name) else {})})
        return events

    def metadata(self) -> dict[str, str]:
        return {**super().metadata(), "k": repr(self.k), "max_rank": str(self.max_rank), "seed": str(self.seed),
                "rate_prior_mean": repr(self.rate_prior_mean), "rate_prior_scale": repr(self.rate_prior_scale),
                "weight_prior_scale": repr(self.weight_prior_scale), "n_obs": repr(self.n_obs)}
