"""Pictures between the page and the samplers: uploads to tensors, samples to captioned gallery items.

Samples become ``(H, W[, C])`` uint8 arrays with a caption: images at their own resolution (the page scales
them up without blurring), video clips as one strip of frames each, 2D samples as one scatter picture,
super-resolution inputs at the output size, nearest and bicubic.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from onestep.viz import save_samples_picture, to_uint8

if TYPE_CHECKING:
    from .request import DemoResult

def gallery_items(
    x: torch.Tensor, seeds: list[int], labels: list[int] | None, title: str = "", label_word: str = "class"
) -> list[tuple[np.ndarray, str]]:
    """Images as ``(H, W[, C])`` uint8 arrays at their own resolution, captioned with class and seed;
    video clips ``(N, C, F, H, W)`` as one strip each (frames left to right, one pixel of white between);
    2D samples as one scatter picture (drawn by :func:`onestep.viz.save_samples_picture`)."""
    if x.ndim == 5:
        n, c, f, h, w = x.shape
        strips = torch.ones(n, c, h, f * (w + 1) - 1, dtype=torch.float32)
        for k in range(f):
            strips[..., k * (w + 1) : k * (w + 1) + w] = x[:, :, k].float()
        x = strips
    if x.ndim == 2:
        from PIL import Image

        with tempfile.TemporaryDirectory() as d:
            path = save_samples_picture(x, Path(d) / "scatter.png", title=title)
            pic = np.asarray(Image.open(path).convert("RGB"))
        return [(pic, f"{len(x)} points, seeds {seeds[0]}-{seeds[-1]}")]
    items = []
    for i, img in enumerate(to_uint8(x)):
        caption = f"{label_word} {labels[i]}, seed {seeds[i]}" if labels is not None else f"seed {seeds[i]}"
        items.append((img[..., 0] if img.shape[-1] == 1 else img, caption))
    return items


def result_items(result: DemoResult, teacher: bool = False, title: str = "") -> list[tuple[np.ndarray, str]]:
    """:func:`gallery_items` of the student's (or the teacher's) samples of ``result``; super-resolution
    samples are captioned with their input's index."""
    x = result.teacher_samples if teacher else result.student_samples
    if result.lowres is not None:
        return gallery_items(x, result.seeds, [i % len(result.lowres) for i in range(len(result.seeds))], title, label_word="input")
    return gallery_items(x, result.seeds, result.labels, title)


def input_items(result: DemoResult) -> list[tuple[np.ndarray, str]]:
    """Super-resolution requests: each distinct low-res input at the output size, nearest (the pixels the
    student was given) and bicubic (what plain upsampling makes of them); empty for other students."""
    import torch.nn.functional as F

    if result.lowres is None:
        return []
    size = tuple(result.student_samples.shape[-2:])
    m = min(len(result.lowres), len(result.seeds))
    distinct = result.lowres[:m].float()
    lo = f"{distinct.shape[-1]}x{distinct.shape[-2]}"
    nearest = F.interpolate(distinct, size=size, mode="nearest")
    bicubic = F.interpolate(distinct, size=size, mode="bicubic", align_corners=False).clamp(-1, 1)
    items = []
    for i in range(m):
        for what, pic in ((f"input {i}, low-res {lo}", nearest[i]), (f"input {i}, bicubic", bicubic[i])):
            img = to_uint8(pic[None])[0]
            items.append((img[..., 0] if img.shape[-1] == 1 else img, what))
    return items
