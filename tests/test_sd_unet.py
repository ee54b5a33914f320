"""The hand-written UNet equals diffusers' UNet2DConditionModel, loading both checkpoint layouts.

Oracles: diffusers builds, runs and saves the reference model (the diffusers layout), and diffusers' own
single-file conversion code (`convert_ldm_unet_checkpoint`) reads the original LDM layout.
"""
import copy
import gc
import json

import pytest
import safetensors.torch
import torch
from diffusers import UNet2DConditionModel
from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

from sd_unet import LDM_PREFIX, SCHEDULE_BUFFERS, UNet, UNetConfig, load_unet, unet_diffusers_names
from unet_helpers import diffusers_config, randomize_, reference_unet, rel_err

TINY = UNetConfig.tiny()
SIZES = [(28, 28), (64, 64), (36, 20)]  # 28 -> 14 -> 7 -> 4 and back; a non-square odd path (20 -> 10 -> 5 -> 3)
TIMESTEPS = [0, 999, torch.tensor([1, 500]), torch.tensor([999.0, 37.0])]
TOL = 1e-5

# SD 1.5's unet/config.json as published (runwayml/stable-diffusion-v1-5, diffusers 0.6.0).
SD15_CONFIG_JSON = {
    "_class_name": "UNet2DConditionModel", "_diffusers_version": "0.6.0", "act_fn": "silu",
    "attention_head_dim": 8, "block_out_channels": [320, 640, 1280, 1280], "center_input_sample": False,
    "cross_attention_dim": 768,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "downsample_padding": 1, "flip_sin_to_cos": True, "freq_shift": 0, "in_channels": 4, "layers_per_block": 2,
    "mid_block_scale_factor": 1, "norm_eps": 1e-05, "norm_num_groups": 32, "out_channels": 4, "sample_size": 64,
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
}


def inputs(cfg, size, batch=2, tokens=7, seed=0):
    gen = torch.Generator().manual_seed(seed)
    latents = torch.randn(batch, cfg.in_channels, *size, generator=gen)
    return latents, torch.randn(batch, tokens, cfg.context_dim, generator=gen)


@torch.no_grad()
def assert_same_outputs(ours, reference, cfg, sizes=SIZES):
    """Every timestep form at the first size; one int and one tensor timestep at the others."""
    for size in sizes:
        latents, context = inputs(cfg, size)
        for t in TIMESTEPS if size == sizes[0] else TIMESTEPS[1:3]:
            expected = reference(latents, t, encoder_hidden_states=context).sample
            got = ours(latents, t, context)
            assert got.shape == latents.shape
            assert rel_err(got, expected) < TOL, (size, t, rel_err(got, expected))


def meta_diffusers(cfg):
    with torch.device("meta"):
        return UNet2DConditionModel(**diffusers_config(cfg))


def write_single_file(path, unet_state, dtype=torch.float32):
    """A single-file checkpoint as LDM training writes it: the UNet plus parts our loader must skip."""
    state = {LDM_PREFIX + k: v.to(dtype) for k, v in unet_state.items()}
    state.update({name: torch.rand(1000, dtype=torch.float64).to(dtype) for name in SCHEDULE_BUFFERS})
    state.update({"cond_stage_model.transformer.text_model.final_layer_norm.weight": torch.ones(768, dtype=dtype),
                  "first_stage_model.decoder.conv_out.weight": torch.ones(3, 128, 3, 3, dtype=dtype),
                  "model_ema.decay": torch.tensor(0.9999), "model_ema.num_updates": torch.tensor(1000)})
    safetensors.torch.save_file(state, path)
    return state


def convert_with_diffusers(path, cfg):
    """Oracle: diffusers' single-file conversion of the LDM checkpoint at `path`."""
    return convert_ldm_unet_checkpoint(safetensors.torch.load_file(path), diffusers_config(cfg))


