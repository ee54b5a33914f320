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
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

import adapters
import checkpoint
import cli
import data
import distributed
import lora2
import methods
import plots
import run_folder
import sample
import weights
from baselines import Controller
from kohya import export_kohya
from sampling import MAX_STEPS, NUM_TRAIN_TIMESTEPS, SCHEDULERS, add_noise
from sd15 import SD15, generate, load_model
from vae import posterior_to_latents

PAPER_EPOCHS = {"iu-xray": 10, "montgomery": 100}  # section 4; other data sets default to 10
PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
MEMORY_EVERY = 40  # steps between memory readings (appendix D)
EMBEDDED = dict(size=48, epochs=24, images=96)  # the embedded default: 240 steps, so t = 40 gives 6 tests
# options a resumed run may change; every other option given with --resume must equal the run's own
RESUMABLE = ("epochs", "device", "checkpoint_every", "timeout", "stop_after", "samples", "scheduler", "sample_steps",
             "latent_cache", "gradient_checkpointing")
INVOCATION = ("timeout", "stop_after")  # options of one invocation: a resumed run takes today's, not the saved ones
PATHS = ("model", "tokenizer", "data", "latent_cache", "out")  # compared as resolved paths on resume


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
    a("--per-subtype", type=cli.integer(1), help="PatchGastric: sample this many pairs per subtype (appendix C.2: 1000)")
    a("--method", default="selora", choices=methods.METHODS, help="adapter method (default: selora)")
    a("--targets", nargs="+", help="glob patterns of linear layers to adapt (default: every nn.Linear, as the paper)")
    a("--lam", type=cli.number(1.0), default=1.1,
      help="SeLoRA threshold lambda on the FI-ratio, >= 1 (paper: 1.1; the ratio is never below 1, so 1 accepts any "
           "improvement)")
    a("--t", type=cli.integer(1), default=40, help="SeLoRA: test for expansion every t steps (paper: 40)")
    a("--fisher", default="sample", choices=("sample", "batch"),
      help="SeLoRA Fisher estimator: per-sample (eq. 3, default) or squared batch gradient (authors' script)")
    a("--rank", type=cli.integer(1), default=4, help="LoRA / DyLoRA rank (paper: 4)")
    a("--dylora-mode", default="full", choices=("full", "frozen"), help="DyLoRA: train ranks 1..b, or rank b only")
    a("--init-r", type=cli.integer(1), default=6, help="AdaLoRA initial rank (paper: 6)")
    a("--target-r", type=cli.integer(1), default=4, help="AdaLoRA target rank, at most --init-r (paper: 4)")
    a("--rate-lr", type=cli.number(0.0, inclusive=False), default=1e-2,
      help="LoRA^2: learning rate of the per-layer rates (see lora2.param_groups)")
    a("--size", type=cli.image_size, help="image size in pixels, a multiple of 8 (paper: 224, 384 as an option; embedded "
                                f"default: {EMBEDDED['size']})")
    a("--epochs", type=cli.integer(1), help="epochs (paper: 10 for IU X-Ray, 100 for Montgomery)")
    a("--batch", type=cli.integer(1), default=8, help="batch size per process (paper: 8; under torchrun the global batch "
                                                  "is this times the number of processes)")
    a("--lr", type=cli.number(0.0, inclusive=False), default=1e-4, help="learning rate (paper: 1e-4)")
    a("--optimizer", default="adam", choices=("adam", "adamw"), help="paper: Adam")
    a("--weight-decay", type=cli.number(0.0), default=0.0)
    a("--precision", default="fp32", choices=sorted(PRECISIONS),
      help="frozen weights' precision; adapters and optimizer stay fp32 (default fp32)")
    a("--gradient-checkpointing", action="store_true",
      help="recompute the activations of the UNet's blocks and the text encoder's layers in backward instead of "
           "keeping them: less memory, more time, the same results")
    a("--device", type=cli.device, help="cuda, cpu, ... (default: cuda when available; under torchrun cuda:LOCAL_RANK)")
    a("--timeout", type=cli.number(0.0, inclusive=False), default=30.0,
      help="torchrun: minutes a process waits for the others in a collective before the run fails (default 30)")
    a("--seed", type=cli.integer(0, cli.SEEDS - 1), default=0)
    a("--data-seed", type=cli.integer(0, cli.SEEDS - 1),
      help="seed of the split and of the data's sampling (default: --seed); reproduce.py gives all its runs one, so "
           "every method and seed shares one split")
    a("--out", help="run folder (default: runs/default, or runs/<method>-<dataset>-seed<seed>)")
    again = p.add_mutually_exclusive_group()
    again.add_argument("--overwrite", action="store_true",
                       help="replace an existing run folder (only a folder train.py made; see README, Reliability)")
    again.add_argument("--resume", metavar="RUN", help="continue the run in this folder from its last checkpoint "
                                                       "(from step 0 if it has none yet)")
    a("--checkpoint-every", type=cli.integer(1), default=500, help="steps between checkpoints (also at each epoch end)")
    a("--latent-cache", help="folder for cached VAE latents (default: <run folder's parent>/.latent-cache)")
    a("--samples", type=cli.integer(0), default=4, help="preview images to generate from test prompts at the end (0: none)")
    a("--scheduler", default="pndm", choices=SCHEDULERS,
      help="sampler of those samples (default pndm: SD 1.5's, which made the paper's images)")
    a("--sample-steps", type=cli.integer(1, MAX_STEPS), default=50, help="sampler steps for those samples (default 50)")
    a("--stop-after", type=cli.integer(1), help=argparse.SUPPRESS)  # tests: interrupt after this many steps
    return p


