"""The paper's fine-tuning run (section 4): SD 1.5 frozen, adapters in every linear layer of the UNet and the
text encoder, trained on image-report pairs with the diffusion loss.

    python train.py                    # embedded default: a tiny random SD and generated phantoms, minutes on a CPU
    python train.py --model SD15 --data IU_XRAY --dataset iu-xray --method selora --out runs/iu-selora
    python train.py --resume runs/iu-selora

Each step: encode the prompts with the text encoder, draw t uniformly from the 1000 training timesteps and noise,
and minimise the MSE between the UNet's predicted and the true noise (the batch mean of per-sample MSEs). The
method's controller does its work around that step (SeLoRA: an expansion test every t steps, section 3.2).
After each epoch the validation loss is measured and the best adapter kept.

The run folder gets config.json, split.json, log.jsonl, summary.json, figures (PNG), best/last adapters, a
kohya-format export, checkpoints for --resume, and a few samples.

Several processes (GPUs, machines) train one run data-parallel when torchrun launches it; --batch is then each
process's batch (distributed.py):

    torchrun --nproc_per_node 4 train.py --model SD15 --data IU_XRAY --dataset iu-xray --batch 2
"""
from __future__ import annotations

import argparse
import json
import math
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

import adapters
import checkpoint
import data
import distributed
import lora2
import methods
import plots
import sample
import weights
from kohya import export_kohya
from sampling import NUM_TRAIN_TIMESTEPS, SCHEDULERS, add_noise
from sd15 import SD15, generate, load_model
from vae import posterior_to_latents

PAPER_EPOCHS = {"iu-xray": 10, "montgomery": 100}  # section 4; other data sets default to 10
PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
MEMORY_EVERY = 40  # steps between memory readings (appendix D)
EMBEDDED = dict(size=48, epochs=24, images=96)  # the embedded default: 240 steps, so t = 40 gives 6 tests


