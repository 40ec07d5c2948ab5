"""Trainers: the shared loop (``base.py``) and one file per method.

``METHODS`` maps a method name to its (config dataclass, trainer class); that dict is
the whole registry.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from onestep.config import build_config, read_yaml, resolve_config_path
from onestep.errors import ConfigError

from .base import DistillConfig, DistillTrainer
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
from .consistency import ConsistencyConfig, ConsistencyTrainer
from .dmd2 import DMD2Config, DMD2Trainer
from .fdistill import FDistillConfig, FDistillTrainer
from .sid import SiDConfig, SiDTrainer
from .vsd import VSDConfig, VSDTrainer

METHODS: dict[str, tuple[type[DistillConfig], type[DistillTrainer]]] = {
    "dmd2": (DMD2Config, DMD2Trainer),
    "consistency": (ConsistencyConfig, ConsistencyTrainer),
    "vsd": (VSDConfig, VSDTrainer),
    "fdistill": (FDistillConfig, FDistillTrainer),
    "sid": (SiDConfig, SiDTrainer),
    "disback-dmd2": (DisBackDMD2Config, DisBackDMD2Trainer),
    "disback-vsd": (DisBackVSDConfig, DisBackVSDTrainer),
    "disback-fdistill": (DisBackFDistillConfig, DisBackFDistillTrainer),
    "disback-sid": (DisBackSiDConfig, DisBackSiDTrainer),
}


def method_classes(name: str) -> tuple[type[DistillConfig], type[DistillTrainer]]:
    if name not in METHODS:
        raise ConfigError(f"unknown method {name!r}; available: {', '.join(sorted(METHODS))}")
    return METHODS[name]


def load_config(config: str | Path, overrides: dict[str, Any] | None = None, output_dir: str | None = None) -> DistillConfig:
    """Read a YAML config (file or preset name), apply overrides, and build the method's config.

    The default ``output_dir`` is ``runs/<config name>``.
    """
    path = resolve_config_path(str(config))
    values = read_yaml(path)
    values.update(overrides or {})
    method = values.get("method")
    if method is None:
        raise ConfigError(f"{path}: no 'method' key (one of {', '.join(sorted(METHODS))})")
    cfg_cls, _ = method_classes(str(method))
    if output_dir is not None:
        values["output_dir"] = output_dir
    values.setdefault("output_dir", str(Path("runs") / path.stem))
    return build_config(cfg_cls, values, source=str(path))


def make_trainer(config: DistillConfig, **kwargs) -> DistillTrainer:
    _, trainer_cls = method_classes(config.method)
    return trainer_cls(config, **kwargs)


__all__ = [
    "METHODS",
    "DistillConfig",
    "DistillTrainer",
    "DMD2Config",
    "DMD2Trainer",
    "FDistillConfig",
    "FDistillTrainer",
    "SiDConfig",
    "SiDTrainer",
    "VSDConfig",
    "VSDTrainer",
    "load_config",
    "make_trainer",
]
