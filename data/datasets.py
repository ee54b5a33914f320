"""Image-caption data sets of the paper and their preprocessing (appendix B.1); the split is data/splits.py.

Four layouts are read into one list of `Example`s (image path, caption, name, group):
    folder        images with metadata.jsonl / metadata.csv (file_name, text), or a same-named .txt beside each
    iu-xray       indiana_reports.csv + indiana_projections.csv joined on uid, Frontal images, findings as prompt
    montgomery    CXR_png/MCUCXR_####_Y.png + ClinicalReadings/MCUCXR_####_Y.txt, "age:27, gender:Female, findings:..."
    patchgastric  captions.csv (id, subtype, text) + patches {id}_{hash}.jpg, optionally the appendix C.2 sample

Problems with one example (image missing or unreadable, empty caption) skip it and are counted in
`DataSet.skipped`; problems with the data set as a whole (missing files or columns, paths escaping the
folder, nothing usable left) raise ValueError naming the file. Every image is decoded once by `load_dataset`,
so a truncated file is found before training rather than in the middle of an epoch.

Each example has a group (the report's uid, the gastric slide id, a Montgomery reading's "same pt as" reference),
over which the split is drawn (data/splits.py).
"""
from __future__ import annotations

import csv
import io
import json
import os
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")
SPLIT_NAMES = ("train", "validation", "test")
PAPER_SPLITS = {  # the paper's section 3.4 and appendix C.2
    "folder": (0.8, 0.16, 0.04), "iu-xray": (0.8, 0.16, 0.04), "montgomery": (0.8, 0.0, 0.2),
    "patchgastric": (0.7, 0.1, 0.2),
}
GASTRIC_SUBTYPES = (  # appendix C.2, spelled as in captions.csv
    "Moderately differentiated tubular adenocarcinoma",
    "Well differentiated tubular adenocarcinoma",
    "Moderately to poorly differentiated adenocarcinoma",
    "Poorly differentiated adenocarcinoma, solid type",
    "Poorly differentiated adenocarcinoma, non-solid type",
)
GENDERS = {"M": "Male", "F": "Female", "O": "Other"}


@dataclass(frozen=True)
class Example:
    path: Path      # the image file
    caption: str
    name: str       # path relative to the data folder, POSIX style: the key used by the split
    group: str      # examples sharing a group land in the same split


@dataclass
class DataSet:
    kind: str
    root: Path
    examples: list[Example]
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (file, "reason (detail)")

    def skipped_counts(self) -> dict[str, int]:
        """How many examples were skipped for each reason (the detail in parentheses left out)."""
        return _reason_counts(self.skipped)


def _reason_counts(skipped: list[tuple[str, str]]) -> dict[str, int]:
    return dict(Counter(reason.split(" (")[0] for _, reason in skipped).most_common())


# ---------------------------------------------------------------- reading the layouts

def _inside(root: Path, file_name: str, source: Path) -> Path:
    """Resolve `file_name` from a metadata file against `root`, rejecting anything that leaves it."""
    pure = PurePosixPath(file_name.replace("\\", "/"))
    if pure.is_absolute() or re.match(r"^[A-Za-z]:", file_name) or ".." in pure.parts or not pure.parts:
        raise ValueError(f"{source}: file_name {file_name!r} must be a relative path inside {root} (no absolute path, no '..')")
    path = root.joinpath(*pure.parts)
    if not path.resolve().is_relative_to(root.resolve()):  # a symlink pointing out
        raise ValueError(f"{source}: file_name {file_name!r} resolves outside {root}")
    return path


def _read_text(path: Path, encoding: str = "utf-8") -> str:
    """A text file's contents; bytes that are not `encoding` are an error naming the file and the line."""
    raw = path.read_bytes()
    try:
        return raw.decode(encoding)
    except UnicodeDecodeError as err:
        line = raw[:err.start].count(b"\n") + 1
        raise ValueError(f"{path}: line {line} is not valid UTF-8 (byte {raw[err.start]:#04x} at offset {err.start}); "
                         "save the file as UTF-8") from None


def _read_csv(path: Path, required: tuple[str, ...]) -> list[dict[str, str]]:
    if not path.is_file():
        raise ValueError(f"{path}: file not found")
    reader = csv.DictReader(io.StringIO(_read_text(path, "utf-8-sig"), newline=""))
    columns = [c.strip() for c in reader.fieldnames or []]
    missing = [c for c in required if c not in columns]
    if missing:
        raise ValueError(f"{path}: missing column(s) {', '.join(missing)}; expected {', '.join(required)}, "
                         f"found {', '.join(columns) or 'no header'}")
    return [{k.strip(): (v or "").strip() for k, v in row.items() if k is not None} for row in reader]


