"""The split of a data set into train, validation and test (the paper's section 3.4), written to the run folder.

The split is drawn over groups (the report's uid, the gastric slide id, a Montgomery reading's "same pt as"
reference), so that no report, slide or patient has images on both sides, and is stored as JSON of names
per split: evaluation reloads exactly the held-out images. A resumed run compares the data with the
fingerprints recorded beside it (`fingerprints`, `changes`).
"""
from __future__ import annotations

import hashlib
import json
import math
import os
from pathlib import Path

import numpy as np

from data.datasets import SPLIT_NAMES, DataSet, Example
from model.weights import atomic_write


def parse_split(text: str) -> tuple[float, float, float]:
    """'80,16,4' (train, validation, test) or '80,20' (train, test) in percent -> fractions summing to 1."""
    try:
        parts = [float(p) for p in text.split(",")]
    except ValueError:
        raise ValueError(f"split {text!r}: expected comma-separated percentages such as 80,16,4 or 80,20") from None
    if len(parts) not in (2, 3) or any(p < 0 or not math.isfinite(p) for p in parts) or abs(sum(parts) - 100) > 1e-6:
        raise ValueError(f"split {text!r}: expected 2 or 3 non-negative percentages summing to 100")
    if len(parts) == 2:
        parts.insert(1, 0.0)
    if parts[0] == 0:
        raise ValueError(f"split {text!r}: the training part must not be empty")
    return tuple(p / 100 for p in parts)


def make_split(examples: list[Example], fractions: tuple[float, float, float], seed: int) -> dict[str, list[str]]:
    """Shuffle the groups with `seed` and fill train, then validation, then test up to their share of images.

    Deterministic for a given set of examples and seed (independent of the examples' order).
    """
    groups: dict[str, list[str]] = {}
    for e in sorted(examples, key=lambda e: e.name):
        groups.setdefault(e.group, []).append(e.name)
    keys = sorted(groups)
    order = np.random.default_rng(seed).permutation(len(keys))
    total = len(examples)
    bounds = np.cumsum(fractions) * total
    split = {name: [] for name in SPLIT_NAMES}
    filled = 0
    for i in order:
        members = groups[keys[i]]
        # the part whose range holds this group's midpoint
        part = int(np.searchsorted(bounds, filled + len(members) / 2, side="right"))
        split[SPLIT_NAMES[min(part, 2)]] += members
        filled += len(members)
    return {name: sorted(names) for name, names in split.items()}


def write_split(path: str | os.PathLike, split: dict[str, list[str]], info: dict | None = None) -> None:
    """Save {"splits": {train|validation|test: [names]}, **info} as JSON, atomically."""
    payload = {**(info or {}), "splits": {name: list(split.get(name, [])) for name in SPLIT_NAMES}}
    with atomic_write(path, "w") as f:
        json.dump(payload, f, indent=1)


def fingerprints(examples: list[Example]) -> dict[str, list]:
    """{name: [image size in bytes, modification time in ns, the caption's sha256 (16 hex digits)]}: what split.json
    records of the data, so that a resumed run finds images and captions changed since it started (`changes`).
    Size and modification time are what the latent cache keys an image by, too: a replaced file changes them."""
    out = {}
    for e in examples:
        stat = e.path.stat()
        out[e.name] = [stat.st_size, stat.st_mtime_ns, hashlib.sha256(e.caption.encode("utf-8")).hexdigest()[:16]]
    return out


def changes(recorded: dict[str, list], now: dict[str, list]) -> list[str]:
    """What differs between two `fingerprints`, one item per image: 'image changed: NAME' (size or modification
    time), 'caption changed: NAME', 'added: NAME', 'removed: NAME'."""
    out = [f"removed: {n}" for n in recorded if n not in now] + [f"added: {n}" for n in now if n not in recorded]
    for name in recorded.keys() & now.keys():
        was, new = recorded[name], now[name]
        if list(was[:2]) != list(new[:2]):
            out.append(f"image changed: {name}")
        if was[2:] != new[2:]:
            out.append(f"caption changed: {name}")
    return sorted(out, key=lambda item: item.split(": ", 1)[1])


def read_split(path: str | os.PathLike) -> dict[str, list[str]]:
    path = Path(path)
    try:
        payload = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"{path}: cannot read the split ({err})") from None
    splits = payload.get("splits") if isinstance(payload, dict) else None
    if not isinstance(splits, dict) or set(splits) != set(SPLIT_NAMES) or \
            not all(isinstance(v, list) and all(isinstance(n, str) for n in v) for v in splits.values()):
        raise ValueError(f"{path}: expected {{\"splits\": {{\"train\": [...], \"validation\": [...], \"test\": [...]}}}}")
    return splits


def select(dataset: DataSet, names: list[str], source: str | os.PathLike = "split") -> list[Example]:
    """The examples named by a split part, in its order; a name no longer in the data set is an error."""
    by_name = {e.name: e for e in dataset.examples}
    missing = [n for n in names if n not in by_name]
    if missing:
        raise ValueError(f"{source}: {len(missing)} image(s) of the split are not usable in {dataset.root} "
                         f"(first: {missing[0]})")
    return [by_name[n] for n in names]
