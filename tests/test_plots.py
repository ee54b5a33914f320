"""training/plots.py: layouts of figures 3 and 4 from our module names, heatmap colours, line plots that follow the data."""
import math

import numpy as np
import pytest

from training import plots

SD15_TRANSFORMERS = ([f"input_blocks.{i}.1" for i in (1, 2, 4, 5, 7, 8)] + ["middle_block.1"]
                     + [f"output_blocks.{i}.1" for i in range(3, 12)])
UNET_PARTS = ["transformer_blocks.0.attn1.to_q", "transformer_blocks.0.attn1.to_k", "transformer_blocks.0.attn1.to_v",
              "transformer_blocks.0.attn1.to_out.0", "transformer_blocks.0.attn2.to_q",
              "transformer_blocks.0.attn2.to_k", "transformer_blocks.0.attn2.to_v",
              "transformer_blocks.0.attn2.to_out.0", "transformer_blocks.0.ff.net.0.proj",
              "transformer_blocks.0.ff.net.2", "proj_in", "proj_out"]
TEXT_PARTS = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj", "mlp.fc1", "mlp.fc2"]


def pixels_of(im, colour):
    a = np.asarray(im.convert("RGB"))
    return np.argwhere((a == np.array(colour, np.uint8)).all(axis=-1))  # (row, col) pairs


def luminance(c):
    return 0.299 * c[0] + 0.587 * c[1] + 0.114 * c[2]


# ---------------------------------------------------------------- layouts

def test_text_encoder_layout_is_figure_3():
    names = [f"text_model.encoder.layers.{i}.{p}" for i in range(12) for p in TEXT_PARTS]
    layout = plots.text_encoder_layout(names + ["text_model.embeddings.token_embedding", "final_layer_norm"])
    assert layout.rows == ["q", "k", "v", "out", "fc1", "fc2"]
    assert layout.cols == [str(i) for i in range(12)]
    assert len(layout.cells) == 72
    assert layout.cells["text_model.encoder.layers.3.mlp.fc2"] == (5, 3)
    assert layout.cells["text_model.encoder.layers.10.self_attn.k_proj"] == (1, 10)   # 10 sorts after 9


def test_unet_layout_is_figure_4_for_sd15_names():
    names = [f"{b}.{p}" for b in SD15_TRANSFORMERS for p in UNET_PARTS]
    layout = plots.unet_layout(names + ["time_embed.0", "input_blocks.1.0.emb_layers.1", "out.2"])
    assert layout.cols == ["d00", "d01", "d10", "d11", "d20", "d21", "mid",
                           "u10", "u11", "u12", "u20", "u21", "u22", "u30", "u31", "u32"]
    assert layout.rows == ["attn1_q", "attn1_k", "attn1_v", "attn1_out", "attn2_q", "attn2_k", "attn2_v",
                           "attn2_out", "ff_in", "ff_out", "proj_in", "proj_out"]
    assert len(layout.cells) == 16 * 12
    assert layout.cells["output_blocks.11.1.transformer_blocks.0.ff.net.2"] == (9, 15)
    assert layout.cells["middle_block.1.transformer_blocks.0.attn2.to_out.0"] == (7, 6)
    assert layout.cells["input_blocks.2.1.proj_in"] == (10, 1)
    prefixed = plots.unet_layout(["model.diffusion_model.input_blocks.4.1.transformer_blocks.0.attn1.to_q"])
    assert prefixed.rows == ["attn1_q"] and prefixed.cols == ["d10"]


def test_unet_layout_small_config():
    names = [f"{b}.transformer_blocks.0.attn2.to_v" for b in
             ("input_blocks.1.1", "input_blocks.3.1", "middle_block.1", "output_blocks.2.1", "output_blocks.3.1")]
    layout = plots.unet_layout(names, layers_per_block=1)
    assert layout.cols == ["d00", "d10", "mid", "u10", "u11"] and layout.rows == ["attn2_v"]


# ---------------------------------------------------------------- heatmaps

