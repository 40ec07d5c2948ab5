"""LoRA, in one place: which layers get adapters, adding them, and merging them back.

Used by the triad (a LoRA fake score on the teacher's own weights) and by the trainers (a LoRA
generator, merged into plain layers at export, and also written in diffusers' LoRA format:
:func:`lora_layers_for_diffusers`). Adapters come from peft and start at zero (``B = 0``), so an
adapted network starts equal to its base.
"""

from __future__ import annotations

import torch
from torch import nn

from .weights import Deferred

LORA_LAYER_TYPES = (nn.Linear, nn.Conv2d)

#: Inside a transformer block, LoRA adapts these layers: the attention projections of the image
#: and text streams and the feed-forward layers (the usual SD3 LoRA set, plus the MLPs).
TRANSFORMER_LORA_LAYERS = (
    "attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0",
    "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out",
    "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2",
)


#: The attention projections: what VSD / SwiftBrush / SNOOPI adapt in the fake score (q, k, v, out of
#: every attention layer; in an SD3 block also the text stream's projections).
ATTENTION_LORA_LAYERS = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")
#: What a ``targets`` setting may name besides a list of module-name suffixes.
LORA_TARGET_SETS = ("attention", "all")


def lora_target_modules(backbone: nn.Module, targets: str | list[str] = "all") -> list[str]:
    """The layers LoRA adapts in ``backbone``.

    Args:
        targets: ``"attention"``: the attention projections (:data:`ATTENTION_LORA_LAYERS`);
            ``"all"``: every Linear and Conv2d layer of a UNet (or MLP), and for a transformer (SD3)
            the attention projections and feed-forward layers of its blocks
            (:data:`TRANSFORMER_LORA_LAYERS`), not the patch / timestep / text embedders or AdaLN
            layers; or a list of module-name suffixes (``["to_q", "to_v"]``: the Linear and Conv2d
            layers whose names end with one of them).
    """
    from .denoiser import is_transformer
    from .errors import ConfigError

    def ends_with(name: str, suffixes) -> bool:
        return any(name == s or name.endswith("." + s) for s in suffixes)

    layers = [(name, m) for name, m in backbone.named_modules() if isinstance(m, LORA_LAYER_TYPES) and name]
    if isinstance(targets, (list, tuple)):
        found = [name for name, _ in layers if ends_with(name, targets)]
    elif targets == "attention":
        found = [name for name, m in layers if isinstance(m, nn.Linear) and ends_with(name, ATTENTION_LORA_LAYERS)]
    elif targets == "all":
        if is_transformer(backbone):
            found = [
                name for name, m in layers
                if isinstance(m, nn.Linear) and name.startswith("transformer_blocks.") and name.endswith(TRANSFORMER_LORA_LAYERS)
            ]
        else:
            found = [name for name, _ in layers]
    else:
        raise ConfigError(f"LoRA targets must be one of {LORA_TARGET_SETS} or a list of layer names (got {targets!r})")
    if not found:
        raise ConfigError(
            f"LoRA targets {targets!r} match no Linear or Conv2d layer of this {type(backbone).__name__}; "
            "use 'all' or name its layers"
        )
    return found


def add_lora(net: nn.Module, rank: int, alpha: float | None, name: str, targets: str | list[str] = "all") -> None:
    """Inject zero-initialised LoRA adapters named ``name`` into the layers :func:`lora_target_modules`
    picks for ``targets``, and train only adapters from then on. The adapters are float32 whatever the
    base's dtype (peft gives them the base layer's; their optimizer needs float32 masters)."""
    from peft import LoraConfig, inject_adapter_in_model

    config = LoraConfig(
        r=rank,
        lora_alpha=alpha if alpha is not None else rank,
        init_lora_weights=True,  # B = 0: the adapted network starts equal to its base
        target_modules=lora_target_modules(net, targets),
    )
    inject_adapter_in_model(config, net, adapter_name=name)
    for n, p in net.named_parameters():
        if "lora_" in n and p.is_floating_point() and p.dtype != torch.float32:
            p.data = p.data.float()
        p.requires_grad_("lora_" in n)


