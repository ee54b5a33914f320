"""train.py end to end on the embedded tiny model and generated phantoms: every output file, exact resume,
the non-finite guard, and run-folder protection."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

from methods import adapters
from model import weights
from model.sampling import add_noise
from model.sd15 import tiny_sd15
from evaluation import phantom_scores
from training import diffusion, method_table
import train

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
    assert "a tiny SD 1.5 pretrained here on coloured shapes" in printed
    assert "before fine-tuning: phantom-FID" in printed and "after fine-tuning: phantom-FID" in printed
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
    # figures are real PNGs; the samples are rows of real images (2), the base model's and the fine-tuned one's, 32 px
    assert Image.open(out / "rank_unet.png").size[0] > 200
    # the sheet: each image 4x (nearest), rows labelled at the left, captions over the columns
    sheet, real = Image.open(out / "previews" / "grid.png").convert("RGB"), Image.open(out / "previews" / "00000.png")
    left, top = sheet.width - 2 * (128 + 2), sheet.height - 3 * (128 + 2)
    assert left > 30 and top > 20
    assert np.array_equal(np.asarray(sheet.crop((left, top, left + 128, top + 128))),
                          np.asarray(real.convert("RGB").resize((128, 128), Image.NEAREST)))
    assert json.loads((out / "previews" / "sampling.json").read_text()) == {
        "scheduler": "pndm", "steps": 3, "guidance": 3.0, "eta": 0.0, "seed": 0, "size": 32}  # the tiny model's
    config = json.loads((out / "config.json").read_text())["options"]
    assert (config["lr"], config["guidance"]) == (1e-3, 3.0)  # the embedded default's, recorded
    assert list(summary["phantom_scores"]) == ["real", "before", "after"]
    for when, scores in summary["phantom_scores"].items():
        for key in ("FID-phantoms", "KID", "adherence", *scores["per_attribute"]):
            low, high = scores["intervals"][key]
            assert low <= scores.get(key, scores["per_attribute"].get(key)) <= high, (when, key)
    assert set(summary["phantom_scores"]["after"]["per_attribute"]) == {"sex", "finding", "lobe", "size", "device"}
    assert summary["phantom_scores"]["before"]["images"] == phantom_scores.SCORED["prompts"]


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
    from model.sd15 import load_embedded
    loaded = method_table.load_adapter(load_embedded(), out / "best.safetensors")
    ranks = json.loads(weights.load_metadata(out / "best.safetensors")["ranks"])
    assert {n: a.rank for n, a in loaded.items()} == ranks
    assert all(isinstance(a, adapters.Adapter) for a in loaded.values())


@pytest.mark.parametrize("options, message", [
    (["--scheduler", "euler"], "argument --scheduler: invalid choice: 'euler'"),
    (["--sample-steps", "0"], "argument --sample-steps: must be between 1 and 999, got 0"),
    (["--guidance", "-1"], "argument --guidance: must be"),
    (["--phantoms", "0"], "argument --phantoms: must be"),
])
def test_bad_sampler_options_are_refused(tmp_path, capsys, options, message):
    with pytest.raises(SystemExit) as stopped:
        train.main(["--out", str(tmp_path / "run"), *options])
    assert stopped.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_a_run_configured_before_scheduler_resumes_with_pndm(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"options": {"method": "selora", "seed": 0, "batch": 8,
                                                                  "epochs": 2}}))
    resumed = train.resolve(["--resume", str(tmp_path)])
    assert (resumed.scheduler, resumed.guidance, resumed.phantoms) == ("pndm", 7.5, 400)  # the count then


def test_phantoms_go_without_data(tmp_path, capsys):
    assert train.main(["--out", str(tmp_path / "run"), "--data", str(tmp_path), "--phantoms", "50"]) == 2
    assert "--phantoms 50: the number of generated phantoms, which --data replaces" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def steps_of(method, checkpointing, steps=3):
    """Losses, gradients and controller events of `steps` training steps (diffusion.train_step) of `method` on the
    tiny model, one fixed batch of 2, SeLoRA testing at every step; and how often the UNet's second block and
    the text encoder's first layer started per step."""
    sd = tiny_sd15(0)
    sd.unet.gradient_checkpointing = sd.text_encoder.gradient_checkpointing = checkpointing
    method_ = method_table.build(method, **method_table.options(method, train.parser().parse_args(["--method", method, "--t", "1"])))
    torch.manual_seed(0)  # the adapters' initialisation
    named = adapters.inject(sd.adaptable(), method_.make_adapter)
    params = [p for p in sd.adaptable().parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=1e-2)
    controller = method_.controller(named, optimizer, steps)
    gen = torch.Generator().manual_seed(1)
    latents, noise = (torch.randn(2, sd.unet.config.in_channels, 8, 8, generator=gen) for _ in range(2))
    t = torch.tensor([10, 900])
    batch = (add_noise(latents, noise, t), t, noise, sd.tokenizer.encode(["a chest x-ray", "no acute finding"])[0])
    starts = []
    for module in (sd.unet.input_blocks[1], sd.text_encoder.encoder.layers[0]):
        module.register_forward_pre_hook(lambda *_: starts.append(1))
    losses, grads, events = [], [], []
    for step in range(1, steps + 1):
        fp32 = torch.autocast("cpu", enabled=False)
        losses.append(diffusion.train_step(sd, batch, step, controller, optimizer, params, fp32))
        grads.append([p.grad.clone() for p in params if p.grad is not None])
        optimizer.step()
        events.append(controller.step())
    return losses, grads, events, len(starts) / steps