def two_cell_layout():
    return plots.Layout(rows=["q"], cols=["0", "1"], cells={"a": (0, 0), "b": (0, 1)})


def test_rank_table_is_the_heatmap_as_text():
    names = [f"text_model.encoder.layers.{i}.{p}" for i in range(2) for p in TEXT_PARTS]
    ranks = {n: i + 1 for i, n in enumerate(names) if not n.endswith("fc1")}  # fc1 has no rank given
    table = plots.rank_table(ranks, plots.text_encoder_layout(names)).splitlines()
    assert [line.split() for line in table] == [["0", "1"], ["q", "1", "7"], ["k", "2", "8"], ["v", "3", "9"],
                                                ["out", "4", "10"], ["fc1", ".", "."], ["fc2", "6", "12"]]
    assert len({len(line) for line in table}) == 1  # aligned columns
    with pytest.raises(ValueError, match="rank table: none of the"):
        plots.rank_table({"other": 1}, plots.text_encoder_layout(names))


def test_colormap_runs_light_to_dark():
    values = [luminance(plots.colormap(t)) for t in np.linspace(0, 1, 21)]
    assert all(x > y for x, y in zip(values, values[1:]))
    assert plots.colormap(-1) == plots.colormap(0) and plots.colormap(2) == plots.colormap(1)


def test_heatmap_higher_rank_is_darker_and_numbered():
    for low, high in (("a", "b"), ("b", "a")):
        im = plots.rank_heatmap({low: 1, high: 9}, two_cell_layout())
        light, dark = pixels_of(im, plots.colormap(0)), pixels_of(im, plots.colormap(1))
        cell_light = light[light[:, 1] < im.width * 0.8]            # leave out the colour bar
        cell_dark = dark[dark[:, 1] < im.width * 0.8]
        assert len(cell_light) > 200 and len(cell_dark) > 200
        # "a" is the left cell: its colour is the one of its rank
        left_is_light = cell_light[:, 1].mean() < cell_dark[:, 1].mean()
        assert left_is_light == (low == "a")
        # the dark cell carries its number in white
        r0, c0 = cell_dark.min(axis=0)
        r1, c1 = cell_dark.max(axis=0)
        crop = np.asarray(im.crop((c0, r0, c1, r1)), dtype=float)
        assert (crop.mean(axis=-1) > 200).sum() > 10


def test_heatmap_size_grows_with_the_grid_and_missing_cells_are_grey():
    small = plots.rank_heatmap({"a": 1, "b": 2}, two_cell_layout(), cell=(30, 20))
    wide = plots.Layout(rows=["q"], cols=["0", "1", "2", "3"], cells={"a": (0, 0), "b": (0, 1), "c": (0, 2), "d": (0, 3)})
    big = plots.rank_heatmap({"a": 1, "b": 2}, wide, cell=(30, 20))
    assert big.width - small.width == 2 * 30 and big.height == small.height
    assert len(pixels_of(big, plots.EMPTY_CELL)) > 2 * 20 * 20
    assert len(pixels_of(small, plots.EMPTY_CELL)) < 10            # a stray anti-aliased text pixel at most


def test_heatmap_panel_shares_one_scale():
    layout = two_cell_layout()
    im = plots.heatmap_panel({"SeLoRA": {"a": 8, "b": 8}, "LoRA": {"a": 2, "b": 2}}, layout)
    dark, light = pixels_of(im, plots.colormap(1)), pixels_of(im, plots.colormap(0))
    dark, light = dark[dark[:, 1] < im.width * 0.7], light[light[:, 1] < im.width * 0.7]
    assert len(dark) > 400 and len(light) > 400
    assert dark[:, 0].max() < light[:, 0].min()                     # first method above, in the dark colour


def test_heatmap_errors():
    with pytest.raises(ValueError, match="no ranks"):
        plots.rank_heatmap({}, two_cell_layout())
    with pytest.raises(ValueError, match="none of the 1 layer names is in the layout.*'zzz'"):
        plots.rank_heatmap({"zzz": 3}, two_cell_layout())
    with pytest.raises(ValueError, match="rank of 'b' is nan"):
        plots.rank_heatmap({"a": 1, "b": math.nan}, two_cell_layout())
    with pytest.raises(ValueError, match="no methods"):
        plots.heatmap_panel({}, two_cell_layout())


