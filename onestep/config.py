"""Config dataclasses: YAML presets with command-line overrides (trl style).

A config file is YAML with a ``method`` key (``dmd2``, ...) and fields of that
method's dataclass. ``--key value`` overrides any field; values are parsed as YAML
(``--generator_timesteps "[999, 499]"``, ``--fake_score lora``). Unknown keys and
out-of-range values raise :class:`~onestep.errors.ConfigError` naming the fix.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import math
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from .errors import ConfigError

PRESETS = Path(__file__).resolve().parent.parent / "configs"


def preset_dir() -> Path:
    """Where the shipped YAML presets live (the repo's ``configs/``, installed as ``onestep.configs``)."""
    try:
        import onestep.configs as c

        return Path(c.__file__).resolve().parent
    except ImportError:  # pragma: no cover - source tree without install
        return PRESETS


def list_presets() -> list[str]:
    return sorted(p.stem for p in preset_dir().glob("*.yaml"))


def resolve_config_path(name_or_path: str) -> Path:
    """A YAML path, or the name of a shipped preset (``digits_dmd2``)."""
    p = Path(name_or_path).expanduser()
    if p.is_file():
        return p
    preset = preset_dir() / f"{name_or_path.removesuffix('.yaml')}.yaml"
    if preset.is_file():
        return preset
    raise ConfigError(f"config {name_or_path!r} is neither a YAML file nor a preset (presets: {', '.join(list_presets())})")


def read_yaml(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        mark, problem = getattr(e, "problem_mark", None), getattr(e, "problem", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: {problem}" if mark is not None and problem else " ".join(str(e).split())
        raise ConfigError(f"{path}: not valid YAML ({where})") from e
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of config keys at the top level")
    return data


def parse_overrides(args: list[str]) -> dict[str, Any]:
    """``["--lr_generator", "1e-5", "--ema_decay=0.99", "--gradient_checkpointing"]`` ->
    ``{"lr_generator": 1e-5, "ema_decay": 0.99, "gradient_checkpointing": True}`` (a flag without a value is true)."""
    out: dict[str, Any] = {}
    i = 0
    while i < len(args):
        a = args[i]
        if not a.startswith("--") or a == "--":
            raise ConfigError(f"expected --key value, got {a!r}")
        key, eq, val = a[2:].partition("=")
        i += 1
        if not eq and (i >= len(args) or args[i].startswith("--")):
            out[key.replace("-", "_")] = True  # a bare flag: --gradient_checkpointing
            continue
        if not eq:
            val = args[i]
            i += 1
        out[key.replace("-", "_")] = yaml.safe_load(val) if val != "" else ""
    return out


def config_field(help: str, default: Any = None, factory: Any = None) -> Any:
    """A dataclass field with its help string (shown by ``onestep train --show-config``):
    ``config_field("AdamW beta1", 0.9)``, or ``factory=`` for a mutable default."""
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata={"help": help})
    return dataclasses.field(default=default, metadata={"help": help})


@functools.cache
def _type_hints(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)  # slow (it evaluates every annotation): once per config class


def _coerce(cls, name: str, value: Any) -> Any:
    hints = _type_hints(cls)
    hint = hints.get(name)
    is_union = typing.get_origin(hint) in (typing.Union, types.UnionType)
    allowed = set(typing.get_args(hint)) if is_union else {hint}
    if value is None:
        if type(None) in allowed:
            return None
        raise ConfigError(f"{name} cannot be empty")
    if bool in allowed and isinstance(value, bool):
        return value
    if value is True and bool not in allowed:
        raise ConfigError(f"--{name} needs a value (a flag without one means true, and {name} is not a yes/no setting)")
    if float in allowed and str not in allowed:
        value = _as_float(value)
        if isinstance(value, str):
            raise ConfigError(f"{name}: {value!r} is not a number")
    if float in allowed and isinstance(value, (int, float)) and not isinstance(value, bool):
        if not math.isfinite(value):
            raise ConfigError(f"{name} must be a finite number (got {value})")
        return float(value)
    if int in allowed and isinstance(value, int) and not isinstance(value, bool):
        return value
    if str in allowed and isinstance(value, (str, int, float)) and not isinstance(value, bool):
        return str(value)
    if str in allowed and isinstance(value, bool):
        # YAML 1.1 reads a bare no/off/false as False (`mixed_precision: no`): give the word back.
        return "no" if value is False else "yes"
    for a in allowed:
        origin = typing.get_origin(a) or a
        if origin is list and isinstance(value, (list, tuple)):
            return [_as_float(v) for v in value] if typing.get_args(a) == (float,) else list(value)
        if origin is dict and isinstance(value, dict):
            return value
    raise ConfigError(f"{name}: {value!r} is not a valid {_type_name(hint)}")


def _as_float(value: Any) -> Any:
    """A string that spells a number as that float (YAML 1.1, as PyYAML reads it, leaves ``1e-5`` and
    ``-1e-4`` strings); any other value as it is."""
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            pass
    return value


def _type_name(hint: Any) -> str:
    """``int``, ``float``, ``str | list[str]``: a field's type as a user reads it."""
    return hint.__name__ if isinstance(hint, type) else str(hint).replace("NoneType", "None")


def apply_aliases(values: dict[str, Any], aliases: dict[str, str], source: str = "config") -> dict[str, Any]:
    """``values`` with other tools' names for a field (``aliases``: e.g. diffusers' ``checkpointing_steps``
    -> ``checkpoint_every``) read as that field; both names in one set of values is an error."""
    out = dict(values)
    for alias, name in aliases.items():
        if alias in out:
            if name in out and out[name] != out[alias]:
                raise ConfigError(f"{source}: both {alias!r} and {name!r} are set (the same field); keep one")
            out[name] = out.pop(alias)
    return out


def build_config(cls, values: dict[str, Any], source: str = "config", renamed: dict[str, str] | None = None):
    """Instantiate dataclass ``cls`` from ``values``, with a clear error for unknown keys
    (``renamed``: old key -> the field that replaced it, named in the error)."""
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = [k for k in values if k not in names]
    if unknown:
        k = unknown[0]
        if not isinstance(k, str):
            raise ConfigError(f"{source}: config keys are field names, not {k!r} ({type(k).__name__})")
        if renamed and renamed.get(k) in names:
            raise ConfigError(f"{source}: {k!r} was replaced by {renamed[k]!r}; see onestep train --show-config")
        close = difflib.get_close_matches(k, sorted(names), n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ConfigError(f"{source}: unknown key {k!r} for {cls.__name__}{hint}")
    return cls(**{k: _coerce(cls, k, v) for k, v in values.items()})


def config_to_dict(config) -> dict[str, Any]:
    return dataclasses.asdict(config)


def flat_hparams(d: dict[str, Any]) -> dict[str, Any]:
    """A config dict for trackers' hparams, which take only scalars and strings."""
    out = {}
    for k, v in d.items():
        if isinstance(v, (int, float, str, bool)):
            out[k] = v
        elif v is None:
            out[k] = "none"
        else:
            out[k] = str(v)
    return out


def field_help(cls) -> list[tuple[str, Any, str]]:
    """``(name, default, help)`` for every field: what ``onestep train --show-config`` prints."""
    rows = []
    for f in dataclasses.fields(cls):
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else None
        )
        rows.append((f.name, default, f.metadata.get("help", "")))
    return rows
