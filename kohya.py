"""Export trained adapters in the kohya / AUTOMATIC1111 LoRA format, which diffusers, kohya's scripts and
AUTOMATIC1111 all read, so a result of this project loads in the tools SD users already have.

For SD 1 the format names each adapted module by its diffusers path with dots as underscores:
    lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_q.lora_down.weight   [r, d_in]
                                                                        .lora_up.weight     [d_out, r]
                                                                        .alpha              scalar
    lora_te_text_model_encoder_layers_0_self_attn_q_proj....
and the update a reader applies is  W += (alpha / r) * lora_up @ lora_down.

Every method's adapter gives its dense update `delta_weight()` (of rank <= its rank r); we factor it by a
truncated SVD, so one exporter serves SeLoRA, LoRA, DyLoRA, AdaLoRA and LoRA^2 alike. One rank per module, as
the format requires, and the same alpha (1) in every module, with r folded into the factors:
up @ down = r * delta, so (alpha / r) * up @ down = delta. A per-module alpha would also be valid, but
diffusers 0.42 with transformers 5 drops per-module alphas of the text encoder (its alpha_pattern keys keep a
`text_model.` prefix that transformers 5's CLIPTextModel no longer has), so a uniform alpha is what every
reader applies alike.
"""
from __future__ import annotations

import os

import torch

import weights
from adapters import Adapter
from sd_unet import UNetConfig, unet_diffusers_names


def kohya_module_name(name: str, unet_names: dict[str, str]) -> str:
    """`unet.<LDM module path>` or `text_encoder.<module path>` (our adapter names) -> the kohya module name.
    `unet_names` is `sd_unet.unet_diffusers_names(config)`, built once per export (it builds a UNet)."""
    part, _, module = name.partition(".")
    if part == "unet":
        diffusers = unet_names.get(module + ".weight")
        if diffusers is None:
            raise ValueError(f"adapter '{name}': no diffusers name for UNet module '{module}'")
        return "lora_unet_" + diffusers[:-len(".weight")].replace(".", "_")
    if part == "text_encoder":
        return "lora_te_text_model_" + module.replace(".", "_")
    raise ValueError(f"adapter '{name}': expected a name starting with 'unet.' or 'text_encoder.'")


def low_rank_factors(delta: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(up [d_out, r], down [r, d_in]) with up @ down = r * delta when delta has rank <= r (truncated SVD)."""
    U, S, Vh = torch.linalg.svd(delta.double(), full_matrices=False)
    root = (S[:rank] * rank).sqrt()
    return (U[:, :rank] * root).float(), (root[:, None] * Vh[:rank]).float()


def export_kohya(adapters: dict[str, Adapter], unet_config: UNetConfig, path: str | os.PathLike,
                 metadata: dict[str, str] | None = None) -> None:
    """Write the adapters (named `unet.*` / `text_encoder.*`) as one kohya-format LoRA file, atomically."""
    tensors, unet_names = {}, unet_diffusers_names(unet_config)
    with torch.no_grad():
        for name, adapter in adapters.items():
            if adapter.rank == 0:
                continue  # nothing to apply (e.g. an AdaLoRA layer whose whole budget was masked)
            key = kohya_module_name(name, unet_names)
            up, down = low_rank_factors(adapter.delta_weight().float().cpu(), adapter.rank)
            tensors[f"{key}.lora_up.weight"] = up.contiguous()
            tensors[f"{key}.lora_down.weight"] = down.contiguous()
            tensors[f"{key}.alpha"] = torch.tensor(1.0)
    weights.save_file(tensors, path, {"ss_network_module": "networks.lora", **(metadata or {})})
