"""Super-resolution metrics against the ground truth: PSNR, an LPIPS-style perceptual error, sharpness.

- :func:`psnr`: ``10 log10(1 / MSE)`` per image on [0, 1] intensities, averaged over images.
- :func:`perceptual_error`: LPIPS-style, on the shipped digits classifier (:mod:`onestep.eval.digits_net`)
  instead of VGG: each image's 64 features are unit-normalised and the squared distance between an
  image's and its ground truth's is averaged (0: same features; 4: opposite). Meaningful for 16x16
  digit-like images only.
- :func:`high_frequency_energy`: energy per pixel of the 2D spectrum at ``min_cycles`` or more cycles per
  image side (either axis); with the default 3 for 16x16 images from 4x4 inputs, the band above the
  low-res image's Nyquist frequency (2 cycles): what upsampling cannot make and an SR model must.
- :func:`sr_scores`: all three for a batch of outputs and their ground truth, with the sharpness also as a
  ratio to the ground truth's.

Images are ``(N, C, H, W)`` floats in [-1, 1].
"""

from __future__ import annotations

import numpy as np
import torch


def _unit(x: torch.Tensor) -> torch.Tensor:
    return (x.detach().float().clamp(-1, 1) + 1) / 2


def psnr_per_image(x: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """PSNR in dB of each image of ``x`` against ``ref`` (peak 1 on [0, 1] intensities), shape ``(N,)``."""
    mse = (_unit(x) - _unit(ref)).pow(2).flatten(1).mean(1).clamp(min=1e-10)
    return 10 * torch.log10(1 / mse)


def psnr(x: torch.Tensor, ref: torch.Tensor) -> float:
    """Mean over images of :func:`psnr_per_image`."""
    return float(psnr_per_image(x, ref).mean())


def perceptual_error_per_image(x: torch.Tensor, ref: torch.Tensor) -> np.ndarray:
    """LPIPS-style error of each image: the squared distance of unit-normalised digits-classifier features."""
    from .digits_net import digits_features

    fx, fr = digits_features(x), digits_features(ref)
    fx = fx / np.linalg.norm(fx, axis=1, keepdims=True).clip(1e-10)
    fr = fr / np.linalg.norm(fr, axis=1, keepdims=True).clip(1e-10)
    return ((fx - fr) ** 2).sum(1)


def perceptual_error(x: torch.Tensor, ref: torch.Tensor) -> float:
    """Mean over images of :func:`perceptual_error_per_image`."""
    return float(perceptual_error_per_image(x, ref).mean())


def high_frequency_energy(x: torch.Tensor, min_cycles: int = 3) -> float:
    """Energy per pixel at ``min_cycles`` or more cycles per image side (either axis), on [0, 1] intensities."""
    u = _unit(x).double()
    f = torch.fft.fft2(u)
    kh = (torch.fft.fftfreq(u.shape[-2]) * u.shape[-2]).abs()
    kw = (torch.fft.fftfreq(u.shape[-1]) * u.shape[-1]).abs()
    band = (kh[:, None] >= min_cycles) | (kw[None, :] >= min_cycles)
    n_pix = u.shape[-1] * u.shape[-2]
    return float((f.abs() ** 2 * band).sum() / (u.shape[0] * u.shape[1]) / n_pix**2)


def sr_scores(x: torch.Tensor, ref: torch.Tensor, min_cycles: int = 3) -> dict[str, float]:
    """PSNR, perceptual error and high-frequency energy of outputs ``x`` against ground truth ``ref``."""
    if x.shape != ref.shape:
        raise ValueError(f"outputs {tuple(x.shape)} and ground truth {tuple(ref.shape)} differ in shape")
    hf, hf_ref = high_frequency_energy(x, min_cycles), high_frequency_energy(ref, min_cycles)
    return {
        "psnr": psnr(x, ref),
        "perceptual_error": perceptual_error(x, ref),
        "hf_energy": hf,
        "hf_ratio": hf / hf_ref if hf_ref > 0 else float("nan"),
    }


__all__ = [
    "high_frequency_energy",
    "perceptual_error",
    "perceptual_error_per_image",
    "psnr",
    "psnr_per_image",
    "sr_scores",
]
