"""Domain metrics for the tiny model's images: a small CNN (the "reader") that reads a caption's attributes back
from an image, trained on the generated images of one domain (data/shapes.py or data/phantoms.py).

Inception features suit 32-pixel shapes and phantoms poorly, so, as medical image-synthesis papers use a
feature extractor of their own domain, we use the reader's:
- its penultimate features (`Reader.features`, 64 dimensions), scaled to one length, give a Fréchet distance and
  KID through eval_fid's own code: "phantom-FID" (eval_fid.py --reader). Bounded features keep a few saturated
  images from outweighing the rest;
- its predictions give **caption adherence**, the CLIP score's analogue: the share of generated images whose
  every attribute named in their prompt is read back (`adherence`), with each attribute's own accuracy and
  bootstrap 95% intervals (metrics/intervals.py).
Readers are trained by tools/pretrain_tiny.py and committed in assets/readers/.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageFilter
from torch import nn

from data import phantoms, shapes
from metrics import intervals
from model.weights import load_file, load_metadata, load_strict, save_file

DOMAINS = {"shapes": shapes, "phantoms": phantoms}  # each: ATTRIBUTES, caption, parse, random_attributes, draw
SIZE = 32  # the reader's input size; images of another size are resized to it
ASSETS = Path(__file__).resolve().parents[1] / "assets" / "readers"


class Reader(nn.Module):
    """Four strided convolutions, a 64-wide feature layer, and one linear head per attribute."""

    def __init__(self, domain: str, width: int = 64):
        super().__init__()
        self.domain = domain
        self.attributes = DOMAINS[domain].ATTRIBUTES
        c = width // 2
        self.body = nn.Sequential(
            nn.Conv2d(3, c, 3, padding=1), nn.SiLU(), nn.Conv2d(c, c, 3, stride=2, padding=1), nn.SiLU(),
            nn.Conv2d(c, 2 * c, 3, padding=1), nn.SiLU(), nn.Conv2d(2 * c, 2 * c, 3, stride=2, padding=1), nn.SiLU(),
            nn.Conv2d(2 * c, 4 * c, 3, stride=2, padding=1), nn.SiLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
            nn.Linear(4 * c, width), nn.SiLU())
        self.heads = nn.ModuleDict({k: nn.Linear(width, len(v)) for k, v in self.attributes.items()})

    def penultimate(self, images: torch.Tensor) -> torch.Tensor:
        """(N, 64) penultimate activations of images (N, 3, H, W) in [-1, 1], what the heads read."""
        if images.shape[-1] != SIZE or images.shape[-2] != SIZE:
            images = F.interpolate(images, size=(SIZE, SIZE), mode="bilinear", antialias=True, align_corners=False)
        return self.body(images)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """(N, 64) bounded features for FID and KID: the penultimate activations scaled to length sqrt(64) = 8, so
        that every image lies on one sphere (no image weighs more than a distance of 16) and KID's kernel
        (a.b / d + 1)^3 sees a.b / d of order 1, as with Inception's features."""
        h = self.penultimate(images)
        return F.normalize(h, dim=1) * h.shape[1] ** 0.5

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        h = self.penultimate(images)
        return {k: head(h) for k, head in self.heads.items()}

    @torch.no_grad()
    def read(self, images: torch.Tensor) -> list[dict[str, str]]:
        """Each image's attributes as read: the most likely value of each."""
        logits = self(images)
        return [{k: self.attributes[k][int(logits[k][i].argmax())] for k in self.attributes} for i in range(len(images))]


def to_tensor(im: Image.Image) -> torch.Tensor:
    """A PIL image as (3, H, W) in [-1, 1] (greyscale repeated over the channels)."""
    a = torch.from_numpy(np.asarray(im.convert("RGB"), dtype=np.float32)).permute(2, 0, 1)
    return a / 127.5 - 1


def labels(domain: str, attrs: dict[str, str]) -> dict[str, int]:
    """Class index of each attribute; -100 (ignored by cross-entropy) for one the caption does not name."""
    table = DOMAINS[domain].ATTRIBUTES
    return {k: table[k].index(attrs[k]) if k in attrs else -100 for k in table}


