"""What each SeLoRA growth rule does to the ranks: train SeLoRA with --expansion-test paper and with script on the
same model, data and seed, and report every layer's rank at every test, the final trainable share (also against
rank-4 LoRA's on the same layers, the paper's comparison), and the validation loss; draw both rules' final ranks
on one colour scale (figures 3 and 4). docs/paper-vs-code.md, section 12, holds one measurement.

    python tools/compare_rules.py --out runs/rules                                # the embedded tiny random model
    python tools/compare_rules.py --out runs/rules --model MODEL --data PHANTOMS --epochs 2 -- --size 64

Writes OUT/paper/ and OUT/script/ (train.py run folders), OUT/ranks.csv (rule, step, layer, rank after each
test), OUT/ranks_unet.png, OUT/ranks_text.png, OUT/total_rank.png and OUT/rules.md. Options after `--` go to both
train.py runs. Quality here is the validation loss; FID needs Inception weights (reproduce.py --inception).
"""
from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from methods import adapters  # noqa: E402
from model.sd15 import load_model  # noqa: E402
from training import method_table, plots, run_folder  # noqa: E402
import train  # noqa: E402

RULES = ("paper", "script")
PAPER = {"text_encoder": (0.121, 0.216), "unet": (0.368, 0.803)}  # SeLoRA and rank-4 LoRA trainable %, paper:178


def train_rule(out: Path, rule: str, argv: list[str]) -> Path:
    """One SeLoRA run under `rule` (kept if it finished before)."""
    run = out / rule
    if not (run / "summary.json").is_file():
        code = train.main(["--out", str(run), "--overwrite", "--samples", "0", "--expansion-test", rule, *argv])
        if code:
            raise SystemExit(f"train.py --expansion-test {rule} failed with status {code}")
    return run


def ranks_over_time(run: Path) -> tuple[list[int], dict[str, list[int]]]:
    """The test steps and every layer's rank after each of them (rank 1 before its first test)."""
    log = run_folder.read_log(run, float("inf"))
    layers = json.loads((run / "summary.json").read_text())["final_ranks"]
    tests = sorted({e["step"] for line in log for e in line.get("events", []) if "expanded" in e})
    rank, history = dict.fromkeys(layers, 1), {name: [] for name in layers}
    by_step = {}
    for line in log:
        for e in line.get("events", []):
            if "expanded" in e:
                by_step.setdefault(e["step"], {})[e["layer"]] = e["rank"]
    for step in tests:
        rank.update(by_step[step])
        for name in layers:
            history[name].append(rank[name])
    return tests, history


def shares(run: Path) -> dict[str, dict[str, float]]:
    """Per part: trainable % with the final ranks, rank-4 LoRA's % on the same layers, their ratio, mean rank."""
    options = run_folder.read_options(run)
    sd = load_model(options["model"], options["tokenizer"])
    named = method_table.load_adapter(sd, run / "last.safetensors")
    out = {}
    for part in ("unet", "text_encoder"):
        layers = [a for name, a in named.items() if name.startswith(part + ".")]
        total = sum(p.numel() for p in getattr(sd, part).parameters())
        used = sum(a.rank * (a.base.in_features + a.base.out_features) for a in layers)
        lora4 = sum(4 * (a.base.in_features + a.base.out_features) for a in layers)
        out[part] = {"selora %": adapters.trainable_fraction(getattr(sd, part))[2],
                     "lora r=4 %": 100 * lora4 / (total - used + lora4), "of lora r=4": used / lora4,
                     "mean rank": sum(a.rank for a in layers) / len(layers), "max rank": max(a.rank for a in layers),
                     "rank 1": sum(a.rank == 1 for a in layers), "layers": len(layers)}
    return out


