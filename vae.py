"""Stable Diffusion 1.5's VAE (the KL autoencoder of Rombach et al. 2022, "first stage model"), written out.

Images in [-1, 1] of shape (B, 3, H, W) map to a diagonal Gaussian over latents of shape
(B, 4, H/8, W/8); the decoder maps latents back. Module names follow the original LDM checkpoint
(`first_stage_model.` without the prefix), so that layout loads with no renaming and the diffusers
layout through one rename function, `diffusers_to_ldm`.

The diffusion model works on latents multiplied by LATENT_SCALE (so they have roughly unit variance);
`images_to_latents` and `latents_to_images` are the only places that apply it.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from model.weights import load_file, load_strict, part_config, resolve_component

LATENT_SCALE = 0.18215  # SD 1.5's `scale_factor`: 1 / std of the VAE's latents over its training images


@dataclass(frozen=True)
class VAEConfig:
    in_channels: int = 3
    out_channels: int = 3
    channels: tuple[int, ...] = (128, 256, 512, 512)  # per resolution level: 128 x mults (1, 2, 4, 4)
    layers_per_block: int = 2  # resnet blocks per level in the encoder; the decoder has one more
    latent_channels: int = 4
    norm_groups: int = 32
    norm_eps: float = 1e-6

    @classmethod
    def tiny(cls) -> VAEConfig:
        """Two levels (one downsampling), for fast tests."""
        return cls(channels=(32, 64), layers_per_block=1, norm_groups=8)

    def to_diffusers(self) -> dict:
        """This shape as a diffusers `vae/config.json` (AutoencoderKL; the inverse of `from_diffusers`)."""
        levels = len(self.channels)
        return {"_class_name": "AutoencoderKL", "in_channels": self.in_channels, "out_channels": self.out_channels,
                "block_out_channels": list(self.channels), "down_block_types": ["DownEncoderBlock2D"] * levels,
                "up_block_types": ["UpDecoderBlock2D"] * levels, "layers_per_block": self.layers_per_block,
                "latent_channels": self.latent_channels, "norm_num_groups": self.norm_groups, "act_fn": "silu",
                "scaling_factor": LATENT_SCALE}

    @classmethod
    def from_diffusers(cls, cfg: dict, source: str | os.PathLike = "VAE config") -> VAEConfig:
        """Read a diffusers `AutoencoderKL` config.json (as a dict), refusing variants this VAE does not build.

        A key the file leaves out takes diffusers' default for it, as diffusers itself would.
        """
        levels = len(cfg.get("block_out_channels", (64,)))
        expected = {
            "down_block_types": ["DownEncoderBlock2D"] * levels,
            "up_block_types": ["UpDecoderBlock2D"] * levels,
            "act_fn": "silu", "scaling_factor": LATENT_SCALE, "shift_factor": None,
            "latents_mean": None, "latents_std": None,
            "use_quant_conv": True, "use_post_quant_conv": True, "mid_block_add_attention": True,
        }
        for key, value in expected.items():
            got = list(cfg[key]) if isinstance(cfg.get(key), (list, tuple)) else cfg.get(key, value)
            if got != value:
                raise ValueError(f"{source}: {key} = {cfg[key]!r} is not supported (expected {value!r})")
        return cls(in_channels=cfg.get("in_channels", 3), out_channels=cfg.get("out_channels", 3),
                   channels=tuple(cfg.get("block_out_channels", (64,))),
                   layers_per_block=cfg.get("layers_per_block", 1),
                   latent_channels=cfg.get("latent_channels", 4), norm_groups=cfg.get("norm_num_groups", 32))


class ResnetBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, cfg: VAEConfig):
        super().__init__()
        self.norm1 = nn.GroupNorm(cfg.norm_groups, c_in, eps=cfg.norm_eps)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.norm2 = nn.GroupNorm(cfg.norm_groups, c_out, eps=cfg.norm_eps)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1)
        self.nin_shortcut = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return self.nin_shortcut(x) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all pixels, with 1x1 convolutions as the projections."""

    def __init__(self, c: int, cfg: VAEConfig):
        super().__init__()
        self.norm = nn.GroupNorm(cfg.norm_groups, c, eps=cfg.norm_eps)
        self.q, self.k, self.v, self.proj_out = (nn.Conv2d(c, c, 1) for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        n = self.norm(x)
        q, k, v = (proj(n).reshape(b, 1, c, h * w).transpose(2, 3) for proj in (self.q, self.k, self.v))
        out = F.scaled_dot_product_attention(q, k, v)  # softmax(q k^T / sqrt(c)) v
        return x + self.proj_out(out.transpose(2, 3).reshape(b, c, h, w))


class Downsample(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))  # asymmetric padding, as the original: right and bottom only


