"""Adapters in the kohya / AUTOMATIC1111 LoRA format, which diffusers, kohya's scripts and AUTOMATIC1111 all
read: export a result of this project to the tools SD users already have, and load such a file back.

For SD 1 the format names each adapted module by its diffusers path with dots as underscores:
    lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_q.lora_down.weight   [r, d_in]
                                                                        .lora_up.weight     [d_out, r]
                                                                        .alpha              scalar
    lora_te_text_model_encoder_layers_0_self_attn_q_proj....
and the update a reader applies is  W += (alpha / r) * lora_up @ lora_down.

Export. Every method gives its update as its own factors, s A_eff B_eff (`Adapter.factors()`; AdaLoRA's
A_eff = A diag(E), LoRA^2's A diag(f), DyLoRA's first b ranks), and those are written as they are:
down = A_eff^T and up = r s B_eff^T, with the same alpha (1) in every module, so that (alpha / r) up @ down
is the update. No dense d_out x d_in matrix is formed. Ranks that contribute exactly nothing (a zero column
of A_eff, such as AdaLoRA's masked triplets, or a zero row of B_eff, such as the rank SeLoRA has just added)
are dropped, so each module's rank in the file is the rank really used, and a module with none left is
left out. Each kept rank's row of down and column of up get equal norms (a diagonal rescaling that leaves
their product alone), so that neither under- nor overflows when a reader casts them to fp16.
A per-module alpha would also be valid, but diffusers 0.42 with transformers 5 drops per-module alphas of
the text encoder (its alpha_pattern keys keep a `text_model.` prefix that transformers 5's CLIPTextModel
no longer has), so a uniform alpha is what every reader applies alike.

Import. `load_kohya` puts a plain LoRA file, ours or one made by kohya's scripts, into our model as
`LoRALinear` adapters (method "lora"): A = down^T, B = up^T, scale alpha / r, with alpha = r where the file
gives none (as kohya and diffusers read it). kohya's SD 1 LoRAs also adapt the spatial transformers'
proj_in / proj_out, which are 1x1 convs; adapters wrap nn.Linear only, so those updates are merged into
the convs' weights.
"""
from __future__ import annotations

import math
import os

import torch
from torch import nn

from methods.adapters import Adapter, inject
from methods.baselines import LoRALinear
from model import weights
from sd_unet import UNetConfig, unet_diffusers_names

PARTS = ("lora_down.weight", "lora_up.weight", "alpha")


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