def report(out: Path, runs: dict[str, Path], argv: list[str]) -> str:
    """OUT/rules.md, ranks.csv and the figures."""
    histories = {rule: ranks_over_time(run) for rule, run in runs.items()}
    with open(out / "ranks.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["rule", "step", "layer", "rank"])
        for rule, (steps, history) in histories.items():
            writer.writerows([rule, s, name, r] for name, ranks in history.items() for s, r in zip(steps, ranks))
    summaries = {rule: json.loads((run / "summary.json").read_text()) for rule, run in runs.items()}
    final = {rule: s["final_ranks"] for rule, s in summaries.items()}
    names = list(final["paper"])
    options = run_folder.read_options(runs["paper"])
    per_block = load_model(options["model"], options["tokenizer"]).unet.config.num_res_blocks
    for part, layout, title, file in (
            ("unet.", plots.unet_layout(names, per_block), "UNet (figure 4)", "ranks_unet.png"),
            ("text_encoder.", plots.text_encoder_layout(names), "Text encoder (figure 3)", "ranks_text.png")):
        ranks = {f"--expansion-test {rule}": {n: float(v) for n, v in r.items() if n.startswith(part)}
                 for rule, r in final.items()}
        plots.save_png(plots.heatmap_panel(ranks, layout, f"{title}: final rank"), out / file)
    series = {rule: (steps, [sum(h[i] for h in history.values()) for i in range(len(steps))])
              for rule, (steps, history) in histories.items()}
    plots.save_png(plots.line_plot(series, "Total rank after each test", "step", "total rank"), out / "total_rank.png")
    md = [f"# SeLoRA's two growth rules, measured\n\n`tools/compare_rules.py {' '.join(argv)}`; model: "
          f"{summaries['paper']['base_model']}; {summaries['paper']['steps']} steps.\n",
          "| rule | lambda | steps | tests | expansions | total rank | best val loss | part | mean rank | max rank "
          "| layers at rank 1 | trainable % | LoRA r=4 % | of LoRA r=4 |", "|" + "---|" * 14]
    for rule, run in runs.items():
        options, s = run_folder.read_options(run), summaries[rule]
        for part, v in shares(run).items():
            md.append(f"| {rule} | {options['lam']:g} | {s['steps']} | {len(histories[rule][0])} | {s['expansions']} "
                      f"| {s['total_rank']} | {s['best_val_loss']:.5f} | {part} | {v['mean rank']:.2f} | "
                      f"{v['max rank']} | {v['rank 1']} of {v['layers']} | {v['selora %']:.3f} | {v['lora r=4 %']:.3f} "
                      f"| {v['of lora r=4']:.2f} |")
    for rule, run in runs.items():
        ratios = sorted(e["ratio"] for line in run_folder.read_log(run, float("inf")) for e in line.get("events", [])
                        if "ratio" in e)
        md.append(f"\n{rule}: ratios of all {len(ratios)} tests: min {ratios[0]:.4f}, median "
                  f"{ratios[len(ratios) // 2]:.4f}, max {ratios[-1]:.4f}.")
    md.append("\nThe paper: " + "; ".join(f"{part} {a} % against rank-4 LoRA's {b} %, {a / b:.2f} of it"
                                          for part, (a, b) in PAPER.items()) + " (paper:178).\n")
    md.append("Total rank after each test (all layers):\n")
    md.append("| step | " + " | ".join(RULES) + " |\n|---|" + "---|" * len(RULES))
    for i, step in enumerate(histories["paper"][0]):
        md.append(f"| {step} | " + " | ".join(str(series[rule][1][i]) if i < len(series[rule][1]) else "."
                                             for rule in RULES) + " |")
    text = "\n".join(md) + "\n"
    (out / "rules.md").write_text(text)
    return text


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    own, extra = (argv[:argv.index("--")], argv[argv.index("--") + 1:]) if "--" in argv else (argv, [])
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="folder for both runs, ranks.csv, the figures and rules.md")
    p.add_argument("--model", help="SD 1.5 diffusers folder (default: train.py's embedded tiny random model)")
    p.add_argument("--data", help="data folder (folder layout; default: train.py's generated phantoms)")
    p.add_argument("--epochs", type=int, help="default: train.py's")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(own)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    common = ["--seed", str(args.seed), *extra]
    for flag, value in (("--model", args.model), ("--data", args.data), ("--epochs", args.epochs)):
        if value is not None:
            common += [flag, str(value)]
    runs = {rule: train_rule(out, rule, common) for rule in RULES}
    print(report(out, runs, argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
