"""FID, KID, precision and recall of generated images against reference statistics, through torch-fidelity.

FID is torch-fidelity's ``fid_statistics_to_metric`` on the two feature Gaussians, KID its
``kid_features_to_metric``'s definition (polynomial kernel, subsets, the same subset draws) computed
by :func:`kid_from_features` with each kernel entry evaluated once, precision and recall its ``prc``
(k-NN manifolds, k = 3; :mod:`onestep.eval.precision_recall`). :func:`compute_fid_kid` is the whole
path: reference statistics (cached, :mod:`onestep.eval.stats_cache`), features of the generated
images (:mod:`onestep.eval.extractors`), the metrics.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from onestep.errors import OnestepError

from .extractors import check_weights_early, default_layer, extract_features, import_torch_fidelity, resolve_extractor
from .images import load_images
from .stats_cache import reference_statistics

_KID_BLOCK_BYTES = 64 * 2**20  # one block of kernel rows at a time: memory stays bounded whatever N is


def _kid_subset_sums(x: torch.Tensor, y: torch.Tensor, s1: torch.Tensor, s2: torch.Tensor) -> torch.Tensor:
    """Per subset ``j``: the off-diagonal sum of ``K_XX`` over subset ``s1[j]``, the same of ``K_YY``
    over ``s2[j]``, and the sum of ``K_XY`` over ``s1[j] x s2[j]``; ``s1``/``s2`` are 0/1 membership
    rows over the rows of ``x``/``y``, ``k(a, b) = (a.b / d + 1)^3``. Returns ``(3, subsets)``.

    The kernel is evaluated block by block, each entry once; the symmetric ``K_XX`` and ``K_YY``
    only on and above the diagonal blocks (entries above count twice)."""
    d = x.shape[1]

    def kern(a, b):
        return (a @ b.T / d + 1) ** 3

    def sym(a, s):
        step = max(1, min(512, _KID_BLOCK_BYTES // (a.element_size() * len(a))))  # small blocks: less below the diagonal
        total = torch.zeros(s.shape[0], dtype=a.dtype)
        for i in range(0, len(a), step):
            blk = kern(a[i : i + step], a[i:])  # rows i.., columns i..
            w = s[:, i : i + step]
            blk[:, : w.shape[1]].fill_diagonal_(0)  # off-diagonal sums: drop k(a_i, a_i)
            own = ((w @ blk[:, : w.shape[1]]) * w).sum(1)
            rest = ((w @ blk[:, w.shape[1] :]) * s[:, i + w.shape[1] :]).sum(1)
            total += own + 2 * rest
        return total

    step = max(1, _KID_BLOCK_BYTES // (x.element_size() * len(y)))
    xy = torch.zeros(s1.shape[0], dtype=x.dtype)
    for i in range(0, len(x), step):
        xy += ((s1[:, i : i + step] @ kern(x[i : i + step], y)) * s2).sum(1)
    return torch.stack([sym(x, s1), sym(y, s2), xy])


def kid_from_features(
    features_1: np.ndarray | torch.Tensor,
    features_2: np.ndarray | torch.Tensor,
    kid_subsets: int = 100,
    kid_subset_size: int = 1000,
    seed: int = 0,
    dtype: torch.dtype = torch.float64,
) -> tuple[float, float]:
    """KID as torch-fidelity's ``kid_features_to_metric`` defines it: ``kid_subsets`` subsets of
    ``kid_subset_size`` rows a side (drawn exactly as it draws them: ``np.random.RandomState(seed)``,
    ``choice(n, size, replace=False)`` for side 1 then side 2, subset by subset), the unbiased MMD^2
    with ``k(x, y) = (x.y / d + 1)^3`` on each, and the mean and (population) std over subsets.

    torch-fidelity recomputes three ``size x size x d`` kernel products per subset (100 subsets:
    ~100x the work for N = size). Here every kernel entry among the rows any subset uses is computed
    once (in ``dtype``; float64 as torch-fidelity does on this project's float64 features) and each
    subset's sums are read off with 0/1 membership vectors. Where the subsets cover few of many rows
    (large N) that would cost more than per-subset products, so each subset gets its own, as there.
    Returns ``(mean, std)``; equal to torch-fidelity's up to float rounding."""
    f1 = torch.as_tensor(np.asarray(features_1)).to(dtype)
    f2 = torch.as_tensor(np.asarray(features_2)).to(dtype)
    (n1, d), n2, m = f1.shape, len(f2), int(kid_subset_size)
    if f2.shape[1] != d or n1 < m or n2 < m or m < 2:
        raise OnestepError(f"KID needs {max(m, 2)}+ samples a side of one width; got {tuple(f1.shape)} and {tuple(f2.shape)}")
    rng = np.random.RandomState(seed)
    idx = [(rng.choice(n1, m, replace=False), rng.choice(n2, m, replace=False)) for _ in range(kid_subsets)]
    u1 = np.unique(np.concatenate([a for a, _ in idx])) if idx else np.zeros(0, dtype=int)
    u2 = np.unique(np.concatenate([b for _, b in idx])) if idx else np.zeros(0, dtype=int)
    if len(u1) ** 2 + len(u2) ** 2 + 2 * len(u1) * len(u2) <= 4 * kid_subsets * m * m:  # kernel entries computed
        pos1, pos2 = np.searchsorted(u1, [a for a, _ in idx]), np.searchsorted(u2, [b for _, b in idx])
        s1, s2 = torch.zeros(kid_subsets, len(u1), dtype=dtype), torch.zeros(kid_subsets, len(u2), dtype=dtype)
        rows = torch.arange(kid_subsets)[:, None]
        s1[rows, torch.from_numpy(pos1)] = 1
        s2[rows, torch.from_numpy(pos2)] = 1
        sums = _kid_subset_sums(f1[torch.from_numpy(u1)], f2[torch.from_numpy(u2)], s1, s2)
    else:
        one = torch.ones(1, m, dtype=dtype)
        sums = torch.cat([_kid_subset_sums(f1[torch.from_numpy(a)], f2[torch.from_numpy(b)], one, one) for a, b in idx], 1)
    mmd = ((sums[0] + sums[1]) / (m * (m - 1)) - 2 * sums[2] / (m * m)).double().numpy()
    return float(np.mean(mmd)), float(np.std(mmd))


def fid_kid_from_features(
    features: np.ndarray,
    ref: dict[str, Any],
    kid: bool = True,
    kid_subsets: int = 100,
    kid_subset_size: int = 1000,
    seed: int = 0,
    prc: bool = True,
    prc_k: int = 3,
    device: torch.device | str | None = None,
) -> dict[str, Any]:
    """FID (torch-fidelity's ``fid_statistics_to_metric``), KID (torch-fidelity's ``kid_features_to_metric``
    as :func:`kid_from_features` computes it: polynomial kernel of degree 3, ``kid_subsets`` subsets of ``min(kid_subset_size, N_gen, N_ref)`` images each)
    and, with ``prc``, precision and recall (k-NN manifolds with ``prc_k`` neighbours,
    :func:`onestep.eval.precision_recall.precision_recall`, distances on ``device``) of generated
    features against reference statistics. KID and precision/recall need the reference features."""
    import_torch_fidelity()
    from torch_fidelity.metric_fid import KEY_METRIC_FID, fid_statistics_to_metric

    from .frechet import feature_statistics

    mu, sigma = feature_statistics(features)
    if len(mu) != len(ref["mu"]):
        raise OnestepError(
            f"the reference statistics ({ref.get('path', 'given')}) hold {len(ref['mu'])} features, this extractor gives "
            f"{len(mu)}: they come from another extractor; use --ref-stats of this one or delete the file"
        )
    out: dict[str, Any] = {
        "fid": fid_statistics_to_metric({"mu": mu, "sigma": sigma}, {"mu": ref["mu"], "sigma": ref["sigma"]}, verbose=False)[KEY_METRIC_FID]
    }
    if kid and ref.get("features") is not None:
        size = min(kid_subset_size, len(features), len(ref["features"]))
        kid_mean, kid_std = kid_from_features(features, ref["features"], kid_subsets=kid_subsets, kid_subset_size=size, seed=seed)
        out.update(kid=kid_mean, kid_std=kid_std, kid_subset_size=size, kid_subsets=kid_subsets)
    elif kid:
        out.update(kid=None, kid_note="the reference statistics file holds no features; KID needs them")
    if prc and ref.get("features") is not None and min(len(features), len(ref["features"])) > prc_k:
        from .precision_recall import precision_recall

        out.update(precision_recall(features, ref["features"], k=prc_k, device=device))
    elif prc:
        why = "the reference statistics file holds no features" if ref.get("features") is None else f"fewer than {prc_k + 1} images a side"
        out.update(precision=None, recall=None, prc_note=f"{why}; precision/recall (k={prc_k}) need them")
    return out


def compute_fid_kid(
    fake: torch.Tensor | str | Path,
    ref: str | None = "digits",
    extractor: str = "digits",
    ref_stats: str | Path | None = None,
    cache_dir: str | Path | None = None,
    batch_size: int = 256,
    device: torch.device | str | None = None,
    inception_weights: str | Path | None = None,
    kid: bool = True,
    kid_subset_size: int = 1000,
    seed: int = 0,
    progress: bool = False,
    prc: bool = True,
    prc_k: int = 3,
) -> dict[str, Any]:
    """FID, KID, precision and recall of ``fake`` (images, or a folder of them) against a reference, with torch-fidelity.

    Args:
        fake: uint8 or [-1, 1] float images ``(N, C, H, W)``, or a folder (see :func:`onestep.eval.images.load_images`).
        ref: ``"digits"``, a folder of images, or None with an existing ``ref_stats`` file.
        extractor: ``"digits"``, ``"inception"`` or a name given to :func:`onestep.eval.extractors.register_extractor`.
        ref_stats: a statistics ``.npz`` to read, or to write on first use.

    Returns:
        ``{"fid", "kid", "kid_std", "precision", "recall", "num_fake", "num_ref", "extractor", "preprocessing", "ref_stats", "ref_cached", ...}``
    """
    check_weights_early(extractor, inception_weights)  # fail fast, before any extraction
    spec = resolve_extractor(extractor)
    ref_s = reference_statistics(ref, extractor, ref_stats, cache_dir, batch_size, device, inception_weights, progress)
    images = load_images(fake) if isinstance(fake, (str, Path)) else fake
    feats = extract_features(images, extractor, batch_size, device, inception_weights, progress)
    out = fid_kid_from_features(feats, ref_s, kid=kid, kid_subset_size=kid_subset_size, seed=seed, prc=prc, prc_k=prc_k, device=device)
    out.update(
        num_fake=len(feats),
        num_ref=ref_s["meta"].get("num_images", None if ref_s["features"] is None else len(ref_s["features"])),
        extractor=spec.name,
        feature_layer=default_layer(spec),
        preprocessing=spec.preprocessing,
        ref=str(ref) if ref is not None else None,
        ref_stats=ref_s["path"],
        ref_cached=ref_s["cached"],
    )
    return out
