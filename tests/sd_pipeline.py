"""A tiny Stable Diffusion 1.5 pipeline made by diffusers with random weights, saved as a diffusers folder:
the oracle for load_sd15, generation and the kohya export. The tokenizer is the real CLIP vocabulary.
Also diffusers' schedulers configured as SD 1.5's scheduler_config.json configures them: the samplers' oracle."""
import json
from pathlib import Path

import pytest
import torch
import transformers
from diffusers import AutoencoderKL, DDIMScheduler, DPMSolverMultistepScheduler, PNDMScheduler, \
    StableDiffusionPipeline, UNet2DConditionModel

from model.clip_tokenizer import read_bpe_gz

GZ = Path(__file__).resolve().parent.parent / ".cache" / "clip" / "bpe_simple_vocab_16e6.txt.gz"
# runwayml/stable-diffusion-v1-5 scheduler/scheduler_config.json: a PNDM config with no timestep_spacing, so each
# scheduler made from it takes its own default there ("leading" for PNDM and DDIM, "linspace" for DPM-Solver)
SD15_SCHEDULER = {"beta_end": 0.012, "beta_schedule": "scaled_linear", "beta_start": 0.00085, "clip_sample": False,
                  "num_train_timesteps": 1000, "set_alpha_to_one": False, "skip_prk_steps": True,
                  "steps_offset": 1, "trained_betas": None}


def sd15_scheduler(name: str):
    """diffusers' scheduler for our sampler `name` (sampling.SCHEDULERS), made from SD 1.5's config as a user
    switches the pipeline's scheduler: `Scheduler.from_config(pipe.scheduler.config)`."""
    if name == "dpmpp2m":
        return DPMSolverMultistepScheduler.from_config(SD15_SCHEDULER, algorithm_type="dpmsolver++", solver_order=2)
    return {"pndm": PNDMScheduler, "ddim": DDIMScheduler}[name].from_config(SD15_SCHEDULER)


def randomize(model: torch.nn.Module, scale: float = 0.05) -> torch.nn.Module:
    """Random weights everywhere (diffusers zero-initialises some output layers), norm scales near 1."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name and name.endswith("weight"):
                p.normal_(1.0, 0.1)
            else:
                p.normal_(0.0, scale)
    return model.eval()


def write_tokenizer(folder: Path) -> None:
    """vocab.json and merges.txt from CLIP's bpe_simple_vocab_16e6.txt.gz, as the Hub's files were made."""
    if not GZ.is_file():
        pytest.fail(f"{GZ} is missing: run `bash tools/setup.sh --test` to fetch CLIP's vocabulary")
    vocab, merges = read_bpe_gz(GZ)
    folder.mkdir(parents=True)
    (folder / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n",
                                       encoding="utf-8")


def make_pipeline(root: Path, seed: int = 0, vae_channels: tuple[int, ...] = (32, 64)) -> StableDiffusionPipeline:
    """Build, randomise and save (root/) a tiny SD 1.5-shaped pipeline, with SD 1.5's PNDM scheduler; return it.

    The VAE has one level per entry of `vae_channels` (each level after the first halves the size; SD's has 4)."""
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64, 64, 64),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=8, norm_num_groups=8)
    levels = len(vae_channels)
    vae = AutoencoderKL(in_channels=3, out_channels=3, block_out_channels=vae_channels, layers_per_block=1,
                        latent_channels=4, norm_num_groups=8,
                        down_block_types=("DownEncoderBlock2D",) * levels,
                        up_block_types=("UpDecoderBlock2D",) * levels)
    text = transformers.CLIPTextModel(transformers.CLIPTextConfig(
        vocab_size=49408, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=77, hidden_act="quick_gelu", eos_token_id=49407, bos_token_id=49406))
    for part in (unet, vae, text):
        randomize(part)
    write_tokenizer(root / "tokenizer")
    tokenizer = transformers.CLIPTokenizer.from_pretrained(root / "tokenizer", model_max_length=77)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=tokenizer, unet=unet,
                                   scheduler=sd15_scheduler("pndm"), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(root, safe_serialization=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe
