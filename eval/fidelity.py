"""FID and KID through torch-fidelity, with the digits and Inception extractors and cached references.

torch-fidelity builds the feature extractor from its registry, runs it over the images in
batches (with a progress bar) and turns features into FID (``fid_statistics_to_metric``) and
KID (``kid_features_to_metric``, polynomial kernel, subsets). onestep adds:

- two registered extractors: ``onestep-digits`` (the shipped digits classifier, CLI name
  ``digits``) and ``onestep-inception-v3`` (torch-fidelity's Inception-v3, CLI name
  ``inception``, whose weights come from a local file, never from a download);
- one preprocessing per extractor, the same for both sides (:func:`prepare_images`);
- reference statistics cached as ``.npz`` (``mu``, ``sigma``, ``features``, ``meta``), keyed by
  the reference, the extractor, its weights and the preprocessing (:func:`reference_statistics`).

Register your own extractor with :func:`register_extractor` (a torch-fidelity
``FeatureExtractorBase`` subclass); it then works everywhere an extractor name is accepted.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from onestep.errors import OnestepError

INCEPTION_FILE = "weights-inception-2015-12-05-6726825d.pth"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
U8_RULE = "float [-1,1] -> uint8 round((x+1)*127.5); uint8 as is"


@dataclass(frozen=True)
class ExtractorSpec:
    """How images are prepared for one registered extractor.

    Attributes:
        name: the name in torch-fidelity's registry.
        channels: 1 (grey) or 3 (RGB; grey images are repeated).
        preprocessing: a text that names the preprocessing; part of the cache key.
        needs_weights: True for Inception (a local weights file is required).
    """

    name: str
    channels: int
    preprocessing: str
    needs_weights: bool = False


EXTRACTORS: dict[str, ExtractorSpec] = {}
ALIASES = {"digits": "onestep-digits", "inception": "onestep-inception-v3", "inception-v3": "onestep-inception-v3"}


def _tf():
    """Import torch-fidelity and register onestep's extractors with it (once)."""
    import torch_fidelity

    register_extractors()
    return torch_fidelity


def _digits_class():
    from torch_fidelity.feature_extractor_base import FeatureExtractorBase

    from .digits_net import load_digits_feature_net, network_input, quantize_digits

    class FeatureExtractorDigits(FeatureExtractorBase):
        """The shipped digits classifier as a torch-fidelity extractor: features ``"64"`` and ``"logits"``."""

        def __init__(self, name, features_list, **kwargs):
            super().__init__(name, features_list)
            self.net = copy.deepcopy(load_digits_feature_net())

        @staticmethod
        def get_provided_features_list():
            return ("64", "logits")

        @staticmethod
        def get_default_feature_layer_for_metric(metric):
            return {"fid": "64", "kid": "64", "prc": "64", "isc": "logits"}[metric]

        @staticmethod
        def can_be_compiled():
            return False

        @staticmethod
        def get_dummy_input_for_compile():
            return torch.zeros(1, 1, 16, 16, dtype=torch.uint8)

        def forward(self, x):
            pre = self.net.pre_activations(network_input(quantize_digits(x)))
            out = {"64": (pre - self.net.feature_mean) / self.net.feature_std, "logits": self.net.head(pre)}
            return tuple(out[k].float() for k in self.features_list)

    return FeatureExtractorDigits


def inception_weights_file(path: str | Path | None) -> Path:
    """The Inception-v3 weights to use: ``path``, or torch-fidelity's file in the torch hub cache.

    Raises :class:`OnestepError` at once (no download is tried) when neither exists.
    """
    if path is not None:
        p = Path(path).expanduser()
        if not p.is_file():
            raise OnestepError(f"--inception-weights {p}: no such file")
        if p.suffix not in (".safetensors", ".pth", ".pt"):
            raise OnestepError(f"--inception-weights {p}: expected a .safetensors or torch-fidelity's .pth file")
        return p
    cached = Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_FILE
    if cached.is_file():
        return cached
    raise OnestepError(
        f"Inception-v3 weights not found and they cannot be downloaded here: pass --inception-weights PATH "
        f"(torch-fidelity's {INCEPTION_FILE}, or a .safetensors of the same state dict), or copy that file "
        f"into {cached.parent} (the torch hub cache; set TORCH_HOME to move it). For 16x16 digits use --extractor digits."
    )


