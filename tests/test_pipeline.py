"""SD 1.5 end to end: load_sd15 on a diffusers pipeline folder, generation equal to diffusers' pipeline,
sample.py from the command line, and the kohya export read back by diffusers' load_lora_weights."""
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import adapters
from kohya import export_kohya
from sd15 import generate, load_sd15
from sd_pipeline import make_pipeline
from selora import SeLoRALinear, expand

ROOT = Path(__file__).resolve().parent.parent
PROMPTS = ["small opacity in the right upper lobe", "no acute cardiopulmonary abnormality. XXXX"]


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny-sd15")
    return make_pipeline(root), root


def rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def test_generation_equals_diffusers_pipeline(pipeline):
    pipe, root = pipeline
    sd = load_sd15(root)
    size, steps, seed = 32, 10, 3
    # generate() draws image i's noise from its own generator seeded with seed * 1_000_003 + i (its docstring)
    noise = torch.stack([torch.randn(4, size // 2, size // 2, generator=torch.Generator().manual_seed(seed * 1_000_003 + i))
                         for i in range(len(PROMPTS))])
    ref = pipe(PROMPTS, height=size, width=size, num_inference_steps=steps, guidance_scale=7.5, latents=noise.clone(),
               output_type="pt").images  # [0, 1]
    ours = generate(sd, PROMPTS, steps=steps, guidance=7.5, seed=seed, size=size, batch=1, progress=False)
    assert ours.shape == ref.shape
    assert rel_err(ours * 0.5 + 0.5, ref) < 1e-4
    # same seed, same images, whatever the batch size
    again = generate(sd, PROMPTS, steps=steps, guidance=7.5, seed=seed, size=size, batch=2, progress=False)
    assert torch.allclose(again, ours, atol=1e-5)
    other = generate(sd, PROMPTS, steps=steps, guidance=7.5, seed=seed + 1, size=size, batch=2, progress=False)
    assert (other - ours).abs().max() > 1e-2


def test_single_file_needs_a_tokenizer(pipeline, tmp_path):
    _, root = pipeline
    ckpt = tmp_path / "model.safetensors"
    ckpt.write_bytes(b"")
    with pytest.raises(ValueError, match="carries no tokenizer: give --tokenizer"):
        load_sd15(ckpt)


def test_sample_command_writes_pngs(pipeline, tmp_path):
    _, root = pipeline
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n\n")
    out = tmp_path / "out"
    cmd = [sys.executable, str(ROOT / "sample.py"), "--model", str(root), "--prompts", str(prompts), "--out", str(out),
           "--steps", "3", "--size", "32", "--seed", "5"]
    subprocess.run(cmd, check=True, capture_output=True, cwd=tmp_path)
    files = sorted(p.name for p in out.iterdir())
    assert files == ["00000.png", "00001.png", "grid.png"]
    first = np.asarray(Image.open(out / "00000.png"))
    assert first.shape == (32, 32, 3) and first.dtype == np.uint8 and first.std() > 0
    assert Image.open(out / "grid.png").size == (64, 32)
    again = tmp_path / "again"
    subprocess.run([str(again) if c == str(out) else c for c in cmd], check=True, capture_output=True, cwd=tmp_path)
    assert np.array_equal(np.asarray(Image.open(again / "00000.png")), first)  # same seed, same image


def test_kohya_export_loads_in_diffusers(pipeline, tmp_path):
    pipe, root = pipeline
    sd = load_sd15(root)
    named = adapters.inject(sd.adaptable(), SeLoRALinear)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for i, (name, a) in enumerate(named.items()):
            for _ in range(i % 3):  # ranks 1, 2, 3
                expand(a, torch.randn(a.base.in_features, 1, generator=g))
            a.A.copy_(torch.randn(a.A.shape, generator=g) * 0.05)
            a.B.copy_(torch.randn(a.B.shape, generator=g) * 0.05)
    path = tmp_path / "lora.safetensors"
    export_kohya(named, sd.unet.config, path)
    pipe.load_lora_weights(str(path))
    pipe.fuse_lora()
    ids = sd.tokenizer(PROMPTS)
    x = torch.randn(2, 4, 12, 12, generator=g)
    t = torch.tensor([10, 700])
    with torch.no_grad():
        ref_ctx = pipe.text_encoder(ids)[0]
        ctx = sd.text_encoder(ids)
        ref_eps = pipe.unet(x, t, ref_ctx).sample
        eps = sd.unet(x, t, ctx)
    assert rel_err(ctx, ref_ctx) < 1e-4
    assert rel_err(eps, ref_eps) < 1e-4
    # and the adapters did change the model: without them the outputs differ
    base = load_sd15(root)
    with torch.no_grad():
        assert rel_err(base.unet(x, t, base.text_encoder(ids)), ref_eps) > 1e-2
