"""File kinds and where onestep caches things: one home for the suffix lists and the cache root."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

#: Image files read as data (real images for training, image folders for FID).
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
#: Weight files that would need unpickling: never loaded, refused with a message.
PICKLE_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth", ".pkl", ".pickle")


def transformers_model_folder(path: str | Path, what: str, model: str) -> Path:
    """``path`` as a local ``save_pretrained`` folder of a transformers ``model`` (``CLIPModel``, ``ClapModel``):
    its ``config.json`` and ``.safetensors`` weights must be there (pickle weights are refused, nothing is
    downloaded); a :class:`~onestep.errors.OnestepError` naming ``what`` (the flag or field) otherwise."""
    from .errors import OnestepError

    path = Path(path).expanduser()
    if not (path / "config.json").is_file():
        raise OnestepError(f"{what} {path}: not a {model} folder (config.json missing); it must be a local path")
    if not list(path.glob("*.safetensors")):
        pickles = [p.name for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES]
        raise OnestepError(f"{path}: no .safetensors weights" + (f" ({', '.join(pickles)} refused: pickle files are not loaded)" if pickles else ""))
    return path


def cache_dir(name: str) -> Path:
    """``$ONESTEP_CACHE/<name>``, default ``~/.cache/onestep/<name>`` (e.g. ``latents``, ``fid-stats``)."""
    return Path(os.environ.get("ONESTEP_CACHE") or Path.home() / ".cache" / "onestep") / name


def staging_dir(final: Path) -> Path:
    """An empty hidden folder beside ``final`` to write it in before :func:`replace_dir` moves it into place
    (whatever an interrupted earlier write left there is removed)."""
    tmp = final.with_name(f".{final.name}.incomplete")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    return tmp


def read_json_object(file: Path, error: type[Exception]) -> dict:
    """A JSON file holding one object (``model_index.json``, ``onestep.json``, ...); ``error`` (an
    exception class) naming the file when it is not valid UTF-8 JSON or not an object."""
    try:
        data = json.loads(Path(file).read_text(encoding="utf-8"))
    except ValueError as e:  # json.JSONDecodeError and UnicodeDecodeError
        raise error(f"{file}: not valid JSON ({e})") from e
    if not isinstance(data, dict):
        raise error(f"{file}: expected a JSON object, found a {type(data).__name__}")
    return data


def write_file(path: Path, write: Callable[[Path], object]) -> Path:
    """``write(tmp)`` into a hidden file beside ``path``, then rename it to ``path``: a crash leaves the
    old file or the new one, never half of one."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    write(tmp)
    os.replace(tmp, path)
    return path


def write_text(path: Path, text: str) -> Path:
    """:func:`write_file` for a text file."""
    return write_file(path, lambda tmp: tmp.write_text(text))


def replace_dir(src: Path, dst: Path) -> Path:
    """Move the finished folder ``src`` to ``dst`` by renames, replacing a ``dst`` that exists only whole:
    at no moment is there a half-written ``dst`` (an old one is renamed aside, then removed)."""
    old = dst.with_name(f".{dst.name}.old")
    if old.exists():
        shutil.rmtree(old)
    if dst.exists():
        dst.rename(old)
    src.rename(dst)
    if old.exists():
        shutil.rmtree(old)
    return dst


__all__ = [
    "IMAGE_SUFFIXES", "PICKLE_SUFFIXES", "cache_dir", "read_json_object", "replace_dir", "staging_dir", "transformers_model_folder", "write_file",
    "write_text",
]
