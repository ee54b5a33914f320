"""Stable Diffusion 1.5 as one object: UNet, CLIP text encoder, tokenizer and VAE, and text-to-image generation.

`load_sd15` reads the real weights (a diffusers folder, or the single-file checkpoint plus a tokenizer);
`load_embedded` the tiny model pretrained here on coloured shapes (assets/tiny-sd, the embedded default's);
`tiny_sd15` builds the same architecture, tiny and with random weights, for the tests that need only the
architecture; `save_sd15` writes the diffusers layout.
"""
from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from model import sampling
from model.clip_tokenizer import END, END_OF_WORD, START, Tokenizer, bytes_to_unicode, load_tokenizer, save_tokenizer
from model.weights import atomic_write, fingerprint, save_file
from clip_text import CLIPTextConfig, CLIPTextModel, load_text_encoder
from sd_unet import UNet, UNetConfig, load_unet, unet_diffusers_names
from vae import VAE, VAEConfig, latents_to_images, ldm_to_diffusers, load_vae


@dataclass
class SD15:
    unet: UNet
    text_encoder: CLIPTextModel
    tokenizer: Tokenizer
    vae: VAE
    name: str  # where the weights came from, recorded in run folders and adapter files
    # weights.fingerprint of each part as built, before any adapter: keys the latent cache (vae) and ties
    # adapter files to their base model (unet, text_encoder)
    fingerprints: dict[str, str] = dataclasses.field(init=False)

    def __post_init__(self):
        self.fingerprints = {part: fingerprint(getattr(self, part).state_dict())
                             for part in ("unet", "text_encoder", "vae")}

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> SD15:
        for part in (self.unet, self.text_encoder, self.vae):
            part.to(device, dtype)
        return self

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    @property
    def latent_factor(self) -> int:
        """How many image pixels one latent pixel spans (8 for SD 1.5: one halving per VAE level after the first)."""
        return 2 ** (len(self.vae.config.channels) - 1)

    def adaptable(self) -> torch.nn.ModuleDict:
        """The parts that get adapters, under the names adapter files use: `unet.<module>`, `text_encoder.<module>`."""
        return torch.nn.ModuleDict({"unet": self.unet, "text_encoder": self.text_encoder})

    def encode_prompts(self, prompts: list[str]) -> tuple[torch.Tensor, int]:
        """Text-encoder context (B, 77, d) for the prompts, and how many were truncated to 77 tokens."""
        ids, truncated = self.tokenizer.encode(prompts)
        return self.text_encoder(ids.to(self.device)), truncated


def load_sd15(path: str | os.PathLike, tokenizer: str | os.PathLike | None = None,
              dtype: torch.dtype | None = None) -> SD15:
    """Load SD 1.5 from a diffusers pipeline folder or an original single-file checkpoint.

    A single file carries no tokenizer: give `tokenizer` (a diffusers `tokenizer/` folder with vocab.json and
    merges.txt, or CLIP's `bpe_simple_vocab_16e6.txt.gz`). Weights load in fp32 unless `dtype` says otherwise.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file or folder (expected a diffusers SD 1.5 folder or a single-file "
                                ".safetensors checkpoint)")
    if tokenizer is None:
        if not path.is_dir():
            raise ValueError(f"{path} is a single-file checkpoint, which carries no tokenizer: give --tokenizer PATH "
                             "(a diffusers 'tokenizer/' folder with vocab.json and merges.txt, or CLIP's "
                             "bpe_simple_vocab_16e6.txt.gz)")
        tokenizer = path
    return SD15(unet=load_unet(path, dtype=dtype).eval(), text_encoder=load_text_encoder(path, dtype=dtype).eval(),
                tokenizer=load_tokenizer(tokenizer), vae=load_vae(path, dtype=dtype).eval(), name=str(path))


SCHEDULER_CONFIG = {  # SD 1.5's scheduler/scheduler_config.json: the training schedule of model/sampling.py, PNDM
    "_class_name": "PNDMScheduler", "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000, "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1,
    "clip_sample": False, "prediction_type": "epsilon", "timestep_spacing": "leading", "trained_betas": None}


def save_sd15(sd: SD15, folder: str | os.PathLike, merges: list[tuple[str, str]], dtype: torch.dtype = torch.float16) -> None:
    """Write `sd` as a diffusers pipeline folder, the layout of `stable-diffusion-v1-5/`: unet/, text_encoder/,
    vae/ (config.json and safetensors in `dtype`), tokenizer/ (vocab.json and `merges`), scheduler/ and
    model_index.json. `load_sd15` and diffusers' StableDiffusionPipeline both read it."""
    folder = Path(folder)
    unet_names = unet_diffusers_names(sd.unet.config)
    parts = {
        "unet": ("diffusion_pytorch_model.safetensors", sd.unet.config.to_diffusers(),
                 {unet_names[k]: v for k, v in sd.unet.state_dict().items()}),
        "text_encoder": ("model.safetensors", sd.text_encoder.config.to_transformers(),
                         {f"text_model.{k}": v for k, v in sd.text_encoder.state_dict().items()}),
        "vae": ("diffusion_pytorch_model.safetensors", sd.vae.config.to_diffusers(),
                ldm_to_diffusers(sd.vae.state_dict(), len(sd.vae.config.channels))),
        "scheduler": (None, SCHEDULER_CONFIG, None),
    }
    for part, (weights_name, config, state) in parts.items():
        (folder / part).mkdir(parents=True, exist_ok=True)
        if state is not None:
            save_file({k: v.detach().to(dtype).contiguous() for k, v in state.items()}, folder / part / weights_name)
        name = "scheduler_config.json" if part == "scheduler" else "config.json"
        with atomic_write(folder / part / name, "w") as f:
            json.dump(config, f, indent=2)
    save_tokenizer(sd.tokenizer, folder / "tokenizer", merges)
    index = {"_class_name": "StableDiffusionPipeline", "unet": ["diffusers", "UNet2DConditionModel"],
             "vae": ["diffusers", "AutoencoderKL"], "text_encoder": ["transformers", "CLIPTextModel"],
             "tokenizer": ["transformers", "CLIPTokenizer"], "scheduler": ["diffusers", "PNDMScheduler"],
             "safety_checker": [None, None], "feature_extractor": [None, None], "requires_safety_checker": False}
    with atomic_write(folder / "model_index.json", "w") as f:
        json.dump(index, f, indent=2)