class TrainingError(RuntimeError):
    """A run that cannot go on (e.g. a non-finite loss); the last good checkpoint is kept."""


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("--model", help="SD 1.5: diffusers folder or single-file .safetensors (default: the embedded tiny random model)")
    a("--tokenizer", help="tokenizer folder or bpe_simple_vocab_16e6.txt.gz (needed with a single-file checkpoint)")
    a("--data", help="data folder (default: generated phantoms, see data.make_phantom_folder)")
    a("--dataset", default="folder", choices=sorted(data.PAPER_SPLITS), help="layout of --data (default: folder)")
    a("--split", help="train,validation,test percentages (default: the paper's for the data set, e.g. 80,16,4)")
    a("--empty-findings", default="skip", choices=("skip", "impression"), help="IU X-Ray reports without findings")
    a("--per-subtype", type=int, help="PatchGastric: sample this many pairs per subtype (appendix C.2: 1000)")
    a("--method", default="selora", choices=methods.METHODS, help="adapter method (default: selora)")
    a("--targets", nargs="+", help="glob patterns of linear layers to adapt (default: every nn.Linear, as the paper)")
    a("--lam", type=float, default=1.1, help="SeLoRA threshold lambda on the FI-ratio (paper: 1.1)")
    a("--t", type=int, default=40, help="SeLoRA: test for expansion every t steps (paper: 40)")
    a("--fisher", default="sample", choices=("sample", "batch"),
      help="SeLoRA Fisher estimator: per-sample (eq. 3, default) or squared batch gradient (authors' script)")
    a("--rank", type=int, default=4, help="LoRA / DyLoRA rank (paper: 4)")
    a("--dylora-mode", default="full", choices=("full", "frozen"), help="DyLoRA: train ranks 1..b, or rank b only")
    a("--init-r", type=int, default=6, help="AdaLoRA initial rank (paper: 6)")
    a("--target-r", type=int, default=4, help="AdaLoRA target rank (paper: 4)")
    a("--rate-lr", type=float, default=1e-2, help="LoRA^2: learning rate of the per-layer rates (see lora2.param_groups)")
    a("--size", type=int, help="image size in pixels (paper: 224, 384 as an option; embedded default: 64)")
    a("--epochs", type=int, help="epochs (paper: 10 for IU X-Ray, 100 for Montgomery)")
    a("--batch", type=int, default=8, help="batch size per process (paper: 8; under torchrun the global batch is "
                                             "this times the number of processes)")
    a("--lr", type=float, default=1e-4, help="learning rate (paper: 1e-4)")
    a("--optimizer", default="adam", choices=("adam", "adamw"), help="paper: Adam")
    a("--weight-decay", type=float, default=0.0)
    a("--precision", default="fp32", choices=sorted(PRECISIONS),
      help="frozen weights' precision; adapters and optimizer stay fp32 (default fp32)")
    a("--device", help="cuda, cpu, ... (default: cuda when available; under torchrun cuda:LOCAL_RANK)")
    a("--timeout", type=float, default=30.0,
      help="torchrun: minutes a process waits for the others in a collective before the run fails (default 30)")
    a("--seed", type=int, default=0)
    a("--data-seed", type=int, help="seed of the split and of the data's sampling (default: --seed); reproduce.py "
                                    "gives all its runs one, so every method and seed shares one split")
    a("--out", help="run folder (default: runs/default, or runs/<method>-<dataset>-seed<seed>)")
    a("--overwrite", action="store_true", help="replace an existing run folder")
    a("--resume", metavar="RUN", help="continue the run in this folder from its last checkpoint")
    a("--checkpoint-every", type=int, default=500, help="steps between checkpoints (also at each epoch end)")
    a("--latent-cache", help="folder for cached VAE latents (default: <run folder's parent>/.latent-cache)")
    a("--samples", type=int, default=4, help="preview images to generate from test prompts at the end (0: none)")
    a("--scheduler", default="pndm", choices=SCHEDULERS,
      help="sampler of those samples (default pndm: SD 1.5's, which made the paper's images)")
    a("--sample-steps", type=sample.steps_option, default=50, help="sampler steps for those samples (default 50)")
    a("--stop-after", type=int, help=argparse.SUPPRESS)  # tests: interrupt after this many steps
    return p


# ------------------------------------------------------------------------------------------ set-up

def resolve(args: argparse.Namespace) -> argparse.Namespace:
    """Fill the defaults that depend on other options; a resumed run takes its own config.json instead."""
    if args.resume:
        run = Path(args.resume)
        if not (run / "config.json").is_file():
            raise SystemExit(f"--resume {run}: no config.json there: not a run folder made by train.py")
        config = json.loads((run / "config.json").read_text())
        saved = {"scheduler": "pndm", **config["options"]}  # configs written before --scheduler: SD 1.5's
        return argparse.Namespace(**{"data_seed": saved.get("seed"), **saved, "resume": str(run), "out": str(run),
                                     "overwrite": False, "stop_after": args.stop_after, "timeout": args.timeout,
                                     "batch": per_process_batch(run, saved["batch"] * config.get("world_size", 1))})
    embedded = args.model is None
    args.data_seed = args.seed if args.data_seed is None else args.data_seed
    args.size = args.size or (EMBEDDED["size"] if embedded else 224)
    args.epochs = args.epochs or (EMBEDDED["epochs"] if embedded and args.data is None
                                  else PAPER_EPOCHS.get(args.dataset, 10))
    args.out = args.out or ("runs/default" if embedded and args.data is None
                            else f"runs/{args.method}-{args.dataset}-seed{args.seed}")
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    return args


def per_process_batch(run: Path, global_batch: int) -> int:
    """A resumed run keeps its global batch, with any number of processes that divides it."""
    processes = distributed.world_size()
    if global_batch % processes:
        raise SystemExit(f"--resume {run}: its global batch is {global_batch}, which {processes} processes cannot "
                         f"share evenly; launch a number of processes that divides {global_batch}")
    return global_batch // processes