def train_reader(domain: str, steps: int = 1500, batch: int = 64, seed: int = 0, lr: float = 2e-3,
                 log=print) -> Reader:
    """A reader trained on freshly drawn images of `domain`, blurred and noised at random so that it reads
    generated images (softer than drawn ones) as well; every training combination and, for shapes, the
    held-out ones too, since it is a measuring instrument, not the model under test."""
    torch.manual_seed(seed)
    rng, module = np.random.default_rng(seed), DOMAINS[domain]
    reader = Reader(domain)
    opt = torch.optim.AdamW(reader.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, lr, total_steps=steps)
    for step in range(steps):
        images, targets = [], {k: [] for k in module.ATTRIBUTES}
        for _ in range(batch):
            attrs = (module.random_attributes(rng, rng.random() < 0.125) if domain == "shapes"
                     else module.random_attributes(rng))
            im = module.draw(rng, SIZE, attrs).filter(ImageFilter.GaussianBlur(rng.uniform(0, 0.8)))
            images.append(to_tensor(im))
            for k, v in labels(domain, attrs).items():
                targets[k].append(v)
        x = torch.stack(images)
        x = x + torch.randn_like(x) * rng.uniform(0, 0.08)
        logits = reader(x)
        loss = sum(F.cross_entropy(logits[k], torch.tensor(t)) for k, t in targets.items())
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if step % 250 == 0 or step == steps - 1:
            log(f"reader {domain}: step {step}, loss {loss.item():.4f}")
    return reader.eval()


def save_reader(reader: Reader, path: str | os.PathLike) -> None:
    save_file({k: v.contiguous() for k, v in reader.state_dict().items()}, path,
              {"domain": reader.domain, "attributes": json.dumps(reader.attributes)})


def asset(domain: str) -> Path:
    """The committed reader of `domain`: assets/readers/<domain>.safetensors."""
    return ASSETS / f"{domain}.safetensors"


def load_reader(path: str | os.PathLike, domain: str | None = None) -> Reader:
    """A reader saved by `save_reader` (of `domain` where given); a file that is not one (missing, truncated,
    another domain's, weights that are not finite) is refused with a line naming it."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such reader file (expected a .safetensors written by "
                                "tools/pretrain_tiny.py, e.g. assets/readers/phantoms.safetensors)")
    found, expected = load_metadata(path).get("domain"), [domain] if domain else sorted(DOMAINS)
    if found not in expected:
        raise ValueError(f"{path}: not a reader file of {' or '.join(expected)} (its metadata 'domain' is {found!r})")
    reader = Reader(found)
    return load_strict(reader, load_file(path), path).eval()


def hits(reader: Reader, images: torch.Tensor, prompts: list[str]) -> dict[str, np.ndarray]:
    """Per image, whether what is read back matches its prompt: "all" (every attribute the prompt names), and per
    attribute over the images whose prompts name it. For phantoms also "lobe": the finding over the prompts that
    name a lobe (chance 1 in 4), apart from telling an opacity from none."""
    if len(images) != len(prompts):
        raise ValueError(f"adherence: {len(images)} images but {len(prompts)} prompts")
    parse = DOMAINS[reader.domain].parse
    wanted = [parse(p) for p in prompts]
    read = [r for start in range(0, len(images), 64) for r in reader.read(images[start:start + 64])]
    out = {"all": np.array([all(got[k] == v for k, v in want.items()) for want, got in zip(wanted, read)])}
    for k in reader.attributes:
        if any(k in w for w in wanted):
            out[k] = np.array([got[k] == want[k] for want, got in zip(wanted, read) if k in want])
    if reader.domain == "phantoms":
        out["lobe"] = np.array([got["finding"] == want["finding"] for want, got in zip(wanted, read)
                                if want["finding"] in phantoms.PHANTOM_LOBES])
    return out


def adherence(reader: Reader, images: torch.Tensor, prompts: list[str], resamples: int = intervals.RESAMPLES,
              seed: int = 0) -> dict:
    """Share of images whose every attribute named in their prompt is read back ("adherence"), and each
    attribute's own accuracy, each with its bootstrap 95% interval."""
    found = hits(reader, images, prompts)
    every = found.pop("all")
    return {"adherence": float(every.mean()), "interval": intervals.mean_interval(every, resamples, seed),
            "per_attribute": {k: float(v.mean()) for k, v in found.items() if len(v)},
            "per_attribute_interval": {k: intervals.mean_interval(v, resamples, seed) for k, v in found.items() if len(v)},
            "images": len(images)}


def chance(domain: str, prompts: list[str]) -> float:
    """The adherence a reader that reads every image right gives when each image is scored against another
    image's prompt: the share of ordered pairs (i, j), i != j, whose prompt j names only what image i shows."""
    parse = DOMAINS[domain].parse
    attrs = [parse(p) for p in prompts]
    agree = [all(truth.get(k) == v for k, v in want.items()) for i, truth in enumerate(attrs)
             for j, want in enumerate(attrs) if i != j]
    return float(np.mean(agree))
