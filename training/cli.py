"""What the command lines (train.py, sample.py, eval_fid.py, reproduce.py) share: option types that refuse
out-of-range values when the command line is parsed, with the option's name and the allowed range, so no
long work starts on input that can only fail later.

argparse reports a refused value as "argument --batch: must be >= 1, got 0" and exits with status 2, the
status every command uses for input a user must fix.
"""
from __future__ import annotations

import argparse
import math

import torch

SEEDS = 2 ** 32  # seeds are 0 .. 2^32 - 1


def flag(dest: str) -> str:
    """The command-line flag of an option's argparse dest: "max_rank" -> "--max-rank"."""
    return "--" + dest.replace("_", "-")


def integer(low: int, high: int | None = None):
    """An argparse type: an integer in [low, high]."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < low or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"must be {f'between {low} and {high}' if high else f'>= {low}'}, "
                                             f"got {value}")
        return value
    return parse


def number(low: float, inclusive: bool = True):
    """An argparse type: a finite float >= low (> low when not inclusive)."""
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if not math.isfinite(value) or value < low or (value == low and not inclusive):
            raise argparse.ArgumentTypeError(f"must be a finite number {'>=' if inclusive else '>'} {low:g}, "
                                             f"got {text}")
        return value
    return parse


def image_size(text: str) -> int:
    """An argparse type: an image size, a positive multiple of SD 1.5's VAE factor 8."""
    value = integer(8)(text)
    if value % 8:
        raise argparse.ArgumentTypeError(f"must be a multiple of 8 (the VAE's downsampling factor), got {value}")
    return value


def device(text: str) -> str:
    """An argparse type: a torch device that this machine has."""
    try:
        dev = torch.device(text)
    except RuntimeError as err:
        raise argparse.ArgumentTypeError(f"{text!r} is not a torch device ({err})") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise argparse.ArgumentTypeError(f"{text}: CUDA is not available here (torch {torch.__version__}"
                                         + (", a CPU-only build" if torch.version.cuda is None else "") + "); use --device cpu")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise argparse.ArgumentTypeError(f"{text}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise argparse.ArgumentTypeError(f"{text}: MPS is not available here; use --device cpu")
    return text
