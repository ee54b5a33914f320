"""Benchmark: one training step on full-size SD 1.5 with random weights, ours against diffusers'
UNet2DConditionModel + transformers' CLIPTextModel + peft LoRA (r = 4 on every nn.Linear), in the same run.

    OMP_NUM_THREADS=2 python bench/train_step.py [--device cpu|cuda] [--size 224] [--batch 1] [--method lora ...|all]
        [--mode eager compiled cudagraphs] [--precision fp32|bf16|fp16] [--repeat 3] [--no-memory] [--ops-only]
        [--op-names FILE]

A step is train.py's: text encoder and UNet forward, the diffusion loss, backward, the Adam step and the
method's controller (diffusion.train_step, then optimizer.step and controller.step), the same function on both
sides (peft's side gets thin wrappers with our models' call signatures). Both sides share one set of frozen
weights (the same tensors), so their first losses agree. Configurations: peft's LoRA; each --method of ours
(SeLoRA at rank 1, grown to rank 8, and a test step at rank 8, the literal one of selora.py and the fast one of
fast/fisher.py, whose probes keep what the batched per-sample gradients need); with lora, ours again with --gradient-checkpointing; with --mode compiled, ours again as train.py
--compile runs it (adapters at a fixed capacity, UNet and text encoder torch.compile'd; SeLoRA at rank 8 in a
capacity of 16; not its test step: docs/performance.md measures a compiled test step on the tiny model); with
--mode cudagraphs (CUDA only), as train.py --compile --compile-mode reduce-overhead runs it.

Each configuration reports the aten ops it dispatches per step (tests/op_count.py's TorchDispatchMode counter, also
tests/test_op_counts.py's; --op-names writes them by name), its FLOPs per step
(torch.utils.flop_counter), the median time of --repeat steps taken in turn with every other configuration (so a
busy machine slows all alike), and its peak memory: on a GPU torch.cuda.max_memory_allocated, on a CPU the peak
RSS of a fresh process that builds that side alone (also the RSS once built, before the first step). A compiled
configuration's first step compiles (minutes on a CPU; inductor caches the kernels on disk for the next process)
and is timed apart ("first_step_seconds", every configuration's; give TORCHINDUCTOR_CACHE_DIR an empty folder to
time a compilation from scratch); its ops and FLOPs are not counted (inductor's fused kernels bypass the
dispatcher; its eager twin's apply). One JSON line per configuration, then a line with ours / peft for each, the
saving of gradient checkpointing, SeLoRA's test step against its normal step, compiled against eager, and the
goals for LoRA. Defaults: eager only, about a minute of steps on a 2-core CPU (plus a fresh process per
configuration for the memory figure).
"""
from __future__ import annotations

import argparse
import copy
import json
import resource
import statistics
import subprocess
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from types import SimpleNamespace

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from fast import capacity, torch_compile  # noqa: E402
from methods import adapters, lora2  # noqa: E402
from model.sampling import NUM_TRAIN_TIMESTEPS, add_noise  # noqa: E402
from training import diffusion, method_table  # noqa: E402
from clip_text import CLIPTextConfig, CLIPTextModel  # noqa: E402
import selora  # noqa: E402
import train  # noqa: E402
from op_count import OpCounter  # noqa: E402
from sd_unet import UNet, UNetConfig, unet_diffusers_names  # noqa: E402
from unet_helpers import diffusers_config, randomize_  # noqa: E402

RANK = 4  # LoRA's r on both sides (paper: 4); alpha 8 on both, so the scale is 2
LR = 1e-4
GOALS = {"ops": 0.90, "flops": 1.000, "seconds": 0.75}  # ours / peft for LoRA, CPU at 224 px, batch 1 (issue 17)
# compiled: as train.py --compile; cudagraphs: as train.py --compile --compile-mode reduce-overhead (CUDA only)
MODES = ("eager", "compiled", "cudagraphs")
COMPILE_MODES = {"compiled": "default", "cudagraphs": "reduce-overhead"}  # torch_compile.compiled's mode


@dataclass(frozen=True)
class Config:
    name: str
    method: str | None = None  # None: peft's LoRA on diffusers + transformers
    rank: int = 1  # SeLoRA: every layer grown to this rank before the first step
    test_step: bool = False  # SeLoRA: every step an expansion test (t = 1, lambda so high that nothing grows)
    fast: bool = False  # SeLoRA's fast test step (fast/fisher.py), which --compile always takes
    checkpointing: bool = False  # train.py --gradient-checkpointing
    mode: str = "eager"


