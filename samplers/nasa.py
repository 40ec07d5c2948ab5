"""NASA: negative-away steer attention (SNOOPI, Nguyen et al., 2024, arXiv:2412.02687, Sec. 4).

A one-step student has no classifier-free guidance to carry a negative prompt. NASA applies it
inside every cross-attention layer instead, with no new weights (METHODS.md, "SNOOPI"):

    Z+ = softmax(Q K+^T / sqrt(d)) V+        (the prompt)
    Z- = softmax(Q K-^T / sqrt(d)) V-        (the negative prompt, same queries)
    Z  = Z+ - alpha Z-                        then the output projection, as usual.

``alpha`` 0.1 (SD1.5), 0.2 (SD2.1), 0.5 (PixArt); too large degrades images. With ``alpha = 0``
the layer is exactly diffusers' default attention.

Use it per call, on any diffusers UNet (onestep's samplers or a plain pipeline)::

    with nasa(unet, negative_embeds, alpha=0.1):
        image = pipe(prompt, num_inference_steps=1, guidance_scale=1.0).images[0]

or :func:`nasa_pipeline_call`, which encodes the negative prompt with the pipeline's own
text encoder(s) first.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from onestep.errors import ConfigError


class NASAAttnProcessor:
    """A diffusers attention processor that subtracts ``alpha`` times the negative prompt's attention
    output from the prompt's, before the output projection (cross-attention only).

    Args:
        negative: the negative prompt's ``encoder_hidden_states``, ``(1, L, D)`` or ``(B, L, D)``.
        alpha: the NASA scale.
    """

    def __init__(self, negative: torch.Tensor, alpha: float):
        if alpha < 0:
            raise ConfigError(f"nasa_alpha must be >= 0 (got {alpha})")
        self.negative = negative
        self.alpha = float(alpha)

    @staticmethod
    def _attend(attn: nn.Module, query: torch.Tensor, context: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """``softmax(Q K^T / sqrt(d)) V`` for keys and values of ``context``, heads merged."""
        b = query.shape[0]
        if attn.norm_cross:
            context = attn.norm_encoder_hidden_states(context)
        key, value = attn.to_k(context), attn.to_v(context)
        head_dim = key.shape[-1] // attn.heads
        q = query.view(b, -1, attn.heads, head_dim).transpose(1, 2)
        k = key.view(b, -1, attn.heads, head_dim).transpose(1, 2)
        v = value.view(b, -1, attn.heads, head_dim).transpose(1, 2)
        if attn.norm_q is not None:
            q = attn.norm_q(q)
        if attn.norm_k is not None:
            k = attn.norm_k(k)
        z = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=0.0, is_causal=False)
        return z.transpose(1, 2).reshape(b, -1, attn.heads * head_dim).to(query.dtype)

    def __call__(
        self,
        attn: nn.Module,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        *args,
        **kwargs,
    ) -> torch.Tensor:
        if encoder_hidden_states is None:  # self-attention: NASA leaves it alone
            from diffusers.models.attention_processor import AttnProcessor2_0

            return AttnProcessor2_0()(attn, hidden_states, None, attention_mask, temb)
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            b, c, h, w = hidden_states.shape
            hidden_states = hidden_states.view(b, c, h * w).transpose(1, 2)
        batch_size, sequence_length, _ = encoder_hidden_states.shape
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)
            attention_mask = attention_mask.view(batch_size, attn.heads, -1, attention_mask.shape[-1])
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        query = attn.to_q(hidden_states)

        # Z = Z+ - alpha Z-: both with the same queries; the negative prompt carries no mask.
        z = self._attend(attn, query, encoder_hidden_states, attention_mask)
        if self.alpha != 0:
            neg = self.negative.to(device=query.device, dtype=encoder_hidden_states.dtype)
            if neg.shape[0] != batch_size:
                neg = neg.expand(batch_size, *neg.shape[1:])
            z = z - self.alpha * self._attend(attn, query, neg, None)

        z = attn.to_out[0](z)  # output projection
        z = attn.to_out[1](z)  # dropout
        if input_ndim == 4:
            z = z.transpose(-1, -2).reshape(b, c, h, w)
        if attn.residual_connection:
            z = z + residual
        return z / attn.rescale_output_factor


def cross_attention_layers(unet: nn.Module) -> list[nn.Module]:
    """The cross-attention modules (diffusers ``Attention`` with ``is_cross_attention``) of ``unet``."""
    from diffusers.models.attention_processor import Attention

    return [m for m in unet.modules() if isinstance(m, Attention) and getattr(m, "is_cross_attention", False)]


@contextmanager
def nasa(unet: nn.Module, negative: torch.Tensor | None, alpha: float):
    """Run ``unet`` with NASA in every cross-attention layer inside the block, then restore the
    layers' own processors. ``alpha == 0`` (or no negative) changes nothing."""
    if not alpha or negative is None:
        yield unet
        return
    layers = cross_attention_layers(unet)
    if not layers:
        raise ConfigError(f"NASA needs cross-attention layers; {type(unet).__name__} has none (a text-to-image UNet has)")
    saved = [m.processor for m in layers]
    processor = NASAAttnProcessor(negative, alpha)
    for m in layers:
        m.set_processor(processor)
    try:
        yield unet
    finally:
        for m, p in zip(layers, saved):
            m.set_processor(p)


@torch.no_grad()
def nasa_pipeline_call(pipe, prompt, negative_prompt: str | None = None, nasa_alpha: float = 0.0, **kwargs):
    """Call a diffusers SD / SDXL pipeline with NASA: the negative prompt is encoded with the
    pipeline's own text encoder(s) and subtracted in every cross-attention layer of ``pipe.unet``.
    Other keywords go to the pipeline (``num_inference_steps``, ``guidance_scale``, ``generator`` ...)."""
    if not nasa_alpha or not negative_prompt:
        return pipe(prompt=prompt, **kwargs)
    device = pipe.unet.device
    if hasattr(pipe, "text_encoder_2"):
        negative = pipe.encode_prompt(negative_prompt, device=device, do_classifier_free_guidance=False)[0]
    else:
        negative = pipe.encode_prompt(negative_prompt, device, 1, False)[0]
    with nasa(pipe.unet, negative, nasa_alpha):
        return pipe(prompt=prompt, **kwargs)


__all__ = ["NASAAttnProcessor", "cross_attention_layers", "nasa", "nasa_pipeline_call"]