# ------------------------------------------------------------------------------------------ set-up

def given_options(p: argparse.ArgumentParser, argv: list[str] | None) -> dict:
    """The options the command line names explicitly (not those left at their defaults)."""
    unset = object()
    blank = argparse.Namespace(**{key: unset for key in vars(p.parse_args([]))})
    return {k: v for k, v in vars(p.parse_args(argv, namespace=blank)).items() if v is not unset}


def resolve(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse the command line and fill the defaults that depend on other options; a resumed run takes its own
    config.json (`resumed`). Problems with the run folder raise run_folder.RunFolderError."""
    p = parser()
    args = p.parse_args(argv)
    if args.resume:
        return resumed(p, argv, Path(args.resume))
    if args.target_r > args.init_r:
        p.error(f"--target-r {args.target_r} is above --init-r {args.init_r}: AdaLoRA only prunes ranks")
    embedded = args.model is None
    args.data_seed = args.seed if args.data_seed is None else args.data_seed
    args.size = args.size or (EMBEDDED["size"] if embedded else 224)
    args.epochs = args.epochs or (EMBEDDED["epochs"] if embedded and args.data is None
                                  else PAPER_EPOCHS.get(args.dataset, 10))
    args.out = args.out or ("runs/default" if embedded and args.data is None
                            else f"runs/{args.method}-{args.dataset}-seed{args.seed}")
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    run_folder.check_out(args.out, inputs(args))
    return args


def inputs(args: argparse.Namespace) -> dict[str, str | None]:
    """The paths a run reads, which its run folder must stay apart from (run_folder.check_out)."""
    return {"--data": args.data, "--model": args.model, "--tokenizer": args.tokenizer,
            "--latent-cache": args.latent_cache}


def resumed(p: argparse.ArgumentParser, argv: list[str] | None, run: Path) -> argparse.Namespace:
    """The options of the run in `run`, from its config.json. Options that can change safely (RESUMABLE) take
    the values given now; any other option given with a value other than the run's is refused, listed."""
    config = run_folder.read_config(run)
    if not run_folder.started(config):
        raise run_folder.RunFolderError(
            f"--resume {run}: this run's start-up never finished (bad data or model?), so there is nothing to resume; "
            "start it again with the options you want (the folder is replaced without --overwrite)")
    saved = {**vars(p.parse_args([])), "data_seed": config["options"].get("seed"), **config["options"]}
    given = {k: v for k, v in given_options(p, argv).items() if k != "resume"}

    def same(key: str, a, b) -> bool:
        if key in PATHS and a is not None and b is not None:
            return Path(a).resolve() == Path(b).resolve()
        return a == b or (isinstance(a, (list, tuple)) and list(a) == list(b or []))
    differ = [f"--{k.replace('_', '-')} {v!r} (the run's is {saved.get(k)!r})" for k, v in given.items()
              if k not in RESUMABLE and not same(k, v, run if k == "out" else saved.get(k))]
    if differ:
        raise run_folder.RunFolderError(
            f"--resume {run}: these options differ from the run's config.json and cannot change in a resumed run: "
            + "; ".join(differ) + ". Leave them out, or start a new run with another --out")
    epochs = given.get("epochs", saved["epochs"])
    if epochs < saved["epochs"]:
        raise run_folder.RunFolderError(f"--resume {run}: --epochs {epochs} is below the run's {saved['epochs']}; "
                                        "--epochs can only extend a run")
    if epochs != saved["epochs"] and saved["method"] in methods.TOTAL_STEPS_SCHEDULES:
        raise run_folder.RunFolderError(
            f"--resume {run}: {saved['method']}'s schedule is laid out over the run's total steps, so its --epochs "
            f"cannot change when it resumes; start a new run with --epochs {epochs}")
    today = vars(p.parse_args(argv))
    options = {**saved, **{k: today[k] for k in INVOCATION}, **{k: v for k, v in given.items() if k in RESUMABLE},
               "resume": str(run), "out": str(run), "overwrite": False}
    options["batch"] = per_process_batch(run, saved["batch"] * config.get("world_size", 1))
    args = argparse.Namespace(**options)
    run_folder.check_out(run, inputs(args))
    return args


def per_process_batch(run: Path, global_batch: int) -> int:
    """A resumed run keeps its global batch, with any number of processes that divides it."""
    processes = distributed.world_size()
    if global_batch % processes:
        raise run_folder.RunFolderError(
            f"--resume {run}: its global batch is {global_batch}, which {processes} processes cannot share evenly; "
            f"launch a number of processes that divides {global_batch}")
    return global_batch // processes


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
                                        cache, model_key=f"{sd.fingerprints['vae']}|{vae_dtype}")
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

