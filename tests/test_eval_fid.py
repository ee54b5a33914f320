"""FID, KID and the command line, against pytorch-fid and torchmetrics; properties; bad input."""
import csv
import json
import re
import warnings

import numpy as np
import pytest
import torch

from metrics import fid_kid
import eval_fid
from fid_reference import inception_file, inception_state, pytorch_fid_inception, write_images  # noqa: F401


def random_stats(n: int, d: int, seed: int, scale: float = 1.0, near_duplicates: int = 0):
    """Statistics of n correlated Gaussian features in d dimensions. n <= d: rank-deficient covariance (as
    Montgomery's test split at 2048 dims). near_duplicates: that many columns copied from others plus noise
    1e-6 of their size, so the covariance is full rank but near-singular (condition ~1e12)."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d)) @ rng.normal(size=(d, d)) * scale / d ** 0.5 + rng.normal(size=d)
    if near_duplicates:
        x[:, :near_duplicates] = x[:, -near_duplicates:] + 1e-6 * rng.normal(size=(n, near_duplicates))
    return fid_kid.statistics(x)


FEATURE_SETS = {"well-conditioned": lambda d: dict(n=3 * d), "rank-deficient": lambda d: dict(n=d // 3 + 2),
                "near-singular": lambda d: dict(n=d + 8, near_duplicates=4)}


def pytorch_fid_and_ours(d: int, kind: str, capsys):
    """(pytorch-fid's FID, ours, the statistics) of two feature sets of `kind` in d dimensions, and whether S1
    has no Cholesky factor (trace_sqrt_product's eigh branch)."""
    from pytorch_fid.fid_score import calculate_frechet_distance

    (m1, s1), (m2, s2) = (random_stats(seed=seed, d=d, scale=scale, **FEATURE_SETS[kind](d))
                          for seed, scale in ((1, 1.0), (2, 1.5)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # scipy's singular-matrix and deprecation warnings
        theirs = calculate_frechet_distance(m1, s1, m2, s2)
    assert "singular product" not in capsys.readouterr().out  # pytorch-fid's sqrtm succeeded: no 1e-6 offset
    try:
        singular = not np.linalg.cholesky(s1).size
    except np.linalg.LinAlgError:
        singular = True
    return theirs, fid_kid.frechet_distance(m1, s1, m2, s2), (m1, s1, m2, s2), singular


@pytest.mark.parametrize("kind", FEATURE_SETS)
@pytest.mark.parametrize("d", [64, 192, 768])
def test_frechet_distance_equals_pytorch_fid(d, kind, capsys):
    theirs, ours, stats, singular = pytorch_fid_and_ours(d, kind, capsys)
    assert singular == (kind == "rank-deficient")
    print(f"{d} dims, {kind}: pytorch-fid {theirs!r}, ours {ours!r}, relative error {abs(ours - theirs) / theirs:.2e}")
    assert ours > 1
    assert abs(ours - theirs) <= 1e-6 * theirs
    if d == 192:  # --fid-sqrtm exact: pytorch-fid's own computation
        assert abs(fid_kid.frechet_distance(*stats, sqrtm="exact") - theirs) <= 1e-9 * theirs


def test_frechet_distance_equals_pytorch_fid_at_2048_dims_with_fewer_images_than_dims(capsys):
    """The width FID is reported at, with Montgomery's problem: fewer images than dimensions. pytorch-fid's sqrtm
    takes 10 s or more here (bench/fid.py times both); the near-singular case is checked at 64-768 dims."""
    theirs, ours, _, singular = pytorch_fid_and_ours(2048, "rank-deficient", capsys)
    print(f"2048 dims, rank-deficient: pytorch-fid {theirs!r}, ours {ours!r}, "
          f"relative error {abs(ours - theirs) / theirs:.2e}")
    assert singular and abs(ours - theirs) <= 1e-6 * theirs


def test_frechet_distance_equals_torchmetrics_eigenvalue_route():
    from torchmetrics.image.fid import _compute_fid

    (m1, s1), (m2, s2) = random_stats(300, 64, 1), random_stats(300, 64, 2, scale=1.5)
    witness = _compute_fid(*(torch.from_numpy(a) for a in (m1, s1, m2, s2))).item()  # eigenvalues of S1 S2
    ours = fid_kid.frechet_distance(m1, s1, m2, s2)
    assert abs(ours - witness) <= 1e-6 * ours


def test_fid_of_a_set_with_itself_is_zero_and_a_shift_adds_its_square():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(500, 32)) * rng.uniform(0.5, 2, size=32)
    m, s = fid_kid.statistics(x)
    assert abs(fid_kid.frechet_distance(m, s, m, s)) < 1e-9 * np.trace(s)
    direction = rng.normal(size=32)
    fids = [fid_kid.frechet_distance(m, s, *fid_kid.statistics(x + c * direction)) for c in (0.1, 0.5, 1, 2)]
    assert all(a < b for a, b in zip(fids, fids[1:]))
    for c, fid in zip((0.1, 0.5, 1, 2), fids):  # equal covariances: FID is exactly the squared mean shift
        assert fid == pytest.approx(c ** 2 * direction @ direction, rel=1e-6)


@pytest.mark.parametrize("sqrtm", fid_kid.FID_SQRTM)
def test_frechet_distance_refuses_mismatched_and_complex_statistics(sqrtm):
    m, s = random_stats(100, 8, 0)
    with pytest.raises(ValueError, match=r"shapes differ.*\(8,\) and \(4,\)"):
        fid_kid.frechet_distance(m, s, m[:4], s[:4, :4], sqrtm=sqrtm)
    not_a_covariance = np.diag([-1.0, 1.0])  # its square root is imaginary
    for s1, s2 in ((np.eye(2), not_a_covariance), (not_a_covariance, np.eye(2))):
        with pytest.raises(ValueError, match="imaginary component of up to 1: the statistics are numerically unsound"):
            fid_kid.frechet_distance(np.zeros(2), s1, np.zeros(2), s2, sqrtm=sqrtm)
    round_off = np.diag([-1e-9, 1.0])  # a zero variance computed as slightly negative is not an error
    assert fid_kid.frechet_distance(np.zeros(2), round_off, np.zeros(2), np.eye(2), sqrtm=sqrtm) == \
        pytest.approx(1.0, abs=1e-4)
    with pytest.raises(ValueError, match="sqrtm must be one of"):
        fid_kid.frechet_distance(m, s, m, s, sqrtm="svd")


# ---------------------------------------------------------------- KID

class Identity(torch.nn.Module):
    """A torchmetrics 'feature extractor' that passes precomputed features through."""

    def __init__(self, dims: int):
        super().__init__()
        self.num_features = dims

    def forward(self, x):
        return x


def test_kid_equals_torchmetrics_with_the_same_subsets():
    from torchmetrics.image.kid import KernelInceptionDistance

    rng = np.random.default_rng(0)
    real, fake = rng.normal(size=(50, 16)), rng.normal(0.3, 1.2, size=(40, 16))
    metric = KernelInceptionDistance(feature=Identity(16), subsets=6, subset_size=30)
    metric.update(torch.from_numpy(real), real=True)
    metric.update(torch.from_numpy(fake), real=False)
    torch.manual_seed(7)
    mean, std = (t.item() for t in metric.compute())
    ours = fid_kid.kid(real, fake, subsets=6, subset_size=30, seed=7)
    assert ours["mean"] == pytest.approx(mean, rel=1e-9)
    assert ours["std"] == pytest.approx(std, rel=1e-9)
    assert ours["std"] > 0 and ours["subset_size"] == 30


def test_kid_is_unbiased_on_two_samples_of_one_distribution():
    rng = np.random.default_rng(0)
    same, biased = [], []
    for _ in range(400):
        x, y = rng.normal(size=(8, 6)), rng.normal(size=(8, 6))
        same.append(fid_kid.polynomial_mmd(x, y))
        k = (np.concatenate([x, y]) @ np.concatenate([x, y]).T / 6 + 1) ** 3
        biased.append(k[:8, :8].mean() + k[8:, 8:].mean() - 2 * k[:8, 8:].mean())  # V-statistic, diagonal kept
    standard_error = np.std(same) / len(same) ** 0.5
    assert abs(np.mean(same)) < 3 * standard_error
    assert np.mean(biased) > 10 * standard_error  # the estimator the test would catch
    shifted = fid_kid.kid(rng.normal(size=(100, 6)), rng.normal(1, 1, size=(100, 6)), subsets=20, subset_size=50)
    assert shifted["mean"] > 3 * shifted["std"]


def test_small_sets_warn_and_kid_caps_its_subset_size():
    rng = np.random.default_rng(0)
    real, fake = {64: rng.normal(size=(20, 64))}, {64: rng.normal(size=(30, 64))}
    with pytest.warns(UserWarning, match="20 images for 64-dimensional features: the covariance is singular"):
        report = fid_kid.fid_kid(real, fake, kid_subsets=3)
    assert report["kid"]["subset_size"] == 10 and report["kid"]["std"] > 0 and len(report["warnings"]) == 1
    with pytest.raises(ValueError, match="KID needs at least 4 images in each set, got 3 real and 30 fake"):
        fid_kid.kid(real[64][:3], fake[64])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert fid_kid.fid_kid({8: real[64][:, :8]}, {8: fake[64][:, :8]}, kid_subsets=3)["warnings"] == []


# ---------------------------------------------------------------- images to FID, end to end

def test_fid_from_images_equals_pytorch_fid(inception_state, inception_file, tmp_path, monkeypatch):
    from pytorch_fid.fid_score import calculate_frechet_distance, get_activations
    from torchmetrics.image.fid import FrechetInceptionDistance

    folders = write_images(tmp_path / "real", 66, seed=0), write_images(tmp_path / "fake", 66, shift=0.08, seed=1)
    model = eval_fid.inception.load_inception(inception_file)
    real, fake = (eval_fid.inception_features(model, eval_fid.list_images(f), (64,)) for f in folders)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # 66 images > 64 dims: no small-set warning
        ours = fid_kid.fid_kid(real, fake, kid_subsets=10)["fid"]["64"]

    network = pytorch_fid_inception(inception_state, 64, monkeypatch)
    theirs = [get_activations(eval_fid.list_images(f), network, 50, 64, "cpu", num_workers=0) for f in folders]
    reference = calculate_frechet_distance(*(s for a in theirs for s in (np.mean(a, 0), np.cov(a, rowvar=False))))
    print(f"FID-64 ours {ours!r}, pytorch-fid {reference!r}")
    assert ours > 0.1
    assert abs(ours - reference) <= 1e-5 * reference

    metric = FrechetInceptionDistance(feature=Identity(64))  # second witness: the eigenvalue route
    for features, is_real in zip(theirs, (True, False)):
        metric.update(torch.from_numpy(features), real=is_real)
    witness = metric.compute().item()
    print(f"FID-64 torchmetrics {witness!r}")
    assert abs(ours - witness) <= 1e-5 * ours

    assert fid_kid.fid_kid(real, real, kid_subsets=2)["fid"]["64"] == pytest.approx(0, abs=1e-6 * ours)


def run_folder(root, name, method, seed, shift, n=6):
    run = root / name
    write_images(run / "samples", n, shift=shift, seed=seed + 10)
    (run / "run.json").write_text(json.dumps({"method": method, "seed": seed}))
    return run


def test_runs_make_the_papers_table(inception_file, tmp_path):
    real = write_images(tmp_path / "real", 6, seed=0)
    runs = [run_folder(tmp_path, "selora-0", "selora", 0, 0.05), run_folder(tmp_path, "selora-1", "selora", 1, 0.1),
            run_folder(tmp_path, "lora-0", "lora", 0, 0.3)]
    common = ["--real", str(real), "--inception", str(inception_file), "--dims", "64", "--kid-subsets", "4"]
    with pytest.warns(UserWarning, match="singular"):
        result = eval_fid.main(common + ["--runs", *map(str, runs), "--table", str(tmp_path / "table")])
        single = [eval_fid.main(common + ["--fake", str(run / "samples"), "--json", str(run / "fid.json")])
                  for run in runs]
        exact = eval_fid.main(common + ["--fake", str(runs[0] / "samples"), "--fid-sqrtm", "exact"])
    assert json.loads((runs[0] / "fid.json").read_text()) == single[0]  # every figure, exactly (repr round-trips)
    fids = [r["fid"]["64"] for r in single]
    assert (single[0]["fid_sqrtm"], exact["fid_sqrtm"]) == ("eigh", "exact")
    assert exact["fid"]["64"] == pytest.approx(fids[0], rel=1e-6) and exact["kid"] == single[0]["kid"]
    assert [r["fid"]["64"] for r in result["runs"]] == pytest.approx(fids, rel=1e-12)
    rows = list(csv.DictReader((tmp_path / "table.csv").open()))
    assert [(r["method"], r["runs"]) for r in rows] == [("selora", "2"), ("lora", "1")]
    assert float(rows[0]["FID-64 mean"]) == pytest.approx(np.mean(fids[:2]), rel=1e-5)
    assert float(rows[0]["FID-64 std"]) == pytest.approx(np.std(fids[:2], ddof=1), rel=1e-5)
    assert rows[1]["FID-64 std"] == "" and rows[1]["FID-64 low"] == ""  # one run, Inception: no interval
    half = 12.706 * np.std(fids[:2], ddof=1) / np.sqrt(2)  # Student's t(0.975, 1)
    assert float(rows[0]["FID-64 low"]) == pytest.approx(np.mean(fids[:2]) - half, rel=1e-4)
    markdown = (tmp_path / "table.md").read_text()
    assert markdown.startswith("| method | runs | FID-64 | KID |") and "| selora | 2 | " in markdown
    assert f"| lora | 1 | {fids[2]:.4g} |" in markdown


def test_runs_without_images_say_how_to_make_them(inception_file, tmp_path, capsys):
    real = write_images(tmp_path / "real", 3)
    (tmp_path / "run").mkdir()
    with pytest.raises(SystemExit) as stop:
        eval_fid.main(["--real", str(real), "--inception", str(inception_file), "--runs", str(tmp_path / "run")])
    assert stop.value.code == 2
    assert re.search(r"run/samples: no such folder; generate .* sample.py", capsys.readouterr().err)


# ---------------------------------------------------------------- bad input

def test_empty_missing_and_unreadable_image_folders(inception_file, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("not an image")
    (write_images(tmp_path / "grid", 1) / "0000.png").rename(tmp_path / "empty" / "grid.png")  # sample.py's sheet
    with pytest.raises(ValueError, match="empty: no images in it"):
        eval_fid.list_images(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="nowhere: no such image folder"):
        eval_fid.list_images(tmp_path / "nowhere")
    real = write_images(tmp_path / "real", 3)
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    (tmp_path / "bad" / "good.png").write_bytes((real / "0000.png").read_bytes())  # 2 images: the count passes
    with pytest.raises(SystemExit) as stop:
        eval_fid.main(["--real", str(real), "--fake", str(tmp_path / "bad"), "--inception", str(inception_file),
                       "--dims", "64"])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and "broken.png: cannot read this image" in err and "Traceback" not in err


def test_command_line_argument_errors(tmp_path, capsys):
    for args in (["--fake", "a", "--runs", "b"], [], ["--fake", "a", "--clip", "c"], ["--fake", "a", "--table", "t"],
                 ["--fake", "a", "--dims", "100"]):
        with pytest.raises(SystemExit):
            eval_fid.parse_args(["--real", "r", "--inception", "i", *args])
    assert "--dims" in capsys.readouterr().err
    for args, message in ((["--scheduler", "euler"], "argument --scheduler: invalid choice: 'euler'"),
                          (["--sample-steps", "0"], "argument --sample-steps: must be between 1 and 999, got 0")):
        with pytest.raises(SystemExit) as stopped:
            eval_fid.parse_args(["--runs", "r", "--inception", "i", *args])
        assert stopped.value.code == 2 and message in capsys.readouterr().err
