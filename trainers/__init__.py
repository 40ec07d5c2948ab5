"""Trainers: the shared loop and one file per method (``onestep.trainers``).

| file | holds |
|---|---|
| ``base.py`` | :class:`DistillTrainer`, the one loop: accelerator, optimizers, the step (with gradient accumulation), hooks |
| ``helpers.py`` | the helpers methods share: noise, timesteps, the generator's sample, denoising losses |
| ``config.py`` | :class:`DistillConfig`, the settings every method shares |
| ``checkpoint.py`` | placement, checkpoints (staged, then renamed) and resume, the generator to export, export, previews |
| ``interrupt.py`` | SIGINT / SIGTERM: checkpoint and leave |
| ``sharding.py``, ``memory.py`` | FSDP2 sharding and its checkpoints; attention kernels and frozen dtypes |
| ``warmstart.py`` | DMD's regression warm start |
| ``dmd2.py``, ``vsd.py``, ``fdistill.py``, ``sid.py``, ``disback.py``, ``consistency.py``, ``scm.py``, ``ctm.py``, ``boot.py``, ``tadsr.py`` | one method each: its config and trainer side by side (consistency's config in ``consistency_config.py``) |
| ``pso.py`` | PSO: tuning a distilled student toward new images (a style, a concept, preference pairs) |

``METHODS`` maps a method name (each config's ``method`` default, written once) to its
(config dataclass, trainer class); that dict is the whole registry.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from onestep.config import apply_aliases, build_config, read_yaml, resolve_config_path
from onestep.errors import ConfigError

from .base import DistillTrainer
from .boot import BOOTConfig, BOOTTrainer
from .config import ALIASES, RENAMED_FIELDS, DistillConfig
from .consistency import ConsistencyConfig, ConsistencyTrainer
from .ctm import CTMConfig, CTMTrainer
from .disback import (
    DisBackDMD2Config,
    DisBackDMD2Trainer,
    DisBackFDistillConfig,
    DisBackFDistillTrainer,
    DisBackSiDConfig,
    DisBackSiDTrainer,
    DisBackVSDConfig,
    DisBackVSDTrainer,
)
from .dmd2 import DMD2Config, DMD2Trainer
from .fdistill import FDistillConfig, FDistillTrainer
from .mcm import MCMConfig, MCMTrainer
from .pso import PSOConfig, PSOTrainer
from .scm import SCMConfig, SCMTrainer
from .sid import SiDConfig, SiDTrainer
from .tadsr import TADSRConfig, TADSRTrainer
from .vsd import VSDConfig, VSDTrainer

TRAINERS: tuple[type[DistillTrainer], ...] = (
    DMD2Trainer,
    ConsistencyTrainer,
    VSDTrainer,
    FDistillTrainer,
    SiDTrainer,
    SCMTrainer,
    PSOTrainer,
    CTMTrainer,
    BOOTTrainer,
    TADSRTrainer,
    MCMTrainer,
    DisBackDMD2Trainer,
    DisBackVSDTrainer,
    DisBackFDistillTrainer,
    DisBackSiDTrainer,
)
METHODS: dict[str, tuple[type[DistillConfig], type[DistillTrainer]]] = {t.method_name: (t.config_class, t) for t in TRAINERS}


def method_classes(name: str) -> tuple[type[DistillConfig], type[DistillTrainer]]:
    if name not in METHODS:
        raise ConfigError(f"unknown method {name!r}; available: {', '.join(sorted(METHODS))}")
    return METHODS[name]


def load_config(config: str | Path, overrides: dict[str, Any] | None = None, output_dir: str | None = None) -> DistillConfig:
    """Read a YAML config (file or preset name), apply overrides, and build the method's config.

    The default ``output_dir`` is ``runs/<config name>``.
    """
    path = resolve_config_path(str(config))
    values = apply_aliases(read_yaml(path), ALIASES, str(path))
    values.update(apply_aliases(overrides or {}, ALIASES, "command line"))  # the command line wins over the file
    method = values.get("method")
    if method is None:
        raise ConfigError(f"{path}: no 'method' key (one of {', '.join(sorted(METHODS))})")
    cfg_cls, _ = method_classes(str(method))
    if output_dir is not None:
        values["output_dir"] = output_dir
    values.setdefault("output_dir", str(Path("runs") / path.stem))
    return build_config(cfg_cls, values, source=str(path), renamed=RENAMED_FIELDS)


def make_trainer(config: DistillConfig, **kwargs) -> DistillTrainer:
    _, trainer_cls = method_classes(config.method)
    return trainer_cls(config, **kwargs)


__all__ = [
    "METHODS",
    "TRAINERS",
    "BOOTConfig",
    "BOOTTrainer",
    "ConsistencyConfig",
    "ConsistencyTrainer",
    "CTMConfig",
    "CTMTrainer",
    "DisBackDMD2Config",
    "DisBackDMD2Trainer",
    "DisBackFDistillConfig",
    "DisBackFDistillTrainer",
    "DisBackSiDConfig",
    "DisBackSiDTrainer",
    "DisBackVSDConfig",
    "DisBackVSDTrainer",
    "DistillConfig",
    "DistillTrainer",
    "DMD2Config",
    "DMD2Trainer",
    "FDistillConfig",
    "FDistillTrainer",
    "MCMConfig",
    "MCMTrainer",
    "PSOConfig",
    "PSOTrainer",
    "SCMConfig",
    "SCMTrainer",
    "SiDConfig",
    "SiDTrainer",
    "TADSRConfig",
    "TADSRTrainer",
    "VSDConfig",
    "VSDTrainer",
    "load_config",
    "make_trainer",
    "method_classes",
]