def load_inception_state(path: Path) -> dict[str, torch.Tensor]:
    """Read Inception weights: safetensors, or torch-fidelity's ``.pth`` with ``torch.load(weights_only=True)``
    (tensors and plain containers only; arbitrary pickled objects are refused)."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # an unpickling error names the refused global
        raise OnestepError(f"{path}: not a plain state dict of tensors ({type(e).__name__}); onestep will not unpickle it") from e
    if not isinstance(state, dict):
        raise OnestepError(f"{path}: expected a state dict, found a {type(state).__name__}")
    return state


def _inception_class():
    import torch_fidelity.feature_extractor_inceptionv3 as tf_inception

    class FeatureExtractorInceptionV3Local(tf_inception.FeatureExtractorInceptionV3):
        """torch-fidelity's Inception-v3 (same layers, same 299x299 TF-compatible resize), weights from a local file.

        ``feature_extractor_weights_path``: a ``.safetensors`` or torch-fidelity's ``.pth``; None looks in
        the torch hub cache. torch-fidelity itself would download when None and unpickle without
        restriction when given a path; here the state dict is read by :func:`load_inception_state`
        and handed to torch-fidelity's constructor in place of its download.
        """

        def __init__(self, name, features_list, feature_extractor_weights_path=None, **kwargs):
            state = load_inception_state(inception_weights_file(feature_extractor_weights_path))
            if not hasattr(tf_inception, "load_state_dict_from_url"):
                raise OnestepError("this torch-fidelity version loads Inception differently; onestep supports 0.3-0.4")
            original = tf_inception.load_state_dict_from_url
            tf_inception.load_state_dict_from_url = lambda *a, **k: state
            try:
                super().__init__(name, features_list, feature_extractor_weights_path=None, **kwargs)
            finally:
                tf_inception.load_state_dict_from_url = original

    return FeatureExtractorInceptionV3Local


_REGISTERED = False


def register_extractors() -> None:
    """Register ``onestep-digits`` and ``onestep-inception-v3`` with torch-fidelity (idempotent)."""
    global _REGISTERED
    if _REGISTERED:
        return
    from .digits_net import PREPROCESSING

    _REGISTERED = True
    register_extractor("onestep-digits", _digits_class(), channels=1, preprocessing=PREPROCESSING)
    register_extractor(
        "onestep-inception-v3",
        _inception_class(),
        channels=3,
        preprocessing=f"inception-v1: {U8_RULE}; grey repeated to RGB; torch-fidelity resizes to 299x299 (TF1 bilinear)",
        needs_weights=True,
    )


def register_extractor(name: str, cls: type, channels: int = 3, preprocessing: str | None = None, needs_weights: bool = False) -> None:
    """Register a feature extractor with torch-fidelity and tell onestep how to feed it.

    Args:
        name: its name (for ``compute_fid_kid(extractor=name)`` and ``onestep eval fid --extractor``).
        cls: a subclass of ``torch_fidelity.FeatureExtractorBase``; its ``forward`` gets uint8
            ``(N, channels, H, W)`` images at their own size and returns a tuple of ``(N, D)`` features.
        channels: 1 (grey) or 3 (RGB; grey images repeated).
        preprocessing: a text naming any further preprocessing (it is part of the statistics cache key).
        needs_weights: the extractor takes ``feature_extractor_weights_path``.
    """
    from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY, register_feature_extractor

    if channels not in (1, 3):
        raise OnestepError(f"channels must be 1 or 3 (got {channels})")
    if FEATURE_EXTRACTORS_REGISTRY.get(name) is not cls:
        register_feature_extractor(name, cls)
    EXTRACTORS[name] = ExtractorSpec(name, channels, preprocessing or f"{name}: {U8_RULE}; {channels} channels; native size", needs_weights)


def check_weights_early(extractor: str, inception_weights: str | Path | None) -> None:
    """For Inception, find the weights file before anything slow happens (raises the clear error)."""
    if ALIASES.get(extractor, extractor) == "onestep-inception-v3":
        inception_weights_file(inception_weights)


def resolve_extractor(name: str) -> ExtractorSpec:
    """The spec of an extractor given its CLI name (``digits``, ``inception``) or registered name."""
    _tf()
    full = ALIASES.get(name, name)
    if full not in EXTRACTORS:
        raise OnestepError(f"unknown feature extractor {name!r}; known: digits, inception, {', '.join(sorted(set(EXTRACTORS) - set(ALIASES.values())) or '(none registered)')}")
    return EXTRACTORS[full]


# ----------------------------------------------------------------------------- images
def prepare_images(images: torch.Tensor, spec: ExtractorSpec) -> torch.Tensor:
    """The one preprocessing both sides get: uint8 ``(N, spec.channels, H, W)``.

    Float images in [-1, 1] are clamped and quantised as ``round((x + 1) * 127.5)`` (as PNGs are
    written); uint8 images pass. For the digits extractor, :func:`onestep.eval.digits_net.quantize_digits`
    also makes them grey 16x16. RGB extractors get grey images repeated to three channels and
    resize themselves (Inception: 299x299).
    """
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise OnestepError(f"expected images of shape (N, 1 or 3, H, W), got {tuple(images.shape)}")
    if spec.name == "onestep-digits":
        from .digits_net import quantize_digits

        return quantize_digits(images)
    x = images.detach()
    if x.dtype != torch.uint8:
        x = ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    if spec.channels == 3 and x.shape[1] == 1:
        x = x.repeat(1, 3, 1, 1)
    elif spec.channels == 1 and x.shape[1] == 3:
        x = x.float().mean(1, keepdim=True).round().to(torch.uint8)
    return x


def image_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())


def load_images(folder: str | Path) -> torch.Tensor:
    """The images of a folder as uint8 ``(N, C, H, W)`` (C = 1 if all are grey, else 3).

    A folder written by ``onestep sample`` (it has ``samples.npz``) is read from the raw float
    samples (the same values its PNGs hold after quantisation, without ``grid.png``); any other
    folder from its image files (``.png .jpg .jpeg .bmp .webp``, sorted by name; all one size).
    """
    from PIL import Image

    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise OnestepError(f"{folder}: no such folder")
    npz = folder / "samples.npz"
    if npz.is_file():
        with np.load(npz, allow_pickle=False) as d:
            x = torch.from_numpy(d["samples"]).float()
        if x.ndim != 4:
            raise OnestepError(f"{npz}: samples of shape {tuple(x.shape)} are not images")
        return prepare_images(x, ExtractorSpec("raw", x.shape[1], ""))
    files = image_files(folder)
    if not files:
        raise OnestepError(f"{folder}: no images ({', '.join(IMAGE_SUFFIXES)}) and no samples.npz")
    pics = [Image.open(f) for f in files]
    grey = all(p.mode in ("L", "1", "I;16", "I") for p in pics)
    arrays = [np.asarray(p.convert("L" if grey else "RGB")) for p in pics]
    sizes = {a.shape[:2] for a in arrays}
    if len(sizes) > 1:
        raise OnestepError(f"{folder}: images of different sizes {sorted(sizes)[:3]}; resize them to one size first")
    x = torch.from_numpy(np.stack(arrays))
    return x.unsqueeze(1) if grey else x.permute(0, 3, 1, 2).contiguous()


class _ImageSet(torch.utils.data.Dataset):
    """uint8 images as torch-fidelity's dataset input (each item a ``(C, H, W)`` uint8 tensor)."""

    def __init__(self, images: torch.Tensor):
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.images[i]


