"""SD 1.5 end to end: load_sd15 on a diffusers pipeline folder, generation equal to diffusers' pipeline,
sample.py from the command line, and kohya-format files (our export, one as kohya's scripts write it) read by
diffusers' load_lora_weights and by kohya.load_kohya alike."""
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import weights
from kohya import export_kohya, load_kohya
from methods import METHODS
from sd15 import generate, load_sd15
from sd_pipeline import make_pipeline
from test_kohya import adapt

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


@pytest.fixture
def lora_in(pipeline):
    """pipe.load_lora_weights(path) + fuse_lora(); undone afterwards, so the module's pipeline stays plain."""
    pipe, _ = pipeline

    def load(path):
        pipe.load_lora_weights(str(path))
        pipe.fuse_lora()
    yield load
    pipe.unfuse_lora()
    pipe.unload_lora_weights()


def diffusers_and_ours(pipe, sd, seed=1):
    """(diffusers' text context, ours, diffusers' noise prediction, ours) on the same random inputs."""
    g = torch.Generator().manual_seed(seed)
    ids = sd.tokenizer(PROMPTS)
    x = torch.randn(2, 4, 12, 12, generator=g)
    t = torch.tensor([10, 700])
    with torch.no_grad():
        ref_ctx, ctx = pipe.text_encoder(ids)[0], sd.text_encoder(ids)
        return ref_ctx, ctx, pipe.unet(x, t, ref_ctx).sample, sd.unet(x, t, ctx)


@pytest.mark.parametrize("method", METHODS)
def test_kohya_export_loads_in_diffusers(pipeline, lora_in, method, tmp_path):
    pipe, root = pipeline
    sd = load_sd15(root)
    named, _ = adapt(sd, method)  # ranks 1-3 in use (0: left out); AdaLoRA masked, DyLoRA at b, SeLoRA's zero row
    path = tmp_path / "lora.safetensors"
    export_kohya(named, sd.unet.config, path)
    lora_in(path)
    ref_ctx, ctx, ref_eps, eps = diffusers_and_ours(pipe, sd)
    assert rel_err(ctx, ref_ctx) < 1e-4
    assert rel_err(eps, ref_eps) < 1e-4
    # and the adapters did change the model: without them the outputs differ
    assert rel_err(diffusers_and_ours(pipe, load_sd15(root))[3], ref_eps) > 1e-2


def test_a_file_as_kohyas_scripts_write_it_loads_as_diffusers_loads_it(pipeline, lora_in, tmp_path):
    """kohya's SD 1 LoRA: diffusers module names, the transformers' 1x1-conv proj_in/proj_out with 4-D
    weights, fp16, per-module alphas in the UNet, and none (alpha = r) in the text encoder.
    (diffusers 0.42 ignores per-module alphas of the attention projections and gives a module without an
    alpha the most common one, so those get the most common alpha here and every UNet module has one.)"""
    pipe, root = pipeline
    g = torch.Generator().manual_seed(0)
    tensors = {}
    parts = [("lora_unet_", pipe.unet, lambda name: ".attentions." in name),
             ("lora_te_text_model_", pipe.text_encoder, lambda name: "_proj" in name or ".fc" in name)]
    for prefix, model, chosen in parts:
        for i, (name, m) in enumerate((n, m) for n, m in model.named_modules()
                                      if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)) and chosen(n)):
            key, r, kernel = prefix + name.replace(".", "_"), 1 + i % 3, (1, 1) if m.weight.dim() == 4 else ()
            tensors[f"{key}.lora_down.weight"] = (torch.randn(r, m.weight.shape[1], *kernel, generator=g) * 0.3).half()
            tensors[f"{key}.lora_up.weight"] = (torch.randn(m.weight.shape[0], r, *kernel, generator=g) * 0.3).half()
            if prefix == "lora_unet_":
                alpha = 2.0 if ".attn" in name else 0.5 * (1 + i % 3)
                tensors[f"{key}.alpha"] = torch.tensor(alpha, dtype=torch.float16)
    assert any(k.endswith("proj_in.lora_down.weight") for k in tensors)
    path = tmp_path / "kohya.safetensors"
    weights.save_file(tensors, path, {"ss_network_module": "networks.lora"})
    lora_in(path)
    sd = load_sd15(root)
    loaded, merged = load_kohya(sd.adaptable(), path)
    assert merged and len(loaded) + len(merged) == len({key.partition(".")[0] for key in tensors})
    ref_ctx, ctx, ref_eps, eps = diffusers_and_ours(pipe, sd)
    assert rel_err(ctx, ref_ctx) < 1e-4
    assert rel_err(eps, ref_eps) < 1e-4
    assert rel_err(diffusers_and_ours(pipe, load_sd15(root))[3], ref_eps) > 1e-2
