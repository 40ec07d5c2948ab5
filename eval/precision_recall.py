"""Precision and recall of generated images on feature vectors (Kynkäänniemi et al., 2019,
"Improved Precision and Recall Metric for Assessing Generative Models").

Each set's manifold is the union of balls around its points; a point's ball reaches its k-th
nearest neighbour in the same set (k = 3 by default; the point itself is not counted). Precision
is the share of generated points inside the real manifold (are the samples realistic?), recall
the share of real points inside the generated manifold (is every kind of real image drawn?). A
mode-seeking student keeps a high precision and shows its missing modes as a low recall, where
FID folds both into one number.

Computed with torch-fidelity's ``prc_features_to_metric`` (torch-fidelity 0.4 and later, its
``prc`` metric); with an older torch-fidelity, with :func:`knn_precision_recall` (the same
definition: a point is inside a ball when its distance is ``<=`` the radius). Both compare
``N_fake x N_real`` distances in blocks of ``batch_size`` rows, so the memory stays bounded.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from onestep.errors import OnestepError

PRC_DEFINITION = (
    "precision = share of generated features within the k-NN radius of some real feature; recall = share of real "
    "features within the k-NN radius of some generated feature (Kynkaanniemi et al. 2019, torch-fidelity's prc)"
)


def _as_tensor(x: np.ndarray | torch.Tensor, device: torch.device | str | None) -> torch.Tensor:
    t = x if isinstance(x, torch.Tensor) else torch.from_numpy(np.asarray(x))
    return t.to(device) if device is not None else t


def knn_radii(features: torch.Tensor, k: int = 3, batch_size: int = 10000) -> torch.Tensor:
    """The distance of each point to its ``k``-th nearest neighbour within ``features`` (itself excluded)."""
    return torch.cat([torch.cdist(b, features).kthvalue(k + 1, dim=1).values for b in features.split(batch_size)])


def _inside(points: torch.Tensor, centres: torch.Tensor, radii: torch.Tensor, batch_size: int) -> torch.Tensor:
    """For each of ``points``: is it within ``radii[j]`` of some ``centres[j]``?"""
    return torch.cat([(torch.cdist(b, centres) <= radii).any(dim=1) for b in points.split(batch_size)])


def knn_precision_recall(fake: torch.Tensor, real: torch.Tensor, k: int = 3, batch_size: int = 10000) -> tuple[float, float]:
    """``(precision, recall)`` of ``fake`` ``(N, D)`` against ``real`` ``(M, D)`` features (see the module doc)."""
    precision = _inside(fake, real, knn_radii(real, k, batch_size), batch_size).double().mean()
    recall = _inside(real, fake, knn_radii(fake, k, batch_size), batch_size).double().mean()
    return float(precision), float(recall)


def torch_fidelity_precision_recall(fake: torch.Tensor, real: torch.Tensor, k: int = 3, batch_size: int = 10000) -> tuple[float, float] | None:
    """``(precision, recall)`` from torch-fidelity's ``prc_features_to_metric``; None when the installed
    torch-fidelity (< 0.4) has no ``prc``."""
    try:
        from torch_fidelity.metric_prc import KEY_METRIC_PRECISION, KEY_METRIC_RECALL, prc_features_to_metric
    except ImportError:
        return None
    m = prc_features_to_metric(fake, real, prc_neighborhood=k, prc_batch_size=batch_size, save_cpu_ram=True, verbose=False)
    return float(m[KEY_METRIC_PRECISION]), float(m[KEY_METRIC_RECALL])


def precision_recall(
    fake: np.ndarray | torch.Tensor,
    real: np.ndarray | torch.Tensor,
    k: int = 3,
    device: torch.device | str | None = None,
    batch_size: int = 10000,
) -> dict[str, Any]:
    """k-NN precision and recall of generated features against real ones.

    Args:
        fake: ``(N, D)`` features of the generated images.
        real: ``(M, D)`` features of the reference images (same extractor and layer).
        k: the neighbourhood size (3 in the paper and in torch-fidelity).
        device: where the distances are computed (default: where the features are; CPU for arrays).
            Distances are computed in float32, as torch-fidelity computes its features.
        batch_size: rows of the distance matrix computed at once.

    Returns:
        ``{"precision", "recall", "prc_neighborhood": k, "prc_implementation"}``.
    """
    f, r = _as_tensor(fake, device), _as_tensor(real, device)
    if f.ndim != 2 or r.ndim != 2 or f.shape[1] != r.shape[1]:
        raise OnestepError(f"precision/recall need (N, D) features of one width, got {tuple(f.shape)} and {tuple(r.shape)}")
    if k < 1:
        raise OnestepError(f"the precision/recall neighbourhood k must be at least 1 (got {k})")
    if min(len(f), len(r)) < k + 1:
        raise OnestepError(f"precision/recall with k={k} need at least {k + 1} images a side (got {len(f)} generated, {len(r)} reference)")
    f, r = f.float(), r.float()  # torch-fidelity's features are float32: the same distances as its own prc
    pr = torch_fidelity_precision_recall(f, r, k, batch_size)
    implementation = "torch-fidelity prc_features_to_metric"
    if pr is None:
        pr, implementation = knn_precision_recall(f, r, k, batch_size), "onestep knn_precision_recall"
    return {"precision": pr[0], "recall": pr[1], "prc_neighborhood": k, "prc_implementation": implementation}
