"""Safetensors read and write, by hand, plus the atomic-write helper every output uses.

The format (https://github.com/huggingface/safetensors, "Format" section):
    8 bytes   N, the header length, unsigned little-endian
    N bytes   a JSON object: {name: {"dtype": "F32", "shape": [..], "data_offsets": [begin, end]}, ...}
              and an optional "__metadata__": {str: str}; padded with spaces
    rest      the tensors' raw little-endian bytes; offsets are relative to the start of this part

`load_file` memory-maps the file, so a 4 GB checkpoint is not read into memory twice:
tensors are views of the mapping (copy-on-write) until moved to another device or dtype.
Nothing is ever unpickled.
"""
from __future__ import annotations

import hashlib
import json
import os
import struct
import secrets
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Callable

import torch

DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool,
}
DTYPE_NAMES = {dtype: name for name, dtype in DTYPES.items()}
MAX_HEADER = 100_000_000  # the safetensors library's own limit
MAX_COUNT = 2 ** 63 - 1  # shapes and offsets must fit a signed 64-bit count (torch's)

if sys.byteorder != "little":  # the format is little-endian and we read it by reinterpretation
    raise ImportError("model/weights.py reads safetensors by reinterpreting bytes and needs a little-endian machine")


class _DuplicateKey(Exception):
    pass


def _no_duplicate_keys(pairs: list[tuple[str, object]]) -> dict:
    """json.loads hook: a JSON object naming one key twice is refused (json keeps the last silently)."""
    out = {}
    for key, value in pairs:
        if key in out:
            raise _DuplicateKey(repr(key))
        out[key] = value
    return out


def _is_count(value: object) -> bool:
    """A non-negative JSON integer (JSON's true/false are Python bools, which are ints: refused)."""
    return type(value) is int and 0 <= value <= MAX_COUNT


def read_header(path: str | os.PathLike) -> tuple[dict, dict[str, str], int]:
    """Return (tensor entries, metadata, byte offset of the data part) of a safetensors file, checked."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            raise ValueError(f"{path}: truncated safetensors file ({size} bytes, need at least 8 for the header length)")
        (n,) = struct.unpack("<Q", prefix)
        if n > MAX_HEADER or 8 + n > size:
            raise ValueError(f"{path}: header length {n} runs past the end of the file ({size} bytes): truncated or not a safetensors file")
        raw = f.read(n)
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicate_keys)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{path}: the header is not valid JSON ({err})") from None
    except _DuplicateKey as err:
        raise ValueError(f"{path}: the header names {err} twice") from None
    if not isinstance(header, dict):
        raise ValueError(f"{path}: the header must be a JSON object, got {type(header).__name__}")
    metadata = header.pop("__metadata__", None)
    metadata = {} if metadata is None else metadata
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise ValueError(f"{path}: '__metadata__' must be an object mapping strings to strings, got {metadata!r:.80}")
    data_start, data_size = 8 + n, size - 8 - n
    spans = []
    for name, entry in header.items():
        if not isinstance(entry, dict) or not {"dtype", "shape", "data_offsets"} <= entry.keys():
            raise ValueError(f"{path}: key '{name}': entry must have dtype, shape and data_offsets, got {entry!r}")
        if entry["dtype"] not in DTYPES:
            raise ValueError(f"{path}: key '{name}': unknown dtype {entry['dtype']!r} (known: {', '.join(DTYPES)})")
        shape, offsets = entry["shape"], entry["data_offsets"]
        if not (isinstance(shape, list) and all(_is_count(d) for d in shape)):
            raise ValueError(f"{path}: key '{name}': shape must be a list of non-negative integers, got {shape!r}")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_count(o) for o in offsets)):
            raise ValueError(f"{path}: key '{name}': data_offsets must be [begin, end], non-negative integers, "
                             f"got {offsets!r}")
        begin, end = offsets
        if not begin <= end <= data_size:
            raise ValueError(f"{path}: key '{name}': data_offsets {offsets} out of range (data part is {data_size} bytes)")
        numel = 1
        for d in shape:
            numel *= d
            if d > MAX_COUNT or numel > MAX_COUNT:
                raise ValueError(f"{path}: key '{name}': shape {shape} has more elements than a 64-bit count holds")
        expected = numel * DTYPES[entry["dtype"]].itemsize
        if end - begin != expected:
            raise ValueError(f"{path}: key '{name}': shape {shape} of {entry['dtype']} needs {expected} bytes, "
                             f"data_offsets give {end - begin}")
        spans.append((begin, end, name))
    # the tensors tile the data part exactly, as the format requires: no overlap, no gap, nothing after the last
    position, previous = 0, None
    for begin, end, name in sorted(spans):
        if begin < position:
            raise ValueError(f"{path}: keys '{previous}' and '{name}' overlap (bytes {begin}-{position})")
        if begin > position:
            raise ValueError(f"{path}: key '{name}': {begin - position} unused bytes before its data (offset {begin}, "
                             f"previous tensor ends at {position})")
        position, previous = end, name
    if position != data_size:
        raise ValueError(f"{path}: {data_size - position} bytes after the last tensor's data: truncated header "
                         "or trailing garbage")
    return header, metadata, data_start


def load_file(path: str | os.PathLike, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """Load every tensor of a safetensors file; memory-mapped on the CPU."""
    header, _, data_start = read_header(path)
    size = Path(path).stat().st_size
    storage = torch.UntypedStorage.from_file(os.fspath(path), shared=False, nbytes=size)
    raw = torch.empty(0, dtype=torch.uint8).set_(storage)
    tensors = {}
    for name, entry in header.items():
        dtype = DTYPES[entry["dtype"]]
        begin, end = (data_start + o for o in entry["data_offsets"])
        chunk = raw[begin:end]
        if begin % dtype.itemsize:  # unaligned: a view would be refused, so copy
            chunk = chunk.clone()
        tensors[name] = chunk.view(dtype).reshape(entry["shape"]).to(device)
    return tensors


def load_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The `__metadata__` strings of a safetensors file, without reading any tensor."""
    return read_header(path)[1]


@contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "wb"):
    """Open a temporary file beside `path`; on success rename it over `path`, on failure remove it.

    Readers never see a half-written file, and an existing file survives a crash mid-write. The file is
    created as open() creates one (mode 0666 less the umask), so a shared run folder stays readable to
    whom the user's umask allows; tempfile.mkstemp would make it 0600. A failed write (a full disk) names `path`.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        tmp = path.parent / f".{path.name}.{secrets.token_hex(6)}.tmp"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
            break
        except FileExistsError:
            continue
    try:
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        tmp.unlink(missing_ok=True)
        if isinstance(err, OSError) and err.errno is not None and err.filename is None:  # write(), fsync()
            raise OSError(err.errno, err.strerror, str(path)) from None
        raise


def check_writable(folder: str | os.PathLike, what: str) -> None:
    """Make `folder` (and its parents) if missing and write a file into it, so that a command whose output
    cannot go there (a read-only file system, no permission) stops before its work, naming `what`."""
    folder = Path(folder)
    probe = folder / f".write-test.{secrets.token_hex(6)}"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
        probe.unlink()
    except OSError as err:
        raise ValueError(f"{what}: cannot write there ({err.strerror or err}: {err.filename or folder})") from None


def check_finite(source: str | os.PathLike, key: str, tensor: torch.Tensor, consequence: str = "") -> None:
    """Refuse a floating tensor that holds a NaN or an infinity, naming its file and key, where weights are
    loaded: one NaN weight makes every output NaN (black images, a NaN loss at the first step)."""
    if tensor.is_floating_point() and not tensor.isfinite().all():
        raise ValueError(f"{source}: key '{key}' holds NaN or infinite values{consequence}")


def save_file(tensors: dict[str, torch.Tensor], path: str | os.PathLike, metadata: dict[str, str] | None = None) -> None:
    """Write tensors (moved to the CPU) to a safetensors file, atomically."""
    if metadata is not None and not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
        raise ValueError(f"{path}: metadata must map strings to strings")
    for name, t in tensors.items():
        if not isinstance(name, str) or name == "__metadata__":
            raise ValueError(f"{path}: tensor name {name!r}: names must be strings other than '__metadata__', "
                             "which the format reserves for the metadata")
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{path}: key '{name}' is a {type(t).__name__}, not a tensor")
        if t.dtype not in DTYPE_NAMES:
            raise ValueError(f"{path}: key '{name}' has dtype {t.dtype}, which safetensors cannot store here")
    # Largest element size first keeps every tensor aligned to its own size, as the safetensors library does.
    names = sorted(tensors, key=lambda k: (-tensors[k].dtype.itemsize, k))
    header, offset = {}, 0
    for name in names:
        t = tensors[name]
        nbytes = t.numel() * t.dtype.itemsize
        header[name] = {"dtype": DTYPE_NAMES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    if metadata:
        header = {"__metadata__": dict(metadata), **header}
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)
    with atomic_write(path) as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for name in names:
            t = tensors[name].detach().to("cpu").contiguous()
            f.write(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")


def fingerprint(tensors: dict[str, torch.Tensor], samples: int = 4096) -> str:
    """A short hash of named tensors: every name, shape and dtype, and up to `samples` evenly spaced values
    of each tensor, in float64 on the CPU.

    Cheap at any model size (no pass over all weights) and the same on every device, yet any real change
    of weights (another VAE, a fine-tuned UNet) changes it: such changes move every weight. Used to key the
    latent cache by the VAE's content and to tie an adapter to the base model it was trained on.
    """
    digest = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach()
        flat = t.reshape(-1)
        picked = flat[::max(1, flat.numel() // samples)].to("cpu", torch.float64)
        digest.update(f"{name}|{tuple(t.shape)}|{t.dtype}|".encode())
        digest.update(picked.numpy().tobytes())
    return digest.hexdigest()[:16]


def read_json(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from None


def part_config(given, file: Path, read: Callable, part: str, beside: bool = True):
    """The one rule every model part's loader follows for its configuration; returns (config, hint).

    When `beside` (the weights are in a layout that keeps its config.json beside them: diffusers', transformers')
    and that config.json exists, it is the configuration (`read(dict, source)` turns it into one, naming the file
    in its errors), and a `given` config must equal it. Otherwise the configuration is `given`, or None for the loader's default (SD 1.5's); the hint,
    for load_strict's error, then names the missing config.json.
    """
    config_file = file.parent / "config.json"
    if not beside:
        return given, ""
    if not config_file.is_file():
        return given, "" if given is not None else (f"{config_file} is missing, so SD 1.5's {part} configuration was "
                                                    "assumed; a model of another shape needs its config.json beside "
                                                    "the weights")
    try:
        found = read(read_json(config_file), config_file)
    except (KeyError, TypeError) as err:
        raise ValueError(f"{config_file}: not a {part} configuration ({type(err).__name__}: {err})") from None
    if given is not None and given != found:
        raise ValueError(f"{config_file}: describes {found}, but {given} was given")
    return found, ""


def resolve_component(path: str | os.PathLike, subfolder: str, filenames: tuple[str, ...]) -> Path:
    """Find one model part's weights file.

    `path` may be the file itself, a diffusers pipeline folder (with `subfolder/` inside), or that
    subfolder. `filenames` are tried in order (e.g. the fp32 file before the `.fp16` one).
    """
    path = Path(path)
    if path.is_file():
        if path.suffix in (".ckpt", ".pt", ".pth", ".bin"):
            raise ValueError(f"{path}: pickled checkpoints are not loaded (unpickling can run code); "
                             "use the .safetensors version of this file")
        return path
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file or folder")
    for folder in (path / subfolder, path):
        for name in filenames:
            if (folder / name).is_file():
                return folder / name
    raise FileNotFoundError(f"{path}: found none of {', '.join(filenames)} in it or in its '{subfolder}/' folder")


def load_strict(module: torch.nn.Module, state: dict[str, torch.Tensor], source: str | os.PathLike,
                dtype: torch.dtype | None = None, hint: str = "") -> torch.nn.Module:
    """Copy `state` into `module`, refusing missing keys, unexpected keys, shape mismatches and values that are
    not finite (`check_finite`).

    Floating tensors are cast to `dtype` (default: the module's own dtype, fp32 unless changed),
    so an fp16 file loads into an fp32 model unless asked otherwise. `hint` ends the error message (e.g.
    that a missing config.json made the loader assume SD 1.5's configuration).
    """
    if dtype is not None:
        module.to(dtype)
    own = module.state_dict()
    missing = sorted(own.keys() - state.keys())
    unexpected = sorted(state.keys() - own.keys())
    shapes = sorted(f"{k}: file {tuple(state[k].shape)}, model {tuple(own[k].shape)}"
                    for k in own.keys() & state.keys() if state[k].shape != own[k].shape)
    if missing or unexpected or shapes:
        def listing(title, items):
            if not items:
                return ""
            more = f"\n    ... and {len(items) - 20} more" if len(items) > 20 else ""
            return f"\n  {title} ({len(items)}):\n    " + "\n    ".join(items[:20]) + more
        raise ValueError(f"{source}: weights do not match {type(module).__name__}:"
                         + listing("missing keys", missing) + listing("unexpected keys", unexpected)
                         + listing("shape mismatches", shapes) + (f"\n  {hint}" if hint else ""))
    with torch.no_grad():
        for name, target in own.items():
            target.copy_(state[name])  # copy_ casts, e.g. fp16 file -> fp32 model
            check_finite(source, name, target, f" (as {target.dtype}); {type(module).__name__} would compute NaN")
    return module
