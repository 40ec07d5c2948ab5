"""Fully sharded data parallel (FSDP2) for the triad, and its checkpoints as safetensors.

With FSDP every process holds only its shard of each network's parameters, gradients and
optimizer states; a forward all-gathers one block's weights at a time. onestep shards the
networks itself with ``torch.distributed.fsdp.fully_shard`` (not ``Accelerator.prepare``,
which wraps a single model per call): the generator, the fake score and the heads train
sharded, and the frozen teacher is sharded too. With ``fake_score: lora`` the teacher and the
fake score are one backbone, sharded once. Each block of a diffusers backbone (the entries of
``down_blocks``, ``up_blocks``, ``transformer_blocks``, ... and ``mid_block``) is its own unit,
then the backbone itself.

FSDP is on when accelerate's config says ``distributed_type: FSDP`` (``fsdp_version: 2``;
``configs/accelerate/fsdp.yaml``) or when a run sets ``fsdp: true`` under any multi-process
launch (that is how it runs on CPU with gloo, where accelerate does not enable FSDP itself).

A trainer's extra networks (a consistency target, DisBack's node target) come from
``DistillTrainer.extra_networks``, built before sharding, and are sharded with the triad.

Rules the loop keeps so that the processes' collectives line up: every process runs the same
forward passes in the same order (random choices that change control flow, such as the
backward-simulation step of a K-step student, are drawn the same on every process), and
networks are only called on all processes together (export and previews gather the full
weights on every process first).

Checkpoints hold full (unsharded) tensors gathered on the main process, in the one format every
launch writes (:mod:`.checkpoint_files`), so they load on any number of processes.
"""

from __future__ import annotations

from typing import Any

import torch
from accelerate.logging import get_logger
from torch import nn

from onestep.errors import ConfigError

logger = get_logger(__name__)

#: Attributes of diffusers backbones whose entries become FSDP units of their own.
BLOCK_LISTS = ("down_blocks", "up_blocks", "transformer_blocks", "single_transformer_blocks")


def fsdp_requested(accelerator, requested: bool) -> bool:
    """Whether this run shards its networks: accelerate's FSDP config, or ``fsdp: true`` with
    several processes. FSDP1 configs are refused (onestep shards with FSDP2)."""
    from accelerate.utils import DistributedType

    if accelerator.distributed_type == DistributedType.FSDP:
        if not getattr(accelerator, "is_fsdp2", False):
            raise ConfigError(
                "the accelerate config asks for FSDP version 1; onestep shards with FSDP2: set "
                "fsdp_version: 2 in the config (see configs/accelerate/fsdp.yaml)"
            )
        return True
    if requested and accelerator.num_processes < 2:
        logger.warning("fsdp: true with a single process: nothing to shard across, training unsharded")
        return False
    return requested


