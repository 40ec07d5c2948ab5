"""Frozen weights stored in bf16 / fp16, computed in float32: the Linear and Conv2d weights (the bulk of a
UNet, a transformer or a text encoder) stay in their small dtype and are upcast one layer at a time as
they run. On a CPU without bf16 / fp16 units (AVX2: no AVX512-BF16 / AMX) a bf16 convolution ran 141x
slower than float32 and a bf16 matmul 6.4x (``benchmarks/frozen_compute.py``); this keeps the memory
of bf16 storage at float32 speed. Gradients reach the inputs only (the weights are frozen), through a
backward that keeps the stored weight rather than a float32 copy.
"""

from __future__ import annotations

import torch
from torch import nn


class _LinearFn(torch.autograd.Function):
    """``linear(x, w, b)`` computed in float32 from a weight stored in a smaller dtype; the backward
    keeps the stored weight, not a float32 copy (gradients reach ``x`` only: the weight is frozen)."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(weight)
        return nn.functional.linear(x, weight.float(), None if bias is None else bias.float())

    @staticmethod
    def backward(ctx, grad):
        (weight,) = ctx.saved_tensors
        return grad @ weight.float(), None, None


class _Conv2dFn(torch.autograd.Function):
    """:class:`_LinearFn` for a 2D convolution."""

    @staticmethod
    def forward(ctx, x, weight, bias, stride, padding, dilation, groups):
        ctx.save_for_backward(weight)
        ctx.conf = (x.shape, stride, padding, dilation, groups)
        return nn.functional.conv2d(x, weight.float(), None if bias is None else bias.float(), stride, padding, dilation, groups)

    @staticmethod
    def backward(ctx, grad):
        (weight,) = ctx.saved_tensors
        shape, stride, padding, dilation, groups = ctx.conf
        gx = torch.nn.grad.conv2d_input(shape, weight.float(), grad, stride, padding, dilation, groups)
        return gx, None, None, None, None, None, None


class UpcastLinear(nn.Linear):
    """A frozen ``nn.Linear`` whose weight is stored small and computed in float32 (the class is swapped
    in place, not a bound method set on the instance: that would make every layer a reference cycle, and
    a network copied for export would then outlive its last use until the garbage collector ran)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(x.device.type, enabled=False):
            return _LinearFn.apply(x.float(), self.weight, self.bias)


class UpcastConv2d(nn.Conv2d):
    """:class:`UpcastLinear` for a zero-padded 2D convolution."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(x.device.type, enabled=False):
            return _Conv2dFn.apply(x.float(), self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups)


def upcastable(name: str, m: nn.Module) -> bool:
    """The frozen layers float32 compute stores small: plain Linear and zero-padded Conv2d, not adapters."""
    if "lora_" in name:
        return False
    return type(m) is nn.Linear or (type(m) is nn.Conv2d and m.padding_mode == "zeros" and not isinstance(m.padding, str))


def small_parameter_ids(backbone: nn.Module) -> set[int]:
    """``id``s of the parameters :func:`store_small_compute_float32` stores small (those of the
    :func:`upcastable` layers); works on the meta device (the memory plan counts them)."""
    return {id(p) for name, m in backbone.named_modules() if upcastable(name, m) for p in m.parameters(recurse=False)}


def store_small_compute_float32(backbone: nn.Module, dtype: torch.dtype) -> nn.Module:
    """Linear / Conv2d weights (the bulk of a UNet or transformer) stored in ``dtype`` and upcast layer by
    layer as they run; every other frozen tensor (norms, embeddings, buffers) float32, inputs untouched."""
    small = small_parameter_ids(backbone)
    for name, p in backbone.named_parameters():
        if "lora_" not in name and p.is_floating_point():
            p.data = p.data.to(dtype if id(p) in small else torch.float32)
    for name, b in backbone.named_buffers():
        if "lora_" not in name and b.is_floating_point():
            b.data = b.data.float()
    for name, m in backbone.named_modules():
        if upcastable(name, m):
            m.__class__ = UpcastLinear if type(m) is nn.Linear else UpcastConv2d
    return backbone


__all__ = ["UpcastConv2d", "UpcastLinear", "small_parameter_ids", "store_small_compute_float32", "upcastable"]
