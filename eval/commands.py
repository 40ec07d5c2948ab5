"""``onestep eval fid | clip | run``: what each command does, called by :mod:`onestep.cli`
(``onestep eval t2i`` lives in :mod:`onestep.eval.t2i`).

Each writes ``metrics.json`` into its output folder, prints a short table, and with
``report=True`` adds ``report.md`` with its plots.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

from onestep.errors import OnestepError
from onestep.runtime import default_device

from .report import format_table, markdown_table, plot_curve, save_grid, student_info, write_metrics, write_report

FID_COLUMNS = ["what", "fid", "kid", "kid_std", "precision", "recall", "class_acc", "samples", "steps"]
RUN_COLUMNS = ["what", "step", "fid", "kid", "precision", "recall", "class_acc", "samples"]


def default_out(path: str | Path, command: str) -> Path:
    """``<parent>/eval-<name>`` next to the evaluated folder (e.g. ``runs/x/eval-student``), or ``<run>/eval`` for runs."""
    p = Path(path).expanduser()
    return p / "eval" if command == "run" else p.parent / f"eval-{p.name}"


def _device(device: str | None) -> torch.device:
    """``--device``, else :func:`onestep.runtime.default_device`."""
    return torch.device(device) if device else default_device()


def _is_digits_student(student) -> bool:
    c = student.conditioning
    return tuple(student.sample_shape) == (1, 16, 16) and c.kind == "class" and c.num_classes == 10


def _not_digits(student) -> str | None:
    """Why ``student``'s samples cannot be compared with the real digits (None when they can)."""
    from onestep.audio import audio_meta_of

    if audio_meta_of(student.meta) is not None:
        return ("its samples are mel spectrograms of sounds: score them with `onestep eval clap` (text-to-audio) "
                "or benchmarks/audio.py (the sounds teacher's referee)")
    if student.conditioning.kind == "text" or student.vae is not None:
        return ("it is a latent / text-to-image student: give real images with --ref DIR and --extractor inception, "
                "or use `onestep eval t2i` / `onestep eval clip`")
    return None


def _class_accuracy(images: torch.Tensor, labels: list[int] | None) -> float | None:
    """Share of samples the digits SVC (:func:`onestep.digits.classify_digits`) reads as the asked class."""
    if labels is None:
        return None
    from onestep.digits import classify_digits

    return float((classify_digits(images) == torch.tensor(labels)).float().mean())


def fid_command(
    student: str | None = None,
    images: str | None = None,
    ref: str | None = "digits",
    ref_stats: str | None = None,
    extractor: str = "digits",
    inception_weights: str | None = None,
    num_samples: int = 1000,
    steps: int | None = None,
    seed: int = 0,
    batch_size: int = 256,
    kid: bool = True,
    kid_subset_size: int = 1000,
    out: str | None = None,
    report: bool = False,
    device: str | None = None,
    cache_dir: str | None = None,
    progress: bool = True,
    prc: bool = True,
) -> dict[str, Any]:
    """FID/KID and precision/recall of a student (sampled for seeds ``seed .. seed+N-1``) or of a folder of images."""
    from onestep.export import load_student

    from .extractors import check_weights_early, resolve_extractor
    from .metrics import compute_fid_kid

    if (student is None) == (images is None):
        raise OnestepError("give exactly one of --student DIR and --images DIR")
    check_weights_early(extractor, inception_weights)  # the clear error comes before any sampling
    spec = resolve_extractor(extractor)
    dev = _device(device)
    record: dict[str, Any] = {"command": "fid", "extractor": spec.name}
    t0 = time.perf_counter()
    labels = None
    if student is not None:
        s = load_student(student, device=dev)
        why = _not_digits(s) if ref == "digits" else None
        if why:  # digits-FID of anything but digits is a number without meaning: refused before any sampling
            raise OnestepError(f"{student}: the reference is the real digits (the default), but {why}")
        x, labels, timesteps = sample_student_images(s, num_samples, steps, seed, batch_size, dev, progress)
        record.update(student=student_info(s), steps=len(timesteps), timesteps=timesteps, seeds=[seed, seed + num_samples - 1], labels="i % num_classes" if labels else None)
        name = f"student ({len(timesteps)} step{'s' if len(timesteps) > 1 else ''})"
        src = student
    else:
        from .images import load_images

        x = load_images(images)
        record.update(images=str(images), seeds=None)
        name, src = Path(images).name, images
    t1 = time.perf_counter()
    m = compute_fid_kid(
        x, ref=ref, extractor=extractor, ref_stats=ref_stats, cache_dir=cache_dir, batch_size=batch_size, device=dev,
        inception_weights=inception_weights, kid=kid, kid_subset_size=kid_subset_size, seed=seed, progress=progress, prc=prc,
    )
    t2 = time.perf_counter()
    acc = _class_accuracy(x, labels) if student is not None and _is_digits_student(s) else None
    metrics = {k: m.get(k) for k in ("fid", "kid", "kid_std") + (("precision", "recall") if prc else ())}
    metrics |= {"class_accuracy": acc} if acc is not None else {}
    record.update(
        metrics=metrics,
        num_samples=len(x),
        reference={"ref": m["ref"], "stats": m["ref_stats"], "cached": m["ref_cached"], "num_images": m["num_ref"]},
        feature_layer=m["feature_layer"],
        preprocessing=m["preprocessing"],
        kid_subset_size=m.get("kid_subset_size"),
        kid_subsets=m.get("kid_subsets"),
        prc_neighborhood=m.get("prc_neighborhood"),
        **({"prc_note": m["prc_note"]} if m.get("prc_note") else {}),
        batch_size=batch_size,
        device=str(dev),
        seconds={"sampling": t1 - t0, "features_and_metrics": t2 - t1},
    )
    row = {"what": name, "fid": m["fid"], "kid": m.get("kid"), "kid_std": m.get("kid_std"), "precision": m.get("precision"), "recall": m.get("recall"),
           "class_acc": acc, "samples": len(x), "steps": record.get("steps")}
    record["rows"] = [row]
    outdir = Path(out) if out else default_out(src, "fid")
    write_metrics(outdir, record)
    print(format_table([row], FID_COLUMNS))
    if report:
        save_grid(x[:100], outdir / "samples.png", title=name)
        write_report(outdir, f"FID ({spec.name}) of {src}", record, markdown_table([row], FID_COLUMNS), [("samples (first 100)", "samples.png")])
    record["out"] = str(outdir)
    return record


