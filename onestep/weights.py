"""Weights I/O, safetensors only: trainable weights of a network, strict loads, and the
generator a training checkpoint holds.

Used by the trainers (``init_generator``, ``init_fake_score``, DisBack's nodes, checkpoints)
and by evaluation (scoring each ``checkpoint-N`` of a run), so it lives in core.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .errors import ConfigError, OnestepError

#: In a checkpoint folder: the generator as an export would hold it (EMA weights, LoRA merged),
#: written when those differ from the raw weights in :data:`GENERATOR_WEIGHTS`.
EXPORT_WEIGHTS = "generator_export.safetensors"
#: In a checkpoint folder: the generator backbone's trained weights (and buffers).
GENERATOR_WEIGHTS = "generator.safetensors"
#: The same in a checkpoint of onestep < 0.2 (``accelerator.save_state``).
OLD_GENERATOR_WEIGHTS = "model.safetensors"


#: where a student folder keeps its generator (``generator_subfolder`` of onestep.json)
STUDENT_SUBFOLDERS = ("generator", "unet", "transformer")


def weights_file(path: str | Path) -> Path:
    """A ``.safetensors`` file of a generator network: the file itself, or a student folder's
    ``<generator|unet|transformer>/diffusion_pytorch_model.safetensors`` (text-to-image students keep their
    denoiser where diffusers pipelines do). Pickles are refused."""
    p = Path(path)
    if p.is_dir():
        sub = next((d for d in STUDENT_SUBFOLDERS if (p / d).is_dir()), STUDENT_SUBFOLDERS[0])
        p = p / sub / "diffusion_pytorch_model.safetensors"
    if p.suffix != ".safetensors":
        raise ConfigError(f"{path}: weights load only from .safetensors files (or a student folder), never from pickles")
    if not p.is_file():
        raise ConfigError(f"{path}: no such weights file")
    return p


#: safetensors' names of the dtypes it stores
SAFETENSORS_DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.int64: "I64",
    torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8", torch.bool: "BOOL",
}


@dataclass(frozen=True)
class Deferred:
    """A tensor computed only when it is written (:func:`write_safetensors`), its shape and dtype known
    beforehand: a state dict of these describes a network that is never held whole (a LoRA generator
    merged in float32, an EMA average), each tensor built, written and freed in turn."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    compute: Callable[[], torch.Tensor]

    def is_floating_point(self) -> bool:
        return self.dtype.is_floating_point

    def numel(self) -> int:
        return math.prod(self.shape)

    def value(self) -> torch.Tensor:
        t = self.compute()
        if tuple(t.shape) != tuple(self.shape) or t.dtype != self.dtype:
            raise RuntimeError(f"deferred tensor: computed {tuple(t.shape)} {t.dtype}, announced {tuple(self.shape)} {self.dtype}")
        return t


#: A state dict whose values may be :class:`Deferred`.
StateDict = Mapping[str, "torch.Tensor | Deferred"]


def write_safetensors(tensors: StateDict, path: str | Path, metadata: dict[str, str] | None = None, dtype: torch.dtype | None = None) -> Path:
    """Write ``tensors`` to a safetensors file one tensor at a time (the same format ``safetensors``
    writes, read back by it and by diffusers). ``safetensors.torch.save_file`` first turns every tensor
    into a ``bytes`` copy, so saving a network holds it twice (an SDXL UNet in float32: 10.3 GB more);
    here the extra memory is one tensor. :class:`Deferred` values are computed as they are written.
    ``dtype``: floating tensors are cast to it as they are written."""
    import json

    def stored(t: torch.Tensor | Deferred) -> torch.Tensor:
        t = t.value() if isinstance(t, Deferred) else t.detach()
        if dtype is not None and t.is_floating_point():
            t = t.to(dtype)
        return t.cpu().contiguous()

    header: dict[str, object] = {}
    offset = 0
    names = sorted(tensors)
    for k in names:
        t = tensors[k]
        out_dtype = dtype if dtype is not None and t.is_floating_point() else t.dtype
        if out_dtype not in SAFETENSORS_DTYPES:
            raise ValueError(f"write_safetensors: {k} has dtype {out_dtype}, which safetensors does not store")
        size = t.numel() * torch.empty((), dtype=out_dtype).element_size()
        header[k] = {"dtype": SAFETENSORS_DTYPES[out_dtype], "shape": list(t.shape), "data_offsets": [offset, offset + size]}
        offset += size
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned, as safetensors pads it
    with open(path, "wb") as f:
        f.write(len(raw).to_bytes(8, "little"))
        f.write(raw)
        for k in names:
            t = stored(tensors[k])
            if t.numel():
                f.write(t.reshape(-1).view(torch.uint8).numpy().data)
    return Path(path)


