"""reproduce.py --smoke end to end (embedded tiny model, generated phantoms, random-weight Inception and CLIP):
the report has every section with finite numbers taken from the runs, all runs share one split, and a
finished study is not redone while an interrupted one finishes."""
import json
import math
import re
from pathlib import Path

import numpy as np
from scipy import stats
import pytest
import torch
from PIL import Image

import reproduce
import train
from fid_clip import TINY, random_clip, save_clip
from fid_reference import inception_file, inception_state  # noqa: F401  (pytest fixtures)

SECTIONS = ("## Image quality (tables 1 and 2)", "## Trainable parameters", "## Training time and memory",
            "## Cost of SeLoRA's expansion tests (eq. 6)", "## Final ranks (figures 3 and 4)",
            "## Real and generated images (figures 2 and 7)", "## Threshold ablation (table 3)", "## Sweep of t",
            "## Runs")
RUNS = ["lora-seed0", "lora-seed1", "selora-lam1.1-t2-seed0", "selora-lam1.1-t2-seed1",
        "selora-lam1-t2-maxrank16-seed0", "selora-lam1.3-t2-seed0", "selora-lam1.1-t4-seed0", "selora-lam1.1-t8-seed0"]


@pytest.fixture(scope="module")
def study(inception_file, tmp_path_factory):
    torch.manual_seed(0)
    clip = save_clip(random_clip(TINY), tmp_path_factory.mktemp("clip"))
    argv = ["--smoke", "--out", str(tmp_path_factory.mktemp("study") / "s"), "--inception", str(inception_file),
            "--clip", str(clip), "--kid-subsets", "20", "--dims", "192", "64"]  # 2048: 25 s of sqrtm a run
    assert reproduce.main(argv) == 0
    return argv


def out(argv):
    return reproduce.parse_args(argv).out


def stamps(folder):
    """mtime of every file under the study's runs/ (the latent cache aside)."""
    return {p: p.stat().st_mtime_ns for p in (folder / "runs").rglob("*")
            if p.is_file() and ".latent-cache" not in p.parts}


def run_table(report):
    return dict(re.findall(r"^\| \[([\w.-]+)\]\(runs/[\w.-]+/\) \| (\w+) \|$", report, re.M))


def table_rows(report, heading):
    """{first cell: [cells]} of the first table after `heading`."""
    part = report.split(heading, 1)[1].split("\n## ", 1)[0]
    rows = [line.strip("|").split("|") for line in part.splitlines() if line.startswith("| ")]
    return {r[0].strip(): [c.strip() for c in r[1:]] for r in rows[1:]}


def test_report_has_every_section_with_finite_numbers_from_the_runs(study):
    folder = out(study)
    report = (folder / "report.md").read_text()
    for heading in SECTIONS:
        assert heading in report, heading
    assert "not computed" not in report  # Inception and CLIP were given
    assert sorted(run_table(report)) == sorted(RUNS) and set(run_table(report).values()) == {"trained"}
    assert not re.search(r"\b(nan|inf|infinity)\b", report, re.I)
    assert "SeLoRA's growth rule: the paper's (`--expansion-test paper`" in report
    assert "**Capped:** selora-lam1-t2-maxrank16-seed0 stop growing at rank 16" in report
    assert "| 1 (max rank 16) |" in report
    capped = json.loads((out(study) / "runs" / "selora-lam1-t2-maxrank16-seed0" / "config.json").read_text())
    assert capped["options"]["max_rank"] == 16 and capped["options"]["expansion_test"] == "paper"

    # Table 1/2: mean over the seeds of each run's cached scores, the best in bold
    quality = table_rows(report, "## Image quality")
    assert list(quality) == ["lora", "selora"]
    columns = ["FID-192", "FID-64", "KID", "CLIP score"]
    means = {c: {} for c in columns}
    for method, name in (("lora", "lora-seed{}"), ("selora", "selora-lam1.1-t2-seed{}")):
        scores = [json.loads((folder / "runs" / name.format(s) / "scores.json").read_text()) for s in (0, 1)]
        assert all(c["sampling"] == {"scheduler": "pndm", "steps": 4, "guidance": 7.5} for c in scores)
        values = {"KID": [c["inception"]["kid"]["mean"] for c in scores],
                  "CLIP score": [c["clip"]["clip_score"] for c in scores],
                  **{f"FID-{d}": [c["inception"]["fid"][d] for c in scores] for d in ("192", "64")}}
        runs, *cells = quality[method]
        assert runs == "2"
        for column, cell in zip(columns, cells):
            assert all(math.isfinite(v) for v in values[column])
            mean, low, high = cell.strip("*").replace("[", "").replace("]", "").replace(",", "").split()
            half = stats.t.ppf(0.975, 1) * np.std(values[column], ddof=1) / np.sqrt(2)
            assert mean == f"{np.mean(values[column]):.4g}" and low == f"{np.mean(values[column]) - half:.4g}"
            assert high == f"{np.mean(values[column]) + half:.4g}"
            means[column][method] = (np.mean(values[column]) - half, np.mean(values[column]) + half)
    for i, column in enumerate(columns, 1):  # bold only where the best's interval clears the other's
        bold = [m for m in quality if quality[m][i].startswith("**")]
        (a_low, a_high), (b_low, b_high) = means[column]["lora"], means[column]["selora"]
        assert bool(bold) == (a_high < b_low or b_high < a_low), column

    # which sampler made the numbers, against the paper's
    assert ("Every FID, KID and CLIP score in this report is of test images made by pndm, 4 steps, guidance 7.5"
            in report and "PNDM scheduler at 50 steps, guidance 7.5" in report and "with care" in report)
    assert report.count("test images by pndm, 4 steps, guidance 7.5.") == 2  # the two ablation tables

    # every run of both ablations, one split for all, figures written
    assert list(table_rows(report, "## Threshold ablation")) == ["1 (max rank 16)", "1.1", "1.3"]
    assert list(table_rows(report, "## Sweep of t")) == ["2", "4", "8"]
    splits = {(folder / "runs" / r / "split.json").read_text() for r in RUNS}
    assert len(splits) == 1 and "8 test" in report
    for name in ("memory.png", "ranks_unet.png", "ranks_text.png", "samples.png"):
        assert f"(figures/{name})" in report and Image.open(folder / "figures" / name).size[0] > 100


