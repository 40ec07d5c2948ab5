"""The denoiser interface: any backbone in, an x0 prediction out.

A :class:`Denoiser` wraps a backbone (diffusers ``UNet2DModel`` / ``UNet2DConditionModel``,
an SD3-style ``SD3Transformer2DModel``, a small MLP, an analytic mixture, ...) and returns the x0 prediction for ``(x_t, t, cond)``,
whatever the backbone predicts (eps, v or x0). The prediction type and the
conversions live here and in :mod:`onestep.schedule`, nowhere else.
"""

from __future__ import annotations

from contextlib import contextmanager, nullcontext

import torch
from torch import nn

from .conditioning import CONCAT_KEY, Cond, cat_cond, cfg
from .schedule import NoiseSchedule


#: Condition keys that ``UNet2DConditionModel`` takes inside ``added_cond_kwargs`` (SDXL).
ADDED_COND_KEYS = ("text_embeds", "time_ids")


def is_transformer(backbone: nn.Module) -> bool:
    """True for patch-based diffusion transformers (SD3's ``SD3Transformer2DModel``): a stack of
    ``transformer_blocks`` over patch embeddings, called with keywords only."""
    return hasattr(backbone, "transformer_blocks") and hasattr(backbone, "pos_embed")


def call_backbone(backbone: nn.Module, x: torch.Tensor, t: torch.Tensor, cond: Cond) -> torch.Tensor:
    """Run a backbone with the keyword its family expects and return the raw prediction.

    ``t`` is the backbone's own timestep input (:meth:`NoiseSchedule.model_timestep`). A dict
    condition is passed as keywords (``encoder_hidden_states``, ``timestep_cond``,
    ``pooled_projections``, ...); its SDXL keys ``text_embeds`` and ``time_ids`` go into
    ``added_cond_kwargs``; a ``UNet2DConditionModel`` given none of ``encoder_hidden_states`` gets None
    (AudioLDM: the text embedding is its ``class_labels``). Transformers take ``hidden_states`` and ``timestep`` as keywords too. An
    ``"image"`` entry (:data:`~onestep.conditioning.CONCAT_KEY`, image-conditioned teachers such as the SD
    x4 upscaler) is concatenated to ``x`` along the channels; the rest is passed as above.
    """
    if isinstance(cond, dict) and CONCAT_KEY in cond:
        x = torch.cat([x, cond[CONCAT_KEY].to(x.dtype)], dim=1)
        cond = {k: v for k, v in cond.items() if k != CONCAT_KEY} or None
    if is_transformer(backbone):
        out = backbone(hidden_states=x, timestep=t, **(cond or {}))
    elif cond is None:
        out = backbone(x, t)
    elif isinstance(cond, dict):
        kwargs = {k: v for k, v in cond.items() if k not in ADDED_COND_KEYS}
        added = {k: cond[k] for k in ADDED_COND_KEYS if k in cond}
        if added:
            kwargs["added_cond_kwargs"] = added
        if "encoder_hidden_states" not in kwargs and "cross_attention_dim" in (getattr(backbone, "config", None) or {}):
            kwargs["encoder_hidden_states"] = None  # AudioLDM's UNet: the text comes as class_labels, no attention context
        out = backbone(x, t, **kwargs)
    else:
        out = backbone(x, t, class_labels=cond)
    return out.sample if hasattr(out, "sample") else out


