"""Generate images with SD 1.5 (optionally with a trained adapter): one PNG per image plus a grid.

    python sample.py --model PATH --prompt "..." --out DIR [--scheduler pndm --steps 50 --guidance 7.5 --seed 0
                     --size 224 --batch 8 --adapter FILE]   (FILE: best.safetensors of a run, or a kohya-format LoRA)
    python sample.py --model PATH --prompts prompts.txt --out DIR      (one prompt per line)

The defaults are StableDiffusionPipeline's, with which the paper's images were made: SD 1.5's PNDM scheduler,
50 steps, guidance 7.5, 224 px. --scheduler ddim or dpmpp2m (DPM-Solver++(2M), good in about 20 steps) are the
alternatives. DIR/sampling.json records how the images were made.

Without --model it uses the embedded tiny random model (`sd15.tiny_sd15`, seed 0), which shows the mechanics only.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch
from PIL import Image

import adapters
import cli
import data
import kohya
import methods
import sampling
import weights
from sd15 import SD15, generate, load_model

SAMPLING = "sampling.json"  # beside generated images: the sampler and settings that made them (FID depends on them)


def to_pil(image: torch.Tensor) -> Image.Image:
    """A (3, H, W) image in [-1, 1] as an 8-bit RGB picture."""
    pixels = ((image.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(pixels, "RGB")


def grid(images: list[Image.Image], columns: int | None = None) -> Image.Image:
    """Images of one size side by side, `columns` per row (default: a near-square grid)."""
    columns = columns or math.ceil(math.sqrt(len(images)))
    w, h = images[0].size
    sheet = Image.new("RGB", (columns * w, math.ceil(len(images) / columns) * h), "white")
    for i, im in enumerate(images):
        sheet.paste(im, ((i % columns) * w, (i // columns) * h))
    return sheet


def save_png(image: Image.Image, path: Path) -> None:
    with weights.atomic_write(path) as f:
        image.save(f, format="PNG")


def check_base_model(sd: SD15, path: str | Path) -> None:
    """Refuse an adapter file trained on another base model: its `base_fingerprint` (train.adapter_metadata)
    must be this model's UNet and text encoder fingerprints. Files without one (older runs) are not checked."""
    recorded = weights.load_metadata(path).get("base_fingerprint")
    if recorded is None:
        return
    trained = json.loads(recorded)
    differ = [part for part in ("unet", "text_encoder") if trained.get(part) != sd.fingerprints[part]]
    if differ:
        raise ValueError(f"{path}: trained on another base model than {sd.name} (its "
                         f"{' and '.join(differ)} weights differ: fingerprint "
                         f"{', '.join(trained.get(p, '?') for p in differ)} in the file, "
                         f"{', '.join(sd.fingerprints[p] for p in differ)} here); give the model it was trained on "
                         f"({weights.load_metadata(path).get('base_model', 'see its base_model metadata')}), or "
                         "--force to apply it anyway")


def load_adapter(sd: SD15, path: str | Path, force: bool = False) -> dict[str, adapters.Adapter]:
    """Put a trained adapter file (any method) or a kohya-format LoRA file into the UNet and text encoder; refuse
    one trained on another base model unless `force`."""
    if not force:
        check_base_model(sd, path)
    if kohya.is_kohya_file(path):
        return kohya.load_kohya(sd.adaptable(), path)[0]
    return adapters.load_adapters(sd.adaptable(), path, methods.adapter_for_file(path))[0]


def write_images(images: torch.Tensor, out: Path, names: list[str] | None = None) -> list[Path]:
    """One PNG per image (named `names[i]` or `{i:05d}.png`) and `grid.png`."""
    pictures = [to_pil(im) for im in images]
    paths = [out / (names[i] if names else f"{i:05d}.png") for i in range(len(pictures))]
    for picture, path in zip(pictures, paths):
        save_png(picture, path)
    save_png(grid(pictures), out / "grid.png")
    return paths


def write_sampling(folder: Path, scheduler: str, steps: int, guidance: float, eta: float, seed: int,
                   size: int) -> None:
    """folder/sampling.json: the sampler and settings that made the images in `folder`."""
    settings = dict(scheduler=scheduler, steps=steps, guidance=guidance, eta=eta, seed=seed, size=size)
    with weights.atomic_write(folder / SAMPLING, "w") as f:
        json.dump(settings, f, indent=1)


def read_sampling(folder: Path) -> dict | None:
    """The settings in folder/sampling.json, or None where the images' sampler is not recorded."""
    path = folder / SAMPLING
    if not path.is_file():
        return None
    try:
        settings = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(settings, dict) or not {"scheduler", "steps", "guidance"} <= settings.keys():
        raise ValueError(f"{path}: expected a JSON object with 'scheduler', 'steps' and 'guidance' (as sample.py "
                         f"writes it), got {settings!r}")
    return settings