# ---------------------------------------------------------------------------- features
def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


_EXTRACTOR_CACHE: dict[tuple, Any] = {}


def _feature_extractor(spec: ExtractorSpec, layer: str, weights: str | None, cuda: bool):
    key = (spec.name, layer, weights, cuda)
    if key not in _EXTRACTOR_CACHE:
        from torch_fidelity.utils import create_feature_extractor

        kwargs = {"feature_extractor_weights_path": weights} if spec.needs_weights else {}
        _EXTRACTOR_CACHE.clear()  # keep one network in memory
        _EXTRACTOR_CACHE[key] = create_feature_extractor(spec.name, [layer], cuda=cuda, verbose=False, **kwargs)
    return _EXTRACTOR_CACHE[key]


def default_layer(spec: ExtractorSpec) -> str:
    from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY

    return FEATURE_EXTRACTORS_REGISTRY[spec.name].get_default_feature_layer_for_metric("fid")


def extract_features(
    images: torch.Tensor,
    extractor: str = "digits",
    batch_size: int = 256,
    device: torch.device | str | None = None,
    inception_weights: str | Path | None = None,
    progress: bool = False,
) -> np.ndarray:
    """Features of ``images`` (uint8, or float in [-1, 1]) computed by torch-fidelity with a registered extractor.

    Returns ``(N, D)`` float64 (torch-fidelity computes in float32).
    """
    spec = resolve_extractor(extractor)
    weights = str(inception_weights_file(inception_weights)) if spec.needs_weights else None
    from torch_fidelity.utils import get_featuresdict_from_dataset

    device = torch.device(device) if device is not None else default_device()
    cuda = device.type == "cuda"
    layer = default_layer(spec)
    fe = _feature_extractor(spec, layer, weights, cuda)
    data = _ImageSet(prepare_images(images, spec).cpu())
    feats = get_featuresdict_from_dataset(data, fe, batch_size, cuda, save_cpu_ram=True, verbose=progress)[layer]
    return feats.double().numpy()


