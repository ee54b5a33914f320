"""The paper's study in one command (issue 9): every method and seed trained on one split, each run's test
images generated and scored, and OUT/report.md with the paper's tables and the answers its reviewers asked for.

    python reproduce.py --model SD15 --dataset iu-xray --data IU_XRAY --out study/ \
        [--methods lora dylora adalora selora lora2] [--seeds 0 1 2] [--inception FILE] [--clip DIR]
    python reproduce.py --smoke --out smoke/ [--inception FILE]   # tiny random model, generated data, CPU minutes

Runs: each method x seed, then SeLoRA's threshold ablation (table 3: lambda 1, 1.1, 1.3 at t = --t) and a sweep
of t (20, 40, 80 at lambda = --lam), over --ablation-seeds; a run both need is trained once. Every run is a
train.py run folder, OUT/runs/NAME/, trained in its own process (so its memory readings are its own) with the
same --data-seed, so all runs share one split. Options reproduce.py does not know are passed to every train.py
run (e.g. --precision bf16, --split 70,10,20, --empty-findings impression).

Resumable: a run with summary.json is done; one with a checkpoint continues with train.py --resume; one
without is started again. Generated images (RUN/samples/, RUN/real/) and scores (RUN/scores.json) are kept,
so a study interrupted at any point continues where it stopped. A finished run made with other options is
an error, not silently mixed in.

Scoring needs weights the user downloads: --inception (pytorch-fid's pt_inception-2015-12-05-6726825d.pth) for
FID and KID, --clip (openai/clip-vit-large-patch14) for the CLIP score. Without them the report says so and
gives every other section.
"""
from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

import adapters
import cli
import data
import eval_fid
import inception
import plots
import run_folder
import sample
import sampling
import train
import weights
from sd15 import load_model

ROOT = Path(__file__).resolve().parent
METHODS = ("lora", "dylora", "adalora", "selora", "lora2")  # the paper's tables' order
ADAPTIVE = ("selora", "adalora", "lora2")  # ranks that differ per layer after training (figures 3 and 4)
SCORES = "scores.json"  # RUN/scores.json: what was measured on the run's test images, with what
# train.py options reproduce.py sets itself; passing them through would break the study's layout
OWN = ("--method", "--seed", "--data-seed", "--out", "--resume", "--overwrite", "--lam", "--t", "--samples",
       "--model", "--tokenizer", "--data", "--dataset", "--epochs", "--size", "--batch", "--device")
NOT_COMPARED = ("out", "overwrite", "resume", "stop_after", "device",  # may change when a study continues
                "gradient_checkpointing",  # changes no result
                "scheduler")  # previews' only, which the study turns off (--samples 0)
SMOKE = dict(methods=["lora", "selora"], seeds=[0, 1], ablation_seeds=[0], t=2, ts=[2, 4, 8], epochs=2, batch=4,
             size=48, sample_steps=4, images=32, split="50,25,25")
PAPER_PERCENT = ("the paper (IU X-Ray, section 4): SeLoRA 0.368% of the UNet and 0.121% of the text encoder; "
                 "rank 4: 0.803% and 0.216%")


@dataclass(frozen=True)
class Run:
    method: str
    seed: int
    lam: float | None = None  # SeLoRA only
    t: int | None = None

    @property
    def name(self) -> str:
        selora = f"-lam{self.lam:g}-t{self.t}" if self.method == "selora" else ""
        return f"{self.method}{selora}-seed{self.seed}"


# ------------------------------------------------------------------------------------------ options and plan