@pytest.mark.parametrize("method", method_table.METHODS)
def test_gradient_checkpointing_gives_the_same_gradients_and_selora_tests(method):
    losses, grads, events, starts = steps_of(method, checkpointing=False)
    losses_c, grads_c, events_c, starts_c = steps_of(method, checkpointing=True)
    assert (starts, starts_c) == (2, 4)  # each checkpointed block runs again in backward
    assert losses_c == pytest.approx(losses, rel=1e-6)
    for step, (g, g_c) in enumerate(zip(grads, grads_c), 1):
        assert len(g) == len(g_c) > 0
        for a, b in zip(g, g_c):
            torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-12, msg=f"step {step}")
    tests, tests_c = ([e for step in run for e in step] for run in (events, events_c))
    assert len(tests) == len(tests_c)
    for e, e_c in zip(tests, tests_c):  # SeLoRA: each layer's score, ratio, rank and decision at every step
        assert e_c.keys() == e.keys()
        for key, value in e.items():
            assert e_c[key] == (pytest.approx(value, rel=1e-6) if isinstance(value, float) else value), (e, key)
    if method == "selora":
        assert len(tests) == 3 * len(events[0]) > 0
        assert any(e["expanded"] for e in tests) and not all(e["expanded"] for e in tests)


def test_gradient_checkpointing_end_to_end_and_on_resume(tmp_path):
    """The embedded default with --gradient-checkpointing from its start, and switched on when a run resumes
    (a RESUMABLE option), gives the plain run's losses and SeLoRA's growth."""
    plain, code = run(tmp_path, "plain", "--samples", "0", "--epochs", "1")
    assert code == 0
    checkpointed, code = run(tmp_path, "checkpointed", "--samples", "0", "--epochs", "1", "--gradient-checkpointing")
    assert code == 0
    part, code = run(tmp_path, "part", "--samples", "0", "--epochs", "1", "--stop-after", "3",
                     "--checkpoint-every", "2")
    assert code == 0 and train.main(["--resume", str(part), "--gradient-checkpointing"]) == 0
    assert json.loads((part / "config.json").read_text())["options"]["gradient_checkpointing"] is True
    a = log_lines(plain)
    assert any("events" in line for line in a)  # SeLoRA tested at t = 4
    for other in (checkpointed, part):
        b = log_lines(other)
        assert [line["step"] for line in a] == [line["step"] for line in b]
        for x, y in zip(a, b):
            for key in ("loss", "val_loss", "total_rank"):
                assert (key in x) == (key in y)
                if key in x:
                    assert y[key] == pytest.approx(x[key], rel=1e-6), (other.name, x["step"], key)


def test_caption_dropout_empties_that_share_of_captions_and_at_zero_draws_nothing_more():
    """--caption-dropout p: each training caption becomes the empty one with probability p, so the unconditional
    prediction that guidance pushes from learns the new domain; at 0 (the paper's) the batch is the one without
    the option, every random draw the same."""
    class Ex:  # what noisy_batch reads of diffusion.Examples
        mean, logvar = torch.randn(64, 4, 4, 4), torch.full((64, 4, 4, 4), -4.0)
        ids, empty = torch.arange(64)[:, None].repeat(1, 77) + 1000, torch.zeros(77, dtype=torch.long)
    index = torch.arange(64)
    plain = diffusion.noisy_batch(Ex, index, torch.Generator().manual_seed(3))
    zero = diffusion.noisy_batch(Ex, index, torch.Generator().manual_seed(3), 0.0)
    assert all(torch.equal(a, b) for a, b in zip(plain, zero))
    assert torch.equal(plain[3], Ex.ids)
    dropped = [(diffusion.noisy_batch(Ex, index, torch.Generator().manual_seed(s), 0.25)[3] == 0).all(1) for s in range(20)]
    share = torch.cat(dropped).float().mean().item()
    assert 0.2 < share < 0.3  # 1,280 draws of p = 0.25: std 0.012
    every = diffusion.noisy_batch(Ex, index, torch.Generator().manual_seed(0), 1.0)[3]
    assert torch.equal(every, Ex.empty.repeat(64, 1))
