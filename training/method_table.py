"""One table from a method's name to everything about it that a run needs, so that --method switches between
them and a new method is one adapter class, one controller class and one table entry.

    method = build("adalora", target_r=4)
    adapters = inject(model, method.make_adapter, targets)
    optimizer = optimizer(param_groups("adalora", adapters, lr=1e-4, args), "adamw", lr=1e-4)
    controller = method.controller(adapters, optimizer, total_steps)
    ... the loop in adapters.Controller's docstring ...
    save_adapters(adapters, path, controller.metadata())

Each entry names its adapter and controller classes, the command-line options it owns (`OPTIONS`, added to
train.py's parser) under the keyword its adapter or controller takes, its optimizer param groups, and two
facts a run needs. Defaults are the SeLoRA paper's comparison settings: LoRA r = 4; DyLoRA r = 4; AdaLoRA
init_r = 6 -> target_r = 4; SeLoRA lambda = 1.1, t = 40 (under --expansion-test script: the script's 1.3, 40).
"""
from __future__ import annotations

import argparse
import inspect
import json
import os
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from fast.fisher import FastSeLoRA, FastScriptSeLoRA
from methods import kohya, lora2
from methods.adapters import Adapter, Controller, load_adapters
from methods.baselines import DYLORA_MODES, AdaLoRA, AdaLoRALinear, DyLoRA, DyLoRALinear, LoRALinear
from methods.lora2 import LoRA2, LoRA2Linear
from methods.selora_script import ScriptSeLoRA
from model import weights
from training import cli
from selora import FISHER_MODES, SeLoRA, SeLoRALinear

FAST_TEST_STEP = {SeLoRA: FastSeLoRA, ScriptSeLoRA: FastScriptSeLoRA}  # a controller: the same with the fast step
EXPANSION_TESTS = ("paper", "script")  # SeLoRA's growth rules: selora.SeLoRA, selora_script.ScriptSeLoRA

# the command-line options methods own: argparse dest -> add_argument keywords (the flag is --dest with dashes)
OPTIONS = {
    "lam": dict(type=cli.number(1.0), help="SeLoRA threshold lambda, >= 1. Default: the rule's own, 1.1 for "
                                           "--expansion-test paper (the FI-ratio is never below 1, so 1 accepts any "
                                           "improvement), 1.3 for script (the script's call; expand when >=)"),
    "t": dict(type=cli.integer(1), default=40, help="SeLoRA: test for expansion every t steps (paper and script: 40; "
                                                              "train.py's embedded default: 80)"),
    "fisher": dict(choices=FISHER_MODES, help="SeLoRA Fisher estimator: per-sample (eq. 3; the paper rule's default) "
                                              "or squared batch gradient (the script's, and its rule's only one)"),
    "expansion_test": dict(default="paper", choices=EXPANSION_TESTS,
                           help="SeLoRA's growth rule: the paper's (eq. 3-5 at the same weights, > lambda; default), "
                                "or the authors' script's (a second forward and backward one optimizer step later, a "
                                "zero candidate until a layer first grows, >= lambda, Adam state reset at growth; "
                                "methods/selora_script.py)"),
    "rank": dict(type=cli.integer(1), default=4, help="LoRA / DyLoRA / LoRA^2 (starting) rank (paper: 4)"),
    "dylora_mode": dict(default="full", choices=DYLORA_MODES, help="DyLoRA: train ranks 1..b, or rank b only"),
    "init_r": dict(type=cli.integer(1), default=6, help="AdaLoRA initial rank (paper: 6)"),
    "target_r": dict(type=cli.integer(1), default=4, help="AdaLoRA target rank, at most --init-r (paper: 4)"),
    "rate_lr": dict(type=cli.number(0.0, inclusive=False), default=1e-2,
                    help="LoRA^2: learning rate of the per-layer rates (see lora2.param_groups)"),
    "max_rank": dict(type=cli.integer(1), help="SeLoRA / LoRA^2: the most ranks a layer may reach; it stops growing "
                                               "there (logged). Default: none for SeLoRA (the paper; 16 with "
                                               "--compile), 32 for LoRA^2"),
}


def _plain_params(adapters: dict[str, Adapter], lr: float, options: argparse.Namespace) -> list[nn.Parameter]:
    return [p for a in adapters.values() for p in a.parameters() if p.requires_grad]


