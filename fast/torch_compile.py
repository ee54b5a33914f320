"""train.py --compile: the UNet and text encoder through torch.compile (TorchDynamo and inductor), the fast path
beside the eager one (the same modules and weights, so training through it trains the model; tests/test_compile.py
proves the results equal). The adapters must be at a fixed capacity first (fast/capacity.py)."""
from __future__ import annotations

import copy
import os
import shutil

import torch

from model.sd15 import SD15

COMPILE_MODES = ("default", "reduce-overhead")  # torch.compile's modes that train.py --compile-mode offers


def check_compiler(device: torch.device, mode: str = "default") -> None:
    """Refuse what --compile cannot do on `device`: CUDA graphs (--compile-mode reduce-overhead) anywhere but on a
    CUDA device, and CPU kernels without the C++ compiler that inductor builds them with."""
    if mode not in COMPILE_MODES:
        raise ValueError(f"--compile-mode must be one of {', '.join(COMPILE_MODES)}, got {mode!r}")
    if mode == "reduce-overhead" and device.type != "cuda":
        raise ValueError(f"--compile-mode reduce-overhead replays each step as CUDA graphs, which need a CUDA device, "
                         f"and this run is on {device}: leave out --compile-mode (or give default)")
    compiler = os.environ.get("CXX", "g++")
    if device.type == "cpu" and not shutil.which(compiler):
        raise ValueError(f"--compile on the CPU needs a C++ compiler (inductor builds its kernels with one): no "
                         f"{compiler} found on the PATH; install g++ or set CXX, or leave out --compile")


def compiled(sd: SD15, mode: str = "default") -> SD15:
    """`sd` with its UNet and text encoder compiled (torch.compile, TorchDynamo and inductor, for fixed shapes):
    the same modules and weights, so training through it trains `sd`; `.unet._orig_mod` is `sd.unet`.
    mode="reduce-overhead" also records each compiled graph's kernel launches as a CUDA graph and replays it
    (torch.compile's CUDA graph trees): the same kernels and results, one launch per graph (CUDA only).

    The adapters must be at a fixed capacity first (fast.capacity.fix_capacity), or every change of rank would
    recompile (and, with CUDA graphs, record again)."""
    view = copy.copy(sd)
    view.unet, view.text_encoder = (compiled_module(part, mode) for part in (sd.unet, sd.text_encoder))
    return view


def compiled_module(module: torch.nn.Module, mode: str = "default") -> torch.nn.Module:
    """torch.compile for fixed shapes (`compiled`). SeLoRA's test steps keep each tested layer's input in the forward
    (fast.probe.Probe.tap), a Python side effect, which TorchDynamo refuses inside a checkpointed block (--gradient-
    checkpointing) unless told not to repeat it when backward recomputes the block: so it is told, and keeps each
    call's input once, as the uncompiled step does (where the recomputed call gets no gradient, probe.Probe.seen).
    Without it, a compiled test step would run every checkpointed block uncompiled."""
    # process-wide; it changes only forward code with side effects inside checkpointed blocks: the probes
    torch._dynamo.config.skip_fwd_side_effects_in_bwd_under_checkpoint = True
    return torch.compile(module, dynamic=False, mode=mode)
