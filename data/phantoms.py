"""Chest-like phantoms, the target domain of the embedded default run: greyscale images of a body, two lungs,
spine, ribs and heart, most with a bright opacity in one lobe, some with a pacemaker, and a caption naming the
patient's sex, the finding and the device ("female chest, small opacity in the left upper lobe, with a pacemaker").

The tiny pretrained model has never seen one (it learned coloured shapes, data/shapes.py): fine-tuning must learn
their appearance, as SD 1.5 must learn X-rays, while the words of place and size carry over. They are no
medical data. Written in
data/datasets.py's `folder` layout (PNGs plus metadata.jsonl), so training reads them like any user's folder.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from model.weights import atomic_write


PHANTOM_LOBES = {  # caption phrase -> (x, y) centre of the opacity as fractions of the image; patient's left is image right
    "right upper lobe": (0.32, 0.35), "right lower lobe": (0.32, 0.62),
    "left upper lobe": (0.68, 0.35), "left lower lobe": (0.68, 0.62),
}
ATTRIBUTES = {  # attribute -> its values, in the order the reader's (metrics/readback.py) classes use
    "sex": ("female", "male"),
    "finding": ("no opacity", *PHANTOM_LOBES),
    "size": ("small", "large"),  # named only with an opacity
    "device": ("none", "pacemaker"),
}


def caption(attrs: dict[str, str]) -> str:
    """"male chest, large opacity in the left upper lobe, with a pacemaker"; "female chest, no opacity"."""
    finding = attrs["finding"] if attrs["finding"] == "no opacity" else f"{attrs['size']} opacity in the {attrs['finding']}"
    return f"{attrs['sex']} chest, {finding}" + (", with a pacemaker" if attrs["device"] == "pacemaker" else "")


def parse(text: str) -> dict[str, str]:
    """The attributes a caption names (the inverse of `caption`; no size without an opacity); ValueError for
    text that is not one."""
    parts = text.split(", ")
    device = "pacemaker" if parts[-1] == "with a pacemaker" else "none"
    parts = parts[:-1] if device == "pacemaker" else parts
    sex = parts[0].removesuffix(" chest") if parts else ""
    if len(parts) != 2 or sex not in ATTRIBUTES["sex"] or not parts[0].endswith(" chest"):
        raise ValueError(f"not a phantom caption: {text!r}")
    attrs = {"sex": sex, "device": device}
    if parts[1] == "no opacity":
        return {**attrs, "finding": "no opacity"}
    size, _, lobe = parts[1].partition(" opacity in the ")
    if size not in ATTRIBUTES["size"] or lobe not in PHANTOM_LOBES:
        raise ValueError(f"not a phantom caption: {text!r}")
    return {**attrs, "finding": lobe, "size": size}


def random_attributes(rng: np.random.Generator) -> dict[str, str]:
    """A quarter without an opacity, the rest in a uniformly drawn lobe; a pacemaker in one in four."""
    lobe = "no opacity" if rng.random() < 0.25 else list(PHANTOM_LOBES)[rng.integers(len(PHANTOM_LOBES))]
    attrs = {"sex": ATTRIBUTES["sex"][rng.integers(2)], "finding": lobe,
             "device": "pacemaker" if rng.random() < 0.25 else "none"}
    return attrs if lobe == "no opacity" else {**attrs, "size": ATTRIBUTES["size"][rng.integers(2)]}


def draw(rng: np.random.Generator, size: int, attrs: dict[str, str], noise: float = 6.0) -> Image.Image:
    """One greyscale chest-like phantom: body (wider shoulders for a male, breast shadows for a female), two
    dark lungs, spine, ribs, heart; the opacity and the pacemaker (a bright box, its lead to the heart) as named;
    film noise of std `noise` grey levels (0: the noiseless drawing, from the same random draws)."""
    s = size / 64  # all geometry in a 64 px frame
    im = Image.new("L", (size, size), 20)
    d = ImageDraw.Draw(im)

    def jitter(v: float) -> float:
        return v + rng.uniform(-1.5, 1.5) * s

    inset = 3 if attrs["sex"] == "male" else 9
    d.ellipse([jitter(inset * s), jitter(4 * s), jitter((64 - inset) * s), jitter(66 * s)], fill=150)  # body
    for x0, x1 in ((12, 30), (34, 52)):
        d.ellipse([jitter(x0 * s), jitter(10 * s), jitter(x1 * s), jitter(56 * s)], fill=60)     # lungs
    if attrs["sex"] == "female":
        for x0 in (10, 36):
            d.chord([x0 * s, 40 * s, (x0 + 18) * s, 62 * s], 0, 180, fill=100)                    # breast shadows
    for y in range(14, 54, 6):
        d.arc([10 * s, (y - 4) * s, 54 * s, (y + 6) * s], 200, 340, fill=115, width=max(1, round(s)))  # ribs
    d.rectangle([30 * s, 0, 34 * s, size], fill=185)                                             # spine
    d.ellipse([jitter(27 * s), jitter(40 * s), jitter(41 * s), jitter(54 * s)], fill=165)        # heart
    if attrs["finding"] != "no opacity":
        r = (7 if attrs["size"] == "large" else 4) * s
        cx, cy = (f * size + rng.uniform(-2, 2) * s for f in PHANTOM_LOBES[attrs["finding"]])
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=235)
    if attrs["device"] == "pacemaker":
        x, y = jitter(44 * s), jitter(8 * s)
        d.line([x + 2 * s, y + 4 * s, 36 * s, 14 * s, 35 * s, 44 * s], fill=245, width=max(1, round(s)))  # lead
        d.rectangle([x, y, x + 7 * s, y + 5 * s], fill=250)                                    # generator
    im = im.filter(ImageFilter.GaussianBlur(0.8 * s))
    grain = rng.normal(0, 1, (size, size)) * noise
    return Image.fromarray(np.clip(np.asarray(im, dtype=np.float64) + grain, 0, 255).astype(np.uint8))


def draw_phantom(rng: np.random.Generator, size: int) -> tuple[Image.Image, str]:
    """A phantom with randomly drawn attributes, and its caption."""
    attrs = random_attributes(rng)
    return draw(rng, size, attrs), caption(attrs)


def drawn(n: int, size: int, seed: int) -> tuple[list[Image.Image], list[str]]:
    """`n` phantoms with randomly drawn attributes, and their captions (same seed, same set)."""
    rng = np.random.default_rng(seed)
    pairs = [draw_phantom(rng, size) for _ in range(n)]
    return [im for im, _ in pairs], [c for _, c in pairs]


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
    lines = []
    for i, (im, text) in enumerate(zip(*drawn(n, size, seed))):
        name = f"phantom_{i:04d}.png"
        im.save(root / name, format="PNG")
        lines.append(json.dumps({"file_name": name, "text": text}))
    with atomic_write(root / "metadata.jsonl", "w") as f:
        f.write("\n".join(lines) + "\n")
    return root
