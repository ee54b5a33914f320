"""SD 1.5 end to end: load_sd15 on a diffusers pipeline folder, generation with each sampler equal to diffusers'
pipeline (224 px, from a diffusers folder and a single file), sample.py from the command line, and kohya-format
files (our export, one as kohya's scripts write it) read by diffusers' load_lora_weights and by kohya.load_kohya
alike."""
import json
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers.loaders.single_file_utils import convert_ldm_clip_checkpoint, convert_ldm_unet_checkpoint, \
    convert_ldm_vae_checkpoint
from PIL import Image
from safetensors.torch import load_file, save_file

from methods.kohya import export_kohya, load_kohya
from model import sampling, weights
from model.clip_tokenizer import load_tokenizer
from model.sd15 import SD15, generate, load_sd15
from training import sheets
from training.method_table import METHODS
from clip_text import CLIPTextConfig, load_text_encoder
import sample
from sd_pipeline import make_pipeline, sd15_scheduler
from sd_unet import UNetConfig, load_unet
from test_kohya import adapt
from vae import VAEConfig, load_vae


ROOT = Path(__file__).resolve().parent.parent
PROMPTS = ["small opacity in the right upper lobe", "no acute cardiopulmonary abnormality. XXXX"]


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny-sd15")
    return make_pipeline(root), root


def rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.fixture(scope="module")
def pipeline224(tmp_path_factory):
    """A tiny pipeline whose VAE downsamples 8 times, as SD's does, so that 224 px images have SD's 28 x 28 latents
    (the UNet's 28 -> 14 -> 7 -> 4 path), saved as a diffusers folder; our model loaded from that folder and from
    an original single-file checkpoint of the same weights."""
    root = tmp_path_factory.mktemp("tiny-sd15-224")
    pipe = make_pipeline(root / "diffusers", vae_channels=(16, 16, 32, 32))
    folder = load_sd15(root / "diffusers")
    file = write_single_file(folder, root / "sd15.safetensors", pipe)
    text_config = CLIPTextConfig.from_transformers(pipe.text_encoder.config.to_dict())
    single = SD15(unet=load_unet(file, UNetConfig.from_diffusers(dict(pipe.unet.config))),
                  text_encoder=load_text_encoder(file, text_config),
                  tokenizer=load_tokenizer(root / "diffusers" / "tokenizer"),
                  vae=load_vae(file, VAEConfig.from_diffusers(dict(pipe.vae.config))), name=str(file))
    return pipe, {"diffusers": folder, "single_file": single}


def write_single_file(sd, path, pipe):
    """`sd`'s weights as an original SD checkpoint holds them (LDM names under each part's prefix), checked
    against diffusers' own single-file conversion: it reads the file back into the pipeline's tensors."""
    state = {**{"model.diffusion_model." + k: v for k, v in sd.unet.state_dict().items()},
             **{"first_stage_model." + k: v for k, v in sd.vae.state_dict().items()},
             **{"cond_stage_model.transformer.text_model." + k: v for k, v in sd.text_encoder.state_dict().items()}}
    save_file({k: v.contiguous() for k, v in state.items()}, path)
    state = load_file(path)
    text = {k.removeprefix("text_model."): v for k, v in convert_ldm_clip_checkpoint(state).items()}  # transformers 5
    for converted, part in ((convert_ldm_unet_checkpoint(state, dict(pipe.unet.config)), pipe.unet),
                            (convert_ldm_vae_checkpoint(state, dict(pipe.vae.config)), pipe.vae),
                            (text, pipe.text_encoder)):
        expected = part.state_dict()
        assert set(converted) == set(expected)
        assert all(torch.equal(converted[k].view(expected[k].shape), expected[k]) for k in converted)
    return path


@contextmanager
def unet_timesteps(unet: torch.nn.Module):
    """The timestep of every call of `unet` inside the block, in order."""
    seen = []
    handle = unet.register_forward_pre_hook(lambda _, args: seen.append(int(args[1].flatten()[0])))
    try:
        yield seen
    finally:
        handle.remove()


