"""The tiny SD 1.5 pretrained here (assets/tiny-sd, tools/pretrain_tiny.py) and its domain metrics (metrics/readback.py):
the committed folder in its real diffusers layout, read by ours and by diffusers/transformers alike; the
pretraining script end to end at a few steps; the base model's adherence to held-out captions; the readers;
eval_fid.py --reader; and a missing or damaged asset folder."""
import itertools
import json
import shutil
import sys

import numpy as np
import pytest
import torch

from data import phantoms, shapes
from metrics import fid_kid, readback
from model import sd15
from model.sd15 import EMBEDDED_MODEL, generate, load_sd15
from evaluation import phantom_scores
import eval_fid
import train

ROOT = EMBEDDED_MODEL.parent.parent
READERS = readback.ASSETS


def test_committed_model_is_a_diffusers_folder_that_both_sides_read_alike():
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer
    sd = load_sd15(EMBEDDED_MODEL)
    for name in ("model_index.json", "scheduler/scheduler_config.json", "tokenizer/vocab.json", "tokenizer/merges.txt",
                 "unet/config.json", "unet/diffusion_pytorch_model.safetensors", "vae/config.json",
                 "vae/diffusion_pytorch_model.safetensors", "text_encoder/config.json", "text_encoder/model.safetensors"):
        assert (EMBEDDED_MODEL / name).is_file(), name
    size = sum(f.stat().st_size for f in EMBEDDED_MODEL.rglob("*") if f.is_file())
    assert size < 25 * 2**20
    captions = ["a large red circle in the upper left", "male chest, small opacity in the left upper lobe, with a pacemaker"]
    ids = sd.tokenizer(captions)
    theirs_tok = CLIPTokenizer.from_pretrained(EMBEDDED_MODEL, subfolder="tokenizer")
    assert ids.tolist() == theirs_tok(captions, padding="max_length", max_length=77).input_ids
    text = CLIPTextModel.from_pretrained(EMBEDDED_MODEL, subfolder="text_encoder", torch_dtype=torch.float32).eval()
    unet = UNet2DConditionModel.from_pretrained(EMBEDDED_MODEL, subfolder="unet", torch_dtype=torch.float32).eval()
    vae = AutoencoderKL.from_pretrained(EMBEDDED_MODEL, subfolder="vae", torch_dtype=torch.float32).eval()
    with torch.no_grad():
        context = sd.text_encoder(ids)
        torch.testing.assert_close(context, text(ids).last_hidden_state, rtol=1e-5, atol=1e-5)
        x, t = torch.randn(2, 4, 16, 16), torch.tensor([10, 700])
        torch.testing.assert_close(sd.unet(x, t, context), unet(x, t, context).sample, rtol=1e-4, atol=1e-5)
        images = torch.rand(2, 3, 32, 32) * 2 - 1
        torch.testing.assert_close(sd.vae.encode(images)[0], vae.encode(images).latent_dist.mean, rtol=1e-4, atol=1e-4)


def test_base_model_draws_held_out_captions_that_the_reader_reads_back():
    """The quality bar: at 32 px, images of the captions never drawn in pretraining (shapes.HELD_OUT) are read
    back whole (every attribute) in at least 80% of cases; chance is 1 in 64."""
    sd = sd15.load_embedded()
    reader = readback.load_reader(READERS / "shapes.safetensors")
    combos = [dict(zip(shapes.ATTRIBUTES, c)) for i, c in enumerate(itertools.product(*shapes.ATTRIBUTES.values()))
              if i in shapes.HELD_OUT]
    prompts = [shapes.caption(c) for c in combos for _ in range(4)]
    images = generate(sd, prompts, seed=3, size=32, batch=32, progress=False)  # PNDM, 50 steps, guidance 7.5
    assert readback.adherence(reader, images, prompts)["adherence"] >= 0.8
    shuffled = prompts[4:] + prompts[:4]  # each image against another combination's caption: not met by chance
    assert readback.adherence(reader, images, shuffled)["adherence"] < 0.5


