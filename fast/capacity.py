"""Fixed capacity (train.py --compile): adapters whose factors keep one shape while their ranks change.

A compiled model is specialised to its tensors' shapes, so a method whose ranks change would recompile it at every
change. `fix_capacity` stores each adapter's factors at the most ranks its method can give that layer
(`adapters.Controller.capacity`), the first `rank` of them in use and the rest zero: a zero column of A and a zero
row of B contribute exact zeros to x A B (in SeLoRA's blocks of 8 too, `selora.SeLoRALinear.low_rank`) and get zero
gradients, so with zero optimizer moments they stay zero, and the forward computes what the true-rank factors would.

It does so by turning each adapter into a `FixedCapacity` of its own class (a subclass made here), which changes
only what a stored capacity changes: `rank` is the ranks in use; a change of rank writes values in place
(`resize` and `select` by `write_ranks`), with no change of shape; `factors()` and the saved state (`state_dict`,
hence adapters.save_adapters and trainable_count) are those of the ranks in use, so saved files, exports, rank
heatmaps and the methods' own statistics are those of a run without a capacity, and checkpoints save the optimizer's
state where it is in use (`in_use`). The forward reads the whole storage: the adapters' own forwards do so already
(their zero ranks add nothing), except DyLoRA's and LoRA^2's, whose rank in use must be a tensor for the compiled
forward to read it without being specialised to its value (`FixedDyLoRA`, `FixedLoRA2`: the `active` buffer).
"""
from __future__ import annotations

import math

import torch
from torch import nn

from methods.adapters import Adapter, Controller, optimizer_moments, resize_parameter
from methods.baselines import DyLoRALinear
from methods.lora2 import LoRA2Linear


