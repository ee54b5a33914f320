"""PNG figures drawn with Pillow alone: rank heatmaps laid out like the paper's figures 3 and 4 and line plots;
which of them a run writes is train_loop.run_figures (generated images and their sheets: training/sheets.py).

A heatmap places each adapted layer in a grid cell given by a `Layout` (layer name -> (row, column) plus the
row and column labels). `text_encoder_layout` and `unet_layout` build the paper's grids from our module
names; any other grid is a `Layout` the caller writes. Higher ranks are drawn darker, the rank is written in
each cell, and a colour bar gives the scale. `heatmap_panel` draws several methods on one shared scale.
"""
from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass
from typing import Sequence

from PIL import Image, ImageDraw, ImageFont

from model.weights import atomic_write

# a light-to-dark blue sequence (after ColorBrewer YlGnBu); luminance falls monotonically
COLORMAP = ((255, 255, 217), (199, 233, 180), (65, 182, 196), (34, 94, 168), (8, 29, 88))
PALETTE = ((31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
           (140, 86, 75), (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207))
EMPTY_CELL = (238, 238, 238)
INK, GRID = (0, 0, 0), (225, 225, 225)


@dataclass
class Layout:
    rows: list[str]                        # row labels, top to bottom
    cols: list[str]                        # column labels, left to right
    cells: dict[str, tuple[int, int]]      # layer name -> (row, column)


def font(size: int = 12) -> ImageFont.FreeTypeFont:
    return ImageFont.load_default(size)


def colormap(t: float) -> tuple[int, int, int]:
    """Colour for t in [0, 1] (clamped), interpolated linearly between the COLORMAP anchors."""
    t = min(max(t, 0.0), 1.0) * (len(COLORMAP) - 1)
    i = min(int(t), len(COLORMAP) - 2)
    f = t - i
    return tuple(round(a + (b - a) * f) for a, b in zip(COLORMAP[i], COLORMAP[i + 1]))


def _text_size(text: str, fnt) -> tuple[int, int]:
    left, top, right, bottom = fnt.getbbox(text)
    return right - left, bottom


def _vertical_text(text: str, fnt) -> Image.Image:
    """`text` rotated to read bottom to top, for a y-axis title."""
    w, h = _text_size(text, fnt)
    im = Image.new("RGB", (w + 2, h + 2), "white")
    ImageDraw.Draw(im).text((1, 1), text, fill=INK, font=fnt)
    return im.rotate(90, expand=True)


def save_png(image: Image.Image, path: str | os.PathLike) -> None:
    with atomic_write(path) as f:
        image.save(f, format="PNG")


# ---------------------------------------------------------------- layouts of figures 3 and 4

def _layout(matches: list[tuple[str, str, tuple, str]], row_order: Sequence[str]) -> Layout:
    """Build a Layout from (name, row label, column sort key, column label), keeping only rows that occur."""
    rows = [r for r in row_order if any(m[1] == r for m in matches)]
    col_keys = sorted({(m[2], m[3]) for m in matches})
    cols = [label for _, label in col_keys]
    return Layout(rows, cols, {m[0]: (rows.index(m[1]), col_keys.index((m[2], m[3]))) for m in matches})


TEXT_ROWS = ("q", "k", "v", "out", "fc1", "fc2")
_TEXT = re.compile(r"layers\.(\d+)\.(?:self_attn\.(q|k|v|out)_proj|mlp\.(fc1|fc2))$")


def text_encoder_layout(names: Sequence[str]) -> Layout:
    """Figure 3: rows q, k, v, out, fc1, fc2; columns the encoder layers 0..11 (names `...layers.{i}.self_attn.q_proj`).

    Names that are not such a layer are left out of the grid.
    """
    matches = []
    for name in names:
        m = _TEXT.search(name)
        if m:
            matches.append((name, m.group(2) or m.group(3), (int(m.group(1)),), m.group(1)))
    return _layout(matches, TEXT_ROWS)


UNET_ROWS = {"attn1.to_q": "attn1_q", "attn1.to_k": "attn1_k", "attn1.to_v": "attn1_v", "attn1.to_out.0": "attn1_out",
             "attn2.to_q": "attn2_q", "attn2.to_k": "attn2_k", "attn2.to_v": "attn2_v", "attn2.to_out.0": "attn2_out",
             "ff.net.0.proj": "ff_in", "ff.net.2": "ff_out", "proj_in": "proj_in", "proj_out": "proj_out"}
_UNET = re.compile(r"(?:input_blocks\.(\d+)|(middle_block)|output_blocks\.(\d+))\.\d+\."
                   r"(?:transformer_blocks\.(\d+)\.)?(" + "|".join(re.escape(k) for k in UNET_ROWS) + r")$")


def unet_layout(names: Sequence[str], layers_per_block: int = 2) -> Layout:
    """Figure 4: rows attn1_q ... attn2_out, ff_in, ff_out, proj_in, proj_out; columns the spatial transformers
    from input to output, labelled as in the paper (d00 d01 d10 ... mid u10 u11 u12 ... u32).

    Names are the LDM ones (`input_blocks.1.1.transformer_blocks.0.attn1.to_q`, `middle_block.1.proj_in`,
    `output_blocks.11.1.transformer_blocks.0.ff.net.2`), with any prefix. `layers_per_block` (2 in SD 1.5)
    turns block indices into the paper's level/position labels. Other layers are left out of the grid.
    """
    n = layers_per_block + 1
    matches = []
    for name in names:
        m = _UNET.search(name)
        if not m:
            continue
        down, middle, up, depth, part = m.groups()
        if down is not None:
            key, label = (0, int(down)), f"d{(int(down) - 1) // n}{(int(down) - 1) % n}"
        elif middle:
            key, label = (1, 0), "mid"
        else:
            key, label = (2, int(up)), f"u{int(up) // n}{int(up) % n}"
        if depth not in (None, "0"):  # deeper transformers (not in SD 1.5) get a column each
            key, label = key + (int(depth),), f"{label}.{depth}"
        matches.append((name, UNET_ROWS[part], key, label))
    return _layout(matches, list(UNET_ROWS.values()))


# ---------------------------------------------------------------- heatmaps

def _grid(ranks: dict[str, float], layout: Layout, vmin: float, vmax: float, cell: tuple[int, int],
          fnt) -> Image.Image:
    """Row labels, coloured cells with their rank, column labels below."""
    label_w = max(_text_size(r, fnt)[0] for r in layout.rows) + 8
    cw, ch = cell
    col_h = max(_text_size(c, fnt)[1] for c in layout.cols) + 6
    im = Image.new("RGB", (label_w + cw * len(layout.cols) + 1, ch * len(layout.rows) + col_h + 1), "white")
    d = ImageDraw.Draw(im)
    for r, label in enumerate(layout.rows):
        d.text((label_w - 6, r * ch + ch // 2), label, fill=INK, font=fnt, anchor="rm")
    for c, label in enumerate(layout.cols):
        d.text((label_w + c * cw + cw // 2, len(layout.rows) * ch + 3), label, fill=INK, font=fnt, anchor="mt")
    for r in range(len(layout.rows)):
        for c in range(len(layout.cols)):
            d.rectangle([label_w + c * cw, r * ch, label_w + (c + 1) * cw, (r + 1) * ch], fill=EMPTY_CELL, outline="white")
    span = max(vmax - vmin, 1e-12)
    for name, (r, c) in layout.cells.items():
        if name not in ranks:
            continue
        value = ranks[name]
        t = (value - vmin) / span
        colour = colormap(t)
        box = [label_w + c * cw, r * ch, label_w + (c + 1) * cw, (r + 1) * ch]
        d.rectangle(box, fill=colour, outline="white")
        luminance = 0.299 * colour[0] + 0.587 * colour[1] + 0.114 * colour[2]
        text = f"{value:g}" if isinstance(value, float) and not float(value).is_integer() else str(int(value))
        d.text(((box[0] + box[2]) // 2, (box[1] + box[3]) // 2), text, font=fnt, anchor="mm",
               fill="white" if luminance < 140 else INK)
    return im


def _ticks(lo: float, hi: float, count: int = 6) -> list[float]:
    """Round tick values (1, 2 or 5 times a power of ten) inside [lo, hi], as close to `count` of them as possible."""
    if hi <= lo:
        hi = lo + 1
    power = 10 ** math.floor(math.log10((hi - lo) / max(count - 1, 1)))

    def ticks(step: float) -> list[float]:
        first = math.ceil(lo / step - 1e-9) * step
        return [round(first + i * step, 12) for i in range(int((hi - first) / step + 1e-9) + 1)]

    return min((ticks(m * power) for m in (1, 2, 5, 10)), key=lambda t: abs(len(t) - count))


def _fmt(v: float) -> str:
    return f"{v:.4g}"


def _colorbar(vmin: float, vmax: float, height: int, fnt) -> Image.Image:
    bar_w = 14
    inner = [t for t in _ticks(vmin, vmax, 5) if vmin + 0.1 * (vmax - vmin) < t < vmax - 0.1 * (vmax - vmin)]
    ticks = [vmin, *inner, vmax] if vmax > vmin else [vmin]
    label_w = max(_text_size(_fmt(t), fnt)[0] for t in ticks)
    im = Image.new("RGB", (bar_w + 10 + label_w, height), "white")
    d = ImageDraw.Draw(im)
    for y in range(height):
        d.line([(0, y), (bar_w - 1, y)], fill=colormap(1 - y / max(height - 1, 1)))
    d.rectangle([0, 0, bar_w - 1, height - 1], outline=INK)
    span = max(vmax - vmin, 1e-12)
    for t in ticks:
        y = round((1 - (t - vmin) / span) * (height - 1)) if vmax > vmin else height // 2
        d.line([(bar_w, y), (bar_w + 3, y)], fill=INK)
        d.text((bar_w + 6, min(max(y, 6), height - 6)), _fmt(t), fill=INK, font=fnt, anchor="lm")
    return im


def _check_ranks(ranks: dict[str, float], layout: Layout, what: str) -> None:
    if not ranks:
        raise ValueError(f"{what}: no ranks to draw")
    if not layout.cells or not any(name in layout.cells for name in ranks):
        raise ValueError(f"{what}: none of the {len(ranks)} layer names is in the layout "
                         f"(first: {next(iter(ranks))!r}); build the layout from these names")
    bad = [n for n, v in ranks.items() if not isinstance(v, (int, float)) or not math.isfinite(v)]
    if bad:
        raise ValueError(f"{what}: rank of {bad[0]!r} is {ranks[bad[0]]!r}, expected a finite number")


def _compose(title: str, body: list[tuple[str, Image.Image]], bar: Image.Image, xlabel: str, ylabel: str,
             fnt, title_font) -> Image.Image:
    """Stack titled grids vertically, add the colour bar on the right and the axis titles."""
    pad = 10
    heading_h = _text_size("Ag", title_font)[1] + 8
    sub_h = _text_size("Ag", fnt)[1] + 14
    ylabel_w = _text_size("Ag", fnt)[1] + 8 if ylabel else 0
    grids_w = max(g.width for _, g in body)
    grids_h = sum(g.height + (sub_h if sub else 0) for sub, g in body)
    width = pad + ylabel_w + grids_w + pad + bar.width + pad
    height = heading_h + pad + grids_h + (sub_h if xlabel else 0) + pad
    im = Image.new("RGB", (width, height), "white")
    d = ImageDraw.Draw(im)
    d.text((width // 2, pad // 2), title, fill=INK, font=title_font, anchor="mt")
    y = heading_h + pad
    for sub, grid in body:
        if sub:
            d.text((pad + ylabel_w + grid.width // 2, y + 8), sub, fill=INK, font=fnt, anchor="mt")
            y += sub_h
        im.paste(grid, (pad + ylabel_w, y))
        y += grid.height
    im.paste(bar, (pad + ylabel_w + grids_w + pad, heading_h + pad + (sub_h if body[0][0] else 0)))
    if xlabel:
        d.text((pad + ylabel_w + grids_w // 2, y + 2), xlabel, fill=INK, font=fnt, anchor="mt")
    if ylabel:
        label = _vertical_text(ylabel, fnt)
        im.paste(label, (pad, heading_h + pad + max(0, (grids_h - label.height) // 2)))
    return im


def rank_table(ranks: dict[str, float], layout: Layout) -> str:
    """The heatmap's numbers as plain text: one line per row of `layout`, one column per column, "." where no
    layer sits (for a terminal or a notebook, where the PNG of `rank_heatmap` is not at hand)."""
    _check_ranks(ranks, layout, "rank table")
    cells = [["." for _ in layout.cols] for _ in layout.rows]
    for name, (r, c) in layout.cells.items():
        if name in ranks:
            cells[r][c] = _fmt(ranks[name])
    width = max(len(text) for text in [*layout.cols, *(x for row in cells for x in row)])
    label = max(len(row) for row in layout.rows)
    lines = [" " * label + " " + " ".join(col.rjust(width) for col in layout.cols)]
    lines += [row.ljust(label) + " " + " ".join(x.rjust(width) for x in cells[i]) for i, row in enumerate(layout.rows)]
    return "\n".join(lines)


def rank_heatmap(ranks: dict[str, float], layout: Layout, title: str = "Final rank per layer",
                 xlabel: str = "Attention layer", ylabel: str = "Weight", cell: tuple[int, int] = (34, 24),
                 vmin: float | None = None, vmax: float | None = None) -> Image.Image:
    """Heatmap of {layer name: rank} on `layout` (figures 3 and 4), with a colour bar; higher is darker.

    Layers of `ranks` outside the layout are not drawn; grid cells without a rank stay grey.
    """
    _check_ranks(ranks, layout, title)
    shown = [v for n, v in ranks.items() if n in layout.cells]
    lo = min(shown) if vmin is None else vmin
    hi = max(shown) if vmax is None else vmax
    fnt, title_font = font(12), font(15)
    grid = _grid(ranks, layout, lo, hi, cell, fnt)
    bar = _colorbar(lo, hi, cell[1] * len(layout.rows), fnt)
    return _compose(title, [("", grid)], bar, xlabel, ylabel, fnt, title_font)


def heatmap_panel(methods: dict[str, dict[str, float]], layout: Layout, title: str = "Final rank per layer",
                  xlabel: str = "Attention layer", ylabel: str = "Weight",
                  cell: tuple[int, int] = (34, 24)) -> Image.Image:
    """One heatmap per method (stacked, each titled by its name) on one shared colour scale."""
    if not methods:
        raise ValueError(f"{title}: no methods to draw")
    for name, ranks in methods.items():
        _check_ranks(ranks, layout, f"{title}: {name}")
    shown = [v for ranks in methods.values() for n, v in ranks.items() if n in layout.cells]
    lo, hi = min(shown), max(shown)
    fnt, title_font = font(12), font(15)
    body = [(name, _grid(ranks, layout, lo, hi, cell, fnt)) for name, ranks in methods.items()]
    bar = _colorbar(lo, hi, cell[1] * len(layout.rows), fnt)
    return _compose(title, body, bar, xlabel, ylabel, fnt, title_font)


# ---------------------------------------------------------------- line plots

def line_plot(series: dict[str, tuple[Sequence[float], Sequence[float]]], title: str = "", xlabel: str = "",
              ylabel: str = "", size: tuple[int, int] = (640, 400), xlim: tuple[float, float] | None = None,
              ylim: tuple[float, float] | None = None) -> Image.Image:
    """Lines of {label: (xs, ys)} with a framed plot area, ticks, grid, axis labels and a legend.

    Non-finite points are left out (the line breaks there). `ylim` fixes the y range (figures 11 and 12
    use the model-load memory and the GPU's total as limits); otherwise it spans the data.
    """
    if not series:
        raise ValueError(f"line plot {title!r}: no series")
    points = {}
    for label, (xs, ys) in series.items():
        if len(xs) != len(ys):
            raise ValueError(f"line plot {title!r}: series {label!r} has {len(xs)} x values and {len(ys)} y values")
        points[label] = [(float(x), float(y)) for x, y in zip(xs, ys)]
    finite = [(x, y) for pts in points.values() for x, y in pts if math.isfinite(x) and math.isfinite(y)]
    if not finite:
        raise ValueError(f"line plot {title!r}: no finite data points")
    x0, x1 = xlim or (min(p[0] for p in finite), max(p[0] for p in finite))
    y0, y1 = ylim or (min(p[1] for p in finite), max(p[1] for p in finite))
    if x1 <= x0:
        x0, x1 = x0 - 0.5, x0 + 0.5
    if y1 <= y0:
        y0, y1 = y0 - 0.5, y0 + 0.5
    if ylim is None:
        margin = 0.05 * (y1 - y0)
        y0, y1 = y0 - margin, y1 + margin

    fnt, title_font = font(12), font(15)
    yticks = _ticks(y0, y1)
    xticks = _ticks(x0, x1)
    tick_w = max(_text_size(_fmt(t), fnt)[0] for t in yticks) if yticks else 0
    text_h = _text_size("Ag", fnt)[1]
    left = 12 + (text_h + 6 if ylabel else 0) + tick_w + 8
    top = _text_size("Ag", title_font)[1] + 18 if title else 12
    right, bottom = size[0] - 16, size[1] - (text_h * 2 + 20 if xlabel else text_h + 16)
    if right - left < 40 or bottom - top < 40:
        raise ValueError(f"line plot {title!r}: size {size} is too small")
    im = Image.new("RGB", size, "white")
    d = ImageDraw.Draw(im)

    def px(x: float, y: float) -> tuple[float, float]:
        return left + (x - x0) / (x1 - x0) * (right - left), bottom - (y - y0) / (y1 - y0) * (bottom - top)

    for t in yticks:
        y = px(x0, t)[1]
        d.line([(left, y), (right, y)], fill=GRID)
        d.line([(left - 4, y), (left, y)], fill=INK)
        d.text((left - 7, y), _fmt(t), fill=INK, font=fnt, anchor="rm")
    for t in xticks:
        x = px(t, y0)[0]
        d.line([(x, top), (x, bottom)], fill=GRID)
        d.line([(x, bottom), (x, bottom + 4)], fill=INK)
        d.text((x, bottom + 7), _fmt(t), fill=INK, font=fnt, anchor="mt")
    for i, pts in enumerate(points.values()):
        _draw_series(d, [px(x, min(max(y, y0), y1)) if math.isfinite(x) and math.isfinite(y) and x0 <= x <= x1
                         else None for x, y in pts], PALETTE[i % len(PALETTE)])
    d.rectangle([left, top, right, bottom], outline=INK)
    if title:
        d.text(((left + right) // 2, 8), title, fill=INK, font=title_font, anchor="mt")
    if xlabel:
        d.text(((left + right) // 2, size[1] - 6), xlabel, fill=INK, font=fnt, anchor="mb")
    if ylabel:
        label_im = _vertical_text(ylabel, fnt)
        im.paste(label_im, (8, max(top, (top + bottom - label_im.height) // 2)))
    if len(points) > 1:
        _legend(d, list(points), fnt, right, top)
    return im


def _draw_series(d: ImageDraw.ImageDraw, pixels: list[tuple[float, float] | None],
                 colour: tuple[int, int, int]) -> None:
    """One series' points in pixels as lines, broken where a point is None (not finite, or outside the x range);
    a run of one point is drawn as a dot."""
    run = []
    for p in pixels + [None]:
        if p is not None:
            run.append(p)
            continue
        if len(run) == 1:
            d.ellipse([run[0][0] - 2, run[0][1] - 2, run[0][0] + 2, run[0][1] + 2], fill=colour)
        elif run:
            d.line(run, fill=colour, width=2)
        run = []


def _legend(d: ImageDraw.ImageDraw, labels: list[str], fnt, right: int, top: int) -> None:
    """The series' labels with their colours, boxed in the plot area's top right corner."""
    widths = [_text_size(label, fnt)[0] for label in labels]
    box_w, row_h = max(widths) + 34, _text_size("Ag", fnt)[1] + 6
    bx, by = right - box_w - 6, top + 6
    d.rectangle([bx, by, bx + box_w, by + row_h * len(labels) + 4], fill="white", outline=(160, 160, 160))
    for i, label in enumerate(labels):
        y = by + 4 + row_h * i + row_h // 2
        d.line([(bx + 6, y), (bx + 24, y)], fill=PALETTE[i % len(PALETTE)], width=3)
        d.text((bx + 30, y), label, fill=INK, font=fnt, anchor="lm")