def sample_student_images(*args, **kwargs):
    from .generate import sample_student_images as f

    return f(*args, **kwargs)


def run_command(
    run: str,
    ref: str | None = "digits",
    ref_stats: str | None = None,
    extractor: str = "digits",
    inception_weights: str | None = None,
    num_samples: int = 500,
    seed: int = 0,
    batch_size: int = 256,
    kid: bool = True,
    kid_subset_size: int = 1000,
    out: str | None = None,
    report: bool = False,
    device: str | None = None,
    cache_dir: str | None = None,
    progress: bool = True,
    prc: bool = True,
) -> dict[str, Any]:
    """Evaluate every ``checkpoint-N`` of a training run (the weights an export would hold: EMA when on) and its exported
    ``student/`` (the EMA weights when EMA was on) on the same seeds; write the curve."""
    from onestep.export import load_student

    from .extractors import check_weights_early, extract_features, resolve_extractor
    from .generate import load_generator_from_checkpoint
    from .metrics import fid_kid_from_features
    from .stats_cache import reference_statistics

    run_dir = Path(run).expanduser()
    if not run_dir.is_dir():
        raise OnestepError(f"--run {run_dir}: no such folder")
    check_weights_early(extractor, inception_weights)
    spec = resolve_extractor(extractor)
    if not (run_dir / "student" / "onestep.json").is_file():
        raise OnestepError(f"{run_dir}: no exported student/ (its onestep.json gives the generator's architecture); finish the run first")
    dev = _device(device)
    student = load_student(run_dir / "student", device=dev)
    why = _not_digits(student) if ref == "digits" else None
    if why:
        raise OnestepError(f"{run_dir}: the reference is the real digits (the default), but {why}")
    ckpts = sorted((p for p in run_dir.glob("checkpoint-*") if p.name.split("-")[-1].isdigit()), key=lambda p: int(p.name.split("-")[-1]))
    max_steps = (student.meta.get("config") or {}).get("max_steps")
    ref_s = reference_statistics(ref, extractor, ref_stats, cache_dir, batch_size, dev, inception_weights, progress)
    digits = _is_digits_student(student)
    points: list[dict[str, Any]] = []
    last = None
    entries = [(int(c.name.split("-")[-1]), c.name, c) for c in ckpts] + [(max_steps or (int(ckpts[-1].name.split("-")[-1]) if ckpts else 0), "student (export)", None)]
    for step, what, ckpt in entries:
        gen = load_generator_from_checkpoint(student, ckpt) if ckpt is not None else None
        x, labels, timesteps = sample_student_images(student, num_samples, None, seed, batch_size, dev, progress, generator=gen)
        feats = extract_features(x, extractor, batch_size, dev, inception_weights, progress)
        m = fid_kid_from_features(feats, ref_s, kid=kid, kid_subset_size=kid_subset_size, seed=seed, prc=prc, device=dev)
        acc = _class_accuracy(x, labels) if digits else None
        points.append({"what": what, "step": step, "fid": m["fid"], "kid": m.get("kid"), "kid_std": m.get("kid_std"), "precision": m.get("precision"),
                       "recall": m.get("recall"), "class_acc": acc, "samples": len(x), "steps": len(timesteps)})
        last = (what, x)
    outdir = Path(out) if out else default_out(run_dir, "run")
    record = {
        "command": "run",
        "run": str(run_dir),
        "student": student_info(student),
        "extractor": spec.name,
        "preprocessing": spec.preprocessing,
        "num_samples": num_samples,
        "seeds": [seed, seed + num_samples - 1],
        "reference": {"ref": ref, "stats": ref_s["path"], "cached": ref_s["cached"]},
        "prc_neighborhood": 3 if prc else None,
        "weights": "checkpoint-N: the weights an export would hold (generator_export.safetensors with EMA or LoRA, else generator.safetensors); student: the export",
        "points": points,
        "device": str(dev),
    }
    write_metrics(outdir, record)
    curve = plot_curve(points, ["fid", "kid", "recall", "class_acc"], outdir / "curve.png", title=f"{run_dir.name}: {spec.name}")
    print(format_table(points, RUN_COLUMNS))
    if report:
        save_grid(last[1][:100], outdir / "samples.png", title=last[0])
        write_report(
            outdir, f"Evaluation of the run {run_dir}", record, markdown_table(points, RUN_COLUMNS[:4] + ["kid_std"] + RUN_COLUMNS[4:]),
            [("metric against training step", curve.name), (f"samples of {last[0]} (first 100)", "samples.png")],
        )
    record["out"] = str(outdir)
    return record


