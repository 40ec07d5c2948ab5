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

Checkpoints hold full (unsharded) tensors in safetensors files, gathered on the main process:
the trainable weights and buffers of each network, the optimizers' states flattened as
``<parameter name>/<state key>`` (their hyperparameters in the file's metadata), the EMA
weights, and a ``trainer_state.json``. They load on any number of processes.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from accelerate.logging import get_logger
from torch import nn

from onestep.errors import ConfigError
from onestep.weights import save_tensors

logger = get_logger(__name__)

#: Attributes of diffusers backbones whose entries become FSDP units of their own.
BLOCK_LISTS = ("down_blocks", "up_blocks", "transformer_blocks", "single_transformer_blocks")
#: A checkpoint folder written by :func:`save_sharded_checkpoint` holds this file.
SHARDED_STATE = "trainer_state.json"


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


def _flatten_optimizer(state: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    tensors = {f"{name}/{key}": torch.as_tensor(v) for name, per in state["state"].items() for key, v in per.items()}
    return tensors, {"param_groups": json.dumps(state["param_groups"])}


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> dict[str, Any]:
    per: dict[str, dict[str, torch.Tensor]] = {}
    for flat, v in tensors.items():
        name, _, key = flat.rpartition("/")
        per.setdefault(name, {})[key] = v
    groups = json.loads(metadata["param_groups"])
    for g in groups:
        if isinstance(g.get("betas"), list):
            g["betas"] = tuple(g["betas"])
    return {"state": per, "param_groups": groups}


def save_sharded_checkpoint(
    path: Path,
    accelerator,
    networks: dict[str, tuple[nn.Module, torch.optim.Optimizer]],
    state: dict[str, Any],
    ema=None,
    ema_names: list[str] | None = None,
) -> None:
    """Write a checkpoint of sharded networks (every process must call this).

    Args:
        path: the checkpoint folder.
        networks: ``name -> (module, its optimizer)``; ``<name>.safetensors`` gets the module's
            trainable weights and buffers, ``optimizer_<name>.safetensors`` its optimizer's state.
        state: JSON-able trainer state (step, learning-rate schedulers, ...).
        ema, ema_names: a diffusers ``EMAModel`` over sharded parameters and the parameters' names.
    """
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    main = accelerator.is_main_process
    if main:
        path.mkdir(parents=True, exist_ok=True)
    for name, (module, opt) in networks.items():
        weights = gather_trainable(module)
        opt_state = get_optimizer_state_dict(module, opt, options=_options(full_state_dict=True, cpu_offload=True))
        if main:
            save_tensors(weights, path / f"{name}.safetensors")
            tensors, meta = _flatten_optimizer(opt_state)
            save_tensors(tensors, path / f"optimizer_{name}.safetensors", meta)
    info = dict(state)
    if ema is not None:
        shadow = {n: full(s) for n, s in zip(ema_names, ema.shadow_params)}
        if main:
            save_tensors(shadow, path / "ema.safetensors")
        info["ema"] = {k: v for k, v in ema.state_dict().items() if k != "shadow_params"}
    if main:
        (path / SHARDED_STATE).write_text(json.dumps(info, indent=2) + "\n")
    accelerator.wait_for_everyone()


def load_sharded_checkpoint(
    path: Path,
    networks: dict[str, tuple[nn.Module, torch.optim.Optimizer]],
    ema=None,
    ema_names: list[str] | None = None,
) -> dict[str, Any]:
    """Load a checkpoint written by :func:`save_sharded_checkpoint` into sharded networks (every
    process reads the files and keeps its shard); returns the trainer state. The weights must
    match exactly: every trainable parameter present, nothing unknown."""
    from safetensors import safe_open
    from safetensors.torch import load_file
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

    info_file = path / SHARDED_STATE
    if not info_file.is_file():
        raise ConfigError(f"{path}: not a sharded (FSDP) checkpoint: {SHARDED_STATE} is missing; resume it without FSDP")
    for name, (module, opt) in networks.items():
        file = path / f"{name}.safetensors"
        if not file.is_file():
            raise ConfigError(f"{path}: {file.name} is missing; the checkpoint does not match this run's networks")
        expected = {n for n, p in module.named_parameters() if p.requires_grad} | {n for n, _ in module.named_buffers()}
        load_whole(module, load_file(str(file)), expected, str(file))
        opt_file = path / f"optimizer_{name}.safetensors"
        with safe_open(str(opt_file), "pt") as f:
            meta = f.metadata() or {}
        opt_state = _unflatten_optimizer(load_file(str(opt_file)), meta)
        set_optimizer_state_dict(module, opt, opt_state, options=_options(full_state_dict=True))
    info = json.loads(info_file.read_text())
    if ema is not None:
        from torch.distributed.tensor import distribute_tensor

        ema_file = path / "ema.safetensors"
        if not ema_file.is_file() or "ema" not in info:
            raise ConfigError(f"{path}: the run has EMA on but the checkpoint holds no EMA weights")
        saved = load_file(str(ema_file))
        with torch.no_grad():
            for n, s in zip(ema_names, ema.shadow_params):
                v = saved[n].to(s.dtype)
                s.copy_(distribute_tensor(v.to(s.device), s.device_mesh, s.placements) if is_sharded(s) else v.to(s.device))
        ema.load_state_dict({**info["ema"], "shadow_params": ema.shadow_params})
    return info


__all__ = [
    "SHARDED_STATE",
    "average_gradients",
    "clip_grad_norm",
    "fsdp_requested",
    "fsdp_settings",
    "full",
    "gather_full",
    "gather_trainable",
    "load_sharded_checkpoint",
    "load_whole",
    "resharded",
    "save_sharded_checkpoint",
    "shard",
]
