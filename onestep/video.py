"""Toy video data: short clips of a moving digit, and the motion / appearance metrics of clips.

A clip is ``(1, F, 16, 16)`` grey in [-1, 1] (channels, frames, height, width: the sample layout of
diffusers' ``UNet3DConditionModel``). One of scikit-learn's 8x8 digits (its 16 grey levels scaled to
[-1, 1]) sits on a black 16x16 background and moves with a constant integer velocity ``(vy, vx)``
pixels per frame, drawn per clip from :data:`VELOCITIES` (8 directions, speeds 1 and 2). The class
label is the digit. The split is by digit index: the first :data:`TRAIN_SPLIT` digits make training
clips, the rest test clips; :func:`clips_dataset` is deterministic in its seed.

Metrics: :func:`centroids` (the intensity-weighted centre of each frame), :func:`clip_velocity` (the
least-squares slope of the centroid over the frames, pixels per frame, and the residual of that line:
how far the motion is from constant), :func:`frame_classes` (each frame's digit through the digits classifier of
:mod:`onestep.digits`, on 8x8 windows around the frame's centroid).
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F

FRAMES = 4
SIZE = 16
DIGIT = 8
NUM_CLASSES = 10
TRAIN_SPLIT = 1500
#: (vy, vx) in pixels per frame: 8 directions at speed 1 (axis) / sqrt(2) (diagonal), and twice that
VELOCITIES = [(sy * k, sx * k) for k in (1, 2) for sy, sx in ((0, 1), (0, -1), (1, 0), (-1, 0), (1, 1), (1, -1), (-1, 1), (-1, -1))]


@lru_cache(maxsize=1)
def _digits8() -> tuple[torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits

    d = load_digits()
    return torch.from_numpy(d.images.astype(np.float32) / 16.0), torch.from_numpy(d.target.astype(np.int64))


def render_clip(digit: torch.Tensor, start: tuple[int, int], velocity: tuple[int, int], frames: int = FRAMES) -> torch.Tensor:
    """A clip ``(1, frames, 16, 16)`` in [-1, 1] of an 8x8 ``digit`` (in [0, 1]) whose top-left corner is
    ``start + f * velocity`` at frame ``f`` (it must stay inside the frame)."""
    clip = torch.zeros(frames, SIZE, SIZE)
    for f in range(frames):
        y, x = start[0] + f * velocity[0], start[1] + f * velocity[1]
        if not (0 <= y <= SIZE - DIGIT and 0 <= x <= SIZE - DIGIT):
            raise ValueError(f"frame {f}: the digit at ({y}, {x}) leaves the {SIZE}x{SIZE} frame")
        clip[f, y : y + DIGIT, x : x + DIGIT] = digit
    return (clip * 2 - 1).unsqueeze(0)


def _start(velocity: tuple[int, int], frames: int, gen: torch.Generator) -> tuple[int, int]:
    """A random top-left corner from which the digit stays inside the frame for ``frames`` frames."""
    out = []
    for v in velocity:
        lo, hi = max(0, -v * (frames - 1)), SIZE - DIGIT - max(0, v * (frames - 1))
        out.append(int(torch.randint(lo, hi + 1, (1,), generator=gen)))
    return out[0], out[1]


def clips_dataset(split: str = "train", n: int | None = None, seed: int = 0, frames: int = FRAMES) -> dict[str, torch.Tensor]:
    """``n`` clips of the split's digits (default one per digit), deterministic in ``seed``.

    Returns a dict: ``clips (n, 1, frames, 16, 16)`` in [-1, 1], ``labels (n,)``, ``velocity (n, 2)``
    (vy, vx, pixels per frame), ``start (n, 2)``.
    """
    images, labels = _digits8()
    if split == "train":
        idx = torch.arange(0, TRAIN_SPLIT)
    elif split == "test":
        idx = torch.arange(TRAIN_SPLIT, len(images))
    else:
        raise ValueError(f"split must be 'train' or 'test', not {split!r}")
    gen = torch.Generator().manual_seed(seed)
    n = len(idx) if n is None else n
    pick = idx[torch.randint(0, len(idx), (n,), generator=gen)] if n != len(idx) else idx
    clips, vel, starts = [], [], []
    for i in pick.tolist():
        v = VELOCITIES[int(torch.randint(0, len(VELOCITIES), (1,), generator=gen))]
        s = _start(v, frames, gen)
        clips.append(render_clip(images[i], s, v, frames))
        vel.append(v)
        starts.append(s)
    return {
        "clips": torch.stack(clips),
        "labels": labels[pick].clone(),
        "velocity": torch.tensor(vel, dtype=torch.float32),
        "start": torch.tensor(starts, dtype=torch.long),
    }


def still_frames(split: str = "train", n: int = 256, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Image data alone: ``n`` single frames ``(n, 1, 16, 16)`` (a digit at a random place, no motion) and their labels."""
    d = clips_dataset(split, n, seed, frames=1)
    return d["clips"][:, :, 0], d["labels"]


