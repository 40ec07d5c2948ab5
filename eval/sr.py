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
- :func:`sr_command` (``onestep eval sr``): a super-resolution student (``digits-sr``'s, an SD x4
  upscaler's) scored on high-res ground truth beside bicubic upsampling.

Images are ``(N, C, H, W)`` floats in [-1, 1].
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

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


SR_COLUMNS = ["what", "psnr", "mse_ratio", "perceptual_error", "hf_ratio", "samples", "steps"]


def ground_truth(student, images: str | None, num_samples: int | None) -> tuple[torch.Tensor, str]:
    """The high-res images an image-conditioned student is scored against, ``(N, C, H, W)`` in [-1, 1] at the
    student's output size, and where they came from: ``images`` (a folder; each resized on its short side and
    centre-cropped, grey for one-channel students), else, for students of the built-in ``digits-sr``, its
    held-out digits (the 297 its training never saw)."""
    from onestep.errors import OnestepError

    cond = student.conditioning
    side = int(student.sample_shape[-1]) * (1 if cond.upsample else cond.scale)  # an upscaler's latents sit at the low-res size
    if images is None:
        if (student.meta.get("teacher") or {}).get("name") != "digits-sr":
            raise OnestepError("give --images FOLDER of high-res ground-truth images (only digits-sr students have built-in ones)")
        from onestep.teachers.sr import digits_sr_split

        hr, src = digits_sr_split("test"), "digits-sr held-out digits"
    else:
        from onestep.teachers.latents import load_image, luma

        from .images import image_files

        folder = Path(images).expanduser()
        files = image_files(folder) if folder.is_dir() else []
        if not files:
            raise OnestepError(f"--images {folder}: no images there")
        files = files[:num_samples] if num_samples else files
        hr = torch.stack([load_image(f, side) for f in files])
        if cond.image_channels == 1:  # grey: the luma of the RGB crop
            hr = luma(hr)
        src = str(folder)
    if tuple(hr.shape[1:]) != (cond.image_channels, side, side):
        raise OnestepError(f"ground truth of shape {tuple(hr.shape[1:])}; this student makes {(cond.image_channels, side, side)}")
    return (hr[:num_samples] if num_samples else hr), src


def sr_command(
    student: str,
    images: str | None = None,
    num_samples: int | None = None,
    steps: int | None = None,
    seed: int = 0,
    batch_size: int = 64,
    out: str | None = None,
    report: bool = False,
    device: str | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Score a super-resolution student against the ground truth: each high-res image is degraded as the
    student's training degraded them, super-resolved (sample ``i`` with seed ``seed + i``) and compared with
    the original (PSNR, the MSE as a ratio to bicubic's, the digits-feature perceptual error for 16x16 grey
    images, high-frequency energy as a ratio to the ground truth's), beside bicubic upsampling."""
    import torch.nn.functional as F
    from tqdm.auto import tqdm

    from onestep.errors import OnestepError
    from onestep.export import load_student
    from onestep.runtime import default_device
    from onestep.samplers.student import super_resolve

    from .commands import default_out
    from .report import format_table, markdown_table, save_grid, student_info, write_metrics, write_report

    dev = torch.device(device) if device else default_device()
    s = load_student(student, device=dev)
    cond = s.conditioning
    if cond.kind != "image":
        raise OnestepError(f"eval sr scores super-resolution students; {student} is conditioned on {cond.kind!r} (use eval fid)")
    if num_samples is not None and num_samples < 1:
        raise OnestepError("--num-samples must be at least 1")
    hr, src = ground_truth(s, images, num_samples)
    lowres = cond.degrade(hr)
    t0 = time.perf_counter()
    seeds = range(seed, seed + len(hr))
    chunks = [super_resolve(s, lowres[i : i + batch_size], seeds[i : i + batch_size], steps, dev, batch_size)
              for i in tqdm(range(0, len(hr), batch_size), desc="super-resolving", disable=not progress)]
    x = torch.cat(chunks)
    seconds = time.perf_counter() - t0
    bicubic = F.interpolate(lowres, size=hr.shape[-2:], mode="bicubic", align_corners=False).clamp(-1, 1)
    min_cycles = lowres.shape[-1] // 2 + 1  # the band above the low-res image's Nyquist frequency
    digit_like = tuple(hr.shape[1:]) == (1, 16, 16)
    n_steps = len(s.timesteps_for(steps))
    rows = []
    for what, y in ((f"student ({n_steps} step{'s' if n_steps > 1 else ''})", x), ("bicubic", bicubic)):
        mse = float((_unit(y) - _unit(hr)).pow(2).mean())
        hf, hf_ref = high_frequency_energy(y, min_cycles), high_frequency_energy(hr, min_cycles)
        rows.append({"what": what, "psnr": psnr(y, hr), "mse": mse, "perceptual_error": perceptual_error(y, hr) if digit_like else None,
                     "hf_ratio": hf / hf_ref if hf_ref > 0 else None, "samples": len(hr), "steps": n_steps if y is x else 0})
    for r in rows:
        r["mse_ratio"] = r["mse"] / rows[1]["mse"] if rows[1]["mse"] > 0 else None
    record: dict[str, Any] = {
        "command": "sr", "student": student_info(s), "ground_truth": src, "steps": n_steps, "timesteps": s.timesteps_for(steps),
        "seeds": [seed, seed + len(hr) - 1], "num_samples": len(hr), "high_frequency_band": f">= {min_cycles} cycles per side",
        "metrics": {k: rows[0][k] for k in ("psnr", "mse", "mse_ratio", "perceptual_error", "hf_ratio")},
        "bicubic": {k: rows[1][k] for k in ("psnr", "mse", "perceptual_error", "hf_ratio")},
        "rows": rows, "device": str(dev), "seconds": {"super_resolving": seconds},
    }
    outdir = Path(out) if out else default_out(student, "sr")
    write_metrics(outdir, record)
    print(format_table(rows, SR_COLUMNS))
    if report:
        k = min(10, len(hr))
        nearest = F.interpolate(lowres[:k], size=hr.shape[-2:], mode="nearest")
        save_grid(torch.stack([nearest, bicubic[:k], x[:k], hr[:k]], 1).flatten(0, 1), outdir / "examples.png",
                  title="low-res | bicubic | student | ground truth", nrow=4)
        write_report(outdir, f"Super-resolution of {student}", record, markdown_table(rows, SR_COLUMNS), [("examples", "examples.png")])
    record["out"] = str(outdir)
    return record


__all__ = [
    "SR_COLUMNS",
    "ground_truth",
    "sr_command",
    "high_frequency_energy",
    "perceptual_error",
    "perceptual_error_per_image",
    "psnr",
    "psnr_per_image",
    "sr_scores",
]
