"""Benchmark: images per second of text-to-image generation on full-size SD 1.5 with random weights, ours
(sd15.generate) against diffusers' StableDiffusionPipeline, with the same scheduler, steps, guidance, size and
starting noise, in the same run.

    OMP_NUM_THREADS=2 python bench/sample.py [--device cpu|cuda] [--size 224] [--batch 1] [--images 1]
        [--steps 2] [--scheduler pndm|ddim|dpmpp2m] [--precision fp32|fp16|bf16] [--repeat 2]

Both sides run on one set of weights (diffusers' randomised UNet, AutoencoderKL and transformers' CLIPTextModel;
ours hold the same tensors), the real CLIP vocabulary (.cache/clip) and the same initial latents, so their images
agree (the last line gives the largest difference, in [0, 1] pixel units). A run generates --images images in
batches of --batch; the runs of the two sides alternate, --repeat times each after a warm-up run, and the median
is reported. One JSON line per side, then a line with ours / diffusers. Defaults: 2 steps, under two minutes on
a 2-core CPU (docs/performance.md); a GPU takes --steps 50 --images 8 --batch 8.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from model import sampling  # noqa: E402
from model.clip_tokenizer import load_tokenizer  # noqa: E402
from model.sd15 import SD15, generate  # noqa: E402
from clip_text import CLIPTextConfig, CLIPTextModel  # noqa: E402
from sd_pipeline import GZ, sd15_scheduler, write_tokenizer  # noqa: E402
from sd_unet import UNet, UNetConfig, unet_diffusers_names  # noqa: E402
from unet_helpers import diffusers_config, randomize_  # noqa: E402
from vae import VAE, VAEConfig, diffusers_to_ldm  # noqa: E402

PRECISIONS = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
PROMPT = "frontal chest x-ray, no acute cardiopulmonary abnormality"


def pipelines(device: str, dtype: torch.dtype, scheduler: str, tokenizer_dir: Path):
    """(diffusers' StableDiffusionPipeline, our SD15) on one set of random SD 1.5 weights."""
    import transformers
    from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel(**diffusers_config(UNetConfig()))
        vae = AutoencoderKL(block_out_channels=[128, 256, 512, 512], layers_per_block=2, latent_channels=4,
                            down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4)
        text = transformers.CLIPTextModel(transformers.CLIPTextConfig(
            **{k: v for k, v in vars(CLIPTextConfig()).items() if k != "projection_dim"}))
    for model in (unet, vae, text):
        randomize_(model.to_empty(device="cpu"), seed=0)
    text.embeddings.position_ids = torch.arange(77)[None]  # a buffer, which to_empty leaves unset
    for model in (unet, vae, text):
        model.to(device, dtype)
    write_tokenizer(tokenizer_dir)
    tokenizer = transformers.CLIPTokenizer.from_pretrained(tokenizer_dir, model_max_length=77)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text, unet=unet, scheduler=sd15_scheduler(scheduler),
                                   tokenizer=tokenizer, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)

    with torch.device("meta"):
        ours = {"unet": UNet(UNetConfig()), "text_encoder": CLIPTextModel(CLIPTextConfig()), "vae": VAE(VAEConfig())}
    names = {theirs: mine for mine, theirs in unet_diffusers_names().items()}
    ours["unet"].load_state_dict({names[k]: v for k, v in unet.state_dict().items()}, assign=True)
    missing, _ = ours["text_encoder"].load_state_dict(text.state_dict(), strict=False, assign=True)  # + position_ids
    assert not missing, missing
    ours["vae"].load_state_dict(diffusers_to_ldm(vae.state_dict(), 4), assign=True)
    sd = SD15(ours["unet"].eval(), ours["text_encoder"].eval(), load_tokenizer(GZ), ours["vae"].eval(),
              name="random SD 1.5 (bench/sample.py)")
    return pipe, sd


def initial_noise(n: int, latent: int, seed: int) -> torch.Tensor:
    """The starting latents sd15.generate draws for images 0..n-1 (one generator per image)."""
    return torch.stack([torch.randn(4, latent, latent, generator=torch.Generator().manual_seed(seed * 1_000_003 + i))
                        for i in range(n)])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--images", type=int, default=1, help="images per run")
    p.add_argument("--steps", type=int, default=2, help="sampler steps (SD 1.5's pipeline default: 50)")
    p.add_argument("--guidance", type=float, default=7.5)
    p.add_argument("--scheduler", default="pndm", choices=sampling.SCHEDULERS)
    p.add_argument("--precision", default="fp32", choices=sorted(PRECISIONS))
    p.add_argument("--repeat", type=int, default=2, help="timed runs per side, alternating, after one warm-up")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        pipe, sd = pipelines(args.device, PRECISIONS[args.precision], args.scheduler, Path(tmp) / "tokenizer")
    prompts = [PROMPT] * args.images
    noise = initial_noise(args.images, args.size // 8, seed=0)

    def diffusers_run() -> torch.Tensor:
        images = [pipe(prompts[i:i + args.batch], num_inference_steps=args.steps, guidance_scale=args.guidance,
                       height=args.size, width=args.size, latents=noise[i:i + args.batch].to(args.device, pipe.dtype),
                       output_type="pt", return_dict=False)[0] for i in range(0, args.images, args.batch)]
        return torch.cat(images).float().cpu()

    def our_run() -> torch.Tensor:
        images = generate(sd, prompts, args.steps, args.guidance, seed=0, size=args.size, batch=args.batch,
                          progress=False, scheduler=args.scheduler)
        return (images + 1) / 2  # [-1, 1] -> diffusers' [0, 1]

    sides = {"ours": our_run, "diffusers": diffusers_run}
    times, images = {side: [] for side in sides}, {}
    with torch.no_grad():
        for side, run in sides.items():
            images[side] = run()  # warm-up
        for _ in range(args.repeat):
            for side, run in sides.items():
                if args.device == "cuda":
                    torch.cuda.synchronize()
                start = time.perf_counter()
                run()
                if args.device == "cuda":
                    torch.cuda.synchronize()
                times[side].append(time.perf_counter() - start)
    common = {"device": args.device, "size": args.size, "batch": args.batch, "images": args.images,
              "steps": args.steps, "guidance": args.guidance, "scheduler": args.scheduler,
              "precision": args.precision, "threads": torch.get_num_threads(), "torch": torch.__version__}
    rate = {}
    for side in sides:
        seconds = statistics.median(times[side])
        rate[side] = args.images / seconds
        print(json.dumps({"side": side, "images_per_second": round(rate[side], 4), "seconds": round(seconds, 3),
                          "runs": [round(t, 3) for t in times[side]], **common}), flush=True)
    print(json.dumps({"ours_over_diffusers_images_per_second": round(rate["ours"] / rate["diffusers"], 3),
                      "max_abs_pixel_difference": (images["ours"] - images["diffusers"]).abs().max().item()}))


if __name__ == "__main__":
    main()
