"""The VAE against diffusers' AutoencoderKL, random weights, both checkpoint layouts, tiny and full size."""
import gc
import json
from dataclasses import asdict

import pytest
import torch
from diffusers import AutoencoderKL
from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

from vae import (LATENT_SCALE, VAE, VAEConfig, latents_to_images, load_vae, posterior_to_latents,
                 sample_latents)
from model.weights import load_file, save_file

TOL = 1e-5  # max |ours - diffusers| / max |diffusers|


def diffusers_config(cfg: VAEConfig) -> dict:
    levels = len(cfg.channels)
    return {"in_channels": cfg.in_channels, "out_channels": cfg.out_channels,
            "down_block_types": ["DownEncoderBlock2D"] * levels, "up_block_types": ["UpDecoderBlock2D"] * levels,
            "block_out_channels": list(cfg.channels), "layers_per_block": cfg.layers_per_block,
            "latent_channels": cfg.latent_channels, "norm_num_groups": cfg.norm_groups}


def randomise(module: torch.nn.Module) -> torch.nn.Module:
    """Every parameter random (norm scales around 1), so no default zero or one hides a wiring mistake."""
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.ndim > 1:
                p.copy_(torch.randn_like(p) * p[0].numel() ** -0.5)
            else:
                p.copy_(torch.randn_like(p) * 0.2 + (1.0 if name.endswith("weight") else 0.0))
    return module.eval()


def rel_err(ours: torch.Tensor, ref: torch.Tensor) -> float:
    assert ours.shape == ref.shape
    return ((ours - ref).abs().max() / ref.abs().max()).item()


def assert_same_vae(ours: VAE, ref: AutoencoderKL, size: int, batch: int = 2) -> None:
    images = torch.rand(batch, 3, size, size) * 2 - 1
    latents = torch.randn(batch, ours.config.latent_channels, size // 8, size // 8)
    with torch.no_grad():
        mean, logvar = ours.encode(images)
        dist = ref.encode(images).latent_dist
        decoded, ref_decoded = ours.decode(latents), ref.decode(latents).sample
    errors = rel_err(mean, dist.mean), rel_err(logvar, dist.logvar), rel_err(decoded, ref_decoded)
    print(f"relative errors mean/logvar/decode: {errors}")
    assert max(errors) < TOL, errors


def save_diffusers(ref: AutoencoderKL, folder, rename: dict[str, str] | None = None):
    ref.save_pretrained(folder, safe_serialization=True)
    if rename:  # rewrite the weights under other (older) attention names
        file = folder / "diffusion_pytorch_model.safetensors"
        save_file({_rename(k, rename): v.clone() for k, v in load_file(file).items()}, file)


def _rename(key: str, rename: dict[str, str]) -> str:
    for old, new in rename.items():
        key = key.replace(old, new)
    return key


OLD_ATTENTION_NAMES = {".to_q.": ".query.", ".to_k.": ".key.", ".to_v.": ".value.", ".to_out.0.": ".proj_attn."}


def check_diffusers_layout(cfg: VAEConfig, tmp_path, size: int, rename=None) -> None:
    ref = randomise(AutoencoderKL(**diffusers_config(cfg)))
    save_diffusers(ref, tmp_path / "pipe" / "vae", rename)
    ours = load_vae(tmp_path / "pipe")  # the config comes from config.json
    assert ours.config == cfg
    assert_same_vae(ours, ref, size)


def check_ldm_layout(cfg: VAEConfig, tmp_path, size: int) -> None:
    """Our tensors under `first_stage_model.*`; diffusers' own single-file converter is the oracle."""
    state = {"first_stage_model." + k: v for k, v in randomise(VAE(cfg)).state_dict().items()}
    state["model.diffusion_model.input_blocks.0.0.weight"] = torch.zeros(2)  # other parts are ignored
    state["cond_stage_model.transformer.x"] = torch.zeros(2)
    file = tmp_path / "sd15.safetensors"
    save_file(state, file)
    ours = load_vae(file, config=cfg)
    dcfg = diffusers_config(cfg)
    ref = AutoencoderKL(**dcfg)
    ref.load_state_dict(convert_ldm_vae_checkpoint(state, dcfg), strict=True)
    assert_same_vae(ours, ref.eval(), size)


def test_tiny_diffusers_layout(tmp_path):
    check_diffusers_layout(VAEConfig.tiny(), tmp_path, size=32)
    pipeline = load_vae(tmp_path / "pipe").state_dict()
    for path in (tmp_path / "pipe" / "vae", tmp_path / "pipe" / "vae" / "diffusion_pytorch_model.safetensors"):
        state = load_vae(path).state_dict()
        assert all(torch.equal(state[k], pipeline[k]) for k in pipeline)


def test_tiny_diffusers_layout_old_attention_names(tmp_path):
    check_diffusers_layout(VAEConfig.tiny(), tmp_path, size=32, rename=OLD_ATTENTION_NAMES)
    keys = load_file(tmp_path / "pipe" / "vae" / "diffusion_pytorch_model.safetensors").keys()
    assert "encoder.mid_block.attentions.0.query.weight" in keys  # the old names were really written


def test_tiny_ldm_layout(tmp_path):
    check_ldm_layout(VAEConfig.tiny(), tmp_path, size=32)


def test_standalone_original_vae_file(tmp_path):
    """An original-layout VAE on its own (LDM names, no `first_stage_model.` prefix), as Stability ships them."""
    cfg = VAEConfig.tiny()
    state = randomise(VAE(cfg)).state_dict()
    save_file(state, tmp_path / "vae-ft-mse.safetensors")
    loaded = load_vae(tmp_path / "vae-ft-mse.safetensors", config=cfg).state_dict()
    assert loaded.keys() == state.keys() and all(torch.equal(loaded[k], state[k]) for k in state)


def test_fp16_variant_and_dtype(tmp_path):
    cfg = VAEConfig.tiny()
    ref = randomise(AutoencoderKL(**diffusers_config(cfg))).half()
    ref.save_pretrained(tmp_path, safe_serialization=True, variant="fp16")
    assert not (tmp_path / "diffusion_pytorch_model.safetensors").exists()
    ours = load_vae(tmp_path)
    assert next(ours.parameters()).dtype == torch.float32  # fp16 file, fp32 model unless asked
    assert_same_vae(ours, ref.float(), size=32)
    assert next(load_vae(tmp_path, dtype=torch.float16).parameters()).dtype == torch.float16


@pytest.mark.full
def test_full_diffusers_layout(tmp_path):
    check_diffusers_layout(VAEConfig(), tmp_path, size=64)
    gc.collect()


@pytest.mark.full
def test_full_ldm_layout(tmp_path):
    check_ldm_layout(VAEConfig(), tmp_path, size=64)
    gc.collect()


def test_sd15_defaults_match_diffusers_sd15_config():
    sd15 = {"_class_name": "AutoencoderKL", "act_fn": "silu", "block_out_channels": [128, 256, 512, 512],
            "down_block_types": ["DownEncoderBlock2D"] * 4, "in_channels": 3, "latent_channels": 4,
            "layers_per_block": 2, "norm_num_groups": 32, "out_channels": 3, "sample_size": 512,
            "up_block_types": ["UpDecoderBlock2D"] * 4}  # runwayml/stable-diffusion-v1-5 vae/config.json
    assert VAEConfig.from_diffusers(sd15) == VAEConfig()


def test_sampling_matches_diffusers_and_scale_is_applied():
    cfg = VAEConfig.tiny()
    ours = randomise(VAE(cfg))
    ref = AutoencoderKL(**diffusers_config(cfg))
    images = torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        mean, logvar = ours.encode(images)
        ours_sample = sample_latents(mean, logvar, torch.Generator().manual_seed(3))
        ref_sample = DiagonalGaussianDistribution(torch.cat([mean, logvar], 1)).sample(torch.Generator().manual_seed(3))
        torch.testing.assert_close(ours_sample, ref_sample, rtol=0, atol=1e-6)
        scaled = posterior_to_latents(mean, logvar, torch.Generator().manual_seed(3))
        torch.testing.assert_close(scaled, ours_sample * 0.18215, rtol=0, atol=1e-6)
        torch.testing.assert_close(posterior_to_latents(mean, logvar, sample=False), mean * 0.18215)
        decoded = latents_to_images(ours, scaled)
        torch.testing.assert_close(decoded, ours.decode(ours_sample).clamp(-1, 1))
    assert LATENT_SCALE == 0.18215


def test_logvar_clamped():
    vae = VAE(VAEConfig.tiny()).eval()
    with torch.no_grad():
        vae.quant_conv.bias[4:] = 1000.0  # second half of the moments is the log-variance
        assert vae.encode(torch.zeros(1, 3, 16, 16))[1].max().item() == 20.0
        vae.quant_conv.bias[4:] = -1000.0
        assert vae.encode(torch.zeros(1, 3, 16, 16))[1].min().item() == -30.0


def test_bad_inputs_name_the_problem(tmp_path):
    cfg = VAEConfig.tiny()
    state = VAE(cfg).state_dict()
    del state["decoder.conv_out.bias"]
    save_file(state, tmp_path / "vae.safetensors")
    with pytest.raises(ValueError, match=r"(?s)vae\.safetensors.*missing keys.*decoder\.conv_out\.bias"):
        load_vae(tmp_path / "vae.safetensors", config=cfg)
    with pytest.raises(ValueError, match=r"shape mismatches"):  # tiny weights, SD 1.5 config
        save_file(VAE(cfg).state_dict(), tmp_path / "vae.safetensors")
        load_vae(tmp_path / "vae.safetensors")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="diffusion_pytorch_model"):
        load_vae(tmp_path / "empty")
    folder = tmp_path / "d"
    AutoencoderKL(**diffusers_config(cfg)).save_pretrained(folder, safe_serialization=True)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "mid_block_add_attention": False}))
    with pytest.raises(ValueError, match=r"(?s)config\.json.*mid_block_add_attention"):
        load_vae(folder)
    with pytest.raises(ValueError, match="scaling_factor"):
        VAEConfig.from_diffusers({**config, "scaling_factor": 0.13025})
    assert asdict(VAEConfig.from_diffusers(config)) == asdict(cfg)
