"""One table from a method's name to how to build it, so a training run can switch with --method.

    method = build("adalora", target_r=4)
    adapters = inject(model, method.make_adapter, targets)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    controller = method.controller(adapters, optimizer, total_steps)
    ... the loop in baselines.py's docstring ...
    save_adapters(adapters, path, controller.metadata())

Options go to the adapter or to the controller by name (each takes the keyword arguments its
signature lists). Defaults are the SeLoRA paper's comparison settings: LoRA r = 4; DyLoRA r = 4;
AdaLoRA init_r = 6 -> target_r = 4; SeLoRA lambda = 1.1, t = 40.
"""
from __future__ import annotations

import dataclasses
import inspect
import os
from dataclasses import dataclass
from functools import partial
from typing import Callable, ContextManager

import torch
from torch import nn

import weights
from adapters import Adapter
from baselines import AdaLoRA, AdaLoRALinear, Controller, DyLoRA, DyLoRALinear, LoRALinear
from lora2 import LoRA2, LoRA2Linear
from selora import SeLoRA, SeLoRALinear

METHODS = ("lora", "selora", "dylora", "adalora", "lora2")
TOTAL_STEPS_SCHEDULES = ("adalora",)  # controllers that lay their schedule over the run's total steps


class SeLoRAController(Controller):
    """SeLoRA's `SeLoRA` schedule behind the common Controller interface; the schedule does the work."""

    def __init__(self, adapters: dict[str, SeLoRALinear], optimizer: torch.optim.Optimizer | None = None,
                 total_steps: int | None = None, lam: float = 1.1, t: int = 40, fisher: str = "sample",
                 seed: int = 0, insist: bool = False):
        super().__init__(adapters, optimizer, total_steps)
        self.schedule = SeLoRA(adapters, optimizer, lam=lam, t=t, fisher=fisher, seed=seed, insist=insist)

    def capture(self, step: int, batch_size: int) -> ContextManager[None]:
        self.last_step = step
        return self.schedule.capture(step, batch_size)

    def step(self) -> list[dict]:
        return [dataclasses.asdict(test) for test in self.schedule.step()]

    def metadata(self) -> dict[str, str]:
        return self.schedule.metadata()


# name -> (adapter class, controller class); the defaults are the classes' keyword defaults
TABLE: dict[str, tuple[type[Adapter], type[Controller]]] = {
    "lora": (LoRALinear, Controller),
    "selora": (SeLoRALinear, SeLoRAController),
    "dylora": (DyLoRALinear, DyLoRA),
    "adalora": (AdaLoRALinear, AdaLoRA),
    "lora2": (LoRA2Linear, LoRA2),
}


@dataclass(frozen=True)
class Method:
    """make_adapter(base) wraps one nn.Linear; controller(adapters, optimizer, total_steps) drives training."""
    name: str
    make_adapter: Callable[[nn.Linear], Adapter]
    controller: Callable[[dict[str, Adapter], torch.optim.Optimizer | None, int | None], Controller]


def _keywords(fn: Callable, skip: int) -> set[str]:
    return set(list(inspect.signature(fn).parameters)[skip:])


def build(name: str, **options) -> Method:
    """The method `name` with `options` given to whichever of its adapter and controller takes them.

    An option both take (LoRA^2's k) goes to both; one that neither takes is an error.
    """
    if name not in TABLE:
        raise ValueError(f"unknown method {name!r}, expected one of {', '.join(METHODS)}")
    adapter_cls, controller_cls = TABLE[name]
    for_adapter = _keywords(adapter_cls.__init__, 2) - {"generator"}
    for_controller = _keywords(controller_cls.__init__, 4)
    unknown = set(options) - for_adapter - for_controller
    if unknown:
        raise ValueError(f"method {name!r} takes no option {', '.join(sorted(unknown))}; adapter options: "
                         f"{', '.join(sorted(for_adapter)) or 'none'}; controller options: "
                         f"{', '.join(sorted(for_controller)) or 'none'}")
    adapter_options = {k: v for k, v in options.items() if k in for_adapter}
    controller_options = {k: v for k, v in options.items() if k in for_controller}
    return Method(name, partial(adapter_cls, **adapter_options), partial(controller_cls, **controller_options))


def adapter_for_file(path: str | os.PathLike) -> Callable[[nn.Linear], Adapter]:
    """How to rebuild the adapters of a `save_adapters` file, from its `method` metadata.

    The adapters take their shapes and buffers (scales) from the file in adapters.load_adapters, so
    the class's defaults are enough: `load_adapters(model, path, adapter_for_file(path))`.
    """
    method = weights.load_metadata(path).get("method")
    if method not in TABLE:
        raise ValueError(f"{path}: metadata 'method' is {method!r}, expected one of {', '.join(METHODS)}")
    return TABLE[method][0]
