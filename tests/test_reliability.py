"""What a careless user can type into train.py and sample.py: nothing destroys data, nothing trains the wrong thing
silently, and every input a user must fix gets one line and exit status 2 before any training starts."""
import json

import pytest
import torch

from data import phantoms
from model import weights
from model.sd15 import load_sd15
from training import method_table, run_folder
import sample
import train
from sd_pipeline import make_pipeline

TINY = ["--epochs", "1", "--batch", "8", "--t", "4", "--samples", "0", "--checkpoint-every", "100"]


def make_data(root, n=12):
    """A small phantom data set (the folder layout) outside any run folder."""
    return phantoms.make_phantom_folder(root, n=n, size=48, seed=1)


def exits_2(capsys, argv, command=train.main):
    """Run the command; it must refuse with status 2 and one line, no traceback."""
    try:
        code = command(argv)
    except SystemExit as stop:  # argparse refuses a value this way
        code = stop.code
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err
    return err


# ---------------------------------------------------------------- data loss

def test_overwrite_never_deletes_the_data_or_a_folder_train_py_did_not_make(tmp_path, capsys):
    data_dir = make_data(tmp_path / "data")
    before = sorted(p.name for p in data_dir.iterdir())
    err = exits_2(capsys, ["--out", str(data_dir), "--data", str(data_dir), "--overwrite", *TINY])
    assert "--out" in err and "is --data" in err
    assert sorted(p.name for p in data_dir.iterdir()) == before
    for inside in (tmp_path / "data" / "runs" / "x", tmp_path):  # lies inside --data, contains --data
        err = exits_2(capsys, ["--out", str(inside), "--data", str(data_dir), *TINY])
        assert "--data" in err
    cache = tmp_path / "cache"
    err = exits_2(capsys, ["--out", str(tmp_path / "r"), "--latent-cache", str(tmp_path / "r" / "c"), *TINY])
    assert "contains --latent-cache" in err
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("years of work")
    err = exits_2(capsys, ["--out", str(mine), "--data", str(data_dir), "--overwrite", "--latent-cache", str(cache),
                           *TINY])
    assert "not a run folder" in err and (mine / "thesis.tex").read_text() == "years of work"


def test_overwrite_replaces_a_run_folder_but_keeps_what_train_py_did_not_write(tmp_path):
    data_dir, out = make_data(tmp_path / "data"), tmp_path / "run"
    common = ["--out", str(out), "--data", str(data_dir), *TINY]
    assert train.main(common) == 0
    (out / "notes.txt").write_text("mine")
    (out / "summary.json").write_text("{}")
    assert train.main([*common, "--overwrite", "--lr", "2e-4"]) == 0
    assert (out / "notes.txt").read_text() == "mine"
    assert json.loads((out / "summary.json").read_text())["steps"] == 2
    assert run_folder.read_config(out)["options"]["lr"] == 2e-4


def test_a_run_whose_start_up_failed_is_not_started(tmp_path, capsys):
    out, data_dir = tmp_path / "run", make_data(tmp_path / "data")
    err = exits_2(capsys, ["--out", str(out), "--data", str(tmp_path / "typo"), *TINY])
    assert "data folder not found" in err
    assert run_folder.read_config(out)["started"] is False
    err = exits_2(capsys, ["--resume", str(out)])
    assert "start-up never finished" in err
    # the corrected command needs no --overwrite, and the run it makes is started
    assert train.main(["--out", str(out), "--data", str(data_dir), *TINY]) == 0
    assert run_folder.read_config(out)["started"] is True


# ---------------------------------------------------------------- silently wrong results

def test_a_changed_vae_in_the_same_model_folder_misses_the_latent_cache(tmp_path):
    model = tmp_path / "sd"
    make_pipeline(model)
    data_dir, cache = make_data(tmp_path / "data", n=6), tmp_path / "cache"
    common = ["--model", str(model), "--data", str(data_dir), "--latent-cache", str(cache), "--size", "16", *TINY]
    assert train.main(["--out", str(tmp_path / "a"), *common]) == 0
    cached = set(cache.iterdir())
    vae_file = model / "vae" / "diffusion_pytorch_model.safetensors"
    tensors = weights.load_file(vae_file)
    weights.save_file({k: v * 1.5 if v.is_floating_point() else v for k, v in tensors.items()}, vae_file)
    assert train.main(["--out", str(tmp_path / "b"), *common]) == 0
    assert len(set(cache.iterdir()) - cached) == len(cached) > 0  # every image encoded again by the new VAE
    first = [json.loads((tmp_path / d / "log.jsonl").read_text().splitlines()[0])["loss"] for d in "ab"]
    assert first[0] != first[1]