@pytest.mark.parametrize("scheduler, steps", [("pndm", 50), ("ddim", 25), ("dpmpp2m", 20)])
def test_generation_equals_diffusers_pipeline(pipeline224, scheduler, steps):
    """sd15.generate against StableDiffusionPipeline with diffusers' scheduler as SD 1.5 configures it: 224 px,
    guidance 7.5, our initial noise given through `latents=`, from both layouts of the same weights."""
    pipe, models = pipeline224
    seed = 3
    # generate() draws image i's noise from its own generator seeded with seed * 1_000_003 + i (its docstring)
    noise = torch.randn(1, 4, 28, 28, generator=torch.Generator().manual_seed(seed * 1_000_003))
    pipe.scheduler = sd15_scheduler(scheduler)
    with unet_timesteps(pipe.unet) as calls:
        ref = pipe(PROMPTS[:1], height=224, width=224, num_inference_steps=steps, guidance_scale=7.5,
                   latents=noise.clone(), output_type="pt").images  # [0, 1]
    assert calls == sampling.timesteps(scheduler, steps)  # the pipeline ran the scheduler meant, at our timesteps
    for layout, sd in models.items():
        with unet_timesteps(sd.unet) as ours_calls:
            ours = generate(sd, PROMPTS[:1], steps=steps, guidance=7.5, seed=seed, size=224, progress=False,
                            scheduler=scheduler)
        assert ours_calls == calls and ours.shape == ref.shape == (1, 3, 224, 224)
        error = rel_err(ours * 0.5 + 0.5, ref)
        print(f"{scheduler} {steps} steps, {layout}: relative error {error:.2e}")
        assert error < 1e-4


def test_same_seed_same_images_whatever_the_batch(pipeline):
    _, root = pipeline
    sd = load_sd15(root)
    kwargs = dict(steps=10, guidance=7.5, size=32, progress=False)
    ours = generate(sd, PROMPTS, seed=3, batch=1, **kwargs)
    assert torch.allclose(generate(sd, PROMPTS, seed=3, batch=2, **kwargs), ours, atol=1e-5)
    assert (generate(sd, PROMPTS, seed=4, batch=2, **kwargs) - ours).abs().max() > 1e-2


def test_a_half_precision_model_generates_the_fp32_images_to_its_precision(pipeline):
    """A model loaded in bf16 samples in bf16 (as the pipeline does in half precision), from the same noise."""
    _, root = pipeline
    kwargs = dict(steps=5, guidance=7.5, seed=3, size=32, progress=False)
    full = generate(load_sd15(root), PROMPTS[:1], **kwargs)
    half = generate(load_sd15(root, dtype=torch.bfloat16), PROMPTS[:1], **kwargs)
    assert half.dtype == torch.float32 and half.shape == full.shape
    assert 0 < (half - full).abs().mean() < 0.05 * full.abs().mean()


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
           "--steps", "3", "--size", "32", "--seed", "5", "--scheduler", "dpmpp2m"]
    subprocess.run(cmd, check=True, capture_output=True, cwd=tmp_path)
    files = sorted(p.name for p in out.iterdir())
    assert files == ["00000.png", "00001.png", "grid.png", "sampling.json"]
    assert json.loads((out / "sampling.json").read_text()) == {"scheduler": "dpmpp2m", "steps": 3, "guidance": 7.5,
                                                               "eta": 0.0, "seed": 5, "size": 32}
    first = np.asarray(Image.open(out / "00000.png"))
    assert first.shape == (32, 32, 3) and first.dtype == np.uint8 and first.std() > 0
    assert Image.open(out / "grid.png").size == (2 * (128 + 2), 128 + 2)  # 32 px shown 4x
    # made by the sampler asked for (to 8-bit rounding), not the default one
    sd = load_sd15(root)
    for scheduler, differ in (("dpmpp2m", False), ("pndm", True)):
        image = sheets.to_pil(generate(sd, PROMPTS[:1], 3, seed=5, size=32, progress=False, scheduler=scheduler)[0])
        assert (np.abs(np.asarray(image, dtype=int) - first).max() > 1) == differ, scheduler
    again = tmp_path / "again"
    subprocess.run([str(again) if c == str(out) else c for c in cmd], check=True, capture_output=True, cwd=tmp_path)
    assert np.array_equal(np.asarray(Image.open(again / "00000.png")), first)  # same seed, same image


@pytest.mark.parametrize("options, message", [
    (["--steps", "0"], "argument --steps: must be between 1 and 999, got 0"),
    (["--steps", "1000"], "argument --steps: must be between 1 and 999, got 1000"),
    (["--steps", "ten"], "argument --steps: expected an integer, got 'ten'"),
    (["--scheduler", "euler"], "argument --scheduler: invalid choice: 'euler'"),
    (["--eta", "0.5"], "--eta 0.5: eta is DDIM's; give --scheduler ddim, or leave --eta out"),
])
def test_sample_command_refuses_bad_sampler_options(options, message, tmp_path, capsys):
    with pytest.raises(SystemExit) as stopped:
        sample.main(["--prompt", "x", "--out", str(tmp_path / "out"), *options])
    assert stopped.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_sampling_json_is_read_or_named(tmp_path):
    assert sampling.read_settings(tmp_path) is None  # images whose sampler nobody recorded
    for text in ("[]", '{"scheduler": "pndm"}', "{"):
        (tmp_path / "sampling.json").write_text(text)
        with pytest.raises(ValueError, match="sampling.json: (expected a JSON object with 'scheduler'|not valid JSON)"):
            sampling.read_settings(tmp_path)


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
