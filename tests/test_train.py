"""train.py end to end on the embedded tiny model and generated phantoms: every output file, exact resume,
the non-finite guard, and run-folder protection."""
import json

import pytest
import torch
from PIL import Image

import adapters
import diffusion
import methods
import train
import weights

FAST = ["--epochs", "2", "--batch", "8", "--t", "4", "--samples", "2", "--sample-steps", "3"]


def run(tmp_path, name, *extra):
    out = tmp_path / name
    code = train.main(["--out", str(out), *FAST, *extra])
    return out, code


def log_lines(run_dir):
    return [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]


def test_embedded_default_writes_the_whole_run_folder(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert train.main(FAST) == 0  # no --model, no --data: the embedded default, into runs/default
    out = tmp_path / "runs" / "default"
    printed = capsys.readouterr().out
    assert "shows the mechanics of the run, not image quality" in printed
    for name in ("config.json", "split.json", "log.jsonl", "summary.json", "best.safetensors", "last.safetensors",
                 "best.kohya.safetensors", "loss.png", "rank_growth.png", "memory.png", "rank_unet.png",
                 "rank_text_encoder.png", "checkpoint/adapters.safetensors", "checkpoint/state.safetensors",
                 "previews/grid.png", "previews/prompts.json", "previews/sampling.json"):
        assert (out / name).is_file(), name
    summary = json.loads((out / "summary.json").read_text())
    split = json.loads((out / "split.json").read_text())["splits"]
    steps_per_epoch = -(-len(split["train"]) // 8)
    assert summary["steps"] == 2 * steps_per_epoch
    assert 0 < summary["trainable_percent"]["unet"] < 100 and 0 < summary["trainable_percent"]["text_encoder"] < 100
    lines = log_lines(out)
    steps = [line for line in lines if "loss" in line]
    assert [s["step"] for s in steps] == list(range(1, summary["steps"] + 1))
    assert len([line for line in lines if "val_loss" in line]) == 2
    # SeLoRA: ranks start at 1 per layer and grow only on test steps (every t = 4 steps)
    assert steps[0]["total_rank"] == summary["adapted_layers"]
    grew = [s["step"] for prev, s in zip(steps, steps[1:]) if s["total_rank"] != prev["total_rank"]]
    assert grew and all(step % 4 == 0 for step in grew)
    assert summary["total_rank"] == sum(summary["final_ranks"].values()) == steps[-1]["total_rank"]
    # the saved adapters carry those ranks and the run's settings
    meta = weights.load_metadata(out / "last.safetensors")
    assert json.loads(meta["ranks"]) == summary["final_ranks"] and meta["lambda"] == "1.1" and meta["t"] == "4"
    # figures are real PNGs; the samples are real images (2) beside generated ones (2), 48 px each
    assert Image.open(out / "rank_unet.png").size[0] > 200
    assert Image.open(out / "previews" / "grid.png").size == (96, 96)
    assert json.loads((out / "previews" / "sampling.json").read_text()) == {
        "scheduler": "pndm", "steps": 3, "guidance": 7.5, "eta": 0.0, "seed": 0, "size": 48}


def test_resume_continues_exactly(tmp_path):
    whole, code = run(tmp_path, "whole", "--checkpoint-every", "4")
    assert code == 0
    part, code = run(tmp_path, "part", "--checkpoint-every", "4", "--stop-after", "7")
    assert code == 0 and not (part / "summary.json").exists()
    assert json.loads((part / "checkpoint" / "state.safetensors").exists() and
                      weights.load_metadata(part / "checkpoint" / "state.safetensors")["counters"])["step"] == 4
    assert train.main(["--resume", str(part)]) == 0  # redoes steps 5-7 from the step-4 checkpoint, then goes on
    a, b = log_lines(whole), log_lines(part)
    assert [line["step"] for line in a] == [line["step"] for line in b]
    for x, y in zip(a, b):
        for key in ("loss", "val_loss", "total_rank"):
            assert (key in x) == (key in y)
            if key in x:
                assert x[key] == pytest.approx(y[key], rel=1e-6, abs=1e-7), (x["step"], key)
    sa, sb = (json.loads((d / "summary.json").read_text()) for d in (whole, part))
    assert sa["final_ranks"] == sb["final_ranks"] and sa["trainable_percent"] == sb["trainable_percent"]
    ta, tb = (weights.load_file(d / "last.safetensors") for d in (whole, part))
    assert ta.keys() == tb.keys()
    for k in ta:
        torch.testing.assert_close(ta[k], tb[k], rtol=1e-5, atol=1e-7)


def test_non_finite_loss_stops_and_keeps_the_last_checkpoint(tmp_path, monkeypatch, capsys):
    calls = {"n": 0}
    real = diffusion.denoising_loss

    def poisoned(*args):
        calls["n"] += 1
        loss = real(*args)
        return loss * float("nan") if calls["n"] >= 6 else loss  # training steps 1-5 are fine

    monkeypatch.setattr(diffusion, "denoising_loss", poisoned)
    out, code = run(tmp_path, "nan", "--checkpoint-every", "3")
    assert code == 1
    err = capsys.readouterr().err
    assert "step 6: the loss is nan" in err and str(out / "checkpoint") in err
    counters = json.loads(weights.load_metadata(out / "checkpoint" / "state.safetensors")["counters"])
    assert counters["step"] == 3
    assert [line["step"] for line in log_lines(out)] == [1, 2, 3, 4, 5]


def test_existing_folder_is_not_overwritten(tmp_path, capsys):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "keep.txt").write_text("user data")
    assert train.main(["--out", str(out), *FAST]) == 2
    assert "the folder exists and is not a run folder" in capsys.readouterr().err
    assert (out / "keep.txt").read_text() == "user data"
    assert train.main(["--resume", str(out)]) == 2
    assert "no config.json there" in capsys.readouterr().err


def test_adapters_of_a_run_load_for_sampling(tmp_path):
    out, code = run(tmp_path, "s", "--samples", "0")
    assert code == 0 and not (out / "previews").exists()
    from sd15 import tiny_sd15
    sd = tiny_sd15(0)
    loaded = methods.load_adapter(sd, out / "best.safetensors")
    ranks = json.loads(weights.load_metadata(out / "best.safetensors")["ranks"])
    assert {n: a.rank for n, a in loaded.items()} == ranks
    assert all(isinstance(a, adapters.Adapter) for a in loaded.values())


@pytest.mark.parametrize("options, message", [
    (["--scheduler", "euler"], "argument --scheduler: invalid choice: 'euler'"),
    (["--sample-steps", "0"], "argument --sample-steps: must be between 1 and 999, got 0"),
])
def test_bad_sampler_options_are_refused(tmp_path, capsys, options, message):
    with pytest.raises(SystemExit) as stopped:
        train.main(["--out", str(tmp_path / "run"), *options])
    assert stopped.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_a_run_configured_before_scheduler_resumes_with_pndm(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"options": {"method": "selora", "seed": 0, "batch": 8,
                                                                  "epochs": 2}}))
    assert train.resolve(["--resume", str(tmp_path)]).scheduler == "pndm"
