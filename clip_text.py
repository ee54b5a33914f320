"""CLIP's text encoder as Stable Diffusion 1.5 uses it (its byte-level BPE tokenizer is model/clip_tokenizer.py).

SD 1.5 conditions its UNet on the last hidden state [B, 77, 768] of OpenAI CLIP ViT-L/14's text tower
(Radford et al. 2021): a 12-layer pre-LayerNorm transformer with a causal mask, quick-GELU MLPs and a final
LayerNorm. The pooled state (at the end token) and the text projection are what CLIP score uses.

Proven equal to transformers' `CLIPTextModel` in tests/test_clip_text.py.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from model.weights import load_file, load_strict, part_config, resolve_component

# ---------------------------------------------------------------------------------------------------------------
# Text encoder
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CLIPTextConfig:
    """Shape of the text tower; the defaults are ViT-L/14's, as in SD 1.5's `text_encoder/config.json`."""
    vocab_size: int = 49408
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    max_position_embeddings: int = 77
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    eos_token_id: int = 49407
    projection_dim: int | None = None  # set for CLIPModel / CLIPTextModelWithProjection: adds `text_projection`

    def __post_init__(self):
        if self.hidden_act not in ACTIVATIONS:
            raise ValueError(f"hidden_act {self.hidden_act!r} is not supported (known: {', '.join(ACTIVATIONS)})")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by "
                             f"num_attention_heads {self.num_attention_heads}")

    @classmethod
    def tiny(cls) -> CLIPTextConfig:
        """A tower of about 50k parameters for fast tests; 77 positions, so tokenizer output fits."""
        return cls(vocab_size=1000, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                   num_attention_heads=4, eos_token_id=999)

    @classmethod
    def from_transformers(cls, cfg: dict, source: str | os.PathLike = "text encoder config") -> CLIPTextConfig:
        """Read a transformers config.json: a CLIPTextConfig one, or a CLIPModel one (its `text_config`).

        `projection_dim` is kept only where the model has a text projection (CLIPModel,
        CLIPTextModelWithProjection): SD 1.5's CLIPTextModel config lists one it does not use.
        transformers configs written before its PR #24773 give `eos_token_id` 2 and pool at the highest id
        instead, which in CLIP's vocabulary is the end token, vocab_size - 1; such configs get that here.
        """
        text = cfg.get("text_config", cfg)
        if not isinstance(text, dict):
            raise ValueError(f"{source}: text_config must be a JSON object, got {type(text).__name__}")
        fields = {**TRANSFORMERS_DEFAULTS, **{name: text[name] for name in TRANSFORMERS_DEFAULTS if name in text}}
        if fields["eos_token_id"] == 2:
            fields["eos_token_id"] = fields["vocab_size"] - 1
        if "text_config" in cfg or "CLIPTextModelWithProjection" in (cfg.get("architectures") or []):
            fields["projection_dim"] = cfg.get("projection_dim", text.get("projection_dim", 512))
        return cls(**fields)


    def to_transformers(self) -> dict:
        """This shape as a transformers `text_encoder/config.json` (CLIPTextModel; the inverse of
        `from_transformers`)."""
        fields = {name: getattr(self, name) for name in TRANSFORMERS_DEFAULTS}
        return {"architectures": ["CLIPTextModel"], "model_type": "clip_text_model", **fields,
                "bos_token_id": self.eos_token_id - 1, "pad_token_id": self.eos_token_id}

# transformers' CLIPTextConfig defaults (CLIP ViT-B's text tower), for keys a config.json leaves out.
TRANSFORMERS_DEFAULTS = dict(vocab_size=49408, hidden_size=512, intermediate_size=2048, num_hidden_layers=12,
                             num_attention_heads=8, max_position_embeddings=77, hidden_act="quick_gelu",
                             layer_norm_eps=1e-5, eos_token_id=49407)


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    """CLIP's GELU approximation x * sigmoid(1.702 x), which OpenAI trained with."""
    return x * torch.sigmoid(1.702 * x)


ACTIVATIONS = {"quick_gelu": quick_gelu, "gelu": F.gelu}


class CLIPAttention(nn.Module):
    """Multi-head self-attention; causal for text (each token sees itself and the tokens before it),
    unmasked for CLIP's image tower (metrics/clip_image.py), where every patch sees every patch."""

    def __init__(self, cfg: CLIPTextConfig, causal: bool = True):
        super().__init__()
        width = cfg.hidden_size
        self.num_heads, self.causal = cfg.num_attention_heads, causal
        self.q_proj = nn.Linear(width, width)
        self.k_proj = nn.Linear(width, width)
        self.v_proj = nn.Linear(width, width)
        self.out_proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = (proj(x).view(B, T, self.num_heads, -1).transpose(1, 2)
                   for proj in (self.q_proj, self.k_proj, self.v_proj))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal)  # softmax(q k^T / sqrt(d) [+ mask]) v
        return self.out_proj(y.transpose(1, 2).reshape(B, T, C))