def feature_module(backbone: nn.Module) -> nn.Module | None:
    """The bottleneck module whose output feeds GAN heads: ``mid_block`` for UNets, the middle
    transformer block for transformers."""
    if is_transformer(backbone):
        blocks = backbone.transformer_blocks
        return blocks[(len(blocks) - 1) // 2] if len(blocks) else None
    return getattr(backbone, "mid_block", None)


def feature_map(backbone: nn.Module, output, x: torch.Tensor) -> torch.Tensor:
    """The GAN features from :func:`feature_module`'s output: a UNet's ``(B, C, H, W)`` map as is;
    a transformer block's image tokens ``(B, N, D)`` (the second of SD3's ``(context, image)``
    pair) laid back on the patch grid as ``(B, D, H / p, W / p)``."""
    if not is_transformer(backbone):
        return output[0] if isinstance(output, tuple) else output
    tokens = output[1] if isinstance(output, tuple) else output
    p = int(backbone.config.patch_size)
    h, w = x.shape[-2] // p, x.shape[-1] // p
    return tokens.transpose(1, 2).reshape(tokens.shape[0], tokens.shape[-1], h, w)


def lora_layers(backbone: nn.Module) -> list[nn.Module]:
    """The peft LoRA layers injected into ``backbone`` (empty when it has none)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [m for m in backbone.modules() if isinstance(m, BaseTunerLayer)]


@contextmanager
def adapters(backbone: nn.Module, enabled: bool | None):
    """Run ``backbone`` with its peft adapters on (``True``), off (``False``) or as is (``None``)."""
    layers = lora_layers(backbone) if enabled is not None else []
    for m in layers:
        m.enable_adapters(enabled)
    try:
        yield
    finally:
        for m in layers:
            m.enable_adapters(True)


class Denoiser(nn.Module):
    """x0-predicting view of a backbone.

    Args:
        backbone: the network (or analytic model) to call.
        schedule: the noise schedule the backbone was trained with.
        prediction_type: what the backbone outputs: ``"epsilon"``, ``"v_prediction"``, ``"sample"``
            or ``"flow"`` (the velocity ``eps - x0`` of flow-matching teachers).
        use_adapters: when the backbone carries peft adapters shared between teacher and
            fake score, ``False`` runs it with them off (the teacher), ``True`` with them on.
    """

    def __init__(
        self,
        backbone: nn.Module,
        schedule: NoiseSchedule,
        prediction_type: str = "epsilon",
        use_adapters: bool | None = None,
    ):
        super().__init__()
        self.backbone = backbone
        self.schedule = schedule
        self.prediction_type = prediction_type
        self.use_adapters = use_adapters

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, cond: Cond = None, return_features: bool = False):
        """x0 prediction (float32). With ``return_features`` also the bottleneck features."""
        t = t.to(x_t.device)
        feats: list[torch.Tensor] = []
        hook_ctx = nullcontext()
        if return_features:
            module = feature_module(self.backbone)
            if module is None:
                raise ValueError(f"{type(self.backbone).__name__} has no mid_block to take GAN features from")
            handle = module.register_forward_hook(lambda m, i, o: feats.append(feature_map(self.backbone, o, x_t)))
            hook_ctx = _removing(handle)
        with hook_ctx, adapters(self.backbone, self.use_adapters):
            pred = call_backbone(self.backbone, x_t, self.schedule.model_timestep(t), cond)
        x0 = self.schedule.to_x0(pred, x_t, t, self.prediction_type)
        return (x0, feats[-1]) if return_features else x0

    def guided(self, x_t: torch.Tensor, t: torch.Tensor, cond: Cond, uncond: Cond, scale) -> torch.Tensor:
        """x0 with classifier-free guidance ``uncond + scale * (cond - uncond)`` in one batched pass.

        ``scale`` is a float or a per-sample tensor. With ``scale == 1`` or no
        unconditional branch, this is a single conditional pass.
        """
        if uncond is None or (not isinstance(scale, torch.Tensor) and scale == 1):
            return self(x_t, t, cond)
        n = x_t.shape[0]
        both = self(torch.cat([x_t, x_t]), torch.cat([t, t]), cat_cond(cond, uncond))
        return cfg(both[n:], both[:n], scale)

    def eps(self, x_t: torch.Tensor, t: torch.Tensor, cond: Cond = None) -> torch.Tensor:
        return self.schedule.eps_from_x0(self(x_t, t, cond), x_t, t)


@contextmanager
def _removing(handle):
    try:
        yield
    finally:
        handle.remove()


@contextmanager
def frozen(*modules: nn.Module):
    """Temporarily stop gradients into the parameters of ``modules`` (inputs still get gradients)."""
    saved = []
    for m in modules:
        for p in m.parameters():
            saved.append((p, p.requires_grad))
            p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in saved:
            p.requires_grad_(flag)