# --- tiny configuration ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_saved(tmp_path_factory):
    """The tiny reference (weights rounded to fp16 so the fp16 file holds the same values), saved by diffusers
    both as an fp32 pipeline folder and as an fp16-variant one."""
    root = tmp_path_factory.mktemp("tiny")
    reference = reference_unet(TINY)
    with torch.no_grad():
        for p in reference.parameters():
            p.copy_(p.half().float())
    reference.save_pretrained(root / "fp32" / "unet")
    copy.deepcopy(reference).half().save_pretrained(root / "fp16" / "unet", variant="fp16")
    return reference, root


def test_diffusers_layout_equals_diffusers(tiny_saved):
    reference, root = tiny_saved
    ours = load_unet(root / "fp32")
    assert ours.config == TINY  # read from the config.json beside the weights
    assert_same_outputs(ours, reference, TINY)


@torch.no_grad()
def test_norm_eps_per_block_on_low_variance_features(tiny_saved):
    """GroupNorm eps (1e-5 in ResBlocks and the output, 1e-6 in transformers) only shows on features whose
    variance is near eps, which the whole-model comparison hardly produces: feed such features to each block."""
    reference, root = tiny_saved
    ours = load_unet(root / "fp32")
    x, context, emb = 1e-3 * torch.randn(2, 32, 12, 12), torch.randn(2, 7, 24), torch.randn(2, 128)
    pairs = [
        (ours.input_blocks[1][1](x, context), reference.down_blocks[0].attentions[0](x, context, return_dict=False)[0]),
        (ours.input_blocks[1][0](x, emb), reference.down_blocks[0].resnets[0](x, emb)),
        (ours.out(x), reference.conv_out(reference.conv_act(reference.conv_norm_out(x)))),
    ]
    for got, expected in pairs:
        assert rel_err(got, expected) < TOL


def test_unet_folder_and_weights_file_load_like_the_pipeline_folder(tiny_saved):
    _, root = tiny_saved
    expected = load_unet(root / "fp32").state_dict()
    for path in (root / "fp32" / "unet", root / "fp32" / "unet" / "diffusion_pytorch_model.safetensors"):
        got = load_unet(path)
        assert got.config == TINY
        assert all(torch.equal(t, expected[k]) for k, t in got.state_dict().items()), path


def test_fp16_variant_loads_as_fp32_unless_asked(tiny_saved):
    reference, root = tiny_saved
    assert not (root / "fp16" / "unet" / "diffusion_pytorch_model.safetensors").exists()
    ours = load_unet(root / "fp16")
    assert all(p.dtype == torch.float32 for p in ours.parameters())
    assert_same_outputs(ours, reference, TINY, sizes=SIZES[:1])
    half = load_unet(root / "fp16", dtype=torch.float16)
    assert all(p.dtype == torch.float16 for p in half.parameters())
    for name, p in half.state_dict().items():
        assert torch.equal(p, ours.state_dict()[name].half()), name


def test_single_file_layout_equals_diffusers_conversion(tmp_path):
    ours_random = randomize_(UNet(TINY), seed=2)
    write_single_file(tmp_path / "model.safetensors", ours_random.state_dict())
    reference = UNet2DConditionModel(**diffusers_config(TINY)).eval()
    reference.load_state_dict(convert_with_diffusers(tmp_path / "model.safetensors", TINY), strict=True)
    ours = load_unet(tmp_path / "model.safetensors", TINY)
    assert_same_outputs(ours, reference, TINY)


@pytest.mark.parametrize("cfg", [TINY, pytest.param(UNetConfig(), id="sd15")])
def test_diffusers_names_match_diffusers_conversion(cfg):
    names = unet_diffusers_names(cfg)
    markers = {name: torch.empty(0) for name in names}  # conversion moves tensors; identity tells where each went
    converted = convert_ldm_unet_checkpoint({LDM_PREFIX + k: v for k, v in markers.items()}, diffusers_config(cfg))
    assert converted.keys() == meta_diffusers(cfg).state_dict().keys()
    went = {id(t): theirs for theirs, t in converted.items()}
    assert names == {ours: went[id(t)] for ours, t in markers.items()}