def configurations(chosen: list[str], modes: list[str] = MODES) -> list[Config]:
    """peft's LoRA and ours for every chosen method, eager; with "compiled" or "cudagraphs" in `modes`, ours so too."""
    out = [Config("peft lora r=4")]
    for method in chosen:
        if method == "selora":
            out += [Config("ours selora rank 1", "selora"), Config("ours selora rank 8", "selora", rank=8),
                    Config("ours selora rank 8, test step", "selora", rank=8, test_step=True),
                    Config("ours selora rank 8, fast test step", "selora", rank=8, test_step=True, fast=True)]
        else:
            out.append(Config(f"ours {method}" + (f" r={RANK}" if method == "lora" else ""), method))
        eager = out[-3] if method == "selora" else out[-1]  # SeLoRA: rank 8
        for mode in ("compiled", "cudagraphs"):
            if mode in modes:
                out.append(Config(f"{eager.name}, {mode}", method, rank=eager.rank, mode=mode))
        if method == "lora":
            out.append(Config(f"ours lora r={RANK}, gradient checkpointing", "lora", checkpointing=True))
    return out


# ------------------------------------------------------------------------------------------ the two sides

def frozen_weights(precision: str, device: str) -> nn.ModuleDict:
    """SD 1.5's UNet and text encoder (ours) with random weights, frozen, in `precision`: the tensors both
    sides use."""
    with torch.device("meta"):
        parts = nn.ModuleDict({"unet": UNet(UNetConfig()), "text_encoder": CLIPTextModel(CLIPTextConfig())})
    randomize_(parts.to_empty(device="cpu"), seed=0)
    return parts.requires_grad_(False).to(device, train.PRECISIONS[precision])


