"""Runs grouped by method, each metric's mean ± std over seeds, as the paper's tables give them: eval_fid.py --table
writes tables 1 and 2 with these, and reproduce.py's report.md all of its tables.
"""
from __future__ import annotations

import csv
import io

import numpy as np


HIGHEST_BEST = ("CLIP score", "adherence")  # the rest (FID, KID, ...) are best lowest


def summarise(rows: list[dict], metrics: list[str]) -> list[dict]:
    """Group runs by method (first-seen order): {method, runs, metric: (mean, std over seeds)} per method.

    The std is the sample std (n - 1); None for a single run.
    """
    table = []
    for method in dict.fromkeys(r["method"] for r in rows):
        group = [r for r in rows if r["method"] == method]
        entry = {"method": method, "runs": len(group)}
        for m in metrics:
            values = np.array([r[m] for r in group], dtype=np.float64)
            entry[m] = (float(values.mean()), float(values.std(ddof=1)) if len(values) > 1 else None)
        table.append(entry)
    return table


def mean_std(mean: float, std: float | None) -> str:
    """A table cell: 'mean ± std' (std over seeds), or the mean alone for a single run."""
    return f"{mean:.4g}" if std is None else f"{mean:.4g} ± {std:.2g}"


def markdown_table(summary: list[dict], metrics: list[str], first: str = "method", marked: tuple[str, ...] = ()) -> str:
    """A `summarise` result as Markdown: one row per group, each metric's mean ± std over seeds, and the best mean
    of each `marked` metric in bold (CLIP score: highest; FID, KID: lowest), as the paper's tables mark it."""
    best = {}
    for m in marked:
        if len(summary) > 1:
            pick = max if m in HIGHEST_BEST else min
            best[m] = pick(range(len(summary)), key=lambda i: summary[i][m][0])
    lines = [f"| {first} | runs | " + " | ".join(metrics) + " |", "|---" * (len(metrics) + 2) + "|"]
    for i, e in enumerate(summary):
        cells = [f"**{mean_std(*e[m])}**" if best.get(m) == i else mean_std(*e[m]) for m in metrics]
        lines.append(f"| {e['method']} | {e['runs']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def markdown_and_csv(summary: list[dict], metrics: list[str]) -> tuple[str, str]:
    """(Markdown, CSV) of a `summarise` result: method x metric, mean +- std over seeds."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["method", "runs"] + [f"{m} {part}" for m in metrics for part in ("mean", "std")])
    for e in summary:
        writer.writerow([e["method"], e["runs"]] + ["" if v is None else f"{v:.6g}" for m in metrics for v in e[m]])
    return markdown_table(summary, metrics), out.getvalue()
