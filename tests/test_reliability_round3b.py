"""Reliability, round three (issue 35), cases 6 to 12: a full disk, reproduce.py's grids and its study folder's
lock, eval_fid.py's numbers, sample.py's --out, and a lock file with a malformed pid. Cases 1 to 5:
tests/test_reliability_round3.py."""
import errno
import json
import os
import resource
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from data import phantoms
from model import sampling
from training import run_folder
import eval_fid
import reproduce
import sample
import train
from test_reliability import exits_2
from test_reliability_round2 import error_line, lock_file, small_run

ROOT = Path(__file__).resolve().parent.parent
RUN = ["--phantoms", "16", "--epochs", "1", "--batch", "8", "--samples", "0", "--size", "16"]
SAMPLE = ["--steps", "1", "--size", "16"]


# ---------------------------------------------------------------- 6. a full disk

@pytest.mark.parametrize("limit", [0, 600])  # the lock file cannot be written; the lock can, config.json cannot
def test_a_full_disk_at_the_start_names_the_path_and_leaves_nothing_that_blocks_the_next_run(tmp_path, limit):
    out = tmp_path / "run"
    argv = ["--out", str(out), *RUN]

    def small_disk():  # files may not grow past `limit` bytes: writes fail as on a full disk (EFBIG, not ENOSPC)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    done = subprocess.run([sys.executable, str(ROOT / "train.py"), *argv], cwd=ROOT, capture_output=True, text=True,
                          preexec_fn=small_disk)
    assert done.returncode == 2, done.stderr
    line = error_line(done.stderr)
    assert "File too large" in line and (f"{out}/.lock." in line if limit == 0 else f"{out / 'config.json'}" in line)
    assert not out.exists()  # no lock, no half-made folder
    assert train.main([*argv, "--stop-after", "1"]) == 0  # the same command, once there is room


def test_a_full_disk_during_the_export_is_one_line_and_resume_finishes_the_run(tmp_path, capsys, monkeypatch):
    data_dir, out, argv = small_run(tmp_path)
    export_best, fsync = train.export_best, os.fsync

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    def export_on_a_full_disk(*args):
        monkeypatch.setattr(os, "fsync", full)
        try:
            return export_best(*args)
        finally:
            monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(train, "export_best", export_on_a_full_disk)
    assert train.main(argv) == 1
    assert error_line(capsys.readouterr().err) == (
        f"error: No space left on device: {out / 'best.kohya.safetensors'}; the run is not finished. Make room, then "
        f"finish it with --resume {out}")
    assert not (out / "summary.json").exists() and not list(out.glob(".*.tmp"))
    monkeypatch.undo()
    assert train.main(["--resume", str(out)]) == 0 and (out / "summary.json").is_file()


# ---------------------------------------------------------------- 7. reproduce.py's grids, before any run

def no_training(*args, **kwargs):
    raise AssertionError("reproduce.py started the study")


@pytest.mark.parametrize("option, value", [  # (--data-seed, --epochs, --size, --batch: train.py's parser refused them)
    ("--lambdas", "0.5"), ("--ts", "0"), ("--lam", "0.9"), ("--t", "-1"), ("--seeds", "-1"), ("--ablation-seeds", "-2"),
    ("--kid-subsets", "0"), ("--grid-prompts", "0"),
])
def test_reproduce_checks_its_numbers_before_any_run(tmp_path, capsys, monkeypatch, option, value):
    monkeypatch.setattr(reproduce, "train_run", no_training)
    err = exits_2(capsys, ["--smoke", "--out", str(tmp_path / "s"), option, value], reproduce.main)
    assert f"argument {option}: must be" in err and not (tmp_path / "s").exists()


# ---------------------------------------------------------------- 8. one study at a time on a study folder

def test_a_second_reproduce_on_one_out_exits_2_at_once(tmp_path, capsys, monkeypatch):
    study = tmp_path / "s"
    monkeypatch.setattr(reproduce, "train_run", no_training)
    first = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])  # the study holding the lock
    try:
        study.mkdir()
        (study / "lock").write_text(json.dumps({"pid": first.pid, "host": socket.gethostname(), "token": "t",
                                                "command": "reproduce.py"}))
        err = exits_2(capsys, ["--smoke", "--out", str(study)], reproduce.main)
    finally:
        first.kill()
    assert error_line(err) == (f"error: {study}: in use by reproduce.py (pid {first.pid} on {socket.gethostname()}), "
                               f"which holds {study / 'lock'}; wait for it to end. If that process has stopped, "
                               f"remove {study / 'lock'}")
    assert sorted(p.name for p in study.iterdir()) == ["lock"]  # no data, no runs, no report