def prepare_run_folder(args: argparse.Namespace) -> Path:
    run = Path(args.out)
    if args.resume:
        return run
    if run.exists() and any(run.iterdir()):
        if not args.overwrite:
            raise SystemExit(f"{run}: run folder exists; give --overwrite to replace it or --resume {run} to continue it")
        shutil.rmtree(run)
    run.mkdir(parents=True, exist_ok=True)
    return run


def code_version() -> str:
    try:
        out = subprocess.run(["git", "describe", "--always", "--dirty"], cwd=Path(__file__).parent,
                             capture_output=True, text=True, timeout=10)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def write_json(path: Path, payload: dict) -> None:
    with weights.atomic_write(path, "w") as f:
        json.dump(payload, f, indent=1)


def method_options(args: argparse.Namespace) -> dict:
    """The options of --method, under the names its adapter and controller take (methods.build)."""
    return {"selora": dict(lam=args.lam, t=args.t, fisher=args.fisher, seed=args.seed),
            "lora": dict(r=args.rank),
            "dylora": dict(r=args.rank, mode=args.dylora_mode, seed=args.seed),
            "adalora": dict(init_r=args.init_r, target_r=args.target_r),
            "lora2": dict(rank=args.rank, seed=args.seed)}[args.method]


def load_data(args: argparse.Namespace, run: Path) -> tuple[data.DataSet, dict[str, list[str]]]:
    """The data set and its split; a new split is written to run/split.json, a resumed run reads its own."""
    if args.data:
        root = Path(args.data)
    elif distributed.is_main():
        root = data.make_phantom_folder(run / "phantoms", EMBEDDED["images"], args.size, args.data_seed)
    else:
        root = run / "phantoms"  # made by the main process first (distributed.main_first in train)
    dataset = data.load_dataset(args.dataset, root, empty_findings=args.empty_findings,
                                per_subtype=args.per_subtype, seed=args.data_seed)
    if (run / "split.json").is_file():
        return dataset, data.read_split(run / "split.json")
    fractions = data.parse_split(args.split) if args.split else data.PAPER_SPLITS[args.dataset]
    split = data.make_split(dataset.examples, fractions, args.data_seed)
    data.write_split(run / "split.json", split, {"data": str(root), "dataset": args.dataset, "seed": args.data_seed,
                                                 "fractions": list(fractions)})
    return dataset, split


class Examples:
    """One split part ready for training: cached VAE posteriors (mean, logvar) and token ids, as tensors."""

    def __init__(self, sd: SD15, examples: list[data.Example], args: argparse.Namespace, cache: Path):
        self.names = [e.name for e in examples]
        self.captions = [e.caption for e in examples]
        self.ids, self.truncated = sd.tokenizer.encode(self.captions) if examples else (torch.zeros(0, 77, dtype=torch.long), 0)
        if not examples:
            return
        vae_dtype = next(sd.vae.parameters()).dtype
        posterior = data.cached_latents(examples, args.size, lambda im: sd.vae.encode(im.to(sd.device, vae_dtype)),
                                        cache, model_key=f"{sd.name}|{vae_dtype}")
        self.mean = torch.stack([posterior[n][0] for n in self.names])
        self.logvar = torch.stack([posterior[n][1] for n in self.names])

    def __len__(self) -> int:
        return len(self.names)


# ------------------------------------------------------------------------------------------ the step

def diffusion_batch(ex: Examples, index: torch.Tensor, gen: torch.Generator):
    """(noisy latents, t, true noise, token ids) for the examples at `index`, drawn from `gen` on the CPU, so a
    seed gives the same batch on every device."""
    x0 = posterior_to_latents(ex.mean[index], ex.logvar[index], gen)
    noise = torch.randn(x0.shape, generator=gen)
    t = torch.randint(0, NUM_TRAIN_TIMESTEPS, (len(index),), generator=gen)
    return add_noise(x0, noise, t), t, noise, ex.ids[index]


