"""report.md of reproduce.py's study: the paper's tables (1-3, 7, 8) as mean [95% interval] over seeds, the cost of SeLoRA's
tests (eq. 6), the figures (2-4, 7, 11, 12), and which sampler made every number.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from PIL import Image

from data import splits
from metrics import readback
from model import sampling, weights
from evaluation import heldout, tables
from training import method_table, plots, run_folder, sheets
import eval_fid

PAPER_PERCENT = ("the paper (IU X-Ray, section 4): SeLoRA 0.368% of the UNet and 0.121% of the text encoder; "
                 "rank 4: 0.803% and 0.216%")


def quality_metrics(args: argparse.Namespace) -> list[str]:
    if args.reader:
        return [f"FID-{readback.load_reader(args.reader).domain}", "KID", "adherence"]
    return ([f"FID-{d}" for d in args.dims] + ["KID"] if args.inception else []) + (["CLIP score"] if args.clip else [])


def table(rows: list[dict], label, first: str, columns: list[str], marked: tuple[str, ...] = ()) -> str:
    """Markdown: rows grouped by label(run), each column's mean and 95% interval over the group, the best of each
    `marked` column in bold where its interval separates from the others' (tables.summarise, tables.markdown_table)."""
    summary = tables.summarise([{**r, "method": label(r["run"])} for r in rows], columns)
    return tables.markdown_table(summary, columns, first, marked)


def figure(args: argparse.Namespace, image: Image.Image, name: str, caption: str) -> str:
    plots.save_png(image, args.out / "figures" / name)
    return f"![{caption}](figures/{name})\n"


def rank_figures(args: argparse.Namespace, main: list[dict]) -> list[str]:
    """Figures 3 and 4: each adaptive method's final rank per layer, mean over seeds, on one colour scale."""
    adaptive = [m for m in args.methods if method_table.TABLE[m].adaptive and any(r["run"].method == m for r in main)]
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


RULES = {"paper": "the paper's (`--expansion-test paper`: eq. 3-4's per-sample Fisher of the original and the expanded "
                  "layer at the same weights; a layer grows when their ratio exceeds lambda)",
         "script": "the authors' script's (`--expansion-test script`, methods/selora_script.py: the squared batch gradient "
                   "after one optimizer step over the one before, with a candidate that is zero until a layer first "
                   "grows; a layer grows when the ratio is >= lambda, and its Adam state restarts)"}


def selora_rule(args: argparse.Namespace, runs: list) -> str:
    """Which rule grew every SeLoRA run of the study, and which runs it capped (reproduce.capped)."""
    capped = [r.name for r in runs if "max_rank" in dict(r.options)]
    text = (f"SeLoRA's growth rule: {RULES[args.expansion_test]}, lambda {args.lam:g} in the main runs. Every SeLoRA "
            "number in this report was made by it (docs/paper-vs-code.md compares the rules' ranks).")
    if capped:
        text += (f" **Capped:** {', '.join(capped)} stop growing at rank {args.cap_rank} (`--max-rank`, `--cap-rank`): "
                 "under the paper's rule the FI-ratio is never below 1, so at lambda = 1 every layer grows at every "
                 "test.")
    return text + "\n"


