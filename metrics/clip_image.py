"""CLIP's image tower (ViT-L/14 by default) and visual projection, for the CLIP score.

A vision transformer (Radford et al. 2021): the image cut into 14x14 patches, each linearly embedded, a
learned class token in front, learned position embeddings, a LayerNorm before the encoder ("pre_layrnorm"),
pre-LN transformer layers with quick_gelu MLPs (clip_text's, without its causal mask), then the class token's output LayerNormed and projected
to the joint image-text space (768 wide for ViT-L/14).

Weights: the transformers layout of `openai/clip-vit-large-patch14` (`model.safetensors`, keys
`vision_model.*` and `visual_projection.weight`), loaded by `load_image_encoder`.

Preprocessing (`preprocess`) is CLIP's: shorter side to 224 with PIL's bicubic filter, centre crop,
normalise with CLIP's mean and std.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
from PIL import Image

from model.weights import load_file, load_strict, read_json, resolve_component
import clip_text

MEAN = (0.48145466, 0.4578275, 0.40821073)
STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class CLIPVisionConfig:
    """Shape of the image tower, in transformers' `vision_config` names; the defaults are ViT-L/14's."""
    image_size: int = 224
    patch_size: int = 14
    hidden_size: int = 1024
    intermediate_size: int = 4096
    num_hidden_layers: int = 24
    num_attention_heads: int = 16
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    projection_dim: int = 768


class Embeddings(nn.Module):
    def __init__(self, cfg: CLIPVisionConfig):
        super().__init__()
        width = cfg.hidden_size
        self.class_embedding = nn.Parameter(torch.zeros(width))
        self.patch_embedding = nn.Conv2d(3, width, cfg.patch_size, stride=cfg.patch_size, bias=False)
        self.position_embedding = nn.Embedding((cfg.image_size // cfg.patch_size) ** 2 + 1, width)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        patches = self.patch_embedding(pixels).flatten(2).transpose(1, 2)  # (N, patches, width)
        cls = self.class_embedding.expand(len(pixels), 1, -1).to(patches.dtype)
        return torch.cat([cls, patches], 1) + self.position_embedding.weight


class VisionTransformer(nn.Module):
    def __init__(self, cfg: CLIPVisionConfig):
        super().__init__()
        self.embeddings = Embeddings(cfg)
        self.pre_layrnorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)  # sic: transformers' name
        self.encoder = nn.Module()
        self.encoder.layers = nn.ModuleList(clip_text.CLIPEncoderLayer(cfg, causal=False)  # every patch sees every patch
                                           for _ in range(cfg.num_hidden_layers))
        self.post_layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = self.pre_layrnorm(self.embeddings(pixels))
        for layer in self.encoder.layers:
            x = layer(x)
        return self.post_layernorm(x[:, 0])


class CLIPImageEncoder(nn.Module):
    """`forward(pixels)`: (N, 3, 224, 224) normalised pixels -> (N, projection_dim) image embeddings."""

    def __init__(self, cfg: CLIPVisionConfig):
        super().__init__()
        self.config = cfg
        self.vision_model = VisionTransformer(cfg)
        self.visual_projection = nn.Linear(cfg.hidden_size, cfg.projection_dim, bias=False)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.visual_projection(self.vision_model(pixels))


def preprocess(img: Image.Image, size: int = 224) -> torch.Tensor:
    """PIL RGB image -> (3, size, size) normalised tensor, as CLIP's (and transformers' PIL) image processor."""
    w, h = img.size
    new_long = int(size * max(w, h) / min(w, h))
    img = img.resize((size, new_long) if w <= h else (new_long, size), Image.BICUBIC)  # a copy if unchanged
    w, h = img.size
    top, left = (h - size) // 2, (w - size) // 2
    img = img.crop((left, top, left + size, top + size))
    x = torch.from_numpy(np.array(img, dtype=np.uint8)).permute(2, 0, 1).double() / 255
    return ((x - torch.tensor(MEAN, dtype=torch.float64)[:, None, None])
            / torch.tensor(STD, dtype=torch.float64)[:, None, None]).float()


def config_from_state(state: dict[str, torch.Tensor], config_json: Path) -> CLIPVisionConfig:
    """The tower's shape from the weights; heads, activation and LayerNorm eps from transformers' config.json
    beside them when there is one (otherwise width / 64 heads and quick_gelu, as every OpenAI CLIP ViT has)."""
    prefix = "vision_model."
    if prefix + "embeddings.patch_embedding.weight" not in state or "visual_projection.weight" not in state:
        raise KeyError("no CLIP image tower in it (expected transformers' CLIPModel keys 'vision_model.*' "
                       "and 'visual_projection.weight')")
    width, _, patch, _ = state[prefix + "embeddings.patch_embedding.weight"].shape
    positions = state[prefix + "embeddings.position_embedding.weight"].shape[0]
    vision = read_json(config_json).get("vision_config", {}) if config_json.is_file() else {}
    return CLIPVisionConfig(
        image_size=round((positions - 1) ** 0.5) * patch, patch_size=patch, hidden_size=width,
        intermediate_size=state[prefix + "encoder.layers.0.mlp.fc1.weight"].shape[0],
        num_hidden_layers=1 + max(int(k.split(".")[3]) for k in state if k.startswith(prefix + "encoder.layers.")),
        num_attention_heads=vision.get("num_attention_heads", width // 64),
        hidden_act=vision.get("hidden_act", "quick_gelu"), layer_norm_eps=vision.get("layer_norm_eps", 1e-5),
        projection_dim=state["visual_projection.weight"].shape[0])


def load_image_encoder(path: str | os.PathLike, dtype: torch.dtype | None = None) -> CLIPImageEncoder:
    """The CLIP image tower from a transformers CLIPModel `model.safetensors` (file or its folder)."""
    file = resolve_component(path, ".", ("model.safetensors",))
    state = load_file(file)
    try:
        cfg = config_from_state(state, file.parent / "config.json")
    except KeyError as err:
        raise ValueError(f"{file}: {err.args[0]}") from None
    ours = {k: v for k, v in state.items()
            if k.startswith("vision_model.") and not k.endswith("position_ids") or k == "visual_projection.weight"}
    return load_strict(CLIPImageEncoder(cfg), ours, file, dtype).eval()
