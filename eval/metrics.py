"""FID, KID, precision and recall of generated images against reference statistics, through torch-fidelity.

FID is torch-fidelity's ``fid_statistics_to_metric`` on the two feature Gaussians, KID its
``kid_features_to_metric`` (polynomial kernel, subsets), precision and recall its ``prc``
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
    """FID (torch-fidelity's ``fid_statistics_to_metric``), KID (``kid_features_to_metric``, polynomial
    kernel of degree 3, ``kid_subsets`` subsets of ``min(kid_subset_size, N_gen, N_ref)`` images each)
    and, with ``prc``, precision and recall (k-NN manifolds with ``prc_k`` neighbours,
    :func:`onestep.eval.precision_recall.precision_recall`, distances on ``device``) of generated
    features against reference statistics. KID and precision/recall need the reference features."""
    import_torch_fidelity()
    from torch_fidelity.metric_fid import KEY_METRIC_FID, fid_statistics_to_metric
    from torch_fidelity.metric_kid import KEY_METRIC_KID_MEAN, KEY_METRIC_KID_STD, kid_features_to_metric

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
        k = kid_features_to_metric(
            torch.from_numpy(np.asarray(features)), torch.from_numpy(ref["features"]),
            kid_subsets=kid_subsets, kid_subset_size=size, rng_seed=seed, verbose=False,
        )
        out.update(kid=k[KEY_METRIC_KID_MEAN], kid_std=k[KEY_METRIC_KID_STD], kid_subset_size=size, kid_subsets=kid_subsets)
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