def _read_jsonl(path: Path) -> list[dict]:
    rows = []
    for i, line in enumerate(_read_text(path).splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}: line {i} is not valid JSON ({err})") from None
        if not isinstance(row, dict) or not {"file_name", "text"} <= row.keys():
            raise ValueError(f"{path}: line {i} must be an object with keys file_name and text, got {line.strip()[:80]!r}")
        if not isinstance(row["file_name"], str) or not isinstance(row["text"], (str, type(None))):
            raise ValueError(f"{path}: line {i}: file_name and text must be strings")
        rows.append({"file_name": row["file_name"], "text": (row["text"] or "").strip()})
    return rows


def _add(examples: list, skipped: list, root: Path, path: Path, caption: str, group: str | None = None) -> None:
    """Append an example, or record why it is skipped (missing image, empty caption)."""
    name = path.relative_to(root).as_posix()
    if not path.is_file():
        skipped.append((str(path), "image missing"))
    elif not caption.strip():
        skipped.append((str(path), "empty caption"))
    else:
        examples.append(Example(path, " ".join(caption.split()), name, group or name))


def read_folder(root: Path) -> tuple[list[Example], list[tuple[str, str]]]:
    """metadata.jsonl or metadata.csv (file_name, text) in `root`, else a .txt caption beside each image."""
    examples, skipped = [], []
    jsonl, csv_file = root / "metadata.jsonl", root / "metadata.csv"
    if jsonl.is_file() and csv_file.is_file():
        raise ValueError(f"{root}: both metadata.jsonl and metadata.csv present; keep one")
    if jsonl.is_file() or csv_file.is_file():
        source = jsonl if jsonl.is_file() else csv_file
        rows = _read_jsonl(jsonl) if jsonl.is_file() else _read_csv(csv_file, ("file_name", "text"))
        for row in rows:
            _add(examples, skipped, root, _inside(root, row["file_name"], source), row["text"])
        return examples, skipped
    images = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    captions = [p.with_suffix(".txt") for p in images]
    if not any(c.is_file() for c in captions):
        raise ValueError(f"{root}: no metadata.jsonl, metadata.csv or .txt captions beside the images "
                         f"({len(images)} image(s) found)")
    for image, caption in zip(images, captions):
        for path in (image, caption):  # a symlink pointing out of the folder, as _inside refuses it
            if path.exists() and not path.resolve().is_relative_to(root.resolve()):
                raise ValueError(f"{path}: resolves outside {root} (a symbolic link pointing out of the data folder)")
        if not caption.is_file():
            skipped.append((str(image), f"no caption file ({caption.name})"))
            continue
        try:
            text = caption.read_bytes().decode("utf-8")
        except UnicodeDecodeError as err:
            skipped.append((str(image), f"caption not UTF-8 ({caption.name}, byte offset {err.start})"))
            continue
        _add(examples, skipped, root, image, text)
    return examples, skipped


def read_iu_xray(root: Path, empty_findings: str = "skip") -> tuple[list[Example], list[tuple[str, str]]]:
    """Frontal images of IU X-Ray with their report's findings; `empty_findings` is 'skip' or 'impression'."""
    if empty_findings not in ("skip", "impression"):
        raise ValueError(f"empty_findings must be 'skip' or 'impression', got {empty_findings!r}")
    reports = {r["uid"]: r for r in _read_csv(root / "indiana_reports.csv", ("uid", "findings", "impression"))}
    projections = _read_csv(root / "indiana_projections.csv", ("uid", "filename", "projection"))
    folders = [root / "images" / "images_normalized", root / "images" / "images"]
    folder = next((d for d in folders if d.is_dir()), None)
    if folder is None:
        raise ValueError(f"{root}: no image folder; expected {folders[0]} or {folders[1]}")
    examples, skipped = [], []
    for row in projections:
        if row["projection"] != "Frontal":
            continue
        path = _inside(folder, row["filename"], root / "indiana_projections.csv")
        report = reports.get(row["uid"])
        if report is None:
            skipped.append((str(path), f"uid not in indiana_reports.csv (uid {row['uid']})"))
            continue
        caption = report["findings"]
        if not caption and empty_findings == "impression":
            caption = report["impression"]
        if not caption:
            skipped.append((str(path), "empty findings" + (" and impression" if empty_findings == "impression" else "")))
            continue
        _add(examples, skipped, root, path, caption, group=f"uid{row['uid']}")
    return examples, skipped


