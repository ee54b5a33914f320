"""Whether two train.py run folders trained the same thing: every tensor of last.safetensors bit for bit, and
log.jsonl's decisions (each test's step, layer, rank and expansion, each step's loss and total rank) equal; the
logged FI-scores and ratios compared to the largest relative difference (a refactoring of the Fisher sums may
round differently without changing a decision).

    python tools/same_run.py runs/before runs/after     # exit status 0 when the same, 1 otherwise

Both runs must use the same number of threads (OMP_NUM_THREADS): the CPU's matmul kernels sum in another order
with another thread count, which changes the last bits of every loss.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from model import weights  # noqa: E402


def bits(tensor):
    """The tensor's bytes, so that -0.0 and 0.0 or two NaNs are told apart as a bit-for-bit comparison must."""
    return tensor.contiguous().reshape(-1).view(torch.uint8)


def events(run: Path) -> list[dict]:
    lines = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    return [line for line in lines if "loss" in line]


def compare(a: Path, b: Path) -> list[str]:
    """The differences between runs a and b, as lines (none: the same)."""
    out = []
    ta, tb = weights.load_file(a / "last.safetensors"), weights.load_file(b / "last.safetensors")
    if ta.keys() != tb.keys():
        out.append(f"last.safetensors: other tensors ({len(ta)} against {len(tb)})")
    differ = [k for k in sorted(ta.keys() & tb.keys())
              if ta[k].shape != tb[k].shape or not bits(ta[k]).equal(bits(tb[k]))]
    if differ:
        out.append(f"last.safetensors: {len(differ)} of {len(ta)} tensors differ, e.g. {', '.join(differ[:3])}")
    la, lb = events(a), events(b)
    if [(x["step"], x["loss"], x["total_rank"]) for x in la] != [(x["step"], x["loss"], x["total_rank"]) for x in lb]:
        out.append("log.jsonl: the steps' losses or total ranks differ")
    worst = 0.0
    for x, y in zip(la, lb):
        ex, ey = x.get("events", []), y.get("events", [])
        key = lambda e: (e["step"], e["layer"], e["rank"], e.get("expanded"), e.get("reached_max_rank"))  # noqa: E731
        if [key(e) for e in ex] != [key(e) for e in ey]:
            out.append(f"log.jsonl: step {x['step']}: the decisions differ")
        for e, f in zip(ex, ey):
            for field in ("score", "ratio"):
                if field in e:
                    worst = max(worst, abs(e[field] - f[field]) / max(abs(e[field]), 1e-300))
    print(f"largest relative difference of a logged FI-score or ratio: {worst:.3g}")
    return out


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    differences = compare(*map(Path, argv))
    print("\n".join(differences) or "the same: last.safetensors bit for bit, every decision and loss")
    return 1 if differences else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
