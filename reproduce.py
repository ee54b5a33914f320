"""The paper's study in one command (issue 9): every method and seed trained on one split, each run's test
images generated and scored, and OUT/report.md with the paper's tables and the answers its reviewers asked for.

    python reproduce.py --model SD15 --dataset iu-xray --data IU_XRAY --out study/ \
        [--methods lora dylora adalora selora lora2] [--seeds 0 1 2] [--inception FILE] [--clip DIR]
    python reproduce.py --smoke --out smoke/ [--inception FILE]   # the embedded tiny model, a few phantoms, CPU minutes
    python reproduce.py --mini --out mini/     # the whole study on the embedded tiny model and 400 phantoms, scored
                                               # by the phantom reader (docs/mini-study.md; about 30 CPU minutes)

Runs: each method x seed, then SeLoRA's threshold ablation (table 3: lambda 1, 1.1, 1.3 at t = --t) and a sweep
of t (20, 40, 80 at lambda = --lam), over --ablation-seeds; a run both need is trained once. SeLoRA grows by
one rule, --expansion-test: the paper's (default) or the authors' script's (methods/selora_script.py), each with its
own lambda and ablation grid (LAMBDAS). Under the paper's rule lambda = 1 grows every layer at every test, so
those runs stop at --cap-rank (16), and the report says so. Every run is a
train.py run folder, OUT/runs/NAME/, trained in its own process (so its memory readings are its own) with the
same --data-seed, so all runs share one split. Options reproduce.py does not know are passed to every train.py
run (e.g. --precision bf16, --split 70,10,20, --empty-findings impression).

Resumable: a run with summary.json is done; one with a checkpoint continues with train.py --resume; one
without is started again. Generated images (RUN/samples/, RUN/real/) and scores (RUN/scores.json) are kept,
so a study interrupted at any point continues where it stopped. A finished run made with other options is
an error, not silently mixed in.

Scoring needs weights the user downloads: --inception (pytorch-fid's pt_inception-2015-12-05-6726825d.pth) for
FID and KID, --clip (openai/clip-vit-large-patch14) for the CLIP score. Without them the report says so and
gives every other section. On generated phantoms, --reader assets/readers/phantoms.safetensors (--mini's default)
scores instead by the phantom reader (metrics/readback.py): phantom-FID, KID and caption adherence.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from data import datasets, phantoms
from methods import adapters
from metrics import fid_kid, inception, readback
from model import sampling
from model.sd15 import load_model
from evaluation import heldout, report
from training import cli, method_table, run_folder
import eval_fid
import train

ROOT = Path(__file__).resolve().parent
METHODS = ("lora", "dylora", "adalora", "selora", "lora2")  # the paper's tables' order
SWEPT = {"selora": ("lam", "t")}  # method options the study sets on every run of the method (table 3, the t sweep)
# the threshold ablation's lambdas under each SeLoRA rule: the paper's table 3; the script's own 1.3 (its call),
# its class default 2, and 1, where a layer grows whenever its gradient did not shrink over the step
LAMBDAS = {"paper": (1.0, 1.1, 1.3), "script": (1.0, 1.3, 2.0)}
SCORES = "scores.json"  # RUN/scores.json: what was measured on the run's test images, with what
# train.py options reproduce.py sets itself; passing them through would break the study's layout
OWN = ("--method", "--seed", "--data-seed", "--out", "--resume", "--overwrite", "--lam", "--t", "--samples",
       "--expansion-test",
       "--model", "--tokenizer", "--data", "--dataset", "--epochs", "--size", "--batch", "--device")
NOT_COMPARED = ("out", "overwrite", "resume", "stop_after", "device",  # may change when a study continues
                "gradient_checkpointing", "compile", "compile_mode",  # change no result
                "scheduler", "guidance")  # previews' only, which the study turns off (--samples 0)
SMOKE = dict(methods=["lora", "selora"], seeds=[0, 1], ablation_seeds=[0], t=2, ts=[2, 4, 8], epochs=2, batch=4,
             size=48, sample_steps=4, images=32, split="50,25,25")
# the study at laptop scale: every method x 3 seeds, lambda and t over seed 0, 400 phantoms (280 for training, 80 for
# testing), 12 epochs of 35 steps at train.py's embedded default's lr and the test images at its guidance
MINI = dict(methods=list(METHODS), seeds=[0, 1, 2], ablation_seeds=[0], t=40, ts=[20, 40, 80], epochs=12, batch=8,
            size=train.EMBEDDED["size"], sample_steps=50, guidance=train.EMBEDDED["guidance"], images=400,
            split="70,10,20", lr=train.EMBEDDED["lr"])


@dataclass(frozen=True)
class Run:
    method: str
    seed: int
    options: tuple[tuple[str, float], ...] = ()  # (train.py dest, value): SWEPT options, and a cap (max_rank)

    @property
    def name(self) -> str:
        return (self.method + "".join(f"-{key.replace('_', '')}{value:g}" for key, value in self.options)
                + f"-seed{self.seed}")

    @property
    def lam(self) -> float | None:
        return dict(self.options).get("lam")

    @property
    def t(self) -> int | None:
        return dict(self.options).get("t")


# ------------------------------------------------------------------------------------------ options and plan

def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False)
    a = p.add_argument
    a("--out", required=True, help="study folder: runs/, figures/, report.md")
    a("--model", help="SD 1.5 (diffusers folder or single file); default: train.py's embedded tiny model pretrained on shapes")
    a("--tokenizer", help="with a single-file --model: its tokenizer")
    a("--data", help="data folder (required unless --smoke or --mini)")
    a("--dataset", default="folder", choices=sorted(datasets.PAPER_SPLITS), help="layout of --data")
    a("--methods", nargs="+", choices=METHODS, help=f"default: {' '.join(METHODS)}")
    a("--seeds", nargs="+", type=cli.integer(0, cli.SEEDS - 1), help="training seeds (default: 0 1 2)")
    a("--data-seed", type=cli.integer(0, cli.SEEDS - 1), default=0,
      help="seed of the one split every run uses (default 0)")
    a("--expansion-test", default="paper", choices=method_table.EXPANSION_TESTS,
      help="SeLoRA's growth rule for every SeLoRA run: the paper's (default) or the authors' script's (train.py "
           "--expansion-test); the report names it")
    a("--lam", type=cli.number(1.0), help="SeLoRA lambda of the main runs and the t sweep, >= 1 (default: the "
                                          "rule's, paper 1.1, script 1.3)")
    a("--t", type=cli.integer(1), help="SeLoRA t of the main runs and the lambda ablation (paper: 40)")
    a("--lambdas", nargs="*", type=cli.number(1.0), help="threshold ablation, each >= 1 (table 3; default: the "
                                                         "rule's grid, paper 1 1.1 1.3, script 1 1.3 2); none: skip")
    a("--cap-rank", type=cli.integer(1), default=16,
      help="under the paper's rule, runs at lambda <= 1 (every layer grows at every test: about 80 ranks per layer "
           "over IU X-Ray's 3,300 steps) stop growing at this rank (train.py --max-rank), said in the report "
           "(default 16); a --max-rank passed to train.py caps every run instead")
    a("--ts", nargs="*", type=cli.integer(1), help="sweep of t (default: 20 40 80); none: skip")
    a("--ablation-seeds", nargs="*", type=cli.integer(0, cli.SEEDS - 1),
      help="seeds of the ablation runs (default: --seeds)")
    a("--epochs", type=cli.integer(1), help="default: train.py's (the paper's for the data set)")
    a("--size", type=cli.image_size, help="image size (default: train.py's, 224)")
    a("--batch", type=cli.integer(1), help="batch size (default: train.py's, 8)")
    a("--device", help="cuda, cpu, ... (default: cuda when available)")
    a("--inception", help="pytorch-fid's pt_inception-2015-12-05-6726825d.pth: FID and KID")
    a("--clip", help="openai/clip-vit-large-patch14 folder: CLIP score")
    a("--dims", nargs="+", type=int, default=[2048, 192, 64], choices=inception.DIMS, help="FID feature widths")
    a("--kid-subsets", type=cli.integer(1), default=100)
    a("--fid-sqrtm", default="eigh", choices=fid_kid.FID_SQRTM,
      help="FID's tr sqrt(S1 S2): from eigenvalues, or pytorch-fid's scipy sqrtm (fid_kid.frechet_distance)")
    a("--scheduler", choices=sampling.SCHEDULERS,
      help="sampler of the test images (default pndm: SD 1.5's, which made the paper's images)")
    a("--sample-steps", type=cli.integer(1, sampling.MAX_STEPS), help="sampler steps for the test images (default 50)")
    a("--guidance", type=cli.guidance, help=f"classifier-free guidance of the test images, 0 to 100 (default "
                                            f"{sampling.GUIDANCE:g}, the paper's; --mini: {MINI['guidance']:g})")
    a("--reader", help="instead of --inception and --clip: a domain reader (metrics/readback.py; --mini's default: "
                       "assets/readers/phantoms.safetensors): FID and KID on its features, and caption adherence")
    a("--grid-prompts", type=cli.integer(1), default=6, help="test prompts in the real-vs-generated figure")
    size = p.add_mutually_exclusive_group()
    size.add_argument("--smoke", action="store_true",
                      help="the whole study on the embedded tiny model and generated data, in minutes")
    size.add_argument("--mini", action="store_true", help="the whole study on the embedded tiny model and 400 generated "
                                                          "phantoms, scored by the phantom reader, in about 30 minutes")
    return p


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The study's options: the defaults of a study, of --smoke or of --mini (`generated_study`), and the options
    passed through to every train.py run (`train_options`)."""
    p = parser()
    args, extra = p.parse_known_args(argv)
    taken = [o for o in extra if o.split("=")[0] in OWN]
    if taken:
        p.error(f"{' '.join(taken)}: set by reproduce.py itself (see --help)")
    args.train_options = extra
    defaults = dict(methods=list(METHODS), seeds=[0, 1, 2], t=40, ts=[20, 40, 80], scheduler="pndm", sample_steps=50,
                    guidance=sampling.GUIDANCE)
    args.generated = SMOKE if args.smoke else MINI if args.mini else None  # the embedded model on drawn phantoms
    if args.generated:
        defaults.update(generated_study(p, args, extra))
    elif not args.data:
        p.error("--data is required (or --smoke, or --mini)")
    if args.reader and (args.inception or args.clip):
        p.error("--reader scores instead of --inception and --clip: give one or the other")
    for key, value in defaults.items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    if args.ablation_seeds is None:
        args.ablation_seeds = args.seeds
    args.lam = method_table.rule_defaults(args.expansion_test)["lam"] if args.lam is None else args.lam
    args.lambdas = list(LAMBDAS[args.expansion_test]) if args.lambdas is None else args.lambdas
    args.out = Path(args.out).resolve()
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    args.dims = sorted(set(args.dims), reverse=True)
    return args