def test_sd15_layout_is_the_real_one():
    """Counts published for SD 1.5: 859,520,964 UNet parameters in 686 tensors; a few LDM names by hand."""
    with torch.device("meta"):
        state = UNet().state_dict()
    assert sum(t.numel() for t in state.values()) == 859_520_964
    assert len(state) == 686
    for key in ["input_blocks.3.0.op.weight", "input_blocks.4.0.skip_connection.weight", "output_blocks.2.1.conv.bias",
                "output_blocks.5.2.conv.weight", "output_blocks.11.1.transformer_blocks.0.ff.net.2.weight",
                "middle_block.1.transformer_blocks.0.attn2.to_k.weight", "middle_block.1.proj_in.weight", "out.2.bias"]:
        assert key in state, key
    assert state["middle_block.1.proj_in.weight"].shape == (1280, 1280, 1, 1)
    assert state["input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"].shape == (320, 768)


def test_from_diffusers_reads_the_published_sd15_config():
    assert UNetConfig.from_diffusers(SD15_CONFIG_JSON) == UNetConfig()
    assert UNetConfig.from_diffusers(dict(meta_diffusers(UNetConfig()).config)) == UNetConfig()
    assert UNetConfig.from_diffusers(dict(meta_diffusers(TINY).config)) == TINY


@pytest.mark.parametrize("change, message", [
    ({"use_linear_projection": True}, "use_linear_projection"),
    ({"attention_head_dim": [5, 10, 20, 20]}, "attention_head_dim"),
    ({"transformer_layers_per_block": 2}, "transformer_layers_per_block"),
    ({"mid_block_type": None}, "mid_block_type"),
    ({"class_embed_type": "timestep"}, "class_embed_type"),
    ({"flip_sin_to_cos": False}, "flip_sin_to_cos"),
    ({"dropout": 0.1}, "dropout"),
    ({"block_out_channels": [320, 480, 1280, 1280]}, "multiples"),
    ({"up_block_types": ["UpBlock2D"] * 4}, "up"),
    ({"down_block_types": ["SimpleCrossAttnDownBlock2D"] * 4}, "block types"),
    ({"_class_name": "AutoencoderKL"}, "AutoencoderKL"),
])
def test_from_diffusers_refuses_what_it_does_not_implement(change, message):
    with pytest.raises(ValueError, match=message):
        UNetConfig.from_diffusers({**SD15_CONFIG_JSON, **change}, source="unet/config.json")


def test_from_diffusers_names_a_missing_key():
    cfg = dict(SD15_CONFIG_JSON)
    del cfg["cross_attention_dim"]
    with pytest.raises(ValueError, match="unet/config.json: UNet config lacks 'cross_attention_dim'"):
        UNetConfig.from_diffusers(cfg, source="unet/config.json")


def test_timesteps_int_equals_tensor_and_bad_shape_is_refused():
    model = UNet(TINY).eval()
    latents, context = inputs(TINY, (16, 16))
    with torch.no_grad():
        assert torch.equal(model(latents, 250, context), model(latents, torch.tensor([250, 250]), context))
    with pytest.raises(ValueError, match=r"shape \[2\], got shape \(3,\)"):
        model(latents, torch.tensor([1, 2, 3]), context)


# --- bad checkpoints ---------------------------------------------------------------------------------------

def rewrite(tiny_saved, tmp_path, edit):
    """Copy the tiny fp32 unet folder to tmp_path with its weights edited; return the new weights file."""
    _, root = tiny_saved
    (tmp_path / "unet").mkdir()
    (tmp_path / "unet" / "config.json").write_text((root / "fp32" / "unet" / "config.json").read_text())
    state = safetensors.torch.load_file(root / "fp32" / "unet" / "diffusion_pytorch_model.safetensors")
    edit(state)
    path = tmp_path / "unet" / "diffusion_pytorch_model.safetensors"
    safetensors.torch.save_file(state, path)
    return path


def test_missing_key_is_listed(tiny_saved, tmp_path):
    path = rewrite(tiny_saved, tmp_path, lambda s: s.pop("mid_block.attentions.0.proj_out.bias"))
    with pytest.raises(ValueError, match=r"(?s)diffusion_pytorch_model.safetensors.*missing keys \(1\):\s+"
                                         r"middle_block.1.proj_out.bias"):
        load_unet(tmp_path)