def kohya_factors(adapter: Adapter) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(up [d_out, r], down [r, d_in]) with (1 / r) up @ down = the adapter's update, over the ranks that
    contribute (None if none does), from its factors; float64 on the CPU."""
    A, B, scale = (t.detach().double().cpu() for t in adapter.factors())
    keep = (A != 0).any(0) & (B != 0).any(1)
    r = int(keep.sum())
    if r == 0 or scale == 0:
        return None
    A, B = A[:, keep], B[keep]
    balance = (B.norm(dim=1) / A.norm(dim=0)).sqrt()  # per rank: |down row| = |up column|
    root = (r * scale.abs()).sqrt()
    return (scale.sign() * root * B / balance[:, None]).T, (root * A * balance).T


def export_kohya(adapters: dict[str, Adapter], unet_config: UNetConfig, path: str | os.PathLike,
                 metadata: dict[str, str] | None = None) -> None:
    """Write the adapters (named `unet.*` / `text_encoder.*`) as one kohya-format LoRA file, atomically."""
    tensors, unet_names = {}, unet_diffusers_names(unet_config)
    with torch.no_grad():
        for name, adapter in adapters.items():
            factors = kohya_factors(adapter)
            if factors is None:
                continue
            key = kohya_module_name(name, unet_names)
            tensors[f"{key}.lora_up.weight"] = factors[0].float().contiguous()
            tensors[f"{key}.lora_down.weight"] = factors[1].float().contiguous()
            tensors[f"{key}.alpha"] = torch.tensor(1.0)
    weights.save_file(tensors, path, {"ss_network_module": "networks.lora", **(metadata or {})})


def is_kohya_file(path: str | os.PathLike) -> bool:
    """Whether a safetensors file is in the kohya format (its metadata or key names say so), header only."""
    entries, metadata, _ = weights.read_header(path)
    return "ss_network_module" in metadata or any(k.startswith(("lora_unet_", "lora_te_")) for k in entries)


def check_values(path: str | os.PathLike, tensors: dict[str, torch.Tensor]) -> None:
    """Refuse an adapter file's tensors that would make every image black or change nothing, naming the key:
    a NaN or an infinity anywhere, or an alpha (kohya) or scale (ours) that is not above 0."""
    for key, value in tensors.items():
        weights.check_finite(path, key, value, "; applied, they would make every image black")
        if key.rsplit(".", 1)[-1] in ("alpha", "scale") and not (value > 0).all():
            raise ValueError(f"{path}: key '{key}' is {value.flatten()[0].item()}: expected an alpha (scale) above 0 "
                             "(0 adapts nothing, a negative one reverses the update)")


def read_kohya(path: str | os.PathLike) -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
    """kohya module name -> (down [r, d_in], up [d_out, r], alpha) of a plain LoRA file, checked."""
    modules: dict[str, dict[str, torch.Tensor]] = {}
    tensors = weights.load_file(path)
    check_values(path, tensors)
    for key, value in tensors.items():
        module, _, part = key.partition(".")
        if part not in PARTS:
            raise ValueError(f"{path}: key '{key}': expected <module>.lora_down.weight, .lora_up.weight or .alpha "
                             "(LoHa, LoKr, DoRA and LoCon's lora_mid are not plain LoRA and are not supported)")
        modules.setdefault(module, {})[part] = value
    if not modules:
        raise ValueError(f"{path}: holds no LoRA tensors")
    read = {}
    for module, parts in modules.items():
        for part in PARTS[:2]:
            if part not in parts:
                raise ValueError(f"{path}: key '{module}.{part}' is missing (LoRA needs both lora_down and lora_up)")
        down, up = parts["lora_down.weight"], parts["lora_up.weight"]
        key = f"{module}.lora_down.weight"
        if down.dim() == 4 and down.shape[2:] != (1, 1):
            raise ValueError(f"{path}: key '{key}': a {down.shape[2]}x{down.shape[3]} conv LoRA (LoCon), "
                             "only linear and 1x1 ones are supported")
        if down.dim() not in (2, 4) or up.dim() != down.dim() or up.shape[2:] != down.shape[2:] \
                or up.shape[1] != down.shape[0] or down.shape[0] == 0:
            raise ValueError(f"{path}: key '{key}': shapes {tuple(down.shape)} and lora_up {tuple(up.shape)} "
                             "are not [r, d_in] and [d_out, r], r >= 1 (or those with 1x1 kernels)")
        r = down.shape[0]
        alpha = parts.get("alpha", torch.tensor(float(r)))
        if alpha.numel() != 1:
            raise ValueError(f"{path}: key '{module}.alpha' has shape {tuple(alpha.shape)}, expected a scalar")
        read[module] = down.reshape(r, -1).float(), up.reshape(-1, r).float(), float(alpha)
    return read


def check_update(path: str | os.PathLike, key: str, down: torch.Tensor, up: torch.Tensor, alpha: float) -> None:
    """Refuse a module whose rank is above min(d_in, d_out) (no low-rank update has more), or whose update
    (alpha / r) up @ down has entries beyond float16's range (65504), where no trained LoRA's are (theirs are
    about 1e-2) and which overflow the weights of a model run in fp16: an alpha such as 1e30 blackens every image."""
    r, bound = down.shape[0], min(up.shape[0], down.shape[1])
    if r == 0:
        return  # no ranks, no update: AdaLoRA may prune a layer to none
    if r > bound:
        raise ValueError(f"{path}: key '{key}': rank {r} is above min(d_in, d_out) = {bound} of the layer it adapts")
    largest = (alpha / r * (up.double() @ down.double())).abs().max().item() if math.isfinite(alpha / r) else math.inf
    if not largest <= torch.finfo(torch.float16).max:
        raise ValueError(f"{path}: key '{key}': the update (alpha / r) lora_up @ lora_down reaches {largest:.3g}, "
                         f"beyond float16's range (alpha {alpha:g}, rank {r}): not a trained LoRA")


def load_kohya(model: nn.Module, path: str | os.PathLike) -> tuple[dict[str, Adapter], list[str]]:
    """Load a kohya-format LoRA file into `model` (`SD15.adaptable()`: `unet`, `text_encoder`).

    Returns the LoRALinear adapters by name and the names of the 1x1 convs whose weights took their update.
    Everything is checked before the model is changed.
    """
    if any(isinstance(m, Adapter) for m in model.modules()):
        raise ValueError(f"{path}: the model already has adapters; load a kohya file into a fresh one")
    unet_names = unet_diffusers_names(model.unet.config)
    ours = {kohya_module_name(name, unet_names): name for name, m in model.named_modules()
            if isinstance(m, (nn.Linear, nn.Conv2d))}
    modules = read_kohya(path)
    for module, (down, up, alpha) in modules.items():
        key = f"{module}.lora_down.weight"
        if module not in ours:
            raise ValueError(f"{path}: key '{key}': no SD 1.5 module '{module}' (expected lora_unet_<diffusers "
                             "module path> or lora_te_text_model_<module path>, dots as underscores)")
        target = model.get_submodule(ours[module])
        if isinstance(target, nn.Conv2d) and target.kernel_size != (1, 1):
            raise ValueError(f"{path}: key '{key}': '{ours[module]}' is a {target.kernel_size} conv; "
                             "conv LoRA (LoCon) is supported for 1x1 convs only")
        if (up.shape[0], down.shape[1]) != tuple(target.weight.shape[:2]):
            raise ValueError(f"{path}: key '{key}': lora_up @ lora_down is {up.shape[0]} x {down.shape[1]}, "
                             f"but '{ours[module]}' has a {target.weight.shape[0]} x {target.weight.shape[1]} weight")
        check_update(path, key, down, up, alpha)
    built, merged = {}, []
    with torch.no_grad():
        for module, (down, up, alpha) in modules.items():
            target, r = model.get_submodule(ours[module]), down.shape[0]
            if isinstance(target, nn.Conv2d):
                target.weight += (alpha / r * up @ down).to(target.weight)[:, :, None, None]
                merged.append(ours[module])
                continue
            adapter = built[target] = LoRALinear(target, r, alpha, generator=torch.Generator())
            adapter.A.copy_(down.T)
            adapter.B.copy_(up.T)
    targets = [ours[module] for module in modules if ours[module] not in merged]
    return inject(model, built.__getitem__, targets), merged
