"""Reliability, round two (issue 26): two commands on one run folder, kills at any instruction of a checkpoint,
divergence, data changed under a resumed run, stale test images, and the messages that named the wrong thing.
Runs are the embedded tiny model at 16 px on 6 phantoms: 2 steps an epoch."""
import contextlib
import hashlib
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch import nn

from data import datasets, splits
from methods import adapters
from model import weights
from evaluation import heldout
from training import checkpoint, method_table, run_folder
import eval_fid
import train
from test_reliability import exits_2, make_data

ROOT = Path(__file__).resolve().parent.parent
SMALL = ["--epochs", "1", "--batch", "4", "--t", "4", "--samples", "0", "--checkpoint-every", "1", "--size", "16"]


def small_run(tmp_path, *options, n=6):
    data_dir, out = make_data(tmp_path / "data", n=n), tmp_path / "run"
    return data_dir, out, ["--out", str(out), "--data", str(data_dir), *SMALL, *options]


def tensors_of(path) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in weights.load_file(path).items()}


def error_line(err: str) -> str:
    """The command's one error line (tqdm's progress bars share stderr)."""
    assert err.count("error: ") == 1 and "Traceback" not in err, err
    return "error: " + err.split("error: ", 1)[1].splitlines()[0]


def all_finite(path) -> bool:
    return all(v.isfinite().all() for v in tensors_of(path).values() if v.is_floating_point())


# ---------------------------------------------------------------- 1. one writer at a time