def test_unexpected_key_is_listed(tiny_saved, tmp_path):
    rewrite(tiny_saved, tmp_path, lambda s: s.update({"down_blocks.0.extra.weight": torch.zeros(3)}))
    with pytest.raises(ValueError, match=r"(?s)unexpected keys \(1\):\s+down_blocks.0.extra.weight"):
        load_unet(tmp_path)


def test_wrong_shape_is_listed(tiny_saved, tmp_path):
    rewrite(tiny_saved, tmp_path, lambda s: s.update({"conv_in.weight": torch.zeros(32, 4, 1, 1)}))
    with pytest.raises(ValueError, match=r"shape mismatches \(1\):\s+input_blocks.0.0.weight: file \(32, 4, 1, 1\), "
                                         r"model \(32, 4, 3, 3\)"):
        load_unet(tmp_path)


def test_corrupted_file_is_refused(tiny_saved, tmp_path):
    path = rewrite(tiny_saved, tmp_path, lambda s: None)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=f"{path}: key '.*': data_offsets .* out of range"):
        load_unet(tmp_path)


def test_config_disagreeing_with_config_json_is_refused(tiny_saved):
    _, root = tiny_saved
    with pytest.raises(ValueError, match="config.json: describes"):
        load_unet(root / "fp32", UNetConfig())


def test_single_file_with_unknown_keys_is_refused(tmp_path):
    state = UNet(TINY).state_dict()
    state["input_blocks.1.0.bogus.weight"] = torch.zeros(2)
    write_single_file(tmp_path / "model.safetensors", state)
    extra = safetensors.torch.load_file(tmp_path / "model.safetensors")
    extra["logvar"] = torch.zeros(1000)
    safetensors.torch.save_file(extra, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match=r"(?s)single-file LDM checkpoint.*unexpected keys \(2\):\s+"
                                         r"input_blocks.1.0.bogus.weight\s+logvar"):
        load_unet(tmp_path / "model.safetensors", TINY)


# --- full SD 1.5 configuration -----------------------------------------------------------------------------

@pytest.mark.full
def test_sd15_diffusers_layout_equals_diffusers_at_64x64(tmp_path):
    """One full-size forward: diffusers' output first, then its model is freed before ours is loaded."""
    cfg = UNetConfig()
    latents, context = inputs(cfg, (64, 64), batch=1, tokens=77)
    reference = reference_unet(cfg)
    with torch.no_grad():
        expected = reference(latents, torch.tensor([500]), encoder_hidden_states=context).sample
    reference.save_pretrained(tmp_path / "unet")
    del reference
    gc.collect()
    ours = load_unet(tmp_path)
    assert ours.config == cfg
    with torch.no_grad():
        got = ours(latents, 500, context)
    assert rel_err(got, expected) < TOL, rel_err(got, expected)


@pytest.mark.full
def test_sd15_single_file_and_fp16_variant_load_the_same_tensors(tmp_path):
    """Full size, no forward (the test above covers the arithmetic): a random fp16 single-file checkpoint is
    converted by diffusers' code, and the converted weights saved by diffusers as an fp16 variant; both load
    into ours with exactly the tensors the oracle put under each name."""
    cfg = UNetConfig()
    gen = torch.Generator().manual_seed(3)
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in UNet(cfg).state_dict().items()}
    write_single_file(tmp_path / "sd15.safetensors", {k: torch.randn(s, generator=gen, dtype=torch.float16)
                                                      for k, s in shapes.items()}, dtype=torch.float16)
    converted = convert_with_diffusers(tmp_path / "sd15.safetensors", cfg)
    reference = meta_diffusers(cfg)
    reference.load_state_dict(converted, strict=True, assign=True)
    reference.save_pretrained(tmp_path / "pipeline" / "unet", variant="fp16")
    del reference
    names = unet_diffusers_names(cfg)
    for path in (tmp_path / "sd15.safetensors", tmp_path / "pipeline"):
        ours = load_unet(path, cfg, dtype=torch.float16).state_dict()
        assert ours.keys() == names.keys()
        for name, tensor in ours.items():
            assert torch.equal(tensor, converted[names[name]]), (path, name)
        del ours
        gc.collect()