def parse_clinical_reading(text: str, source: Path) -> str:
    """Montgomery reading -> the paper's prompt (figure 7): "age:27, gender:Female, findings:normal"."""
    sex = re.search(r"^\s*patient'?s\s+sex\s*:\s*([A-Za-z]*)", text, re.I | re.M)
    age = re.search(r"^\s*patient'?s\s+age\s*:\s*(\d+)", text, re.I | re.M)
    if not sex or not sex.group(1) or not age:
        raise ValueError(f"{source}: expected lines \"Patient's Sex: M|F|O\" and \"Patient's Age: 027Y\"")
    gender = GENDERS.get(sex.group(1)[0].upper(), sex.group(1))
    rest = [line.strip() for line in text.splitlines() if line.strip() and not re.match(r"\s*patient'?s\s+(sex|age)\s*:", line, re.I)]
    return f"age:{int(age.group(1))}, gender:{gender}, findings:{' '.join(rest)}"


def read_montgomery(root: Path) -> tuple[list[Example], list[tuple[str, str]]]:
    images_dir, readings_dir = root / "CXR_png", root / "ClinicalReadings"
    for d in (images_dir, readings_dir):
        if not d.is_dir():
            raise ValueError(f"{root}: folder {d.name}/ not found (expected CXR_png/ and ClinicalReadings/)")
    examples, skipped = [], []
    for path in sorted(images_dir.glob("*.png")):
        reading = readings_dir / f"{path.stem}.txt"
        if not reading.is_file():
            skipped.append((str(path), f"no clinical reading ({reading.name})"))
            continue
        raw = reading.read_bytes()
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            text = raw.decode("latin-1")
        try:
            caption = parse_clinical_reading(text, reading)
        except ValueError as err:
            skipped.append((str(path), f"bad clinical reading ({err})"))
            continue
        same = re.search(r"same pt as (MCUCXR_\d+_\d)", caption, re.I)  # one patient, one side of the split
        _add(examples, skipped, root, path, caption, group=f"CXR_png/{same.group(1).upper()}.png" if same else None)
    return examples, skipped


def read_patchgastric(root: Path, per_subtype: int | None = None, subtypes: tuple[str, ...] = GASTRIC_SUBTYPES,
                      seed: int = 0) -> tuple[list[Example], list[tuple[str, str]]]:
    """PatchGastricADC22 patches with their slide's caption; group = slide id.

    With `per_subtype` (appendix C.2: 1,000), draw that many patches of each of `subtypes` with `seed`.
    """
    captions = _read_csv(root / "captions.csv", ("id", "subtype", "text"))
    candidates = [root / "patches_captions" / "patches_captions", root / "patches_captions", root]
    folder = next((d for d in candidates if d.is_dir() and any(d.glob("*.jpg"))), None)
    if folder is None:
        raise ValueError(f"{root}: no patches {{id}}_{{hash}}.jpg in {', '.join(str(d) for d in candidates)}")
    by_slide: dict[str, list[Path]] = {}
    for path in sorted(folder.glob("*.jpg")):
        by_slide.setdefault(path.stem.rsplit("_", 1)[0], []).append(path)
    examples, skipped, pools = [], [], {}
    for row in captions:
        slides = by_slide.get(row["id"], [])
        if not slides:
            skipped.append((str(root / "captions.csv"), f"no patches for a slide (id {row['id']})"))
        for path in slides:
            count = len(examples)
            _add(examples, skipped, root, path, row["text"], group=row["id"])
            if len(examples) > count:
                pools.setdefault(row["subtype"], []).append(examples[-1])
    if per_subtype is None:
        return examples, skipped
    rng = np.random.default_rng(seed)
    chosen = []
    for subtype in subtypes:
        pool = pools.get(subtype, [])
        if len(pool) < per_subtype:
            raise ValueError(f"{root / 'captions.csv'}: subtype {subtype!r} has {len(pool)} usable patches, "
                             f"{per_subtype} requested (subtypes present: {', '.join(sorted(pools))})")
        chosen += [pool[i] for i in sorted(rng.choice(len(pool), per_subtype, replace=False))]
    return chosen, skipped


