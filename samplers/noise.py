"""Per-sample noise: each sample owns a seed, so a sample never depends on batch size."""

from __future__ import annotations

import torch


def seed_generators(seeds: list[int] | range) -> list[torch.Generator]:
    """One CPU ``torch.Generator`` per sample."""
    return [torch.Generator().manual_seed(int(s)) for s in seeds]


def per_sample_noise(generators: list[torch.Generator], shape: tuple[int, ...], device="cpu") -> torch.Tensor:
    """Draw ``N(0, I)`` of ``shape`` from each sample's generator, stacked along the batch."""
    return torch.stack([torch.randn(shape, generator=g) for g in generators]).to(device)
