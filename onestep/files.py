"""File kinds and where onestep caches things: one home for the suffix lists and the cache root."""

from __future__ import annotations

import os
from pathlib import Path

#: Image files read as data (real images for training, image folders for FID).
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
#: Weight files that would need unpickling: never loaded, refused with a message.
PICKLE_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth", ".pkl", ".pickle")


def cache_dir(name: str) -> Path:
    """``$ONESTEP_CACHE/<name>``, default ``~/.cache/onestep/<name>`` (e.g. ``latents``, ``fid-stats``)."""
    return Path(os.environ.get("ONESTEP_CACHE") or Path.home() / ".cache" / "onestep") / name


__all__ = ["IMAGE_SUFFIXES", "PICKLE_SUFFIXES", "cache_dir"]