def test_expansion_overhead_is_measured_from_the_step_times():
    log = [{"step": 1, "step_time": 9.0}, {"step": 2, "step_time": 1.0, "events": [{}]},
           {"step": 3, "step_time": 0.5}, {"step": 4, "step_time": 1.0, "events": [{}]}, {"step": 5, "step_time": 0.5},
           {"step": 5, "epoch": 0, "val_loss": 1.0}]
    overhead = reproduce.expansion_overhead(log)  # step 1 (warm-up) left out: 2 test steps, 2 others
    assert overhead == {"test steps": 2, "test step (s)": 1.0, "other step (s)": 0.5, "measured factor": 1.5}
    assert reproduce.expansion_overhead(log[:1] + [s for s in log if "events" not in s]) is None


def test_finished_study_is_not_redone_and_scores_need_their_weights(study, capsys):
    folder = out(study)
    before = stamps(folder)
    assert reproduce.main(study) == 0
    assert stamps(folder) == before  # no training, sampling or scoring
    assert set(run_table((folder / "report.md").read_text()).values()) == {"done"}
    # without the weights: the report says what is missing instead of giving numbers
    assert reproduce.main(["--smoke", "--out", str(folder)]) == 0
    report = (folder / "report.md").read_text()
    assert "FID and KID are not computed: they need `--inception" in report
    assert "The CLIP score is not computed: it needs `--clip" in report
    assert "FID-64" not in report and "CLIP score |" not in report
    for heading in SECTIONS:
        assert heading in report, heading
    assert stamps(folder) == before
    # a finished run made with other options is an error, not mixed in
    capsys.readouterr()
    assert reproduce.main([*study, "--epochs", "3"]) == 2
    assert re.search("made with other options.*epochs: 2 there, 3 now", capsys.readouterr().err)
    assert stamps(folder) == before


def test_test_images_and_scores_are_made_again_for_another_sampler_only(study, monkeypatch):
    class Made(Exception):
        pass

    def generate(run_dir, *options):
        raise Made(options)

    monkeypatch.setattr(reproduce.heldout, "generate_test_split", generate)
    args = reproduce.parse_args(study)
    run = reproduce.plan(args)[0]
    assert reproduce.evaluate(args, run, reproduce.Scorer(args))["sampling"]["scheduler"] == "pndm"  # kept
    for other in (["--scheduler", "dpmpp2m"], ["--sample-steps", "5"], ["--guidance", "3"]):
        args = reproduce.parse_args([*study, *other])
        with pytest.raises(Made):
            reproduce.evaluate(args, run, reproduce.Scorer(args))


