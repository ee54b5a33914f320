"""Bootstrap 95% intervals (metrics/intervals.py) on cases with a known answer, and the tables' intervals and marks
(evaluation/tables.py)."""
import numpy as np
import pytest
from scipy import stats

from evaluation import tables
from metrics import intervals
from metrics.fid_kid import frechet_distance, polynomial_mmd, statistics


def coverage(interval_of, draw, truth, trials=60):
    """The share of `trials` independent draws whose interval holds `truth`."""
    hits = [lo <= truth <= hi for lo, hi in (interval_of(*draw(np.random.default_rng(t)), t) for t in range(trials))]
    return float(np.mean(hits))


def test_a_share_s_interval_covers_its_true_value_about_95_percent_of_the_time():
    p, n = 0.3, 120
    share = coverage(lambda hits, seed: intervals.mean_interval(hits, 400, seed),
                     lambda rng: (rng.random(n) < p,), p, trials=200)
    # 200 trials: a true 95% coverage lies in [0.91, 0.98] with probability 0.95 or more
    assert 0.9 <= share <= 0.985


def test_fid_s_interval_covers_fid_s_expectation_at_its_set_sizes():
    """The estimand is FID measured on as many images (its mean over fresh draws, found here by Monte Carlo):
    what equal-size FIDs compare. Two Gaussians a unit apart in one of 8 dimensions: FID at infinite size 1."""
    def draw(rng):
        real, fake = rng.normal(size=(256, 8)), rng.normal(size=(128, 8))
        fake[:, 0] += 1.0
        return real, fake
    expected = np.mean([frechet_distance(*statistics(r), *statistics(f))
                        for r, f in (draw(np.random.default_rng(10_000 + i)) for i in range(300))])
    assert 1.2 < expected < 1.5  # the bias at these sizes: about 8 (1/256 + 1/128)
    share = coverage(lambda r, f, seed: intervals.fid_interval(r, f, 200, seed), draw, expected, trials=40)
    assert share >= 0.85  # measured 0.95


def test_kid_s_interval_covers_zero_for_one_distribution_and_not_for_two():
    def same(rng):
        return rng.normal(size=(200, 8)), rng.normal(size=(100, 8))
    def apart(rng):
        real, fake = same(rng)
        return real, fake + np.eye(8)[0]
    assert coverage(lambda r, f, seed: intervals.kid_interval(r, f, 200, seed), same, 0.0, trials=40) >= 0.9
    assert coverage(lambda r, f, seed: intervals.kid_interval(r, f, 200, seed), apart, 0.0, trials=20) == 0.0


def test_kid_s_resampled_mmd_with_all_counts_one_is_the_unbiased_mmd(monkeypatch):
    """A resample that draws each image once is the sets themselves: the weighted form is polynomial_mmd."""
    rng = np.random.default_rng(0)
    real, fake = rng.normal(size=(50, 6)), rng.normal(size=(50, 6)) + 0.3
    seen, original = [], intervals.bootstrap
    def once(statistic, sizes, resamples, seed):
        seen.append(statistic(*(np.ones(n) for n in sizes)))
        return original(statistic, sizes, resamples, seed)
    monkeypatch.setattr(intervals, "bootstrap", once)
    intervals.kid_interval(real, fake, 10)
    assert seen[0] == pytest.approx(polynomial_mmd(real, fake), rel=1e-10)


def test_intervals_narrow_as_sets_grow():
    rng = np.random.default_rng(1)
    widths = [np.diff(intervals.mean_interval(rng.random(n) < 0.5, 400))[0] for n in (50, 800)]
    assert widths[1] < widths[0] / 2.5  # about 1 / sqrt(16) = 1/4


def test_tables_give_the_t_interval_over_seeds_and_a_single_run_s_own_interval():
    rows = [{"method": "a", "adherence": v} for v in (0.5, 0.6, 0.7)] + \
           [{"method": "b", "adherence": 0.2, "intervals": {"adherence": [0.1, 0.3]}}]
    a, b = tables.summarise(rows, ["adherence"])
    half = stats.t.ppf(0.975, 2) * np.std([0.5, 0.6, 0.7], ddof=1) / np.sqrt(3)
    assert a["adherence"]["low"] == pytest.approx(0.6 - half) and a["adherence"]["high"] == pytest.approx(0.6 + half)
    assert (b["adherence"]["low"], b["adherence"]["high"], b["adherence"]["std"]) == (0.1, 0.3, None)
    assert "| a | 3 | **0.6 [0.3516, 0.8484]** |" in tables.markdown_table([a, b], ["adherence"], marked=("adherence",))


def test_tables_mark_a_best_only_where_its_interval_separates():
    rows = [{"method": "a", "FID": v} for v in (1.0, 2.0, 3.0)] + [{"method": "b", "FID": v} for v in (2.5, 3.0, 3.5)]
    markdown = tables.markdown_table(tables.summarise(rows, ["FID"]), ["FID"], marked=("FID",))
    assert "**" not in markdown  # a's mean is lower, but the intervals overlap: no mark
    rows = [{"method": "a", "FID": v} for v in (1.0, 1.1, 1.2)] + [{"method": "b", "FID": v} for v in (2.5, 2.6, 2.7)]
    markdown = tables.markdown_table(tables.summarise(rows, ["FID"]), ["FID"], marked=("FID",))
    assert "| a | 3 | **1.1 [" in markdown and "| b | 3 | 2.6 [" in markdown