# ------------------------------------------------------------------ reference statistics
def default_cache_dir() -> Path:
    """``$ONESTEP_CACHE/fid-stats``, default ``~/.cache/onestep/fid-stats``."""
    root = os.environ.get("ONESTEP_CACHE") or Path.home() / ".cache" / "onestep"
    return Path(root) / "fid-stats"


def _weights_identity(path: str | None) -> str:
    if path is None:
        return ""
    st = Path(path).stat()
    return f"{Path(path).name}:{st.st_size}"


def _source_identity(ref: str) -> tuple[str, str]:
    """(a short slug, a string that changes whenever the reference images change)."""
    if ref == "digits":
        return "digits", "onestep.digits: sklearn load_digits, 1797 images, bilinear 8x8 -> 16x16"
    folder = Path(ref).expanduser().resolve()
    npz = folder / "samples.npz"
    files = [npz] if npz.is_file() else image_files(folder)
    listing = [(f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in files]
    return folder.name or "folder", json.dumps([str(folder), listing])


def stats_key(ref: str, spec: ExtractorSpec, weights: str | None) -> dict[str, str]:
    """What a cached statistics file must match: the reference, the extractor, its weights, the preprocessing."""
    slug, source = _source_identity(ref)
    fields = {"source": source, "extractor": spec.name, "layer": default_layer(spec), "weights": _weights_identity(weights), "preprocessing": spec.preprocessing}
    fields["key"] = hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:20]
    fields["slug"] = slug
    return fields


def save_stats(path: Path, features: np.ndarray, meta: dict[str, Any]) -> dict[str, Any]:
    from .frechet import feature_statistics

    mu, sigma = feature_statistics(features)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.stem + ".tmp.npz")
    np.savez(tmp, mu=mu, sigma=sigma, features=features.astype(np.float32), meta=np.array(json.dumps(meta)))
    tmp.replace(path)
    return {"mu": mu, "sigma": sigma, "features": features, "meta": meta, "path": str(path), "cached": False}


def load_stats(path: Path, expect: dict[str, str] | None = None) -> dict[str, Any]:
    """Read a statistics ``.npz`` (``mu``, ``sigma``; optional ``features`` for KID and ``meta``).

    With ``expect``, a file written by onestep must carry the same extractor and preprocessing key.
    """
    try:
        with np.load(path, allow_pickle=False) as d:
            if "mu" not in d or "sigma" not in d:
                raise OnestepError(f"{path}: a statistics file needs arrays 'mu' and 'sigma' (found {sorted(d.files)})")
            mu, sigma = d["mu"].astype(np.float64), d["sigma"].astype(np.float64)
            feats = d["features"].astype(np.float64) if "features" in d else None
            meta = json.loads(str(d["meta"])) if "meta" in d else {}
    except (ValueError, OSError) as e:
        raise OnestepError(f"{path}: not a readable .npz of statistics ({e})") from e
    if expect is not None and meta:
        for k in ("extractor", "layer", "preprocessing", "weights"):
            if meta.get(k) != expect.get(k):
                raise OnestepError(
                    f"{path} was computed with {k} {meta.get(k)!r}, not {expect.get(k)!r}; use another --ref-stats file or delete it"
                )
    return {"mu": mu, "sigma": sigma, "features": feats, "meta": meta, "path": str(path), "cached": True}


