"""Pictures: sample grids for images, scatter plots for 2D teachers, labelled comparisons."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path, dpi: int) -> Path:
    # tight_layout ignores a suptitle: keep a band of 0.45 inch free for it
    top = 1.0 if not fig.get_suptitle() else 1.0 - 0.45 / fig.get_figheight()
    fig.tight_layout(rect=(0, 0, 1, top))
    fig.savefig(path, dpi=dpi)
    _plt().close(fig)
    return path


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """``(N, C, H, W)`` in [-1, 1] -> ``(N, H, W, C)`` uint8 (the one quantisation used everywhere)."""
    x = ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu().numpy()


def tile(images: torch.Tensor, nrow: int, pad: int = 1) -> np.ndarray:
    """Tile ``(N, C, H, W)`` images in [-1, 1] into one uint8 array, ``nrow`` images per row."""
    arr = to_uint8(images)
    n, h, w, c = arr.shape
    rows = (n + nrow - 1) // nrow
    out = np.full((rows * (h + pad) + pad, nrow * (w + pad) + pad, c), 255, dtype=np.uint8)
    for i in range(n):
        r, k = divmod(i, nrow)
        out[pad + r * (h + pad) : pad + r * (h + pad) + h, pad + k * (w + pad) : pad + k * (w + pad) + w] = arr[i]
    return out[..., 0] if c == 1 else out


#: Image grids enlarge small images (nearest neighbour, by a whole factor) to at least this many pixels a side.
MIN_TILE = 64


def save_image_grid(x: torch.Tensor, path: str | Path, title: str = "", nrow: int = 10) -> Path:
    """Save ``(N, C, H, W)`` images in [-1, 1] as one PNG grid at their own resolution (small images
    enlarged by a whole factor to :data:`MIN_TILE` pixels), ``nrow`` a row, ``title`` in the PNG's
    metadata. Fast at any size: no plotting library (8 images of 512 px in well under a second)."""
    from PIL import Image
    from PIL.PngImagePlugin import PngInfo

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    factor = max(1, -(-MIN_TILE // max(x.shape[-2:])))
    if factor > 1:
        x = torch.nn.functional.interpolate(x.detach().float(), scale_factor=factor, mode="nearest")
    info = PngInfo()
    if title:
        info.add_text("Title", title)
    Image.fromarray(tile(x, min(nrow, len(x)))).save(path, pnginfo=info)
    return path


def save_samples_picture(x: torch.Tensor, path: str | Path, title: str = "", nrow: int = 10) -> Path:
    """Save samples as a picture: an image grid for ``(N, C, H, W)`` (:func:`save_image_grid`), one clip a
    row (frames left to right) for video ``(N, C, F, H, W)``, a scatter plot for ``(N, 2)``."""
    if x.ndim == 5:
        return save_image_grid(x.transpose(1, 2).flatten(0, 1), path, title, nrow=x.shape[2])
    if x.ndim != 2:
        return save_image_grid(x, path, title, nrow)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5, 5))
    pts = x.detach().float().cpu().numpy()
    ax.scatter(pts[:, 0], pts[:, 1], s=3, alpha=0.5)
    ax.set_aspect("equal")
    lim = max(6.0, float(np.abs(pts).max()) * 1.05) if len(pts) else 6.0
    ax.set_xlim(-lim, lim)
    ax.set_ylim(-lim, lim)
    if title:
        ax.set_title(title)
    return _save(fig, path, dpi=100)


def save_comparison(
    panels: list[tuple[str, torch.Tensor]],
    path: str | Path,
    row_labels: list[str],
    per_row: int,
    title: str = "",
) -> Path:
    """Side-by-side labelled grids: each panel is ``(heading, images)`` with ``len(row_labels) * per_row``
    images in row-major order (row ``i`` holds the samples for ``row_labels[i]``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    plt = _plt()
    rows = len(row_labels)
    fig, axes = plt.subplots(1, len(panels), figsize=(2.2 + 1.0 * per_row * len(panels), 0.9 * rows + 1.2))
    axes = np.atleast_1d(axes)
    for ax, (heading, imgs) in zip(axes, panels):
        grid = tile(imgs, per_row, pad=2)
        ax.imshow(grid, cmap="gray", interpolation="nearest", vmin=0, vmax=255)
        h = imgs.shape[-2] + 2
        ax.set_yticks([2 + h * i + (h - 2) / 2 for i in range(rows)])
        ax.set_yticklabels(row_labels)
        ax.set_xticks([])
        ax.set_title(heading, fontsize=11)
        for s in ax.spines.values():
            s.set_visible(False)
    if title:
        fig.suptitle(title)
    return _save(fig, path, dpi=110)


def save_clip_gifs(x: torch.Tensor, out: str | Path, fps: float = 4.0, prefix: str = "clip") -> list[Path]:
    """Each video sample of ``x`` ``(N, C, F, H, W)`` in [-1, 1] as an endlessly looping GIF
    ``<prefix>_00000.gif``, ... in ``out``, scaled up (nearest) until the shorter side is at least 128 pixels."""
    from PIL import Image

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    n, _, f, h, w = x.shape
    factor = max(1, -(-128 // min(h, w)))
    frames = x.detach().float().transpose(1, 2).flatten(0, 1)  # (N * F, C, H, W), clip-major
    if factor > 1:
        frames = torch.nn.functional.interpolate(frames, scale_factor=factor, mode="nearest")
    arr = to_uint8(frames).reshape(n, f, h * factor, w * factor, -1)
    paths = []
    for i in range(n):
        pics = [Image.fromarray(a[..., 0] if a.shape[-1] == 1 else a) for a in arr[i]]
        path = out / f"{prefix}_{i:05d}.gif"
        pics[0].save(path, save_all=True, append_images=pics[1:], duration=int(1000 / fps), loop=0)
        paths.append(path)
    return paths