def _selora_notes(options: argparse.Namespace, total_steps: int) -> list[str]:
    if options.max_rank == 1:
        return ["--max-rank 1: SeLoRA's layers start at rank 1, their maximum, so none can grow: this run trains a "
                "fixed rank-1 LoRA"]
    if options.t > total_steps:
        return [f"--t {options.t} is more than the run's {total_steps} steps: no expansion test comes, so this run "
                "trains a fixed rank-1 LoRA"]
    return []


def _check_adalora(options: dict) -> None:
    if options["target_r"] > options["init_r"]:
        raise ValueError(f"--target-r {options['target_r']} is above --init-r {options['init_r']}: AdaLoRA only "
                         "prunes ranks")


def _check_lora2(options: dict) -> None:
    if options["rank"] > options["max_rank"]:
        raise ValueError(f"--rank {options['rank']} is above --max-rank {options['max_rank']}: LoRA^2 would start "
                         "above its cap")


@dataclass(frozen=True)
class Entry:
    adapter: type[Adapter]
    controller: type[Controller]
    options: dict[str, str] = field(default_factory=dict)  # the adapter's or controller's keyword -> argparse dest
    # optimizer param groups from the adapters, the learning rate and the command line (LoRA^2's rates: their own)
    param_groups: Callable[[dict[str, Adapter], float, argparse.Namespace], list] = _plain_params
    check: Callable[[dict], None] | None = None  # refuses option values (defaults filled in) that do not go together
    adaptive: bool = False  # ranks differ per layer after training (figures 3 and 4)
    over_total_steps: bool = False  # the controller lays its schedule out over the run's total steps
    compiled_max_rank: int | None = None  # max_rank of a compiled run that sets none (its factors' capacity)
    param_options: tuple[str, ...] = ()  # OPTIONS that param_groups reads (LoRA^2's --rate-lr)
    rank_option: str | None = None  # the OPTIONS dest of the rank a layer starts at (None: SeLoRA's, 1)
    # what a run is told at its start about option values that make the method something else (SeLoRA's --t)
    notes: Callable[[argparse.Namespace, int], list[str]] = lambda options, total_steps: []


TABLE: dict[str, Entry] = {
    "lora": Entry(LoRALinear, Controller, {"r": "rank"}, rank_option="rank"),
    "selora": Entry(SeLoRALinear, SeLoRA, {"lam": "lam", "t": "t", "fisher": "fisher", "seed": "seed",
                                           "max_rank": "max_rank", "expansion_test": "expansion_test"},
                    adaptive=True, compiled_max_rank=16, notes=_selora_notes),
    "dylora": Entry(DyLoRALinear, DyLoRA, {"r": "rank", "mode": "dylora_mode", "seed": "seed"}, rank_option="rank"),
    "adalora": Entry(AdaLoRALinear, AdaLoRA, {"init_r": "init_r", "target_r": "target_r"}, check=_check_adalora,
                     adaptive=True, over_total_steps=True, rank_option="init_r"),
    "lora2": Entry(LoRA2Linear, LoRA2, {"rank": "rank", "seed": "seed", "max_rank": "max_rank"},
                   param_groups=lambda adapters, lr, options: lora2.param_groups(adapters, lr, options.rate_lr),
                   check=_check_lora2, adaptive=True, param_options=("rate_lr",), rank_option="rank"),
}
METHODS = tuple(TABLE)


@dataclass(frozen=True)
class Method:
    """make_adapter(base) wraps one nn.Linear; controller(adapters, optimizer, total_steps, reduce) drives training."""
    name: str
    make_adapter: Callable[[nn.Linear], Adapter]
    controller: Callable[..., Controller]


def _keywords(fn: Callable, skip: int) -> dict[str, object]:
    """The keyword parameters of `fn` after the first `skip`, with their defaults."""
    return {name: p.default for name, p in list(inspect.signature(fn).parameters.items())[skip:]}


def build(name: str, fast: bool = False, **options) -> Method:
    """The method `name` with `options` given to whichever of its adapter and controller takes them.

    An option both take (LoRA^2's k) goes to both; one that neither takes is an error. fast: SeLoRA with the fast
    test step (fast/fisher.py), which train.py takes for --compile, torchrun and --fast-test-step; other methods
    have no other step.
    """
    if name not in TABLE:
        raise ValueError(f"unknown method {name!r}, expected one of {', '.join(METHODS)}")
    entry = TABLE[name]
    for_adapter = {k: v for k, v in _keywords(entry.adapter.__init__, 2).items() if k != "generator"}
    for_controller = _keywords(entry.controller.__init__, 5)  # after self, adapters, optimizer, total_steps, reduce
    unknown = set(options) - set(for_adapter) - set(for_controller)
    if unknown:
        raise ValueError(f"method {name!r} takes no option {', '.join(sorted(unknown))}; adapter options: "
                         f"{', '.join(sorted(for_adapter)) or 'none'}; controller options: "
                         f"{', '.join(sorted(for_controller)) or 'none'}")
    if entry.check:
        entry.check({**for_adapter, **for_controller, **options})
    adapter_options = {k: v for k, v in options.items() if k in for_adapter}
    controller_options = {k: v for k, v in options.items() if k in for_controller}
    controller = ScriptSeLoRA if options.get("expansion_test") == "script" else entry.controller
    if fast:
        controller = FAST_TEST_STEP.get(controller, controller)
    return Method(name, partial(entry.adapter, **adapter_options), partial(controller, **controller_options))


