"""Training-state checkpoints without pickles: optimizer moments, RNG states and counters in safetensors.

A checkpoint holds what `--resume` needs to continue a run exactly: the optimizer's per-parameter state
(keyed by the parameter's qualified name, so it survives re-creating the model and re-injecting adapters
with grown ranks), its param-group hyperparameters, the generators' states, and the loop counters.
The adapters themselves are saved beside it by `adapters.save_adapters`, in their own file; `save_training_state`
writes the pair into a run folder.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

from fast import capacity
from methods import adapters
from model import weights
from training import run_folder


def optimizer_tensors(optimizer: torch.optim.Optimizer, names: dict[torch.nn.Parameter, str],
                      in_use: dict[torch.nn.Parameter, tuple[int, int]] | None = None) -> dict[str, torch.Tensor]:
    """Flatten the optimizer's state into `optim.<param name>.<state key>` tensors; the state of a factor stored
    at a fixed capacity only where it is in use (`in_use`, from capacity.in_use: {param: (dim, rank)})."""
    out, in_use = {}, in_use or {}
    for param, state in optimizer.state.items():
        for key, value in state.items():
            value = value if torch.is_tensor(value) else torch.tensor(value)
            if param in in_use and value.shape == param.shape:
                value = value.narrow(in_use[param][0], 0, in_use[param][1])
            out[f"optim.{names[param]}.{key}"] = value
    return out


def load_optimizer_tensors(optimizer: torch.optim.Optimizer, names: dict[torch.nn.Parameter, str],
                           tensors: dict[str, torch.Tensor], source: str) -> None:
    """Put back the state written by `optimizer_tensors`; every parameter must match by name and shape."""
    by_name = {name: p for p, name in names.items()}
    optimizer.state.clear()
    for key, value in tensors.items():
        if not key.startswith("optim."):
            continue
        name, state_key = key[len("optim."):].rsplit(".", 1)
        if name not in by_name:
            raise ValueError(f"{source}: optimizer state for '{name}', which the model does not have")
        param = by_name[name]
        if state_key != "step" and value.shape != param.shape:
            raise ValueError(f"{source}: optimizer state '{key}' has shape {tuple(value.shape)}, "
                             f"parameter has {tuple(param.shape)}")
        optimizer.state[param][state_key] = value.to(param.device, torch.float32 if state_key == "step" else param.dtype)


def save_checkpoint(path: str | os.PathLike, optimizer: torch.optim.Optimizer, names: dict[torch.nn.Parameter, str],
                    generators: dict[str, torch.Generator], counters: dict,
                    extra: dict[str, torch.Tensor] | None = None,
                    in_use: dict[torch.nn.Parameter, tuple[int, int]] | None = None) -> None:
    """Write optimizer state (see `optimizer_tensors`), generator states, counters (JSON in the metadata) and
    `extra` tensors (e.g. a method's own state, such as AdaLoRA's importance averages), atomically."""
    tensors = optimizer_tensors(optimizer, names, in_use)
    tensors.update({f"extra.{k}": v for k, v in (extra or {}).items()})
    for key, gen in generators.items():
        tensors[f"rng.{key}"] = gen.get_state()
    groups = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
    weights.save_file(tensors, path, metadata={"counters": json.dumps(counters), "param_groups": json.dumps(groups)})


def load_checkpoint(path: str | os.PathLike, optimizer: torch.optim.Optimizer, names: dict[torch.nn.Parameter, str],
                    generators: dict[str, torch.Generator]) -> tuple[dict, dict[str, torch.Tensor]]:
    """Restore what `save_checkpoint` wrote into the given optimizer and generators; return the counters
    and the `extra` tensors."""
    # copies, not views of the memory-mapped file: Generator.set_state reads its tensor's storage from the start
    tensors = {k: v.clone() for k, v in weights.load_file(path).items()}
    meta = weights.load_metadata(path)
    if "counters" not in meta:
        raise ValueError(f"{path}: not a training checkpoint (no 'counters' in its metadata)")
    load_optimizer_tensors(optimizer, names, tensors, str(path))
    groups = json.loads(meta["param_groups"])
    if len(groups) != len(optimizer.param_groups):
        raise ValueError(f"{path}: {len(groups)} optimizer param groups saved, the optimizer has {len(optimizer.param_groups)}")
    for group, saved in zip(optimizer.param_groups, groups):
        group.update({k: tuple(v) if isinstance(v, list) else v for k, v in saved.items()})
    for key, gen in generators.items():
        if f"rng.{key}" not in tensors:
            raise ValueError(f"{path}: no state for generator '{key}'")
        gen.set_state(tensors[f"rng.{key}"])
    extra = {k[len("extra."):]: v for k, v in tensors.items() if k.startswith("extra.")}
    return json.loads(meta["counters"]), extra


def non_finite(named: dict[str, adapters.Adapter], what: str, grad: bool = False) -> str | None:
    """None when every adapter parameter (or its gradient) is finite; else `what` and the first one that is not.
    A run checks this before a step's update is taken and after it, so no checkpoint or adapter file of it ever
    holds a NaN or an infinity. One synchronisation in the common, finite case."""
    tensors = {f"{name}.{key}": p.grad if grad else p for name, a in named.items()
               for key, p in a.named_parameters() if p.requires_grad}
    tensors = {k: t for k, t in tensors.items() if t is not None}
    if not tensors or torch.stack([t.detach().isfinite().all() for t in tensors.values()]).all():
        return None
    first = next(k for k, t in tensors.items() if not t.detach().isfinite().all())
    return f"{what} {first} non-finite" if what.endswith("made") else f"{what} {first} is not finite"


def stopped_at(run: Path, step: int, what: str, trained: bool = True) -> str:
    """The message of a run stopped at a step that is not finite (`non_finite`), before anything of that step was
    written: it names the last checkpoint, which holds only finite values, and what resuming from it does.
    trained: whether any update came before (not so at step 1's loss and gradient: then the base model with its
    fresh adapters gives the non-finite value, and the learning rate plays no part)."""
    last = run_folder.last_checkpoint(run)
    if not trained:
        after = ("No update was taken yet, so the learning rate plays no part: the model gives it on its first batch "
                 "(its weights overflow in the forward or backward pass, or at --precision fp16 / bf16); check the "
                 "base model (--model), or train at --precision fp32")
    elif last is None:
        after = "No checkpoint was written yet: start again with a lower --lr (or --precision fp32)"
    else:
        at = weights.load_metadata(last / "adapters.safetensors").get("step", "?")
        after = (f"The last checkpoint, of step {at}, is finite: {last}. --resume {run} reaches this step again "
                 "(same seed, same data), so start a new run with a lower --lr (or --precision fp32)")
    return f"step {step}: {what}; stopping. {after}"


def save_training_state(run: Path, model: torch.nn.Module, named: dict[str, adapters.Adapter],
                        optimizer: torch.optim.Optimizer, controller: adapters.Controller, gen: torch.Generator,
                        counters: dict, metadata: dict[str, str]) -> None:
    """RUN/checkpoint/{adapters,state}.safetensors, replaced as a pair: written to checkpoint.tmp/ first, so an
    interruption leaves the previous checkpoint whole (run_folder.last_checkpoint finds it, and
    run_folder.recover_checkpoint, called first here and when a run resumes, cleans what the interruption left).
    `model` holds the adapters (SD15.adaptable()); its parameter names key the optimizer state."""
    tmp, final, old = (run / name for name in (run_folder.CHECKPOINT_TMP, run_folder.CHECKPOINT,
                                               run_folder.CHECKPOINT_OLD))
    run_folder.recover_checkpoint(run)
    tmp.mkdir()
    adapters.save_adapters(named, tmp / "adapters.safetensors", metadata)
    names = {p: n for n, p in model.named_parameters() if p.requires_grad}
    save_checkpoint(tmp / "state.safetensors", optimizer, names, {"train": gen}, counters, controller.state(),
                    capacity.in_use(named))
    if final.exists():
        final.rename(old)
    tmp.rename(final)
    shutil.rmtree(old, ignore_errors=True)
