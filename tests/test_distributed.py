"""Data-parallel training (fast/distributed.py) on the CPU with gloo: torchrun launches 2 processes of train.py on the
embedded tiny model and phantoms, on 127.0.0.1 only.

A 2-process run with per-process batch 4 must train what a 1-process run with batch 8 trains: the same losses
(float tolerance: the ranks' gradients are summed in another order), the same SeLoRA expansions at the same
steps, the same final adapters. The split (41 training, 11 validation images) makes each epoch's last batch a
single image, so one process gets no rows, and the last validation batch splits 2/1. A process killed mid-run
(SIGKILL, tests/ddp_fault.py) stops the run with a message naming the resume command, and the last checkpoint
resumes to the same result.
"""
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fast import distributed
from fast.fisher import FastSeLoRA
from methods.adapters import inject
from model import weights
import selora
import train

ROOT = Path(__file__).resolve().parents[1]
RUN = ["--phantoms", "96", "--epochs", "2", "--t", "4", "--split", "43,11,46", "--samples", "0", "--checkpoint-every", "4"]
STEPS = 12  # 2 epochs of ceil(41 / 8) = 6 steps


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """In-process runs sum on one thread, as torchrun's workers (OMP_NUM_THREADS=1) do: Adam turns the last-bit
    differences of another thread count into steps of lr on parameters whose gradients are near 0, beyond any
    tolerance the adapters are compared at."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def torchrun(*args: str) -> subprocess.CompletedProcess:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
               "--master_port", str(port), *args]
    return subprocess.run(command, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True,
                          text=True, timeout=300)


def steps(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def single(tmp_path_factory) -> Path:
    """The reference: one process, batch 8."""
    out = tmp_path_factory.mktemp("single") / "run"
    assert train.main(["--out", str(out), "--batch", "8", *RUN]) == 0
    return out


@pytest.fixture(scope="module")
def double(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    out = tmp_path_factory.mktemp("double") / "run"
    return out, torchrun("train.py", "--out", str(out), "--batch", "4", *RUN)


def assert_same_training(a: Path, b: Path, atol: float = 1e-5) -> None:
    """Same steps, losses within float tolerance, the same expansion decisions, the same adapters (within atol)."""
    la, lb = steps(a), steps(b)
    assert [(x["step"], "val_loss" in x) for x in la] == [(x["step"], "val_loss" in x) for x in lb]
    for x, y in zip(la, lb):
        for key in ("loss", "val_loss"):
            if key in x:
                assert y[key] == pytest.approx(x[key], rel=1e-5), (x["step"], key)
        assert x.get("total_rank") == y.get("total_rank"), x["step"]
        decisions = [[(e["layer"], e["rank"], e["expanded"]) for e in line.get("events", [])] for line in (x, y)]
        assert decisions[0] == decisions[1], x["step"]
    for name in ("last.safetensors", "best.safetensors"):
        ta, tb = weights.load_file(a / name), weights.load_file(b / name)
        assert ta.keys() == tb.keys()
        for key in ta:
            torch.testing.assert_close(tb[key], ta[key], rtol=1e-4, atol=atol, msg=f"{name}: {key}")


def test_two_processes_train_what_one_process_with_twice_the_batch_trains(single, double):
    out, result = double
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "41 training images, 11 validation" in result.stdout and "2 processes of batch 4" in result.stdout
    assert result.stdout.count("done: ") == 1  # only rank 0 prints and writes
    log = steps(out)
    assert [x["step"] for x in log if "loss" in x] == list(range(1, STEPS + 1))
    expansions = [(x["step"], e["layer"]) for x in log for e in x.get("events", []) if e["expanded"]]
    assert expansions and {step for step, _ in expansions} <= {4, 8, 12}
    assert_same_training(single, out)
    config = json.loads((out / "config.json").read_text())
    assert config["world_size"] == 2 and config["options"]["batch"] == 4
    summary = json.loads((out / "summary.json").read_text())
    assert summary["final_ranks"] == json.loads((single / "summary.json").read_text())["final_ranks"]


def test_a_killed_process_stops_the_run_and_the_last_checkpoint_resumes(single, tmp_path):
    out = tmp_path / "run"
    killed = torchrun("tests/ddp_fault.py", "1", "11", "--out", str(out), "--batch", "4", *RUN)  # rank 1, step 11
    report = killed.stdout + killed.stderr
    assert killed.returncode != 0
    assert "SIGKILL" in report and "rank      : 1" in report  # torchrun names the process that died
    assert "the run stopped because another process failed" in report and f"--resume {out}" in report
    assert not (out / "summary.json").exists()
    counters = json.loads(weights.load_metadata(out / "checkpoint" / "state.safetensors")["counters"])
    assert counters["step"] == 8
    resumed = torchrun("train.py", "--resume", str(out))
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert "resuming" in resumed.stdout and "at step 8" in resumed.stdout
    assert_same_training(single, out)


def test_shards_cover_the_global_batch_in_order(monkeypatch):
    batch = [torch.arange(10), torch.arange(10) * 2]
    for n in (10, 3, 1):
        for world in (1, 2, 3, 4):
            parts = []
            for r in range(world):
                monkeypatch.setenv("RANK", str(r))
                monkeypatch.setenv("WORLD_SIZE", str(world))
                part = distributed.shard([x[:n] for x in batch])
                assert torch.equal(part[1], part[0] * 2)
                parts.append(part[0])
            assert torch.equal(torch.cat(parts), torch.arange(n))
            assert max(map(len, parts)) - min(map(len, parts)) <= 1


def test_a_resumed_run_keeps_its_global_batch(tmp_path, monkeypatch):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"options": {"method": "selora", "batch": 4, "epochs": 2,
                                                             "out": str(run)}, "world_size": 2}))
    assert train.resolve(["--resume", str(run)]).batch == 8  # one process
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "4")
    assert train.resolve(["--resume", str(run)]).batch == 2
    monkeypatch.setenv("WORLD_SIZE", "3")
    with pytest.raises(ValueError, match="global batch is 8, which 3 processes cannot share evenly"):
        train.resolve(["--resume", str(run)])


def selora_step(x: torch.Tensor, y: torch.Tensor, fisher: str, reduce=None) -> selora.SeLoRA:
    """One process's share of a SeLoRA test step (step 4, t = 4) on a 2-layer MLP with trained-looking
    adapters, captured but not yet stepped; x may have no rows."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 9), torch.nn.Tanh(), torch.nn.Linear(9, 4)).double()
    ads = inject(model, selora.SeLoRALinear)
    g = torch.Generator().manual_seed(2)
    for a in ads.values():
        selora.expand(a, torch.randn(a.base.in_features, generator=g))
        with torch.no_grad():
            a.B.copy_(0.3 * torch.randn(a.B.shape, generator=g))
    # lambda between the whole batch's ratio and a half's for some layer: the decision depends on the reduction
    controller = selora.SeLoRA if reduce is None else FastSeLoRA  # the sums over processes: the fast test step's
    control = controller(ads, lam=1.144, t=4, fisher=fisher, seed=3, reduce=reduce)
    with control.capture(4, len(x)):
        if len(x):
            (model(x) - y).square().flatten(1).mean(1).mean().backward()
    control.after_backward()
    return control