def clip_command(
    prompts: str,
    clip_model: str,
    student: str | None = None,
    images: str | None = None,
    caption_column: str | None = None,
    num_samples: int | None = None,
    steps: int | None = None,
    seed: int = 0,
    guidance_scale: float = 1.0,
    batch_size: int = 32,
    out: str | None = None,
    report: bool = False,
    device: str | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """CLIP score of a text-to-image student (a diffusers pipeline folder) or of a folder of images
    (file ``i`` in name order belongs to prompt ``i``) over a prompt file."""
    from onestep.clip import load_clip
    from onestep.teachers.text import read_prompts

    from .clip import CLIP_SCORE_DEFINITION, clip_score, sample_pipeline

    if (student is None) == (images is None):
        raise OnestepError("give exactly one of --student DIR and --images DIR")
    if student is not None and (Path(student) / "vocoder").is_dir():
        raise OnestepError(f"{student} is a text-to-audio student: the CLIP score compares images with prompts; "
                           "score its sounds with `onestep eval clap --clap-model DIR`")
    texts = read_prompts(prompts, caption_column)
    if num_samples is not None:
        texts = texts[:num_samples]
    dev = _device(device)
    encoder = load_clip(clip_model, dev)
    record: dict[str, Any] = {"command": "clip", "prompts": str(prompts), "clip_model": str(clip_model), "definition": CLIP_SCORE_DEFINITION}
    t0 = time.perf_counter()
    if student is not None:
        x, info = sample_pipeline(student, texts, steps=steps, seed=seed, guidance_scale=guidance_scale, batch_size=batch_size, device=dev, progress=progress)
        record.update(student=info, seeds=[seed, seed + len(texts) - 1], guidance_scale=guidance_scale)
        src = student
    else:
        from .images import load_images

        x = load_images(images)
        if len(x) < len(texts):
            raise OnestepError(f"{images} holds {len(x)} images for {len(texts)} prompts")
        x = x[: len(texts)]
        record.update(images=str(images), seeds=None)
        src = images
    t1 = time.perf_counter()
    res = clip_score(x, texts, encoder, batch_size=batch_size, progress=progress)
    t2 = time.perf_counter()
    row = {"what": Path(src).name, "clip_score": res["clip_score"], "samples": len(texts)}
    record.update(metrics={"clip_score": res["clip_score"], "clip_score_std": res["clip_score_std"]}, num_samples=len(texts), rows=[row],
                  device=str(dev), seconds={"sampling": t1 - t0, "scoring": t2 - t1})
    outdir = Path(out) if out else default_out(src, "clip")
    write_metrics(outdir, record | {"per_sample": res["per_sample"]})
    print(format_table([row], ["what", "clip_score", "samples"]))
    if report:
        save_grid(x[:64].float() / 127.5 - 1 if x.dtype == torch.uint8 else x[:64], outdir / "samples.png", title="samples", nrow=8)
        write_report(outdir, f"CLIP score of {src}", record, markdown_table([row], ["what", "clip_score", "samples"]) + f"\n\n{CLIP_SCORE_DEFINITION}", [("samples (first 64)", "samples.png")])
    record["out"] = str(outdir)
    return record
