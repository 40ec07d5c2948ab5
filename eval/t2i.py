"""``onestep eval t2i``: a text-to-image student on the COCO captions protocol the papers report
(FID-30K and its 10K / 5K variants, KID, precision/recall, CLIP score).

The steps are :data:`onestep.eval.cli.T2I_PROTOCOL` (the command's ``--help``). Generated and reference images
get one preprocessing (:func:`resize_center_crop`); the reference features of a subset are
cached like any reference statistics (:mod:`onestep.eval.stats_cache`), keyed by the captions
file, the images folder, the subset (size, seed), the resolution and the extractor.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from onestep.errors import OnestepError

RESIZE_RULE = "uint8 RGB; shorter side resized to R with PIL bicubic (sizes rounded), centre crop R x R"
CACHE_FORMAT = "coco-t2i-v1"


@dataclass(frozen=True)
class CocoImage:
    """One image of a COCO captions file that has captions: its id, file and captions."""

    image_id: int
    path: Path
    captions: tuple[str, ...]


def read_coco_captions(captions_json: str | Path, images_dir: str | Path) -> list[CocoImage]:
    """The images of a COCO captions file that have at least one caption, sorted by id.

    Raises:
        OnestepError: the file is missing or not a COCO captions file, a caption names an image the
            file does not list, or images it names are not in ``images_dir``.
    """
    path, folder = Path(captions_json).expanduser(), Path(images_dir).expanduser()
    if not path.is_file():
        raise OnestepError(f"--captions {path}: no such file (give COCO's captions_val2014.json or another captions file)")
    if not folder.is_dir():
        raise OnestepError(f"--images {folder}: no such folder (give the folder of the captions file's images, e.g. val2014/)")
    try:
        data = json.loads(path.read_text())
        files = {int(im["id"]): str(im["file_name"]) for im in data["images"]}
        pairs = [(int(a["image_id"]), str(a["caption"]).strip()) for a in data["annotations"]]
    except (ValueError, KeyError, TypeError) as e:
        raise OnestepError(
            f"--captions {path}: not a COCO captions file ({type(e).__name__}: {e}); expected "
            '{"images": [{"id", "file_name"}], "annotations": [{"image_id", "caption"}]}'
        ) from e
    captions: dict[int, list[str]] = {}
    for image_id, caption in pairs:
        if image_id not in files:
            raise OnestepError(f"--captions {path}: a caption of image_id {image_id}, which its 'images' list does not hold")
        if caption:
            captions.setdefault(image_id, []).append(caption)
    out = [CocoImage(i, folder / files[i], tuple(captions[i])) for i in sorted(captions)]
    missing = [im.path.name for im in out if not im.path.is_file()]
    if missing:
        raise OnestepError(
            f"--images {folder}: {len(missing)} of the {len(out)} captioned images of {path.name} are not there "
            f"(e.g. {missing[0]}); give the folder of this split's images"
        )
    return out


def select_subset(images: list[CocoImage], num_samples: int, seed: int = 0) -> list[dict[str, Any]]:
    """``num_samples`` images drawn without replacement, one caption of each, with ``numpy.random.default_rng(seed)``.

    Returns ``[{"image_id", "file_name", "caption", "path"}]`` in draw order (sample ``i`` is generated with seed ``seed + i``).
    """
    if not images:
        raise OnestepError("the captions file has no captioned images: the subset would be empty")
    if num_samples < 2:
        raise OnestepError(f"--num-samples must be at least 2 (FID needs a covariance), got {num_samples}")
    if num_samples > len(images):
        raise OnestepError(f"--num-samples {num_samples}: the captions file has only {len(images)} captioned images (one caption per image)")
    rng = np.random.default_rng(seed)
    picks = rng.permutation(len(images))[:num_samples]
    which = rng.integers(0, [len(images[i].captions) for i in picks])
    return [
        {"image_id": images[i].image_id, "file_name": images[i].path.name, "caption": images[i].captions[c], "path": images[i].path}
        for i, c in zip(picks.tolist(), which.tolist())
    ]


def resize_center_crop(image, resolution: int) -> torch.Tensor:
    """One image as the protocol scores it: uint8 ``(3, R, R)`` (see :data:`RESIZE_RULE`).

    Args:
        image: a PIL image, or a uint8 ``(C, H, W)`` tensor (C 1 or 3).
    """
    from PIL import Image

    if isinstance(image, torch.Tensor):
        arr = image.expand(3, -1, -1) if image.shape[0] == 1 else image
        image = Image.fromarray(arr.permute(1, 2, 0).contiguous().numpy())
    image = image.convert("RGB")
    w, h = image.size
    if (w, h) != (resolution, resolution):
        scale = resolution / min(w, h)
        nw, nh = max(resolution, round(w * scale)), max(resolution, round(h * scale))
        image = image.resize((nw, nh), Image.BICUBIC)
        left, top = (nw - resolution) // 2, (nh - resolution) // 2
        image = image.crop((left, top, left + resolution, top + resolution))
    return torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1)


def load_reference(paths: list[Path], resolution: int) -> torch.Tensor:
    """The reference images at ``paths``, resized and cropped: uint8 ``(N, 3, R, R)``."""
    from .images import _open_image

    out = []
    for p in paths:
        with _open_image(p) as im:
            out.append(resize_center_crop(im, resolution))
    return torch.stack(out)


def reference_key(captions_json: Path, images_dir: Path, num_samples: int, seed: int, resolution: int, spec, weights: str | None) -> dict[str, Any]:
    """What cached reference features of a subset must match (the captions file by size and time)."""
    from .extractors import default_layer
    from .stats_cache import _weights_identity

    st = captions_json.stat()
    fields = {
        "source": json.dumps([CACHE_FORMAT, str(captions_json.resolve()), st.st_size, st.st_mtime_ns, str(images_dir.resolve()), num_samples, seed, resolution, RESIZE_RULE]),
        "extractor": spec.name, "layer": default_layer(spec), "weights": _weights_identity(weights), "preprocessing": spec.preprocessing,
    }
    fields["key"] = hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:20]
    return fields


def coco_reference_statistics(
    subset: list[dict[str, Any]], key: dict[str, Any], extractor: str, cache_dir: Path, batch_size: int, device, inception_weights, progress: bool, resolution: int
) -> dict[str, Any]:
    """Statistics and features of the subset's real images, from the cache when there."""
    from tqdm.auto import tqdm

    from .extractors import extract_features
    from .stats_cache import load_stats, save_stats

    path = cache_dir / f"coco-{len(subset)}-{resolution}px-{key['extractor']}-{key['key']}.npz"
    if path.is_file():
        return load_stats(path, key)
    chunk = max(batch_size, 256)
    feats = [
        extract_features(load_reference([s["path"] for s in subset[i : i + chunk]], resolution), extractor, batch_size, device, inception_weights)
        for i in tqdm(range(0, len(subset), chunk), desc="reference features", disable=not progress, leave=False)
    ]
    return save_stats(path, np.concatenate(feats), dict(key) | {"num_images": len(subset), "reference": "COCO subset"})