def generated_study(p: argparse.ArgumentParser, args: argparse.Namespace, extra: list[str]) -> dict:
    """--smoke or --mini: the embedded tiny model on phantoms drawn into OUT/data, each with its split and lr for
    train.py unless passed through, and --mini scored by the phantom reader unless another scorer is given.
    Returns the study's defaults."""
    if args.data or args.model:
        p.error(f"{'--smoke' if args.smoke else '--mini'} uses the embedded tiny model and generated data: leave out "
                "--model and --data")
    given = {o.split("=")[0] for o in extra}
    own = {"--split": args.generated["split"], "--lr": args.generated.get("lr")}
    args.train_options = [*(o for key, value in own.items() if value and key not in given
                            for o in (key, str(value))), *extra]
    args.data = str(Path(args.out) / "data")
    if args.mini and not (args.reader or args.inception or args.clip):
        args.reader = str(readback.asset("phantoms"))
    return args.generated


def study_run(args: argparse.Namespace, method: str, seed: int, **values) -> Run:
    """The run of `method` and `seed`; its SWEPT options take `values`, else the study's (--lam, --t). A SeLoRA run
    at lambda <= 1 under the paper's rule gets --max-rank --cap-rank (`capped`)."""
    options = tuple((key, values.get(key, getattr(args, key))) for key in SWEPT.get(method, ()))
    if capped(args, method, dict(options).get("lam")):
        options += (("max_rank", args.cap_rank),)
    return Run(method, seed, options)