def describe_sampling(settings: dict | None) -> str:
    """How images were made, for reports: e.g. "pndm, 50 steps, guidance 7.5" (the paper's)."""
    if settings is None:
        return "an unrecorded sampler (no sampling.json)"
    return f"{settings['scheduler']}, {settings['steps']} steps, guidance {settings['guidance']:g}"


def sample_run(run: str | Path, steps: int = 50, guidance: float = 7.5, batch: int = 8,
               device: str | torch.device = "cpu", scheduler: str = "pndm") -> tuple[Path, Path]:
    """Generate a train.py run's test split: one image per test prompt with the run's best adapter on its own
    base model, into RUN/samples/ (plus prompts.txt, one line per image in file-name order, and sampling.json),
    and the real test images, preprocessed as in training, into RUN/real/. Returns (samples folder, real folder)."""
    run = Path(run)
    options = json.loads((run / "config.json").read_text(encoding="utf-8"))["options"]
    names = data.read_split(run / "split.json")["test"]
    if not names:
        raise ValueError(f"{run / 'split.json'}: the test part is empty; nothing to generate")
    dataset = data.load_dataset(options["dataset"], json.loads((run / "split.json").read_text())["data"],
                                empty_findings=options["empty_findings"], per_subtype=options["per_subtype"],
                                seed=options.get("data_seed", options["seed"]), check_images=False)
    examples = data.select(dataset, names, run / "split.json")
    sd = load_model(options["model"], options["tokenizer"], options["seed"])
    load_adapter(sd, run / "best.safetensors")
    sd.to(device)
    prompts = [e.caption for e in examples]
    images = generate(sd, prompts, steps, guidance, options["seed"], options["size"], batch, scheduler=scheduler)
    write_images(images, run / "samples")
    write_sampling(run / "samples", scheduler, steps, guidance, 0.0, options["seed"], options["size"])
    write_images(torch.stack([data.load_image(e.path, options["size"]) for e in examples]), run / "real")
    with weights.atomic_write(run / "samples" / "prompts.txt", "w") as f:
        f.write("\n".join(p.replace("\n", " ") for p in prompts) + "\n")
    return run / "samples", run / "real"


def main(argv: list[str] | None = None) -> int:
    """Generate; 2 for input a user must fix (a bad option, file or adapter), said in one line."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="SD 1.5: a diffusers folder or a single-file .safetensors checkpoint "
                                   "(default: the embedded tiny random model)")
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
    p.add_argument("--size", type=cli.image_size, default=None, help="image size in pixels (default 224; 64 for the tiny model)")
    p.add_argument("--batch", type=cli.integer(1), default=8)
    p.add_argument("--adapter", help="a trained adapter file (best.safetensors from a train.py run) or a kohya-format "
                                     "LoRA file (best.kohya.safetensors, or one made by kohya's scripts)")
    p.add_argument("--force", action="store_true", help="apply --adapter even if it was trained on another base model")
    p.add_argument("--device", type=cli.device, default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)
    if args.eta and args.scheduler != "ddim":
        p.error(f"--eta {args.eta}: eta is DDIM's; give --scheduler ddim, or leave --eta out")

    try:
        if args.prompt is not None:
            texts = [args.prompt]
        else:
            texts = [line.strip() for line in Path(args.prompts).read_text(encoding="utf-8").splitlines() if line.strip()]
            if not texts:
                raise ValueError(f"--prompts {args.prompts}: no prompt in it (one per line expected)")
        if not args.model:
            print("No --model given: using the embedded tiny random model, which shows the mechanics, not image "
                  "quality.", file=sys.stderr)
        sd = load_model(args.model, args.tokenizer)
        size = args.size or (224 if args.model else 64)
        if size % sd.latent_factor:
            raise ValueError(f"--size {size}: must be a multiple of {sd.latent_factor}, this model's VAE factor")
        if args.adapter:
            load_adapter(sd, args.adapter, args.force)
    except (ValueError, OSError) as err:  # the message names the option or file
        print(f"error: {err}", file=sys.stderr)
        return 2
    sd.to(args.device)
    images = generate(sd, texts, args.steps, args.guidance, args.seed, size, args.batch, args.eta,
                      scheduler=args.scheduler)
    paths = write_images(images, Path(args.out))
    write_sampling(Path(args.out), args.scheduler, args.steps, args.guidance, args.eta, args.seed, size)
    print(f"wrote {len(paths)} images and grid.png to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
