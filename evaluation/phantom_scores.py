"""The embedded default's scores (train.py on the generated phantoms): the phantom reader's phantom-FID, KID and
caption adherence per attribute, each with its bootstrap 95% interval (metrics/intervals.py), for the model before
and after fine-tuning, beside what real phantoms score: the floor of phantom-FID and KID (two disjoint draws), the
adherence of real phantoms read against their own captions, and against each other's at chance.
"""
from __future__ import annotations

import argparse

import torch

from data import phantoms
from metrics import readback
from model import sampling
from model.sd15 import generate
import eval_fid

SCORED = dict(prompts=128, real=256, seed=10_007)  # drawn captions scored, real phantoms against, their seed


def scorer(args: argparse.Namespace):
    """The real phantoms' own scores (`reference_scores`: the floor of phantom-FID and KID, adherence read
    back and with shuffled captions), and a function of a model: its phantom-FID, KID and caption adherence
    (`domain_scores`, by the phantom reader) on SCORED["prompts"] freshly drawn phantom captions, against
    SCORED["real"] freshly drawn phantoms; the reader and the real sets are made once."""
    real_images, _ = phantoms.drawn(SCORED["real"], args.size, SCORED["seed"])
    drawn_images, prompts = phantoms.drawn(SCORED["prompts"], args.size, SCORED["seed"] + 1)
    real, drawn = (torch.stack([readback.to_tensor(im) for im in ims]).to(args.device)
                   for ims in (real_images, drawn_images))
    reader = readback.load_reader(readback.asset("phantoms"), "phantoms").to(args.device)
    reference = reference_scores(reader, real, drawn, prompts, args.seed)
    return reference, lambda sd: domain_scores(sd, reader, real, prompts, args.seed, args.size, args.sample_steps,
                                               args.scheduler, args.guidance)


def print_scores(scores: dict[str, dict]) -> None:
    """The embedded default's phantom scores, each with its bootstrap 95% interval: the real phantoms' (the
    bounds), then the model's before and after fine-tuning, with each attribute's accuracy."""
    def ci(value: float, bounds: list[float], fmt: str) -> str:
        return f"{value:{fmt}} [{bounds[0]:{fmt}}, {bounds[1]:{fmt}}]"
    for when, v in scores.items():
        iv = v["intervals"]
        print(f"{'real phantoms (a disjoint draw)' if when == 'real' else when + ' fine-tuning'}: "
              f"phantom-FID {ci(v['FID-phantoms'], iv['FID-phantoms'], '.2f')}, KID {ci(v['KID'], iv['KID'], '.4f')}, "
              f"adherence {ci(v['adherence'], iv['adherence'], '.3f')} ({v['images']} images of drawn phantom "
              "captions; 95% intervals)")
        shuffled = v.get("shuffled")
        print("    " + ", ".join(f"{k} {ci(x, iv[k], '.2f')}" for k, x in v["per_attribute"].items())
              + (f"; with shuffled captions {shuffled['adherence']:.3f} (chance {shuffled['chance']:.3f})"
                 if shuffled else ""))


@torch.no_grad()
def domain_scores(sd, reader: readback.Reader, real: torch.Tensor, prompts: list[str], seed: int, size: int,
                  steps: int = 50, scheduler: str = "pndm", guidance: float = sampling.GUIDANCE) -> dict:
    """Phantom-FID, KID and caption adherence, with intervals, of `sd`'s images of `prompts` against `real` images
    (N, 3, H, W) in [-1, 1], all by `reader` (metrics/readback.py): what train.py reports for the embedded
    default before and after fine-tuning."""
    images = generate(sd, prompts, steps, guidance, seed=seed, size=size, batch=32, progress=False,
                      scheduler=scheduler).to(sd.device)
    report = eval_fid.reader_scores(reader, eval_fid.features_of(reader, real.to(sd.device)), eval_fid.features_of(reader, images), images,
                           prompts, seed=seed)
    return {**flat_scores(report), "images": len(prompts), "real_images": len(real)}


def flat_scores(report: dict) -> dict:
    """A reader report's headline figures and their intervals, keyed as the tables' columns; per attribute too."""
    return {**eval_fid.flat_metrics(report), "per_attribute": report["adherence"]["per_attribute"],
            "intervals": eval_fid.intervals_of(report)}


@torch.no_grad()
def reference_scores(reader: readback.Reader, real: torch.Tensor, drawn: torch.Tensor, prompts: list[str],
                     seed: int) -> dict:
    """What real images score, the bounds a model's scores sit between:
    - "floor": FID and KID of `drawn` (real images drawn for `prompts`, disjoint from `real`) against `real`;
    - "adherence": the drawn images read against their own prompts (near 1 when the reader can be trusted);
    - "shuffled": against each other's prompts, rotated by one, beside "chance", the share the captions alone allow
      (readback.chance)."""
    report = eval_fid.reader_scores(reader, eval_fid.features_of(reader, real), eval_fid.features_of(reader, drawn), drawn, prompts, seed=seed)
    shuffled = readback.adherence(reader, drawn, prompts[1:] + prompts[:1], seed=seed)
    return {**flat_scores(report), "images": len(prompts), "real_images": len(real),
            "shuffled": {"adherence": shuffled["adherence"], "interval": shuffled["interval"],
                         "chance": readback.chance(reader.domain, prompts)}}
