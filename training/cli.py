"""What the command lines (train.py, sample.py, eval_fid.py, reproduce.py) share: option types that refuse
out-of-range values when the command line is parsed, with the option's name and the allowed range, so no
long work starts on input that can only fail later; and text that must be UTF-8 (`utf8`, `read_text`: a prompt).

argparse reports a refused value as "argument --batch: must be >= 1, got 0" and exits with status 2, the
status every command uses for input a user must fix.
"""
from __future__ import annotations

import argparse
import math
import os
from pathlib import Path

import torch

from model.sampling import MAX_GUIDANCE

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


def number(low: float, inclusive: bool = True, high: float | None = None):
    """An argparse type: a finite float >= low (> low when not inclusive), and <= high where given."""
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if (not math.isfinite(value) or value < low or (value == low and not inclusive)
                or (high is not None and value > high)):
            raise argparse.ArgumentTypeError(f"must be a finite number {'>=' if inclusive else '>'} {low:g}"
                                             + (f" and <= {high:g}" if high is not None else "") + f", got {text}")
        return value
    return parse


# classifier-free guidance: beyond MAX_GUIDANCE the guided noise estimate overflows into black images
guidance = number(0.0, high=MAX_GUIDANCE)


def utf8(text: str) -> str:
    """An argparse type: text that is UTF-8. Python keeps a command-line byte that is not UTF-8 as a lone
    surrogate (PEP 383), which fails only later, when the text is encoded; refused here with its byte offset."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        offset, char = len(text[:err.start].encode("utf-8")), ord(text[err.start])
        what = f"byte 0x{char - 0xDC00:02x}" if 0xDC80 <= char <= 0xDCFF else f"character U+{char:04X}"
        raise argparse.ArgumentTypeError(f"not UTF-8 text: {what} at byte offset {offset}") from None
    return text


def read_text(path: str | os.PathLike, option: str) -> str:
    """A UTF-8 text file given as `option` (e.g. a --prompts file); one that is not UTF-8 is refused naming the
    option, the file and the offset of its first byte that is not."""
    data = Path(path).read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(f"{option} {path}: not UTF-8 text: byte 0x{data[err.start]:02x} at byte offset "
                         f"{err.start}") from None


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