def fsdp_settings(accelerator) -> dict[str, Any]:
    """``fully_shard`` keywords: a device mesh over all processes, and the accelerate FSDP
    plugin's ``reshard_after_forward`` and CPU offload when one is configured."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import CPUOffloadPolicy

    plugin = getattr(accelerator.state, "fsdp_plugin", None)
    kwargs: dict[str, Any] = {"mesh": init_device_mesh(accelerator.device.type, (accelerator.num_processes,))}
    if plugin is not None:
        if isinstance(plugin.reshard_after_forward, bool):
            kwargs["reshard_after_forward"] = plugin.reshard_after_forward
        if isinstance(plugin.cpu_offload, CPUOffloadPolicy):
            kwargs["offload_policy"] = plugin.cpu_offload
    return kwargs


def fsdp_units(backbone: nn.Module) -> list[nn.Module]:
    """The blocks of ``backbone`` that become FSDP units of their own (those with parameters)."""
    units: list[nn.Module] = []
    for name in BLOCK_LISTS:
        blocks = getattr(backbone, name, None)
        if isinstance(blocks, nn.ModuleList):
            units.extend(blocks)
    mid = getattr(backbone, "mid_block", None)
    if isinstance(mid, nn.Module):
        units.append(mid)
    return [u for u in units if next(u.parameters(), None) is not None]


def shard(module: nn.Module, **kwargs) -> bool:
    """Shard ``module`` in place: each of its blocks, then the module (each entry of a
    ``ModuleDict`` such as the heads). Returns False (and does nothing) for a module without
    parameters, such as an analytic teacher."""
    from torch.distributed.fsdp import FSDPModule, fully_shard

    if isinstance(module, FSDPModule):
        return True
    if next(module.parameters(), None) is None:
        return False
    if isinstance(module, (nn.ModuleDict, nn.ModuleList)):  # containers have no forward: shard each entry
        return any([shard(m, **kwargs) for m in module.children()])
    for unit in fsdp_units(module):
        fully_shard(unit, **kwargs)
    # The root keeps its own (small) weights gathered after a forward (torch's default for a root):
    # a loss on inner features only, such as a GAN head on the mid block, never passes the root's
    # output, so a resharded root would not be gathered again for that backward. Read parameters
    # through resharded() where their shards matter.
    fully_shard(module, **{k: v for k, v in kwargs.items() if k != "reshard_after_forward"})
    return True


def resharded(*modules: nn.Module) -> None:
    """Put sharded modules back to their shards (a no-op for others), before reading ``.parameters()``."""
    from torch.distributed.fsdp import FSDPModule

    for module in modules:
        for m in module.modules():
            if isinstance(m, FSDPModule):
                m.reshard()


def is_sharded(t: torch.Tensor) -> bool:
    return hasattr(t, "full_tensor")


def full(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a sharded parameter (a collective: every process must call it)."""
    return t.full_tensor() if is_sharded(t) else t


def clip_grad_norm(params: list[nn.Parameter], max_norm: float) -> float:
    """Clip the global gradient norm of sharded parameters; returns the norm before clipping."""
    params = [p for p in params if p.grad is not None]
    if not params:
        return 0.0
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
    return float(full(norm))


# ----------------------------------------------------------------------------- checkpoints


def average_gradients(accelerator, params: list[nn.Parameter]) -> None:
    """Data parallel without FSDP: average the gradients of ``params`` over processes in one flat
    all-reduce (a missing gradient counts as zero)."""
    if accelerator.num_processes == 1 or not params:
        return
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    flat = torch.cat([p.grad.reshape(-1) for p in params])
    flat = accelerator.reduce(flat, reduction="mean")
    offset = 0
    for p in params:
        n = p.numel()
        p.grad.copy_(flat[offset : offset + n].view_as(p))
        offset += n


def _options(**kw):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(**kw)


def gather_trainable(module: nn.Module) -> dict[str, torch.Tensor]:
    """Full trainable weights and buffers of a sharded module (on the main process; ``{}`` elsewhere)."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    return get_model_state_dict(module, options=_options(full_state_dict=True, cpu_offload=True, ignore_frozen_params=True))


def gather_full(module: nn.Module) -> dict[str, torch.Tensor]:
    """Every weight of a sharded module, whole, on the main process (``{}`` elsewhere)."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    return get_model_state_dict(module, options=_options(full_state_dict=True, cpu_offload=True))


def load_whole(module: nn.Module, weights: dict[str, torch.Tensor], expected: set[str], what: str) -> None:
    """Load whole tensors into a sharded ``module`` (each process keeps its shard). ``weights`` must
    name exactly ``expected``; the module's other weights are left as they are."""
    from torch.distributed.checkpoint.state_dict import set_model_state_dict

    if set(weights) != expected:
        missing, unexpected = sorted(expected - set(weights)), sorted(set(weights) - expected)
        raise ConfigError(f"{what}: does not match the network: missing {missing[:3]}, unexpected {unexpected[:3]}")
    set_model_state_dict(module, weights, options=_options(full_state_dict=True, strict=False))


__all__ = [
    "average_gradients",
    "clip_grad_norm",
    "fsdp_requested",
    "fsdp_settings",
    "full",
    "gather_full",
    "gather_trainable",
    "load_whole",
    "resharded",
    "shard",
]
