"""The files of a ``checkpoint-N`` folder: safetensors and JSON only, so resuming never unpickles.

One format whatever the launch (one process, data parallel or FSDP), so a checkpoint resumes on
any number of processes, sharded or not:

- ``<name>.safetensors``: a trained network's trainable weights and buffers, whole
  (``generator``; ``fake_score``: the fake score with the heads);
- ``optimizer_<name>.safetensors``: its optimizer's state, flattened as
  ``<parameter name>/<state key>``, the hyperparameters (param groups) in the file's metadata;
- ``ema.safetensors``: the EMA weights of the generator, by parameter name;
- ``random_states_<rank>.safetensors``: each process's global random generators (torch CPU and
  CUDA as byte tensors; Python's and NumPy's in the metadata). The loop draws its own noise from
  a stream re-seeded every step (:class:`~onestep.trainers.checkpoint.LoopState`); these cover
  whatever a network draws from the global generators (dropout);
- :data:`TRAINER_STATE` (``trainer_state.json``): the step, the learning-rate schedulers, the
  EMA's counters and the fp16 gradient scaler.

Checkpoints written by older onestep versions with ``accelerator.save_state`` (pickles:
``*.pkl``, ``optimizer.bin``, ``scaler.pt``) are refused with a message: their generator
weights still evaluate, they do not resume.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import torch
from torch import nn

from onestep.errors import ConfigError
from onestep.files import PICKLE_SUFFIXES
from onestep.weights import save_tensors

from .sharding import full, gather_trainable, is_sharded, load_whole

#: The trainer's state (JSON) in a checkpoint folder.
TRAINER_STATE = "trainer_state.json"
#: The checkpoint format this version writes (in ``checkpoint.json``).
CHECKPOINT_FORMAT = 2


def _options(**kw):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(**kw)


def refuse_pickles(path: Path) -> None:
    """A :class:`ConfigError` if checkpoint folder ``path`` holds a pickle (an older onestep's
    ``accelerator.save_state`` files, or anything else): onestep never unpickles on resume."""
    found = sorted(p.name for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if found:
        raise ConfigError(
            f"--resume {path}: holds pickle files ({', '.join(found[:3])}); onestep never unpickles a checkpoint. "
            "A checkpoint written by onestep < 0.2 does not resume (its generator weights still work with "
            "`onestep eval`); start the run again, or resume from a checkpoint this version wrote"
        )


def _flatten_optimizer(state: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    tensors = {f"{name}/{key}": torch.as_tensor(v) for name, per in state["state"].items() for key, v in per.items()}
    return tensors, {"param_groups": json.dumps(state["param_groups"])}


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], metadata: dict[str, str], what: str) -> dict[str, Any]:
    if "param_groups" not in metadata:
        raise ConfigError(f"{what}: not an optimizer state written by onestep (no param_groups in its metadata)")
    per: dict[str, dict[str, torch.Tensor]] = {}
    for flat, v in tensors.items():
        name, _, key = flat.rpartition("/")
        per.setdefault(name, {})[key] = v
    groups = json.loads(metadata["param_groups"])
    for g in groups:
        if isinstance(g.get("betas"), list):
            g["betas"] = tuple(g["betas"])
    return {"state": per, "param_groups": groups}


def _read(file: Path, what: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from safetensors import safe_open

    if not file.is_file():
        raise ConfigError(f"{what}: {file.name} is missing; the checkpoint does not match this run")
    try:
        with safe_open(str(file), "pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, f.metadata() or {}
    except Exception as e:  # safetensors raises its own error types for damaged files
        raise ConfigError(f"{what}: {file} is damaged ({e})") from None


# ----------------------------------------------------------------------------- random states
def random_states() -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """This process's global random generators as tensors and metadata."""
    import numpy as np

    tensors = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"torch_cuda_{i}"] = s
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    tensors["numpy_keys"] = torch.from_numpy(np.asarray(keys, dtype=np.uint32).astype(np.int64))
    version, internal, gauss_next = random.getstate()
    meta = {
        "numpy": json.dumps([kind, int(pos), int(has_gauss), float(gauss)]),
        "python": json.dumps([version, list(internal), gauss_next]),
    }
    return tensors, meta