def intro(args: argparse.Namespace, runs: list, status: dict[str, str], rows: list[dict]) -> list[str]:
    """The title, the model, methods, seeds and split, SeLoRA's growth rule, and the failed runs."""
    md = [f"# SeLoRA study: {args.dataset} data in `{args.data}`\n"]
    if args.mini:
        md.append("**Mini study**: the embedded tiny SD 1.5 (pretrained on shapes, assets/tiny-sd) fine-tuned on "
                  "400 generated phantoms, scored by the phantom reader (metrics/readback.py): phantom-FID, KID and caption "
                  "adherence. A laptop-scale stand-in for the paper's run (docs/mini-study.md says what it shows).\n")
    if args.smoke:
        md.append("**Smoke study**: the embedded tiny SD 1.5 (pretrained on shapes) and a few generated phantoms. It shows that the "
                  "pipeline runs end to end; its numbers say nothing about the methods.\n")
    found = {json.dumps(splits.read_split(r["folder"] / run_folder.SPLIT)) for r in rows}
    first = json.loads(next(iter(found))) if found else {}
    md.append(f"Model: {args.model or 'the embedded tiny model pretrained on shapes (assets/tiny-sd)'}. Methods: {', '.join(args.methods)}; seeds "
              f"{', '.join(map(str, args.seeds))}. Every run uses the split of data seed {args.data_seed} ("
              + (", ".join(f"{len(v)} {k}" for k, v in first.items()) if first else "no finished run") + "): "
              + ("the same in all runs, checked." if len(found) <= 1 else "**the runs' splits differ**.")
              + f" Device {args.device}. Extra train.py options: {' '.join(args.train_options) or 'none'}.\n")
    if any(r.method == "selora" for r in runs):
        md.append(selora_rule(args, runs))
    failed = [name for name, s in status.items() if s == "failed"]
    if failed:
        md.append(f"**Failed runs** (left out below; see their folders): {', '.join(failed)}.\n")
    return md


def quality_section(args: argparse.Namespace, main: list[dict]) -> list[str]:
    """Tables 1 and 2: FID, KID and CLIP score of each method, and which sampler made the test images."""
    quality, md = quality_metrics(args), []
    md.append("## Image quality (tables 1 and 2)\n")
    md.append("Mean and 95% interval of each method's test images against the held-out test images: over seeds, "
              "Student's t interval of the mean; for a single run, its own bootstrap interval where the scorer gives "
              "one (a reader's). Best in bold only where its interval separates from every other method's (FID, KID: "
              "lowest; CLIP score, adherence: highest).\n")
    paper = heldout.settings(args.scheduler, args.sample_steps, args.guidance) == {"scheduler": "pndm", "steps": 50, "guidance": 7.5}
    md.append(f"Every FID, KID and CLIP score in this report is of test images made by "
              f"{sampling.describe(heldout.settings(args.scheduler, args.sample_steps, args.guidance))} (`--scheduler`, `--sample-steps`, `--guidance`). The paper's images were "
              "made by SD 1.5's own PNDM scheduler at 50 steps, guidance 7.5 (StableDiffusionPipeline's defaults, "
              "see docs/paper-vs-code.md)" + (": the same sampler.\n" if paper else
                                               ": compare these numbers with the paper's with care.\n"))
    if args.reader:
        md.append(f"Scored by the domain reader `{args.reader}` (metrics/readback.py), as medical image-synthesis papers "
                  "use a feature extractor of their domain: FID and KID on its 64 penultimate features scaled to one "
                  "length, and caption adherence (best highest), the share of test images whose every attribute named in the prompt "
                  "is read back, in place of the CLIP score.\n")
    elif not args.inception:
        md.append("FID and KID are not computed: they need `--inception pt_inception-2015-12-05-6726825d.pth` "
                  "(pytorch-fid's weights, downloaded by the user). Run again with it; nothing is retrained.\n")
    if not args.clip and not args.reader:
        md.append("The CLIP score is not computed: it needs `--clip clip-vit-large-patch14/` "
                  "(openai/clip-vit-large-patch14, downloaded by the user).\n")
    if quality and main:
        md.append(table(main, lambda r: r.method, "method", quality, tuple(quality)))
        n = len(eval_fid.list_images(main[0]["folder"] / heldout.REAL))
        if args.inception and n <= max(args.dims):
            md.append(f"{n} test images per run: FID is biased at this size and its covariance is singular for "
                      "feature widths at or above it; compare FIDs only at equal counts, and prefer KID.\n")
    return md


