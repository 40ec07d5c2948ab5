"""Exact quality metrics for samples of a 2-D Gaussian mixture (the ``gmm-*`` teachers).

For a mixture ``sum_k w_k N(mu_k, sig_k^2 I)`` and samples ``x_1 .. x_N``:

- a sample is *held* by mode k when ``|x - mu_k| < 3 sig_k`` (the presets' modes are far
  enough apart that no sample is held by two modes);
- ``held_k`` = share of all samples held by mode k;
- ``modes_covered``: modes with ``held_k >= 0.5 w_k`` (a mode holds at least half of its true weight);
- ``within_3std``: ``sum_k held_k``, the share of samples that lie on some mode
  (about 0.989 for exact samples in 2-D);
- ``mode_weights``: ``held / sum(held)``, the student's weights over the modes, and
  ``tv = 0.5 * sum_k |mode_weights_k - w_k|``, their total-variation distance to the true weights;
- ``sliced_w2``: sliced Wasserstein-2 distance to exact mixture samples (fixed seed),
  ``sqrt(mean over directions of W2^2 of the 1-D projections)``, 256 random directions.
  Exact samples score a small positive value at finite N (the sampling floor); compare
  against the ``reference`` row of the benchmark, not against 0.
"""

from __future__ import annotations

import torch

Mixture = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def held_by_mode(samples: torch.Tensor, mixture: Mixture) -> torch.Tensor:
    """``(K,)`` share of ``samples`` lying within 3 std of each mode's centre."""
    means, stds, _ = (m.double() for m in mixture)
    x = samples.double().reshape(len(samples), -1)
    dist = torch.cdist(x, means)  # (N, K)
    inside = dist < 3 * stds[None, :]
    return inside.double().sum(0) / max(1, len(x))


def sample_mixture(mixture: Mixture, n: int, seed: int = 0) -> torch.Tensor:
    """``n`` exact samples of the mixture (float64), reproducible from ``seed``."""
    means, stds, weights = (m.double() for m in mixture)
    g = torch.Generator().manual_seed(seed)
    k = torch.multinomial(weights, n, replacement=True, generator=g)
    return means[k] + stds[k, None] * torch.randn(n, means.shape[1], generator=g, dtype=torch.float64)


def sliced_w2(a: torch.Tensor, b: torch.Tensor, num_directions: int = 256, seed: int = 0) -> float:
    """Sliced Wasserstein-2 distance between two point sets (the larger one is matched by quantiles)."""
    a, b = a.double().reshape(len(a), -1), b.double().reshape(len(b), -1)
    g = torch.Generator().manual_seed(seed)
    dirs = torch.randn(a.shape[1], num_directions, generator=g, dtype=torch.float64)
    dirs = dirs / dirs.norm(dim=0, keepdim=True)
    # Projections as contiguous rows (one per direction): sorting along the last dim is fast.
    pa, pb = (dirs.T @ a.T).sort(dim=1).values, (dirs.T @ b.T).sort(dim=1).values
    n = min(pa.shape[1], pb.shape[1])
    pa, pb = _quantiles(pa, n), _quantiles(pb, n)
    return float(((pa - pb) ** 2).mean().sqrt())


def _quantiles(sorted_rows: torch.Tensor, n: int) -> torch.Tensor:
    """The ``(i + 0.5) / n`` quantiles (linear interpolation) of each already sorted row."""
    m = sorted_rows.shape[1]
    if m == n:
        return sorted_rows
    pos = ((torch.arange(n, dtype=torch.float64) + 0.5) / n) * (m - 1)
    lo = pos.floor().long()
    hi = (lo + 1).clamp(max=m - 1)
    frac = pos - lo
    return sorted_rows[:, lo] * (1 - frac) + sorted_rows[:, hi] * frac


def mixture_metrics(samples: torch.Tensor, mixture: Mixture, reference_size: int = 20000, seed: int = 0) -> dict:
    """All the metrics above for ``samples`` ``(N, 2)`` of ``mixture = (means, stds, weights)``."""
    samples = samples.detach().cpu()
    if samples.ndim != 2 or samples.shape[1] != mixture[0].shape[1]:
        raise ValueError(f"samples must have shape (N, {mixture[0].shape[1]}), got {tuple(samples.shape)}")
    if not torch.isfinite(samples).all():
        raise ValueError("samples contain NaN or inf")
    weights = mixture[2].double()
    held = held_by_mode(samples, mixture)
    on_modes = float(held.sum())
    mode_weights = held / on_modes if on_modes > 0 else torch.zeros_like(held)
    covered = int((held >= 0.5 * weights).sum())
    return {
        "modes_covered": covered,
        "num_modes": len(weights),
        "tv": float(0.5 * (mode_weights - weights).abs().sum()),
        "within_3std": on_modes,
        "sliced_w2": sliced_w2(samples, sample_mixture(mixture, reference_size, seed=seed + 1)),
        "mode_weights": [round(float(w), 4) for w in mode_weights],
        "num_samples": len(samples),
    }


__all__ = ["held_by_mode", "mixture_metrics", "sample_mixture", "sliced_w2"]
