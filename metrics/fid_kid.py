"""FID and KID from two sets of image features (eval_fid.py extracts them; the formulas are its docstring's).

FID (Heusel et al. 2017): `statistics` (mean, covariance) of each set, then `frechet_distance`, with tr sqrt(S1 S2)
from eigenvalues (`trace_sqrt_product`) or, as pytorch-fid does, by scipy's sqrtm (`trace_sqrtm`). KID (Binkowski
et al. 2018): `kid`, the unbiased squared MMD with the cubic polynomial kernel (`polynomial_mmd`) over random subsets,
as torchmetrics computes it. `fid_kid`: both, for every feature width, with the small-set warnings.
"""
from __future__ import annotations

import warnings

import numpy as np
import torch
from scipy import linalg


def statistics(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and covariance (unbiased, n - 1) of (n, d) features, in float64."""
    features = np.asarray(features, dtype=np.float64)
    if features.ndim != 2 or features.shape[0] < 2:
        raise ValueError(f"statistics need an (n, d) feature array with n >= 2, got shape {features.shape}")
    return features.mean(0), np.cov(features, rowvar=False)


FID_SQRTM = ("eigh", "exact")  # how tr sqrt(S1 S2) is computed: `trace_sqrt_product`, or pytorch-fid's sqrtm


def trace_sqrt_product(sigma1: np.ndarray, sigma2: np.ndarray) -> float:
    """tr sqrt(S1 S2) of two covariances (symmetric positive semi-definite), from eigenvalues, in float64.

    Factor S1 = F F^T: F is S1's Cholesky factor L, or, when S1 is singular (no Cholesky), F = V W^(1/2) from
    S1 = V W V^T (numpy's eigh), with the columns of eigenvalues <= 0 (zero up to round-off) dropped.
    1. S1 S2 = F (F^T S2) and M = (F^T S2) F have the same nonzero eigenvalues, with multiplicity (AB and BA
       always do). M = F^T S2 F is symmetric positive semi-definite, so they are real and >= 0, and a symmetric
       eigensolver finds them stably; the ones that are zero come out as +-round-off, and the negatives are
       clipped to 0. (sqrt(S1) S2 sqrt(S1) is M for F = sqrt(S1); every F gives the same eigenvalues.) With
       F = L, LAPACK does all of it in one call: scipy's eigh(S2, S1, type=2) solves S2 S1 v = lambda v by
       forming L^T S2 L.
    2. With S1 invertible, S1 S2 = F M F^-1 is similar to M: diagonalisable with those eigenvalues lambda_i,
       so its principal square root F M^(1/2) F^-1 has eigenvalues sqrt(lambda_i), and
       tr sqrt(S1 S2) = sum_i sqrt(lambda_i).
    3. Rank-deficient S1 (fewer images than feature dimensions): S1 S2 may then have no square root at all
       (a Jordan block at 0), which is where scipy's sqrtm can fail and pytorch-fid adds 1e-6 to both
       diagonals. sum_i sqrt(lambda_i) is still defined, and is the limit of tr sqrt((S1 + e I)(S2 + e I)) as
       e -> 0 (eigenvalues are continuous), so this route adds no offset. Where pytorch-fid's sqrtm succeeds on
       such a product (scipy >= 1.16's does on every one in tests/test_eval_fid.py), the two agree to 1e-8
       relative; its offset, where taken, moves FID by about 1e-6 relative.
    An eigenvalue of S1 or M below -1e-6, whose square root would have an imaginary part beyond the 1e-3 that
    pytorch-fid tolerates, is an error: such statistics are not covariances.
    Cost: a Cholesky factor (or eigh), L^T S2 L and a symmetric eigensolver, against sqrtm's Schur form of the
    non-symmetric product: 10x faster or more at 2048 dimensions (bench/fid.py).
    """
    sigma1, sigma2 = (np.asarray(s, dtype=np.float64) for s in (sigma1, sigma2))
    try:
        lambdas = linalg.eigh(sigma2, sigma1, type=2, eigvals_only=True)
    except np.linalg.LinAlgError:  # S1 singular: no Cholesky factor
        w, V = np.linalg.eigh(sigma1)
        check_real_root(w.min())
        F = V[:, w > 0] * np.sqrt(w[w > 0])
        lambdas = np.linalg.eigvalsh(F.T @ sigma2 @ F)
    check_real_root(lambdas.min())
    return float(np.sqrt(np.clip(lambdas, 0, None)).sum())


def check_real_root(smallest: float) -> None:
    """Refuse an eigenvalue below -1e-6: its square root's imaginary part would pass pytorch-fid's 1e-3."""
    if smallest < -1e-6:
        raise ValueError(f"Frechet distance: the square root has an imaginary component of up to "
                         f"{np.sqrt(-smallest):.3g}: the statistics are numerically unsound")


def trace_sqrtm(sigma1: np.ndarray, sigma2: np.ndarray, eps: float = 1e-6) -> float:
    """tr sqrt(S1 S2) as pytorch-fid computes it: scipy's sqrtm of the product; when that is not finite (a
    singular product), `eps` added to both diagonals. A non-negligible imaginary part (diagonal beyond 1e-3)
    is an error, not silently dropped."""
    def sqrtm(a: np.ndarray) -> np.ndarray:
        with warnings.catch_warnings():  # singularity is detected below, from the result
            warnings.simplefilter("ignore")
            return linalg.sqrtm(a)

    covmean = sqrtm(sigma1 @ sigma2)
    if not np.isfinite(covmean).all():
        warnings.warn(f"Frechet distance: singular covariance product; adding {eps} to the diagonals")
        offset = np.eye(sigma1.shape[0]) * eps
        covmean = sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(f"Frechet distance: the square root has an imaginary component of up to "
                             f"{np.abs(covmean.imag).max():.3g}: the statistics are numerically unsound")
        covmean = covmean.real
    return float(np.trace(covmean))


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray,
                     sqrtm: str = "eigh") -> float:
    """|mu1 - mu2|^2 + Tr(S1 + S2 - 2 sqrt(S1 S2)), the Frechet distance of two Gaussians.

    sqrtm="eigh": the trace of the square root from eigenvalues (`trace_sqrt_product`), equal to pytorch-fid's
    figure within 1e-6 relative; "exact": pytorch-fid's own computation (`trace_sqrtm`), for comparison.
    """
    mu1, mu2 = np.atleast_1d(mu1), np.atleast_1d(mu2)
    sigma1, sigma2 = np.atleast_2d(sigma1), np.atleast_2d(sigma2)
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != mu1.shape * 2:
        raise ValueError(f"Frechet distance: shapes differ: means {mu1.shape} and {mu2.shape}, "
                         f"covariances {sigma1.shape} and {sigma2.shape}")
    if sqrtm not in FID_SQRTM:
        raise ValueError(f"sqrtm must be one of {FID_SQRTM}, got {sqrtm!r}")
    trace = trace_sqrt_product(sigma1, sigma2) if sqrtm == "eigh" else trace_sqrtm(sigma1, sigma2)
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * trace)


def polynomial_mmd(x: np.ndarray, y: np.ndarray, degree: int = 3, coef: float = 1.0) -> float:
    """Unbiased squared MMD of two equal-size samples with k(a, b) = (a.b / d + coef)^degree (KID's kernel)."""
    m, d = x.shape
    k_xx, k_yy, k_xy = ((a @ b.T / d + coef) ** degree for a, b in ((x, x), (y, y), (x, y)))
    within = (k_xx.sum() - np.trace(k_xx) + k_yy.sum() - np.trace(k_yy)) / (m * (m - 1))
    return float(within - 2 * k_xy.sum() / m ** 2)


def kid(real: np.ndarray, fake: np.ndarray, subsets: int = 100, subset_size: int = 1000,
        seed: int = 0) -> dict[str, float]:
    """Kernel Inception distance: mean and (population) std of `polynomial_mmd` over random subsets.

    Each subset takes `subset_size` images from each set without replacement, drawn with torch.randperm
    from a generator seeded with `seed`, real then fake, as torchmetrics' KernelInceptionDistance draws
    them after torch.manual_seed(seed). Where a set has no more than `subset_size` images, subsets of
    half the smaller set are used instead, so that they differ and the std means something (each
    subset's MMD is unbiased whatever its size; torchmetrics refuses such sets).
    """
    smaller = min(len(real), len(fake))
    size = subset_size if subset_size < smaller else smaller // 2
    if size < 2:
        raise ValueError(f"KID needs at least 4 images in each set, got {len(real)} real and {len(fake)} fake")
    gen = torch.Generator().manual_seed(seed)
    scores = []
    for _ in range(subsets):
        r = real[torch.randperm(len(real), generator=gen)[:size].numpy()]
        f = fake[torch.randperm(len(fake), generator=gen)[:size].numpy()]
        scores.append(polynomial_mmd(r.astype(np.float64), f.astype(np.float64)))
    return {"mean": float(np.mean(scores)), "std": float(np.std(scores)), "subsets": subsets, "subset_size": size}


def fid_kid(real: dict[int, np.ndarray], fake: dict[int, np.ndarray], kid_subsets: int = 100,
            kid_subset_size: int = 1000, seed: int = 0, sqrtm: str = "eigh") -> dict:
    """FID for every feature set in `real` (and `fake`; keyed by Inception width, or a reader's domain), KID on
    the widest; with small-set warnings.
    `sqrtm`: how FID's tr sqrt(S1 S2) is computed (`frechet_distance`), recorded as "fid_sqrtm"."""
    dims = sorted(real, key=lambda d: real[d].shape[1])
    n_real, n_fake = len(real[dims[0]]), len(fake[dims[0]])
    notes = [f"{min(n_real, n_fake)} images for {real[d].shape[1]}-dimensional features: the covariance is singular "
             f"and FID is strongly biased at this size; compare FIDs only at equal image counts, and prefer KID"
             for d in dims if min(n_real, n_fake) <= real[d].shape[1]]
    for note in notes:
        warnings.warn(note)
    fid = {str(d): frechet_distance(*statistics(real[d]), *statistics(fake[d]), sqrtm=sqrtm) for d in dims}
    return {"images": {"real": n_real, "fake": n_fake}, "fid": fid, "fid_sqrtm": sqrtm,
            "kid": {"dims": dims[-1], **kid(real[dims[-1]], fake[dims[-1]], kid_subsets, kid_subset_size, seed)},
            "warnings": notes}
