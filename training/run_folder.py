"""A train.py run folder: its layout, and the rules that keep a user's files safe.

    RUN/config.json         the options, "started" (false until start-up has succeeded), versions
    RUN/split.json          the names of the train, validation and test images (splits.write_split)
    RUN/log.jsonl           one JSON line per step and per validation
    RUN/checkpoint/         adapters.safetensors + state.safetensors, replaced as a pair (checkpoint.tmp/,
                            checkpoint.old/ exist only for a moment; one a kill left is cleaned before use)
    RUN/lock                the process writing into the folder (pid, host), while it runs (`lock`)
    RUN/best.safetensors, last.safetensors, best.kohya.safetensors, summary.json, figures (*.png),
    RUN/previews/, phantoms/ (the embedded default's data), and, once evaluated, samples/, real/, scores.json

The rules (docs/reliability.md):
- A folder counts as a run folder when its config.json is one that train.py wrote. --overwrite replaces only
  such a folder, and removes only the entries above: anything else in it is left alone.
- --out may not be, contain or lie inside --data, --model, --tokenizer or --latent-cache.
- A run counts as started once its start-up (model, data, latents, adapters) has succeeded. A folder whose
  start-up never finished is replaced by the next run without --overwrite, and cannot be resumed.
- A resumed run keeps its options; only those in RESUMABLE may change (`resume_options`).
- One command at a time writes into a run folder: train.py, --resume, eval_fid.py --runs and reproduce.py hold
  RUN/lock while they do (`lock`).
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import shutil
import socket
import subprocess
import time
from pathlib import Path
from typing import Iterator

import torch

from data import datasets, splits
from model.weights import atomic_write
from training import cli, method_table

CONFIG = "config.json"
SPLIT = "split.json"
LOG = "log.jsonl"
CHECKPOINT, CHECKPOINT_TMP, CHECKPOINT_OLD = "checkpoint", "checkpoint.tmp", "checkpoint.old"
LOCK = "lock"
# the lock's own files beside it, each there only for a moment (`lock`): one a kill left never makes a folder foreign
LOCK_FILES = re.compile(rf"{LOCK}|\.{LOCK}\.[0-9a-f]{{16}}|\.{LOCK}\.[0-9a-f]{{12}}\.stale")
MAX_PID = 2 ** 31 - 1  # pids are positive 32-bit integers (pid_t)
FIGURES = ("loss.png", "rank_growth.png", "memory.png", "rank_unet.png", "rank_text_encoder.png")
MADE = (CONFIG, SPLIT, LOG, CHECKPOINT, CHECKPOINT_TMP, CHECKPOINT_OLD, "summary.json", "best.safetensors",
        "last.safetensors", "best.kohya.safetensors", *FIGURES, "previews", "phantoms", "samples", "real",
        "scores.json")


# options a resumed run may change; every other option given with --resume must equal the run's own
RESUMABLE = ("epochs", "device", "checkpoint_every", "timeout", "stop_after", "samples", "scheduler", "sample_steps",
             "guidance", "latent_cache", "gradient_checkpointing", "compile", "compile_mode", "fast_test_step",
             "allow_data_change")
# options of one invocation: a resumed run takes today's, not the saved ones
INVOCATION = ("timeout", "stop_after", "allow_data_change")
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
    split = splits.read_split(path)  # checked
    return Path(json.loads(path.read_text(encoding="utf-8"))["data"]), split


def check_data(run: Path, dataset: datasets.DataSet, split: dict[str, list[str]], allow: bool) -> None:
    """Refuse to resume on data changed since the run started (splits.changes against split.json's fingerprints),
    listing the changes; with `allow` (--allow-data-change) take them, recorded in split.json with the new
    fingerprints. Splits written before fingerprints existed are not checked."""
    path = run / SPLIT
    payload = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(payload.get("fingerprints"), dict):
        return
    now = splits.fingerprints(dataset.examples)
    found = splits.changes(payload["fingerprints"], now)
    if not found:
        return
    listed = "; ".join(found[:20]) + (f"; and {len(found) - 20} more" if len(found) > 20 else "")
    if not allow:
        raise RunFolderError(f"--resume {run}: the data changed since the run started ({len(found)} change(s) against "
                             f"{path}): {listed}. Put the data back as it was, or give --allow-data-change to train on "
                             "it as it is now (added images stay out of the split)")
    print(f"{run}: training on changed data (--allow-data-change), recorded in {path}: {listed}")
    payload["data_changes"] = [*payload.get("data_changes", []), {"time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                                                                  "changes": found}]
    write_json(path, {**payload, "fingerprints": now})


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
    options = {**options, "resume": None, "overwrite": False, "stop_after": None, "allow_data_change": False}
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
    if epochs != saved["epochs"] and method_table.TABLE[saved["method"]].over_total_steps:
        raise RunFolderError(f"--resume {run}: {saved['method']}'s schedule is laid out over the run's total steps, so "
                             f"its --epochs cannot change when it resumes; start a new run with --epochs {epochs}")
    if given.get("compile") and saved["max_rank"] is None and method_table.TABLE[saved["method"]].compiled_max_rank:
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
    entries, which are kept. The lock (held by the caller) stays."""
    kept = []
    for entry in sorted(run.iterdir()):
        if LOCK_FILES.fullmatch(entry.name):
            continue
        if entry.name not in MADE:
            kept.append(entry.name)
        elif entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()
    return kept


def _holds_more_than_a_lock(run: Path) -> bool:
    """Whether `run` is a folder holding anything but the lock's own files (LOCK_FILES)."""
    return run.is_dir() and any(not LOCK_FILES.fullmatch(e.name) for e in run.iterdir())


def _check_may_write(run: Path) -> None:
    """Refuse a --out that is a file, or a non-empty folder train.py did not make."""
    if run.exists() and not run.is_dir():
        raise RunFolderError(f"--out {run}: is a file, not a folder")
    if _holds_more_than_a_lock(run) and not is_run_folder(run):
        raise RunFolderError(f"--out {run}: the folder exists and is not a run folder (no {CONFIG} written by "
                             "train.py); --overwrite replaces only run folders: choose another --out")


def prepare(out: str | os.PathLike, overwrite: bool) -> Path:
    """Make the folder for a new run (its `lock` held): new or empty, a run whose start-up never finished, or with
    --overwrite a run folder. Anything else is refused with the reason."""
    run = Path(out)
    _check_may_write(run)
    if _holds_more_than_a_lock(run):
        fresh = not started(read_config(run))
        if not (fresh or overwrite):
            raise RunFolderError(f"--out {run}: run folder exists; give --overwrite to replace it or "
                                 f"--resume {run} to continue it")
        kept = clear(run)
        print(f"{run}: replacing {'a run whose start-up never finished' if fresh else 'the run folder'}"
              + (f"; kept what train.py did not write: {', '.join(kept)}" if kept else ""))
    run.mkdir(parents=True, exist_ok=True)
    return run


# ------------------------------------------------------------------------------------------ the lock

def _holder(path: Path) -> dict | None:
    """The lock's {pid, host, command, token}, or None where it is gone (released meanwhile)."""
    try:
        holder = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (UnicodeDecodeError, json.JSONDecodeError):
        holder = None
    ours = isinstance(holder, dict) and isinstance(holder.get("host"), str)
    pid = holder.get("pid") if ours else None
    if not (type(pid) is int and 0 < pid <= MAX_PID):  # else os.kill would overflow, or signal a process group
        why = f" (pid {pid!r}: a process id is an integer from 1 to {MAX_PID})" if ours else ""
        raise RunFolderError(f"{path}: a lock file that is not one this project wrote{why}; if no command is using "
                             f"{path.parent}, remove {path}")
    return holder


def _gone(holder: dict) -> bool:
    """Whether the lock's process has ended: only knowable for a process on this machine."""
    if holder["host"] != socket.gethostname():
        return False
    try:
        os.kill(holder["pid"], 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # another user's process: it runs
        return False
    return False


def _take_over(path: Path, holder: dict) -> None:
    """Remove the lock of a process that has ended, unless another command took it over first."""
    aside = path.with_name(f".{LOCK}.{secrets.token_hex(6)}.stale")
    try:
        os.rename(path, aside)  # one of several commands taking over the same lock gets it
    except FileNotFoundError:
        return
    if _holder(aside) == holder:
        print(f"{path.parent}: taking over the lock of process {holder['pid']} on {holder['host']} "
              f"({holder.get('command', '?')}), which no longer runs")
    else:  # the lock a quicker command had just made: put it back
        with contextlib.suppress(FileExistsError):
            os.link(aside, path)
    os.unlink(aside)


@contextlib.contextmanager
def lock(out: str | os.PathLike, command: str, study: bool = False) -> Iterator[Path]:
    """Hold RUN/lock while `command` writes into the run folder (made if missing). A second writer is refused
    naming the holder's pid and host; a lock whose process has ended on this machine is taken over, with a line.
    study: the folder is reproduce.py's study folder, not a run folder (which must be new, empty or train.py's).
    A lock that cannot be written (a full disk) is refused naming it, and a refused command leaves nothing.

    The lock file is written whole beside RUN/lock and hard-linked to that name: link() fails when the name
    exists, atomically, on local file systems and on NFS (the usual NFS-safe lock file; a link whose reply was
    lost is confirmed by the link count). The process of a lock held on another machine cannot be checked: if
    that machine stopped, remove RUN/lock by hand, as the refusal says."""
    run = Path(out)
    if not study:
        _check_may_write(run)
    made = [folder for folder in (run, *run.parents) if not folder.exists()]  # removed again if left empty
    run.mkdir(parents=True, exist_ok=True)
    path = run / LOCK
    me = {"pid": os.getpid(), "host": socket.gethostname(), "command": command, "token": secrets.token_hex(8)}
    mine = run / f".{LOCK}.{me['token']}"
    try:
        try:
            _write_lock_file(mine, me)
            while True:
                try:
                    os.link(mine, path)
                    break
                except FileExistsError:
                    pass
                except OSError:
                    if mine.stat().st_nlink == 2:
                        break
                    raise
                holder = _holder(path)
                if holder is None:
                    continue
                if not _gone(holder):
                    raise RunFolderError(f"{run}: in use by {holder.get('command', 'another command')} (pid "
                                         f"{holder['pid']} on {holder['host']}), which holds {path}; wait for it to "
                                         f"end. If that process has stopped, remove {path}")
                _take_over(path, holder)
        finally:
            mine.unlink(missing_ok=True)
    except BaseException:
        _remove_empty(made)
        raise
    try:
        yield run
    finally:
        with contextlib.suppress(RunFolderError):
            if _holder(path) == me:
                path.unlink()
        _remove_empty(made)


def _write_lock_file(path: Path, me: dict) -> None:
    """The lock's content, written whole before it is linked into place; a full disk is named here."""
    try:
        path.write_text(json.dumps(me), encoding="utf-8")
    except OSError as err:
        raise RunFolderError(f"{path.parent}: cannot write its lock file {path} ({err.strerror or err}); make room "
                             "there, or choose another folder") from None


def _remove_empty(folders: list[Path]) -> None:
    """Remove the folders a command made (innermost first) that it left empty: a refused command leaves nothing."""
    for folder in folders:
        with contextlib.suppress(OSError):
            folder.rmdir()


def last_checkpoint(run: Path) -> Path | None:
    """The folder of the run's last complete checkpoint, or None before the first one."""
    for folder in (run / CHECKPOINT, run / CHECKPOINT_OLD):  # .old: interrupted between the two renames
        if (folder / "state.safetensors").is_file():
            return folder
    return None


def recover_checkpoint(run: Path) -> None:
    """Leave RUN/checkpoint/ as the one checkpoint, whatever instruction of checkpoint.save_training_state a kill
    interrupted: a leftover checkpoint.tmp/ (incomplete or not yet renamed) is removed, and checkpoint.old/ is
    removed where checkpoint/ is complete, or renamed back to checkpoint/ where the kill came between the two
    renames."""
    final, old = run / CHECKPOINT, run / CHECKPOINT_OLD
    shutil.rmtree(run / CHECKPOINT_TMP, ignore_errors=True)
    if not (final / "state.safetensors").is_file() and (old / "state.safetensors").is_file():
        shutil.rmtree(final, ignore_errors=True)
        old.rename(final)
    shutil.rmtree(old, ignore_errors=True)


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