def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False)
    a = p.add_argument
    a("--out", required=True, help="study folder: runs/, figures/, report.md")
    a("--model", help="SD 1.5 (diffusers folder or single file); default: train.py's embedded tiny random model")
    a("--tokenizer", help="with a single-file --model: its tokenizer")
    a("--data", help="data folder (required unless --smoke)")
    a("--dataset", default="folder", choices=sorted(data.PAPER_SPLITS), help="layout of --data")
    a("--methods", nargs="+", choices=METHODS, help=f"default: {' '.join(METHODS)}")
    a("--seeds", nargs="+", type=int, help="training seeds (default: 0 1 2)")
    a("--data-seed", type=int, default=0, help="seed of the one split every run uses (default 0)")
    a("--lam", type=float, default=1.1, help="SeLoRA lambda of the main runs and the t sweep (paper: 1.1)")
    a("--t", type=int, help="SeLoRA t of the main runs and the lambda ablation (paper: 40)")
    a("--lambdas", nargs="*", type=float, default=[1.0, 1.1, 1.3], help="threshold ablation (table 3); none: skip")
    a("--ts", nargs="*", type=int, help="sweep of t (default: 20 40 80); none: skip")
    a("--ablation-seeds", nargs="*", type=int, help="seeds of the ablation runs (default: --seeds)")
    a("--epochs", type=int, help="default: train.py's (the paper's for the data set)")
    a("--size", type=int, help="image size (default: train.py's, 224)")
    a("--batch", type=int, help="batch size (default: train.py's, 8)")
    a("--device", help="cuda, cpu, ... (default: cuda when available)")
    a("--inception", help="pytorch-fid's pt_inception-2015-12-05-6726825d.pth: FID and KID")
    a("--clip", help="openai/clip-vit-large-patch14 folder: CLIP score")
    a("--dims", nargs="+", type=int, default=[2048, 192, 64], choices=inception.DIMS, help="FID feature widths")
    a("--kid-subsets", type=int, default=100)
    a("--fid-sqrtm", default="eigh", choices=eval_fid.FID_SQRTM,
      help="FID's tr sqrt(S1 S2): from eigenvalues, or pytorch-fid's scipy sqrtm (eval_fid.frechet_distance)")
    a("--scheduler", choices=sampling.SCHEDULERS,
      help="sampler of the test images (default pndm: SD 1.5's, which made the paper's images)")
    a("--sample-steps", type=cli.integer(1, sampling.MAX_STEPS), help="sampler steps for the test images (default 50)")
    a("--grid-prompts", type=int, default=6, help="test prompts in the real-vs-generated figure")
    a("--smoke", action="store_true", help="the whole study on the embedded tiny model and generated data, in minutes")
    args, extra = p.parse_known_args(argv)
    taken = [o for o in extra if o.split("=")[0] in OWN]
    if taken:
        p.error(f"{' '.join(taken)}: set by reproduce.py itself (see --help)")
    args.train_options = extra
    defaults = dict(methods=list(METHODS), seeds=[0, 1, 2], t=40, ts=[20, 40, 80], scheduler="pndm", sample_steps=50)
    if args.smoke:
        if args.data or args.model:
            p.error("--smoke uses the embedded tiny model and generated data: leave out --model and --data")
        defaults.update(SMOKE)
        args.train_options = ["--split", SMOKE["split"], *extra]
        args.data = str(Path(args.out) / "data")
    elif not args.data:
        p.error("--data is required (or --smoke)")
    for key, value in defaults.items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    if args.ablation_seeds is None:
        args.ablation_seeds = args.seeds
    args.out = Path(args.out).resolve()
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    args.dims = sorted(set(args.dims), reverse=True)
    return args


def plan(args: argparse.Namespace) -> list[Run]:
    """Every run of the study, each once: method x seed, then the lambda ablation and the t sweep."""
    def run(method: str, seed: int, lam: float = args.lam, t: int = args.t) -> Run:
        return Run(method, seed, lam, t) if method == "selora" else Run(method, seed)
    runs = [run(m, s) for m in args.methods for s in args.seeds]
    runs += [run("selora", s, lam=lam) for lam in args.lambdas for s in args.ablation_seeds]
    runs += [run("selora", s, t=t) for t in args.ts for s in args.ablation_seeds]
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
    if run.method == "selora":
        argv += ["--lam", str(run.lam), "--t", str(run.t)]
    return argv + args.train_options


# ------------------------------------------------------------------------------------------ training

def check_same(run_dir: Path, argv: list[str]) -> None:
    """A run folder from an earlier invocation must have been made with the options this study gives it."""
    planned = vars(train.resolve(argv))
    saved = json.loads((run_dir / "config.json").read_text(encoding="utf-8"))["options"]
    differ = [f"{k}: {saved.get(k)!r} there, {v!r} now" for k, v in planned.items()
              if k not in NOT_COMPARED and saved.get(k) != v]
    if differ:
        raise ValueError(f"{run_dir}: this run was made with other options ({'; '.join(differ)}); give another "
                         "--out, or delete the run folder to train it again")