def byte_tokenizer() -> Tokenizer:
    """CLIP's tokenizer with no merges: every character is one token (514 ids in CLIP's order: the 256 byte
    symbols, the same with the end-of-word mark, then start and end). Needs no vocabulary file."""
    symbols = list(bytes_to_unicode().values())
    vocab = {s: i for i, s in enumerate(symbols + [s + END_OF_WORD for s in symbols] + [START, END])}
    return Tokenizer(vocab, [], source="byte-level vocabulary")


def tiny_sd15(seed: int = 0) -> SD15:
    """SD 1.5's architecture at toy size with random weights (same seed, same model), for the tests of the
    mechanics; it cannot make real images (the embedded default is `load_embedded`'s trained model)."""
    tokenizer = byte_tokenizer()
    text_config = dataclasses.replace(CLIPTextConfig.tiny(), vocab_size=len(tokenizer.encoder),
                                      eos_token_id=tokenizer.end_id)
    unet_config = dataclasses.replace(UNetConfig.tiny(), context_dim=text_config.hidden_size)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        parts = UNet(unet_config), CLIPTextModel(text_config), VAE(VAEConfig.tiny())
    unet, text_encoder, vae = (p.eval() for p in parts)
    return SD15(unet, text_encoder, tokenizer, vae, name=f"embedded tiny random SD 1.5 (seed {seed})")


EMBEDDED_MODEL = Path(__file__).resolve().parents[1] / "assets" / "tiny-sd"  # made by tools/pretrain_tiny.py


def load_embedded() -> SD15:
    """The embedded tiny SD 1.5 (assets/tiny-sd/): SD 1.5's architecture at toy size, pretrained here on
    coloured shapes (tools/pretrain_tiny.py), read like any diffusers folder."""
    if not (EMBEDDED_MODEL / "model_index.json").is_file():
        raise FileNotFoundError(f"{EMBEDDED_MODEL}: the embedded tiny model is missing or incomplete (no "
                                "model_index.json); it ships with the project: restore it from git (git checkout -- "
                                "assets/tiny-sd) or make it again with tools/pretrain_tiny.py")
    sd = load_sd15(EMBEDDED_MODEL)
    sd.name = "embedded tiny SD 1.5 pretrained on shapes (assets/tiny-sd)"
    return sd


def load_model(model: str | os.PathLike | None, tokenizer: str | os.PathLike | None = None) -> SD15:
    """`load_sd15(model, tokenizer)`, or the embedded tiny pretrained model when `model` is None (train.py's
    default)."""
    return load_embedded() if model is None else load_sd15(model, tokenizer)


@torch.no_grad()
def generate(sd: SD15, prompts: list[str], steps: int = 50, guidance: float = sampling.GUIDANCE, seed: int = 0, size: int = 224,
             batch: int = 8, eta: float = 0.0, progress: bool = True, scheduler: str = "pndm") -> torch.Tensor:
    """Text to images in [-1, 1], (N, 3, size, size): guided sampling with `scheduler` (sampling.sample; the
    default, PNDM at 50 steps, guidance 7.5 and 224 px, is StableDiffusionPipeline's), then the VAE decoder.

    Image i starts from noise drawn from its own generator seeded with (seed, i), so an image does not
    depend on the batch size or on the other prompts: same seed, same images. The noise is drawn in fp32 and
    sampled in the UNet's precision, as StableDiffusionPipeline does for a half-precision model.
    """
    if size % sd.latent_factor:
        raise ValueError(f"size {size} must be a multiple of {sd.latent_factor}, the VAE's downsampling factor")
    latent_size, channels = size // sd.latent_factor, sd.vae.config.latent_channels
    uncond, _ = sd.encode_prompts([""])
    images = []
    for start in tqdm(range(0, len(prompts), batch), desc="images", unit="batch", disable=not progress):
        chunk = prompts[start:start + batch]
        noise = torch.stack([torch.randn(channels, latent_size, latent_size,
                                         generator=torch.Generator().manual_seed(seed * 1_000_003 + start + i))
                             for i in range(len(chunk))]).to(sd.device, next(sd.unet.parameters()).dtype)
        context, _ = sd.encode_prompts(chunk)
        generator = torch.Generator(sd.device).manual_seed(seed) if eta > 0 else None
        latents = sampling.sample(sd.unet, noise, context, uncond, steps, guidance, eta, generator,
                                  scheduler=scheduler)
        images.append(latents_to_images(sd.vae, latents).float().cpu())
    return torch.cat(images)
