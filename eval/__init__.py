"""Evaluation: FID/KID and precision/recall (torch-fidelity), digits-FID, CLIP and CLAP scores, COCO text-to-image, reports.

Importing this package is cheap: names load on first use, and torch-fidelity is imported
only by the functions that compute with it.

Modules:

- :mod:`~onestep.eval.frechet`: :func:`frechet_distance` (``mu1, sigma1, mu2, sigma2 -> float``),
  the closed form between two Gaussians, and :func:`feature_statistics`.
- :mod:`~onestep.eval.digits_net`: the shipped digits classifier; :func:`digits_features`,
  :func:`digits_fid` (CPU-scale FID; the one preprocessing is documented there);
  :mod:`~onestep.eval.train_digits_features` retrains it.
- :mod:`~onestep.eval.images`: the uint8 quantisation every evaluator uses, image folders.
- :mod:`~onestep.eval.extractors`: feature extractors registered with torch-fidelity (``digits``,
  Inception-v3 from local weights, your own via :func:`register_extractor`) and :func:`extract_features`.
- :mod:`~onestep.eval.stats_cache`: reference statistics cached as ``.npz`` (:func:`reference_statistics`).
- :mod:`~onestep.eval.metrics`: FID/KID (and precision/recall) through torch-fidelity (:func:`compute_fid_kid`).
- :mod:`~onestep.eval.precision_recall`: k-NN precision and recall on features
  (``onestep.eval.precision_recall.precision_recall``, k = 3).
- :mod:`~onestep.eval.clip`: :func:`clip_score`, ``100 * max(cos, 0)`` averaged, on
  :mod:`onestep.clip`'s CLIP wrapper.
- :mod:`~onestep.eval.clap`: :func:`clap_score`, the mean CLAP cosine of sounds and their prompts
  (``onestep eval clap``).
- :mod:`~onestep.eval.mixture`: mode coverage and weights for the 2D mixture teachers.
- :mod:`~onestep.eval.generate`: sampling students and checkpoints for evaluation.
- :mod:`~onestep.eval.report`: ``metrics.json``, tables, plots, ``report.md``.
- :mod:`~onestep.eval.t2i`: ``onestep eval t2i``, the COCO captions protocol (FID-30K, CLIP score, precision/recall).
- :mod:`~onestep.eval.commands` and :mod:`~onestep.eval.cli`: ``onestep eval fid | clip | clap | run | t2i | sr``.
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
    "compute_fid_kid": "metrics",
    "extract_features": "extractors",
    "register_extractor": "extractors",
    "register_extractors": "extractors",
    "reference_statistics": "stats_cache",
    "clip_score": "clip",
    "clap_score": "clap",
    "read_prompts": "onestep.teachers.text",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        module = _EXPORTS[name]
        value = getattr(importlib.import_module(module if module.startswith("onestep.") else f"{__name__}.{module}"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