@pytest.mark.embedded_default_as_is
def test_embedded_default_teaches_the_phantoms(tmp_path, monkeypatch, capsys):
    """`python train.py` as it is (no options): on the same prompts, seed and real phantoms, the fine-tuned model's
    phantom-FID is far lower, its adherence higher and its sex right far more often than the base model's.
    Thresholds are set for any machine and torch build: with torch 2.13 (this machine's .venv) the default reached
    adherence 0.31 [0.23, 0.39] and the lobe 0.31 [0.22, 0.41]; with the test environment's torch 2.14.1 it reached
    adherence 0.18, outside that interval (docs/tiny-sd.md). The lobe and the finding are not asserted."""
    monkeypatch.chdir(tmp_path)
    assert train.main([]) == 0
    scores = json.loads((tmp_path / "runs" / "default" / "summary.json").read_text())["phantom_scores"]
    before, after = scores["before"], scores["after"]
    assert after["FID-phantoms"] < 0.5 * before["FID-phantoms"]  # measured: 43.0 -> 3.95 [2.1, 6.3]
    assert after["adherence"] >= before["adherence"] + 8 / phantom_scores.SCORED["prompts"]  # 0.086 -> 0.31 and 0.18
    assert after["per_attribute"]["sex"] >= 0.8  # 0.50 -> 0.98
    printed = capsys.readouterr().out
    assert "real phantoms (a disjoint draw): phantom-FID" in printed and "lobe" in printed and "95% intervals" in printed


@pytest.mark.parametrize("domain", ["shapes", "phantoms"])
def test_reader_reads_drawn_images_and_their_captions_round_trip(domain):
    module = readback.DOMAINS[domain]
    rng = np.random.default_rng(123)
    attrs = [module.random_attributes(rng) for _ in range(200)]
    for a in attrs:
        assert module.parse(module.caption(a)) == a
    images = torch.stack([readback.to_tensor(module.draw(rng, 32, a)) for a in attrs])
    reader = readback.load_reader(READERS / f"{domain}.safetensors")
    # the reader's own accuracy, the ceiling of adherence (shapes: small squares and circles are its errors)
    assert readback.adherence(reader, images, [module.caption(a) for a in attrs])["adherence"] >= 0.9
    with pytest.raises(ValueError, match="not a"):
        module.parse("a chest with nothing in particular")


