"""Bootstrap 95% intervals for the scores of one set of generated images against one set of real ones.

A score computed from a few hundred images is an estimate; its interval says how far another draw of images could
move it. The bootstrap (Efron & Tibshirani 1993, the percentile interval): draw each set again, with replacement,
as many images as it has; compute the score on the resample; repeat; the 2.5th and 97.5th percentiles of the
resampled scores bound the 95% interval. A resample is a vector of counts c (how often each image was drawn), so
every score here is a weighted form of its own formula:
- adherence and each attribute: the mean of per-image hits (0 or 1), weighted by c;
- FID (metrics/fid_kid.py): the Frechet distance of the weighted means and covariances;
- KID: the unbiased squared MMD with KID's kernel, where pairs of one image with its own copy count as the
  diagonal the unbiased estimate leaves out.
FID is biased upward as sets shrink (by about d (1/n_real + 1/n_fake) for d-dimensional features), and a resample
holds about 63% distinct images, so the resampled FIDs sit above the estimate by a further bias b (their mean
minus the estimate). FID's interval is the percentile interval moved down by b (the bootstrap's bias correction,
Efron & Tibshirani 1993, section 10.2), and not below 0: an interval for FID at these set sizes (its expectation
over draws of as many images), which is how FIDs of equal-size sets are compared. FID at infinitely many images
is lower by the bias that a real-against-real floor at the same sizes shows (evaluation/phantom_scores.py, `reference_scores`).
tests/test_intervals.py measures the coverage: of FID's expectation at the set sizes, 0.95 to 1. KID's estimate
is unbiased and adherence is a mean, so theirs are the plain percentile intervals.
"""
from __future__ import annotations

from typing import Callable

import numpy as np

from metrics.fid_kid import frechet_distance

LEVEL = 0.95
RESAMPLES = 1000


def percentile_interval(values: np.ndarray, level: float = LEVEL) -> list[float]:
    """[low, high]: the central `level` share of the resampled scores."""
    tail = 100 * (1 - level) / 2
    return [float(np.percentile(values, tail)), float(np.percentile(values, 100 - tail))]


def bootstrap(statistic: Callable[..., float], sizes: tuple[int, ...], resamples: int = RESAMPLES,
              seed: int = 0) -> np.ndarray:
    """`statistic(*counts)` on `resamples` resamples: one count vector per set, each set of sizes[i] images
    drawn again with replacement (a multinomial draw of sizes[i] from sizes[i] equally likely images)."""
    rng = np.random.default_rng(seed)
    return np.array([statistic(*(rng.multinomial(n, np.full(n, 1 / n)) for n in sizes)) for _ in range(resamples)])


def mean_interval(hits: np.ndarray, resamples: int = RESAMPLES, seed: int = 0) -> list[float]:
    """The interval of a share (adherence, an attribute's accuracy): the mean of per-image hits."""
    hits = np.asarray(hits, dtype=np.float64)
    if len(hits) == 0:
        return [float("nan"), float("nan")]
    return percentile_interval(bootstrap(lambda c: float(c @ hits) / len(hits), (len(hits),), resamples, seed))


def weighted_statistics(features: np.ndarray, c: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and covariance (n - 1) of a resample given by its counts c over the rows of `features`."""
    n = c.sum()
    mu = c @ features / n
    centred = features - mu
    return mu, (centred * c[:, None]).T @ centred / (n - 1)


def fid_interval(real: np.ndarray, fake: np.ndarray, resamples: int = RESAMPLES, seed: int = 0) -> list[float]:
    """FID's interval: both sets resampled, the Frechet distance of their weighted statistics, corrected for the
    resamples' bias (see above)."""
    def fid(cr, cf):
        return frechet_distance(*weighted_statistics(real, cr), *weighted_statistics(fake, cf))
    estimate = fid(np.ones(len(real)), np.ones(len(fake)))
    resampled = bootstrap(fid, (len(real), len(fake)), resamples, seed)
    low, high = percentile_interval(resampled - (resampled.mean() - estimate))
    return [max(low, 0.0), max(high, 0.0)]


def kid_interval(real: np.ndarray, fake: np.ndarray, resamples: int = RESAMPLES, seed: int = 0) -> list[float]:
    """KID's interval: the unbiased squared MMD with k(a, b) = (a.b / d + 1)^3 on each whole resample; the kernel
    matrices are computed once, and a resample weighs them by its counts."""
    d = real.shape[1]
    k_rr, k_ff, k_rf = ((a @ b.T / d + 1) ** 3 for a, b in ((real, real), (fake, fake), (real, fake)))
    def within(k, c):  # the sum over pairs of distinct images and its number of pairs
        return c @ k @ c - (c * c) @ np.diag(k), c.sum() ** 2 - c @ c
    def mmd(cr, cf):
        (s_r, p_r), (s_f, p_f) = within(k_rr, cr), within(k_ff, cf)
        return s_r / p_r + s_f / p_f - 2 * (cr @ k_rf @ cf) / (cr.sum() * cf.sum())
    return percentile_interval(bootstrap(mmd, (len(real), len(fake)), resamples, seed))