def reference_statistics(
    ref: str = "digits",
    extractor: str = "digits",
    stats_path: str | Path | None = None,
    cache_dir: str | Path | None = None,
    batch_size: int = 256,
    device: torch.device | str | None = None,
    inception_weights: str | Path | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Statistics of the reference side, from the cache when they are there.

    Args:
        ref: ``"digits"`` (the bundled real digits, all 1797), a folder of images, or ``None``
            when ``stats_path`` names an existing file.
        stats_path: a statistics ``.npz``: read when it exists, else computed from ``ref`` and
            written there. Without it, the file lives in ``cache_dir`` under a name that holds
            the cache key (reference, extractor, weights, preprocessing).

    Returns:
        ``{"mu", "sigma", "features" (None for foreign files), "meta", "path", "cached"}``;
        ``cached`` is True when nothing was recomputed.
    """
    spec = resolve_extractor(extractor)
    weights = str(inception_weights_file(inception_weights)) if spec.needs_weights else None
    if stats_path is not None and Path(stats_path).is_file():
        expect = stats_key(ref, spec, weights) if ref is not None else {"extractor": spec.name, "layer": default_layer(spec), "preprocessing": spec.preprocessing, "weights": _weights_identity(weights)}
        return load_stats(Path(stats_path), expect)
    if ref is None:
        raise OnestepError(f"--ref-stats {stats_path} does not exist and no --ref was given to compute it from")
    key = stats_key(ref, spec, weights)
    path = Path(stats_path) if stats_path is not None else Path(cache_dir or default_cache_dir()) / f"{key['slug']}-{spec.name}-{key['key']}.npz"
    if path.is_file():
        return load_stats(path, key)
    if ref == "digits":
        from onestep.digits import digits_dataset

        images = digits_dataset()[0]
    else:
        images = load_images(ref)
    feats = extract_features(images, extractor, batch_size, device, inception_weights, progress)
    meta = {k: v for k, v in key.items() if k != "slug"} | {"num_images": len(images), "reference": str(ref)}
    return save_stats(path, feats, meta)


# ------------------------------------------------------------------------- the metrics
def fid_kid_from_features(
    features: np.ndarray,
    ref: dict[str, Any],
    kid: bool = True,
    kid_subsets: int = 100,
    kid_subset_size: int = 1000,
    seed: int = 0,
) -> dict[str, Any]:
    """FID (torch-fidelity's ``fid_statistics_to_metric``) and KID (``kid_features_to_metric``, polynomial
    kernel of degree 3, ``kid_subsets`` subsets of ``min(kid_subset_size, N_gen, N_ref)`` images each)
    of generated features against reference statistics."""
    _tf()
    from torch_fidelity.metric_fid import KEY_METRIC_FID, fid_statistics_to_metric
    from torch_fidelity.metric_kid import KEY_METRIC_KID_MEAN, KEY_METRIC_KID_STD, kid_features_to_metric

    from .frechet import feature_statistics

    mu, sigma = feature_statistics(features)
    out: dict[str, Any] = {
        "fid": fid_statistics_to_metric({"mu": mu, "sigma": sigma}, {"mu": ref["mu"], "sigma": ref["sigma"]}, verbose=False)[KEY_METRIC_FID]
    }
    if kid and ref.get("features") is not None:
        size = min(kid_subset_size, len(features), len(ref["features"]))
        k = kid_features_to_metric(
            torch.from_numpy(np.asarray(features)), torch.from_numpy(ref["features"]),
            kid_subsets=kid_subsets, kid_subset_size=size, rng_seed=seed, verbose=False,
        )
        out.update(kid=k[KEY_METRIC_KID_MEAN], kid_std=k[KEY_METRIC_KID_STD], kid_subset_size=size, kid_subsets=kid_subsets)
    elif kid:
        out.update(kid=None, kid_note="the reference statistics file holds no features; KID needs them")
    return out


def compute_fid_kid(
    fake: torch.Tensor | str | Path,
    ref: str | None = "digits",
    extractor: str = "digits",
    ref_stats: str | Path | None = None,
    cache_dir: str | Path | None = None,
    batch_size: int = 256,
    device: torch.device | str | None = None,
    inception_weights: str | Path | None = None,
    kid: bool = True,
    kid_subset_size: int = 1000,
    seed: int = 0,
    progress: bool = False,
) -> dict[str, Any]:
    """FID and KID of ``fake`` (images, or a folder of them) against a reference, with torch-fidelity.

    Args:
        fake: uint8 or [-1, 1] float images ``(N, C, H, W)``, or a folder (see :func:`load_images`).
        ref: ``"digits"``, a folder of images, or None with an existing ``ref_stats`` file.
        extractor: ``"digits"``, ``"inception"`` or a name given to :func:`register_extractor`.
        ref_stats: a statistics ``.npz`` to read, or to write on first use.

    Returns:
        ``{"fid", "kid", "kid_std", "num_fake", "num_ref", "extractor", "preprocessing", "ref_stats", "ref_cached", ...}``
    """
    check_weights_early(extractor, inception_weights)  # fail fast, before any extraction
    spec = resolve_extractor(extractor)
    ref_s = reference_statistics(ref, extractor, ref_stats, cache_dir, batch_size, device, inception_weights, progress)
    images = load_images(fake) if isinstance(fake, (str, Path)) else fake
    feats = extract_features(images, extractor, batch_size, device, inception_weights, progress)
    out = fid_kid_from_features(feats, ref_s, kid=kid, kid_subset_size=kid_subset_size, seed=seed)
    out.update(
        num_fake=len(feats),
        num_ref=ref_s["meta"].get("num_images", None if ref_s["features"] is None else len(ref_s["features"])),
        extractor=spec.name,
        feature_layer=default_layer(spec),
        preprocessing=spec.preprocessing,
        ref=str(ref) if ref is not None else None,
        ref_stats=ref_s["path"],
        ref_cached=ref_s["cached"],
    )
    return out