def base_metadata(sd: SD15) -> dict[str, str]:
    """What ties an adapter file to its base model: its name, and the fingerprints of the parts it adapts
    (sample.load_adapter refuses another base model)."""
    return {"base_model": sd.name,
            "base_fingerprint": json.dumps({part: sd.fingerprints[part] for part in ("unet", "text_encoder")})}


def adapter_metadata(sd: SD15, controller, step: int) -> dict[str, str]:
    """What saved adapter files carry besides the tensors: the method's settings, the step, the base model."""
    return {**controller.metadata(), "step": str(step), **base_metadata(sd)}


def save_training_state(run: Path, sd: SD15, named: dict[str, adapters.Adapter], optimizer, controller,
                        gen: torch.Generator, counters: dict) -> None:
    """run/checkpoint/{adapters,state}.safetensors, replaced as a pair: written to checkpoint.tmp/ first, so an
    interruption leaves the previous checkpoint whole."""
    tmp, final, old = (run / name for name in (run_folder.CHECKPOINT_TMP, run_folder.CHECKPOINT,
                                               run_folder.CHECKPOINT_OLD))
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    adapters.save_adapters(named, tmp / "adapters.safetensors", adapter_metadata(sd, controller, counters["step"]))
    names = {p: n for n, p in sd.adaptable().named_parameters() if p.requires_grad}
    checkpoint.save_checkpoint(tmp / "state.safetensors", optimizer, names, {"train": gen}, counters, controller.state())
    if final.exists():
        final.rename(old)
    tmp.rename(final)
    shutil.rmtree(old, ignore_errors=True)


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


# ------------------------------------------------------------------------------------------ set-up, loop, finish

@dataclass
class Training:
    """What the loop works on, built by `start`."""
    args: argparse.Namespace
    run: Path
    device: torch.device
    is_main: bool  # only the main process writes the run folder and prints
    sd: SD15
    dataset: data.DataSet
    split: dict[str, list[str]]
    train_ex: Examples
    val_ex: Examples
    named: dict[str, adapters.Adapter]
    params: list[torch.nn.Parameter]
    optimizer: torch.optim.Optimizer
    controller: Controller
    autocast: torch.autocast
    gen: torch.Generator  # latents, noise and t of every batch
    counters: dict  # step, best_val_loss, best_epoch, elapsed, trainable_percent: what a checkpoint carries
    steps_per_epoch: int
    total_steps: int
    started: float = 0.0  # time.time() at step 0, less the time trained before a resume