def check_runs(args: argparse.Namespace, runs: list[Run]) -> None:
    """Before any training: each run folder an earlier invocation finished or checkpointed was made with the
    options this study gives it (`check_same`)."""
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
    return status if code == 0 and (run_dir / "summary.json").is_file() else "failed"


# ------------------------------------------------------------------------------------------ test images and scores

def trainable_at_end(run_dir: Path) -> dict:
    """Trainable % of the UNet and the text encoder with the run's last adapter (its final ranks), as train.py
    counts them at the start (adapters.trainable_fraction), and the UNet's layers per block for the heatmaps."""
    options = json.loads((run_dir / "config.json").read_text(encoding="utf-8"))["options"]
    sd = load_model(options["model"], options["tokenizer"], options["seed"])
    sample.load_adapter(sd, run_dir / "last.safetensors")
    percent = {part: adapters.trainable_fraction(getattr(sd, part))[2] for part in ("unet", "text_encoder")}
    return {"trainable_end": percent, "layers_per_block": sd.unet.config.num_res_blocks}


class Scorer:
    """Inception and CLIP, loaded once, on the first run that needs them."""

    def __init__(self, args: argparse.Namespace):
        self.args, self._inception, self._clip = args, None, None
        self.inception_key = args.inception and {"file": str(Path(args.inception).resolve()), "dims": args.dims,
                                                 "kid_subsets": args.kid_subsets, "fid_sqrtm": args.fid_sqrtm}
        self.clip_key = args.clip and {"model": str(Path(args.clip).resolve())}

    def fid_kid(self, run_dir: Path) -> dict:
        a = self.args
        self._inception = self._inception or inception.load_inception(a.inception).to(a.device)
        real, fake = (eval_fid.inception_features(self._inception, eval_fid.list_images(run_dir / part), tuple(a.dims),
                                                  device=a.device, desc=part) for part in ("real", "samples"))
        return {"key": self.inception_key, **eval_fid.fid_kid(real, fake, a.kid_subsets, sqrtm=a.fid_sqrtm)}

    def clip_score(self, run_dir: Path) -> dict:
        self._clip = self._clip or eval_fid.load_clip(self.args.clip, self.args.device)
        files = eval_fid.list_images(run_dir / "samples")
        prompts = eval_fid.read_prompts(run_dir / "samples" / eval_fid.RUN_PROMPTS)
        return {"key": self.clip_key, **eval_fid.clip_score(*self._clip, files, prompts, device=self.args.device)}


def sampler(args: argparse.Namespace) -> dict:
    """What makes the test images: the sampler, its steps and the guidance (sample_run's, SD 1.5's 7.5)."""
    return {"scheduler": args.scheduler, "steps": args.sample_steps, "guidance": 7.5}