def merged_lora(net: nn.Module) -> nn.Module:
    """``net`` with its LoRA adapters merged into the base weights and the peft wrappers replaced by
    the plain layers (in place): a network that plain diffusers can save and load."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    wrapped = [(name, m) for name, m in net.named_modules() if isinstance(m, BaseTunerLayer)]
    for name, m in wrapped:
        m.merge()
        parent_name, _, child = name.rpartition(".")
        parent = net.get_submodule(parent_name) if parent_name else net
        setattr(parent, child, m.get_base_layer())
    for p in net.parameters():
        p.requires_grad_(True)
    return net


def merged_lora_state(net: nn.Module) -> dict[str, torch.Tensor | Deferred]:
    """The float32 state dict of ``merged_lora(float32 copy of net)`` without building that copy: each
    adapted layer's weight is :class:`~onestep.weights.Deferred`, ``base.float() + delta`` (peft's
    ``get_delta_weight`` of the active adapters, added in the order ``merge`` adds them), and every
    other floating tensor is cast to float32 when it is written. Writing it
    (:func:`onestep.weights.write_safetensors`) holds one merged tensor at a time, where the merged copy
    of an SDXL UNet is 10.3 GB. The adapters' current values are read when each entry is written."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    wrapped = {name: m for name, m in net.named_modules() if isinstance(m, BaseTunerLayer)}

    def to_float32(t: torch.Tensor) -> torch.Tensor | Deferred:
        if not t.is_floating_point() or t.dtype == torch.float32:
            return t
        return Deferred(tuple(t.shape), torch.float32, lambda: t.detach().float())

    def merged_weight(m: BaseTunerLayer, base: torch.Tensor) -> Deferred:
        for adapter in m.active_adapters:
            if m.use_dora.get(adapter) or getattr(m, "lora_bias", {}).get(adapter):
                raise ValueError("merged_lora_state: DoRA and LoRA biases are not merged here (add_lora makes neither)")

        @torch.no_grad()
        def compute() -> torch.Tensor:
            w = base.detach().to(torch.float32, copy=True)
            for adapter in m.active_adapters:
                if adapter in m.lora_A:
                    w += m.get_delta_weight(adapter).to(w)
            return w

        return Deferred(tuple(base.shape), torch.float32, compute)

    out: dict[str, torch.Tensor | Deferred] = {}
    for key, t in net.state_dict(keep_vars=True).items():
        owner, sep, rest = key.partition(".base_layer.")
        if sep and owner in wrapped:
            out[f"{owner}.{rest}"] = merged_weight(wrapped[owner], t) if rest == "weight" else to_float32(t)
        elif not any(part.startswith("lora_") for part in key.split(".")):  # not the adapters themselves
            out[key] = to_float32(t)
    return out


def lora_layers_for_diffusers(net: nn.Module, name: str) -> dict[str, torch.Tensor]:
    """The adapters ``name`` of ``net`` as the state dict diffusers' LoRA loaders read
    (``pipe.load_lora_weights``): ``<layer>.lora_A.weight`` and ``<layer>.lora_B.weight`` for every
    adapted layer, on the CPU, with the layer's scaling (``alpha / rank``) folded into ``lora_B``.

    The keys are peft's, which diffusers loads as they are. (``convert_state_dict_to_diffusers`` would
    rename only the attention projections to ``lora.down`` / ``lora.up`` and leave convolutions and
    other Linear layers in peft's names; the loader reads one naming per file and would drop the rest.)
    A file without adapter metadata loads with ``alpha = rank`` (scaling 1), so with the scaling folded
    in, the loaded adapters compute what these do for any alpha.

    Raises:
        ValueError: a layer diffusers' loader cannot express: not a Linear or Conv2d, DoRA, or a
            LoRA bias (none of which :func:`add_lora` makes).
    """
    from peft.tuners.lora import LoraLayer

    out: dict[str, torch.Tensor] = {}
    for layer, m in net.named_modules():
        if not isinstance(m, LoraLayer) or name not in m.lora_A:
            continue
        base = m.get_base_layer()
        if not isinstance(base, LORA_LAYER_TYPES) or m.use_dora.get(name) or getattr(m, "lora_bias", {}).get(name):
            raise ValueError(f"LoRA layer {layer} ({type(base).__name__}) has no diffusers LoRA form (Linear or Conv2d, no DoRA, no bias)")
        out[f"{layer}.lora_A.weight"] = m.lora_A[name].weight.detach().float().cpu().clone()
        out[f"{layer}.lora_B.weight"] = (m.lora_B[name].weight.detach().float() * m.scaling[name]).cpu().contiguous()
    if not out:
        raise ValueError(f"{type(net).__name__} has no LoRA adapters named {name!r}")
    return out


__all__ = [
    "ATTENTION_LORA_LAYERS",
    "LORA_LAYER_TYPES",
    "LORA_TARGET_SETS",
    "TRANSFORMER_LORA_LAYERS",
    "add_lora",
    "lora_layers_for_diffusers",
    "lora_target_modules",
    "merged_lora",
    "merged_lora_state",
]