def test_load_reader_refuses_what_is_not_a_reader(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such reader file"):
        readback.load_reader(tmp_path / "missing.safetensors")
    with pytest.raises(ValueError, match="not a reader file"):
        readback.load_reader(EMBEDDED_MODEL / "vae" / "diffusion_pytorch_model.safetensors")


def test_phantom_scores_tell_phantoms_from_shapes():
    """phantom-FID is small between two drawn phantom sets and large against shapes; adherence is near 1 for
    drawn phantoms with their own captions."""
    reader = readback.load_reader(READERS / "phantoms.safetensors")
    a, captions = phantoms.drawn(200, 32, seed=1)
    b, _ = phantoms.drawn(200, 32, seed=2)
    rng = np.random.default_rng(0)
    c = [shapes.draw(rng, 32, shapes.random_attributes(rng)) for _ in range(200)]
    with torch.no_grad():
        feats = [{"phantoms": reader.features(torch.stack([readback.to_tensor(im) for im in s])).double().numpy()}
                 for s in (a, b, c)]
    near = fid_kid.fid_kid(feats[0], feats[1])["fid"]["phantoms"]
    far = fid_kid.fid_kid(feats[0], feats[2])["fid"]["phantoms"]
    assert far > 20 * near
    images = torch.stack([readback.to_tensor(im) for im in a])
    assert readback.adherence(reader, images, captions)["adherence"] >= 0.95


def test_adherence_is_valid_real_phantoms_read_back_and_shuffled_captions_at_chance():
    """The instrument checked before it is trusted: real phantoms with their own captions are read back whole in at
    least 95% of cases, and with each other's captions at chance (what the captions alone allow, inside the
    shuffled figure's 95% interval). Their features lie on one sphere, and two disjoint draws of real phantoms
    give the floor of phantom-FID, far below phantoms against shapes."""
    reader = readback.load_reader(READERS / "phantoms.safetensors")
    real = torch.stack([readback.to_tensor(im) for im in phantoms.drawn(256, 32, seed=1)[0]])
    drawn, prompts = phantoms.drawn(256, 32, seed=2)
    drawn = torch.stack([readback.to_tensor(im) for im in drawn])
    reference = phantom_scores.reference_scores(reader, real, drawn, prompts, seed=0)
    assert reference["adherence"] >= 0.95 and reference["intervals"]["adherence"][0] >= 0.9
    assert all(reference["per_attribute"][k] >= 0.95 for k in ("sex", "lobe", "size", "device"))
    shuffled = reference["shuffled"]
    assert shuffled["chance"] < 0.1 and shuffled["interval"][0] <= shuffled["chance"] <= shuffled["interval"][1]
    norms = torch.linalg.norm(reader.features(real), dim=1)
    torch.testing.assert_close(norms, torch.full_like(norms, 8.0))
    low, high = reference["intervals"]["FID-phantoms"]
    assert low <= reference["FID-phantoms"] <= high < 5  # measured 0.5 [0.0, 1.3] at 128 against 256


def test_eval_fid_reader_option_scores_folders_with_adherence(tmp_path, capsys):
    for name, seed in (("real", 1), ("fake", 2)):
        images, captions = phantoms.drawn(80, 32, seed)
        (tmp_path / name).mkdir()
        for i, im in enumerate(images):
            im.save(tmp_path / name / f"{i:04d}.png")
    (tmp_path / "prompts.txt").write_text("\n".join(captions) + "\n")
    report = eval_fid.main(["--real", str(tmp_path / "real"), "--fake", str(tmp_path / "fake"),
                            "--reader", str(READERS / "phantoms.safetensors"), "--prompts", str(tmp_path / "prompts.txt"),
                            "--kid-subset-size", "40", "--kid-subsets", "10"])
    assert report["features"] == "reader of phantoms" and set(report["fid"]) == {"phantoms"}
    assert report["adherence"]["adherence"] >= 0.95
    assert "adherence" in eval_fid.flat_metrics(report) and "FID-phantoms" in eval_fid.flat_metrics(report)
    assert set(eval_fid.intervals_of(report)) == {"FID-phantoms", "KID", "adherence", "sex", "finding", "lobe",
                                                  "size", "device"}
    printed = capsys.readouterr().out
    assert printed.count("95%") == 8 and "  lobe " in printed  # FID, KID, adherence and each attribute
    (tmp_path / "bad.txt").write_text("a large red circle in the upper left\n" * 80)
    with pytest.raises(SystemExit) as stop:
        eval_fid.main(["--real", str(tmp_path / "real"), "--fake", str(tmp_path / "fake"),
                       "--reader", str(READERS / "phantoms.safetensors"), "--prompts", str(tmp_path / "bad.txt")])
    assert stop.value.code == 2 and "not a phantom caption" in capsys.readouterr().err


def test_pretraining_script_runs_deterministically_and_writes_a_loadable_folder(tmp_path):
    sys.path.insert(0, str(ROOT / "tools"))
    import pretrain_tiny
    few = ["--images", "64", "--vae-steps", "3", "--unet-steps", "3", "--reader-steps", "3", "--check-images", "1",
           "--batch", "4"]
    for name in ("a", "b"):
        assert pretrain_tiny.main([*few, "--out", str(tmp_path / name / "sd"), "--readers", str(tmp_path / name / "r"),
                                   "--figure", str(tmp_path / name / "fig.png")]) == 0
    a, b = load_sd15(tmp_path / "a" / "sd"), load_sd15(tmp_path / "b" / "sd")
    assert a.fingerprints == b.fingerprints
    assert (tmp_path / "a" / "sd" / "unet" / "diffusion_pytorch_model.safetensors").read_bytes() == \
           (tmp_path / "b" / "sd" / "unet" / "diffusion_pytorch_model.safetensors").read_bytes()
    record = json.loads((tmp_path / "a" / "sd" / "pretrain.json").read_text())
    assert record["command"].startswith("python tools/pretrain_tiny.py") and len(record["loss_every_50_steps"]["vae"]) == 1
    for domain in readback.DOMAINS:
        assert readback.load_reader(tmp_path / "a" / "r" / f"{domain}.safetensors").domain == domain


def test_missing_or_damaged_embedded_model_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setattr(sd15, "EMBEDDED_MODEL", tmp_path / "gone")
    out = subprocess_free_main(["--out", str(tmp_path / "run"), "--epochs", "1", "--samples", "0"])
    assert out[0] == 2 and "the embedded tiny model is missing" in out[1] and str(tmp_path / "gone") in out[1]
    damaged = tmp_path / "damaged"
    shutil.copytree(EMBEDDED_MODEL, damaged)
    weights_file = damaged / "unet" / "diffusion_pytorch_model.safetensors"
    weights_file.write_bytes(weights_file.read_bytes()[:1000])
    monkeypatch.setattr(sd15, "EMBEDDED_MODEL", damaged)
    out = subprocess_free_main(["--out", str(tmp_path / "run2"), "--epochs", "1", "--samples", "0"])
    assert out[0] == 2 and str(weights_file) in out[1] and "Traceback" not in out[1]


def subprocess_free_main(argv):
    """train.main in this process, with its standard error captured: (exit status, what it printed)."""
    import contextlib
    import io
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = train.main(argv)
    return code, err.getvalue()
