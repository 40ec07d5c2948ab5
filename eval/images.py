"""Images as the evaluators read them: the one uint8 quantisation, and folders of image files.

Every evaluator scores images as they would be written to PNG: floats in [-1, 1] become uint8
as ``round((x + 1) * 127.5)`` (:func:`as_uint8`). :func:`load_images` reads a folder (an
``onestep sample`` output folder from its raw ``samples.npz``, any other from its image files).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from onestep.errors import OnestepError
from onestep.files import IMAGE_SUFFIXES

U8_RULE = "float [-1,1] -> uint8 round((x+1)*127.5); uint8 as is"


def as_uint8(images: torch.Tensor) -> torch.Tensor:
    """Images as uint8, same shape: floats in [-1, 1] clamped and quantised as ``round((x + 1) * 127.5)``
    (as PNGs are written), uint8 as they are. Not differentiable."""
    x = images.detach()
    if x.dtype != torch.uint8:
        x = ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x


def image_files(folder: Path) -> list[Path]:
    """The image files of ``folder`` (suffixes :data:`onestep.files.IMAGE_SUFFIXES`), sorted by name."""
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())


def load_images(folder: str | Path) -> torch.Tensor:
    """The images of a folder as uint8 ``(N, C, H, W)`` (C = 1 if all are grey, else 3).

    A folder written by ``onestep sample`` (it has ``samples.npz``) is read from the raw float
    samples (the same values its PNGs hold after quantisation, without ``grid.png``); any other
    folder from its image files (``.png .jpg .jpeg .webp .bmp``, sorted by name; all one size).
    """
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise OnestepError(f"{folder}: no such folder")
    npz = folder / "samples.npz"
    if npz.is_file():
        with np.load(npz, allow_pickle=False) as d:
            x = torch.from_numpy(d["samples"]).float()
        if x.ndim != 4 or x.shape[1] not in (1, 3):
            raise OnestepError(f"{npz}: samples of shape {tuple(x.shape)} are not images")
        return as_uint8(x)
    files = image_files(folder)
    if not files:
        raise OnestepError(f"{folder}: no images ({', '.join(IMAGE_SUFFIXES)}) and no samples.npz")
    pics = [_open_image(f) for f in files]
    grey = all(p.mode in ("L", "1", "I;16", "I") for p in pics)
    arrays = [np.asarray(p.convert("L" if grey else "RGB")) for p in pics]
    sizes = {a.shape[:2] for a in arrays}
    if len(sizes) > 1:
        raise OnestepError(f"{folder}: images of different sizes {sorted(sizes)[:3]}; resize them to one size first")
    x = torch.from_numpy(np.stack(arrays))
    return x.unsqueeze(1) if grey else x.permute(0, 3, 1, 2).contiguous()


def _open_image(file: Path):
    from PIL import Image

    try:
        return Image.open(file)
    except OSError as e:  # PIL's UnidentifiedImageError: a damaged file or not an image at all
        raise OnestepError(f"{file}: not a readable image ({e}); remove it or replace it") from e


__all__ = ["U8_RULE", "as_uint8", "image_files", "load_images"]
