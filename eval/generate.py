"""The generated side of an evaluation: sample a student for fixed seeds, with a progress bar."""

from __future__ import annotations

from pathlib import Path

import torch

from onestep.errors import OnestepError


def eval_labels(student, num_samples: int) -> list[int] | None:
    """Class labels for an evaluation: classes in turn (``i % num_classes``), None when unconditional."""
    cond = student.conditioning
    return [i % cond.num_classes for i in range(num_samples)] if cond.kind == "class" else None


def sample_student_images(
    student,
    num_samples: int,
    steps: int | None = None,
    seed: int = 0,
    batch_size: int = 256,
    device: torch.device | str = "cpu",
    progress: bool = False,
    generator=None,
) -> tuple[torch.Tensor, list[int] | None, list[int]]:
    """Sample ``num_samples`` images from a loaded student; sample ``i`` uses seed ``seed + i`` and
    class ``i % num_classes`` (class-conditional students), so a sample does not depend on the batch size.

    Args:
        student: a :class:`onestep.export.Student`.
        steps: model calls per sample (default: the student's own timesteps).
        generator: a different generator network to sample with (for checkpoints), same spec.

    Returns:
        ``(images in [-1, 1] on CPU, labels or None, timesteps)``.
    """
    from tqdm.auto import tqdm

    from onestep.samplers.student import sample_student_from_seeds

    if num_samples < 1:
        raise OnestepError("--num-samples must be at least 1")
    if len(student.sample_shape) != 3:
        raise OnestepError(f"this student draws {tuple(student.sample_shape)} samples, not images; FID needs images")
    timesteps = student.timesteps_for(steps)
    labels = eval_labels(student, num_samples)
    gen = (generator or student.generator).to(device).eval()
    seeds = list(range(seed, seed + num_samples))
    outs = []
    with tqdm(total=num_samples, desc="sampling", unit="img", disable=not progress, leave=False) as bar:
        for i in range(0, num_samples, batch_size):
            lab = None if labels is None else labels[i : i + batch_size]
            x, _ = sample_student_from_seeds(gen, student, timesteps, seeds[i : i + batch_size], lab, device=device, batch_size=batch_size)
            outs.append(x)
            bar.update(len(x))
    return torch.cat(outs), labels, timesteps


def load_generator_from_checkpoint(student, checkpoint: Path):
    """The generator of a training checkpoint in the exported student's architecture
    (:func:`onestep.weights.generator_from_checkpoint`)."""
    from onestep.weights import generator_from_checkpoint

    return generator_from_checkpoint(student.generator, checkpoint)