def diffusion_loss(sd: SD15, batch, autocast) -> torch.Tensor:
    """The MSE between predicted and true noise, averaged over the batch (section 3.4)."""
    noisy, t, noise, ids = (x.to(sd.device) for x in batch)
    with autocast:
        pred = sd.unet(noisy, t, sd.text_encoder(ids))
    return F.mse_loss(pred.float(), noise)


def train_step(sd: SD15, batch, step: int, controller, optimizer, params: list[torch.nn.Parameter], autocast) -> float:
    """Forward and backward of this process's rows of the global batch (all of it in a single process),
    inside the method's capture; returns the global batch's mean loss, with every adapter's gradient that
    of the global batch (distributed.average_gradients)."""
    part = distributed.shard(batch)
    loss = None
    with controller.capture(step, len(part[0])):
        optimizer.zero_grad(set_to_none=True)
        if len(part[0]):  # a process gets no rows when an epoch's last batch is shorter than the process count
            loss = diffusion_loss(sd, part, autocast)
            (loss + controller.penalty()).backward()
    return distributed.average_gradients(params, loss, len(part[0]), len(batch[0]))


@torch.no_grad()
def validation_loss(sd: SD15, ex: Examples, args: argparse.Namespace, autocast) -> float:
    """Loss on the validation part with the same t and noise at every epoch (a fixed generator), so epochs
    compare; NaN when the split has no validation part. Global batches, shared by the processes as in training."""
    if not len(ex):
        return math.nan
    gen, total = torch.Generator().manual_seed(args.seed + 1), 0.0
    for index in torch.arange(len(ex)).split(args.batch * distributed.world_size()):
        part = distributed.shard(diffusion_batch(ex, index, gen))
        if len(part[0]):
            total += diffusion_loss(sd, part, autocast).item() * len(part[0])
    return distributed.all_reduce_sum(torch.tensor(total, dtype=torch.float64)).item() / len(ex)


def memory_mib(device: torch.device) -> tuple[float, str]:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20, "gpu_peak_allocated"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "process_peak_rss"


# ------------------------------------------------------------------------------------------ saving

def adapter_metadata(sd: SD15, controller, step: int) -> dict[str, str]:
    return {**controller.metadata(), "base_model": sd.name, "step": str(step)}


def save_training_state(run: Path, sd: SD15, named: dict[str, adapters.Adapter], optimizer, controller,
                        gen: torch.Generator, counters: dict) -> None:
    """run/checkpoint/{adapters,state}.safetensors, replaced as a pair: written to checkpoint.tmp/ first, so an
    interruption leaves the previous checkpoint whole."""
    tmp, final, old = run / "checkpoint.tmp", run / "checkpoint", run / "checkpoint.old"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    adapters.save_adapters(named, tmp / "adapters.safetensors", adapter_metadata(sd, controller, counters["step"]))
    names = {p: n for n, p in sd.adaptable().named_parameters() if p.requires_grad}
    checkpoint.save_checkpoint(tmp / "state.safetensors", optimizer, names, {"train": gen}, counters, controller.state())
    if final.exists():
        final.rename(old)
    tmp.rename(final)
    shutil.rmtree(old, ignore_errors=True)


def last_checkpoint(run: Path) -> Path:
    for folder in (run / "checkpoint", run / "checkpoint.old"):  # .old: interrupted between the two renames
        if (folder / "state.safetensors").is_file():
            return folder
    raise SystemExit(f"--resume {run}: no checkpoint in it yet (checkpoint/state.safetensors)")


def read_log(run: Path, upto: int) -> list[dict]:
    """The log lines of steps <= upto (a resumed run rewrites what came after its checkpoint)."""
    path = run / "log.jsonl"
    if not path.is_file():
        return []
    lines = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [line for line in lines if line["step"] <= upto]


# ------------------------------------------------------------------------------------------ figures and summary

