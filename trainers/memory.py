"""Memory and speed switches of a training run: the attention kernels of the diffusers backbones,
the dtype of the frozen weights, their memory layout and torch.compile.

- ``attention``: ``"sdpa"`` keeps diffusers' default processors (torch's
  ``scaled_dot_product_attention``, which picks flash / memory-efficient kernels on GPU by itself);
  ``"xformers"`` switches every diffusers backbone of the triad (and the VAE) to xformers'
  memory-efficient attention. xformers has no CPU kernels, so it needs a CUDA device.
- ``frozen_dtype``: what never trains (the teacher's backbone when the fake score is a full copy,
  the shared base weights when it is LoRA, the VAE) is stored in bf16 / fp16, halving its memory,
  as the diffusers training scripts do with their ``weight_dtype``. Trainable weights (the
  generator, a full fake score, LoRA adapters, heads) stay float32: their optimizer needs float32
  masters. A frozen backbone gets its floating inputs cast to its dtype and its output cast back
  to float32, so it runs with mixed precision off too.
- ``channels_last`` and ``torch_compile`` (:func:`apply_speed_switches`): every distinct backbone
  of the triad gets its 4-D weights in channels-last layout, and is compiled in place
  (``nn.Module.compile``: the state dict keeps its keys, so checkpoints and exports are unchanged).
"""

from __future__ import annotations

import copy
import importlib.util
from typing import Any

import torch
from torch import nn

from onestep.errors import ConfigError
from onestep.precision import small_parameter_ids, store_small_compute_float32

