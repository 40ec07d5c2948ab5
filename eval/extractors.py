"""Feature extractors for FID/KID: registration with torch-fidelity, the one preprocessing, features.

torch-fidelity builds a feature extractor from its registry and runs it over the images in
batches (with a progress bar). onestep registers two:

- ``onestep-digits`` (the shipped digits classifier, CLI name ``digits``);
- ``onestep-inception-v3`` (torch-fidelity's Inception-v3, CLI name ``inception``), whose weights
  come from a local file (:func:`inception_weights_file`), never from a download.

Each extractor has one preprocessing, the same for generated and reference images
(:func:`prepare_images`). Register your own with :func:`register_extractor` (a torch-fidelity
``FeatureExtractorBase`` subclass); it then works everywhere an extractor name is accepted.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from onestep.errors import OnestepError
from onestep.runtime import default_device

from .images import U8_RULE, as_uint8

INCEPTION_FILE = "weights-inception-2015-12-05-6726825d.pth"


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


def import_torch_fidelity():
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
    import_torch_fidelity()
    full = ALIASES.get(name, name)
    if full not in EXTRACTORS:
        raise OnestepError(f"unknown feature extractor {name!r}; known: digits, inception, {', '.join(sorted(set(EXTRACTORS) - set(ALIASES.values())) or '(none registered)')}")
    return EXTRACTORS[full]


# ---------------------------------------------------------------------- preprocessing
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
    x = as_uint8(images)
    if spec.channels == 3 and x.shape[1] == 1:
        x = x.repeat(1, 3, 1, 1)
    elif spec.channels == 1 and x.shape[1] == 3:
        x = x.float().mean(1, keepdim=True).round().to(torch.uint8)
    return x


class _ImageSet(torch.utils.data.Dataset):
    """uint8 images as torch-fidelity's dataset input (each item a ``(C, H, W)`` uint8 tensor)."""

    def __init__(self, images: torch.Tensor):
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.images[i]


# ---------------------------------------------------------------------------- features
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
