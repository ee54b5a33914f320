"""What every low-rank adapter method shares, on nn.Linear layers.

Every method (SeLoRA in selora.py; LoRA, DyLoRA, AdaLoRA in methods/baselines.py; LoRA^2 in methods/lora2.py) is
- an `Adapter`: a module holding a frozen nn.Linear `base` (W0, b0) and trainable low-rank factors named as in
  the SeLoRA paper (eq. 1): A in R^{d_in x r} and B in R^{r x d_out}, so that the update of W0 is A B (applied
  as x A B). `factors()` gives the update as (A_eff, B_eff, s), the method's own weighting of its ranks folded
  into A_eff, so exporting it never needs a dense matrix; `delta_weight()` is (s A_eff B_eff)^T in nn.Linear's
  [d_out, d_in] layout, so merging is one addition;
- plus a `Controller`, which a training loop drives the same way for every method.
New factors start as LoRA's (`lora_factors`: A Kaiming-uniform, B zero), new ranks' columns from
`draw_candidate`.

This module also puts adapters into a model (`inject`), counts parameters (`trainable_fraction`), keeps an
optimizer consistent when a parameter changes shape (`resize_parameter`, `select_parameter`), saves and
loads adapters of any rank (`save_adapters`, `load_adapters`) and folds them into plain nn.Linear layers
(`merge`).

Fixed capacity (train.py --compile), factors stored at more ranks than are in use so that their shapes never
change, is a layer on top of this module, in the fast path: fast/capacity.py (`fix_capacity`).
"""
from __future__ import annotations

import json
import math
import os
import zlib
from contextlib import nullcontext
from fnmatch import fnmatchcase
from typing import Callable, ContextManager

import numpy as np
import torch
from torch import nn

from model import weights