def capped(args: argparse.Namespace, method: str, lam: float | None) -> bool:
    """Whether a run needs the study's cap on ranks: SeLoRA under the paper's rule at lambda <= 1, whose FI-ratio
    is never below 1, so that every layer would grow at every test, unless train.py's --max-rank caps all runs."""
    given = any(o.split("=")[0] == "--max-rank" for o in args.train_options)
    return method == "selora" and args.expansion_test == "paper" and lam is not None and lam <= 1 and not given


def plan(args: argparse.Namespace) -> list[Run]:
    """Every run of the study, each once: method x seed, then the lambda ablation and the t sweep."""
    runs = [study_run(args, m, s) for m in args.methods for s in args.seeds]
    runs += [study_run(args, "selora", s, lam=lam) for lam in args.lambdas for s in args.ablation_seeds]
    runs += [study_run(args, "selora", s, t=t) for t in args.ts for s in args.ablation_seeds]
    return list(dict.fromkeys(runs))


def folder(args: argparse.Namespace, run: Run) -> Path:
    return args.out / "runs" / run.name


def train_argv(args: argparse.Namespace, run: Run) -> list[str]:
    """train.py's command line for `run`: one data seed for all, no previews (the study generates the test split)."""
    argv = ["--out", str(folder(args, run)), "--method", run.method, "--seed", str(run.seed),
            "--data-seed", str(args.data_seed), "--data", str(Path(args.data).resolve()), "--dataset", args.dataset,
            "--samples", "0", "--device", args.device]
    for flag, value in (("--model", args.model), ("--tokenizer", args.tokenizer)):
        if value:
            argv += [flag, str(Path(value).resolve())]
    for flag, value in (("--epochs", args.epochs), ("--size", args.size), ("--batch", args.batch)):
        if value is not None:
            argv += [flag, str(value)]
    for key, value in run.options:
        argv += [cli.flag(key), str(value)]
    if run.method == "selora":
        argv += ["--expansion-test", args.expansion_test]
    return argv + args.train_options