def write_config(run: Path, args: argparse.Namespace, started: bool) -> None:
    """RUN/config.json: the run's options (those of one invocation, like --stop-after, left out) and whether its
    start-up has succeeded. A resumed run with unchanged options leaves the file as it is."""
    options = {**vars(args), "resume": None, "overwrite": False, "stop_after": None}
    config = {"options": options, "started": started, "world_size": distributed.world_size(), "seed": args.seed}
    if (run / run_folder.CONFIG).is_file():
        old = run_folder.read_config(run)
        if {k: old.get(k) for k in config} == json.loads(json.dumps(config)):
            return
    write_json(run / run_folder.CONFIG, {**config, "code_version": code_version(), "torch": torch.__version__})


def start(args: argparse.Namespace) -> Training:
    """The set-up: run folder, model, data and cached latents, adapters, optimizer, controller, and a
    resumed run's checkpoint. Every problem with the user's input surfaces here, before the first step; the
    run counts as started (config.json "started") only once all of it has succeeded."""
    device = distributed.init(args.device, args.timeout)  # under torchrun; else torch.device(args.device)
    is_main = distributed.is_main()
    run = Path(args.out)
    if is_main:
        if not args.resume:
            run_folder.prepare(run, args.overwrite)
            write_config(run, args, started=False)
        if args.model is None:
            print("Embedded default: a tiny random SD 1.5 architecture"
                  + (" and generated phantoms" if args.data is None else "")
                  + ". This shows the mechanics of the run, not image quality. For the paper's run give "
                    "--model SD15_FOLDER_OR_FILE --data DATA --dataset iu-xray|montgomery|folder (see README).")
    torch.manual_seed(args.seed)  # adapter initialisation, the same in every process
    sd = load_model(args.model, args.tokenizer, args.seed).to(device)
    sd.unet.gradient_checkpointing = sd.text_encoder.gradient_checkpointing = args.gradient_checkpointing
    if args.size % sd.latent_factor:
        raise ValueError(f"--size {args.size}: must be a multiple of {sd.latent_factor}, this model's VAE factor")
    with distributed.main_first():  # the main process writes split, phantoms and latent cache; the others read them
        if not (run / run_folder.CONFIG).is_file():
            raise ValueError(f"process {distributed.rank()}: {run / run_folder.CONFIG} is not there: every machine "
                             "of a multi-machine run must see the run folder (--out on a shared file system)")
        dataset, split = load_data(args, run)
        cache = Path(args.latent_cache) if args.latent_cache else run.parent / ".latent-cache"
        train_ex = Examples(sd, data.select(dataset, split["train"], run / run_folder.SPLIT), args, cache)
        val_ex = Examples(sd, data.select(dataset, split["validation"], run / run_folder.SPLIT), args, cache)
    if not len(train_ex):
        raise ValueError(f"{run / run_folder.SPLIT}: the training part is empty")

    method = methods.build(args.method, **method_options(args))
    parts = sd.adaptable()
    ckpt = run_folder.last_checkpoint(run) if args.resume else None
    if ckpt:
        named = adapters.load_adapters(parts, ckpt / "adapters.safetensors", method.make_adapter)[0]
    else:
        named = adapters.inject(parts, method.make_adapter, args.targets)
    fractions = {part: adapters.trainable_fraction(getattr(sd, part))[2] for part in ("unet", "text_encoder")}
    if args.precision != "fp32":  # frozen weights in low precision; adapters (trainable) stay fp32
        for p in parts.parameters():
            if not p.requires_grad:
                p.data = p.data.to(PRECISIONS[args.precision])
    parts.to(device)
    params = [p for p in parts.parameters() if p.requires_grad]
    groups = lora2.param_groups(named, args.lr, args.rate_lr) if args.method == "lora2" else params
    opt_class = torch.optim.AdamW if args.optimizer == "adamw" else torch.optim.Adam
    optimizer = opt_class(groups, lr=args.lr, weight_decay=args.weight_decay)
    steps_per_epoch = math.ceil(len(train_ex) / (args.batch * distributed.world_size()))
    total_steps = steps_per_epoch * args.epochs
    controller = method.controller(named, optimizer, total_steps)
    gen = torch.Generator().manual_seed(args.seed)
    counters = {"step": 0, "best_val_loss": math.inf, "best_epoch": -1, "elapsed": 0.0, "trainable_percent": fractions}
    if ckpt:
        names = {p: n for n, p in parts.named_parameters() if p.requires_grad}
        counters, extra = checkpoint.load_checkpoint(ckpt / "state.safetensors", optimizer, names, {"train": gen})
        controller.load_state(extra)
        counters.setdefault("trainable_percent", fractions)  # checkpoints written before it was carried
    if is_main:
        if args.resume:
            print(f"resuming {run} at step {counters['step']}" if ckpt else
                  f"resuming {run}: it has no checkpoint yet, so it starts again from step 0 with its saved options")
        log = run_folder.read_log(run, counters["step"])
        with weights.atomic_write(run / run_folder.LOG, "w") as f:
            f.writelines(json.dumps(line) + "\n" for line in log)
        write_config(run, args, started=True)
        print(f"{args.method}: {len(named)} adapted layers; trainable {fractions['unet']:.3f}% of the UNet, "
              f"{fractions['text_encoder']:.3f}% of the text encoder; {len(train_ex)} training images, "
              f"{len(val_ex)} validation; {train_ex.truncated + val_ex.truncated} captions truncated to 77 tokens"
              + (f"; {distributed.world_size()} processes of batch {args.batch}" if distributed.world_size() > 1 else ""))
    autocast = torch.autocast(device.type, PRECISIONS[args.precision], enabled=args.precision != "fp32")
    return Training(args, run, device, is_main, sd, dataset, split, train_ex, val_ex, named, params, optimizer,
                    controller, autocast, gen, counters, steps_per_epoch, total_steps)


