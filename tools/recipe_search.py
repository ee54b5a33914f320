"""The search for the embedded default's recipe (docs/tiny-sd.md): train.py on the phantoms with each candidate's
options, one after the other, and a table of what each reached (wall time, adherence and each attribute with their
95% intervals, phantom-FID, total rank). A finished candidate's folder is kept and read again, so the search
resumes where it stopped. The search of issue 33 ran two candidates at a time, each with OMP_NUM_THREADS=1.

    .venv/bin/python tools/recipe_search.py [--out runs/recipe] [NAME ...]     # all candidates, or those named
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CANDIDATES = {  # name -> train.py options beyond the embedded default's (train.EMBEDDED), in the order tried
    "default-800": ["--phantoms", "400", "--epochs", "20", "--t", "40"],  # the default before issue 33
    "steps-1600": ["--phantoms", "400", "--epochs", "40", "--t", "80"],
    "phantoms-1000": ["--phantoms", "1000", "--epochs", "16", "--t", "80"],
    "lr-2e-3": ["--epochs", "40", "--t", "80", "--lr", "2e-3"],
    "dropout-0.1": ["--phantoms", "400", "--epochs", "20", "--t", "40", "--caption-dropout", "0.1"],
    "phantoms-2000": ["--phantoms", "2000", "--epochs", "8", "--t", "80"],
    "phantoms-2000-dropout": ["--phantoms", "2000", "--epochs", "8", "--t", "80", "--caption-dropout", "0.1"],
    "phantoms-2000-lr-2e-3": ["--phantoms", "2000", "--epochs", "8", "--t", "80", "--lr", "2e-3"],
    "phantoms-3000": ["--phantoms", "3000", "--epochs", "5", "--t", "80"],
}


def run(name: str, options: list[str], out: Path) -> dict:
    """The candidate's summary (train.py's summary.json) and its wall time, training it first if needed."""
    folder = out / name
    if not (folder / "summary.json").is_file():
        started = time.time()
        command = [sys.executable, str(ROOT / "train.py"), "--out", str(folder), "--overwrite", *options]
        subprocess.run(command, check=True, cwd=ROOT)
        (folder / "wall_s.txt").write_text(f"{time.time() - started:.1f}\n")
    summary = json.loads((folder / "summary.json").read_text())
    return {**summary, "wall_s": float((folder / "wall_s.txt").read_text())}


def row(name: str, options: list[str], s: dict) -> str:
    after = s["phantom_scores"]["after"]
    def ci(key: str) -> str:
        low, high = after["intervals"][key]
        return f"{after.get(key, after['per_attribute'].get(key)):.2f} [{low:.2f}, {high:.2f}]"
    return (f"| {name} | `{' '.join(options) or '(default)'}` | {s['wall_s']:.0f} | {ci('adherence')} | "
            + " | ".join(ci(k) for k in ("sex", "lobe", "size", "device")) + f" | {ci('FID-phantoms')} | {s['total_rank']} |")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/recipe", help="folder of the candidates' run folders")
    p.add_argument("names", nargs="*", help=f"candidates to run (default: all of {', '.join(CANDIDATES)})")
    args = p.parse_args(argv)
    unknown = [n for n in args.names if n not in CANDIDATES]
    if unknown:
        p.error(f"no such candidate: {', '.join(unknown)} (known: {', '.join(CANDIDATES)})")
    lines = ["| candidate | options | wall (s) | adherence | sex | lobe | size | pacemaker | phantom-FID | total rank |",
             "|---" * 10 + "|"]
    for name in args.names or CANDIDATES:
        lines.append(row(name, CANDIDATES[name], run(name, CANDIDATES[name], Path(args.out))))
        print(lines[-1], flush=True)
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