ATTENTION_BACKENDS = ("sdpa", "xformers")
FROZEN_DTYPES = {"float32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
#: what frozen weights compute in (DistillConfig.frozen_compute; resolve_frozen_compute)
FROZEN_COMPUTE = ("auto", "storage", "float32")
#: Inputs a frozen backbone keeps in float32: timesteps (bf16 cannot hold 999) and SDXL's pixel
#: sizes; diffusers embeds them in float32 and casts the embedding itself.
KEEP_FLOAT32 = ("timestep", "time_ids")


def resolve_frozen_dtype(frozen_dtype: str, mixed_precision: str) -> torch.dtype:
    """The dtype of frozen weights: ``frozen_dtype``, or for ``"auto"`` the mixed-precision dtype
    (float32 when mixed precision is off)."""
    if frozen_dtype == "auto":
        return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(mixed_precision, torch.float32)
    if frozen_dtype not in FROZEN_DTYPES:
        raise ConfigError(f"frozen_dtype must be 'auto' or one of {tuple(FROZEN_DTYPES)} (got {frozen_dtype!r})")
    return FROZEN_DTYPES[frozen_dtype]


def _unique(modules: list[nn.Module]) -> list[nn.Module]:
    """``modules`` without repeats (a LoRA fake score shares the teacher's backbone)."""
    out: list[nn.Module] = []
    for m in modules:
        if m is not None and not any(m is o for o in out):
            out.append(m)
    return out


def set_attention(modules: list[nn.Module], backend: str, device: torch.device | str) -> None:
    """Select the attention kernels of the diffusers models among ``modules``.

    Args:
        modules: backbones (and the VAE); those without diffusers' attention switch are skipped.
        backend: ``"sdpa"`` (leave diffusers' default processors) or ``"xformers"``.
        device: where training runs; xformers needs CUDA.
    """
    if backend not in ATTENTION_BACKENDS:
        raise ConfigError(f"attention must be one of {ATTENTION_BACKENDS} (got {backend!r})")
    if backend == "sdpa":
        return
    if importlib.util.find_spec("xformers") is None:
        raise ConfigError("attention: xformers is not installed; `pip install xformers` (CUDA only) or set attention: sdpa")
    if torch.device(device).type != "cuda":
        raise ConfigError(f"attention: xformers has no kernels for device {torch.device(device).type!r}; it needs CUDA. Set attention: sdpa")
    for m in _unique(modules):
        if hasattr(m, "enable_xformers_memory_efficient_attention"):
            m.enable_xformers_memory_efficient_attention()


def _cast_floats(value: Any, dtype: torch.dtype) -> Any:
    if isinstance(value, torch.Tensor):
        return value.to(dtype) if value.is_floating_point() else value
    if isinstance(value, dict):
        return {k: (v if k in KEEP_FLOAT32 else _cast_floats(v, dtype)) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_cast_floats(v, dtype) for v in value)
    return value


def _cast_inputs(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    dtype = module._onestep_frozen_dtype
    # The first positional input is the sample; a second one is the timestep (kept float32).
    args = (_cast_floats(args[0], dtype), *args[1:]) if args else args
    return args, _cast_floats(kwargs, dtype)


def _output_to_float32(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
    if isinstance(output, torch.Tensor):
        return output.float()
    if isinstance(output, tuple):
        return tuple(o.float() if isinstance(o, torch.Tensor) and o.is_floating_point() else o for o in output)
    sample = getattr(output, "sample", None)
    if isinstance(sample, torch.Tensor):
        output.sample = sample.float()  # diffusers' BaseOutput keeps its dict entry in step
    return output


def resolve_frozen_compute(frozen_compute: str, dtype: torch.dtype, device: torch.device | str) -> str:
    """``"storage"`` or ``"float32"``: what frozen weights stored in ``dtype`` compute in on ``device``.
    ``"auto"`` is float32 on a CPU whose oneDNN has no ``dtype`` kernels (no AVX512-BF16 / AMX: there a
    bf16 convolution was 141x slower than float32 on this project's 2-core EPYC), storage elsewhere."""
    if frozen_compute not in FROZEN_COMPUTE:
        raise ConfigError(f"frozen_compute must be one of {FROZEN_COMPUTE} (got {frozen_compute!r})")
    if frozen_compute != "auto":
        return frozen_compute
    if dtype == torch.float32 or torch.device(device).type != "cpu":
        return "storage"
    check = {torch.bfloat16: "_is_mkldnn_bf16_supported", torch.float16: "_is_mkldnn_fp16_supported"}[dtype]
    try:
        native = bool(getattr(torch.ops.mkldnn, check)())
    except (AttributeError, RuntimeError):
        native = False
    return "storage" if native else "float32"


def frozen_bytes(backbone: nn.Module, dtype: torch.dtype, compute: str = "storage") -> int:
    """Bytes :func:`cast_frozen_backbone` leaves ``backbone``'s frozen (non-adapter) parameters holding
    (works on the meta device: for the memory plan)."""
    params = [(n, p) for n, p in backbone.named_parameters() if "lora_" not in n]
    if compute != "float32" or dtype == torch.float32:
        return storage_bytes(p.to(dtype) if p.is_floating_point() else p for _, p in params)
    small = small_parameter_ids(backbone)
    size = torch.finfo(dtype).bits // 8
    return sum(p.numel() * (size if id(p) in small else 4) for _, p in params)


def cast_frozen_backbone(backbone: nn.Module, dtype: torch.dtype, compute: str = "storage") -> None:
    """Store the frozen weights of ``backbone`` in ``dtype`` and make it take and give float32.

    Parameters with ``requires_grad`` and peft adapters (``lora_`` in the name) stay float32; a
    backbone holding trainable weights other than adapters is refused. ``compute="storage"``:
    floating inputs (except timesteps and SDXL ``time_ids``) are cast to ``dtype`` by a forward
    pre-hook, the prediction back to float32 by a forward hook, so callers need not know.
    ``compute="float32"``: the Linear and Conv2d weights are stored in ``dtype`` and upcast one layer
    at a time as they run (the rest stays float32); the backbone computes in float32.
    """
    trainable = [n for n, p in backbone.named_parameters() if p.requires_grad and "lora_" not in n]
    if trainable:
        raise ValueError(f"cast_frozen_backbone: {type(backbone).__name__} has trainable weights ({trainable[0]}, ...)")
    if compute == "float32" and dtype != torch.float32:
        store_small_compute_float32(backbone, dtype)
        backbone._onestep_frozen_dtype = torch.float32  # the input / output hooks (if any) cast nothing
        return
    for name, p in backbone.named_parameters():
        if "lora_" not in name and p.is_floating_point():
            p.data = p.data.to(dtype)
    for name, b in backbone.named_buffers():
        if "lora_" not in name and b.is_floating_point():
            b.data = b.data.to(dtype)
    backbone._onestep_frozen_dtype = dtype  # what the hooks cast to
    if dtype != torch.float32 and not getattr(backbone, "_onestep_cast_hooks", False):
        backbone.register_forward_pre_hook(_cast_inputs, with_kwargs=True)
        backbone.register_forward_hook(_output_to_float32, with_kwargs=True)
        backbone._onestep_cast_hooks = True


def to_float32(backbone: nn.Module) -> nn.Module:
    """Undo :func:`cast_frozen_backbone` on ``backbone`` (in place): every weight float32, the hooks no-ops."""
    backbone.float()
    if hasattr(backbone, "_onestep_frozen_dtype"):
        backbone._onestep_frozen_dtype = torch.float32
    return backbone


def float32_copy(backbone: nn.Module) -> nn.Module:
    """A copy of ``backbone`` with every weight and floating buffer in float32, built tensor by tensor:
    a base frozen in bf16 / fp16 is never copied in its own dtype first, so the peak is the float32
    copy alone (SDXL: 10.3 GB, not 5.1 + 10.3). Nothing is shared with ``backbone``."""
    memo: dict[int, Any] = {}
    for p in backbone.parameters():
        memo[id(p)] = nn.Parameter(p.detach().to(torch.float32, copy=True), requires_grad=p.requires_grad)
    for b in backbone.buffers():
        memo[id(b)] = b.detach().to(torch.float32, copy=True) if b.is_floating_point() else b.detach().clone()
    return to_float32(copy.deepcopy(backbone, memo))


def cast_frozen(triad, vae: nn.Module | None, dtype: torch.dtype, compute: str = "storage") -> None:
    """Cast what is frozen in ``triad`` (and the teacher's ``vae``) to ``dtype``.

    The teacher's backbone is cast: with a full-copy fake score it is the teacher's alone; with a
    LoRA fake score it is shared, and its base weights are cast while the adapters stay float32.
    A LoRA generator's base weights are cast too (they are the teacher's own tensors unless FSDP gave
    it a copy; its adapters stay float32; the export writes them merged in float32, a tensor at a time), as diffusers'
    LoRA training scripts keep the base in ``weight_dtype``.
    A full generator and a full-copy fake score are not touched. The VAE stays float32 under fp16 when
    its config asks for it (``force_upcast``: the SDXL VAE overflows in fp16), and with ``compute``
    float32 (:func:`cast_frozen_backbone`; it is small, and its inputs follow its dtype).
    """
    if dtype == torch.float32 or triad.teacher_spec.analytic:  # an exact score has no weights to shrink
        return
    cast_frozen_backbone(triad.teacher.backbone, dtype, compute)
    generator = triad.generator.backbone
    if any("lora_" in n for n, _ in generator.named_parameters()):
        cast_frozen_backbone(generator, dtype, compute)
    if vae is not None and compute != "float32":
        inner = getattr(vae, "vae", vae)
        if not (dtype == torch.float16 and getattr(getattr(inner, "config", None), "force_upcast", False)):
            vae.to(dtype)  # LatentVAE casts its inputs to the VAE's dtype and returns float32


def storage_bytes(tensors) -> int:
    """Bytes held by ``tensors`` (parameters or a state dict's values)."""
    return sum(t.numel() * t.element_size() for t in tensors)


def apply_memory_switches(trainer) -> None:
    """Apply a :class:`~onestep.trainers.base.DistillTrainer`'s ``attention`` and ``frozen_dtype``
    settings to its triad and the teacher's VAE (called once while the trainer is built)."""
    c, triad, vae = trainer.config, trainer.triad, trainer.teacher_spec.vae
    device = trainer.accelerator.device
    fake = triad.fake.backbone if triad.fake is not None else None
    set_attention([triad.teacher.backbone, fake, triad.generator.backbone, getattr(vae, "vae", None)], c.attention, device)
    dtype = resolve_frozen_dtype(c.frozen_dtype, c.mixed_precision)
    cast_frozen(triad, vae, dtype, resolve_frozen_compute(c.frozen_compute, dtype, device))


def triad_backbones(triad) -> list[nn.Module]:
    """The triad's distinct backbones (a LoRA fake score shares the teacher's)."""
    found: dict[int, nn.Module] = {}
    for den in (triad.generator, triad.fake, triad.teacher):
        if den is not None:
            found.setdefault(id(den.backbone), den.backbone)
    return list(found.values())


def apply_speed_switches(trainer) -> None:
    """``channels_last`` and ``torch_compile`` on every distinct backbone of the trainer's triad (called once,
    after the networks are placed)."""
    c = trainer.config
    if c.torch_compile and trainer.fsdp:
        raise ConfigError("torch_compile: not with fsdp (the sharded networks are not compiled); set one of them false")
    for net in triad_backbones(trainer.triad):
        if c.channels_last:
            net.to(memory_format=torch.channels_last)
        if c.torch_compile:
            net.compile()
