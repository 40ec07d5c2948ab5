"""The digits feature extractor: a small CNN classifier of the 16x16 digits, for CPU-scale FID.

Inception features of 16x16 grey digits say little and cost a 299x299 forward pass per image;
this network is trained on the same data as the digits teacher (scikit-learn's 8x8 digits
upsampled to 16x16, see :mod:`onestep.digits`) and ships as safetensors in
``onestep/assets/digits-features/`` (made by ``python -m onestep.eval.train_digits_features``).
Its features are the 64 pre-activations of the layer before the class logits, standardised
with the per-unit mean and standard deviation over the 1797 real digits (stored with the
weights), so that they have Inception-like scale (KID's polynomial kernel assumes it).

One preprocessing for every image, generated or real (:func:`quantize_digits`):

1. float images in [-1, 1] are clamped and quantised to uint8 as ``round((x + 1) * 127.5)``
   (the quantisation :func:`onestep.viz.to_uint8` uses for PNGs); uint8 images pass as they are;
2. RGB images become grey as the rounded mean of the three channels (exact for grey PNGs);
3. images that are not 16x16 are resized to 16x16 with antialiased bilinear interpolation and
   rounded back to uint8;
4. the network reads ``u8 / 127.5 - 1``.

So a sample gives the same features whether it is scored straight from the sampler or from
the PNG ``onestep sample`` wrote.
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

RESOLUTION = 16
FEATURE_DIM = 64
PREPROCESSING = (
    "digits-v1: float [-1,1] -> uint8 round((x+1)*127.5); RGB -> rounded channel mean; "
    "resize to 16x16 antialiased bilinear if needed; input u8/127.5-1"
)


def _asset_dir() -> Path:
    """The shipped weights: next to the installed ``onestep`` package (``onestep/assets``)."""
    import onestep.assets

    return Path(onestep.assets.__file__).resolve().parent / "digits-features"


class StandardisedFeatureNet(nn.Module):
    """A classifier whose ``feature`` layer (after ``conv``) gives its features: ``features(x)`` its
    pre-activations standardised by the buffers ``feature_mean`` and ``feature_std``, ``forward(x)`` the
    class logits through ``head``. Subclasses build ``conv``, ``feature`` and ``head`` and call
    :meth:`_standardise` for the buffers."""

    def _standardise(self, feature_dim: int) -> None:
        self.register_buffer("feature_mean", torch.zeros(feature_dim))
        self.register_buffer("feature_std", torch.ones(feature_dim))

    def pre_activations(self, x: torch.Tensor) -> torch.Tensor:
        return self.feature(self.conv(x).flatten(1))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return (self.pre_activations(x) - self.feature_mean) / self.feature_std

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.pre_activations(x))


class DigitsFeatureNet(StandardisedFeatureNet):
    """Two conv stages (16x16 -> 8x8 -> 4x4), a 64-unit feature layer, and a 10-way classifier.

    ``features(x)`` returns the feature layer's pre-activations ``(N, 64)``, standardised with the
    buffers ``feature_mean`` and ``feature_std`` (the real digits' statistics; 0 and 1 until set);
    ``forward(x)`` the class logits ``(N, 10)``. ``x`` is ``(N, 1, 16, 16)`` in [-1, 1].
    """

    def __init__(self, width: int = 32, feature_dim: int = FEATURE_DIM, num_classes: int = 10, dropout: float = 0.3):
        super().__init__()
        self.conv = nn.Sequential(
            nn.Conv2d(1, width, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(width, width, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(width, 2 * width, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(2 * width, 2 * width, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.feature = nn.Linear(2 * width * (RESOLUTION // 4) ** 2, feature_dim)
        self.head = nn.Sequential(nn.ReLU(), nn.Dropout(dropout), nn.Linear(feature_dim, num_classes))
        self._standardise(feature_dim)


@lru_cache(maxsize=1)
def load_digits_feature_net(path: str | None = None) -> DigitsFeatureNet:
    """The shipped digits feature network (eval mode, frozen, on CPU), or one saved at ``path``."""
    from safetensors.torch import load_file

    from onestep.errors import OnestepError

    folder = Path(path) if path is not None else _asset_dir()
    cfg_file, weights = folder / "config.json", folder / "model.safetensors"
    if not weights.is_file() or not cfg_file.is_file():
        raise OnestepError(
            f"digits feature extractor not found in {folder} (config.json + model.safetensors); "
            "make it with `python -m onestep.eval.train_digits_features`"
        )
    cfg = json.loads(cfg_file.read_text())
    net = DigitsFeatureNet(width=cfg["width"], feature_dim=cfg["feature_dim"], num_classes=cfg["num_classes"])
    net.load_state_dict(load_file(weights))
    net.requires_grad_(False)
    return net.eval()


def quantize_digits(images: torch.Tensor) -> torch.Tensor:
    """The one preprocessing of every image scored with the digits extractor (see the module doc).

    Args:
        images: ``(N, C, H, W)`` with ``C`` 1 or 3; uint8 in 0..255, or float in [-1, 1] (clamped).

    Returns:
        uint8 ``(N, 1, 16, 16)``.
    """
    from onestep.errors import OnestepError

    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise OnestepError(f"digits features need images of shape (N, 1 or 3, H, W), got {tuple(images.shape)}")
    x = images.detach()
    if x.dtype != torch.uint8:
        x = ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    if x.shape[1] == 3:
        x = x.float().mean(dim=1, keepdim=True).round().to(torch.uint8)
    if x.shape[-2:] != (RESOLUTION, RESOLUTION):
        x = F.interpolate(x.float(), size=(RESOLUTION, RESOLUTION), mode="bilinear", antialias=True, align_corners=False)
        x = x.round().clamp(0, 255).to(torch.uint8)
    return x


def network_input(u8: torch.Tensor) -> torch.Tensor:
    """uint8 ``(N, 1, 16, 16)`` -> the network's float input in [-1, 1]."""
    return u8.float() / 127.5 - 1.0


@torch.no_grad()
def digits_features(images: torch.Tensor, batch_size: int = 256) -> np.ndarray:
    """Features of the shipped digits classifier.

    Args:
        images: uint8 ``(N, 1, 16, 16)`` in 0..255, or float ``(N, 1, 16, 16)`` in [-1, 1] (the digits
            teacher's output range; clamped). RGB and other sizes are accepted and converted as
            :func:`quantize_digits` documents.
        batch_size: images per forward pass (the result does not depend on it).

    Returns:
        ``(N, 64)`` float64 features.
    """
    net = load_digits_feature_net()
    u8 = quantize_digits(images.cpu())
    out = [net.features(network_input(u8[i : i + batch_size])).double() for i in range(0, len(u8), batch_size)]
    return torch.cat(out).numpy() if out else np.zeros((0, FEATURE_DIM))


@torch.no_grad()
def digits_logits(images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """Class logits ``(N, 10)`` of the shipped digits classifier (same input conventions)."""
    net = load_digits_feature_net()
    u8 = quantize_digits(images.cpu())
    return torch.cat([net(network_input(u8[i : i + batch_size])) for i in range(0, len(u8), batch_size)])


@lru_cache(maxsize=1)
def _real_digits_statistics() -> tuple[np.ndarray, np.ndarray]:
    from onestep.digits import digits_dataset

    from .frechet import feature_statistics

    return feature_statistics(digits_features(digits_dataset()[0]))


def digits_fid(fake: torch.Tensor, real: torch.Tensor | None = None) -> float:
    """digits-FID: the Frechet distance between digits-classifier features of two image sets.

    Args:
        fake: the generated images (uint8 in 0..255 or float in [-1, 1], ``(N, 1, 16, 16)``).
        real: the reference images (same conventions); default the bundled real digits set (all
            1797 images of :func:`onestep.digits.digits_dataset`).

    Both sides go through :func:`quantize_digits`. FID is biased upwards for small sets; compare
    values computed on the same number of images (the real digits split in halves, 898 against
    899, give the floor recorded in ``benchmarks/RESULTS.md``).
    """
    from .frechet import feature_statistics, frechet_distance

    mu1, s1 = feature_statistics(digits_features(fake))
    mu2, s2 = _real_digits_statistics() if real is None else feature_statistics(digits_features(real))
    return frechet_distance(mu1, s1, mu2, s2)