def save_model(
    net: nn.Module, folder: str | Path, variant: str | None = None, dtype: torch.dtype | None = None, state: StateDict | None = None
) -> Path:
    """What ``net.save_pretrained(folder, safe_serialization=True[, variant=variant])`` writes for a diffusers
    model (``config.json`` and one ``diffusion_pytorch_model[.variant].safetensors``), with the weights
    written a tensor at a time (:func:`onestep.weights.write_safetensors`; ``dtype``: cast as written), so
    an SDXL-size UNet is never held twice, nor split into shards that would have to be gathered again.
    ``state``: the weights to write instead of ``net``'s own (``net`` then gives only its config)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    net.save_config(folder)
    name = "diffusion_pytorch_model" + (f".{variant}" if variant else "") + ".safetensors"
    return write_safetensors(net.state_dict() if state is None else state, folder / name, {"format": "pt"}, dtype=dtype)


def save_tensors(tensors: StateDict, path: str | Path, metadata: dict[str, str] | None = None) -> Path:
    """Write ``tensors`` (detached, on the CPU, contiguous) to a safetensors file, one tensor at a time
    (:func:`write_safetensors`)."""
    return write_safetensors(tensors, path, metadata)


def trainable_state(net: nn.Module) -> dict[str, torch.Tensor]:
    """Every trainable parameter of ``net`` by name (a full network, or only the adapters of a LoRA one)."""
    return {n: p.detach().cpu().contiguous().clone() for n, p in net.named_parameters() if p.requires_grad}


def save_trainable(net: nn.Module, path: str | Path, metadata: dict[str, str] | None = None) -> Path:
    """Write :func:`trainable_state` of ``net`` to a safetensors file."""
    return save_tensors(trainable_state(net), path, metadata)


def save_state(net: nn.Module, path: str | Path) -> Path:
    """Write the whole state dict of ``net`` (on CPU, contiguous) to a safetensors file."""
    return save_tensors(net.state_dict(), path)


def load_trainable(
    net: nn.Module, path: str | Path, what: str = "weights", trainable: set[str] | None = None, keep_frozen: bool = False
) -> None:
    """Load a safetensors file into ``net`` strictly: its keys must be exactly ``net``'s state dict
    (a full save) or exactly its trainable parameters (:func:`save_trainable`), with matching shapes.
    ``trainable``: those parameters' names, when ``net`` is a frozen copy of the network that trained.
    ``keep_frozen``: ``net``'s frozen tensors are shared with another network (a LoRA generator on the
    teacher's base): a full save must hold them unchanged (compared in their dtype), and only the
    trainable ones are written."""
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{what}: {path} is missing")
    tensors = load_file(str(path))
    full = set(net.state_dict())
    if trainable is None:
        trainable = {n for n, p in net.named_parameters() if p.requires_grad}
    if set(tensors) == full:
        expected = net.state_dict()
    elif set(tensors) == set(trainable):
        expected = dict(net.named_parameters())
    else:
        missing, unexpected = sorted(set(trainable) - set(tensors)), sorted(set(tensors) - full)
        raise ConfigError(f"{what}: {path} does not match the network: missing {missing[:3]}, unexpected {unexpected[:3]}")
    with torch.no_grad():
        for n, v in tensors.items():
            if expected[n].shape != v.shape:
                raise ConfigError(f"{what}: {path}: {n} has shape {tuple(v.shape)}, expected {tuple(expected[n].shape)}")
            if keep_frozen and n not in trainable:
                if not torch.equal(expected[n], v.to(device=expected[n].device, dtype=expected[n].dtype)):
                    raise ConfigError(
                        f"{what}: {path}: {n} differs from the base this network shares with the teacher; "
                        "a LoRA generator trains only its adapters (save them alone, or use a full generator)"
                    )
                continue
            expected[n].copy_(v)


def check_same_network(net: nn.Module | StateDict, path: str | Path, what: str) -> Path:
    """The weights file of ``path`` (:func:`weights_file`) if it holds exactly ``net``'s state dict (keys
    and shapes, read from the header without loading the tensors); a :class:`ConfigError` naming
    ``what`` otherwise. ``net``: a network or a state dict. LoRA adapters on a network are not part of
    it: the plain layers' names and shapes are compared (what :func:`onestep.lora.merged_lora` leaves)."""
    from safetensors import safe_open

    file = weights_file(path)
    if isinstance(net, nn.Module):
        state = {k.replace(".base_layer.", "."): v for k, v in net.state_dict().items() if "lora_" not in k}
    else:
        state = net
    with safe_open(str(file), "pt") as f:
        shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    if set(shapes) != set(state):
        missing, unexpected = sorted(set(state) - set(shapes)), sorted(set(shapes) - set(state))
        raise ConfigError(f"{what}: {file} is not this network: missing {missing[:3]}, unexpected {unexpected[:3]}")
    for k, v in state.items():
        if shapes[k] != tuple(v.shape):
            raise ConfigError(f"{what}: {file}: {k} has shape {shapes[k]}, expected {tuple(v.shape)}")
    return file