def test_resume_refuses_changed_options_and_takes_the_safe_ones(tmp_path, capsys):
    data_dir, out = make_data(tmp_path / "data"), tmp_path / "run"
    assert train.main(["--out", str(out), "--data", str(data_dir), *TINY, "--stop-after", "1"]) == 0
    err = exits_2(capsys, ["--resume", str(out), "--epochs", "3", "--lr", "0.5", "--method", "lora",
                           "--data", str(tmp_path / "elsewhere")])
    assert "--lr 0.5" in err and "--method 'lora'" in err and "--data" in err and "--epochs" not in err
    err = exits_2(capsys, ["--resume", str(out), "--epochs", "0"])
    assert "--epochs" in err
    # options equal to the run's, and those that may change, are accepted; --epochs extends the run
    assert train.main(["--resume", str(out), "--data", str(data_dir), "--lr", "1e-4", "--epochs", "2",
                       "--checkpoint-every", "1", "--device", "cpu"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["epochs"] == 2 and summary["steps"] == 4
    assert run_folder.read_config(out)["options"]["epochs"] == 2


def test_lora2_cannot_start_above_its_maximum_rank(tmp_path, capsys):
    out = tmp_path / "run"
    err = exits_2(capsys, ["--out", str(out), "--method", "lora2", "--rank", "4", "--max-rank", "2"])
    assert err.startswith("error: --rank 4 is above --max-rank 2") and not out.exists()


@pytest.mark.parametrize("method, options, message", [
    ("lora", ["--lam", "2", "--t", "3"], "--lam, --t: not an option of --method lora, which would ignore it (its own: "
                                         "--rank)"),
    ("adalora", ["--rank", "8"], "--rank: not an option of --method adalora, which would ignore it (its own: "
                                 "--init-r, --target-r)"),
    ("selora", ["--rate-lr", "0.1"], "--rate-lr: not an option of --method selora"),
    ("dylora", ["--max-rank", "8"], "--max-rank: not an option of --method dylora"),
])
def test_an_option_of_another_method_is_refused_not_ignored(tmp_path, capsys, method, options, message):
    out = tmp_path / "run"
    assert exits_2(capsys, ["--out", str(out), "--method", method, *options]).startswith(f"error: {message}")
    assert not out.exists()


def test_adalora_cannot_change_its_length_when_resumed(tmp_path, capsys):
    out = tmp_path / "run"
    tiny = [option for option in TINY if option not in ("--t", "4")]  # --t is SeLoRA's
    assert train.main(["--out", str(out), "--data", str(make_data(tmp_path / "data")), "--method", "adalora",
                       *tiny, "--stop-after", "1"]) == 0
    err = exits_2(capsys, ["--resume", str(out), "--epochs", "2"])
    assert "adalora's schedule is laid out over the run's total steps" in err


@pytest.mark.parametrize("option, value", [
    ("--batch", "0"), ("--batch", "-1"), ("--epochs", "0"), ("--epochs", "-1"), ("--size", "0"), ("--size", "60"),
    ("--checkpoint-every", "0"), ("--samples", "-1"), ("--sample-steps", "0"), ("--seed", "-1"),
    ("--data-seed", "-3"), ("--lam", "0.5"), ("--lr", "nan"), ("--t", "0"), ("--rank", "0"), ("--device", "cuda"),
])
def test_out_of_range_options_are_refused_when_parsed(capsys, monkeypatch, option, value):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    err = exits_2(capsys, [option, value])  # refused before any folder, model or data is touched
    assert f"argument {option}" in err
    assert "insist" not in err


def test_expected_errors_are_one_line_with_status_2(tmp_path, capsys):
    err = exits_2(capsys, ["--out", str(tmp_path / "r"), "--model", str(tmp_path / "nonexistent")])
    assert "nonexistent: no such file or folder" in err and "tokenizer" not in err
    model = tmp_path / "sd"
    make_pipeline(model)
    (model / "unet" / "config.json").unlink()
    with pytest.raises(ValueError, match=r"unet/config\.json is missing, so SD 1\.5's UNet configuration"):
        load_sd15(model)
    err = exits_2(capsys, ["--out", str(tmp_path / "r2"), "--model", str(model)])
    assert "config.json is missing" in err


def test_trainable_percent_is_the_one_at_the_start_after_a_resume(tmp_path):
    data_dir = make_data(tmp_path / "data", n=24)
    runs = {name: tmp_path / name for name in ("whole", "part")}
    options = ["--data", str(data_dir), "--epochs", "2", "--batch", "8", "--t", "2", "--samples", "0",
               "--checkpoint-every", "2"]
    assert train.main(["--out", str(runs["whole"]), *options]) == 0
    assert train.main(["--out", str(runs["part"]), *options, "--stop-after", "3"]) == 0
    assert train.main(["--resume", str(runs["part"])]) == 0  # from the step-3 checkpoint; ranks grew at step 2
    whole, part = (json.loads((d / "summary.json").read_text()) for d in runs.values())
    assert whole["final_ranks"] == part["final_ranks"] and whole["total_rank"] > whole["adapted_layers"]
    assert part["trainable_percent"] == whole["trainable_percent"]


# ---------------------------------------------------------------- resume is always possible

def test_resume_drops_a_partial_last_log_line(tmp_path):
    data_dir, out = make_data(tmp_path / "data"), tmp_path / "run"
    assert train.main(["--out", str(out), "--data", str(data_dir), *TINY, "--checkpoint-every", "1",
                       "--stop-after", "1"]) == 0
    with open(out / "log.jsonl", "a") as f:
        f.write('{"step": 2, "epoch": 0, "lo')  # killed mid-write
    assert train.main(["--resume", str(out)]) == 0
    steps = [json.loads(line)["step"] for line in (out / "log.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 2]  # two training steps and the epoch's validation line


def test_a_run_killed_before_its_first_checkpoint_resumes_from_step_0(tmp_path):
    data_dir = make_data(tmp_path / "data")
    whole, part = tmp_path / "whole", tmp_path / "part"
    assert train.main(["--out", str(whole), "--data", str(data_dir), *TINY]) == 0
    assert train.main(["--out", str(part), "--data", str(data_dir), *TINY, "--stop-after", "1"]) == 0
    assert run_folder.last_checkpoint(part) is None
    assert train.main(["--resume", str(part)]) == 0
    a, b = (weights.load_file(d / "last.safetensors") for d in (whole, part))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ---------------------------------------------------------------- adapters on the wrong model

def test_an_adapter_is_refused_on_another_base_model_unless_forced(tmp_path, capsys):
    out = tmp_path / "run"
    from model.sd15 import load_embedded, load_sd15, save_sd15
    other = tmp_path / "other-model"  # the embedded model's shape with other weights: not the one sample.py uses
    sd = load_embedded()
    with torch.no_grad():
        sd.unet.out[2].bias.add_(0.01)
    save_sd15(sd, other, merges=sorted(sd.tokenizer.ranks, key=sd.tokenizer.ranks.get), dtype=torch.float32)
    assert train.main(["--out", str(out), "--model", str(other), "--data", str(make_data(tmp_path / "data")), *TINY,
                       "--size", "16"]) == 0
    adapter = out / "best.safetensors"
    command = ["--prompt", "small opacity", "--out", str(tmp_path / "img"), "--steps", "2", "--size", "16",
               "--adapter", str(adapter)]
    err = exits_2(capsys, command, sample.main)
    assert "trained on another base model" in err and "--force" in err
    assert not (tmp_path / "img").exists()
    assert sample.main([*command, "--force"]) == 0 and (tmp_path / "img" / "grid.png").is_file()
    assert len(method_table.load_adapter(load_sd15(other), adapter)) > 0  # the model it was trained on takes it


def test_sample_py_never_writes_into_a_folder_it_did_not_make(tmp_path, capsys):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "00000.png").write_bytes(b"my own picture")
    command = ["--prompt", "small opacity", "--steps", "1", "--size", "16"]
    err = exits_2(capsys, [*command, "--out", str(mine)], sample.main)
    assert "sample.py did not make" in err and (mine / "00000.png").read_bytes() == b"my own picture"
    (tmp_path / "file").write_text("x")
    assert "is a file" in exits_2(capsys, [*command, "--out", str(tmp_path / "file")], sample.main)
    assert "--adapter nowhere.safetensors: no such file" in exits_2(
        capsys, [*command, "--out", str(tmp_path / "new"), "--adapter", "nowhere.safetensors"], sample.main)
    assert sample.main([*command, "--out", str(tmp_path / "new")]) == 0
    assert sample.main([*command, "--out", str(tmp_path / "new"), "--seed", "1"]) == 0  # its own folder: replaced


def test_reproduce_checks_its_inputs_before_training(tmp_path, capsys):
    import reproduce
    err = exits_2(capsys, ["--data", str(tmp_path / "nowhere"), "--out", str(tmp_path / "s")], reproduce.main)
    assert "--data" in err and "no such folder" in err and not (tmp_path / "s").exists()
