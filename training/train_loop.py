"""train.py's run once it is set up (`train.start` builds the `Training`): the loop of steps and epochs (`fit`),
each step's log line, the validation loss and best adapter after each epoch, checkpoints for --resume, and the
last adapter, figures (`run_figures`) and summary (`finish`).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import resource
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from data import datasets
from fast import distributed
from methods import adapters
from methods.adapters import Controller
from model.sd15 import SD15
from training import checkpoint, diffusion, run_folder
from training.plots import line_plot, rank_heatmap, save_png, text_encoder_layout, unet_layout

MEMORY_EVERY = 40  # steps between memory readings (appendix D)


class TrainingError(RuntimeError):
    """A run that cannot go on (e.g. a non-finite loss); the last good checkpoint is kept."""


def memory_mib(device: torch.device) -> tuple[float, str]:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20, "gpu_peak_allocated"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "process_peak_rss"


def base_metadata(sd: SD15) -> dict[str, str]:
    """What ties an adapter file to its base model: its name, and the fingerprints of the parts it adapts
    (methods.load_adapter refuses another base model)."""
    return {"base_model": sd.name,
            "base_fingerprint": json.dumps({part: sd.fingerprints[part] for part in ("unet", "text_encoder")})}


def adapter_metadata(sd: SD15, controller, step: int) -> dict[str, str]:
    """What saved adapter files carry besides the tensors: the method's settings, the step, the base model."""
    return {**controller.metadata(), "step": str(step), **base_metadata(sd)}


@dataclass
class Training:
    """What the loop works on, built by `start`."""
    args: argparse.Namespace
    run: Path
    device: torch.device
    is_main: bool  # only the main process writes the run folder and prints
    sd: SD15
    dataset: datasets.DataSet
    split: dict[str, list[str]]
    train_ex: diffusion.Examples
    val_ex: diffusion.Examples
    named: dict[str, adapters.Adapter]
    params: list[torch.nn.Parameter]
    compiled: SD15 | None  # --compile: sd with its UNet and text encoder compiled (fast.torch_compile.compiled)
    optimizer: torch.optim.Optimizer
    controller: Controller
    autocast: torch.autocast
    gen: torch.Generator  # latents, noise and t of every batch
    counters: dict  # step, best_val_loss, best_epoch, elapsed, trainable_percent: what a checkpoint carries
    steps_per_epoch: int
    total_steps: int
    started: float = 0.0  # time.time() at step 0, less the time trained before a resume