def draw_figures(run: Path, log: list[dict], ranks: dict[str, int], layers_per_block: int) -> list[str]:
    steps = [line for line in log if "loss" in line]
    epochs = [line for line in log if "val_loss" in line]
    figures = {
        "loss.png": plots.line_plot({"training loss": ([s["step"] for s in steps], [s["loss"] for s in steps]),
                                     "validation loss": ([e["step"] for e in epochs], [e["val_loss"] for e in epochs])},
                                    "Training and validation loss", "step", "MSE"),
        "rank_growth.png": plots.line_plot({"total rank": ([s["step"] for s in steps], [s["total_rank"] for s in steps])},
                                           "Rank growth", "step", "sum of ranks over layers"),
    }
    memory = [s for s in steps if "memory_mib" in s]
    if memory:
        figures["memory.png"] = plots.line_plot({memory[0]["memory_kind"]: ([s["step"] for s in memory],
                                                                            [s["memory_mib"] for s in memory])},
                                                "Memory", "step", "MiB")
    unet = {n: r for n, r in ranks.items() if n.startswith("unet.")}
    text = {n: r for n, r in ranks.items() if n.startswith("text_encoder.")}
    if unet and plots.unet_layout(list(unet), layers_per_block).cells:
        figures["rank_unet.png"] = plots.rank_heatmap(unet, plots.unet_layout(list(unet), layers_per_block),
                                                      "UNet: final rank per layer")
    if text and plots.text_encoder_layout(list(text)).cells:
        figures["rank_text_encoder.png"] = plots.rank_heatmap(text, plots.text_encoder_layout(list(text)),
                                                              "Text encoder: final rank per layer", xlabel="Layer")
    for name, image in figures.items():
        plots.save_png(image, run / name)
    return sorted(figures)


# ------------------------------------------------------------------------------------------ main