def set_random_states(tensors: dict[str, torch.Tensor], meta: dict[str, str]) -> None:
    """Restore what :func:`random_states` saved."""
    import numpy as np

    torch.set_rng_state(tensors["torch_cpu"])
    cuda = sorted((k for k in tensors if k.startswith("torch_cuda_")), key=lambda k: int(k.rsplit("_", 1)[1]))
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([tensors[k] for k in cuda][: torch.cuda.device_count()])
    kind, pos, has_gauss, gauss = json.loads(meta["numpy"])
    np.random.set_state((kind, tensors["numpy_keys"].numpy().astype(np.uint32), pos, has_gauss, gauss))
    version, internal, gauss_next = json.loads(meta["python"])
    random.setstate((version, tuple(internal), gauss_next))


# ----------------------------------------------------------------------------- save / load
def save_training_state(
    path: Path,
    accelerator,
    networks: dict[str, tuple[nn.Module, torch.optim.Optimizer]],
    state: dict[str, Any],
    ema=None,
    ema_names: list[str] | None = None,
) -> None:
    """Write the trained networks, their optimizers, the EMA, the random states and ``state`` into
    checkpoint folder ``path`` (every process must call this: sharded weights are gathered; the
    main process writes, each process its own random states).

    Args:
        networks: ``name -> (module, its optimizer)``; the optimizer's parameters all lie in the module.
        state: JSON-able trainer state (step, learning-rate schedulers, ...).
        ema, ema_names: a diffusers ``EMAModel`` over the generator and its parameters' names.
    """
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    main = accelerator.is_main_process
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
    tensors, meta = random_states()
    save_tensors(tensors, path / f"random_states_{accelerator.process_index}.safetensors", meta)
    if main:
        (path / TRAINER_STATE).write_text(json.dumps(info, indent=2) + "\n")


def load_training_state(
    path: Path,
    accelerator,
    networks: dict[str, tuple[nn.Module, torch.optim.Optimizer]],
    ema=None,
    ema_names: list[str] | None = None,
) -> dict[str, Any]:
    """Load what :func:`save_training_state` wrote into this run's networks (each process reads the
    files; sharded networks keep their shard); returns the trainer state. The weights must match
    exactly: every trainable parameter and buffer present, nothing unknown."""
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

    refuse_pickles(path)
    what = f"--resume {path}"
    info_file = path / TRAINER_STATE
    if not info_file.is_file():
        raise ConfigError(f"{what}: {TRAINER_STATE} is missing; not a checkpoint written by onestep")
    for name, (module, opt) in networks.items():
        weights, _ = _read(path / f"{name}.safetensors", what)
        expected = {n for n, p in module.named_parameters() if p.requires_grad} | {n for n, _ in module.named_buffers()}
        load_whole(module, weights, expected, f"{what}: {name}.safetensors")
        tensors, meta = _read(path / f"optimizer_{name}.safetensors", what)
        opt_state = _unflatten_optimizer(tensors, meta, f"{what}: optimizer_{name}.safetensors")
        set_optimizer_state_dict(module, opt, opt_state, options=_options(full_state_dict=True))
    info = json.loads(info_file.read_text())
    if ema is not None:
        from torch.distributed.tensor import distribute_tensor

        if "ema" not in info:
            raise ConfigError(f"{what}: the run has EMA on but the checkpoint holds no EMA weights")
        saved, _ = _read(path / "ema.safetensors", what)
        with torch.no_grad():
            for n, s in zip(ema_names, ema.shadow_params):
                v = saved[n].to(s.dtype)
                s.copy_(distribute_tensor(v.to(s.device), s.device_mesh, s.placements) if is_sharded(s) else v.to(s.device))
        ema.load_state_dict({**info["ema"], "shadow_params": ema.shadow_params})
    rng = path / f"random_states_{accelerator.process_index}.safetensors"
    if rng.is_file():  # a process the saving run did not have keeps its fresh seeds
        set_random_states(*_read(rng, what))
    return info


__all__ = [
    "CHECKPOINT_FORMAT",
    "TRAINER_STATE",
    "load_training_state",
    "random_states",
    "refuse_pickles",
    "save_training_state",
    "set_random_states",
]