def load_dataset(kind: str, root: str | os.PathLike, *, empty_findings: str = "skip",
                 per_subtype: int | None = None, seed: int = 0, check_images: bool = True) -> DataSet:
    """Read one of the layouts; decode every image once (`check_images`) so unreadable ones are skipped now."""
    root = Path(root)
    if not root.is_dir():
        raise ValueError(f"{root}: {'not a folder' if root.exists() else 'data folder not found'} (--data names the "
                         f"folder of a {kind} data set)")
    if kind == "folder":
        examples, skipped = read_folder(root)
    elif kind == "iu-xray":
        examples, skipped = read_iu_xray(root, empty_findings)
    elif kind == "montgomery":
        examples, skipped = read_montgomery(root)
    elif kind == "patchgastric":
        examples, skipped = read_patchgastric(root, per_subtype, seed=seed)
    else:
        raise ValueError(f"unknown data set kind {kind!r}; expected one of {', '.join(PAPER_SPLITS)}")
    usable, seen = [], set()
    for e in examples:
        if e.name in seen:
            skipped.append((str(e.path), "listed twice (kept the first)"))
            continue
        seen.add(e.name)
        try:
            if check_images:
                with Image.open(e.path) as im:
                    image_to_array(im, e.path)
            usable.append(e)
        except (OSError, ValueError, Image.DecompressionBombError) as err:
            skipped.append((str(e.path), f"unreadable image ({type(err).__name__}: {err})"))
    examples = usable
    if not examples:
        detail = "; ".join(f"{n} x {reason}" for reason, n in _reason_counts(skipped).items()) or "no entries"
        first = f"; first: {skipped[0][0]}: {skipped[0][1]}" if skipped else ""
        raise ValueError(f"{root}: no usable image-caption pairs in this {kind} data set ({detail}){first}")
    return DataSet(kind, root, examples, skipped)


# ---------------------------------------------------------------- preprocessing (appendix B.1)

def image_to_array(im: Image.Image, source: str | os.PathLike = "<image>") -> np.ndarray:
    """PIL image -> float32 [H, W, C] in [0, 1], C = 1 or 3; 16-bit images are scaled by 65535, not clipped."""
    if im.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):  # PNG 16-bit greyscale opens as I;16 (or I)
        a = np.asarray(im, dtype=np.float32) / 65535.0
        if a.min() < 0 or a.max() > 1:
            raise ValueError(f"{source}: 32-bit integer image with values outside 0..65535")
        return a[..., None]
    if im.mode == "F":
        raise ValueError(f"{source}: floating-point images (mode F) have no defined range; convert to 8 or 16 bit")
    if im.mode in ("1", "L", "LA", "La"):
        im = im.convert("L")
    elif im.mode != "RGB":
        im = im.convert("RGB")
    a = np.asarray(im, dtype=np.float32) / 255.0
    return a[..., None] if a.ndim == 2 else a


def preprocess(im: Image.Image, size: int, source: str | os.PathLike = "<image>") -> torch.Tensor:
    """Appendix B.1: shorter side to `size` (bilinear, antialiased), centre crop, grey to 3 channels, [-1, 1].

    Sizes and crop offsets follow torchvision's Resize(size) + CenterCrop(size), so results match it.
    """
    x = torch.from_numpy(image_to_array(im, source)).permute(2, 0, 1)
    h, w = x.shape[1:]
    if min(h, w) != size:
        short, long = (h, w) if h <= w else (w, h)
        new_long = int(size * long / short)
        new = (size, new_long) if h <= w else (new_long, size)
        x = F.interpolate(x[None], size=new, mode="bilinear", align_corners=False, antialias=True)[0]
        h, w = new
    top, left = int(round((h - size) / 2.0)), int(round((w - size) / 2.0))
    x = x[:, top:top + size, left:left + size].clamp(0, 1)
    if x.shape[0] == 1:
        x = x.expand(3, -1, -1)
    return (x * 2 - 1).contiguous()


def load_image(path: str | os.PathLike, size: int) -> torch.Tensor:
    try:
        with Image.open(path) as im:
            return preprocess(ImageOps.exif_transpose(im), size, path)  # photos stored rotated, as diffusers does
    except (OSError, Image.DecompressionBombError) as err:
        raise ValueError(f"{path}: cannot read the image ({type(err).__name__}: {err})") from None