def parameters_section(main: list[dict]) -> list[str]:
    """Trainable % of the UNet and the text encoder at the start and with the final ranks."""
    md = []
    md.append("## Trainable parameters\n")
    md.append("Percent of the UNet and of the text encoder (adapters included in the total, as train.py counts), "
              f"at the start of training and with the final ranks of the last adapter; {PAPER_PERCENT}.\n")
    md.append(table(main, lambda r: r.method, "method", ["UNet % start", "UNet % end", "text encoder % start",
                                                          "text encoder % end", "total rank"]))
    return md


def time_section(args: argparse.Namespace, main: list[dict]) -> list[str]:
    """Tables 7 and 8, figures 11 and 12: training time and memory."""
    md = []
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
    return md


def cost_section(args: argparse.Namespace, rows: list[dict], main: list[dict]) -> list[str]:
    """Eq. 6 measured: what SeLoRA's expansion tests cost."""
    md = []
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
    return md


def images_section(args: argparse.Namespace, main: list[dict]) -> list[str]:
    """Figures 2 and 7: real and generated images per test prompt."""
    md, first_seed = [], [r for r in main if r["run"].seed == args.seeds[0]]
    md.append("## Real and generated images (figures 2 and 7)\n")
    if first_seed:
        r0 = first_seed[0]["folder"]
        columns = {"real": r0 / heldout.REAL,
                   **{r["run"].method: r["folder"] / heldout.SAMPLES for r in first_seed}}
        sheet, n = sheets.labelled_grid({k: eval_fid.list_images(f)[:args.grid_prompts] for k, f in columns.items()})
        md.append(f"Seed {args.seeds[0]}, the first {n} test prompts (rows):\n")
        md.append(figure(args, sheet, "samples.png", "real and generated images per prompt"))
        prompts = eval_fid.read_prompts(r0 / heldout.SAMPLES / heldout.PROMPTS)[:n]
        md += [f"{i}. {p}" for i, p in enumerate(prompts, 1)] + [""]
    return md


def ablation_sections(args: argparse.Namespace, runs: list, by_run: dict) -> list[str]:
    """Table 3 (the threshold lambda) and the sweep of t."""
    quality, md = quality_metrics(args), []
    for title, runs_of, label, first_col in (
            ("## Threshold ablation (table 3)\n", lambda r: r.t == args.t and r.lam in args.lambdas,
             lambda r: f"{r.lam:g}" + (f" (max rank {dict(r.options)['max_rank']})" if "max_rank" in dict(r.options)
                                       else ""), "lambda"),
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
        md.append(f"SeLoRA under the {args.expansion_test} rule, seeds {', '.join(map(str, args.ablation_seeds))}; "
                  f"mean [95% interval] over seeds; test images by "
                  f"{sampling.describe(heldout.settings(args.scheduler, args.sample_steps, args.guidance))}.\n")
        md.append(table(group, label, first_col, [*quality, "total rank", "expansions", "UNet % end",
                                                  "text encoder % end", "time (s)", *extra], tuple(quality)))
    return md


def write(args: argparse.Namespace, runs: list, main_runs: list, status: dict[str, str], rows: list[dict]) -> Path:
    """OUT/report.md and OUT/figures/ from the runs' rows (reproduce.run_row); `main_runs` are the runs of the
    quality, parameter and time tables, the others the ablations'."""
    by_run = {r["run"]: r for r in rows}
    main = [by_run[r] for r in main_runs if r in by_run]
    md = (intro(args, runs, status, rows) + quality_section(args, main) + parameters_section(main)
          + time_section(args, main) + cost_section(args, rows, main)
          + ["## Final ranks (figures 3 and 4)\n", *rank_figures(args, main)] + images_section(args, main)
          + ablation_sections(args, runs, by_run))
    md.append("## Runs\n")
    md.append("| run | this invocation |\n|---|---|\n" + "".join(
        f"| [{name}](runs/{name}/) | {s} |\n" for name, s in status.items()))
    path = args.out / "report.md"
    with weights.atomic_write(path, "w") as f:
        f.write("\n".join(md))
    return path
