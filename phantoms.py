"""Chest-like phantoms for the embedded default run: greyscale images of a body, two lungs, spine, ribs and heart,
most with a bright opacity in one lobe, and a caption naming where it is ("small opacity in the left upper lobe").

They show the mechanics of fine-tuning on a caption that names a location; they are no medical data. Written in
data.py's `folder` layout (PNGs plus metadata.jsonl), so training reads them like any user's folder.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from weights import atomic_write


PHANTOM_LOBES = {  # caption phrase -> (x, y) centre of the opacity as fractions of the image; patient's left is image right
    "right upper lobe": (0.32, 0.35), "right lower lobe": (0.32, 0.62),
    "left upper lobe": (0.68, 0.35), "left lower lobe": (0.68, 0.62),
}


def draw_phantom(rng: np.random.Generator, size: int) -> tuple[Image.Image, str]:
    """One greyscale chest-like phantom: body, two dark lungs, spine, ribs, heart, maybe a bright opacity."""
    s = size / 64  # all geometry in a 64 px frame
    im = Image.new("L", (size, size), 20)
    d = ImageDraw.Draw(im)

    def jitter(v: float) -> float:
        return v + rng.uniform(-1.5, 1.5) * s

    d.ellipse([jitter(6 * s), jitter(4 * s), jitter(58 * s), jitter(66 * s)], fill=150)          # body
    for x0, x1 in ((12, 30), (34, 52)):
        d.ellipse([jitter(x0 * s), jitter(10 * s), jitter(x1 * s), jitter(56 * s)], fill=60)     # lungs
    for y in range(14, 54, 6):
        d.arc([10 * s, (y - 4) * s, 54 * s, (y + 6) * s], 200, 340, fill=115, width=max(1, round(s)))  # ribs
    d.rectangle([30 * s, 0, 34 * s, size], fill=185)                                             # spine
    d.ellipse([jitter(27 * s), jitter(40 * s), jitter(41 * s), jitter(54 * s)], fill=165)        # heart
    if rng.random() < 0.25:
        caption = "normal chest, no opacity"
    else:
        lobe = list(PHANTOM_LOBES)[rng.integers(len(PHANTOM_LOBES))]
        big = rng.random() < 0.5
        r = (7 if big else 4) * s
        cx, cy = (f * size + rng.uniform(-2, 2) * s for f in PHANTOM_LOBES[lobe])
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=235)
        caption = f"{'large' if big else 'small'} opacity in the {lobe}"
    im = im.filter(ImageFilter.GaussianBlur(0.8 * s))
    noise = rng.normal(0, 6, (size, size))
    return Image.fromarray(np.clip(np.asarray(im, dtype=np.float64) + noise, 0, 255).astype(np.uint8)), caption


def make_phantom_folder(root: str | os.PathLike, n: int = 96, size: int = 64, seed: int = 0) -> Path:
    """Write `n` phantoms as PNGs plus metadata.jsonl (the `folder` layout) into `root`; returns `root`.

    Shows the mechanics of fine-tuning on a caption that names a location; it is no medical data.
    metadata.jsonl is written last and atomically: a folder that has it is complete.
    """
    if n < 1 or size < 16:
        raise ValueError(f"phantoms: need n >= 1 and size >= 16, got n={n}, size={size}")
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    (root / "metadata.jsonl").unlink(missing_ok=True)
    rng = np.random.default_rng(seed)
    lines = []
    for i in range(n):
        im, caption = draw_phantom(rng, size)
        name = f"phantom_{i:04d}.png"
        im.save(root / name, format="PNG")
        lines.append(json.dumps({"file_name": name, "text": caption}))
    with atomic_write(root / "metadata.jsonl", "w") as f:
        f.write("\n".join(lines) + "\n")
    return root