def test_a_run_another_command_finished_is_not_called_failed(tmp_path, monkeypatch):
    args = reproduce.parse_args(["--smoke", "--out", str(tmp_path / "s")])
    run = reproduce.plan(args)[0]

    def refused_while_another_finishes(command, **kwargs):  # train.py exits 2: the run's lock is held meanwhile
        reproduce.folder(args, run).mkdir(parents=True)
        (reproduce.folder(args, run) / "summary.json").write_text("{}")
        return subprocess.CompletedProcess(command, 2)
    monkeypatch.setattr(reproduce.subprocess, "run", refused_while_another_finishes)
    assert reproduce.train_run(args, run) == "done"


# ---------------------------------------------------------------- 9. eval_fid.py's numbers

@pytest.mark.parametrize("option, value", [
    ("--kid-subsets", "0"), ("--kid-subsets", "-1"), ("--batch-size", "0"), ("--batch-size", "-3"),
    ("--kid-subset-size", "1"), ("--seed", "-1"),
])
def test_eval_fid_checks_its_numbers_when_parsed(tmp_path, capsys, option, value):
    images = phantoms.make_phantom_folder(tmp_path / "images", n=4, size=32, seed=1)
    with pytest.raises(SystemExit) as stop:
        eval_fid.main(["--real", str(images), "--fake", str(images), "--reader",
                       str(eval_fid.readback.ASSETS / "phantoms.safetensors"), option, value])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and f"argument {option}: must be" in err and f"got {value}" in err


# ---------------------------------------------------------------- 10, 11. sample.py's --out

def test_sample_py_replaces_the_images_of_its_own_folder(tmp_path, capsys):
    out, prompts = tmp_path / "i", tmp_path / "prompts.txt"
    prompts.write_text("a red circle\na blue square\na green triangle\n")
    assert sample.main(["--prompts", str(prompts), "--out", str(out), *SAMPLE]) == 0
    assert sample.main(["--prompt", "a red circle", "--out", str(out), *SAMPLE, "--seed", "5"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["00000.png", "grid.png", sampling.SETTINGS]
    assert sampling.read_settings(out)["seed"] == 5  # it describes every image there
    (out / "mine.png").write_bytes((out / "00000.png").read_bytes())
    err = exits_2(capsys, ["--prompt", "x", "--out", str(out), *SAMPLE], sample.main)
    assert "holds images sample.py did not make (mine.png)" in err and (out / "mine.png").is_file()


def test_sample_py_checks_that_out_is_writable_before_generating(tmp_path, capsys, monkeypatch):
    out = tmp_path / "i"
    out.mkdir()
    real_open = os.open

    def read_only(path, flags, *args, **kwargs):
        if Path(path).parent == out and flags & os.O_CREAT:
            raise OSError(errno.EROFS, "Read-only file system", str(path))
        return real_open(path, flags, *args, **kwargs)
    monkeypatch.setattr(os, "open", read_only)
    monkeypatch.setattr(sample, "generate", no_training)
    err = exits_2(capsys, ["--prompt", "a red circle", "--out", str(out), *SAMPLE], sample.main)
    assert error_line(err).startswith(f"error: --out {out}: cannot write there (Read-only file system: {out}/")


# ---------------------------------------------------------------- 12. a lock with a malformed pid

@pytest.mark.parametrize("pid", [99999999999999999999, 0, -1, True, 2 ** 31])
def test_a_lock_with_a_malformed_pid_is_refused_in_one_line(tmp_path, capsys, pid):
    out = tmp_path / "run"
    run_folder.write_config(out, vars(train.resolve(["--out", str(out), *RUN])), True, 1)  # a run to resume
    lock_file(out, pid, socket.gethostname())
    err = error_line(exits_2(capsys, ["--resume", str(out)]))
    assert err == (f"error: {out / 'lock'}: a lock file that is not one this project wrote (pid {pid!r}: a process id "
                   f"is an integer from 1 to {2 ** 31 - 1}); if no command is using {out}, remove {out / 'lock'}")
    assert json.loads((out / "lock").read_text())["pid"] == pid  # left alone