class FixedCapacity(Adapter):
    """An adapter whose factors (every key of `rank_dims`) hold `capacity` ranks, of which the first `rank` are in
    use; the rest are zero. `active`, a buffer, holds how many leading ranks the forward uses (`rank`, or DyLoRA's
    b), so that a compiled forward reads it as a tensor and is not specialised to its value. Made by
    `fix_capacity`, placed before the adapter's own class."""
    capacity: int

    @property
    def rank(self) -> int:
        return self._rank

    def factors(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The adapter's own factors (A_eff, B_eff, s) at the ranks in use."""
        A, B, scale = super().factors()
        return A[:, :self._rank], B[:self._rank], scale

    def resize(self, factors: dict[str, torch.Tensor], optimizer: torch.optim.Optimizer | None = None) -> None:
        """Adapter.resize in place: the values fill the first ranks of the storage (`write_ranks`), the optimizer's
        moments of the leading ranks kept and those of new ranks zero."""
        rank = factors["A"].shape[1]
        if rank > self.capacity:
            raise ValueError(f"rank {rank} is above the capacity {self.capacity}")
        kept = torch.arange(min(rank, self._rank))
        for key, value in factors.items():
            write_ranks(getattr(self, key), self.rank_dims[key], value, kept, optimizer)
        self._set_rank(rank)

    def select(self, index: torch.Tensor, optimizer: torch.optim.Optimizer | None = None) -> None:
        """Adapter.select in place: the ranks `index`, with their moments, moved to the first ranks of the storage."""
        index = torch.as_tensor(index, dtype=torch.long)
        for key, dim in self.rank_dims.items():
            param = getattr(self, key)
            write_ranks(param, dim, param.narrow(dim, 0, self._rank).index_select(dim, index.to(param.device)),
                        index, optimizer)
        self._set_rank(len(index))

    def _set_rank(self, rank: int) -> None:
        self._rank = rank
        self.active.fill_(rank)

    def _save_to_state_dict(self, destination: dict, prefix: str, keep_vars: bool) -> None:
        """The state of a run without a capacity: the factors at the ranks in use (views of the storage)."""
        super()._save_to_state_dict(destination, prefix, keep_vars)
        for key, dim in self.rank_dims.items():
            destination[prefix + key] = destination[prefix + key].narrow(dim, 0, self._rank)


class FixedDyLoRA(FixedCapacity, DyLoRALinear):
    """DyLoRA at a fixed capacity (the capacity is r): the forward does not slice. b is the `active` buffer, A's
    columns from b on are masked to zero (so those ranks contribute nothing and get no gradient, as when sliced
    away) and the frozen ranks are chosen by position, all at fixed shapes."""

    def set_rank(self, b: int | None) -> None:
        super().set_rank(b)
        self.active.fill_(self.rank if b is None else b)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        return y + self.masked_update(x).to(y.dtype).view_as(y)

    def masked_update(self, x: torch.Tensor) -> torch.Tensor:
        """The forward's (alpha / b) x A[:, :b] B[:b] at fixed shapes, b the `active` buffer (see the class), in
        rows [N, d_out]."""
        position = torch.arange(self.A.shape[1], device=self.A.device)
        b = self.active
        A = self.A * (position < b).to(self.A.dtype)
        B = self.B
        if self.mode == "frozen" and self.training:
            frozen = position < b - 1
            A, B = torch.where(frozen, A.detach(), A), torch.where(frozen[:, None], B.detach(), B)
        return (self.alpha / b) * ((self.factor_input(x) @ A) @ B)


class FixedLoRA2(FixedCapacity, LoRA2Linear):
    """LoRA^2 at a fixed capacity (the capacity is max_rank): f is a softmax over the capacity's positions with those
    from D (the `active` buffer) on masked out, which is f over D positions followed by zeros."""

    def weights(self) -> torch.Tensor:
        positions = torch.arange(self.A.shape[1], device=self.A.device, dtype=self.A.dtype)
        logits = (-self.rate * positions).masked_fill(positions >= self.active, -math.inf)
        return torch.softmax(logits, dim=0)


FIXED: dict[type, type] = {DyLoRALinear: FixedDyLoRA, LoRA2Linear: FixedLoRA2}  # the adapter's class: its FixedCapacity


def fixed_class(cls: type) -> type:
    """The FixedCapacity of adapter class `cls` (made once: FixedCapacity placed before `cls`)."""
    if cls not in FIXED:
        FIXED[cls] = type(f"Fixed{cls.__name__}", (FixedCapacity, cls), {"__module__": __name__})
    return FIXED[cls]


def fix_adapter(adapter: Adapter, capacity: int, optimizer: torch.optim.Optimizer | None = None) -> None:
    """Store the adapter's factors at `capacity` ranks from now on: zero-padded, with zero optimizer moments for the
    padding (adapters.resize_parameter), and make it a FixedCapacity. The adapter computes what it did."""
    if isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < adapter.rank:
        raise ValueError(f"capacity must be an integer >= the rank {adapter.rank}, got {capacity!r}")
    if isinstance(adapter, FixedCapacity):
        raise ValueError(f"the capacity is fixed already ({adapter.capacity})")
    rank = adapter.rank
    for key, dim in adapter.rank_dims.items():
        param = getattr(adapter, key)
        padding = list(param.shape)
        padding[dim] = capacity - rank
        resize_parameter(param, torch.cat([param.detach(), param.new_zeros(padding)], dim), optimizer)
    adapter.__class__ = fixed_class(type(adapter))
    adapter.capacity, adapter._rank = capacity, rank
    adapter.register_buffer("active", torch.tensor(rank, device=adapter.A.device), persistent=False)


def fix_capacity(controller: Controller, optimizer: torch.optim.Optimizer | None = None) -> None:
    """Store every adapter's factors at the most ranks its method can give it (`Controller.capacity`), so that
    their shapes never change again (train.py --compile); see the module's docstring."""
    for name, adapter in controller.adapters.items():
        capacity = controller.capacity(name)
        if capacity is None:
            raise ValueError(f"{type(controller).__name__} sets no maximum rank, so layer '{name}' cannot be stored "
                             "at a fixed capacity: give it one (--max-rank)")
        fix_adapter(adapter, capacity, optimizer)


def write_ranks(param: nn.Parameter, dim: int, data: torch.Tensor, kept: torch.Tensor,
                optimizer: torch.optim.Optimizer | None = None) -> None:
    """`resize_parameter` and `select_parameter` for a factor stored at a fixed capacity along `dim`: in place,
    its first data.shape[dim] slices become `data` and the rest zero; every optimizer state tensor shaped
    like it takes the moments of the old slices `kept` in its first len(kept) positions, zero elsewhere
    (scalar state, such as Adam's step, is kept). The stale gradient is dropped, as there."""
    kept = kept.to(param.device)
    for key, value in optimizer_moments(param, optimizer).items():
        moved = optimizer.state[param][key] = torch.zeros_like(value)
        moved.narrow(dim, 0, len(kept)).copy_(value.index_select(dim, kept))
    rank = data.shape[dim]
    with torch.no_grad():  # the leading part first: `data` may be a view of it (a truncation)
        param.narrow(dim, 0, rank).copy_(data)
        param.narrow(dim, rank, param.shape[dim] - rank).zero_()
    param.grad = None


def in_use(adapters: dict[str, Adapter]) -> dict[nn.Parameter, tuple[int, int]]:
    """{factor: (rank dimension, rank)} for every factor stored at a fixed capacity: which part of it, and of
    its optimizer state, is in use (what checkpoints save)."""
    return {getattr(a, key): (dim, a.rank) for a in adapters.values() if isinstance(a, FixedCapacity)
            for key, dim in a.rank_dims.items()}
