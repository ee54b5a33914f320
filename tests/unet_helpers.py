"""Helpers for the UNet tests: the diffusers reference model for a UNetConfig, random weights, error measure."""
import math

import torch
from diffusers import UNet2DConditionModel

from sd_unet import UNetConfig


def diffusers_config(cfg: UNetConfig) -> dict:
    """The UNet2DConditionModel arguments describing the same network as `cfg` (written from diffusers' docs)."""
    return dict(
        in_channels=cfg.in_channels, out_channels=cfg.out_channels,
        block_out_channels=[cfg.model_channels * m for m in cfg.channel_mult],
        down_block_types=["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in cfg.attention_levels],
        up_block_types=["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(cfg.attention_levels)],
        layers_per_block=cfg.num_res_blocks, attention_head_dim=cfg.num_heads,
        cross_attention_dim=cfg.context_dim, norm_num_groups=cfg.norm_groups,
    )


def reference_unet(cfg: UNetConfig, seed: int = 1) -> UNet2DConditionModel:
    """diffusers' UNet for `cfg` with every parameter random (see randomize_).

    Built on the meta device and given memory afterwards, so the 860M-parameter model skips its own (slow)
    initialisation; randomize_ then writes every parameter, and the model has no buffers to leave unset.
    """
    with torch.device("meta"):
        model = UNet2DConditionModel(**diffusers_config(cfg))
    assert not list(model.buffers())
    return randomize_(model.to_empty(device="cpu"), seed).eval()


@torch.no_grad()
def randomize_(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Give every parameter a random value, including those diffusers initialises to zero (conv_out, proj_out).

    Matrices and kernels get std 1/sqrt(fan_in), so activations keep their scale; 1-D weights (norm scales)
    1 + 0.1 N(0, 1); biases 0.1 N(0, 1).
    """
    gen = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        noise = torch.randn(p.shape, generator=gen)
        if p.ndim >= 2:
            p.copy_(noise / math.sqrt(p[0].numel()))
        elif name.endswith("weight"):
            p.copy_(1 + 0.1 * noise)
        else:
            p.copy_(0.1 * noise)
    return model


def rel_err(ours: torch.Tensor, reference: torch.Tensor) -> float:
    """max |ours - reference| / max |reference|."""
    return ((ours.double() - reference.double()).abs().max() / reference.double().abs().max()).item()