class Adapter(nn.Module):
    """Base of every adapter: a frozen `base` nn.Linear plus trainable factors A (d_in x r) and B (r x d_out).

    Subclasses set `method` (the name written into saved files), create `self.A` and `self.B`, and define
    `forward` and `factors`. Anything else the forward depends on (a scale, a mask) should be a
    buffer, so that `save_adapters` stores it and `load_adapters` restores it. `rank_dims` names every
    tensor indexed by rank and its rank dimension (AdaLoRA adds its E).
    """
    method = "adapter"
    rank_dims = {"A": 1, "B": 0}

    def __init__(self, base: nn.Linear):
        super().__init__()
        if not isinstance(base, nn.Linear):
            raise TypeError(f"{type(self).__name__} wraps an nn.Linear, got {type(base).__name__}")
        self.base = base.requires_grad_(False)

    @property
    def rank(self) -> int:
        return self.A.shape[1]

    def factor_input(self, x: torch.Tensor) -> torch.Tensor:
        """x for the low-rank product: as rows [N, d_in] (the product of [b, n, d_in] with A would reshape to rows
        and back around each factor, 4 more dispatched ops per layer and step for the same products; the forward
        gives its update y's shape once, `view_as`), in the factors' dtype (fp32). Under autocast the dtype is
        left alone, since autocast casts the product's inputs itself: a cast to fp32 would copy every activation
        twice (to fp32, then back to bf16 inside the matmul, bf16 -> fp32 -> bf16 being exact) and twice more in
        the backward, for the same product."""
        x = x.reshape(-1, x.shape[-1])
        return x if torch.is_autocast_enabled(x.device.type) else x.to(self.A.dtype)

    def resize(self, factors: dict[str, torch.Tensor], optimizer: torch.optim.Optimizer | None = None) -> None:
        """Give the factors (every key of `rank_dims`) new values at a new rank, the optimizer's moments of the
        leading ranks kept and those of new ranks zero (`resize_parameter`)."""
        for key, value in factors.items():
            resize_parameter(getattr(self, key), value, optimizer)

    def select(self, index: torch.Tensor, optimizer: torch.optim.Optimizer | None = None) -> None:
        """Keep only the ranks `index` (in that order) of every factor, with their optimizer moments
        (`select_parameter`)."""
        for key, dim in self.rank_dims.items():
            select_parameter(getattr(self, key), dim, index, optimizer)

    def factors(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(A_eff [d_in, r], B_eff [r, d_out], s): the update of W0 is s A_eff B_eff (in x A B layout), with
        whatever weights the method puts on its ranks (AdaLoRA's E, LoRA^2's f) folded into A_eff."""
        raise NotImplementedError

    def delta_weight(self) -> torch.Tensor:
        """The dense update of W0 in nn.Linear's [d_out, d_in] layout: (s A_eff B_eff)^T."""
        A, B, scale = self.factors()
        return (scale * (A @ B)).T

    def extra_repr(self) -> str:
        return f"d_in={self.base.in_features}, d_out={self.base.out_features}, rank={self.rank}"


class Controller:
    """What a training loop calls around every step, the same for every method; by itself LoRA's (no-op).

        controller = Method(adapters, optimizer, total_steps)
        for step, batch in enumerate(loader, start=1):
            with controller.capture(step, batch_size=len(batch)):          # SeLoRA's hooks, DyLoRA's b
                loss = mse(model(batch), target)
                optimizer.zero_grad()
                loss.backward()
                controller.add_penalty_gradient()                          # AdaLoRA's, LoRA^2's regulariser
            controller.after_backward()                                    # SeLoRA's FI-scores
            optimizer.step()
            events = controller.step()                                     # ranks grow, shrink, get masked

    capture(step, batch_size): context manager around forward and backward of step `step` (from 1).
    after_backward(): after them, before optimizer.step(), what the method reads from this step's backward at the
    weights it ran at (SeLoRA's test step: each layer's FI-scores). Nothing here.
    penalty(): the method's term of the loss (AdaLoRA's, LoRA^2's regulariser; zero here), a differentiable scalar:
    its definition. add_penalty_gradient(): after the loss's backward, adds penalty()'s gradient to the adapters'
    gradients, as `(loss + penalty()).backward()` would, but in a few batched ops (through autograd: an op per
    parameter at least, which a step bound by kernel launches pays in time, docs/performance.md). Nothing here.
    step(): after optimizer.step(); returns log events, dicts with at least "step", "layer", "rank".
    metadata(): settings written into saved adapter files.
    state() / load_state(tensors): what an exact resume needs besides adapters and optimizer (none here).
    ranks(): every layer's current rank, the same format for every method (for rank heatmaps).
    capacity(name), needs_uncompiled(step): what a compiled run needs to know (train.py --compile).
    second_pass(step): whether the loop runs the same batch forward and backward again after optimizer.step(),
    inside capture(step) and followed by after_backward(), before step() (SeLoRA's script rule, methods/selora_script.py);
    False here.
    reduce(tensors): the tensors summed over the processes of a data-parallel run (the identity by default), for a
    controller that decides from its process's part of the batch (SeLoRA's fast test step), so all decide alike.
    """

    def __init__(self, adapters: dict[str, Adapter], optimizer: torch.optim.Optimizer | None = None,
                 total_steps: int | None = None, reduce: Callable[[list[torch.Tensor]], list[torch.Tensor]] | None = None):
        if not adapters:
            raise ValueError("adapters must be a non-empty dict of adapters (from adapters.inject)")
        self.adapters, self.optimizer, self.total_steps = adapters, optimizer, total_steps
        self.reduce = reduce or (lambda tensors: tensors)
        self.last_step = 0

    def capture(self, step: int, batch_size: int) -> ContextManager[None]:
        self.last_step = step
        return nullcontext()

    def penalty(self) -> torch.Tensor:
        return next(iter(self.adapters.values())).A.new_zeros(())

    def add_penalty_gradient(self) -> None:
        pass

    def after_backward(self) -> None:
        pass

    def step(self) -> list[dict]:
        return []

    def metadata(self) -> dict[str, str]:
        return {"step": str(self.last_step)}

    def state(self) -> dict[str, torch.Tensor]:
        return {}

    def load_state(self, tensors: dict[str, torch.Tensor]) -> None:
        if tensors:
            raise ValueError(f"{type(self).__name__} keeps no state, got tensors {sorted(tensors)[:5]}")

    def ranks(self) -> dict[str, int]:
        return {name: a.rank for name, a in self.adapters.items()}

    def capacity(self, name: str) -> int | None:
        """The most ranks layer `name` can have under this method (None: no limit), at which `fix_capacity`
        stores its factors; a method whose ranks never grow: the rank it has."""
        return self.adapters[name].rank

    def second_pass(self, step: int) -> bool:
        return False

    def needs_uncompiled(self, step: int) -> bool:
        """Whether capture(step) needs the uncompiled modules, which the training step then runs
        (diffusion.train_step): SeLoRA's first fast test step, whose probes make tensors in the forward that a
        compiled model cannot (fast.probe.Probe)."""
        return False


def add_to_grads(params: list[torch.Tensor], grads: list[torch.Tensor], alpha: float = 1.0) -> None:
    """p.grad += alpha * grad for every parameter p, in one op (`torch._foreach_add_`); a parameter without a gradient
    gets a zero one first. A grad smaller than its parameter goes to the parameter's leading part (fast/capacity.py stores
    factors beyond the ranks in use)."""
    targets = []
    for p, g in zip(params, grads):
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        targets.append(p.grad if g.shape == p.shape else p.grad[tuple(slice(0, n) for n in g.shape)])
    torch._foreach_add_(targets, grads, alpha=alpha)


def kaiming_uniform(d_in: int, n: int, generator: torch.Generator | None = None, a: float = 0.0) -> torch.Tensor:
    """A [d_in, n] matrix drawn Kaiming-uniform with fan_in = d_in: U(-b, b), b = sqrt(6 / ((1 + a^2) d_in)).

    fan_in is given explicitly because torch's `nn.init.kaiming_uniform_` would take it from dimension 1,
    which for A (d_in x r) is r. The default a = 0 is torch's default gain sqrt(2), as the SeLoRA authors'
    script calls it on their A (stored r x d_in, so there fan_in = d_in too); peft's LoRA uses a = sqrt(5).
    Drawn on the CPU in float32 so that a seeded generator gives the same numbers on every device, whatever
    torch's default dtype is.
    """
    bound = math.sqrt(6.0 / ((1.0 + a * a) * d_in))
    return torch.empty(d_in, n, dtype=torch.float32).uniform_(-bound, bound, generator=generator)


def draw_candidate(d_in: int, seed: int, step: int, name: str) -> torch.Tensor:
    """A new column of A (d_in x 1) for layer `name` at `step`, Kaiming-uniform: SeLoRA's candidate K (eq. 2),
    LoRA^2's grown ranks.

    Drawn from a generator seeded by (seed, step, layer name), so a run's growth is reproducible, and a
    resumed run, or another process of a data-parallel run, draws the same column without any generator state.
    """
    key = int(np.random.SeedSequence([seed, step, zlib.crc32(name.encode())]).generate_state(1, np.uint64)[0])
    return kaiming_uniform(d_in, 1, torch.Generator().manual_seed(key))


def factor_dtype(base: nn.Linear) -> tuple[torch.device, torch.dtype]:
    """Device and dtype for an adapter's factors: the base layer's, but at least float32 (fp16 factors
    would lose small updates)."""
    dtype = base.weight.dtype
    return base.weight.device, dtype if dtype.is_floating_point and dtype.itemsize >= 4 else torch.float32


def lora_factors(base: nn.Linear, r: int, generator: torch.Generator | None = None,
                 name: str = "r") -> tuple[nn.Parameter, nn.Parameter]:
    """LoRA's start: A (d_in x r) Kaiming-uniform (`adapters.kaiming_uniform`), B (r x d_out) zero, so the
    update A B is zero and the adapted layer starts equal to its base."""
    if isinstance(r, bool) or not isinstance(r, int) or r < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {r!r}")
    dev, dtype = factor_dtype(base)
    return (nn.Parameter(kaiming_uniform(base.in_features, r, generator).to(dev, dtype)),
            nn.Parameter(torch.zeros(r, base.out_features, device=dev, dtype=dtype)))


def matches(name: str, pattern: str) -> bool:
    """True when the glob `pattern` matches the qualified name `name` or one of its dotted suffixes.

    `to_q` matches `down.0.attn1.to_q`; `attn2.to_*` matches only the cross-attention projections;
    `*` also crosses dots, so `down.*.ff.*` works.
    """
    return fnmatchcase(name, pattern) or fnmatchcase(name, "*." + pattern)


def _is_adapter_base(model: nn.Module, name: str) -> bool:
    parent = name.rpartition(".")[0]
    return name.endswith(".base") and isinstance(model.get_submodule(parent), Adapter)


def _freeze_all_but_adapters(model: nn.Module) -> None:
    trainable = {id(p) for m in model.modules() if isinstance(m, Adapter)
                 for name, p in m.named_parameters() if not name.startswith("base.")}
    for p in model.parameters():
        if id(p) not in trainable:
            p.requires_grad_(False)


def _wrap(model: nn.Module, names: list[str], make_adapter: Callable[[nn.Linear], Adapter]) -> dict[str, Adapter]:
    """Replace the nn.Linear at each qualified name by make_adapter(it); freeze all but the adapters."""
    _freeze_all_but_adapters(model)
    adapters = {}
    for name in names:
        if not name:
            raise ValueError("the model itself is an nn.Linear: wrap a module that contains linear layers")
        parent_name, _, attr = name.rpartition(".")
        try:
            base = model.get_submodule(name)
        except AttributeError:
            raise ValueError(f"{type(model).__name__} has no layer '{name}'") from None
        if not isinstance(base, nn.Linear):
            raise ValueError(f"layer '{name}' is a {type(base).__name__}, expected a plain nn.Linear")
        adapter = make_adapter(base)
        if not isinstance(adapter, Adapter):
            raise TypeError(f"make_adapter returned a {type(adapter).__name__} for '{name}', not an Adapter")
        setattr(model.get_submodule(parent_name), attr, adapter)
        adapters[name] = adapter
    return adapters


def inject(model: nn.Module, make_adapter: Callable[[nn.Linear], Adapter],
           targets: list[str] | None = None) -> dict[str, Adapter]:
    """Wrap nn.Linear layers of `model` in adapters, freeze the model, and return the adapters by name.

    Every nn.Linear is wrapped (the SeLoRA paper's setting, section 3.5), or, with `targets`, those whose
    qualified names match one of the glob patterns (see `matches`). A pattern that matches no linear
    layer is an error: a typo must not silently train nothing. Linear layers already inside an adapter
    are never wrapped twice. The model is modified in place.
    """
    linears = [name for name, m in model.named_modules()
               if isinstance(m, nn.Linear) and not _is_adapter_base(model, name)]
    if targets is not None:
        if isinstance(targets, str):
            raise TypeError(f"targets must be a list of patterns, got the string {targets!r}")
        for pattern in targets:
            if not any(matches(name, pattern) for name in linears):
                shown = ", ".join(linears[:8]) + (", ..." if len(linears) > 8 else "")
                raise ValueError(f"target pattern {pattern!r} matches no nn.Linear of {type(model).__name__} "
                                 f"({len(linears)} linear layers: {shown or 'none'})")
        linears = [name for name in linears if any(matches(name, p) for p in targets)]
    return _wrap(model, linears, make_adapter)


def trainable_fraction(model: nn.Module) -> tuple[int, int, float]:
    """(trainable parameters, all parameters, trainable as a percent of all), adapters included in 'all'.

    This is the figure the SeLoRA paper reports (0.121 % of the text encoder, 0.368 % of the UNet, section 4).
    """
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, total, 100.0 * trainable / total if total else 0.0


def optimizer_moments(param: nn.Parameter, optimizer: torch.optim.Optimizer | None) -> dict[str, torch.Tensor]:
    """The optimizer's state tensors of `param` by key, those shaped like it (Adam's and AdamW's exp_avg, exp_avg_sq,
    max_exp_avg_sq; SGD's momentum_buffer): what must change shape with it. Scalar state (Adam's `step`) is left out;
    none without an optimizer or before its first step. Refuses a parameter the optimizer does not hold, and state
    of another shape (an optimizer that is not element-wise)."""
    if optimizer is None:
        return {}
    if not any(p is param for group in optimizer.param_groups for p in group["params"]):
        raise ValueError(f"the {tuple(param.shape)} parameter being resized is not in the optimizer's param groups")
    moments = {key: value for key, value in optimizer.state.get(param, {}).items()
               if torch.is_tensor(value) and value.dim() > 0}
    for key, value in moments.items():
        if value.shape != param.shape:
            raise ValueError(f"optimizer state '{key}' has shape {tuple(value.shape)}, not the parameter's "
                             f"{tuple(param.shape)}: {type(optimizer).__name__} is not element-wise and "
                             "cannot be resized")
    return moments


def resize_parameter(param: nn.Parameter, data: torch.Tensor, optimizer: torch.optim.Optimizer | None = None) -> None:
    """Give `param` new values of a new shape, in place, and resize its optimizer state to match.

    The Parameter object stays the same, so it stays in its param group (same learning rate, weight
    decay) and the optimizer's state stays keyed by it: nothing stale is left behind. Every state tensor
    shaped like the parameter (`optimizer_moments`) keeps its values where the old and new shapes overlap (the
    leading block) and is zero elsewhere; scalar state (Adam's `step`, hence its bias correction) is kept. So a
    grown tensor trains on exactly as if the optimizer had always held the larger shape with zero moments for the
    new entries, and a truncated one keeps the moments of the entries it keeps. The stale gradient, of the
    old shape, is dropped.
    """
    if data.dim() != param.dim():
        raise ValueError(f"cannot resize a {tuple(param.shape)} parameter to {tuple(data.shape)}: "
                         "the number of dimensions must stay the same")
    overlap = tuple(slice(0, min(a, b)) for a, b in zip(param.shape, data.shape))
    for key, value in optimizer_moments(param, optimizer).items():
        resized = optimizer.state[param][key] = value.new_zeros(data.shape)
        resized[overlap] = value[overlap]
    # Autograd keeps one gradient accumulator per leaf, alive as long as any graph that used the leaf is (a loop
    # that still holds the previous step's `loss` keeps it), and it remembers the leaf's old shape: backward through
    # the resized leaf would then fail. Assigning `.data` resets it only when the dtype or device changes, so the
    # new values are assigned through another dtype first.
    data = data.to(device=param.device, dtype=param.dtype)
    param.data = data.to(torch.float64 if data.dtype != torch.float64 else torch.float32)
    param.data = data
    param.grad = None


def select_parameter(param: nn.Parameter, dim: int, index: torch.Tensor,
                     optimizer: torch.optim.Optimizer | None = None) -> None:
    """Keep only the slices `index` of `param` along `dim`, in place, with the matching optimizer state: for pruning
    ranks that are not the trailing ones (AdaLoRA keeps its most important triplets, wherever they are), otherwise
    as `resize_parameter`, the moments those of the kept slices."""
    index = torch.as_tensor(index, dtype=torch.long, device=param.device)
    for key, value in optimizer_moments(param, optimizer).items():
        optimizer.state[param][key] = value.index_select(dim, index)
    resize_parameter(param, param.data.index_select(dim, index))  # the values alone: the moments are done


def trainable_count(adapters: dict[str, Adapter]) -> int:
    """The adapters' trainable parameters, as their state holds them (at a fixed capacity, the ranks in use)."""
    return sum(v.numel() for a in adapters.values() for v in a.state_dict(keep_vars=True).values() if v.requires_grad)


def _own_tensors(adapter: Adapter) -> dict[str, torch.Tensor]:
    """The adapter's parameters and persistent buffers, without those of its frozen base layer."""
    return {k: v for k, v in adapter.state_dict().items() if not k.startswith("base.")}


def save_adapters(adapters: dict[str, Adapter], path: str | os.PathLike, metadata: dict[str, str] | None = None) -> None:
    """Write every adapter's own tensors as `{layer}.{tensor}` to a safetensors file, atomically.

    The metadata holds the method, every layer's rank (JSON, in `ranks`) and the caller's strings
    (for SeLoRA: lambda, t, step, the base model's name).
    """
    metadata = dict(metadata or {})
    for reserved in ("method", "ranks"):
        if reserved in metadata:
            raise ValueError(f"{path}: metadata key '{reserved}' is written by save_adapters itself")
    methods = {a.method for a in adapters.values()}
    if len(methods) != 1:
        raise ValueError(f"{path}: expected adapters of one method, got {sorted(methods) or 'none'}")
    tensors = {f"{name}.{key}": value for name, a in adapters.items() for key, value in _own_tensors(a).items()}
    metadata["method"] = methods.pop()
    metadata["ranks"] = json.dumps({name: a.rank for name, a in adapters.items()})
    weights.save_file(tensors, path, metadata)


def load_adapters(model: nn.Module, path: str | os.PathLike,
                  make_adapter: Callable[[nn.Linear], Adapter]) -> tuple[dict[str, Adapter], dict[str, str]]:
    """Wrap the layers named in a `save_adapters` file with make_adapter(base) and load their tensors.

    Each adapter takes the shapes in the file, so layers of any rank come back as saved; the ranks in
    the metadata are checked against them. `make_adapter` says which method to build (this module knows
    no method by name); its method must be the file's. Returns (adapters by name, the file's metadata).
    """
    metadata = weights.load_metadata(path)
    if "ranks" not in metadata or "method" not in metadata:
        raise ValueError(f"{path}: no 'ranks'/'method' metadata: not an adapter file written by save_adapters")
    ranks = json.loads(metadata["ranks"])
    tensors = weights.load_file(path)
    adapters = _wrap(model, list(ranks), make_adapter)
    unexpected = set(tensors)
    for name, adapter in adapters.items():
        if adapter.method != metadata["method"]:
            raise ValueError(f"{path}: holds {metadata['method']} adapters, asked to load them as {adapter.method}")
        for key, own in _own_tensors(adapter).items():
            full = f"{name}.{key}"
            if full not in tensors:
                raise ValueError(f"{path}: missing tensor '{full}'")
            unexpected.discard(full)
            # a copy of its own: load_file's tensors are views into one buffer, not 64-byte aligned, and
            # CPU matmul kernels round differently on unaligned data, so a resumed run would drift
            value = tensors[full].to(device=own.device, dtype=own.dtype, copy=True)
            weights.check_finite(path, full, value)  # a NaN would train on (--resume) or make black images
            owner, _, leaf = key.rpartition(".")
            module = adapter.get_submodule(owner)
            if leaf in module._parameters:
                module._parameters[leaf].data = value
            else:
                module._buffers[leaf] = value
        d_in, r, d_out = adapter.base.in_features, ranks[name], adapter.base.out_features
        if adapter.A.shape != (d_in, r) or adapter.B.shape != (r, d_out):
            raise ValueError(f"{path}: layer '{name}': A {tuple(adapter.A.shape)} and B {tuple(adapter.B.shape)} do not "
                             f"fit d_in={d_in}, rank={r} (metadata), d_out={d_out}")
    if unexpected:
        raise ValueError(f"{path}: tensors for no listed layer: {', '.join(sorted(unexpected)[:10])}")
    return adapters, metadata


def merge(adapter: Adapter) -> nn.Linear:
    """A plain nn.Linear computing what the adapter computes: W = W0 + delta (eq. 1), for inference."""
    base = adapter.base
    merged = nn.Linear(base.in_features, base.out_features, bias=base.bias is not None,
                       device=base.weight.device, dtype=base.weight.dtype)
    with torch.no_grad():
        merged.weight.copy_(base.weight + adapter.delta_weight().to(base.weight.dtype))
        if base.bias is not None:
            merged.bias.copy_(base.bias)
    return merged.requires_grad_(False)