def train(args: argparse.Namespace) -> Path:
    device = distributed.init(args.device, args.timeout)  # under torchrun; else torch.device(args.device)
    is_main = distributed.is_main()  # only the main process writes the run folder and prints
    run = prepare_run_folder(args) if is_main else Path(args.out)
    if args.model is None and is_main:
        print("Embedded default: a tiny random SD 1.5 architecture"
              + (" and generated phantoms" if args.data is None else "")
              + ". This shows the mechanics of the run, not image quality. For the paper's run give "
                "--model SD15_FOLDER_OR_FILE --data DATA --dataset iu-xray|montgomery|folder (see README).")
    if not args.resume and is_main:
        write_json(run / "config.json", {"options": vars(args), "world_size": distributed.world_size(),
                                         "code_version": code_version(), "torch": torch.__version__, "seed": args.seed})
    torch.manual_seed(args.seed)  # adapter initialisation, the same in every process
    sd = load_model(args.model, args.tokenizer, args.seed).to(device)
    with distributed.main_first():  # the main process writes split, phantoms and latent cache; the others read them
        if not (run / "config.json").is_file():
            raise SystemExit(f"process {distributed.rank()}: {run / 'config.json'} is not there: every machine of a "
                             "multi-machine run must see the run folder (--out on a shared file system)")
        dataset, split = load_data(args, run)
        cache = Path(args.latent_cache) if args.latent_cache else run.parent / ".latent-cache"
        train_ex = Examples(sd, data.select(dataset, split["train"], run / "split.json"), args, cache)
        val_ex = Examples(sd, data.select(dataset, split["validation"], run / "split.json"), args, cache)
    if not len(train_ex):
        raise SystemExit(f"{run / 'split.json'}: the training part is empty")

    method = methods.build(args.method, **method_options(args))
    parts = sd.adaptable()
    ckpt = last_checkpoint(run) if args.resume else None
    if ckpt:
        named = adapters.load_adapters(parts, ckpt / "adapters.safetensors", method.make_adapter)[0]
    else:
        named = adapters.inject(parts, method.make_adapter, args.targets)
    if args.precision != "fp32":  # frozen weights in low precision; adapters (trainable) stay fp32
        for p in parts.parameters():
            if not p.requires_grad:
                p.data = p.data.to(PRECISIONS[args.precision])
    parts.to(device)
    autocast = torch.autocast(device.type, PRECISIONS[args.precision], enabled=args.precision != "fp32")
    params = [p for p in parts.parameters() if p.requires_grad]
    groups = lora2.param_groups(named, args.lr, args.rate_lr) if args.method == "lora2" else params
    opt_class = torch.optim.AdamW if args.optimizer == "adamw" else torch.optim.Adam
    optimizer = opt_class(groups, lr=args.lr, weight_decay=args.weight_decay)
    global_batch = args.batch * distributed.world_size()
    steps_per_epoch = math.ceil(len(train_ex) / global_batch)
    total_steps = steps_per_epoch * args.epochs
    controller = method.controller(named, optimizer, total_steps)
    gen = torch.Generator().manual_seed(args.seed)
    counters = {"step": 0, "best_val_loss": math.inf, "best_epoch": -1, "elapsed": 0.0}
    if ckpt:
        names = {p: n for n, p in parts.named_parameters() if p.requires_grad}
        counters, extra = checkpoint.load_checkpoint(ckpt / "state.safetensors", optimizer, names, {"train": gen})
        controller.load_state(extra)
        if is_main:
            print(f"resuming {run} at step {counters['step']}")
    if is_main:
        log = read_log(run, counters["step"])
        with weights.atomic_write(run / "log.jsonl", "w") as f:
            f.writelines(json.dumps(line) + "\n" for line in log)

    fractions = {part: adapters.trainable_fraction(getattr(sd, part))[2] for part in ("unet", "text_encoder")}
    if is_main:
        print(f"{args.method}: {len(named)} adapted layers; trainable {fractions['unet']:.3f}% of the UNet, "
              f"{fractions['text_encoder']:.3f}% of the text encoder; {len(train_ex)} training images, "
              f"{len(val_ex)} validation; {train_ex.truncated + val_ex.truncated} captions truncated to 77 tokens"
              + (f"; {distributed.world_size()} processes of batch {args.batch}" if distributed.world_size() > 1 else ""))
    started = time.time() - counters["elapsed"]
    logfile = open(run / "log.jsonl" if is_main else os.devnull, "a")
    bar = tqdm(total=total_steps, initial=counters["step"], desc=args.method, unit="step", disable=not is_main)
    try:
        for epoch in range(counters["step"] // steps_per_epoch, args.epochs):
            order = torch.randperm(len(train_ex), generator=torch.Generator().manual_seed(args.seed * 100_003 + epoch))
            for i, index in enumerate(order.split(global_batch)):
                step = epoch * steps_per_epoch + i + 1
                if step <= counters["step"]:
                    continue  # resumed mid-epoch: these batches were trained before the interruption
                tic = time.time()
                batch = diffusion_batch(train_ex, index, gen)  # the global batch, in every process
                loss = train_step(sd, batch, step, controller, optimizer, params, autocast)
                if not math.isfinite(loss):
                    raise TrainingError(f"step {step}: the loss is {loss}; stopping. The last good "
                                        f"checkpoint is in {run / 'checkpoint'} (try a lower --lr or --precision fp32)")
                optimizer.step()
                events = controller.step()
                ranks = controller.ranks()
                line = {"step": step, "epoch": epoch, "loss": loss, "lr": optimizer.param_groups[0]["lr"],
                        "total_rank": sum(ranks.values()), "trainable": sum(p.numel() for p in params),
                        "step_time": time.time() - tic}
                if events:
                    line["events"] = events
                if step % MEMORY_EVERY == 0 or step == 1:
                    line["memory_mib"], line["memory_kind"] = memory_mib(device)
                logfile.write(json.dumps(line) + "\n")
                logfile.flush()
                counters["step"] = step
                bar.set_postfix(loss=f"{loss:.4f}", rank=line["total_rank"])
                bar.update()
                last_of_epoch = i == steps_per_epoch - 1
                if last_of_epoch:
                    val = validation_loss(sd, val_ex, args, autocast)
                    logfile.write(json.dumps({"step": step, "epoch": epoch, "val_loss": val}) + "\n")
                    logfile.flush()
                    if val < counters["best_val_loss"] or (math.isnan(val) and epoch == args.epochs - 1):
                        # no validation part (e.g. Montgomery's 80/20): the best adapter is the last one
                        counters["best_val_loss"], counters["best_epoch"] = val, epoch
                        if is_main:
                            adapters.save_adapters(named, run / "best.safetensors",
                                                   adapter_metadata(sd, controller, step))
                if is_main and (last_of_epoch or step % args.checkpoint_every == 0):
                    counters["elapsed"] = time.time() - started
                    save_training_state(run, sd, named, optimizer, controller, gen, counters)
                if args.stop_after and step >= args.stop_after:
                    if is_main:
                        print(f"stopped after step {step} (--stop-after); continue with --resume {run}")
                    return run
    finally:
        bar.close()
        logfile.close()
    if not is_main:
        return run

    adapters.save_adapters(named, run / "last.safetensors", adapter_metadata(sd, controller, counters["step"]))
    log = read_log(run, counters["step"])
    ranks = controller.ranks()
    figures = draw_figures(run, log, ranks, sd.unet.config.num_res_blocks)
    memory = [line["memory_mib"] for line in log if "memory_mib" in line]
    summary = {
        "method": args.method, "base_model": sd.name, "steps": counters["step"], "epochs": args.epochs,
        "time_s": time.time() - started, "peak_memory_mib": max(memory) if memory else None,
        "memory_kind": memory_mib(device)[1], "device": str(device),
        "trainable_percent": fractions, "adapted_layers": len(named), "total_rank": sum(ranks.values()),
        "best_epoch": counters["best_epoch"], "best_val_loss": counters["best_val_loss"],
        "truncated_captions": train_ex.truncated + val_ex.truncated, "skipped_data": dataset.skipped_counts(),
        "expansions": sum(len([e for e in line.get("events", []) if e.get("expanded")]) for line in log),
        "figures": figures, "final_ranks": ranks,
    }
    write_json(run / "summary.json", summary)
    del sd, named, optimizer, controller
    export_best(args, run, dataset, split)
    print(f"done: {run} (best epoch {counters['best_epoch']}, total rank {summary['total_rank']})")
    return run


def export_best(args: argparse.Namespace, run: Path, dataset: data.DataSet, split: dict[str, list[str]]) -> None:
    """Load the best adapter into a fresh model; export it in the kohya format, and generate a few images from
    held-out prompts beside the real images (run/previews/; eval_fid.py --runs generates the whole test split)."""
    sd = load_model(args.model, args.tokenizer, args.seed)
    best = sample.load_adapter(sd, run / "best.safetensors")
    export_kohya(best, sd.unet.config, run / "best.kohya.safetensors", {"base_model": sd.name})
    if not args.samples:
        return
    names = (split["test"] or split["validation"] or split["train"])[:args.samples]
    examples = data.select(dataset, names, run / "split.json")
    sd.to(args.device)
    images = generate(sd, [e.caption for e in examples], args.sample_steps, seed=args.seed, size=args.size,
                      batch=args.batch, scheduler=args.scheduler)
    real = torch.stack([data.load_image(e.path, args.size) for e in examples])
    sample.write_images(torch.cat([real, images]), run / "previews")
    sample.write_sampling(run / "previews", args.scheduler, args.sample_steps, 7.5, 0.0, args.seed, args.size)
    write_json(run / "previews" / "prompts.json", {"real": names, "prompts": [e.caption for e in examples]})


def main(argv: list[str] | None = None) -> int:
    args = resolve(parser().parse_args(argv))
    try:
        train(args)
    except TrainingError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except distributed.Stopped as err:
        print(f"error: process {distributed.rank()} of {distributed.world_size()}: the run stopped because another process "
              f"failed or was stopped ({err}). torchrun's report names the first failure. Continue from the last "
              f"checkpoint with: torchrun --nproc_per_node N train.py --resume {args.out}", file=sys.stderr)
        return 1
    finally:
        distributed.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
