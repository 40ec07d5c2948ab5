"""Target image sets for tuning a student toward a style: the built-in "thick digits" and image folders.

``thick-digits`` is the bundled digits set (:mod:`onestep.digits`) with every stroke thickened by a grey
dilation with a plus-shaped structuring element (each pixel becomes the brightest of itself and its four
neighbours): one pixel wider on each side, still legible at 16x16 (a 3x3 square element merges the loops
of 0, 6, 8 and 9). The images stay index-aligned with :func:`onestep.digits.digits_dataset`, so
``thick_digits()[0][i]`` is the thick version of real digit ``i``: the (winner, loser) pairs of a
preference set, and the style set the tuned student's digits-FID is measured against.

:func:`load_image_folder` reads a folder of images as a set shaped for a pixel-space teacher; images in
sub-folders named by an integer take that class.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from .errors import ConfigError
from .files import IMAGE_SUFFIXES

#: the built-in style sets (names accepted wherever a set of target images is asked for)
STYLE_SETS = ("thick-digits",)
#: the built-in sets the style sets are made from (index-aligned with them)
SOURCE_SETS = ("digits",)


def thicken(x: torch.Tensor) -> torch.Tensor:
    """Grey dilation of ``(N, C, H, W)`` images in [-1, 1] by a plus-shaped element (the maximum of each
    pixel and its 4 neighbours; the border counts as background, -1)."""
    p = F.pad(x, (1, 1, 1, 1), value=-1.0)
    shifts = (p[..., 1:-1, 1:-1], p[..., :-2, 1:-1], p[..., 2:, 1:-1], p[..., 1:-1, :-2], p[..., 1:-1, 2:])
    return torch.stack(shifts).amax(0)


def thick_digits() -> tuple[torch.Tensor, torch.Tensor]:
    """The 1797 bundled digits, thickened: ``(images (N, 1, 16, 16) in [-1, 1], labels (N,))``."""
    from .digits import digits_dataset

    x, y = digits_dataset()
    return thicken(x), y


def builtin_set(name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """A built-in image set by name: ``thick-digits`` or ``digits`` (index-aligned)."""
    if name == "thick-digits":
        return thick_digits()
    if name == "digits":
        from .digits import digits_dataset

        return digits_dataset()
    raise ConfigError(f"unknown built-in image set {name!r}; choose one of {STYLE_SETS + SOURCE_SETS} or give a folder of images")


def load_image_folder(folder: str | Path, sample_shape: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor | None, list[str]]:
    """The images of ``folder`` (recursively, sorted by path) as ``(N, C, H, W)`` floats in [-1, 1], resized
    (antialiased bilinear) to ``sample_shape = (C, H, W)``, grey or RGB as ``C`` asks.

    Returns ``(images, labels, names)``: ``labels`` is the class of each image when every image sits in a
    sub-folder named by an integer (``0/``, ``1/``, ...), None when none does; ``names`` the paths relative
    to ``folder`` (what pairs two folders image by image).
    """
    from PIL import Image

    root = Path(folder).expanduser()
    if not root.is_dir():
        raise ConfigError(f"{folder}: no such folder of images")
    if len(sample_shape) != 3 or sample_shape[0] not in (1, 3):
        raise ConfigError(f"a folder of images fits pixel-space teachers with 1 or 3 channels, not samples of shape {tuple(sample_shape)}")
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise ConfigError(f"{folder}: no images ({', '.join(IMAGE_SUFFIXES)})")
    c, h, w = sample_shape
    images, labels = [], []
    for p in files:
        img = Image.open(p).convert("L" if c == 1 else "RGB")
        t = torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8).float().reshape(img.height, img.width, c)
        t = t.permute(2, 0, 1)[None]
        if t.shape[-2:] != (h, w):
            t = F.interpolate(t, size=(h, w), mode="bilinear", antialias=True, align_corners=False)
        images.append((t[0] / 127.5 - 1.0).clamp(-1, 1))
        parent = p.parent.relative_to(root)
        labels.append(int(parent.name) if parent != Path(".") and parent.name.isdigit() else None)
    names = [str(p.relative_to(root)) for p in files]
    if all(v is None for v in labels):
        return torch.stack(images), None, names
    if any(v is None for v in labels):
        raise ConfigError(f"{folder}: either every image sits in a class sub-folder (0/, 1/, ...) or none does")
    return torch.stack(images), torch.tensor(labels, dtype=torch.long), names


def image_set(name: str, teacher, what: str = "targets") -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """A built-in set or a folder of images, shaped for ``teacher`` (a :class:`onestep.teachers.Teacher`):
    ``(images, conditions, names)``; images without a class get the teacher's null condition."""
    if name in STYLE_SETS + SOURCE_SETS:
        if tuple(teacher.sample_shape) != (1, 16, 16) or teacher.conditioning.kind != "class":
            raise ConfigError(f"{what} {name!r} is made for the digits teacher (1x16x16, class labels); "
                              f"teacher {teacher.name} takes a folder of images")
        x, y = builtin_set(name)
        return x, y, [str(i) for i in range(len(x))]
    x, y, names = load_image_folder(name, teacher.sample_shape)
    return x, teacher.conditioning.null(len(x)) if y is None else y, names


def paired_sets(targets: str, losers: str | None, teacher) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """``(target images, their conditions, losers or None)``: ``losers`` (when given) holds one image per
    target under the same name (the same index for built-in sets)."""
    x, y, names = image_set(targets, teacher, "targets")
    if losers is None:
        return x, y, None
    x_l, _, loser_names = image_set(losers, teacher, "losers")
    if loser_names != names:
        raise ConfigError(f"losers {losers!r} must hold one image per target under the same names as targets {targets!r}")
    return x, y, x_l


__all__ = ["SOURCE_SETS", "STYLE_SETS", "builtin_set", "image_set", "load_image_folder", "paired_sets", "thick_digits", "thicken"]