@torch.no_grad()
def average_with(net: nn.Module, path: str | Path, weight: float) -> nn.Module:
    """``net`` (in place) as ``(1 - weight) * net + weight * other``, ``other`` read from ``path`` (a student
    folder or a ``.safetensors`` of the same network: the same keys and shapes, checked first).
    Floating-point tensors are averaged; other buffers must be equal (:func:`averaged_state`, one tensor at a time)."""
    state = net.state_dict()
    for k, v in averaged_state(state, path, weight).items():
        if isinstance(v, Deferred):
            state[k].copy_(v.value())
    return net


def averaged_state(state: StateDict, path: str | Path, weight: float) -> dict[str, torch.Tensor | Deferred]:
    """:func:`average_with` for a state dict that is written, not held: each floating tensor becomes
    ``(1 - weight) * tensor + weight * other``, :class:`Deferred`, read from ``path`` (the same network,
    checked first) when it is written. Other buffers must be equal (checked now)."""
    from safetensors import safe_open

    file = check_same_network(state, path, "export_average_with")
    other = safe_open(str(file), "pt")  # memory-mapped; kept open while the entries are written

    def mixed(k: str, v: torch.Tensor | Deferred) -> Callable[[], torch.Tensor]:
        def compute() -> torch.Tensor:
            t = v.value() if isinstance(v, Deferred) else v.detach()
            return t.lerp(other.get_tensor(k).to(device=t.device, dtype=t.dtype), weight)

        return compute

    out: dict[str, torch.Tensor | Deferred] = {}
    for k, v in state.items():
        if v.is_floating_point():
            out[k] = Deferred(tuple(v.shape), v.dtype, mixed(k, v))
        else:
            if not torch.equal(v.cpu(), other.get_tensor(k)):
                raise ConfigError(f"export_average_with: {file}: {k} differs and cannot be averaged")
            out[k] = v
    return out


def generator_from_checkpoint(generator: nn.Module, checkpoint: str | Path) -> nn.Module:
    """A CPU copy of ``generator`` (a student's :class:`~onestep.denoiser.Denoiser`) holding the weights
    of training checkpoint ``checkpoint``, in eval mode.

    With EMA (or a LoRA generator) the checkpoint holds :data:`EXPORT_WEIGHTS`, the weights an export
    at that step would have, and those are used; otherwise the raw generator weights
    :data:`GENERATOR_WEIGHTS` are the export's weights.
    """
    from safetensors.torch import load_file

    checkpoint = Path(checkpoint)
    gen = copy.deepcopy(generator).cpu()
    exported = checkpoint / EXPORT_WEIGHTS
    if exported.is_file():
        state = load_file(exported)
        if set(state) != set(gen.backbone.state_dict()):
            raise OnestepError(f"{exported} does not hold this student's generator")
        gen.backbone.load_state_dict(state)
        return gen.eval()
    weights = checkpoint / GENERATOR_WEIGHTS
    if not weights.is_file() and (checkpoint / OLD_GENERATOR_WEIGHTS).is_file():
        weights = checkpoint / OLD_GENERATOR_WEIGHTS
    if not weights.is_file():
        raise OnestepError(f"{checkpoint}: no {GENERATOR_WEIGHTS} (the generator's weights)")
    state = load_file(weights)
    expected = gen.state_dict()
    if set(state) != set(expected):
        # the backbone's names, or (an older checkpoint) the Denoiser wrapper's ("backbone." prefix)
        state = {k.removeprefix("backbone."): v for k, v in state.items()}
        expected = gen.backbone.state_dict()
        if set(state) != set(expected):
            missing = sorted(set(expected) - set(state))[:3]
            raise OnestepError(f"{weights} does not hold this student's generator (missing e.g. {missing})")
        gen.backbone.load_state_dict(state)
    else:
        gen.load_state_dict(state)
    return gen.eval()


__all__ = [
    "EXPORT_WEIGHTS",
    "average_with",
    "averaged_state",
    "Deferred",
    "check_same_network",
    "GENERATOR_WEIGHTS",
    "generator_from_checkpoint",
    "load_trainable",
    "save_model",
    "save_state",
    "save_tensors",
    "STUDENT_SUBFOLDERS",
    "write_safetensors",
    "save_trainable",
    "StateDict",
    "trainable_state",
    "weights_file",
]