def rule_defaults(expansion_test: str) -> dict:
    """SeLoRA's lambda and Fisher estimator by default under each growth rule (the classes' own defaults):
    paper 1.1 and "sample", script 1.3 and "batch"."""
    defaults = _keywords((ScriptSeLoRA if expansion_test == "script" else SeLoRA).__init__, 5)
    return {"lam": defaults["lam"], "fisher": defaults["fisher"]}


def add_options(parser: argparse.ArgumentParser) -> None:
    """Every method's command-line options (`OPTIONS`), once each."""
    for dest, spec in OPTIONS.items():
        parser.add_argument(cli.flag(dest), **spec)


def options(name: str, args: argparse.Namespace) -> dict:
    """The options of method `name` from a parsed command line, under the keywords its classes take; one left
    unset (None, as --max-rank) takes the class's default."""
    return {keyword: getattr(args, dest) for keyword, dest in TABLE[name].options.items()
            if getattr(args, dest) is not None}


def taken(name: str) -> list[str]:
    """The method options (`OPTIONS`, by argparse dest) that method `name` reads."""
    entry = TABLE[name]
    return [dest for dest in OPTIONS if dest in entry.options.values() or dest in entry.param_options]


def not_taken(name: str, dests) -> list[str]:
    """The method options among `dests` (argparse dests, e.g. those a command line gives) that method `name`
    does not take: given to it, they would be ignored without a word."""
    return [dest for dest in dests if dest in OPTIONS and dest not in taken(name)]


def notes(name: str, args: argparse.Namespace, total_steps: int) -> list[str]:
    """Lines a run of method `name` prints at its start: option values that silently make it another method."""
    return TABLE[name].notes(args, total_steps)


def check_ranks(name: str, adapters: dict[str, Adapter]) -> None:
    """Refuse, at the start of a new run of method `name`, a rank above an adapted layer's min(d_in, d_out),
    naming the narrowest layer: the update A B of a d_in x d_out layer has at most that many ranks, so more
    add nothing, and the run's own adapter file would be refused where it is loaded (kohya.check_update)."""
    def width(adapter: Adapter) -> int:
        return min(adapter.base.in_features, adapter.base.out_features)
    above = [(layer, adapter) for layer, adapter in adapters.items() if adapter.rank > width(adapter)]
    if above:
        layer, narrowest = min(above, key=lambda item: width(item[1]))
        option = cli.flag(TABLE[name].rank_option or "rank")
        raise ValueError(f"{option} {narrowest.rank}: above the width of the adapted layer '{layer}', min(d_in, d_out) "
                         f"= {width(narrowest)}, the most ranks its update can have; give {option} "
                         f"{width(narrowest)} or less, or --targets without the narrower layers")


def param_groups(name: str, adapters: dict[str, Adapter], lr: float, args: argparse.Namespace) -> list:
    """What the optimizer is built with: the adapters' parameters, in the method's param groups."""
    return TABLE[name].param_groups(adapters, lr, args)


OPTIMIZERS = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW}


def optimizer(groups: list, name: str = "adam", lr: float = 1e-4, weight_decay: float = 0.0) -> torch.optim.Optimizer:
    """The run's Adam or AdamW over `groups` (`param_groups`), in its foreach form: one dispatched op per
    update stage for all parameters instead of one per parameter, with the same results bit for bit as the
    per-parameter loop (torch's default on a CPU; its default on a GPU is foreach already). A step of a method
    with hundreds of adapted layers is otherwise some thousands of small ops, which bound its time on a GPU
    (docs/performance.md). (fused=True would be one op, but rounds differently from the loop.)"""
    return OPTIMIZERS[name](groups, lr=lr, weight_decay=weight_decay, foreach=True)