# ------------------------------------------------------------------------------------------ training

def check_same(run_dir: Path, argv: list[str]) -> None:
    """A run folder from an earlier invocation must have been made with the options this study gives it."""
    planned = vars(train.resolve(argv))
    saved = {**vars(train.parser().parse_args([])), **run_folder.read_options(run_dir)}  # options added since: default
    differ = [f"{k}: {saved.get(k)!r} there, {v!r} now" for k, v in planned.items()
              if k not in NOT_COMPARED and saved.get(k) != v]
    if differ:
        raise ValueError(f"{run_dir}: this run was made with other options ({'; '.join(differ)}); give another "
                         "--out, or delete the run folder to train it again")


def check_runs(args: argparse.Namespace, runs: list[Run]) -> None:
    """Before any training: the inputs exist, and each run folder an earlier invocation finished or checkpointed
    was made with the options this study gives it (`check_same`)."""
    if not args.generated and not Path(args.data).is_dir():
        raise ValueError(f"--data {args.data}: {'not a folder' if Path(args.data).exists() else 'no such folder'}")
    for option in ("model", "tokenizer", "inception", "clip", "reader"):
        path = getattr(args, option)
        if path and not Path(path).exists():
            raise ValueError(f"--{option} {path}: no such file or folder")
    for run in runs:
        run_dir = folder(args, run)
        if (run_dir / "summary.json").is_file() or run_folder.last_checkpoint(run_dir):
            check_same(run_dir, train_argv(args, run))


def train_run(args: argparse.Namespace, run: Run) -> str:
    """Train `run` in its own process unless it is done: 'done', 'trained', 'resumed' or 'failed'."""
    run_dir, argv = folder(args, run), train_argv(args, run)
    finished = (run_dir / "summary.json").is_file()
    resumable = run_folder.last_checkpoint(run_dir) is not None
    if finished:
        return "done"
    # a folder without a checkpoint has nothing worth keeping: it starts again
    command, status = (["--resume", str(run_dir)], "resumed") if resumable else ([*argv, "--overwrite"], "trained")
    print(f"\n== {run.name}: {'resuming' if resumable else 'training'}", flush=True)
    code = subprocess.run([sys.executable, str(ROOT / "train.py"), *command]).returncode
    if (run_dir / "summary.json").is_file():  # finished, here or (refused here) by the command holding its lock
        return status if code == 0 else "done"
    return "failed"


# ------------------------------------------------------------------------------------------ test images and scores

def trainable_at_end(run_dir: Path) -> dict:
    """Trainable % of the UNet and the text encoder with the run's last adapter (its final ranks), as train.py
    counts them at the start (adapters.trainable_fraction), and the UNet's layers per block for the heatmaps."""
    options = run_folder.read_options(run_dir)
    sd = load_model(options["model"], options["tokenizer"])
    method_table.load_adapter(sd, run_dir / "last.safetensors")
    percent = {part: adapters.trainable_fraction(getattr(sd, part))[2] for part in ("unet", "text_encoder")}
    return {"trainable_end": percent, "layers_per_block": sd.unet.config.num_res_blocks}


