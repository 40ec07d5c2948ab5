"""Evaluation: FID/KID (torch-fidelity), digits-FID, CLIP score, reports.

Importing this package is cheap: names load on first use, and torch-fidelity is imported
only by the functions that compute with it.

- :func:`frechet_distance` (``mu1, sigma1, mu2, sigma2 -> float``): the closed form between
  two Gaussians.
- :func:`digits_features`, :func:`digits_fid`: features of the shipped digits classifier and
  FID on them (CPU-scale; see :mod:`onestep.eval.digits_net` for the one preprocessing).
- :func:`compute_fid_kid` and friends (:mod:`onestep.eval.fidelity`): FID/KID through
  torch-fidelity with the ``digits`` or Inception extractor, reference statistics cached.
- :func:`clip_score` (:mod:`onestep.eval.clip`): ``100 * max(cos, 0)`` averaged.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "frechet_distance": "frechet",
    "feature_statistics": "frechet",
    "digits_features": "digits_net",
    "digits_fid": "digits_net",
    "digits_logits": "digits_net",
    "quantize_digits": "digits_net",
    "compute_fid_kid": "fidelity",
    "extract_features": "fidelity",
    "reference_statistics": "fidelity",
    "register_extractors": "fidelity",
    "clip_score": "clip",
    "read_prompts": "clip",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