def adapter_for_file(path: str | os.PathLike) -> Callable[[nn.Linear], Adapter]:
    """How to rebuild the adapters of a `save_adapters` file, from its `method` metadata.

    The adapters take their shapes and buffers (scales) from the file in adapters.load_adapters, so
    the class's defaults are enough: `load_adapters(model, path, adapter_for_file(path))`.
    """
    method = weights.load_metadata(path).get("method")
    if method is None:
        raise ValueError(f"{path}: not an adapter file of train.py nor a kohya-format LoRA: {looks_like(path)}")
    if method not in TABLE:
        raise ValueError(f"{path}: metadata 'method' is {method!r}, expected one of {', '.join(METHODS)}")
    return TABLE[method].adapter


def looks_like(path: str | os.PathLike) -> str:
    """What a readable safetensors file that is no adapter looks like, for the message that refuses it."""
    entries, metadata, _ = weights.read_header(path)
    keys = list(entries)
    if "counters" in metadata or any(k.startswith(("optim.", "rng.")) for k in keys):
        return ("it is a training state file (a checkpoint's state.safetensors: optimizer moments, generator states); "
                "give a run's best.safetensors or last.safetensors")
    if any(".lora_A." in k or ".lora_B." in k for k in keys):
        return ("it looks like a peft / diffusers LoRA (lora_A / lora_B keys), which is not read here; give a "
                "kohya-format LoRA (lora_down / lora_up keys) or a train.py adapter")
    if any(k.startswith(("model.diffusion_model.", "first_stage_model.", "cond_stage_model.")) for k in keys):
        return "it is a Stable Diffusion checkpoint (give it as --model)"
    return (f"it has no 'method' metadata and no lora_unet_ / lora_te_ keys (first keys: "
            f"{', '.join(keys[:3]) or 'none'})")


def check_adapter_file(path: str | os.PathLike) -> None:
    """Refuse, naming the key, a file that is not an adapter (saying what it is instead), and values that would
    make every image black or change nothing: NaN or infinite tensors, an alpha or scale not above 0, a rank
    above min(d_in, d_out) (kohya.check_values, kohya.check_update)."""
    try:
        weights.read_header(path)
    except ValueError as err:
        what = "it is empty (0 bytes)" if Path(path).stat().st_size == 0 else \
            f"it is truncated or not a safetensors file ({str(err).removeprefix(f'{path}: ')})"
        raise ValueError(f"{path}: not an adapter file: {what}") from None
    if kohya.is_kohya_file(path):
        return  # read_kohya and load_kohya check every module
    adapter_for_file(path)
    tensors, ranks = weights.load_file(path), json.loads(weights.load_metadata(path).get("ranks", "{}"))
    kohya.check_values(path, tensors)
    for layer, r in ranks.items():
        A, B = tensors.get(f"{layer}.A"), tensors.get(f"{layer}.B")
        if A is not None and B is not None and A.dim() == B.dim() == 2:
            scale = tensors.get(f"{layer}.scale", torch.tensor(1.0))
            kohya.check_update(path, f"{layer}.A", A.T, B.T, float(scale.flatten()[0]) * r)


def check_base_model(sd, path: str | os.PathLike) -> None:
    """Refuse an adapter file trained on another base model: its `base_fingerprint` (train.base_metadata) must
    be the UNet's and the text encoder's fingerprints of `sd` (an sd15.SD15). Files without one (runs before
    fingerprints, kohya files from elsewhere) are not checked."""
    metadata = weights.load_metadata(path)
    if "base_fingerprint" not in metadata:
        return
    trained = json.loads(metadata["base_fingerprint"])
    differ = [part for part in ("unet", "text_encoder") if trained.get(part) != sd.fingerprints[part]]
    if differ:
        raise ValueError(f"{path}: trained on another base model than {sd.name} (its {' and '.join(differ)} weights "
                         f"differ: fingerprint {', '.join(trained.get(p, '?') for p in differ)} in the file, "
                         f"{', '.join(sd.fingerprints[p] for p in differ)} here); give the model it was trained on "
                         f"({metadata.get('base_model', 'see its base_model metadata')}), or --force to apply it "
                         "anyway")


def load_adapter(sd, path: str | Path, force: bool = False) -> dict[str, Adapter]:
    """Put a trained adapter file (any method) or a kohya-format LoRA file into `sd`'s UNet and text encoder
    (an sd15.SD15); refuse one trained on another base model unless `force`."""
    check_adapter_file(path)
    if not force:
        check_base_model(sd, path)
    if kohya.is_kohya_file(path):
        return kohya.load_kohya(sd.adaptable(), path)[0]
    return load_adapters(sd.adaptable(), path, adapter_for_file(path))[0]
