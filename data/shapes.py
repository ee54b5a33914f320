"""The base domain of the tiny pretrained model: one coloured shape on a dark ground, and a caption saying what
and where it is ("a large red circle in the upper left").

It plays the part of SD 1.5's web images: what the tiny model learns before it ever sees a phantom
(tools/pretrain_tiny.py). Its captions share the words of place and size with the phantoms' ("upper", "left",
"small", "large") and not the rest, so fine-tuning must learn a new appearance while the binding of words to
places can carry over. Some attribute combinations are never drawn in pretraining (`HELD_OUT`), so that caption
adherence measures composition, not recall.
"""
from __future__ import annotations

import itertools

import numpy as np
from PIL import Image, ImageDraw

ATTRIBUTES = {  # attribute -> its values, in the order the reader's (metrics/readback.py) classes use
    "size": ("small", "large"),
    "color": ("red", "green", "blue", "yellow"),
    "shape": ("circle", "square"),
    "place": ("upper left", "upper right", "lower left", "lower right"),
}
RGB = {"red": (220, 40, 40), "green": (40, 200, 60), "blue": (50, 90, 230), "yellow": (230, 210, 40)}
CENTRES = {"upper left": (0.3, 0.3), "upper right": (0.7, 0.3), "lower left": (0.3, 0.7), "lower right": (0.7, 0.7)}


def combination_index(attrs: dict[str, str]) -> int:
    return int(np.ravel_multi_index([ATTRIBUTES[k].index(attrs[k]) for k in ATTRIBUTES],
                                    [len(v) for v in ATTRIBUTES.values()]))


# One combination in eight is never drawn in pretraining: each value still appears, just not with these others.
HELD_OUT = frozenset(i for i, values in enumerate(itertools.product(*ATTRIBUTES.values()))
                     if (sum(v.index(x) * (k + 1) for k, (v, x) in enumerate(zip(ATTRIBUTES.values(), values))) % 8) == 3)


def caption(attrs: dict[str, str]) -> str:
    return f"a {attrs['size']} {attrs['color']} {attrs['shape']} in the {attrs['place']}"


def parse(text: str) -> dict[str, str]:
    """The attributes a caption names (the inverse of `caption`); ValueError for text that is not one."""
    words = text.split()
    if len(words) != 8 or words[0] != "a" or words[4:6] != ["in", "the"]:
        raise ValueError(f"not a shapes caption: {text!r}")
    attrs = dict(zip(ATTRIBUTES, (*words[1:4], " ".join(words[6:]))))
    for key, value in attrs.items():
        if value not in ATTRIBUTES[key]:
            raise ValueError(f"not a shapes caption: {text!r} ({key} {value!r})")
    return attrs


def random_attributes(rng: np.random.Generator, held_out: bool = False) -> dict[str, str]:
    """A uniformly drawn combination: one of the training combinations, or (held_out) one of `HELD_OUT`."""
    while True:
        attrs = {key: values[rng.integers(len(values))] for key, values in ATTRIBUTES.items()}
        if (combination_index(attrs) in HELD_OUT) == held_out:
            return attrs


def draw(rng: np.random.Generator, size: int, attrs: dict[str, str]) -> Image.Image:
    """The shape, jittered in place and size, on a dark ground of slightly varying grey."""
    ground = int(rng.integers(15, 45))
    im = Image.new("RGB", (size, size), (ground, ground, ground))
    r = size * (0.2 if attrs["size"] == "large" else 0.11) * rng.uniform(0.9, 1.1)
    cx, cy = (f * size + rng.uniform(-0.04, 0.04) * size for f in CENTRES[attrs["place"]])
    box = [cx - r, cy - r, cx + r, cy + r]
    fill = tuple(int(np.clip(c + rng.integers(-20, 21), 0, 255)) for c in RGB[attrs["color"]])
    (ImageDraw.Draw(im).ellipse if attrs["shape"] == "circle" else ImageDraw.Draw(im).rectangle)(box, fill=fill)
    return im
