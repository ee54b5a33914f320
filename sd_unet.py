"""The Stable Diffusion 1.5 UNet, written out in plain torch modules, and its weight loader.

Module names follow the original CompVis LDM checkpoint (`model.diffusion_model.*` keys), so the single-file
checkpoint loads with no renaming and the diffusers layout through one rename function (`diffusers_name`).

Numerical details, all in one place (each is what SD 1.5 was trained with, and what diffusers computes):
- Timestep embedding: sinusoidal, max period 10000, cos half first then sin (diffusers: flip_sin_to_cos=True,
  freq_shift=0), computed in fp32, then Linear -> SiLU -> Linear to 4 * model_channels.
- GroupNorm with `norm_groups` groups: eps 1e-5 in the ResBlocks and before the output conv, eps 1e-6 in the
  spatial transformer's input norm. The transformer's LayerNorms use torch's default eps 1e-5.
- ResBlock: GN -> SiLU -> conv3x3, plus Linear(SiLU(time embedding)) broadcast over the pixels,
  GN -> SiLU -> conv3x3, plus the skip (1x1 conv when the channel count changes). No scaling of the sum.
- Spatial transformer: proj_in and proj_out are 1x1 convs (as in the SD 1.5 checkpoint), one transformer block
  per attention layer: x + self-attention, x + cross-attention to the text context, x + feed-forward, each
  after its own LayerNorm. to_q/to_k/to_v have no bias; to_out does. Attention is
  `F.scaled_dot_product_attention` with its default 1/sqrt(head_dim) scale; every level has `num_heads` heads,
  so the head size grows with the channels (40, 80, 160 in SD 1.5).
- Feed-forward: GEGLU (Linear to 2 * 4 * dim, split in value and gate halves, value * gelu(gate) with the exact
  erf gelu), then Linear back to dim.
- Down-sampling: conv3x3 with stride 2 and padding 1, so odd sizes round up (7 -> 4). Up-sampling: nearest
  interpolation to the size of the skip connection it is concatenated with (4 -> 7), then conv3x3; this is
  what lets 224x224 images (28x28 latents) through, and equals plain 2x up-sampling for even sizes.
- Dropout (p=0 in SD 1.5) is left out; `nn.Identity` holds its place where the checkpoint numbers layers
  after it (out_layers.3, ff.net.2).

Every attention and feed-forward projection is an `nn.Linear` called as a module, so adapters (LoRA, SeLoRA)
can wrap them by replacing the attribute.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from model.weights import load_file, load_strict, part_config, resolve_component


@dataclass(frozen=True)
class UNetConfig:
    """Shape of the UNet; the defaults are Stable Diffusion 1.5 (LDM's v1-inference.yaml)."""
    in_channels: int = 4
    out_channels: int = 4
    model_channels: int = 320
    channel_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    attention_levels: tuple[bool, ...] = (True, True, True, False)  # LDM: attention_resolutions 4, 2, 1
    num_heads: int = 8
    context_dim: int = 768
    norm_groups: int = 32

    def __post_init__(self):
        if len(self.attention_levels) != len(self.channel_mult):
            raise ValueError(f"attention_levels {self.attention_levels} needs one entry per level of "
                             f"channel_mult {self.channel_mult}")
        for level, mult in enumerate(self.channel_mult):
            ch = self.model_channels * mult
            if ch % self.norm_groups or (self.attention_levels[level] and ch % self.num_heads):
                raise ValueError(f"level {level}: {ch} channels must divide into {self.norm_groups} norm groups "
                                 f"and {self.num_heads} attention heads")

    @classmethod
    def tiny(cls) -> UNetConfig:
        """A 2M-parameter UNet with SD 1.5's structure (4 levels, attention at the first three), for fast tests."""
        return cls(model_channels=32, channel_mult=(1, 2, 2, 2), num_res_blocks=1, num_heads=2,
                   context_dim=24, norm_groups=8)

    @classmethod
    def from_diffusers(cls, cfg: dict, source: str | os.PathLike = "config") -> UNetConfig:
        """Read a diffusers `unet/config.json` dict, refusing any option this UNet does not implement."""
        def need(key):
            if key not in cfg:
                raise ValueError(f"{source}: UNet config lacks '{key}'")
            return cfg[key]

        def one(key):  # diffusers allows per-level lists; we support one value for all levels
            value = need(key)
            if isinstance(value, list):
                if len(set(map(str, value))) != 1:
                    raise ValueError(f"{source}: '{key}' = {value}: only one value for all levels is supported")
                value = value[0]
            return value

        if cfg.get("_class_name", "UNet2DConditionModel") != "UNet2DConditionModel":
            raise ValueError(f"{source}: a {cfg['_class_name']} config, expected UNet2DConditionModel")
        for key, supported in DIFFUSERS_FIXED.items():
            if key in cfg and one(key) != supported:
                raise ValueError(f"{source}: unsupported UNet option {key} = {cfg[key]!r} (supported: {supported!r})")
        blocks, down, up = (list(need(k)) for k in ("block_out_channels", "down_block_types", "up_block_types"))
        if any(b % blocks[0] for b in blocks):
            raise ValueError(f"{source}: block_out_channels {blocks} must be multiples of the first")
        attention = tuple(t == "CrossAttnDownBlock2D" for t in down)
        expected_up = ["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attention)]
        if not set(down) <= {"CrossAttnDownBlock2D", "DownBlock2D"} or up != expected_up or len(down) != len(blocks):
            raise ValueError(f"{source}: block types down {down}, up {up}: expected CrossAttnDownBlock2D or "
                             f"DownBlock2D for each of block_out_channels {blocks}, and up = {expected_up}")
        return cls(in_channels=one("in_channels"), out_channels=one("out_channels"), model_channels=blocks[0],
                   channel_mult=tuple(b // blocks[0] for b in blocks), num_res_blocks=one("layers_per_block"),
                   attention_levels=attention, num_heads=one("attention_head_dim"),  # diffusers' misnomer: heads
                   context_dim=one("cross_attention_dim"), norm_groups=one("norm_num_groups"))


    def to_diffusers(self) -> dict:
        """This shape as a diffusers `unet/config.json` (the inverse of `from_diffusers`)."""
        down = ["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in self.attention_levels]
        up = ["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(self.attention_levels)]
        return {"_class_name": "UNet2DConditionModel", "in_channels": self.in_channels,
                "out_channels": self.out_channels, "block_out_channels": [self.model_channels * m for m in self.channel_mult],
                "down_block_types": down, "up_block_types": up, "layers_per_block": self.num_res_blocks,
                "attention_head_dim": self.num_heads, "cross_attention_dim": self.context_dim,
                "norm_num_groups": self.norm_groups, **{k: v for k, v in DIFFUSERS_FIXED.items() if v is not None}}

# diffusers UNet2DConditionModel options that must keep these values (their SD 1.5 values) for our UNet.
DIFFUSERS_FIXED = {
    "dropout": 0.0, "center_input_sample": False, "flip_sin_to_cos": True, "freq_shift": 0, "act_fn": "silu",
    "norm_eps": 1e-5, "mid_block_type": "UNetMidBlock2DCrossAttn", "only_cross_attention": False,
    "downsample_padding": 1, "mid_block_scale_factor": 1, "transformer_layers_per_block": 1,
    "num_attention_heads": None, "dual_cross_attention": False, "use_linear_projection": False,
    "upcast_attention": False, "class_embed_type": None, "addition_embed_type": None, "num_class_embeds": None,
    "encoder_hid_dim": None, "resnet_time_scale_shift": "default", "resnet_skip_time_act": False,
    "resnet_out_scale_factor": 1.0, "time_embedding_type": "positional", "time_embedding_dim": None,
    "time_embedding_act_fn": None, "timestep_post_act": None, "time_cond_proj_dim": None, "conv_in_kernel": 3,
    "conv_out_kernel": 3, "attention_type": "default", "class_embeddings_concat": False,
    "mid_block_only_cross_attention": None, "cross_attention_norm": None, "reverse_transformer_layers_per_block": None,
}


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of diffusion timesteps [B] -> [B, dim], cos half first (DDPM / LDM)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t[:, None].float() * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class ResBlock(nn.Module):
    """Two 3x3 convs with the timestep embedding added in between, plus a skip connection."""

    def __init__(self, channels: int, out_channels: int, emb_dim: int, groups: int):
        super().__init__()
        self.in_layers = nn.Sequential(nn.GroupNorm(groups, channels, eps=1e-5), nn.SiLU(),
                                       nn.Conv2d(channels, out_channels, 3, padding=1))
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_dim, out_channels))
        self.out_layers = nn.Sequential(nn.GroupNorm(groups, out_channels, eps=1e-5), nn.SiLU(), nn.Identity(),
                                        nn.Conv2d(out_channels, out_channels, 3, padding=1))
        self.skip_connection = nn.Identity() if channels == out_channels else nn.Conv2d(channels, out_channels, 1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.in_layers(x) + self.emb_layers(emb)[:, :, None, None]
        return self.skip_connection(x) + self.out_layers(h)


class Attention(nn.Module):
    """Multi-head attention of x to itself (context None) or to the text context."""

    def __init__(self, dim: int, context_dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_k = nn.Linear(context_dim, dim, bias=False)
        self.to_v = nn.Linear(context_dim, dim, bias=False)
        self.to_out = nn.Sequential(nn.Linear(dim, dim))

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        context = x if context is None else context
        q, k, v = (t.unflatten(-1, (self.heads, -1)).transpose(1, 2)  # [B, heads, tokens, head_dim]
                   for t in (self.to_q(x), self.to_k(context), self.to_v(context)))
        h = F.scaled_dot_product_attention(q, k, v)
        return self.to_out(h.transpose(1, 2).flatten(2))


class GEGLU(nn.Module):
    """Linear to a value and a gate; value * gelu(gate) (Shazeer 2020)."""

    def __init__(self, dim: int, inner: int):
        super().__init__()
        self.proj = nn.Linear(dim, 2 * inner)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        value, gate = self.proj(x).chunk(2, dim=-1)
        return value * F.gelu(gate)


class FeedForward(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.net = nn.Sequential(GEGLU(dim, 4 * dim), nn.Identity(), nn.Linear(4 * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class TransformerBlock(nn.Module):
    """Self-attention, cross-attention to the text, feed-forward; each pre-normed and residual."""

    def __init__(self, dim: int, context_dim: int, heads: int):
        super().__init__()
        self.norm1, self.attn1 = nn.LayerNorm(dim), Attention(dim, dim, heads)
        self.norm2, self.attn2 = nn.LayerNorm(dim), Attention(dim, context_dim, heads)
        self.norm3, self.ff = nn.LayerNorm(dim), FeedForward(dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        x = x + self.attn1(self.norm1(x))
        x = x + self.attn2(self.norm2(x), context)
        return x + self.ff(self.norm3(x))


class SpatialTransformer(nn.Module):
    """Treat the pixels of a feature map as tokens and run a transformer block over them."""

    def __init__(self, channels: int, context_dim: int, heads: int, groups: int):
        super().__init__()
        self.norm = nn.GroupNorm(groups, channels, eps=1e-6)
        self.proj_in = nn.Conv2d(channels, channels, 1)
        self.transformer_blocks = nn.ModuleList([TransformerBlock(channels, context_dim, heads)])
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        b, c, height, width = x.shape
        h = self.proj_in(self.norm(x)).flatten(2).transpose(1, 2)  # [B, pixels, C]
        for block in self.transformer_blocks:
            h = block(h, context)
        return x + self.proj_out(h.transpose(1, 2).reshape(b, c, height, width))


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.op = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x)


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor, size: torch.Size) -> torch.Tensor:
        return self.conv(F.interpolate(x, size=size, mode="nearest"))


class Block(nn.Sequential):
    """One entry of input_blocks / middle_block / output_blocks: layers each given what they need."""

    def forward(self, h: torch.Tensor, emb: torch.Tensor, context: torch.Tensor, size=None) -> torch.Tensor:
        for layer in self:
            if isinstance(layer, ResBlock):
                h = layer(h, emb)
            elif isinstance(layer, SpatialTransformer):
                h = layer(h, context)
            elif isinstance(layer, Upsample):
                h = layer(h, size)
            else:
                h = layer(h)
        return h


class UNet(nn.Module):
    """Predicts the noise in `latents` at `timesteps`, conditioned on text `context` [B, tokens, context_dim].

    With `gradient_checkpointing` set (train.py --gradient-checkpointing), each block keeps only its input
    for backward and recomputes its activations there (torch.utils.checkpoint): less memory, more time,
    the same numbers.
    """

    def __init__(self, config: UNetConfig = UNetConfig()):
        super().__init__()
        self.config = cfg = config
        self.gradient_checkpointing = False
        ch, emb_dim, groups = cfg.model_channels, 4 * cfg.model_channels, cfg.norm_groups

        def transformer(channels):
            return SpatialTransformer(channels, cfg.context_dim, cfg.num_heads, groups)

        self.time_embed = nn.Sequential(nn.Linear(ch, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))

        self.input_blocks = nn.ModuleList([Block(nn.Conv2d(cfg.in_channels, ch, 3, padding=1))])
        skip_channels = [ch]
        for level, mult in enumerate(cfg.channel_mult):
            for _ in range(cfg.num_res_blocks):
                layers = [ResBlock(ch, cfg.model_channels * mult, emb_dim, groups)]
                ch = cfg.model_channels * mult
                if cfg.attention_levels[level]:
                    layers.append(transformer(ch))
                self.input_blocks.append(Block(*layers))
                skip_channels.append(ch)
            if level != len(cfg.channel_mult) - 1:
                self.input_blocks.append(Block(Downsample(ch)))
                skip_channels.append(ch)

        self.middle_block = Block(ResBlock(ch, ch, emb_dim, groups), transformer(ch), ResBlock(ch, ch, emb_dim, groups))

        self.output_blocks = nn.ModuleList()
        for level, mult in reversed(list(enumerate(cfg.channel_mult))):
            for i in range(cfg.num_res_blocks + 1):
                layers = [ResBlock(ch + skip_channels.pop(), cfg.model_channels * mult, emb_dim, groups)]
                ch = cfg.model_channels * mult
                if cfg.attention_levels[level]:
                    layers.append(transformer(ch))
                if level and i == cfg.num_res_blocks:
                    layers.append(Upsample(ch))
                self.output_blocks.append(Block(*layers))

        self.out = nn.Sequential(nn.GroupNorm(groups, ch, eps=1e-5), nn.SiLU(),
                                 nn.Conv2d(ch, cfg.out_channels, 3, padding=1))

    def forward(self, latents: torch.Tensor, timesteps: int | torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        batch = latents.shape[0]
        t = torch.as_tensor(timesteps, device=latents.device)
        if t.ndim == 0:
            t = t.expand(batch)
        if t.shape != (batch,):
            raise ValueError(f"timesteps must be a number or a tensor of shape [{batch}], got shape {tuple(t.shape)}")
        emb = self.time_embed(timestep_embedding(t, self.config.model_channels).to(latents.dtype))
        h, skips = latents, []
        for block in self.input_blocks:
            h = self.run_block(block, h, emb, context)
            skips.append(h)
        h = self.run_block(self.middle_block, h, emb, context)
        for block in self.output_blocks:
            h = torch.cat([h, skips.pop()], dim=1)
            h = self.run_block(block, h, emb, context, skips[-1].shape[-2:] if skips else None)
        return self.out(h)

    def run_block(self, block: Block, *args) -> torch.Tensor:
        """block(*args); with gradient checkpointing in training, its activations are recomputed in backward."""
        if self.gradient_checkpointing and torch.is_grad_enabled():
            return checkpoint(block, *args, use_reentrant=False)
        return block(*args)


# --- Loading ---------------------------------------------------------------------------------------------

UNET_FILES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.fp16.safetensors")
LDM_PREFIX = "model.diffusion_model."
# Single-file checkpoints hold the whole pipeline. Skipped on purpose: the text encoder and the VAE (loaded by
# clip_text.py and vae.py), the EMA copy of the weights kept by training (`model_ema.*`; the UNet weights in
# model.diffusion_model.* are the ones used, as diffusers does by default), and the noise schedule buffers of
# LDM's DDPM class, which the scheduler recomputes.
IGNORED_PREFIXES = ("cond_stage_model.", "first_stage_model.", "model_ema.")
SCHEDULE_BUFFERS = frozenset({
    "betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod",
    "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod",
    "posterior_variance", "posterior_log_variance_clipped", "posterior_mean_coef1", "posterior_mean_coef2",
})

_TOP_LEVEL = {"time_embed.0": "time_embedding.linear_1", "time_embed.2": "time_embedding.linear_2",
              "input_blocks.0.0": "conv_in", "out.0": "conv_norm_out", "out.2": "conv_out"}
_RESBLOCK = {"in_layers.0": "norm1", "in_layers.2": "conv1", "emb_layers.1": "time_emb_proj",
             "out_layers.0": "norm2", "out_layers.3": "conv2", "skip_connection": "conv_shortcut"}


def diffusers_name(name: str, num_res_blocks: int) -> str:
    """Our (LDM) parameter name -> the diffusers UNet2DConditionModel name of the same tensor.

    input_blocks count from 1 (0 is conv_in) and output_blocks from 0; both hold num_res_blocks + 1 entries per
    level (the resnets, then a down-sampler; or the resnets with an up-sampler on the last). The transformer's
    inner names are the same in both layouts.
    """
    module, param = name.rsplit(".", 1)
    if module in _TOP_LEVEL:
        return f"{_TOP_LEVEL[module]}.{param}"
    kind, index, *rest = module.split(".")
    if kind == "middle_block":  # resnet, transformer, resnet
        prefix, position, inner = "mid_block", int(index) // 2, ".".join(rest)
    else:
        level, position = divmod(int(index) - (kind == "input_blocks"), num_res_blocks + 1)
        prefix, inner = f"{'down' if kind == 'input_blocks' else 'up'}_blocks.{level}", ".".join(rest[1:])
    if inner == "op":
        return f"{prefix}.downsamplers.0.conv.{param}"
    if inner == "conv":
        return f"{prefix}.upsamplers.0.conv.{param}"
    if inner in _RESBLOCK:
        return f"{prefix}.resnets.{position}.{_RESBLOCK[inner]}.{param}"
    return f"{prefix}.attentions.{position}.{inner}.{param}"


def unet_diffusers_names(config: UNetConfig = UNetConfig()) -> dict[str, str]:
    """Every parameter name of UNet(config) -> its diffusers name (e.g. for kohya-format adapter files)."""
    with torch.device("meta"):
        names = UNet(config).state_dict().keys()
    return {name: diffusers_name(name, config.num_res_blocks) for name in names}


def ldm_unet_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The UNet tensors of a single-file checkpoint, prefix stripped; unknown keys kept to be reported."""
    unet = {}
    for key, value in state.items():
        if key.startswith(LDM_PREFIX):
            unet[key[len(LDM_PREFIX):]] = value
        elif not (key.startswith(IGNORED_PREFIXES) or key in SCHEDULE_BUFFERS):
            unet[key] = value
    return unet


def load_unet(path: str | os.PathLike, config: UNetConfig | None = None, dtype: torch.dtype | None = None) -> UNet:
    """Load a UNet from a diffusers pipeline folder, its unet/ folder or weights file, or a single-file checkpoint.

    The configuration follows weights.part_config: a diffusers `config.json` beside the weights (`config`, if
    also given, must agree), else `config`, else SD 1.5's. Loading is strict (see weights.load_strict). fp16 files load into
    fp32 unless `dtype` says otherwise.
    """
    file = resolve_component(path, "unet", UNET_FILES)
    state = load_file(file)
    single_file = any(key.startswith(LDM_PREFIX) for key in state)
    config, hint = part_config(config, file, UNetConfig.from_diffusers, "UNet", beside=not single_file)
    config = config or UNetConfig()
    if single_file:
        state, source = ldm_unet_state(state), f"{file} (single-file LDM checkpoint)"
    else:
        to_ours = {theirs: ours for ours, theirs in unet_diffusers_names(config).items()}
        state = {to_ours.get(key, key): value for key, value in state.items()}
        source = f"{file} (diffusers layout; known keys shown under their LDM names, see unet_diffusers_names)"
    with torch.device("meta"):
        model = UNet(config)
    return load_strict(model.to_empty(device="cpu"), state, source, dtype, hint)