def fit(tr: Training) -> bool:
    """The training loop, from the step after the checkpoint to the last epoch; False if --stop-after ended it."""
    args, counters = tr.args, tr.counters
    tr.started = time.time() - counters["elapsed"]
    logfile = open(tr.run / run_folder.LOG if tr.is_main else os.devnull, "a")
    bar = tqdm(total=tr.total_steps, initial=counters["step"], desc=args.method, unit="step", disable=not tr.is_main)
    try:
        for epoch in range(counters["step"] // tr.steps_per_epoch, args.epochs):
            order = torch.randperm(len(tr.train_ex), generator=torch.Generator().manual_seed(args.seed * 100_003 + epoch))
            for i, index in enumerate(order.split(args.batch * distributed.world_size())):
                step = epoch * tr.steps_per_epoch + i + 1
                if step <= counters["step"]:
                    continue  # resumed mid-epoch: these batches were trained before the interruption
                tic = time.time()
                batch = diffusion_batch(tr.train_ex, index, tr.gen)  # the global batch, in every process
                loss = train_step(tr.sd, batch, step, tr.controller, tr.optimizer, tr.params, tr.autocast)
                if not math.isfinite(loss):
                    raise TrainingError(f"step {step}: the loss is {loss}; stopping. The last good checkpoint is in "
                                        f"{tr.run / run_folder.CHECKPOINT} (try a lower --lr or --precision fp32)")
                tr.optimizer.step()
                events = tr.controller.step()
                line = step_line(tr, step, epoch, loss, events, tic)
                write_line(logfile, line)
                counters["step"] = step
                bar.set_postfix(loss=f"{loss:.4f}", rank=line["total_rank"])
                bar.update()
                last_of_epoch = i == tr.steps_per_epoch - 1
                if last_of_epoch:
                    end_of_epoch(tr, logfile, step, epoch)
                if tr.is_main and (last_of_epoch or step % args.checkpoint_every == 0):
                    counters["elapsed"] = time.time() - tr.started
                    save_training_state(tr.run, tr.sd, tr.named, tr.optimizer, tr.controller, tr.gen, counters)
                if args.stop_after and step >= args.stop_after:
                    if tr.is_main:
                        print(f"stopped after step {step} (--stop-after); continue with --resume {tr.run}")
                    return False
    finally:
        bar.close()
        logfile.close()
    return True


def step_line(tr: Training, step: int, epoch: int, loss: float, events: list[dict], tic: float) -> dict:
    """One step's log.jsonl line; memory every MEMORY_EVERY steps and at step 1 (appendix D)."""
    line = {"step": step, "epoch": epoch, "loss": loss, "lr": tr.optimizer.param_groups[0]["lr"],
            "total_rank": sum(tr.controller.ranks().values()), "trainable": sum(p.numel() for p in tr.params),
            "step_time": time.time() - tic}
    if events:
        line["events"] = events
    if step % MEMORY_EVERY == 0 or step == 1:
        line["memory_mib"], line["memory_kind"] = memory_mib(tr.device)
    return line


def write_line(logfile, line: dict) -> None:
    logfile.write(json.dumps(line) + "\n")
    logfile.flush()


def end_of_epoch(tr: Training, logfile, step: int, epoch: int) -> None:
    """Validation loss, logged; the best adapter so far saved (with no validation part, e.g. Montgomery's 80/20,
    the best adapter is the last one)."""
    val = validation_loss(tr.sd, tr.val_ex, tr.args, tr.autocast)
    write_line(logfile, {"step": step, "epoch": epoch, "val_loss": val})
    counters = tr.counters
    if val < counters["best_val_loss"] or (math.isnan(val) and epoch == tr.args.epochs - 1):
        counters["best_val_loss"], counters["best_epoch"] = val, epoch
        if tr.is_main:
            adapters.save_adapters(tr.named, tr.run / "best.safetensors", adapter_metadata(tr.sd, tr.controller, step))


def finish(tr: Training) -> dict:
    """The last adapter, figures and summary.json (main process only); returns the summary."""
    args, run, counters = tr.args, tr.run, tr.counters
    adapters.save_adapters(tr.named, run / "last.safetensors", adapter_metadata(tr.sd, tr.controller, counters["step"]))
    log = run_folder.read_log(run, counters["step"])
    ranks = tr.controller.ranks()
    figures = draw_figures(run, log, ranks, tr.sd.unet.config.num_res_blocks)
    memory = [line["memory_mib"] for line in log if "memory_mib" in line]
    summary = {
        "method": args.method, "base_model": tr.sd.name, "steps": counters["step"], "epochs": args.epochs,
        "time_s": time.time() - tr.started, "peak_memory_mib": max(memory) if memory else None,
        "memory_kind": memory_mib(tr.device)[1], "device": str(tr.device),
        "trainable_percent": counters["trainable_percent"], "adapted_layers": len(tr.named),
        "total_rank": sum(ranks.values()), "best_epoch": counters["best_epoch"],
        "best_val_loss": counters["best_val_loss"], "truncated_captions": tr.train_ex.truncated + tr.val_ex.truncated,
        "skipped_data": tr.dataset.skipped_counts(), "final_ranks": ranks, "figures": figures,
        "expansions": sum(len([e for e in line.get("events", []) if e.get("expanded")]) for line in log),
    }
    write_json(run / "summary.json", summary)
    return summary


def export_best(args: argparse.Namespace, run: Path, dataset: data.DataSet, split: dict[str, list[str]]) -> None:
    """Load the best adapter into a fresh model; export it in the kohya format, and generate a few images from
    held-out prompts beside the real images (run/previews/; eval_fid.py --runs generates the whole test split)."""
    sd = load_model(args.model, args.tokenizer, args.seed)
    best = sample.load_adapter(sd, run / "best.safetensors")
    export_kohya(best, sd.unet.config, run / "best.kohya.safetensors", base_metadata(sd))
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
    """Run train.py; 2 for input a user must fix (said in one line, before any training), 1 for a run that
    stopped (a non-finite loss, another process's failure), 0 when done."""
    try:
        try:
            args = resolve(argv)
            tr = start(args)
        except (ValueError, OSError) as err:  # bad options, files, folders: the message names them
            print(f"error: {err}", file=sys.stderr)
            return 2
        if fit(tr) and tr.is_main:
            summary = finish(tr)
            run, dataset, split = tr.run, tr.dataset, tr.split
            del tr  # the trained model's memory, before export_best loads a fresh one
            export_best(args, run, dataset, split)
            print(f"done: {run} (best epoch {summary['best_epoch']}, total rank {summary['total_rank']})")
    except TrainingError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except distributed.Stopped as err:
        print(f"error: process {distributed.rank()} of {distributed.world_size()}: the run stopped because another "
              f"process failed or was stopped ({err}). torchrun's report names the first failure. Continue from the "
              f"last checkpoint with: torchrun --nproc_per_node N train.py --resume {args.out}", file=sys.stderr)
        return 1
    finally:
        distributed.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
