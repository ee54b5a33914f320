"""A train.py run folder: its layout, and the rules that keep a user's files safe.

    RUN/config.json         the options, "started" (false until start-up has succeeded), versions
    RUN/split.json          the names of the train, validation and test images (data.write_split)
    RUN/log.jsonl           one JSON line per step and per validation
    RUN/checkpoint/         adapters.safetensors + state.safetensors, replaced as a pair (checkpoint.tmp/,
                            checkpoint.old/ exist only for a moment)
    RUN/best.safetensors, last.safetensors, best.kohya.safetensors, summary.json, figures (*.png),
    RUN/previews/, phantoms/ (the embedded default's data), and, once evaluated, samples/, real/, scores.json

The rules (docs/reliability.md):
- A folder counts as a run folder when its config.json is one that train.py wrote. --overwrite replaces only
  such a folder, and removes only the entries above: anything else in it is left alone.
- --out may not be, contain or lie inside --data, --model, --tokenizer or --latent-cache.
- A run counts as started once its start-up (model, data, latents, adapters) has succeeded. A folder whose
  start-up never finished is replaced by the next run without --overwrite, and cannot be resumed.
- A resumed run keeps its options; only those in RESUMABLE may change (`resume_options`).
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import torch

import cli
import data
import methods
from weights import atomic_write

CONFIG = "config.json"
SPLIT = "split.json"
LOG = "log.jsonl"
CHECKPOINT, CHECKPOINT_TMP, CHECKPOINT_OLD = "checkpoint", "checkpoint.tmp", "checkpoint.old"
FIGURES = ("loss.png", "rank_growth.png", "memory.png", "rank_unet.png", "rank_text_encoder.png")
MADE = (CONFIG, SPLIT, LOG, CHECKPOINT, CHECKPOINT_TMP, CHECKPOINT_OLD, "summary.json", "best.safetensors",
        "last.safetensors", "best.kohya.safetensors", *FIGURES, "previews", "phantoms", "samples", "real",
        "scores.json")


# options a resumed run may change; every other option given with --resume must equal the run's own
RESUMABLE = ("epochs", "device", "checkpoint_every", "timeout", "stop_after", "samples", "scheduler", "sample_steps",
             "latent_cache", "gradient_checkpointing", "compile")
INVOCATION = ("timeout", "stop_after")  # options of one invocation: a resumed run takes today's, not the saved ones
PATHS = ("model", "tokenizer", "data", "latent_cache", "out")  # compared as resolved paths on resume


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


def read_options(run: str | os.PathLike) -> dict:
    """The train.py options a run was made with (RUN/config.json's "options")."""
    return read_config(run)["options"]


def read_split(run: str | os.PathLike) -> tuple[Path, dict[str, list[str]]]:
    """The data folder the run was split from, and its split: image names per part (RUN/split.json)."""
    path = Path(run) / SPLIT
    split = data.read_split(path)  # checked
    return Path(json.loads(path.read_text(encoding="utf-8"))["data"]), split


def write_json(path: Path, payload: dict) -> None:
    with atomic_write(path, "w") as f:
        json.dump(payload, f, indent=1)


def code_version() -> str:
    """`git describe` of this code, for config.json; "unknown" outside a git checkout."""
    try:
        out = subprocess.run(["git", "describe", "--always", "--dirty"], cwd=Path(__file__).parent,
                             capture_output=True, text=True, timeout=10)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def write_config(run: Path, options: dict, started: bool, world_size: int) -> None:
    """RUN/config.json: the run's options (those of one invocation, like --stop-after, left out), whether its
    start-up has succeeded, and versions. A resumed run with unchanged options leaves the file as it is."""
    options = {**options, "resume": None, "overwrite": False, "stop_after": None}
    config = {"options": options, "started": started, "world_size": world_size, "seed": options["seed"]}
    if (run / CONFIG).is_file():
        old = read_config(run)
        if {k: old.get(k) for k in config} == json.loads(json.dumps(config)):
            return
    write_json(run / CONFIG, {**config, "code_version": code_version(), "torch": torch.__version__})


def resume_options(run: Path, config: dict, defaults: dict, given: dict, today: dict) -> dict:
    """The options a resumed run trains with: its config.json's (`config`; options added to train.py since take
    their `defaults`), with the RESUMABLE options `given` on the command line and today's INVOCATION options.
    Any other option given with a value other than the run's is refused, all of them listed; --epochs can only
    grow, and not for a method whose schedule is laid out over the run's total steps (AdaLoRA)."""
    if not started(config):
        raise RunFolderError(f"--resume {run}: this run's start-up never finished (bad data or model?), so there is "
                             "nothing to resume; start it again with the options you want (the folder is replaced "
                             "without --overwrite)")
    saved = {**defaults, "data_seed": config["options"].get("seed"), **config["options"]}

    def same(key: str, a, b) -> bool:
        if key in PATHS and a is not None and b is not None:
            return Path(a).resolve() == Path(b).resolve()
        return a == b or (isinstance(a, (list, tuple)) and list(a) == list(b or []))
    differ = [f"{cli.flag(k)} {v!r} (the run's is {saved.get(k)!r})" for k, v in given.items()
              if k not in RESUMABLE and not same(k, v, run if k == "out" else saved.get(k))]
    if differ:
        raise RunFolderError(f"--resume {run}: these options differ from the run's config.json and cannot change in a "
                             f"resumed run: {'; '.join(differ)}. Leave them out, or start a new run with another --out")
    epochs = given.get("epochs", saved["epochs"])
    if epochs < saved["epochs"]:
        raise RunFolderError(f"--resume {run}: --epochs {epochs} is below the run's {saved['epochs']}; --epochs can "
                             "only extend a run")
    if epochs != saved["epochs"] and methods.TABLE[saved["method"]].over_total_steps:
        raise RunFolderError(f"--resume {run}: {saved['method']}'s schedule is laid out over the run's total steps, so "
                             f"its --epochs cannot change when it resumes; start a new run with --epochs {epochs}")
    if given.get("compile") and saved["max_rank"] is None and methods.TABLE[saved["method"]].compiled_max_rank:
        raise RunFolderError(f"--resume {run} --compile: this {saved['method']} run was started without --max-rank, so "
                             "its ranks have no limit and cannot be stored at the fixed capacity --compile needs; "
                             "resume it without --compile")
    return {**saved, **{k: today[k] for k in INVOCATION}, **{k: v for k, v in given.items() if k in RESUMABLE},
            "resume": str(run), "out": str(run), "overwrite": False}


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