class Upsample(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


def mid_block(c: int, cfg: VAEConfig) -> nn.Module:
    mid = nn.Module()
    mid.block_1, mid.attn_1, mid.block_2 = ResnetBlock(c, c, cfg), AttnBlock(c, cfg), ResnetBlock(c, c, cfg)
    return mid


class Encoder(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        ch = cfg.channels
        self.conv_in = nn.Conv2d(cfg.in_channels, ch[0], 3, padding=1)
        self.down = nn.ModuleList()
        for i, c_out in enumerate(ch):
            level = nn.Module()
            c_in = ch[max(i - 1, 0)]
            level.block = nn.ModuleList(ResnetBlock(c_in if j == 0 else c_out, c_out, cfg)
                                        for j in range(cfg.layers_per_block))
            if i < len(ch) - 1:
                level.downsample = Downsample(c_out)
            self.down.append(level)
        self.mid = mid_block(ch[-1], cfg)
        self.norm_out = nn.GroupNorm(cfg.norm_groups, ch[-1], eps=cfg.norm_eps)
        self.conv_out = nn.Conv2d(ch[-1], 2 * cfg.latent_channels, 3, padding=1)  # mean and log-variance

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for level in self.down:
            for block in level.block:
                h = block(h)
            if hasattr(level, "downsample"):
                h = level.downsample(h)
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        ch = cfg.channels
        self.conv_in = nn.Conv2d(cfg.latent_channels, ch[-1], 3, padding=1)
        self.mid = mid_block(ch[-1], cfg)
        # up[i] works at the resolution of down[i]; it runs from the last level to the first.
        self.up = nn.ModuleList()
        for i, c_out in enumerate(ch):
            level = nn.Module()
            c_in = ch[min(i + 1, len(ch) - 1)]
            level.block = nn.ModuleList(ResnetBlock(c_in if j == 0 else c_out, c_out, cfg)
                                        for j in range(cfg.layers_per_block + 1))
            if i > 0:
                level.upsample = Upsample(c_out)
            self.up.append(level)
        self.norm_out = nn.GroupNorm(cfg.norm_groups, ch[0], eps=cfg.norm_eps)
        self.conv_out = nn.Conv2d(ch[0], cfg.out_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(z)
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        for level in reversed(self.up):
            for block in level.block:
                h = block(h)
            if hasattr(level, "upsample"):
                h = level.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class VAE(nn.Module):
    def __init__(self, config: VAEConfig | None = None):
        super().__init__()
        self.config = config = config or VAEConfig()
        z = config.latent_channels
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        self.quant_conv = nn.Conv2d(2 * z, 2 * z, 1)
        self.post_quant_conv = nn.Conv2d(z, z, 1)

    def encode(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Images in [-1, 1] -> (mean, log-variance) of the latent Gaussian, log-variance clamped to [-30, 20] as in LDM."""
        mean, logvar = self.quant_conv(self.encoder(images)).chunk(2, dim=1)
        return mean, logvar.clamp(-30.0, 20.0)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Unscaled latents -> images, nominally in [-1, 1] (not clamped)."""
        return self.decoder(self.post_quant_conv(latents))


def sample_latents(mean: torch.Tensor, logvar: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Draw mean + std * noise; the noise comes from `generator` on its own device, as diffusers draws it."""
    device = generator.device if generator is not None else mean.device
    noise = torch.randn(mean.shape, generator=generator, device=device, dtype=mean.dtype).to(mean.device)
    return mean + torch.exp(0.5 * logvar) * noise


def posterior_to_latents(mean: torch.Tensor, logvar: torch.Tensor, generator: torch.Generator | None = None,
                         sample: bool = True) -> torch.Tensor:
    """The encoder's posterior -> the scaled latents the UNet is trained on (a sample, as LDM trains, or the mean).

    Training from cached (mean, logvar) calls this directly, drawing a fresh sample each step."""
    return (sample_latents(mean, logvar, generator) if sample else mean) * LATENT_SCALE


def latents_to_images(vae: VAE, latents: torch.Tensor) -> torch.Tensor:
    """Scaled latents (what the sampler returns) -> images in [-1, 1], clamped."""
    return vae.decode(latents / LATENT_SCALE).clamp(-1.0, 1.0)


# diffusers name -> LDM name, applied in order to every key (the decoder's level index is flipped first).
DIFFUSERS_RENAMES = [
    ("mid_block.resnets.0.", "mid.block_1."), ("mid_block.resnets.1.", "mid.block_2."),
    ("mid_block.attentions.0.", "mid.attn_1."), ("down_blocks.", "down."), (".resnets.", ".block."),
    (".downsamplers.0.", ".downsample."), (".upsamplers.0.", ".upsample."),
    ("conv_shortcut", "nin_shortcut"), ("conv_norm_out", "norm_out"), (".group_norm.", ".norm."),
    (".to_q.", ".q."), (".to_k.", ".k."), (".to_v.", ".v."), (".to_out.0.", ".proj_out."),  # attention, new names
    (".query.", ".q."), (".key.", ".k."), (".value.", ".v."), (".proj_attn.", ".proj_out."),  # attention, old names
]


def diffusers_to_ldm(state: dict[str, torch.Tensor], levels: int) -> dict[str, torch.Tensor]:
    """Rename a diffusers `AutoencoderKL` state dict to LDM names.

    diffusers numbers the decoder's levels in the order they run (up_blocks.0 is the lowest resolution),
    LDM by resolution (up.0 is the highest); and diffusers stores the attention projections as linear
    weights (c, c), LDM as 1x1 convolutions (c, c, 1, 1).
    """
    out = {}
    for key, tensor in state.items():
        name = re.sub(r"^decoder\.up_blocks\.(\d+)\.", lambda m: f"decoder.up.{levels - 1 - int(m[1])}.", key)
        for old, new in DIFFUSERS_RENAMES:
            name = name.replace(old, new)
        if ".mid.attn_1." in name and tensor.ndim == 2:
            tensor = tensor[:, :, None, None]
        out[name] = tensor
    return out


def ldm_to_diffusers(state: dict[str, torch.Tensor], levels: int) -> dict[str, torch.Tensor]:
    """Rename an LDM-named VAE state dict to diffusers' names (the inverse of `diffusers_to_ldm`, with
    diffusers' current attention names)."""
    renames = [(new, old) for old, new in reversed(DIFFUSERS_RENAMES) if old not in (".query.", ".key.", ".value.", ".proj_attn.")]
    out = {}
    for key, tensor in state.items():
        name = re.sub(r"^decoder\.up\.(\d+)\.", lambda m: f"decoder.up_blocks.{levels - 1 - int(m[1])}.", key)
        for old, new in renames:
            name = name.replace(old, new)
        if ".mid.attn_1." in key and tensor.ndim == 4:
            tensor = tensor[:, :, 0, 0]
        out[name] = tensor
    return out


VAE_FILES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.fp16.safetensors")
LDM_PREFIX = "first_stage_model."


def load_vae(path: str | os.PathLike, config: VAEConfig | None = None, dtype: torch.dtype | None = None) -> VAE:
    """Load a VAE from a diffusers pipeline folder, its `vae/` folder or weights file, or an original SD checkpoint.

    The layout is read from the keys: `first_stage_model.*` (the original single file; other keys are
    ignored), bare LDM names (a standalone original VAE file), or diffusers names. The configuration follows
    weights.part_config: the config.json beside a diffusers weights file (`config`, if also given, must agree),
    else `config`, else SD 1.5's.
    """
    file = resolve_component(path, "vae", VAE_FILES)
    state = load_file(file)
    if any(k.startswith(LDM_PREFIX) for k in state):
        state = {k[len(LDM_PREFIX):]: v for k, v in state.items() if k.startswith(LDM_PREFIX)}
    diffusers_layout = any(k.startswith(("encoder.down_blocks.", "encoder.mid_block.")) for k in state)
    config, hint = part_config(config, file, VAEConfig.from_diffusers, "VAE", beside=diffusers_layout)
    config = config or VAEConfig()
    if diffusers_layout:
        state = diffusers_to_ldm(state, len(config.channels))
    return load_strict(VAE(config), state, file, dtype, hint).eval()