def test_reader_scores_the_kept_test_images_with_adherence_highest_best(study):
    folder = out(study)
    before = stamps(folder)
    reader = Path(reproduce.readback.ASSETS / "phantoms.safetensors")
    assert reproduce.main(["--smoke", "--out", str(folder), "--reader", str(reader)]) == 0
    changed = {p for p, t in stamps(folder).items() if before.get(p) != t}
    assert changed and all(p.name == reproduce.SCORES for p in changed)  # scored again; nothing trained or sampled
    report = (folder / "report.md").read_text()
    assert "FID and KID are not computed" not in report and "The CLIP score is not computed" not in report
    rows = table_rows(report, "## Image quality")
    assert set(rows) == {"lora", "selora"}
    header = report.split("## Image quality", 1)[1].split("| method | runs | ", 1)[1].split(" |\n", 1)[0]
    assert header.split(" | ") == ["FID-phantoms", "KID", "adherence"]
    adherence = {m: cell(cells[3]) for m, cells in rows.items()}  # (mean, low, high): t interval over 2 seeds
    assert all(0 <= a[0] <= 1 and a[1] <= a[0] <= a[2] for a in adherence.values())
    best, worst = sorted(adherence, key=lambda m: adherence[m][0], reverse=True)
    separated = adherence[best][1] > adherence[worst][2]
    assert rows[best][3].startswith("**") == separated and not rows[worst][3].startswith("**")
    for cells in rows.values():
        assert all(math.isfinite(v) for c in cells[1:] for v in cell(c))


def cell(text: str) -> tuple[float, ...]:
    """A table cell 'mean [low, high]' (bold or not) as numbers."""
    return tuple(float(v) for v in text.strip("*").replace("[", "").replace("]", "").replace(",", "").split())


def test_mini_is_the_whole_study_scored_by_the_phantom_reader(tmp_path, capsys):
    args = reproduce.parse_args(["--mini", "--out", str(tmp_path / "m")])
    assert args.methods == list(reproduce.METHODS) and args.seeds == [0, 1, 2]
    assert Path(args.reader) == reproduce.readback.ASSETS / "phantoms.safetensors"
    assert args.train_options == ["--split", "70,10,20", "--lr", "0.001"] and args.guidance == 3.0
    assert len(reproduce.plan(args)) == 15 + 2 + 2  # 5 methods x 3 seeds; lambda 1 and 1.3; t 20 and 80
    assert reproduce.parse_args(["--mini", "--out", str(tmp_path / "m"), "--lr", "1e-4"]).train_options == [
        "--split", "70,10,20", "--lr", "1e-4"]  # a passed-through option wins
    for bad in (["--model", "x"], ["--smoke"], ["--reader", "x", "--clip", "y"]):
        with pytest.raises(SystemExit) as stop:
            reproduce.parse_args(["--mini", "--out", str(tmp_path / "m"), *bad])
        assert stop.value.code == 2
    assert reproduce.main(["--smoke", "--out", str(tmp_path / "s"), "--reader", str(tmp_path / "none")]) == 2
    assert f"--reader {tmp_path / 'none'}: no such file" in capsys.readouterr().err


def test_interrupted_study_finishes(study):
    folder = out(study)
    args = reproduce.parse_args(study)
    runs = {r.name: r for r in reproduce.plan(args)}
    stopped, unfinished = folder / "runs" / "selora-lam1.1-t2-seed1", folder / "runs" / "lora-seed1"
    for p in sorted(stopped.rglob("*"), reverse=True):
        p.unlink() if p.is_file() else p.rmdir()
    stopped.rmdir()
    (unfinished / "summary.json").unlink()  # e.g. stopped while writing its last files
    # stopped after step 6: the checkpoint is the epoch end at step 4 (16 training images, batch 4)
    assert train.main([*reproduce.train_argv(args, runs[stopped.name]), "--stop-after", "6"]) == 0
    config_time = (stopped / "config.json").stat().st_mtime_ns
    before = stamps(folder)
    assert reproduce.main(study) == 0
    status = run_table((folder / "report.md").read_text())
    assert status.pop(stopped.name) == "resumed" and status.pop(unfinished.name) == "resumed"
    assert set(status.values()) == {"done"}
    assert (stopped / "config.json").stat().st_mtime_ns == config_time  # continued, not started again
    for run_dir in (stopped, unfinished):
        steps = [json.loads(line)["step"] for line in (run_dir / "log.jsonl").read_text().splitlines()
                 if "loss" in json.loads(line)]
        assert steps == list(range(1, 9))
        assert json.loads((run_dir / "summary.json").read_text())["steps"] == 8
    assert math.isfinite(json.loads((stopped / "scores.json").read_text())["inception"]["fid"]["192"])
    after = stamps(folder)
    assert {p: t for p, t in after.items() if unfinished not in p.parents and stopped not in p.parents} == \
        {p: t for p, t in before.items() if unfinished not in p.parents and stopped not in p.parents}