@pytest.mark.parametrize("fisher", ["sample", "batch"])
@pytest.mark.parametrize("rows", [4, 7])  # of the 7 samples, the first process's; the second gets the rest
def test_selora_tests_the_global_batch_once_its_sums_are_reduced(fisher, rows):
    """Two simulated processes: the second's Fisher sums are added to the first's where
    distributed.all_reduce_sums would add them (the fast test step's `reduce`). The first then scores, and decides,
    exactly as one process holding the whole batch with the literal test step."""
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(7, 6, generator=g, dtype=torch.float64), torch.randn(7, 4, generator=g, dtype=torch.float64)
    whole = selora_step(x, y, fisher)
    whole.step()
    held = {}
    second = selora_step(x[rows:], y[rows:], fisher, reduce=lambda sums: held.setdefault("second", sums))
    first = selora_step(x[:rows], y[:rows], fisher, reduce=lambda sums: [a + b for a, b in zip(sums, held["second"])])
    second.step()
    first.step()
    tests, whole = first.log, whole.log
    assert [(t.layer, t.rank, t.expanded) for t in tests] == [(t.layer, t.rank, t.expanded) for t in whole]
    for t, w in zip(tests, whole):
        assert t.score == pytest.approx(w.score, rel=1e-12) and t.ratio == pytest.approx(w.ratio, rel=1e-12)
