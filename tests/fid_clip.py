"""Test helpers for the CLIP score: a transformers CLIPModel with random weights saved in the real layout, with
CLIP's real tokenizer files beside it, and torchmetrics' CLIPScore driven by that model."""
from __future__ import annotations

import json
from pathlib import Path

import torch
import transformers

CLIP_GZ = Path(__file__).resolve().parent.parent / ".cache" / "clip" / "bpe_simple_vocab_16e6.txt.gz"

TINY = dict(
    text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                     max_position_embeddings=77, vocab_size=49408),
    vision_config=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                       image_size=224, patch_size=14),
    projection_dim=24)
# openai/clip-vit-large-patch14's config.json (legacy eos_token_id 2, as on the Hub)
VIT_L14 = dict(
    text_config=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                     max_position_embeddings=77, vocab_size=49408, eos_token_id=2, bos_token_id=0, pad_token_id=1,
                     hidden_act="quick_gelu", projection_dim=768),
    vision_config=dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                       image_size=224, patch_size=14, hidden_act="quick_gelu", projection_dim=768),
    projection_dim=768)


def random_clip(config: dict) -> transformers.CLIPModel:
    """A CLIPModel with random weights everywhere (LayerNorm scales and biases too), so a swapped tensor shows.

    Both projections also get a rank-1 term that maps their tower's final LayerNorm bias onto one shared vector,
    so image and text embeddings correlate: CLIP scores come out positive, as with trained weights, and the
    clamp at 0 of torchmetrics' mean does not hide the comparison.
    """
    model = transformers.CLIPModel(transformers.CLIPConfig(**config))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name and name.endswith("weight"):
                p.normal_(1.0, 0.1)
            elif name.endswith("bias"):
                p.normal_(0.0, 0.1)
            elif "embedding" not in name and p.ndim > 0:  # logit_scale (0-d) is not used by the score
                p.normal_(0.0, 0.5 / p.shape[-1] ** 0.5)
        shared = torch.randn(model.config.projection_dim)
        shared *= model.config.projection_dim ** 0.5 / shared.norm()
        for projection, norm in ((model.visual_projection, model.vision_model.post_layernorm),
                                 (model.text_projection, model.text_model.final_layer_norm)):
            norm.bias.normal_(0.0, 1.0)
            projection.weight += torch.outer(shared, norm.bias) / (norm.bias @ norm.bias)
    return model.eval()


def save_clip(model: transformers.CLIPModel, folder: Path) -> Path:
    """save_pretrained, plus vocab.json and merges.txt converted from CLIP's BPE file as the Hub's were made."""
    from model import clip_tokenizer

    model.save_pretrained(folder)
    vocab, merges = clip_tokenizer.read_bpe_gz(CLIP_GZ)
    (folder / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n",
                                       encoding="utf-8")
    return folder


class TensorFeatures(torch.nn.Module):
    """torchmetrics 1.9 expects get_*_features to return tensors; transformers 5 returns output objects whose
    pooler_output is that tensor. This adapter changes nothing else."""

    def __init__(self, model: transformers.CLIPModel):
        super().__init__()
        self.model, self.config = model, model.config

    def get_image_features(self, pixel_values):
        return self.model.get_image_features(pixel_values=pixel_values).pooler_output

    def get_text_features(self, input_ids, attention_mask=None):
        return self.model.get_text_features(input_ids=input_ids, attention_mask=attention_mask).pooler_output


def torchmetrics_clip_score(model: transformers.CLIPModel, folder: Path, images: list[torch.Tensor],
                            prompts: list[str], pil_processor: bool) -> float:
    """torchmetrics' CLIPScore of uint8 (3, H, W) images against prompts, with transformers' CLIPProcessor
    (its PIL image processor, or its default torchvision one)."""
    from torchmetrics.multimodal.clip_score import CLIPScore

    image_processor = (transformers.CLIPImageProcessorPil() if pil_processor else transformers.CLIPImageProcessor())
    processor = transformers.CLIPProcessor(image_processor=image_processor,
                                           tokenizer=transformers.CLIPTokenizer.from_pretrained(folder))
    metric = CLIPScore(model_name_or_path=lambda: (TensorFeatures(model), processor))
    metric.update(images, prompts)
    return metric.compute().item()