class CLIPMLP(nn.Module):
    def __init__(self, cfg: CLIPTextConfig):
        super().__init__()
        self.fc1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size)
        self.act = ACTIVATIONS[cfg.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class CLIPEncoderLayer(nn.Module):
    """Pre-LayerNorm residual block: x + attn(ln1(x)), then x + mlp(ln2(x))."""

    def __init__(self, cfg: CLIPTextConfig, causal: bool = True):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.self_attn = CLIPAttention(cfg, causal)
        self.layer_norm2 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.mlp = CLIPMLP(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class CLIPTextModel(nn.Module):
    """CLIP's text transformer. Parameter names are transformers' `text_model.*` keys without that prefix.

    With `gradient_checkpointing` set, each layer's activations are recomputed in backward (as sd_unet.UNet's).
    """

    def __init__(self, config: CLIPTextConfig | None = None):
        super().__init__()
        cfg = self.config = config or CLIPTextConfig()
        self.gradient_checkpointing = False
        self.embeddings = nn.ModuleDict({
            "token_embedding": nn.Embedding(cfg.vocab_size, cfg.hidden_size),
            "position_embedding": nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size),
        })
        self.encoder = nn.ModuleDict({
            "layers": nn.ModuleList(CLIPEncoderLayer(cfg) for _ in range(cfg.num_hidden_layers)),
        })
        self.final_layer_norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        if cfg.projection_dim is not None:
            self.text_projection = nn.Linear(cfg.hidden_size, cfg.projection_dim, bias=False)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Token ids [B, T] -> final-normed hidden states [B, T, width]: SD 1.5's cross-attention context."""
        T = input_ids.shape[1]
        if T > self.config.max_position_embeddings:
            raise ValueError(f"input_ids has {T} tokens per prompt, more than the "
                             f"{self.config.max_position_embeddings} positions of this text encoder")
        x = self.embeddings.token_embedding(input_ids) + self.embeddings.position_embedding.weight[:T]
        for layer in self.encoder.layers:
            if self.gradient_checkpointing and torch.is_grad_enabled():
                x = checkpoint(layer, x, use_reentrant=False)
            else:
                x = layer(x)
        return self.final_layer_norm(x)

    def encode(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return (last hidden state [B, T, width], pooled [B, width]).

        The pooled state is the last hidden state at the first occurrence of `config.eos_token_id` in each
        row (the end token; SD 1.5's padding repeats it, so the first one marks the end of the text), which
        is transformers' rule for an up-to-date config, and equals its legacy highest-id rule on CLIP ids.
        """
        hidden = self(input_ids)
        is_eos = input_ids == self.config.eos_token_id
        if not is_eos.any(dim=1).all():
            raise ValueError(f"every row of input_ids needs the end token {self.config.eos_token_id} to pool at; "
                             f"rows {torch.nonzero(~is_eos.any(dim=1)).flatten().tolist()} have none")
        first_eos = is_eos.int().argmax(dim=1)
        return hidden, hidden[torch.arange(len(input_ids), device=hidden.device), first_eos]

    def project(self, pooled: torch.Tensor) -> torch.Tensor:
        """Pooled state -> CLIP's joint text-image embedding space (unnormalised), as CLIP score uses it."""
        if self.config.projection_dim is None:
            raise ValueError("this text encoder has no text_projection (config.projection_dim is None); "
                             "load a CLIPModel checkpoint with its config.json to get one")
        return self.text_projection(pooled)


# An original SD single-file checkpoint holds transformers' layout under this prefix, beside the UNet and VAE.
# transformers < 5 prefixes the keys with `text_model.` (CLIPModel files too), transformers >= 5 does not.
SINGLE_FILE_PREFIX = "cond_stage_model.transformer."
# Keys a text encoder file may hold that are not ours: the position_ids buffer, and a CLIPModel's image side.
IGNORED = re.compile(r"(text_model\.)?embeddings\.position_ids|vision_model\..*|visual_projection\.weight|logit_scale")


def text_encoder_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Map a checkpoint's keys to CLIPTextModel's: strip the layout's prefixes, drop the keys we do not use."""
    if any(k.startswith(SINGLE_FILE_PREFIX) for k in state):
        state = {k[len(SINGLE_FILE_PREFIX):]: v for k, v in state.items() if k.startswith(SINGLE_FILE_PREFIX)}
    return {key.removeprefix("text_model."): value for key, value in state.items() if not IGNORED.fullmatch(key)}


def load_text_encoder(path: str | os.PathLike, config: CLIPTextConfig | None = None,
                      dtype: torch.dtype | None = None) -> CLIPTextModel:
    """Load a text encoder from a diffusers folder, its `text_encoder/` folder or weights file, an original SD
    single-file checkpoint (`cond_stage_model.transformer.text_model.*`) or a transformers CLIPModel file.

    The configuration follows weights.part_config: the config.json beside a transformers weights file (`config`,
    if also given, must agree), else `config`, else SD 1.5's.
    """
    file = resolve_component(path, "text_encoder", ("model.safetensors", "model.fp16.safetensors"))
    state = load_file(file)
    single_file = any(k.startswith(SINGLE_FILE_PREFIX) for k in state)
    config, hint = part_config(config, file, CLIPTextConfig.from_transformers, "text encoder", beside=not single_file)
    model = CLIPTextModel(config)
    return load_strict(model, text_encoder_state(state), file, dtype, hint).eval()
