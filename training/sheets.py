"""Generated images as PNGs and the contact sheets people look at: previews/grid.png of a run, sample.py's grid,
the report's figures 2 and 7. Images smaller than SHOWN pixels are shown enlarged (nearest neighbour), with their
rows and captions labelled, so that the change fine-tuning makes is seen without zooming.
"""
from __future__ import annotations

import math
import textwrap
from pathlib import Path
from typing import Sequence

import torch
from PIL import Image, ImageDraw

from training.plots import INK, font, save_png

SHOWN = 128  # pixels: generated images smaller than this are shown enlarged (`enlarged`)


def to_pil(image: torch.Tensor) -> Image.Image:
    """A (3, H, W) image in [-1, 1] as an 8-bit RGB picture."""
    pixels = ((image.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(pixels, "RGB")


def grid(images: list[Image.Image], columns: int | None = None) -> Image.Image:
    """Images of one size side by side, `columns` per row (default: a near-square grid)."""
    columns = columns or math.ceil(math.sqrt(len(images)))
    w, h = images[0].size
    sheet = Image.new("RGB", (columns * w, math.ceil(len(images) / columns) * h), "white")
    for i, im in enumerate(images):
        sheet.paste(im, ((i % columns) * w, (i // columns) * h))
    return sheet


def enlarged(image: Image.Image) -> Image.Image:
    """An image smaller than SHOWN pixels enlarged by a whole factor, nearest neighbour (4x for 32 px), so that
    a person sees its pixels without zooming; larger ones as they are."""
    factor = max(1, math.ceil(SHOWN / max(image.size)))
    return image.resize((image.width * factor, image.height * factor), Image.NEAREST) if factor > 1 else image


def labelled_sheet(pictures: list[Image.Image], columns: int, rows: Sequence[str] = (),
                   captions: Sequence[str] = ()) -> Image.Image:
    """`grid` of the `enlarged` pictures, with a label left of each row and a caption, wrapped, over each column."""
    big = [enlarged(p) for p in pictures]
    w, h = big[0].size
    fnt, pad = font(11), 2
    wrapped = [textwrap.wrap(c, max(8, w // 6)) for c in captions]
    top = 13 * max(map(len, wrapped), default=0) + (6 if wrapped else 0)
    left = max((fnt.getbbox(r)[2] for r in rows), default=-8) + 8
    sheet = Image.new("RGB", (left + columns * (w + pad), top + math.ceil(len(big) / columns) * (h + pad)), "white")
    d = ImageDraw.Draw(sheet)
    for c, lines in enumerate(wrapped[:columns]):
        d.multiline_text((left + c * (w + pad), 2), "\n".join(lines), fill=INK, font=fnt, spacing=2)
    for r, label in enumerate(rows):
        d.text((4, top + r * (h + pad) + h // 2), label, fill=INK, font=fnt, anchor="lm")
    for i, im in enumerate(big):
        sheet.paste(im, (left + (i % columns) * (w + pad), top + (i // columns) * (h + pad)))
    return sheet


def write_images(images: torch.Tensor, out: Path, names: list[str] | None = None, columns: int | None = None,
                 rows: Sequence[str] = (), captions: Sequence[str] = ()) -> list[Path]:
    """One PNG per image in [-1, 1] (named `names[i]` or `{i:05d}.png`) and `grid.png`, the `labelled_sheet` of
    them (`columns` wide; default near-square), with `rows` and `captions` as labels where given."""
    pictures = [to_pil(im) for im in images]
    paths = [out / (names[i] if names else f"{i:05d}.png") for i in range(len(pictures))]
    for picture, path in zip(pictures, paths):
        save_png(picture, path)
    save_png(labelled_sheet(pictures, columns or math.ceil(math.sqrt(len(pictures))), rows, captions), out / "grid.png")
    return paths


def labelled_grid(files: dict[str, list[Path]]) -> tuple[Image.Image, int]:
    """Figures 2 and 7: one row per test prompt (numbered), one column of image files per label, each image
    `enlarged`; as many rows as the shortest column has images. Returns the sheet and that number."""
    n = min(len(f) for f in files.values())
    with Image.open(files[next(iter(files))][0]) as first:
        w, h = enlarged(first).size
    fnt = font(12)
    top, left, pad = 20, 24, 2
    sheet = Image.new("RGB", (left + len(files) * (w + pad), top + n * (h + pad)), "white")
    d = ImageDraw.Draw(sheet)
    for c, (label, paths) in enumerate(files.items()):
        d.text((left + c * (w + pad) + w // 2, 4), label, fill=INK, font=fnt, anchor="mt")
        for r, path in enumerate(paths[:n]):
            with Image.open(path) as im:
                sheet.paste(enlarged(im.convert("RGB")), (left + c * (w + pad), top + r * (h + pad)))
    for r in range(n):
        d.text((left // 2, top + r * (h + pad) + h // 2), str(r + 1), fill=INK, font=fnt, anchor="mm")
    return sheet, n
