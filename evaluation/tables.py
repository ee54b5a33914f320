"""Runs grouped by method, each metric's mean and 95% interval, as the paper's tables give them with a spread:
eval_fid.py --table writes tables 1 and 2 with these, and reproduce.py's report.md all of its tables.

The interval of a group of seeds is Student's t interval of their mean, mean ± t(0.975, n - 1) s / sqrt(n): it
says where the method's mean over seeds lies, the spread between seeds included. A single run has no spread
between seeds; where its scores carry their own bootstrap interval (a reader's: metrics/intervals.py), the
table gives that. A best value is marked only when its interval separates from every other row's.
"""
from __future__ import annotations

import csv
import io

import numpy as np
from scipy import stats


HIGHEST_BEST = ("CLIP score", "adherence")  # the rest (FID, KID, ...) are best lowest
LEVEL = 0.95


def summarise(rows: list[dict], metrics: list[str]) -> list[dict]:
    """Group runs by method (first-seen order): {method, runs, metric: {mean, std, low, high}} per method.

    std is the sample std over seeds (n - 1), None for a single run; [low, high] the t interval of the mean, or a
    single run's own interval (its row's "intervals"), or None."""
    table = []
    for method in dict.fromkeys(r["method"] for r in rows):
        group = [r for r in rows if r["method"] == method]
        entry = {"method": method, "runs": len(group)}
        for m in metrics:
            values = np.array([r[m] for r in group], dtype=np.float64)
            mean, low, high, std = float(values.mean()), None, None, None
            if len(values) > 1:
                std = float(values.std(ddof=1))
                half = stats.t.ppf((1 + LEVEL) / 2, len(values) - 1) * std / np.sqrt(len(values))
                low, high = mean - half, mean + half
            elif m in group[0].get("intervals", {}):
                low, high = group[0]["intervals"][m]
            entry[m] = {"mean": mean, "std": std, "low": low, "high": high}
        table.append(entry)
    return table


def cell(v: dict) -> str:
    """A table cell: 'mean [low, high]' (95%), or the mean alone where there is no interval."""
    return f"{v['mean']:.4g}" if v["low"] is None else f"{v['mean']:.4g} [{v['low']:.4g}, {v['high']:.4g}]"


def separated_best(summary: list[dict], m: str) -> int | None:
    """The row with the best mean of metric m, if its interval lies wholly beyond every other row's; else None."""
    if len(summary) < 2 or any(e[m]["low"] is None for e in summary):
        return None
    highest = m in HIGHEST_BEST
    best = (max if highest else min)(range(len(summary)), key=lambda i: summary[i][m]["mean"])
    b = summary[best][m]
    others = [e[m] for i, e in enumerate(summary) if i != best]
    return best if all(b["low"] > o["high"] if highest else b["high"] < o["low"] for o in others) else None


def markdown_table(summary: list[dict], metrics: list[str], first: str = "method", marked: tuple[str, ...] = ()) -> str:
    """A `summarise` result as Markdown: one row per group, each metric's mean [95% interval], and the best of each
    `marked` metric in bold where its interval separates from all others (CLIP score, adherence: highest; FID,
    KID: lowest)."""
    best = {m: separated_best(summary, m) for m in marked}
    lines = [f"| {first} | runs | " + " | ".join(metrics) + " |", "|---" * (len(metrics) + 2) + "|"]
    for i, e in enumerate(summary):
        cells = [f"**{cell(e[m])}**" if best.get(m) == i else cell(e[m]) for m in metrics]
        lines.append(f"| {e['method']} | {e['runs']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def markdown_and_csv(summary: list[dict], metrics: list[str]) -> tuple[str, str]:
    """(Markdown, CSV) of a `summarise` result: method x metric, mean, std over seeds and the 95% interval."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    parts = ("mean", "std", "low", "high")
    writer.writerow(["method", "runs"] + [f"{m} {part}" for m in metrics for part in parts])
    for e in summary:
        writer.writerow([e["method"], e["runs"]] + ["" if e[m][p] is None else f"{e[m][p]:.6g}" for m in metrics
                                                    for p in parts])
    return markdown_table(summary, metrics), out.getvalue()