def test_a_second_train_py_and_a_resume_are_refused_while_a_run_trains(tmp_path, capsys):
    data_dir, out, argv = small_run(tmp_path)
    first = subprocess.Popen([sys.executable, str(ROOT / "train.py"), *argv], cwd=ROOT, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 900
        while not ((out / "config.json").is_file() and run_folder.read_config(out)["started"]):
            assert first.poll() is None, first.stdout.read()
            assert time.time() < deadline
            time.sleep(0.2)
        # the first is training: another run on its --out, even with --overwrite, and a resume of it, are refused
        err = exits_2(capsys, [*argv, "--seed", "7", "--overwrite"])
        assert f"{out}: in use by train.py (pid {first.pid} on {socket.gethostname()})" in err
        err = exits_2(capsys, ["--resume", str(out)])
        assert f"(pid {first.pid} on {socket.gethostname()})" in err
        output, _ = first.communicate(timeout=900)
    finally:
        first.kill()
    assert first.returncode == 0, output
    assert run_folder.read_config(out)["options"]["seed"] == 0
    steps = [json.loads(line)["step"] for line in (out / "log.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 2] and (out / "summary.json").is_file() and not (out / run_folder.LOCK).exists()


def lock_file(run: Path, pid: int, host: str) -> None:
    run.mkdir(exist_ok=True)
    (run / run_folder.LOCK).write_text(json.dumps({"pid": pid, "host": host, "command": "train.py", "token": "t"}))


def test_a_lock_left_by_a_dead_process_on_this_host_is_taken_over_and_others_are_not(tmp_path, capsys):
    run = tmp_path / "run"
    ended = subprocess.Popen([sys.executable, "-c", "pass"])
    ended.wait()
    lock_file(run, ended.pid, socket.gethostname())
    with run_folder.lock(run, "eval_fid.py --runs"):
        assert json.loads((run / run_folder.LOCK).read_text())["pid"] == os.getpid()
        with pytest.raises(run_folder.RunFolderError, match=f"pid {os.getpid()}"):  # not twice, even by itself
            with run_folder.lock(run, "train.py"):
                pass
    assert f"taking over the lock of process {ended.pid} on {socket.gethostname()}" in capsys.readouterr().out
    assert list(run.iterdir()) == []  # released, and nothing else left
    lock_file(run, 1, "another-machine")  # a process on another machine cannot be checked: refused
    with pytest.raises(run_folder.RunFolderError, match=r"pid 1 on another-machine.*remove .*lock"):
        with run_folder.lock(run, "train.py"):
            pass
    living = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        lock_file(run, living.pid, socket.gethostname())
        with pytest.raises(run_folder.RunFolderError, match=f"pid {living.pid}"):
            with run_folder.lock(run, "train.py"):
                pass
    finally:
        living.kill()
    assert (run / run_folder.LOCK).is_file()  # a refused command leaves the holder's lock alone


# ---------------------------------------------------------------- 2. a kill at any instruction of a checkpoint

class Killed(BaseException):
    """The process ends here: nothing after it runs (not an Exception, so no handler of the code catches it)."""


OPS = ("mkdir", "open", "fsync", "replace", "rename", "unlink", "rmdir")  # every file system step a checkpoint takes


@contextlib.contextmanager
def killed_when(should_die):
    """Record the file system operations run inside; from the first one for which should_die(ops) is true, every
    operation raises Killed, as if the process had died there."""
    ops, saved, dead = [], {name: getattr(os, name) for name in OPS}, [False]

    def wrap(name):
        def op(*args, **kwargs):
            ops.append(name)
            if dead[0] or should_die(ops):
                dead[0] = True
                raise Killed(f"{name} {args[:1]}")
            return saved[name](*args, **kwargs)
        return op
    for name in OPS:
        setattr(os, name, wrap(name))
    try:
        yield ops
    finally:
        for name, fn in saved.items():
            setattr(os, name, fn)


def training_state():
    """A small model with LoRA adapters after one Adam step: the arguments of checkpoint.save_training_state."""
    torch.manual_seed(0)
    model = nn.ModuleDict({"unet": nn.Sequential(nn.Linear(6, 5), nn.Linear(5, 4))})
    method = method_table.build("lora", r=2)
    named = adapters.inject(model, method.make_adapter)
    optimizer = torch.optim.Adam([p for a in named.values() for p in a.parameters() if p.requires_grad], lr=0.1)
    controller = method.controller(named, optimizer, 10)

    def step():
        optimizer.zero_grad()
        model["unet"](torch.ones(3, 6)).square().sum().backward()
        optimizer.step()
    step()
    return model, named, optimizer, controller, step


def save(run: Path, state, step: int) -> None:
    model, named, optimizer, controller, _ = state
    checkpoint.save_training_state(run, model, named, optimizer, controller, torch.Generator().manual_seed(step),
                                   {"step": step}, {"step": str(step)})


def checkpoint_bytes(folder: Path) -> tuple[bytes, bytes]:
    return tuple((folder / name).read_bytes() for name in ("adapters.safetensors", "state.safetensors"))


def two_checkpoints(run: Path, kill=None) -> list[str]:
    """Checkpoints after step 1 and after step 2 into `run`, the second killed where kill(ops) says."""
    state = training_state()
    save(run, state, 1)
    state[-1]()
    with killed_when(kill or (lambda ops: False)) as ops:
        save(run, state, 2)
    return ops


def test_a_kill_at_any_instruction_of_a_checkpoint_leaves_one_that_resumes_exactly(tmp_path):
    reference = {}
    for step in (1, 2):
        state, folder = training_state(), tmp_path / f"ref{step}"
        if step == 2:
            state[-1]()
        folder.mkdir()
        save(folder, state, step)
        reference[step] = checkpoint_bytes(folder / run_folder.CHECKPOINT)
    (tmp_path / "whole").mkdir()
    ops = two_checkpoints(tmp_path / "whole")
    assert ops.count("rename") == 2 and ops.count("unlink") >= 2, ops  # the steps the sweep goes through
    for n in range(1, len(ops) + 1):
        run = tmp_path / f"kill{n}"
        run.mkdir()
        with pytest.raises(Killed):
            two_checkpoints(run, lambda done: len(done) == n)
        last = run_folder.last_checkpoint(run)
        assert last is not None and checkpoint_bytes(last) in (reference[1], reference[2]), (n, ops[n - 1])
        state = training_state()  # the run goes on and writes its next checkpoint
        state[-1]()
        save(run, state, 2)
        assert checkpoint_bytes(run / run_folder.CHECKPOINT) == reference[2], (n, ops[n - 1])
        assert sorted(p.name for p in run.iterdir()) == [run_folder.CHECKPOINT], (n, ops[n - 1])


def partway_through_removing_the_old_checkpoint(ops: list[str]) -> bool:
    """The second file removed from checkpoint.old/, after both renames: a kill here left it non-empty."""
    if ops.count("rename") < 2:
        return False
    after = ops[len(ops) - 1 - ops[::-1].index("rename"):]
    return after.count("unlink") == 2 and ops[-1] == "unlink"


def test_a_run_killed_while_its_old_checkpoint_is_removed_resumes(tmp_path, monkeypatch):
    data_dir, out, argv = small_run(tmp_path)
    assert train.main([*argv, "--stop-after", "1"]) == 0
    save_training_state = checkpoint.save_training_state

    def killed_at_step_2(run, *args):
        with killed_when(partway_through_removing_the_old_checkpoint if args[5]["step"] == 2 else lambda ops: False):
            save_training_state(run, *args)
    monkeypatch.setattr(checkpoint, "save_training_state", killed_at_step_2)
    with pytest.raises(Killed):
        train.main(["--resume", str(out)])
    monkeypatch.undo()
    assert (out / run_folder.CHECKPOINT_OLD).is_dir()  # what the kill left
    assert train.main(["--resume", str(out), "--epochs", "2"]) == 0  # extended: it writes checkpoints again
    assert not (out / run_folder.CHECKPOINT_OLD).exists()
    last, ckpt = tensors_of(out / "last.safetensors"), tensors_of(out / "checkpoint" / "adapters.safetensors")
    assert last.keys() == ckpt.keys() and all(torch.equal(last[k], ckpt[k]) for k in last)
    steps = [json.loads(line)["step"] for line in (out / "log.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 2, 3, 4, 4]


# ---------------------------------------------------------------- 3. only finite states are written

def test_a_diverging_run_writes_only_finite_files_and_its_resume_says_the_same(tmp_path, capsys):
    data_dir, out, argv = small_run(tmp_path, "--lr", "1e30")
    assert train.main(argv) == 1  # B grows to 1e30 at step 1 (finite), so step 2's loss overflows
    err = error_line(capsys.readouterr().err)
    assert err.startswith("error: step 2: ") and f"The last checkpoint, of step 1, is finite: {out / 'checkpoint'}" in err
    assert all_finite(out / "checkpoint" / "adapters.safetensors") and all_finite(out / "checkpoint" / "state.safetensors")
    assert train.main(["--resume", str(out)]) == 1
    assert error_line(capsys.readouterr().err) == err  # the same step, the same message



def test_a_finite_loss_with_an_infinite_gradient_stops_before_the_update(tmp_path, capsys, monkeypatch):
    data_dir, out, argv = small_run(tmp_path)
    real_step = train.diffusion.train_step

    def overflowing(sd, batch, step, controller, *args):
        loss = real_step(sd, batch, step, controller, *args)
        if step == 2:  # the loss is finite, one gradient overflowed: Adam would write NaN into the adapter
            next(iter(controller.adapters.values())).B.grad.view(-1)[0] = float("inf")
        return loss
    monkeypatch.setattr(train.diffusion, "train_step", overflowing)
    assert train.main(argv) == 1
    err = error_line(capsys.readouterr().err)
    assert err.startswith("error: step 2: the gradient of ") and ".B is not finite; stopping." in err
    assert f"The last checkpoint, of step 1, is finite: {out / 'checkpoint'}" in err
    assert all_finite(out / "checkpoint" / "adapters.safetensors") and all_finite(out / "checkpoint" / "state.safetensors")
    assert not (out / "best.safetensors").exists()


def test_non_finite_names_the_first_parameter_or_gradient_that_is_not_finite():
    model = nn.Sequential(nn.Linear(3, 2), nn.Linear(2, 2))
    named = adapters.inject(model, method_table.build("lora", r=1).make_adapter)
    assert checkpoint.non_finite(named, "the update made") is None
    with torch.no_grad():
        named["1"].A[0, 0] = float("nan")
    assert checkpoint.non_finite(named, "the update made") == "the update made 1.A non-finite"
    model(torch.ones(1, 3)).sum().backward()
    assert checkpoint.non_finite(named, "the gradient of", grad=True).startswith("the gradient of 0.")


# ---------------------------------------------------------------- 4. data changed under a resumed run

def test_resume_refuses_changed_data_unless_allowed_and_records_it(tmp_path, capsys):
    data_dir, out, argv = small_run(tmp_path)
    assert train.main([*argv, "--stop-after", "1"]) == 0
    printed = capsys.readouterr().out
    lines = (data_dir / "metadata.jsonl").read_text().splitlines()
    first, second = json.loads(lines[0]), json.loads(lines[1])
    lines[0] = json.dumps({**first, "text": first["text"] + " changed"})
    replaced = data_dir / second["file_name"]
    replaced.write_bytes((data_dir / first["file_name"]).read_bytes())  # another image under the same name
    os.utime(replaced, ns=(time.time_ns(), time.time_ns() + 10**9))
    (data_dir / "added.png").write_bytes(replaced.read_bytes())
    lines.append(json.dumps({"file_name": "added.png", "text": "an added image"}))
    (data_dir / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    err = exits_2(capsys, ["--resume", str(out)])
    for item in (f"caption changed: {first['file_name']}", f"image changed: {second['file_name']}", "added: added.png"):
        assert item in err
    assert "--allow-data-change" in err and "3 change(s)" in err
    assert train.main(["--resume", str(out), "--allow-data-change"]) == 0
    recorded = json.loads((out / "split.json").read_text())
    assert len(recorded["data_changes"]) == 1 and len(recorded["data_changes"][0]["changes"]) == 3
    assert recorded["fingerprints"] == splits.fingerprints(datasets.load_dataset("folder", data_dir).examples)
    assert run_folder.read_config(out)["options"]["allow_data_change"] is False  # one invocation's, not the run's
    assert "no expansion test comes, so this run trains a fixed rank-1 LoRA" in printed  # said at the start (--t 4)


# ---------------------------------------------------------------- 5. test images know what made them; a run is
# finished only once everything is written

def md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def test_a_run_stopped_while_drawing_its_previews_is_unfinished(tmp_path, monkeypatch):
    data_dir, out, argv = small_run(tmp_path, "--split", "50,0,50", "--samples", "1", "--sample-steps", "1")

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(train, "generate", interrupted)  # Ctrl-C while the previews are drawn
    with pytest.raises(KeyboardInterrupt):
        train.main(argv)
    monkeypatch.undo()
    assert not (out / "summary.json").exists() and (out / "best.safetensors").is_file()  # not counted as finished
    assert train.main(["--resume", str(out)]) == 0
    assert (out / "summary.json").is_file() and (out / "previews" / "prompts.json").is_file()


def test_test_images_are_made_again_when_best_changes_and_a_one_image_set_is_refused(tmp_path, capsys):
    data_dir, out, argv = small_run(tmp_path, "--split", "50,0,50")
    assert train.main(argv) == 0
    assert heldout.ensure_test_split(out, steps=1)
    image = out / heldout.SAMPLES / "00000.png"
    before = md5(image)
    assert not heldout.ensure_test_split(out, steps=1)  # the same best adapter and sampler: kept
    best = tensors_of(out / "best.safetensors")  # what --resume --epochs N does to it
    weights.save_file({k: v + 0.5 if k.endswith(".B") else v for k, v in best.items()}, out / "best.safetensors",
                      weights.load_metadata(out / "best.safetensors"))
    assert heldout.ensure_test_split(out, steps=1)
    assert md5(image) != before

    # a 1-image test split is refused before anything is generated, naming the option and the split
    split = json.loads((out / "split.json").read_text())
    split["splits"]["test"] = split["splits"]["test"][:1]
    (out / "split.json").write_text(json.dumps(split))
    (out / "samples" / "adapter.json").unlink()
    with pytest.raises(SystemExit) as stop:
        eval_fid.main(["--runs", str(out), "--inception", str(tmp_path / "inception.pth")])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and f"--runs {out}: its test split ({out / 'split.json'}) has 1 image(s)" in err
    assert not (out / "samples" / "adapter.json").exists()  # nothing generated
    (tmp_path / "one").mkdir()
    (tmp_path / "one" / "a.png").write_bytes(image.read_bytes())
    with pytest.raises(SystemExit) as stop:
        eval_fid.main(["--fake", str(tmp_path / "one"), "--real", str(out / "real"), "--inception", "x"])
    assert stop.value.code == 2 and f"--fake {tmp_path / 'one'}: 1 image" in capsys.readouterr().err


# ---------------------------------------------------------------- 7. messages that name the right thing

def test_a_read_only_latent_cache_is_named(tmp_path, capsys, monkeypatch):
    data_dir, out, argv = small_run(tmp_path, "--latent-cache", str(tmp_path / "cache"))
    (tmp_path / "cache").mkdir()
    real_open = os.open

    def read_only(path, *args, **kwargs):
        if Path(path).parent == tmp_path / "cache" and args and args[0] & os.O_CREAT:
            raise PermissionError(1, "Operation not permitted", str(path))
        return real_open(path, *args, **kwargs)
    monkeypatch.setattr(os, "open", read_only)
    err = exits_2(capsys, argv)
    assert f"--latent-cache {tmp_path / 'cache'}: cannot write the cached latents there (Operation not permitted" in err


def test_a_full_disk_during_a_checkpoint_is_one_line_naming_the_folder_and_the_resume(tmp_path, capsys, monkeypatch):
    data_dir, out, argv = small_run(tmp_path)

    def too_large(*args, **kwargs):
        raise OSError(27, "File too large")
    monkeypatch.setattr(checkpoint, "save_checkpoint", too_large)
    assert train.main([*argv, "--stop-after", "1"]) == 1
    err = error_line(capsys.readouterr().err)
    assert err.startswith(f"error: step 1: writing the checkpoint into {out / 'checkpoint.tmp'} failed (File too large)")
    assert f"resume with --resume {out}" in err


def test_selora_options_that_make_it_a_fixed_rank_1_lora_are_said(tmp_path):
    args = train.parser().parse_args(["--max-rank", "1"])
    assert "fixed rank-1 LoRA" in method_table.notes("selora", args, 1000)[0]
    args = train.parser().parse_args(["--t", "40"])
    assert method_table.notes("selora", args, 40) == [] and "--t 40 is more than the run's 39 steps" in \
        method_table.notes("selora", args, 39)[0]
    assert method_table.notes("lora", train.parser().parse_args([]), 1) == []