def t2i_command(
    student: str,
    captions: str,
    images: str,
    clip_model: str | None = None,
    num_samples: int = 30000,
    resolution: int = 256,
    seed: int = 0,
    steps: int | None = None,
    guidance_scale: float = 1.0,
    extractor: str = "inception",
    inception_weights: str | None = None,
    batch_size: int = 32,
    kid: bool = True,
    kid_subset_size: int = 1000,
    prc: bool = True,
    save_images: str | None = None,
    out: str | None = None,
    report: bool = False,
    device: str | None = None,
    cache_dir: str | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Evaluate a text-to-image student on COCO captions as :data:`onestep.eval.cli.T2I_PROTOCOL` describes; write
    ``metrics.json`` and ``subset.jsonl`` into ``out`` and print a table."""
    from tqdm.auto import tqdm

    from onestep.clip import load_clip
    from onestep.runtime import default_device

    from .clip import CLIP_SCORE_DEFINITION, clip_score, open_pipeline, pipeline_images, pipeline_info, pipeline_steps
    from .extractors import check_weights_early, default_layer, extract_features, inception_weights_file, resolve_extractor
    from .images import as_uint8
    from .metrics import fid_kid_from_features
    from .report import format_table, markdown_table, save_grid, write_metrics, write_report
    from .stats_cache import default_cache_dir

    if resolution < 8:
        raise OnestepError(f"--resolution must be at least 8 (got {resolution}); the protocol uses 256 or 512")
    check_weights_early(extractor, inception_weights)  # every clear error before anything slow
    spec = resolve_extractor(extractor)
    weights = str(inception_weights_file(inception_weights)) if spec.needs_weights else None
    coco = read_coco_captions(captions, images)
    subset = select_subset(coco, num_samples, seed)
    dev = torch.device(device) if device else default_device()
    encoder = load_clip(clip_model, dev, what="--clip") if clip_model else None
    pipe, meta = open_pipeline(student, dev, what="onestep eval t2i")
    steps = pipeline_steps(meta, steps)
    t0 = time.perf_counter()
    key = reference_key(Path(captions).expanduser(), Path(images).expanduser(), num_samples, seed, resolution, spec, weights)
    ref_s = coco_reference_statistics(subset, key, extractor, Path(cache_dir or default_cache_dir()), batch_size, dev, inception_weights, progress, resolution)
    t1 = time.perf_counter()
    feats, scores, first = [], [], []
    save_dir = Path(save_images).expanduser() if save_images else None
    if save_dir is not None:
        save_dir.mkdir(parents=True, exist_ok=True)
    for i in tqdm(range(0, len(subset), batch_size), desc="generating", unit="batch", disable=not progress):
        prompts = [s["caption"] for s in subset[i : i + batch_size]]
        u8 = as_uint8(pipeline_images(pipe, prompts, steps, seed=seed + i, guidance_scale=guidance_scale, batch_size=batch_size))
        if encoder is not None:
            scores += clip_score(u8, prompts, encoder, batch_size=batch_size)["per_sample"]
        x = torch.stack([resize_center_crop(im, resolution) for im in u8])
        feats.append(extract_features(x, extractor, batch_size, dev, inception_weights))
        first += list(x[: max(0, 64 - len(first))])
        if save_dir is not None:
            _save_pngs(u8, save_dir, i)
    t2 = time.perf_counter()
    m = fid_kid_from_features(np.concatenate(feats), ref_s, kid=kid, kid_subset_size=kid_subset_size, seed=seed, prc=prc, device=dev)
    s = torch.tensor(scores, dtype=torch.float64)
    clip_m = {"clip_score": float(s.mean()), "clip_score_std": float(s.std()) if len(s) > 1 else 0.0} if encoder is not None else {"clip_score": None}
    metrics = {k: m.get(k) for k in ("fid", "kid", "kid_std") + (("precision", "recall") if prc else ())} | clip_m
    name = Path(student).expanduser().name
    row = {"what": name, **metrics, "samples": len(subset), "resolution": resolution}
    columns = ["what", "fid", "kid"] + (["precision", "recall"] if prc else []) + ["clip_score", "samples", "resolution"]
    outdir = Path(out) if out else Path(student).expanduser().parent / f"eval-coco-{name}"
    outdir.mkdir(parents=True, exist_ok=True)
    with open(outdir / "subset.jsonl", "w") as f:
        for j, e in enumerate(subset):
            f.write(json.dumps({"index": j, "seed": seed + j, "image_id": e["image_id"], "file_name": e["file_name"], "caption": e["caption"]}) + "\n")
    record = {
        "command": "t2i",
        "protocol": "COCO captions: random subset (one caption per image), one image per caption, resize + centre crop, FID/KID/precision/recall vs the subset's images, CLIP score",
        "captions": str(captions), "images": str(images), "num_samples": len(subset), "seed": seed, "seeds": [seed, seed + len(subset) - 1],
        "subset": "subset.jsonl", "resolution": resolution, "resize": RESIZE_RULE,
        "student": pipeline_info(student, meta, steps), "guidance_scale": guidance_scale,
        "metrics": metrics, "rows": [row],
        "extractor": spec.name, "feature_layer": default_layer(spec), "preprocessing": spec.preprocessing,
        "reference": {"images": "the subset's real images", "stats": ref_s["path"], "cached": ref_s["cached"], "num_images": len(subset)},
        "kid_subset_size": m.get("kid_subset_size"), "kid_subsets": m.get("kid_subsets"), "prc_neighborhood": m.get("prc_neighborhood"),
        "clip_model": str(clip_model) if clip_model else None,
        "clip_definition": CLIP_SCORE_DEFINITION + "; each generated image at its own size" if clip_model else "no --clip given: no CLIP score",
        "saved_images": str(save_dir) if save_dir else None, "batch_size": batch_size, "device": str(dev),
        "seconds": {"reference": t1 - t0, "generation_and_features": t2 - t1, "metrics": time.perf_counter() - t2},
    }
    write_metrics(outdir, record | ({"per_sample_clip_score": scores} if encoder is not None else {}))
    print(format_table([row], columns))
    if report:
        save_grid(torch.stack(first).float() / 127.5 - 1, outdir / "samples.png", title=f"{name}: first {len(first)} captions", nrow=8)
        write_report(outdir, f"COCO evaluation of {student}", record, markdown_table([row], columns), [(f"samples (first {len(first)}, {resolution}px)", "samples.png")])
    record["out"] = str(outdir)
    return record


def _save_pngs(images: torch.Tensor, folder: Path, start: int) -> None:
    from PIL import Image

    for j, im in enumerate(images):
        arr = im.permute(1, 2, 0).numpy()
        Image.fromarray(arr[..., 0] if arr.shape[-1] == 1 else arr).save(folder / f"{start + j:06d}.png")
