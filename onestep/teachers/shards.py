"""On-disk caches of encoded data as safetensors shards, shared by the VAE latents of real images
(:mod:`onestep.teachers.latents`) and the prompt embeddings (:mod:`onestep.teachers.prompt_cache`).

A cache is a folder named by a hash of what it holds: shards ``shard-00000.safetensors``, ... of
``shard_size`` rows each (metadata: the first row, ``start``, and the row count) and an
``index.json`` written last, naming every shard. A folder with its index is complete and loads
without the encoder; without one, the shards already written are kept and only the missing ones
are encoded, so an interrupted encode resumes where it stopped. Every file is written to a
temporary name and renamed, so a reader never sees a partial file.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable, TypeVar

import torch
from accelerate.logging import get_logger

from ..errors import ConfigError

logger = get_logger(__name__)
T = TypeVar("T")


def shard_name(i: int) -> str:
    return f"shard-{i:05d}.safetensors"


def write_atomically(path: Path, write: Callable[[Path], Any]) -> None:
    """``write(tmp)`` then rename onto ``path``: readers see a whole file or none, whatever the
    number of processes writing it."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def complete_shard(path: Path, start: int, count: int, tensor: str) -> bool:
    """Whether ``path`` is a shard of this cache holding rows ``start .. start + count - 1`` (its
    ``tensor`` has ``count`` rows and its metadata says it starts at ``start``)."""
    from safetensors import safe_open

    if not path.is_file():
        return False
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            return meta.get("start") == str(start) and f.get_slice(tensor).get_shape()[0] == count
    except Exception:  # a foreign or damaged file: encode this shard again
        return False


def write_shards(
    folder: Path,
    total: int,
    shard_size: int,
    encode: Callable[[int, int, Any], dict[str, torch.Tensor]],
    *,
    tensor: str,
    count_key: str,
    meta: dict[str, str],
    index: dict[str, Any],
    desc: str,
    unit: str,
    what: str,
    show_progress: bool = True,
) -> None:
    """Write every missing shard of ``folder``, then ``index.json`` (last: it marks the cache complete).

    Args:
        folder: the cache folder (created if missing).
        total: rows in the whole cache.
        shard_size: rows per shard.
        encode: ``encode(start, stop, bar)`` gives the tensors of rows ``start .. stop - 1``
            (called only for shards not on disk) and advances the tqdm ``bar`` as it goes.
        tensor: a tensor every shard holds (its row count tells a complete shard).
        count_key: the name of the row count in the shards' metadata and the index (``images``).
        meta: more metadata for every shard.
        index: more fields for ``index.json``.
        desc, unit: the progress bar's label and unit.
        what: what the cache is called in log lines (``latent cache``).
        show_progress: show the progress bar (tqdm hides it off a terminal).
    """
    from safetensors.torch import save_file
    from tqdm.auto import tqdm

    folder.mkdir(parents=True, exist_ok=True)
    starts = list(range(0, total, shard_size))
    stops = [min(s + shard_size, total) for s in starts]
    todo = [i for i, s in enumerate(starts) if not complete_shard(folder / shard_name(i), s, stops[i] - s, tensor)]
    if len(todo) < len(starts):
        log(f"{what} {folder}: {len(starts) - len(todo)} of {len(starts)} shards already on disk, resuming")
    bar = tqdm(total=sum(stops[i] - starts[i] for i in todo), desc=desc, unit=unit, disable=None if show_progress else True)
    for i in todo:
        tensors = {k: v.contiguous() for k, v in encode(starts[i], stops[i], bar).items()}
        shard_meta = {"start": str(starts[i]), count_key: str(stops[i] - starts[i]), **meta}
        write_atomically(folder / shard_name(i), lambda tmp: save_file(tensors, str(tmp), metadata=shard_meta))
    bar.close()
    full = {**index, count_key: total, "shard_size": shard_size, "shards": [shard_name(i) for i in range(len(starts))], "key": folder.name}
    write_atomically(folder / "index.json", lambda tmp: tmp.write_text(json.dumps(full, indent=2) + "\n"))


def read_cache(folder: Path, load: Callable[[dict[str, Any]], T | None], what: str) -> T | None:
    """``load(index)`` of a complete cache folder (one with its ``index.json``), else None; a cache
    that cannot be read is logged and encoded again."""
    index_file = folder / "index.json"
    if not index_file.is_file():
        return None
    try:
        return load(json.loads(index_file.read_text()))
    except (OSError, KeyError, ValueError, RuntimeError) as e:
        log(f"{what} {folder} is unreadable ({e}); encoding again")
        return None


def build_once(folder: Path, read: Callable[[], T | None], write: Callable[[], None], what: str) -> T:
    """``read()`` the cache in ``folder``, after ``write()`` when it is not complete.

    Several processes: inside an ``accelerate`` run (the trainers load their teacher after creating
    the ``Accelerator``) the main process encodes and the others wait for it at a barrier, then
    every process reads the same cache. Outside one, independent processes may encode the same
    shards at once; the atomic renames keep every file whole.
    """
    from accelerate.state import PartialState, is_initialized

    state = PartialState() if is_initialized() else None
    together = state is not None and state.num_processes > 1
    out = None
    if not together or state.is_main_process:
        out = read()
        if out is None:
            write()
    if together:
        state.wait_for_everyone()  # every process passes here, cache found or not: no rank leaves early
    if out is None:
        out = read()
    if out is None:
        raise ConfigError(f"the {what} {folder} is incomplete after encoding; is the disk full? Delete the folder and run again")
    return out


def log(msg: str) -> None:
    """Log through accelerate's logger (main process only), or plain logging before accelerate starts."""
    try:
        logger.info(msg)
    except RuntimeError:  # no accelerate state yet (a teacher loaded outside a trainer)
        import logging

        logging.getLogger(__name__).info(msg)


__all__ = ["build_once", "complete_shard", "log", "read_cache", "shard_name", "write_atomically", "write_shards"]