class Scorer:
    """Inception, CLIP or a domain reader, loaded once, on the first run that needs them."""

    def __init__(self, args: argparse.Namespace):
        self.args, self._inception, self._clip, self._reader = args, None, None, None
        self.inception_key = args.inception and {"file": str(Path(args.inception).resolve()), "dims": args.dims,
                                                 "kid_subsets": args.kid_subsets, "fid_sqrtm": args.fid_sqrtm}
        self.clip_key = args.clip and {"model": str(Path(args.clip).resolve())}
        self.reader_key = args.reader and {"file": str(Path(args.reader).resolve()), "kid_subsets": args.kid_subsets,
                                           "features": "bounded, with intervals"}  # older caches are scored again

    def fid_kid(self, run_dir: Path) -> dict:
        a = self.args
        self._inception = self._inception or inception.load_inception(a.inception).to(a.device)
        real, fake = (eval_fid.inception_features(self._inception, eval_fid.list_images(run_dir / part), tuple(a.dims),
                                                  device=a.device, desc=part) for part in (heldout.REAL, heldout.SAMPLES))
        return {"key": self.inception_key, **fid_kid.fid_kid(real, fake, a.kid_subsets, sqrtm=a.fid_sqrtm)}

    def clip_score(self, run_dir: Path) -> dict:
        self._clip = self._clip or eval_fid.load_clip(self.args.clip, self.args.device)
        files = eval_fid.list_images(run_dir / heldout.SAMPLES)
        prompts = eval_fid.read_prompts(run_dir / heldout.SAMPLES / heldout.PROMPTS)
        return {"key": self.clip_key, **eval_fid.clip_score(*self._clip, files, prompts, device=self.args.device)}

    def reader_scores(self, run_dir: Path) -> dict:
        """FID and KID on the reader's features, and the caption adherence of the generated images."""
        a = self.args
        self._reader = self._reader or readback.load_reader(a.reader).to(a.device)
        (real, _), (fake, images) = (eval_fid.reader_features(self._reader, eval_fid.list_images(run_dir / part),
                                                              device=a.device, desc=part)
                                     for part in (heldout.REAL, heldout.SAMPLES))
        prompts = eval_fid.read_prompts(run_dir / heldout.SAMPLES / heldout.PROMPTS)
        return {"key": self.reader_key, **eval_fid.reader_scores(
            self._reader, *(f[self._reader.domain] for f in (real, fake)), images, prompts, a.kid_subsets)}


def evaluate(args: argparse.Namespace, run: Run, scorer: Scorer) -> dict:
    """The run's test split generated once (heldout.ensure_test_split), its trainable % at the end, and FID/KID/CLIP
    score where weights were given; kept in RUN/scores.json and redone only when their settings change
    (the sampler's included: other images, other scores)."""
    run_dir = folder(args, run)
    with run_folder.lock(run_dir, "reproduce.py"):  # it writes samples/, real/ and scores.json
        return _evaluate(args, run_dir, scorer)


def _evaluate(args: argparse.Namespace, run_dir: Path, scorer: Scorer) -> dict:
    path = run_dir / SCORES
    cache = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    kept = dict(cache)
    made = heldout.ensure_test_split(run_dir, args.sample_steps, device=args.device, scheduler=args.scheduler,
                                     guidance=args.guidance)
    sampled = heldout.settings(args.scheduler, args.sample_steps, args.guidance)
    if made or cache.get("sampling") != sampled:
        cache = {"sampling": sampled}  # new images: every score is stale
    if "trainable_end" not in cache:
        cache.update(trainable_at_end(run_dir))
    if scorer.inception_key and cache.get("inception", {}).get("key") != scorer.inception_key:
        cache["inception"] = scorer.fid_kid(run_dir)
    if scorer.clip_key and cache.get("clip", {}).get("key") != scorer.clip_key:
        cache["clip"] = scorer.clip_score(run_dir)
    if scorer.reader_key and cache.get("reader", {}).get("key") != scorer.reader_key:
        cache["reader"] = scorer.reader_scores(run_dir)
    if cache != kept:
        run_folder.write_json(path, cache)
    return cache


# ------------------------------------------------------------------------------------------ per-run figures