class DiffusersUNet(nn.Module):
    """diffusers' UNet called as ours: (latents, timesteps, context) -> predicted noise."""

    def __init__(self, unet: nn.Module):
        super().__init__()
        self.unet = unet

    def forward(self, latents: torch.Tensor, t: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        return self.unet(latents, t, encoder_hidden_states=context, return_dict=False)[0]


class TransformersText(nn.Module):
    """transformers' CLIPTextModel called as ours: token ids -> last hidden state."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=ids).last_hidden_state


class NoController:
    """peft's side: nothing around the step (diffusion.train_step's controller interface)."""

    def capture(self, step: int, batch_size: int):
        return nullcontext()

    def add_penalty_gradient(self) -> None:
        pass

    def after_backward(self) -> None:
        pass

    def step(self) -> list:
        return []


def peft_side(weights: nn.ModuleDict, device: str) -> tuple[SimpleNamespace, nn.Module, NoController, int]:
    """diffusers + transformers models on `weights`' tensors, peft's LoRA on every nn.Linear."""
    import transformers
    from diffusers import UNet2DConditionModel
    from peft import LoraConfig, inject_adapter_in_model

    with torch.device("meta"):
        unet = UNet2DConditionModel(**diffusers_config(UNetConfig()))
    names = unet_diffusers_names()
    unet.load_state_dict({names[k]: v for k, v in weights.unet.state_dict().items()}, assign=True)
    config = {k: v for k, v in asdict(CLIPTextConfig()).items() if k != "projection_dim"}
    text = transformers.CLIPTextModel(transformers.CLIPTextConfig(**config))
    text.load_state_dict(weights.text_encoder.state_dict(), assign=True)
    layers = 0
    for model in (unet, text):
        linears = [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]
        inject_adapter_in_model(LoraConfig(r=RANK, lora_alpha=2 * RANK, target_modules=linears), model)
        layers += len(linears)
    for p in [*unet.parameters(), *text.parameters()]:  # peft makes them in the base's dtype; train in fp32, as ours
        if p.requires_grad:  # and diffusers' training scripts (cast_training_params) do
            p.data = p.data.float()
    parts = nn.ModuleDict({"unet": DiffusersUNet(unet), "text_encoder": TransformersText(text)}).to(device)
    sd = SimpleNamespace(unet=parts.unet, text_encoder=parts.text_encoder, device=torch.device(device))
    return sd, parts, NoController(), layers


def our_side(cfg: Config, weights: nn.ModuleDict, device: str):
    """Our models on `weights`' tensors (a copy of the modules, not of the tensors), --method's adapters."""
    parts = copy.deepcopy(weights, {id(t): t for t in [*weights.parameters(), *weights.buffers()]})
    options = ["--method", cfg.method, "--rank", str(RANK)]
    options += ["--t", "1", "--lam", "1e30"] if cfg.test_step else ["--t", str(10 ** 9)]
    options += ["--max-rank", "16"] if cfg.mode != "eager" and cfg.method == "selora" else []  # --compile's default
    fast = cfg.fast or cfg.mode != "eager"  # as train.py: --compile takes the fast test step
    method = method_table.build(cfg.method, fast, **method_table.options(cfg.method, train.parser().parse_args(options)))
    named = adapters.inject(parts, method.make_adapter)
    for layer in named.values():
        for _ in range(cfg.rank - 1):
            selora.expand(layer, torch.randn(layer.base.in_features, 1))
    parts.unet.gradient_checkpointing = parts.text_encoder.gradient_checkpointing = cfg.checkpointing
    sd = SimpleNamespace(unet=parts.unet, text_encoder=parts.text_encoder, device=torch.device(device))
    return sd, parts, method, named


@dataclass
class Side:
    """One configuration, ready to step."""
    cfg: Config
    sd: SimpleNamespace
    params: list[nn.Parameter]
    optimizer: torch.optim.Optimizer
    controller: object
    autocast: torch.autocast
    layers: int
    trainable: int  # at the true ranks (a fixed capacity stores more)
    compiled: SimpleNamespace | None = None  # mode "compiled": sd with its UNet and text encoder compiled
    steps: int = 0

    def step(self, batch) -> float:
        """train.py's step: train_step (forward, loss, backward inside the controller's capture), Adam, controller."""
        self.steps += 1
        loss = diffusion.train_step(self.sd, batch, self.steps, self.controller, self.optimizer, self.params,
                                    self.autocast, self.compiled)
        self.optimizer.step()
        self.controller.step()
        return loss


def build(cfg: Config, weights: nn.ModuleDict, args: argparse.Namespace) -> Side:
    if cfg.method is None:
        sd, parts, controller, layers = peft_side(weights, args.device)
        params = [p for p in parts.parameters() if p.requires_grad]
        optimizer = method_table.optimizer(params, lr=LR)  # as ours: train.py's (foreach, as torch's default on a GPU)
    else:
        sd, parts, method, named = our_side(cfg, weights, args.device)
        params = [p for p in parts.parameters() if p.requires_grad]
        optimizer = method_table.optimizer(lora2.param_groups(named, LR, 1e-2) if cfg.method == "lora2" else params, lr=LR)
        controller, layers = method.controller(named, optimizer, 10 ** 6), len(named)
    autocast = torch.autocast(torch.device(args.device).type, train.PRECISIONS[args.precision],
                              enabled=args.precision != "fp32")
    trainable, compiled = sum(p.numel() for p in params), None
    if cfg.mode != "eager":
        capacity.fix_capacity(controller, optimizer)
        compiled = torch_compile.compiled(sd, COMPILE_MODES[cfg.mode])
    return Side(cfg, sd, params, optimizer, controller, autocast, layers, trainable, compiled)


def make_batch(size: int, batch: int) -> tuple[torch.Tensor, ...]:
    """(noisy latents, t, noise, token ids) as diffusion.noisy_batch gives them: 8 random tokens per prompt."""
    gen = torch.Generator().manual_seed(0)
    latents, noise = (torch.randn(batch, 4, size // 8, size // 8, generator=gen) for _ in range(2))
    t = torch.randint(0, NUM_TRAIN_TIMESTEPS, (batch,), generator=gen)
    ids = torch.full((batch, 77), 49407)  # CLIP's end token, which also pads
    ids[:, 0] = 49406
    ids[:, 1:9] = torch.randint(300, 49000, (batch, 8), generator=gen)
    return add_noise(latents, noise, t), t, noise, ids


# ------------------------------------------------------------------------------------------ measuring

def synchronize(device: str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def rss_mib() -> float:
    """This process's resident memory now."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2 ** 20