def test_bad_sampler_options_are_refused(tmp_path, capsys):
    for options, message in ((["--scheduler", "euler"], "argument --scheduler: invalid choice: 'euler'"),
                             (["--sample-steps", "1000"], "argument --sample-steps: must be between 1 and 999, got 1000")):
        with pytest.raises(SystemExit) as stopped:
            reproduce.parse_args(["--smoke", "--out", str(tmp_path / "s"), *options])
        assert stopped.value.code == 2 and message in capsys.readouterr().err


def test_fid_is_computed_again_for_another_fid_sqrtm_only(study, monkeypatch):
    def generate(run_dir, *options):
        raise AssertionError("the test images were made again")

    monkeypatch.setattr(reproduce.heldout, "generate_test_split", generate)
    args = reproduce.parse_args([*study, "--fid-sqrtm", "exact"])
    run = reproduce.plan(args)[0]
    path = reproduce.folder(args, run) / reproduce.SCORES
    saved = path.read_text()
    before = json.loads(saved)
    try:
        after = reproduce.evaluate(args, run, reproduce.Scorer(args))
        assert (before["inception"]["key"]["fid_sqrtm"], after["inception"]["key"]["fid_sqrtm"]) == ("eigh", "exact")
        assert after["inception"]["fid"] == pytest.approx(before["inception"]["fid"], rel=1e-6)
        assert after["clip"] == before["clip"] and after["sampling"] == before["sampling"]
        assert json.loads(path.read_text()) == after
    finally:
        path.write_text(saved)  # the other tests' study computed FID from eigenvalues


@pytest.mark.parametrize("option", ["gradient_checkpointing", "compile"])
def test_gradient_checkpointing_or_compile_does_not_make_a_finished_run_another(study, option):
    """Neither changes a result, so a study may continue with it, and runs from before it existed still count.
    (A SeLoRA run continued with --compile would get --max-rank 16, which differs: its runs are refused.)"""
    args = reproduce.parse_args([*study, "--" + option.replace("_", "-")])
    run = reproduce.plan(args)[0]
    assert run.method == "lora"
    run_dir = reproduce.folder(args, run)
    config = run_dir / "config.json"
    saved = config.read_text()
    try:
        older = json.loads(saved)
        del older["options"][option]
        config.write_text(json.dumps(older))
        reproduce.check_same(run_dir, reproduce.train_argv(args, run))
        reproduce.check_same(run_dir, reproduce.train_argv(reproduce.parse_args(study), run))
    finally:
        config.write_text(saved)


def test_each_rule_has_its_own_lambda_grid_and_only_the_paper_rules_lambda_1_is_capped(tmp_path):
    base = ["--data", str(tmp_path), "--out", str(tmp_path / "s"), "--methods", "lora", "selora", "--seeds", "0",
            "--ts"]
    paper = reproduce.parse_args(base)
    assert (paper.lam, paper.lambdas) == (1.1, [1.0, 1.1, 1.3])
    names = [r.name for r in reproduce.plan(paper)]
    assert names == ["lora-seed0", "selora-lam1.1-t40-seed0", "selora-lam1-t40-maxrank16-seed0",
                     "selora-lam1.3-t40-seed0"]
    capped = reproduce.train_argv(paper, reproduce.plan(paper)[2])
    assert capped[capped.index("--max-rank") + 1] == "16"
    assert capped[capped.index("--expansion-test") + 1] == "paper"
    assert "--expansion-test" not in reproduce.train_argv(paper, reproduce.plan(paper)[0])  # not LoRA's option
    script = reproduce.parse_args([*base, "--expansion-test", "script"])
    assert (script.lam, script.lambdas) == (1.3, [1.0, 1.3, 2.0])
    runs = reproduce.plan(script)
    assert [r.name for r in runs] == ["lora-seed0", "selora-lam1.3-t40-seed0", "selora-lam1-t40-seed0",
                                      "selora-lam2-t40-seed0"]
    assert all("--max-rank" not in reproduce.train_argv(script, r) for r in runs)
    assert reproduce.train_argv(script, runs[2])[-2:] == ["--expansion-test", "script"]
    everyone = reproduce.parse_args([*base, "--max-rank", "8"])  # train.py's own cap: no second one
    assert all(reproduce.train_argv(everyone, r).count("--max-rank") <= 1 for r in reproduce.plan(everyone))
