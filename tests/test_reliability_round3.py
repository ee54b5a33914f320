"""Reliability, round three (issue 35): what a run accepts at start-up it can finish, non-finite weights are refused
where they are loaded, and every command checks its inputs before the long work. The tests follow the issue's
twelve cases, numbered as there (cases 6 to 12: tests/test_reliability_round3b.py). Runs are the embedded tiny
model at 16 px on a few phantoms."""
import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from data import phantoms
from methods import adapters
from metrics import readback
from model import weights
from model.sd15 import EMBEDDED_MODEL
from training import method_table, run_folder
import eval_fid
import reproduce
import sample
import train
from test_reliability import exits_2
from test_reliability_round2 import error_line

ROOT = Path(__file__).resolve().parent.parent
RUN = ["--phantoms", "16", "--epochs", "1", "--batch", "8", "--samples", "0", "--size", "16"]
SAMPLE = ["--steps", "1", "--size", "16"]


def model_copy(tmp_path: Path, key: str, value: float, dtype=None) -> tuple[Path, Path]:
    """The embedded tiny model copied, with every entry of the UNet's tensor `key` (diffusers name) set to `value`
    (stored as `dtype`, default the file's); returns (model folder, the UNet's file)."""
    model = tmp_path / "sd"
    shutil.copytree(EMBEDDED_MODEL, model)
    file = model / "unet" / "diffusion_pytorch_model.safetensors"
    tensors = {k: v.clone() for k, v in weights.load_file(file).items()}
    tensors[key] = torch.full_like(tensors[key], value, dtype=dtype or tensors[key].dtype)
    weights.save_file(tensors, file, weights.load_metadata(file))
    return model, file


# ---------------------------------------------------------------- 1. a run that cannot be finished is accepted

def test_selora_stops_growing_at_a_layers_width_and_its_export_takes_its_own_file(tmp_path):
    """lambda 1 and t 1 grow a layer at every step: the 32-wide layer stops at rank 32 (step 31), logged as at
    --max-rank, and the run finishes: its export takes the best adapter it wrote (before, it grew to 33 and the
    export refused best.safetensors with a traceback)."""
    out = tmp_path / "run"
    argv = ["--out", str(out), *RUN, "--phantoms", "42", "--batch", "1", "--lam", "1", "--t", "1",
            "--targets", "unet.time_embed.0", "--checkpoint-every", "1000"]  # 32 in, 128 out; 33 steps
    assert train.main(argv) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] >= 33 and summary["final_ranks"] == {"unet.time_embed.0": 32}
    events = [e for line in run_folder.read_log(out, math.inf) for e in line.get("events", [])]
    assert [(e["step"], e["rank"]) for e in events if e.get("reached_max_rank")] == [(31, 32)]
    assert max(e["step"] for e in events) == 31  # no test after the layer reached its width
    method_table.check_adapter_file(out / "best.safetensors")
    assert (out / "best.kohya.safetensors").is_file()


@pytest.mark.parametrize("rule", ["paper", "script"])
@pytest.mark.parametrize("fast", [False, True])
def test_every_selora_rule_caps_each_layer_at_min_d_in_d_out(rule, fast, tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 4), nn.Tanh(), nn.Linear(4, 3)).double()
    method = method_table.build("selora", fast, lam=1.0, t=1, expansion_test=rule,
                                fisher="batch" if rule == "script" else "sample")
    named = adapters.inject(model, method.make_adapter)
    optimizer = torch.optim.Adam([p for a in named.values() for p in a.parameters()], lr=1e-2)
    control = method.controller(named, optimizer, 10)
    x, y = torch.randn(5, 6, dtype=torch.float64), torch.randn(5, 3, dtype=torch.float64)
    events = []
    for step in range(1, 9):
        with control.capture(step, 5):
            optimizer.zero_grad()
            (model(x) - y).square().mean().backward()
        control.after_backward()
        optimizer.step()
        if control.second_pass(step):
            with control.capture(step, 5):
                (model(x) - y).square().mean().backward()
            control.after_backward()
        events += control.step()
    assert control.ranks() == {"0": 4, "2": 3}
    assert sorted((e["layer"], e["rank"]) for e in events if e.get("reached_max_rank")) == [("0", 4), ("2", 3)]
    adapters.save_adapters(named, tmp_path / "a.safetensors", control.metadata())
    method_table.check_adapter_file(tmp_path / "a.safetensors")  # the export's check takes it


@pytest.mark.parametrize("method, options", [
    ("lora", ["--rank", "40"]), ("dylora", ["--rank", "33"]), ("adalora", ["--init-r", "40"]),
    ("lora2", ["--rank", "40", "--max-rank", "64"]),
])
def test_a_fixed_rank_above_a_layers_width_is_refused_at_the_start(tmp_path, capsys, method, options):
    out = tmp_path / "run"
    err = exits_2(capsys, ["--out", str(out), *RUN, "--method", method, *options])
    assert error_line(err) == (
        f"error: {options[0]} {options[1]}: above the width of the adapted layer 'unet.time_embed.0', min(d_in, d_out) "
        f"= 32, the most ranks its update can have; give {options[0]} 32 or less, or --targets without the narrower "
        "layers")
    assert not (out / run_folder.LOG).exists() and run_folder.read_config(out)["started"] is False


# ---------------------------------------------------------------- 2. a NaN in the base model