# ------------------------------------------------------------------ metrics


def frames_of(clips: torch.Tensor) -> torch.Tensor:
    """``(B, C, F, H, W)`` clips as ``(B * F, C, H, W)`` images (frame-major within each clip)."""
    b, c, f, h, w = clips.shape
    return clips.permute(0, 2, 1, 3, 4).reshape(b * f, c, h, w)


def frame_differences(clips: torch.Tensor) -> torch.Tensor:
    """MCM's motion representation: ``x[:, :, f + 1] - x[:, :, f]``, ``(B, C, F - 1, H, W)``; zero for a
    clip that is one image repeated, unchanged when a per-clip constant image is added to every frame."""
    return clips[:, :, 1:] - clips[:, :, :-1]


def centroids(clips: torch.Tensor) -> torch.Tensor:
    """Intensity-weighted centre ``(y, x)`` of each frame, ``(B, F, 2)`` in pixels; weights ``(x + 1) / 2``
    clamped to [0, 1] (the black background weighs nothing)."""
    w = ((clips.float().mean(1) + 1) / 2).clamp(0, 1)  # (B, F, H, W)
    ys = torch.arange(w.shape[-2], dtype=torch.float32)
    xs = torch.arange(w.shape[-1], dtype=torch.float32)
    mass = w.sum((-1, -2)).clamp(min=1e-6)
    cy = (w.sum(-1) * ys).sum(-1) / mass
    cx = (w.sum(-2) * xs).sum(-1) / mass
    return torch.stack([cy, cx], -1)


def clip_velocity(clips: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(velocity (B, 2), residual (B,))``: least-squares slope of the centroid over the frames (pixels per
    frame) and the root-mean-square distance of the centroids from that line (0 for constant motion)."""
    c = centroids(clips)
    f = torch.arange(c.shape[1], dtype=torch.float32)
    fc = (f - f.mean())[None, :, None]
    vel = (fc * (c - c.mean(1, keepdim=True))).sum(1) / (fc**2).sum()
    fit = c.mean(1, keepdim=True) + fc * vel[:, None, :]
    residual = ((c - fit) ** 2).sum(-1).mean(1).sqrt()
    return vel, residual


def _crops(images: torch.Tensor, corners: torch.Tensor) -> torch.Tensor:
    """The 8x8 windows at ``corners (N, 2)`` of ``(N, 1, 16, 16)`` images, upsampled to 16x16 as
    :mod:`onestep.digits` upsamples the 8x8 digits (bilinear), in [-1, 1]."""
    w = ((images.float() + 1) / 2).clamp(0, 1)
    crops = torch.stack([w[i, :, y : y + DIGIT, x : x + DIGIT] for i, (y, x) in enumerate(corners.tolist())])
    return F.interpolate(crops, size=(SIZE, SIZE), mode="bilinear", align_corners=False).clamp(0, 1) * 2 - 1


def classify_frames(images: torch.Tensor) -> torch.Tensor:
    """The digit class of each ``(N, 1, 16, 16)`` frame: the 8x8 windows around the intensity centroid
    (the centred one and its 8 neighbours, one pixel off) go through the digits classifier
    (:func:`onestep.digits.classify_digits`'s SVC) and the window with the largest decision score wins.
    On real test clips this gives about 90 % (the exact window: 100 %)."""
    from .digits import _classifier

    clf = _classifier()
    c = centroids(images.unsqueeze(2))[:, 0]  # (N, 2)
    base = (c - (DIGIT - 1) / 2).round().long()
    best = torch.full((len(images),), -float("inf"), dtype=torch.float64)
    pred = torch.zeros(len(images), dtype=torch.long)
    for dy in (-1, 0, 1):
        for dx in (-1, 0, 1):
            corners = (base + torch.tensor([dy, dx])).clamp(0, SIZE - DIGIT)
            scores = torch.from_numpy(clf.decision_function(_crops(images, corners).flatten(1).numpy()))
            top, cls = scores.max(1)
            better = top > best
            best[better], pred[better] = top[better], cls[better]
    return pred


def frame_classes(clips: torch.Tensor) -> torch.Tensor:
    """The class of every frame of ``(B, 1, F, 16, 16)`` clips, ``(B, F)`` (:func:`classify_frames`)."""
    b, _, f = clips.shape[:3]
    return classify_frames(frames_of(clips.detach().cpu())).view(b, f)


__all__ = [
    "DIGIT",
    "FRAMES",
    "NUM_CLASSES",
    "SIZE",
    "TRAIN_SPLIT",
    "VELOCITIES",
    "centroids",
    "clip_velocity",
    "clips_dataset",
    "classify_frames",
    "frame_classes",
    "frame_differences",
    "frames_of",
    "render_clip",
    "still_frames",
]
