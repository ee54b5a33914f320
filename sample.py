"""Generate images with SD 1.5 (optionally with a trained adapter): one PNG per image plus a grid.

    python sample.py --model PATH --prompt "..." --out DIR [--scheduler pndm --steps 50 --guidance 7.5 --seed 0
                     --size 224 --batch 8 --adapter FILE]   (FILE: best.safetensors of a run, or a kohya-format LoRA)
    python sample.py --model PATH --prompts prompts.txt --out DIR      (one prompt per line)

The defaults are StableDiffusionPipeline's, with which the paper's images were made: SD 1.5's PNDM scheduler,
50 steps, guidance 7.5, 224 px. --scheduler ddim or dpmpp2m (DPM-Solver++(2M), good in about 20 steps) are the
alternatives. DIR/sampling.json records how the images were made.

Without --model it uses the embedded tiny model pretrained here on coloured shapes (`sd15.load_embedded`).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from model import sampling
from model.sd15 import generate, load_model
from training import cli, method_table, plots

def main(argv: list[str] | None = None) -> int:
    """Generate; 2 for input a user must fix (a bad option, file or adapter), said in one line."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="SD 1.5: a diffusers folder or a single-file .safetensors checkpoint "
                                   "(default: the embedded tiny model pretrained on shapes, assets/tiny-sd)")
    p.add_argument("--tokenizer", help="tokenizer folder or bpe_simple_vocab_16e6.txt.gz (needed with a single file)")
    prompts = p.add_mutually_exclusive_group(required=True)
    prompts.add_argument("--prompt", help="one prompt")
    prompts.add_argument("--prompts", help="a text file, one prompt per line")
    p.add_argument("--out", required=True, help="folder for the PNGs and grid.png")
    p.add_argument("--scheduler", default="pndm", choices=sampling.SCHEDULERS,
                   help="sampler (default pndm: SD 1.5's, which made the paper's images)")
    p.add_argument("--steps", type=cli.integer(1, sampling.MAX_STEPS), default=50,
                   help="sampler steps, 1 to 999 (default 50; PNDM makes one UNet call more)")
    p.add_argument("--guidance", type=cli.number(0.0), default=7.5, help="classifier-free guidance scale (default 7.5)")
    p.add_argument("--eta", type=cli.number(0.0), default=0.0,
                   help="DDIM eta (default 0: deterministic); --scheduler ddim only")
    p.add_argument("--seed", type=cli.integer(0, cli.SEEDS - 1), default=0)
    p.add_argument("--size", type=cli.image_size, default=None, help="image size in pixels (default 224; 32 for the embedded tiny model)")
    p.add_argument("--batch", type=cli.integer(1), default=8)
    p.add_argument("--adapter", help="a trained adapter file (best.safetensors from a train.py run) or a kohya-format "
                                     "LoRA file (best.kohya.safetensors, or one made by kohya's scripts)")
    p.add_argument("--force", action="store_true", help="apply --adapter even if it was trained on another base model")
    p.add_argument("--device", type=cli.device, default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)
    if args.eta and args.scheduler != "ddim":
        p.error(f"--eta {args.eta}: eta is DDIM's; give --scheduler ddim, or leave --eta out")

    try:
        out = Path(args.out)
        if out.exists() and not out.is_dir():
            raise ValueError(f"--out {out}: is a file, not a folder")
        if out.is_dir() and any(out.iterdir()) and sampling.read_settings(out) is None:
            raise ValueError(f"--out {out}: a folder sample.py did not make (it has no {sampling.SETTINGS}), whose "
                             "files the images could replace; give a new or empty folder")
        if args.prompt is not None:
            texts = [args.prompt]
        else:
            if not Path(args.prompts).is_file():
                raise ValueError(f"--prompts {args.prompts}: no such file")
            texts = [line.strip() for line in Path(args.prompts).read_text(encoding="utf-8").splitlines() if line.strip()]
            if not texts:
                raise ValueError(f"--prompts {args.prompts}: no prompt in it (one per line expected)")
        if not args.model:
            print("No --model given: using the embedded tiny model pretrained here on coloured shapes "
                  "(assets/tiny-sd), native size 32 px.", file=sys.stderr)
        sd = load_model(args.model, args.tokenizer)
        size = args.size or (224 if args.model else 32)
        if size % sd.latent_factor:
            raise ValueError(f"--size {size}: must be a multiple of {sd.latent_factor}, this model's VAE factor")
        if args.adapter:
            if not Path(args.adapter).is_file():
                raise ValueError(f"--adapter {args.adapter}: no such file")
            method_table.load_adapter(sd, args.adapter, args.force)
    except (ValueError, OSError) as err:  # the message names the option or file
        print(f"error: {err}", file=sys.stderr)
        return 2
    sd.to(args.device)
    images = generate(sd, texts, args.steps, args.guidance, args.seed, size, args.batch, args.eta,
                      scheduler=args.scheduler)
    paths = plots.write_images(images, Path(args.out))
    sampling.write_settings(Path(args.out), args.scheduler, args.steps, args.guidance, args.eta, args.seed, size)
    print(f"wrote {len(paths)} images and grid.png to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