def expansion_overhead(log: list[dict]) -> dict | None:
    """Eq. 6 measured: how much longer the run took than if its expansion-test steps (those with SeLoRA
    `events`) had cost what its other steps cost. Step 1 (warm-up) is left out. None without both kinds."""
    steps = [line for line in log if "step_time" in line and line["step"] > 1]
    tests = [s["step_time"] for s in steps if "events" in s]
    others = [s["step_time"] for s in steps if "events" not in s]
    if not tests or not others:
        return None
    other = float(np.mean(others))
    return {"test steps": len(tests), "test step (s)": float(np.mean(tests)), "other step (s)": other,
            "measured factor": (sum(tests) + sum(others)) / (len(steps) * other)}


def run_row(args: argparse.Namespace, run: Run, cache: dict) -> dict:
    """One run's numbers, named as the report's columns."""
    run_dir = folder(args, run)
    summary = json.loads((run_dir / "summary.json").read_text(encoding="utf-8"))
    log = run_folder.read_log(run_dir, math.inf)
    memory = [line["memory_mib"] for line in log if "memory_mib" in line]
    row = {"run": run, "folder": run_dir, "time (s)": summary["time_s"],
           "s/step": float(np.mean([line["step_time"] for line in log if "step_time" in line])),
           "memory mean (MiB)": float(np.mean(memory)), "memory peak (MiB)": max(memory),
           "memory_kind": summary["memory_kind"], "log": log,
           "UNet % start": summary["trainable_percent"]["unet"], "UNet % end": cache["trainable_end"]["unet"],
           "text encoder % start": summary["trainable_percent"]["text_encoder"],
           "text encoder % end": cache["trainable_end"]["text_encoder"],
           "total rank": summary["total_rank"], "expansions": summary["expansions"],
           "final_ranks": summary["final_ranks"], "layers_per_block": cache["layers_per_block"]}
    if "inception" in cache:
        row.update({f"FID-{d}": v for d, v in cache["inception"]["fid"].items()})
        row["KID"] = cache["inception"]["kid"]["mean"]
    if "clip" in cache:
        row["CLIP score"] = cache["clip"]["clip_score"]
    if "reader" in cache:
        row.update({f"FID-{d}": v for d, v in cache["reader"]["fid"].items()})
        row["KID"] = cache["reader"]["kid"]["mean"]
        row["adherence"] = cache["reader"]["adherence"]["adherence"]
        row["intervals"] = eval_fid.intervals_of(cache["reader"])
    overhead = expansion_overhead(log) if run.t else None  # AdaLoRA's and LoRA^2's steps log events too
    if overhead:
        row.update(overhead, **{"bound 1 + 1/t": 1 + 1 / run.t})
    return row


# ------------------------------------------------------------------------------------------ main

def main(argv: list[str] | None = None) -> int:
    """The study; 2 for input a user must fix (said in one line, before any run is trained). It holds OUT/lock
    (run_folder.lock) throughout, so a second study on the same --out exits 2 at once."""
    args = parse_args(argv)
    runs = plan(args)
    for run in runs:  # a bad pass-through option, or a run's own one, fails now, not after hours
        train.parser().parse_args(train_argv(args, run))
    with contextlib.ExitStack() as held:
        try:
            held.enter_context(run_folder.lock(args.out, "reproduce.py", study=True))
            check_runs(args, runs)
        except (ValueError, OSError) as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
        return study(args, runs)


def study(args: argparse.Namespace, runs: list[Run]) -> int:
    """Train, evaluate and report every run of the study (`main`, which holds the study folder's lock)."""
    if args.generated and not (Path(args.data) / "metadata.jsonl").is_file():
        phantoms.make_phantom_folder(args.data, args.generated["images"], args.generated["size"], args.data_seed)
    print(f"{len(runs)} runs: {', '.join(r.name for r in runs)}")
    status = {r.name: train_run(args, r) for r in runs}
    scorer = Scorer(args)
    rows = [run_row(args, r, evaluate(args, r, scorer)) for r in runs if status[r.name] != "failed"]
    main_runs = [r for r in runs if r.method in args.methods and r.seed in args.seeds
                 and r == study_run(args, r.method, r.seed)]  # the tables' runs: each method at the study's options
    report_file = report.write(args, runs, main_runs, status, rows)
    print(f"\nwrote {report_file}; runs: " + ", ".join(f"{n} {s}" for n, s in status.items()))
    return 1 if "failed" in status.values() else 0


if __name__ == "__main__":
    sys.exit(main())