def test_a_base_model_with_a_nan_is_refused_where_it_is_loaded(tmp_path, capsys):
    model, file = model_copy(tmp_path, "conv_in.weight", math.nan)
    images = tmp_path / "img"
    err = exits_2(capsys, ["--model", str(model), "--prompt", "a red circle", "--out", str(images), *SAMPLE],
                  sample.main)
    assert error_line(err).startswith(f"error: {file} (diffusers layout") and \
        "key 'input_blocks.0.0.weight' holds NaN or infinite values (as torch.float32)" in err
    assert not images.exists()  # no black images
    out = tmp_path / "run"
    err = exits_2(capsys, ["--out", str(out), "--model", str(model), *RUN])
    assert f"error: {file}" in err and "key 'input_blocks.0.0.weight' holds NaN" in err and "--lr" not in err
    assert not (out / run_folder.LOG).exists()


def test_a_non_finite_loss_at_step_1_blames_the_model_not_the_learning_rate(tmp_path, capsys):
    model, _ = model_copy(tmp_path, "conv_in.weight", 3e38, torch.float32)  # finite; the convolution overflows
    out = tmp_path / "run"
    assert train.main(["--out", str(out), "--model", str(model), *RUN]) == 1
    err = error_line(capsys.readouterr().err)
    assert err.startswith("error: step 1: the loss is nan; stopping. No update was taken yet, so the learning rate "
                          "plays no part: the model gives it on its first batch")
    assert "--lr" not in err and "check the base model (--model)" in err
    assert not (out / "best.safetensors").exists()


# ---------------------------------------------------------------- 3. the phantom reader

def reader_file(kind: str, folder: Path) -> Path:
    """assets/readers/phantoms.safetensors as `kind` left it, in `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    path, real = folder / "phantoms.safetensors", readback.ASSETS / "phantoms.safetensors"
    if kind == "truncated":
        path.write_bytes(real.read_bytes()[:real.stat().st_size // 2])
    elif kind == "the shapes reader":
        shutil.copyfile(readback.ASSETS / "shapes.safetensors", path)
    elif kind == "a NaN":
        tensors = {k: v.clone() for k, v in weights.load_file(real).items()}
        tensors["heads.sex.bias"][0] = math.nan
        weights.save_file(tensors, path, weights.load_metadata(real))
    return path


@pytest.mark.parametrize("kind, message", [
    ("missing", "no such reader file"), ("truncated", "out of range (data part is "),
    ("the shapes reader", "not a reader file of phantoms (its metadata 'domain' is 'shapes')"),
    ("a NaN", "key 'heads.sex.bias' holds NaN or infinite values"),
])
def test_the_phantom_reader_is_checked_before_step_1(tmp_path, capsys, monkeypatch, kind, message):
    path = reader_file(kind, tmp_path / "assets")
    monkeypatch.setattr(readback, "ASSETS", tmp_path / "assets")
    out = tmp_path / "run"
    err = error_line(exits_2(capsys, ["--out", str(out), *RUN, "--samples", "1", "--sample-steps", "1"]))
    assert err.startswith(f"error: {path}") and message in err and "give --samples 0" in err
    assert not out.exists()  # refused before the run folder is made


def test_eval_fid_names_the_file_and_key_of_a_reader_with_a_nan(tmp_path, capsys):
    path = reader_file("a NaN", tmp_path / "reader")
    images = phantoms.make_phantom_folder(tmp_path / "images", n=4, size=32, seed=1)
    with pytest.raises(SystemExit) as stop:
        eval_fid.main(["--real", str(images), "--fake", str(images), "--reader", str(path)])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and error_line(err).startswith(f"error: {path}: key 'heads.sex.bias' holds NaN")


# ---------------------------------------------------------------- 4. guidance

@pytest.mark.parametrize("value", ["1e30", "inf", "nan", "-1", "100.5"])
def test_guidance_is_finite_and_at_most_100_in_every_command(tmp_path, capsys, value):
    for parse, argv in ((train.parser().parse_args, []), (reproduce.parse_args, ["--smoke", "--out", "s"])):
        with pytest.raises(SystemExit) as stop:
            parse([*argv, "--guidance", value])
        assert stop.value.code == 2
        assert f"argument --guidance: must be a finite number >= 0 and <= 100, got {value}" in capsys.readouterr().err
    err = exits_2(capsys, ["--prompt", "x", "--out", str(tmp_path / "i"), *SAMPLE, "--guidance", value], sample.main)
    assert "argument --guidance: must be a finite number >= 0 and <= 100" in err and not (tmp_path / "i").exists()
    assert train.parser().parse_args(["--guidance", "100"]).guidance == 100.0


def test_ddim_eta_is_at_most_1(tmp_path, capsys):
    err = exits_2(capsys, ["--prompt", "x", "--out", str(tmp_path / "i"), *SAMPLE, "--scheduler", "ddim",
                           "--eta", "2"], sample.main)
    assert "argument --eta: must be a finite number >= 0 and <= 1, got 2" in err


# ---------------------------------------------------------------- 5. prompts are text

def test_a_prompt_that_is_not_utf8_is_one_line_naming_the_option_and_the_offset(tmp_path):
    done = subprocess.run([sys.executable, str(ROOT / "sample.py"), "--prompt", b"caf\xe9 au lait", "--out",
                           str(tmp_path / "i"), *SAMPLE], cwd=ROOT, capture_output=True)
    err = done.stderr.decode("utf-8", "replace")
    assert done.returncode == 2 and "Traceback" not in err, err
    assert err.strip().endswith("argument --prompt: not UTF-8 text: byte 0xe9 at byte offset 3")


def test_a_prompts_file_that_is_not_utf8_is_named_with_the_offset(tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_bytes(b"a red circle\ncaf\xe9\n")
    err = exits_2(capsys, ["--prompts", str(prompts), "--out", str(tmp_path / "i"), *SAMPLE], sample.main)
    assert error_line(err) == f"error: --prompts {prompts}: not UTF-8 text: byte 0xe9 at byte offset 16"
    assert not (tmp_path / "i").exists()