def test_save_png(tmp_path):
    plots.save_png(plots.rank_heatmap({"a": 1, "b": 4}, two_cell_layout()), tmp_path / "out" / "ranks.png")
    assert (tmp_path / "out" / "ranks.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ---------------------------------------------------------------- line plots

def frame(im):
    """The plot area's black frame: (left, top, right, bottom) from the rows and columns that are mostly black."""
    black = (np.asarray(im.convert("RGB")) == 0).all(axis=-1)
    rows = np.flatnonzero(black.sum(axis=1) > 0.5 * im.width)
    cols = np.flatnonzero(black.sum(axis=0) > 0.5 * im.height)
    return cols.min(), rows.min(), cols.max(), rows.max()


def test_line_plot_pixels_follow_the_data():
    xs = np.linspace(0, 10, 200)
    im = plots.line_plot({"y": (xs, xs ** 2)}, "quadratic", "x", "y", size=(500, 360), xlim=(0, 10), ylim=(0, 100))
    assert im.size == (500, 360)
    left, top, right, bottom = frame(im)
    assert right - left > 300 and bottom - top > 200
    colour = np.array(plots.PALETTE[0], np.uint8)
    a = np.asarray(im)
    for x in np.linspace(0.5, 9.5, 19):
        col = round(left + x / 10 * (right - left))
        hits = np.flatnonzero((a[:, col] == colour).all(axis=-1))
        assert len(hits), x
        expected = bottom - x ** 2 / 100 * (bottom - top)
        assert abs(hits.mean() - expected) < 2.5, (x, hits.mean(), expected)


def test_line_plot_breaks_at_nan_and_draws_every_series():
    xs = list(range(100))
    ys = [float(x) if not 40 <= x < 60 else math.nan for x in xs]
    im = plots.line_plot({"train": (xs, ys), "validation": ([10, 50, 90], [5, 50, 95])}, xlim=(0, 99), ylim=(0, 100))
    left, top, right, bottom = frame(im)
    a = np.asarray(im)
    first = np.array(plots.PALETTE[0], np.uint8)
    gap_col = round(left + 50 / 99 * (right - left))
    line_col = round(left + 20 / 99 * (right - left))
    assert not (a[top + 1:bottom, gap_col] == first).all(axis=-1).any()
    assert (a[top + 1:bottom, line_col] == first).all(axis=-1).any()
    assert len(pixels_of(im, plots.PALETTE[1])) > 100                # the second series and its legend entry


def test_line_plot_limits_and_ticks_follow_data_range():
    im = plots.line_plot({"mem": ([0, 40, 80], [5.0, 5.2, 5.1])}, ylim=(4.0, 80.0))
    left, top, right, bottom = frame(im)
    hits = pixels_of(im, plots.PALETTE[0])
    mean_row = hits[(hits[:, 1] > left) & (hits[:, 1] < right)][:, 0].mean()
    assert abs(mean_row - (bottom - (5.1 - 4) / 76 * (bottom - top))) < 3
    assert plots._ticks(0, 1) == [0, 0.2, 0.4, 0.6, 0.8, 1.0]
    assert plots._ticks(3, 1234) == [200, 400, 600, 800, 1000, 1200]


def test_line_plot_errors():
    with pytest.raises(ValueError, match="no series"):
        plots.line_plot({})
    with pytest.raises(ValueError, match="'loss' has 3 x values and 2 y values"):
        plots.line_plot({"loss": ([1, 2, 3], [1, 2])})
    with pytest.raises(ValueError, match="no finite data points"):
        plots.line_plot({"loss": ([1, 2], [math.nan, math.inf])})
    with pytest.raises(ValueError, match="too small"):
        plots.line_plot({"loss": ([1, 2], [1, 2])}, size=(60, 60))