def evaluate(args: argparse.Namespace, run: Run, scorer: Scorer) -> dict:
    """The run's test split generated once (sample.sample_run), its trainable % at the end, and FID/KID/CLIP
    score where weights were given; kept in RUN/scores.json and redone only when their settings change
    (the sampler's included: other images, other scores)."""
    run_dir = folder(args, run)
    path = run_dir / SCORES
    cache = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    kept = dict(cache)
    if cache.get("sampling") != sampler(args) or not (run_dir / "samples" / eval_fid.RUN_PROMPTS).is_file():
        sample.sample_run(run_dir, steps=args.sample_steps, device=args.device, scheduler=args.scheduler)
        cache = {"sampling": sampler(args)}  # new images: every score is stale
    if "trainable_end" not in cache:
        cache.update(trainable_at_end(run_dir))
    if scorer.inception_key and cache.get("inception", {}).get("key") != scorer.inception_key:
        cache["inception"] = scorer.fid_kid(run_dir)
    if scorer.clip_key and cache.get("clip", {}).get("key") != scorer.clip_key:
        cache["clip"] = scorer.clip_score(run_dir)
    if cache != kept:
        train.write_json(path, cache)
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
    row = {"run": run, "time (s)": summary["time_s"],
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
    overhead = expansion_overhead(log)
    if overhead:
        row.update(overhead, **{"bound 1 + 1/t": 1 + 1 / run.t})
    return row


# ------------------------------------------------------------------------------------------ the report

def quality_metrics(args: argparse.Namespace) -> list[str]:
    return ([f"FID-{d}" for d in args.dims] + ["KID"] if args.inception else []) + (["CLIP score"] if args.clip else [])


def table(rows: list[dict], label, first: str, columns: list[str], marked: tuple[str, ...] = ()) -> str:
    """Markdown: rows grouped by label(run), each column's mean ± std over the group (eval_fid.summarise);
    the best mean of each `marked` column in bold (CLIP score: highest; FID, KID: lowest)."""
    summary = eval_fid.summarise([{**r, "method": label(r["run"])} for r in rows], columns)
    best = {}
    for c in marked:
        if len(summary) > 1:
            pick = max if c == "CLIP score" else min
            best[c] = pick(range(len(summary)), key=lambda i: summary[i][c][0])
    lines = [f"| {first} | runs | " + " | ".join(columns) + " |", "|---" * (len(columns) + 2) + "|"]
    for i, e in enumerate(summary):
        cells = [f"**{eval_fid.mean_std(*e[c])}**" if best.get(c) == i else eval_fid.mean_std(*e[c]) for c in columns]
        lines.append(f"| {e['method']} | {e['runs']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def labelled_grid(columns: dict[str, Path], count: int) -> tuple[Image.Image, int]:
    """Figures 2 and 7: one row per test prompt (numbered), one column per image folder (labelled)."""
    files = {label: eval_fid.list_images(f)[:count] for label, f in columns.items()}
    n = min(len(f) for f in files.values())
    w, h = Image.open(files[next(iter(files))][0]).size
    fnt = plots.font(12)
    top, left, pad = 20, 24, 2
    sheet = Image.new("RGB", (left + len(files) * (w + pad), top + n * (h + pad)), "white")
    d = ImageDraw.Draw(sheet)
    for c, (label, paths) in enumerate(files.items()):
        d.text((left + c * (w + pad) + w // 2, 4), label, fill=plots.INK, font=fnt, anchor="mt")
        for r, path in enumerate(paths[:n]):
            with Image.open(path) as im:
                sheet.paste(im.convert("RGB"), (left + c * (w + pad), top + r * (h + pad)))
    for r in range(n):
        d.text((left // 2, top + r * (h + pad) + h // 2), str(r + 1), fill=plots.INK, font=fnt, anchor="mm")
    return sheet, n


def figure(args: argparse.Namespace, image: Image.Image, name: str, caption: str) -> str:
    plots.save_png(image, args.out / "figures" / name)
    return f"![{caption}](figures/{name})\n"


def rank_figures(args: argparse.Namespace, main: list[dict]) -> list[str]:
    """Figures 3 and 4: each adaptive method's final rank per layer, mean over seeds, on one colour scale."""
    adaptive = [m for m in args.methods if m in ADAPTIVE and any(r["run"].method == m for r in main)]
    if not adaptive:
        return ["No adaptive method (selora, adalora, lora2) among --methods: no rank heatmaps.\n"]
    means = {}
    for m in adaptive:
        group = [r["final_ranks"] for r in main if r["run"].method == m]
        means[m] = {name: float(np.mean([g[name] for g in group])) for name in group[0]}
    names = list(means[adaptive[0]])
    per_block = main[0]["layers_per_block"]
    out = []
    for part, layout, title, xlabel, file in (
            ("unet.", plots.unet_layout(names, per_block), "UNet (figure 4)", "Attention layer", "ranks_unet.png"),
            ("text_encoder.", plots.text_encoder_layout(names), "Text encoder (figure 3)", "Layer", "ranks_text.png")):
        ranks = {m: {n: v for n, v in r.items() if n.startswith(part)} for m, r in means.items()}
        if layout.cells:
            out.append(figure(args, plots.heatmap_panel(ranks, layout, f"{title}: final rank, mean over seeds",
                                                        xlabel=xlabel), file, f"final ranks, {title}"))
    return out


def write_report(args: argparse.Namespace, runs: list[Run], status: dict[str, str], rows: list[dict]) -> Path:
    by_run = {r["run"]: r for r in rows}
    main = [by_run[r] for r in runs if r in by_run and r.method in args.methods and r.seed in args.seeds
            and (r.method != "selora" or (r.lam, r.t) == (args.lam, args.t))]
    quality = quality_metrics(args)
    md = [f"# SeLoRA study: {args.dataset} data in `{args.data}`\n"]
    if args.smoke:
        md.append("**Smoke study**: the embedded tiny random SD 1.5 and generated phantoms. It shows that the "
                  "pipeline runs end to end; its numbers say nothing about the methods.\n")
    splits = {json.dumps(data.read_split(folder(args, r["run"]) / "split.json")) for r in rows}
    first = json.loads(next(iter(splits))) if splits else {}
    md.append(f"Model: {args.model or 'the embedded tiny random model'}. Methods: {', '.join(args.methods)}; seeds "
              f"{', '.join(map(str, args.seeds))}. Every run uses the split of data seed {args.data_seed} ("
              + (", ".join(f"{len(v)} {k}" for k, v in first.items()) if first else "no finished run") + "): "
              + ("the same in all runs, checked." if len(splits) <= 1 else "**the runs' splits differ**.")
              + f" Device {args.device}. Extra train.py options: {' '.join(args.train_options) or 'none'}.\n")
    failed = [name for name, s in status.items() if s == "failed"]
    if failed:
        md.append(f"**Failed runs** (left out below; see their folders): {', '.join(failed)}.\n")

    md.append("## Image quality (tables 1 and 2)\n")
    md.append("Mean ± std over seeds of each method's test images against the held-out test images; best in bold "
              "(FID, KID: lowest; CLIP score: highest).\n")
    paper = sampler(args) == {"scheduler": "pndm", "steps": 50, "guidance": 7.5}
    md.append(f"Every FID, KID and CLIP score in this report is of test images made by "
              f"{sample.describe_sampling(sampler(args))} (`--scheduler`, `--sample-steps`). The paper's images were "
              "made by SD 1.5's own PNDM scheduler at 50 steps, guidance 7.5 (StableDiffusionPipeline's defaults, "
              "see docs/paper-vs-code.md)" + (": the same sampler.\n" if paper else
                                               ": compare these numbers with the paper's with care.\n"))
    if not args.inception:
        md.append("FID and KID are not computed: they need `--inception pt_inception-2015-12-05-6726825d.pth` "
                  "(pytorch-fid's weights, downloaded by the user). Run again with it; nothing is retrained.\n")
    if not args.clip:
        md.append("The CLIP score is not computed: it needs `--clip clip-vit-large-patch14/` "
                  "(openai/clip-vit-large-patch14, downloaded by the user).\n")
    if quality and main:
        md.append(table(main, lambda r: r.method, "method", quality, tuple(quality)))
        n = len(eval_fid.list_images(folder(args, main[0]["run"]) / "real"))
        if args.inception and n <= max(args.dims):
            md.append(f"{n} test images per run: FID is biased at this size and its covariance is singular for "
                      "feature widths at or above it; compare FIDs only at equal counts, and prefer KID.\n")

    md.append("## Trainable parameters\n")
    md.append("Percent of the UNet and of the text encoder (adapters included in the total, as train.py counts), "
              f"at the start of training and with the final ranks of the last adapter; {PAPER_PERCENT}.\n")
    md.append(table(main, lambda r: r.method, "method", ["UNet % start", "UNet % end", "text encoder % start",
                                                          "text encoder % end", "total rank"]))

    kind = main[0]["memory_kind"] if main else ""
    md.append("## Training time and memory (tables 7 and 8, figures 11 and 12)\n")
    md.append(f"Wall time of the training loop, mean step time, and the memory readings train.py logs at step 1 and "
              f"every 40 steps ({kind}: a running peak, so the mean is that of the running peak).\n")
    md.append(table(main, lambda r: r.method, "method",
                    ["time (s)", "s/step", "memory mean (MiB)", "memory peak (MiB)"]))
    first_seed = [r for r in main if r["run"].seed == args.seeds[0]]
    series = {r["run"].method: ([s["step"] for s in r["log"] if "memory_mib" in s],
                                [s["memory_mib"] for s in r["log"] if "memory_mib" in s]) for r in first_seed}
    if series:
        md.append(figure(args, plots.line_plot(series, f"Memory during training (seed {args.seeds[0]})", "step",
                                               f"{kind} (MiB)"), "memory.png", "memory during training"))

    md.append("## Cost of SeLoRA's expansion tests (eq. 6)\n")
    md.append("Eq. 6 bounds SeLoRA's time by (1 + 1/t) x LoRA's, as if every test cost one extra step. Measured "
              "from each run's log.jsonl: the mean time of test steps (those with expansion events) and of the "
              "other steps (step 1, the warm-up, left out), and the factor by which the tests lengthened the run: "
              "all step time / (steps x mean other step).\n")
    selora = [r for r in rows if r["run"].method == "selora" and "measured factor" in r]
    if selora:
        md.append(table(selora, lambda r: r.name, "run", ["test steps", "test step (s)", "other step (s)",
                                                          "measured factor", "bound 1 + 1/t"]))
        lora = [r["time (s)"] for r in main if r["run"].method == "lora"]
        main_selora = [r["time (s)"] for r in main if r["run"].method == "selora"]
        if lora and main_selora:
            md.append(f"SeLoRA's mean training time is {np.mean(main_selora) / np.mean(lora):.3f} x LoRA's (bound "
                      f"{1 + 1 / args.t:.3f} for t = {args.t}; the bound assumes LoRA at SeLoRA's mean final rank, "
                      "while LoRA here has rank 4).\n")
    else:
        md.append("No SeLoRA run with both test steps and other steps.\n")

    md.append("## Final ranks (figures 3 and 4)\n")
    md += rank_figures(args, main)

    md.append("## Real and generated images (figures 2 and 7)\n")
    if first_seed:
        r0 = folder(args, first_seed[0]["run"])
        columns = {"real": r0 / "real", **{r["run"].method: folder(args, r["run"]) / "samples" for r in first_seed}}
        sheet, n = labelled_grid(columns, args.grid_prompts)
        md.append(f"Seed {args.seeds[0]}, the first {n} test prompts (rows):\n")
        md.append(figure(args, sheet, "samples.png", "real and generated images per prompt"))
        prompts = eval_fid.read_prompts(r0 / "samples" / eval_fid.RUN_PROMPTS)[:n]
        md += [f"{i}. {p}" for i, p in enumerate(prompts, 1)] + [""]

    for title, runs_of, label, first_col in (
            ("## Threshold ablation (table 3)\n", lambda r: r.t == args.t and r.lam in args.lambdas,
             lambda r: f"{r.lam:g}", "lambda"),
            ("## Sweep of t\n", lambda r: r.lam == args.lam and r.t in args.ts, lambda r: str(r.t), "t")):
        md.append(title)
        group = [by_run[r] for r in runs if r in by_run and r.method == "selora" and runs_of(r)
                 and r.seed in args.ablation_seeds]
        if not group:
            md.append("Not run (empty list of values, or no finished run).\n")
            continue
        group.sort(key=lambda r: (r["run"].lam, r["run"].t))
        measured = first_col == "t" and all("measured factor" in r for r in group)
        extra = ["measured factor", "bound 1 + 1/t"] if measured else []
        md.append(f"SeLoRA, seeds {', '.join(map(str, args.ablation_seeds))}; mean ± std over seeds; test images by "
                  f"{sample.describe_sampling(sampler(args))}.\n")
        md.append(table(group, label, first_col, [*quality, "total rank", "expansions", "UNet % end",
                                                  "text encoder % end", "time (s)", *extra], tuple(quality)))

    md.append("## Runs\n")
    md.append("| run | this invocation |\n|---|---|\n" + "".join(
        f"| [{name}](runs/{name}/) | {s} |\n" for name, s in status.items()))
    path = args.out / "report.md"
    with weights.atomic_write(path, "w") as f:
        f.write("\n".join(md))
    return path


# ------------------------------------------------------------------------------------------ main

def main(argv: list[str] | None = None) -> int:
    """The study; 2 for input a user must fix (said in one line, before any run is trained)."""
    args = parse_args(argv)
    runs = plan(args)
    train.parser().parse_args(train_argv(args, runs[0]))  # a bad pass-through option fails now, not after hours
    try:
        check_runs(args, runs)
    except (ValueError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    if args.smoke and not (Path(args.data) / "metadata.jsonl").is_file():
        data.make_phantom_folder(args.data, SMOKE["images"], SMOKE["size"], args.data_seed)
    print(f"{len(runs)} runs: {', '.join(r.name for r in runs)}")
    status = {r.name: train_run(args, r) for r in runs}
    scorer = Scorer(args)
    rows = [run_row(args, r, evaluate(args, r, scorer)) for r in runs if status[r.name] != "failed"]
    report = write_report(args, runs, status, rows)
    print(f"\nwrote {report}; runs: " + ", ".join(f"{n} {s}" for n, s in status.items()))
    return 1 if "failed" in status.values() else 0


if __name__ == "__main__":
    sys.exit(main())
