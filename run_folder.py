"""A train.py run folder: its layout, and the rules that keep a user's files safe.

    RUN/config.json         the options, "started" (false until start-up has succeeded), versions
    RUN/split.json          the names of the train, validation and test images (data.write_split)
    RUN/log.jsonl           one JSON line per step and per validation
    RUN/checkpoint/         adapters.safetensors + state.safetensors, replaced as a pair (checkpoint.tmp/,
                            checkpoint.old/ exist only for a moment)
    RUN/best.safetensors, last.safetensors, best.kohya.safetensors, summary.json, figures (*.png),
    RUN/previews/, phantoms/ (the embedded default's data), and, once evaluated, samples/, real/, scores.json

The rules (README, "Reliability"):
- A folder counts as a run folder when its config.json is one that train.py wrote. --overwrite replaces only
  such a folder, and removes only the entries above: anything else in it is left alone.
- --out may not be, contain or lie inside --data, --model, --tokenizer or --latent-cache.
- A run counts as started once its start-up (model, data, latents, adapters) has succeeded. A folder whose
  start-up never finished is replaced by the next run without --overwrite, and cannot be resumed.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

CONFIG = "config.json"
SPLIT = "split.json"
LOG = "log.jsonl"
CHECKPOINT, CHECKPOINT_TMP, CHECKPOINT_OLD = "checkpoint", "checkpoint.tmp", "checkpoint.old"
FIGURES = ("loss.png", "rank_growth.png", "memory.png", "rank_unet.png", "rank_text_encoder.png")
MADE = (CONFIG, SPLIT, LOG, CHECKPOINT, CHECKPOINT_TMP, CHECKPOINT_OLD, "summary.json", "best.safetensors",
        "last.safetensors", "best.kohya.safetensors", *FIGURES, "previews", "phantoms", "samples", "real",
        "scores.json")


class RunFolderError(ValueError):
    """A run folder that cannot be used as asked; the message says why and what to do."""


def read_config(run: str | os.PathLike) -> dict:
    """RUN/config.json, checked to be one that train.py wrote."""
    path = Path(run) / CONFIG
    if not path.is_file():
        raise RunFolderError(f"{run}: no {CONFIG} there: not a run folder made by train.py")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise RunFolderError(f"{path}: not valid JSON ({err}): not a run folder made by train.py") from None
    if not (isinstance(config, dict) and isinstance(config.get("options"), dict) and "method" in config["options"]):
        raise RunFolderError(f"{path}: has no train.py options: not a run folder made by train.py")
    return config


def is_run_folder(path: str | os.PathLike) -> bool:
    try:
        read_config(path)
        return True
    except RunFolderError:
        return False


def started(config: dict) -> bool:
    """Whether the run's start-up succeeded (configs written before this flag existed count as started)."""
    return config.get("started", True)


def _relation(a: Path, b: Path) -> str | None:
    """How folder a stands to path b: 'is', 'lies inside', 'contains', or None."""
    if a == b:
        return "is"
    if a.is_relative_to(b):
        return "lies inside"
    if b.is_relative_to(a):
        return "contains"
    return None


def check_out(out: str | os.PathLike, inputs: dict[str, str | os.PathLike | None]) -> None:
    """Refuse an --out that is, contains or lies inside one of the run's inputs ({option: path})."""
    target = Path(out).resolve()
    for option, path in inputs.items():
        if path is None:
            continue
        how = _relation(target, Path(path).resolve())
        if how:
            raise RunFolderError(f"--out {out} {how} {option} {path}: a run folder must be apart from its inputs "
                                 "(--overwrite would delete them); choose another --out")


def clear(run: Path) -> list[str]:
    """Remove what train.py and the evaluation write into a run folder; return the names of the other
    entries, which are kept."""
    kept = []
    for entry in sorted(run.iterdir()):
        if entry.name not in MADE:
            kept.append(entry.name)
        elif entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()
    return kept


def prepare(out: str | os.PathLike, overwrite: bool) -> Path:
    """Make the folder for a new run: new or empty, a run whose start-up never finished, or with --overwrite
    a run folder. Anything else is refused with the reason."""
    run = Path(out)
    if run.exists() and not run.is_dir():
        raise RunFolderError(f"--out {run}: is a file, not a folder")
    if run.is_dir() and any(run.iterdir()):
        if not is_run_folder(run):
            raise RunFolderError(f"--out {run}: the folder exists and is not a run folder (no {CONFIG} written by "
                                 "train.py); --overwrite replaces only run folders: choose another --out")
        fresh = not started(read_config(run))
        if not (fresh or overwrite):
            raise RunFolderError(f"--out {run}: run folder exists; give --overwrite to replace it or "
                                 f"--resume {run} to continue it")
        kept = clear(run)
        print(f"{run}: replacing {'a run whose start-up never finished' if fresh else 'the run folder'}"
              + (f"; kept what train.py did not write: {', '.join(kept)}" if kept else ""))
    run.mkdir(parents=True, exist_ok=True)
    return run


def last_checkpoint(run: Path) -> Path | None:
    """The folder of the run's last complete checkpoint, or None before the first one."""
    for folder in (run / CHECKPOINT, run / CHECKPOINT_OLD):  # .old: interrupted between the two renames
        if (folder / "state.safetensors").is_file():
            return folder
    return None


def read_log(run: Path, upto: float) -> list[dict]:
    """The log lines of steps <= upto (a resumed run rewrites what came after its checkpoint). A last line
    cut short by a kill mid-write is dropped; a broken line elsewhere is an error."""
    path = run / LOG
    if not path.is_file():
        return []
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    out = []
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            if i == len(lines):
                break  # written partly when the run was killed
            raise RunFolderError(f"{path}: line {i} is not valid JSON; it is not the last line, so the log was "
                                 "changed by hand or damaged") from None
        if entry["step"] <= upto:
            out.append(entry)
    return out
