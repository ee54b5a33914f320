"""A finished train.py run's held-out test split as images: what FID and the CLIP score (tables 1 and 2) compare.

One image per test prompt is generated with the run's best adapter on its own base model, as the paper's
were made (model/sampling.py's default: SD 1.5's PNDM, 50 steps, guidance 7.5), into RUN/samples/ with its
prompts.txt and sampling.json, and adapter.json last: the sha256 of the best.safetensors that made them (a run
extended by --resume gets another, and its images are made again). The real test images, preprocessed as in
training, go to RUN/real/. eval_fid.py --runs and reproduce.py both generate through `ensure_test_split`.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch

from data import datasets, splits
from model import sampling
from model.sd15 import generate, load_model
from model.weights import atomic_write
from training import method_table, run_folder, sheets

SAMPLES, REAL, PROMPTS = "samples", "real", "prompts.txt"  # RUN/samples/prompts.txt: one line per image, in order
ADAPTER = "adapter.json"  # RUN/samples/adapter.json: {"file": "best.safetensors", "sha256": ...}, written last


def generate_test_split(run: str | os.PathLike, steps: int = 50, batch: int = 8, device: str | torch.device = "cpu",
                        scheduler: str = "pndm", guidance: float = sampling.GUIDANCE) -> tuple[Path, Path]:
    """Write RUN/samples/ (generated, with prompts.txt and sampling.json) and RUN/real/ (the held-out images);
    return the two folders."""
    run = Path(run)
    options = run_folder.read_options(run)
    root, split = run_folder.read_split(run)
    if not split["test"]:
        raise ValueError(f"{run / run_folder.SPLIT}: the test part is empty; nothing to generate")
    dataset = datasets.load_dataset(options["dataset"], root, empty_findings=options["empty_findings"],
                                per_subtype=options["per_subtype"], seed=options.get("data_seed", options["seed"]),
                                check_images=False)
    examples = splits.select(dataset, split["test"], run / run_folder.SPLIT)
    (run / SAMPLES / ADAPTER).unlink(missing_ok=True)  # until the new images are all written
    adapter = adapter_fingerprint(run)
    sd = load_model(options["model"], options["tokenizer"])
    method_table.load_adapter(sd, run / "best.safetensors")
    sd.to(device)
    prompts = [e.caption for e in examples]
    images = generate(sd, prompts, steps, guidance, options["seed"], options["size"], batch, scheduler=scheduler)
    sheets.write_images(images, run / SAMPLES)
    sampling.write_settings(run / SAMPLES, scheduler, steps, guidance, 0.0, options["seed"], options["size"])
    sheets.write_images(torch.stack([datasets.load_image(e.path, options["size"]) for e in examples]), run / REAL)
    with atomic_write(run / SAMPLES / PROMPTS, "w") as f:
        f.write("\n".join(p.replace("\n", " ") for p in prompts) + "\n")
    with atomic_write(run / SAMPLES / ADAPTER, "w") as f:
        json.dump(adapter, f)
    return run / SAMPLES, run / REAL


def adapter_fingerprint(run: Path) -> dict:
    """What RUN/samples/adapter.json records: the best adapter's file name and the sha256 of its bytes."""
    digest = hashlib.sha256()
    with open(run / "best.safetensors", "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return {"file": "best.safetensors", "sha256": digest.hexdigest()}


def made_by(folder: Path) -> dict | None:
    """RUN/samples/adapter.json, or None where it is missing or unreadable (the images are then made again)."""
    try:
        return json.loads((folder / ADAPTER).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None


def settings(scheduler: str, steps: int, guidance: float = sampling.GUIDANCE) -> dict:
    """What makes a test split's images, as sampling.json records it: the sampler, its steps, the guidance."""
    return {"scheduler": scheduler, "steps": steps, "guidance": guidance}


def ensure_test_split(run: str | os.PathLike, steps: int = 50, batch: int = 8, device: str | torch.device = "cpu",
                      scheduler: str = "pndm", guidance: float = sampling.GUIDANCE) -> bool:
    """Generate the run's test split (`generate_test_split`) unless RUN/samples/ holds it already, made with this
    sampler, steps and guidance (its sampling.json) by the run's best.safetensors as it is now (adapter.json;
    images from before sampling.json existed are kept as they are). True when it generated."""
    folder = Path(run) / SAMPLES
    made = sampling.read_settings(folder)
    wanted = settings(scheduler, steps, guidance)
    if (folder / PROMPTS).is_file() and (made is None or ({k: made[k] for k in wanted} == wanted
                                                          and made_by(folder) == adapter_fingerprint(Path(run)))):
        return False
    generate_test_split(run, steps, batch, device, scheduler, guidance)
    return True