def fit(training: Training) -> bool:
    """The training loop, from the step after the checkpoint to the last epoch; False if --stop-after ended it."""
    args, counters = training.args, training.counters
    training.started = time.time() - counters["elapsed"]
    logfile = open(training.run / run_folder.LOG if training.is_main else os.devnull, "a")
    bar = tqdm(total=training.total_steps, initial=counters["step"], desc=args.method, unit="step", disable=not training.is_main)
    try:
        for epoch in range(counters["step"] // training.steps_per_epoch, args.epochs):
            order = torch.randperm(len(training.train_ex), generator=torch.Generator().manual_seed(args.seed * 100_003 + epoch))
            for i, index in enumerate(order.split(args.batch * distributed.world_size())):
                step = epoch * training.steps_per_epoch + i + 1
                if step <= counters["step"]:
                    continue  # resumed mid-epoch: these batches were trained before the interruption
                tic = time.time()
                batch = diffusion.noisy_batch(training.train_ex, index, training.gen,  # the global batch, in every process
                                              args.caption_dropout or 0.0)  # None: a run from before the option
                loss = diffusion.train_step(training.sd, batch, step, training.controller, training.optimizer, training.params, training.autocast,
                                            training.compiled)
                bad = None if math.isfinite(loss) else f"the loss is {loss}"
                bad = bad or checkpoint.non_finite(training.named, "the gradient of", grad=True)
                if bad:
                    raise TrainingError(checkpoint.stopped_at(training.run, step, bad, trained=step > 1))
                training.optimizer.step()
                if training.controller.second_pass(step):  # SeLoRA --expansion-test script
                    diffusion.second_pass(training.sd, batch, step, training.controller, training.params, training.autocast)
                events = training.controller.step()
                bad = checkpoint.non_finite(training.named, "the update made")
                if bad:
                    raise TrainingError(checkpoint.stopped_at(training.run, step, bad))
                log_step(training, logfile, bar, step, epoch, loss, events, tic)
                last_of_epoch = i == training.steps_per_epoch - 1
                if last_of_epoch:
                    end_of_epoch(training, logfile, step, epoch)
                if training.is_main and (last_of_epoch or step % args.checkpoint_every == 0):
                    save_checkpoint(training, step)
                if args.stop_after and step >= args.stop_after:
                    if training.is_main:
                        print(f"stopped after step {step} (--stop-after); continue with --resume {training.run}")
                    return False
    finally:
        bar.close()
        logfile.close()
    return True


def log_step(training: Training, logfile, bar: tqdm, step: int, epoch: int, loss: float, events: list[dict],
             tic: float) -> None:
    """One step's log.jsonl line and progress bar; memory every MEMORY_EVERY steps and at step 1 (appendix D)."""
    line = {"step": step, "epoch": epoch, "loss": loss, "lr": training.optimizer.param_groups[0]["lr"],
            "total_rank": sum(training.controller.ranks().values()), "trainable": adapters.trainable_count(training.named),
            "step_time": time.time() - tic}
    if events:
        line["events"] = events
    if step % MEMORY_EVERY == 0 or step == 1:
        line["memory_mib"], line["memory_kind"] = memory_mib(training.device)
    write_line(logfile, line)
    training.counters["step"] = step
    bar.set_postfix(loss=f"{loss:.4f}", rank=line["total_rank"])
    bar.update()


def save_checkpoint(training: Training, step: int) -> None:
    """RUN/checkpoint/: the adapters, the optimizer, the generator and the counters, for --resume."""
    training.counters["elapsed"] = time.time() - training.started
    try:
        checkpoint.save_training_state(training.run, training.sd.adaptable(), training.named, training.optimizer, training.controller, training.gen,
                                       training.counters, adapter_metadata(training.sd, training.controller, step))
    except OSError as err:  # a full disk, a file-size limit: the previous checkpoint is whole
        raise TrainingError(f"step {step}: writing the checkpoint into {training.run / run_folder.CHECKPOINT_TMP} failed "
                            f"({err.strerror or err}); the previous checkpoint, if any, is kept. Make room, then "
                            f"resume with --resume {training.run}") from None


def write_line(logfile, line: dict) -> None:
    logfile.write(json.dumps(line) + "\n")
    logfile.flush()


def end_of_epoch(training: Training, logfile, step: int, epoch: int) -> None:
    """Validation loss, logged; the best adapter so far saved (with no validation part, e.g. Montgomery's 80/20,
    the best adapter is the last one)."""
    val = diffusion.validation_loss(training.sd, training.val_ex, training.args.batch, training.args.seed, training.autocast)
    write_line(logfile, {"step": step, "epoch": epoch, "val_loss": val})
    counters = training.counters
    if val < counters["best_val_loss"] or (math.isnan(val) and epoch == training.args.epochs - 1):
        counters["best_val_loss"], counters["best_epoch"] = val, epoch
        if training.is_main:
            adapters.save_adapters(training.named, training.run / "best.safetensors", adapter_metadata(training.sd, training.controller, step))


def finish(training: Training) -> dict:
    """The last adapter and figures (main process only); returns the summary, which main writes to summary.json
    last, once everything else is written: a run with summary.json is finished."""
    args, run, counters = training.args, training.run, training.counters
    adapters.save_adapters(training.named, run / "last.safetensors", adapter_metadata(training.sd, training.controller, counters["step"]))
    log = run_folder.read_log(run, counters["step"])
    ranks = training.controller.ranks()
    figures = run_figures(run, log, ranks, training.sd.unet.config.num_res_blocks)
    memory = [line["memory_mib"] for line in log if "memory_mib" in line]
    summary = {
        "method": args.method, "base_model": training.sd.name, "steps": counters["step"], "epochs": args.epochs,
        "time_s": time.time() - training.started, "peak_memory_mib": max(memory) if memory else None,
        "memory_kind": memory_mib(training.device)[1], "device": str(training.device),
        "trainable_percent": counters["trainable_percent"], "adapted_layers": len(training.named),
        "total_rank": sum(ranks.values()), "best_epoch": counters["best_epoch"],
        "best_val_loss": counters["best_val_loss"], "truncated_captions": training.train_ex.truncated + training.val_ex.truncated,
        "skipped_data": training.dataset.skipped_counts(), "final_ranks": ranks, "figures": figures,
        "expansions": sum(len([e for e in line.get("events", []) if e.get("expanded")]) for line in log),
    }
    return summary


def run_figures(folder: Path, log: list[dict], ranks: dict[str, int], layers_per_block: int) -> list[str]:
    """A train.py run's figures from its log.jsonl lines and final ranks, written into `folder`: loss.png,
    rank_growth.png, memory.png, and the rank heatmaps rank_unet.png (figure 4) and rank_text_encoder.png
    (figure 3). Returns the names written."""
    steps = [line for line in log if "loss" in line]
    epochs = [line for line in log if "val_loss" in line]
    figures = {
        "loss.png": line_plot({"training loss": ([s["step"] for s in steps], [s["loss"] for s in steps]),
                               "validation loss": ([e["step"] for e in epochs], [e["val_loss"] for e in epochs])},
                              "Training and validation loss", "step", "MSE"),
        "rank_growth.png": line_plot({"total rank": ([s["step"] for s in steps], [s["total_rank"] for s in steps])},
                                     "Rank growth", "step", "sum of ranks over layers"),
    }
    memory = [s for s in steps if "memory_mib" in s]
    if memory:
        figures["memory.png"] = line_plot({memory[0]["memory_kind"]: ([s["step"] for s in memory],
                                                                      [s["memory_mib"] for s in memory])},
                                          "Memory", "step", "MiB")
    unet = {n: r for n, r in ranks.items() if n.startswith("unet.")}
    text = {n: r for n, r in ranks.items() if n.startswith("text_encoder.")}
    if unet and unet_layout(list(unet), layers_per_block).cells:
        figures["rank_unet.png"] = rank_heatmap(unet, unet_layout(list(unet), layers_per_block),
                                                "UNet: final rank per layer")
    if text and text_encoder_layout(list(text)).cells:
        figures["rank_text_encoder.png"] = rank_heatmap(text, text_encoder_layout(list(text)),
                                                        "Text encoder: final rank per layer", xlabel="Layer")
    for name, image in figures.items():
        save_png(image, folder / name)
    return sorted(figures)
