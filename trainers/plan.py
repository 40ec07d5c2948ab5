"""``onestep train CONFIG --plan``: what a run's networks will hold in memory, before it starts.

The networks are built from the teacher folder's configs on the meta device (no weights are read,
no memory is taken: an SDXL plan takes about a second), with the config's LoRA adapters injected
the way the run injects them, and each role's bytes counted: frozen weights in the frozen dtype;
trained weights in float32 with their gradients, AdamW's two moments and the EMA copy. Activations
and the GAN head (small) are not in the table: activations depend on the resolution, the batch and
gradient checkpointing; a short run (``--max_steps 2``) shows them.

Built-in teachers (digits, gmm) are small and are simply loaded.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from onestep.lora import add_lora

from .config import DistillConfig, resolve_mixed_precision
from .memory import frozen_bytes, resolve_frozen_compute, resolve_frozen_dtype

GIB = 1024**3
#: Backbone components of a pipeline folder, in the order looked for.
BACKBONES = ("unet", "transformer")
TEXT_ENCODERS = ("text_encoder", "text_encoder_2", "text_encoder_3")


@dataclass
class Row:
    role: str
    what: str
    params: int
    bytes: int


def _meta_component(folder: Path, library: str, class_name: str) -> nn.Module | None:
    """The component of ``folder`` built from its config on the meta device (None: not a network)."""
    if not (folder / "config.json").is_file():
        return None
    if library == "diffusers":
        import diffusers

        cls = getattr(diffusers, class_name)
        with torch.device("meta"):
            return cls.from_config(cls.load_config(folder))
    if library == "transformers":
        import transformers

        cls = getattr(transformers, class_name)
        config = transformers.AutoConfig.from_pretrained(folder)
        with torch.device("meta"):
            return cls(config)
    return None


def meta_parts(teacher: str) -> dict[str, nn.Module]:
    """The networks of teacher ``teacher`` by component name (``backbone``, ``trainable``: the network
    the generator and a full fake score copy, ``vae``, ``text_encoder``, ...), on the meta device for
    pipeline folders, loaded for built-in teachers (an analytic teacher's backbone has no weights)."""
    path = Path(teacher).expanduser()
    index_file = path / "model_index.json"
    if not index_file.is_file():
        from onestep.teachers import load_teacher

        t = load_teacher(teacher)
        parts = {"backbone": t.backbone, "trainable": t.new_backbone()}
        if t.vae is not None:
            parts["vae"] = t.vae
        return parts
    from onestep.teachers.sd import read_model_index

    index = read_model_index(path)
    parts: dict[str, nn.Module] = {}
    for name, spec in index.items():
        if name.startswith("_") or not isinstance(spec, list) or len(spec) != 2 or spec[0] is None:
            continue
        module = _meta_component(path / name, *spec)
        if module is not None:
            parts["backbone" if name in BACKBONES else name] = module
    parts["trainable"] = parts["backbone"]  # the generator starts as a copy of the teacher
    return parts


def _with_guidance_input(c, backbone: nn.Module) -> nn.Module:
    """The student network of a consistency run with ``guidance_scale_range`` (its guidance embedding or
    extra class rows: :func:`onestep.consistency.with_guidance_input`), built on the meta device."""
    from types import SimpleNamespace

    from onestep.consistency import GuidanceInput, with_guidance_input

    like = SimpleNamespace(backbone=backbone, conditioning=SimpleNamespace(guidable=True), name=str(c.teacher))
    g = GuidanceInput.for_teacher(like, c.guidance_scale_range, c.guidance_scale, c.guidance_embedding_dim, c.guidance_levels)
    with torch.device("meta"):
        return with_guidance_input(backbone, g)


def _count(params) -> int:
    return sum(p.numel() for p in params)


def _lora_count(backbone: nn.Module, rank: int, alpha: float | None, targets) -> int:
    net = copy.deepcopy(backbone)  # on the meta device: the structure only, no weights copied
    add_lora(net, rank, alpha, "plan", targets)
    return _count(p for n, p in net.named_parameters() if "lora_" in n)


def _trained(role: str, n: int, ema: bool) -> list[Row]:
    rows = [Row(role, "weights (float32)", n, 4 * n), Row(role, "gradients (float32)", n, 4 * n),
            Row(role, "AdamW moments (2 x float32)", n, 8 * n)]
    return rows + ([Row(role, "EMA copy (float32)", n, 4 * n)] if ema else [])


def memory_plan(config: DistillConfig) -> tuple[list[Row], dict[str, str]]:
    """The rows of the plan and what they assume (the frozen dtype, the teacher)."""
    c = config
    mixed = resolve_mixed_precision(c.mixed_precision) or "no"
    frozen = resolve_frozen_dtype(c.frozen_dtype, mixed)
    fb = torch.finfo(frozen).bits // 8
    frozen_name = str(frozen).removeprefix("torch.")
    # what frozen weights compute in on this machine (float32 keeps norms and embeddings float32)
    compute = resolve_frozen_compute(c.frozen_compute, frozen, "cuda" if torch.cuda.is_available() else "cpu")
    held = f"{frozen_name}, float32 compute" if compute == "float32" and frozen != torch.float32 else frozen_name
    parts = meta_parts(c.teacher)
    backbone = parts["backbone"]
    trainable = parts["trainable"]
    if getattr(c, "guidance_scale_range", None) is not None:  # a consistency student that takes the scale
        trainable = _with_guidance_input(c, backbone)
    n, m = _count(backbone.parameters()), _count(trainable.parameters())
    base_bytes = frozen_bytes(backbone, frozen, compute)
    rows: list[Row] = []
    lora_fake = c.fake_score == "lora"
    # a LoRA generator shares the teacher's base (onestep.triad), except under FSDP
    shared_generator = bool(c.generator_lora_rank) and not c.fsdp
    sharing = (["fake-score base"] if lora_fake else []) + (["generator base"] if shared_generator else [])
    teacher_role = f"teacher + {' + '.join(sharing)} (shared)" if sharing else "teacher"
    rows.append(Row(teacher_role, f"frozen weights ({held})", n, base_bytes))
    if c.fake_score == "copy":
        rows += _trained("fake score (full copy)", m, ema=False)
    elif lora_fake:
        rows += _trained("fake score (LoRA adapters)", _lora_count(backbone, c.lora_rank, c.lora_alpha, c.lora_targets), ema=False)
    ema = c.ema_decay > 0
    if c.generator_lora_rank:
        if not shared_generator:
            rows.append(Row("generator (LoRA) base", f"own frozen copy of the base ({held})", n, base_bytes))
        a = _lora_count(backbone, c.generator_lora_rank, c.generator_lora_alpha, c.generator_lora_targets)
        rows += _trained("generator (LoRA adapters)", a, ema)
    else:
        rows += _trained("generator", m, ema)
    if "vae" in parts:
        v = _count(parts["vae"].parameters())
        role = "VAE"
        if "vocoder" in parts:  # AudioLDM: the vocoder is held (and cast) with the VAE
            v += _count(parts["vocoder"].parameters())
            role = "VAE + vocoder"
        vae_fb = 4 if compute == "float32" else fb  # float32 compute leaves the VAE float32
        rows.append(Row(role, f"frozen weights ({'float32' if vae_fb == 4 else frozen_name})", v, vae_fb * v))
    text = [k for k in TEXT_ENCODERS if k in parts]
    if text:
        t = sum(_count(parts[k].parameters()) for k in text)
        when = "while encoding the prompt set, freed after" if c.cache_text_embeddings else "kept (cache_text_embeddings: false)"
        rows.append(Row("text encoders", f"{', '.join(text)} ({frozen_name}), {when}", t, fb * t))
    return rows, {"frozen_dtype": frozen_name, "mixed_precision": mixed, "teacher": str(c.teacher)}


def resident_bytes(rows: list[Row]) -> int:
    """Bytes held at the peak of training: every row but the text encoders freed after encoding, and of
    the gradients only the larger network's (the loop frees each network's gradients after its update)."""
    held = [r for r in rows if "freed after" not in r.what]
    grads = [r.bytes for r in held if r.what.startswith("gradients")]
    return sum(r.bytes for r in held if not r.what.startswith("gradients")) + max(grads, default=0)


def format_plan(rows: list[Row], assumptions: dict[str, str], gpus: tuple[int, ...] = (24, 48, 80)) -> str:
    """The plan as the table ``--plan`` prints, with what is left of a ``gpus`` GiB device."""
    width = max(len(r.role) for r in rows)
    lines = [f"memory plan for teacher {assumptions['teacher']} (mixed_precision {assumptions['mixed_precision']}, "
             f"frozen weights {assumptions['frozen_dtype']}):", ""]
    lines.append(f"{'role':{width}s}  {'what':52s} {'params':>14s} {'GiB':>8s}")
    for r in rows:
        lines.append(f"{r.role:{width}s}  {r.what:52s} {r.params:>14,d} {r.bytes / GIB:>8.2f}")
    total = resident_bytes(rows)
    lines += ["", f"held through training: {total / GIB:.2f} GiB (one process, unsharded; gradients of one network at a "
                  "time; FSDP divides the trained rows by the number of processes)"]
    fits = "; ".join(f"{g} GiB: {(g * GIB - total) / GIB:.1f} left" if total < g * GIB else f"{g} GiB: does not fit" for g in gpus)
    lines.append(f"for activations (not counted) on a device of {fits}")
    return "\n".join(lines)


__all__ = ["Row", "format_plan", "memory_plan", "meta_parts", "resident_bytes"]
