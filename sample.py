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
import re
import sys
from pathlib import Path

import torch

from model import sampling, weights
from model.sd15 import generate, load_model
from training import cli, method_table, sheets
import eval_fid

IMAGE = re.compile(r"\d{5}\.png")  # the names sample.py gives its images (sheets.write_images), beside grid.png


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="SD 1.5: a diffusers folder or a single-file .safetensors checkpoint "
                                   "(default: the embedded tiny model pretrained on shapes, assets/tiny-sd)")
    p.add_argument("--tokenizer", help="tokenizer folder or bpe_simple_vocab_16e6.txt.gz (needed with a single file)")
    prompts = p.add_mutually_exclusive_group(required=True)
    prompts.add_argument("--prompt", type=cli.utf8, help="one prompt")
    prompts.add_argument("--prompts", help="a UTF-8 text file, one prompt per line")
    p.add_argument("--out", required=True, help="folder for the PNGs and grid.png: new, empty, or one sample.py made "
                                                "(its images are replaced)")
    p.add_argument("--scheduler", default="pndm", choices=sampling.SCHEDULERS,
                   help="sampler (default pndm: SD 1.5's, which made the paper's images)")
    p.add_argument("--steps", type=cli.integer(1, sampling.MAX_STEPS), default=50,
                   help="sampler steps, 1 to 999 (default 50; PNDM makes one UNet call more)")
    p.add_argument("--guidance", type=cli.guidance, default=7.5,
                   help="classifier-free guidance scale, 0 to 100 (default 7.5)")
    p.add_argument("--eta", type=cli.number(0.0, high=1.0), default=0.0,
                   help="DDIM eta, 0 to 1 (default 0: deterministic; 1: DDPM's variance); --scheduler ddim only")
    p.add_argument("--seed", type=cli.integer(0, cli.SEEDS - 1), default=0)
    p.add_argument("--size", type=cli.image_size, default=None, help="image size in pixels (default 224; 32 for the embedded tiny model)")
    p.add_argument("--batch", type=cli.integer(1), default=8)
    p.add_argument("--adapter", help="a trained adapter file (best.safetensors from a train.py run) or a kohya-format "
                                     "LoRA file (best.kohya.safetensors, or one made by kohya's scripts)")
    p.add_argument("--force", action="store_true", help="apply --adapter even if it was trained on another base model")
    p.add_argument("--device", type=cli.device, default="cuda" if torch.cuda.is_available() else "cpu")
    return p


def previous_images(out: Path) -> list[Path]:
    """The images an earlier sample.py left in --out, which this one replaces, so that sampling.json describes
    every image there. Refused: a file, a folder sample.py did not make (no sampling.json), or one holding other
    images, which its sampling.json would not describe."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out}: is a file, not a folder")
    if not out.is_dir() or not any(out.iterdir()):
        return []
    if sampling.read_settings(out) is None:
        raise ValueError(f"--out {out}: a folder sample.py did not make (it has no {sampling.SETTINGS}), whose "
                         "files the images could replace; give a new or empty folder")
    images = [p for p in sorted(out.iterdir()) if p.suffix.lower() in eval_fid.IMAGE_EXTENSIONS]
    others = [p.name for p in images if not IMAGE.fullmatch(p.name) and p.name != "grid.png"]
    if others:
        raise ValueError(f"--out {out}: holds images sample.py did not make ({', '.join(others[:5])}), which its "
                         f"{sampling.SETTINGS} would not describe; give a new or empty folder")
    return [p for p in images if IMAGE.fullmatch(p.name)]


def read_prompts(args: argparse.Namespace) -> list[str]:
    """--prompt, or the lines of the --prompts file (UTF-8, blank lines left out)."""
    if args.prompt is not None:
        return [args.prompt]
    if not Path(args.prompts).is_file():
        raise ValueError(f"--prompts {args.prompts}: no such file")
    texts = [line.strip() for line in cli.read_text(args.prompts, "--prompts").splitlines() if line.strip()]
    if not texts:
        raise ValueError(f"--prompts {args.prompts}: no prompt in it (one per line expected)")
    return texts


def main(argv: list[str] | None = None) -> int:
    """Generate; 2 for input a user must fix (a bad option, file, adapter or --out), said in one line before any
    image is generated."""
    p = parser()
    args = p.parse_args(argv)
    if args.eta and args.scheduler != "ddim":
        p.error(f"--eta {args.eta}: eta is DDIM's; give --scheduler ddim, or leave --eta out")
    out = Path(args.out)
    try:
        previous = previous_images(out)
        texts = read_prompts(args)
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
        weights.check_writable(out, f"--out {out}")  # a read-only folder fails now, not after every image
    except (ValueError, OSError) as err:  # the message names the option or file
        print(f"error: {err}", file=sys.stderr)
        return 2
    sd.to(args.device)
    images = generate(sd, texts, args.steps, args.guidance, args.seed, size, args.batch, args.eta,
                      scheduler=args.scheduler)
    paths = sheets.write_images(images, out)
    for stale in set(previous) - set(paths):  # an earlier run's images beyond this one's
        stale.unlink()
    sampling.write_settings(out, args.scheduler, args.steps, args.guidance, args.eta, args.seed, size)
    print(f"wrote {len(paths)} images and grid.png to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