def memory_child(args: argparse.Namespace) -> None:
    """--memory-of NAME: build that configuration alone, take two steps, print its memory (CPU)."""
    cfg = next(c for c in configurations(method_table.METHODS) if c.name == args.memory_of)
    side = build(cfg, frozen_weights(args.precision, args.device), args)
    built = rss_mib()
    batch = make_batch(args.size, args.batch)
    for _ in range(2):
        side.step(batch)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"peak_memory_mib": round(peak), "built_memory_mib": round(built)}))


def cpu_memory(cfg: Config, args: argparse.Namespace) -> dict:
    """Peak RSS of a fresh process that builds `cfg` alone and steps it (`memory_child`)."""
    command = [sys.executable, __file__, "--memory-of", cfg.name, "--device", args.device, "--size", str(args.size),
               "--batch", str(args.batch), "--precision", args.precision]
    if args.threads:
        command += ["--threads", str(args.threads)]
    out = subprocess.run(command, capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError(f"the memory process of {cfg.name!r} failed:\n{out.stderr[-3000:]}")
    return {**json.loads(out.stdout.splitlines()[-1]), "memory_kind": "cpu_peak_rss_of_a_fresh_process"}


def measure(sides: list[Side], batch, args: argparse.Namespace, memory: dict[str, dict]) -> dict[str, dict]:
    """Per configuration: first loss, the first step's time (a compiled side's includes compiling), ops, FLOPs, GPU
    memory, and the median of --repeat interleaved steps."""
    results = {}
    for side in sides:
        if torch.device(args.device).type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        loss = side.step(batch)  # warm-up: Adam's state, allocator, first-call costs, compiling
        synchronize(args.device)
        first = time.perf_counter() - start
        if torch.device(args.device).type == "cuda":
            memory[side.cfg.name] = {"peak_memory_mib": round(torch.cuda.max_memory_allocated() / 2 ** 20),
                                     "memory_kind": "cuda_max_memory_allocated"}
        if side.compiled is None:
            with FlopCounterMode(display=False) as flops, OpCounter() as ops:
                side.step(batch)
            results[side.cfg.name] = {"loss_first_step": loss, "ops": ops.count, "flops": flops.get_total_flops(),
                                      "op_names": dict(ops.names)}
        else:
            results[side.cfg.name] = {"loss_first_step": loss, "ops": None, "flops": None}
        results[side.cfg.name]["first_step_seconds"] = first
        results[side.cfg.name]["runs"] = []
    for _ in range(0 if args.ops_only else args.repeat):
        for side in sides:
            synchronize(args.device)
            start = time.perf_counter()
            side.step(batch)
            synchronize(args.device)
            results[side.cfg.name]["runs"].append(time.perf_counter() - start)
    return results


def summary(lines: dict[str, dict]) -> dict:
    """ours / peft for every configuration; gradient checkpointing's saving; SeLoRA's test step against its step;
    compiled against eager."""
    peft = lines["peft lora r=4"]
    keys = ["ops", "flops", "seconds"] + (["peak_memory_mib"] if "peak_memory_mib" in peft else [])
    ratios = {name: {k: round(line[k] / peft[k], 3) for k in keys if line[k] is not None and peft[k] is not None}
              for name, line in lines.items() if name != "peft lora r=4"}
    out = {"ours_over_peft": ratios}
    if peft["seconds"] is None:  # --ops-only: nothing timed
        return out
    compiled = {name: round(line["seconds"] / lines[name.removesuffix(f", {line['mode']}")]["seconds"], 3)
                for name, line in lines.items() if line["mode"] != "eager"}
    if compiled:
        out["compiled_over_eager_time"] = compiled
        lora, selora_ = (lines.get(f"ours {name}, compiled") for name in (f"lora r={RANK}", "selora rank 8"))
        if lora and selora_:  # compiling: SeLoRA's first compiled step against LoRA's (goal: at most 2x)
            out["selora_over_lora_first_compiled_step"] = round(selora_["first_step_seconds"]
                                                                / lora["first_step_seconds"], 3)
    lora, checkpointed = lines.get(f"ours lora r={RANK}"), lines.get(f"ours lora r={RANK}, gradient checkpointing")
    if lora and checkpointed:
        saving = {"time_factor": round(checkpointed["seconds"] / lora["seconds"], 3)}
        if "peak_memory_mib" in lora:
            saving["peak_memory_saving"] = round(1 - checkpointed["peak_memory_mib"] / lora["peak_memory_mib"], 3)
        if "built_memory_mib" in lora:  # CPU: the step's own memory, above the built model's
            step, step_c = (line["peak_memory_mib"] - line["built_memory_mib"] for line in (lora, checkpointed))
            saving["step_memory_saving"] = round(1 - step_c / step, 3)
        out["gradient_checkpointing"] = saving
    for kind in ("test step", "fast test step"):
        if "ours selora rank 8" in lines and f"ours selora rank 8, {kind}" in lines:
            out[f"selora_{kind.replace(' ', '_')}_over_step"] = round(lines[f"ours selora rank 8, {kind}"]["seconds"]
                                                                     / lines["ours selora rank 8"]["seconds"], 3)
    if f"ours lora r={RANK}" in ratios:
        lora_ratios = ratios[f"ours lora r={RANK}"]
        out["goals_lora_at_most"] = GOALS
        out["goals_met"] = all(lora_ratios[k] <= GOALS[k] for k in GOALS)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--size", type=int, default=224, help="image size in pixels (latents: size / 8)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--method", nargs="+", default=["lora"], choices=(*method_table.METHODS, "all"),
                   help="our methods to measure against peft's LoRA (all: every one)")
    p.add_argument("--mode", nargs="+", default=["eager"], choices=MODES,
                   help="eager (train.py's default); compiled: each of ours also as train.py --compile runs it; "
                        "cudagraphs: as train.py --compile --compile-mode reduce-overhead runs it (CUDA only)")
    p.add_argument("--precision", default="fp32", choices=sorted(train.PRECISIONS),
                   help="frozen weights and autocast, both sides (train.py --precision)")
    p.add_argument("--repeat", type=int, default=3, help="timed steps per configuration, taken in turn")
    p.add_argument("--threads", type=int, help="torch threads (default: torch's, from OMP_NUM_THREADS)")
    p.add_argument("--no-memory", action="store_true", help="skip the fresh process per configuration (CPU)")
    p.add_argument("--ops-only", action="store_true",
                   help="count ops and FLOPs only: no timed steps, no memory processes (op counts do not depend on "
                        "--size or --batch, so a small --size gives them quickly)")
    p.add_argument("--op-names", type=Path, help="write each configuration's ops by aten name to this JSON file")
    p.add_argument("--memory-of", help=argparse.SUPPRESS)  # the fresh process of cpu_memory
    args = p.parse_args()
    if "cudagraphs" in args.mode and args.device != "cuda":
        p.error("--mode cudagraphs replays CUDA graphs, which need --device cuda")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.memory_of:
        return memory_child(args)
    chosen = list(method_table.METHODS) if "all" in args.method else list(dict.fromkeys(args.method))
    configs = configurations(chosen, args.mode)
    memory = {}
    if args.device == "cpu" and not (args.no_memory or args.ops_only):  # first, before this process holds the models
        memory = {c.name: cpu_memory(c, args) for c in configs}
    weights = frozen_weights(args.precision, args.device)
    sides = [build(c, weights, args) for c in configs]
    results = measure(sides, make_batch(args.size, args.batch), args, memory)
    common = {"device": args.device, "size": args.size, "batch": args.batch, "precision": args.precision,
              "threads": torch.get_num_threads(), "torch": torch.__version__}
    lines = {}
    for side in sides:
        r = results[side.cfg.name]
        lines[side.cfg.name] = line = {
            "config": side.cfg.name, "mode": side.cfg.mode, "adapted_layers": side.layers,
            "trainable": side.trainable, "loss_first_step": r["loss_first_step"],
            "first_step_seconds": round(r["first_step_seconds"], 3),
            "ops": r["ops"], "flops": r["flops"], "seconds": round(statistics.median(r["runs"]), 3) if r["runs"] else None,
            "runs": [round(t, 3) for t in r["runs"]], **memory.get(side.cfg.name, {}), **common}
        print(json.dumps(line), flush=True)
    print(json.dumps(summary(lines)))
    if args.op_names:
        args.op_names.write_text(json.dumps({name: r.get("op_names") for name, r in results.items()}, indent=1))


if __name__ == "__main__":
    main()
