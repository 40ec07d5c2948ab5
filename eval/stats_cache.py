"""Reference statistics for FID/KID, cached as ``.npz`` files.

A statistics file holds ``mu``, ``sigma``, the ``features`` (for KID) and ``meta``. Its name and
its ``meta`` carry a key made of the reference (the bundled digits, or a folder with its files'
names, sizes and times), the extractor, its weights and the preprocessing
(:func:`stats_key`); a file whose key does not match is never used. The cache lives in
``onestep.files.cache_dir("fid-stats")`` (``$ONESTEP_CACHE/fid-stats``, default
``~/.cache/onestep/fid-stats``) unless a folder or a file is named.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from onestep.errors import OnestepError
from onestep.files import cache_dir as onestep_cache_dir

from .extractors import ExtractorSpec, default_layer, extract_features, inception_weights_file, resolve_extractor
from .images import image_files, load_images


def default_cache_dir() -> Path:
    """``onestep.files.cache_dir("fid-stats")``: ``$ONESTEP_CACHE/fid-stats``, default ``~/.cache/onestep/fid-stats``."""
    return onestep_cache_dir("fid-stats")


def _weights_identity(path: str | None) -> str:
    if path is None:
        return ""
    st = Path(path).stat()
    return f"{Path(path).name}:{st.st_size}"


def _source_identity(ref: str) -> tuple[str, str]:
    """(a short slug, a string that changes whenever the reference images change)."""
    if ref == "digits":
        return "digits", "onestep.digits: sklearn load_digits, 1797 images, bilinear 8x8 -> 16x16"
    folder = Path(ref).expanduser().resolve()
    npz = folder / "samples.npz"
    files = [npz] if npz.is_file() else image_files(folder)
    listing = [(f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in files]
    return folder.name or "folder", json.dumps([str(folder), listing])


def stats_key(ref: str, spec: ExtractorSpec, weights: str | None) -> dict[str, str]:
    """What a cached statistics file must match: the reference, the extractor, its weights, the preprocessing."""
    slug, source = _source_identity(ref)
    fields = {"source": source, "extractor": spec.name, "layer": default_layer(spec), "weights": _weights_identity(weights), "preprocessing": spec.preprocessing}
    fields["key"] = hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:20]
    fields["slug"] = slug
    return fields


def save_stats(path: Path, features: np.ndarray, meta: dict[str, Any]) -> dict[str, Any]:
    from .frechet import feature_statistics

    mu, sigma = feature_statistics(features)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.stem + ".tmp.npz")
    np.savez(tmp, mu=mu, sigma=sigma, features=features.astype(np.float32), meta=np.array(json.dumps(meta)))
    tmp.replace(path)
    return {"mu": mu, "sigma": sigma, "features": features, "meta": meta, "path": str(path), "cached": False}


def load_stats(path: Path, expect: dict[str, str] | None = None) -> dict[str, Any]:
    """Read a statistics ``.npz`` (``mu``, ``sigma``; optional ``features`` for KID and ``meta``).

    With ``expect``, a file written by onestep must carry the same extractor and preprocessing key.
    """
    try:
        with np.load(path, allow_pickle=False) as d:
            if "mu" not in d or "sigma" not in d:
                raise OnestepError(f"{path}: a statistics file needs arrays 'mu' and 'sigma' (found {sorted(d.files)})")
            mu, sigma = d["mu"].astype(np.float64), d["sigma"].astype(np.float64)
            feats = d["features"].astype(np.float64) if "features" in d else None
            meta = json.loads(str(d["meta"])) if "meta" in d else {}
    except (ValueError, OSError) as e:
        raise OnestepError(f"{path}: not a readable .npz of statistics ({e})") from e
    if not isinstance(meta, dict):
        raise OnestepError(f"{path}: its 'meta' is not an object of statistics metadata; use another --ref-stats file or delete it")
    if mu.ndim != 1 or sigma.shape != (len(mu), len(mu)) or (feats is not None and (feats.ndim != 2 or feats.shape[1] != len(mu))):
        shapes = f"mu {mu.shape}, sigma {sigma.shape}" + (f", features {feats.shape}" if feats is not None else "")
        raise OnestepError(f"{path}: {shapes} are not a mean (D,), a covariance (D, D) and features (N, D)")
    if expect is not None and meta:
        for k in ("extractor", "layer", "preprocessing", "weights"):
            if meta.get(k) != expect.get(k):
                raise OnestepError(
                    f"{path} was computed with {k} {meta.get(k)!r}, not {expect.get(k)!r}; use another --ref-stats file or delete it"
                )
    return {"mu": mu, "sigma": sigma, "features": feats, "meta": meta, "path": str(path), "cached": True}


def reference_statistics(
    ref: str = "digits",
    extractor: str = "digits",
    stats_path: str | Path | None = None,
    cache_dir: str | Path | None = None,
    batch_size: int = 256,
    device: torch.device | str | None = None,
    inception_weights: str | Path | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Statistics of the reference side, from the cache when they are there.

    Args:
        ref: ``"digits"`` (the bundled real digits, all 1797), a folder of images, or ``None``
            when ``stats_path`` names an existing file.
        stats_path: a statistics ``.npz``: read when it exists, else computed from ``ref`` and
            written there. Without it, the file lives in ``cache_dir`` under a name that holds
            the cache key (reference, extractor, weights, preprocessing).

    Returns:
        ``{"mu", "sigma", "features" (None for foreign files), "meta", "path", "cached"}``;
        ``cached`` is True when nothing was recomputed.
    """
    spec = resolve_extractor(extractor)
    weights = str(inception_weights_file(inception_weights)) if spec.needs_weights else None
    if stats_path is not None and Path(stats_path).is_file():
        expect = stats_key(ref, spec, weights) if ref is not None else {"extractor": spec.name, "layer": default_layer(spec), "preprocessing": spec.preprocessing, "weights": _weights_identity(weights)}
        return load_stats(Path(stats_path), expect)
    if ref is None:
        raise OnestepError(f"--ref-stats {stats_path} does not exist and no --ref was given to compute it from")
    key = stats_key(ref, spec, weights)
    path = Path(stats_path) if stats_path is not None else Path(cache_dir or default_cache_dir()) / f"{key['slug']}-{spec.name}-{key['key']}.npz"
    if path.is_file():
        return load_stats(path, key)
    if ref == "digits":
        from onestep.digits import digits_dataset

        images = digits_dataset()[0]
    else:
        images = load_images(ref)
    feats = extract_features(images, extractor, batch_size, device, inception_weights, progress)
    meta = {k: v for k, v in key.items() if k != "slug"} | {"num_images": len(images), "reference": str(ref)}
    return save_stats(path, feats, meta)
