"""The on-disk cache of prompt embeddings: a prompt set encoded once, read back a batch at a time.

A text-to-image run draws its conditions from a prompt set that may hold 100k prompts or more; at
SD1.5's 77 x 768 float32 tokens a prompt that is 24 GB, too much to keep in memory. So the set is
deduplicated (a prompt that appears twice is encoded once) and its embeddings are written as
safetensors shards under :func:`prompt_cache_dir` (the shard machinery of
:mod:`onestep.teachers.shards`: resumable, ``index.json`` last, written by the main process of an
``accelerate`` run). A batch reads its rows from the memory-mapped shards (``safe_open``), so what
stays in memory is the prompt strings and one integer row index a prompt. A complete cache loads
without the text encoders.

The folder's name is a hash of the deduplicated prompts, the text encoders' identity (their files'
names, sizes and modification times, the encoding family and settings), and the storage dtype:
float32, or the frozen dtype of the run (bf16 / fp16 halve the disk and page cache; ``time_ids``
stay float32). Rows come back as float32 whatever the storage.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from ..errors import ConfigError
from ..files import cache_dir
from .shards import build_once, log, read_cache, write_shards

#: Prompts per safetensors shard (SD1.5: about 60 MB a shard in float32).
PROMPT_SHARD_SIZE = 256
PROMPT_CACHE_FORMAT = 1
#: Conditioning entries stored in float32 whatever the cache dtype (SDXL's pixel sizes).
KEEP_FLOAT32 = ("time_ids",)
CACHE_DTYPES = {"float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16}

Encode = Callable[[list[str]], dict[str, torch.Tensor]]


def prompt_cache_dir() -> Path:
    """``$ONESTEP_CACHE/prompts``, default ``~/.cache/onestep/prompts``."""
    return cache_dir("prompts")


def cache_dtype(dtype: torch.dtype | str | None) -> torch.dtype:
    """The storage dtype of a prompt cache from a dtype or its name (None: float32)."""
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype) and dtype in CACHE_DTYPES.values():
        return dtype
    if isinstance(dtype, str) and dtype in CACHE_DTYPES:
        return CACHE_DTYPES[dtype]
    raise ConfigError(f"text embedding cache dtype must be one of float32, bf16, fp16 (got {dtype!r})")


def prompt_cache_key(prompts: list[str], identity: dict[str, Any], dtype: torch.dtype) -> str:
    """The name of the cache folder of ``prompts`` (deduplicated) encoded by the encoder that
    ``identity`` describes, stored in ``dtype``. Any change gives a new folder."""
    h = hashlib.sha256()
    head = {"format": PROMPT_CACHE_FORMAT, "identity": identity, "dtype": str(dtype), "prompts": len(prompts)}
    h.update(json.dumps(head, sort_keys=True, default=str).encode() + b"\n")
    for p in prompts:
        h.update(json.dumps(p).encode() + b"\n")  # escaped: no prompt can fake a separator
    return h.hexdigest()[:32]


class PromptStore:
    """The rows of a complete prompt cache folder, read lazily from its memory-mapped shards.

    Args:
        folder: the cache folder.
        index: its ``index.json``.
    """

    def __init__(self, folder: Path, index: dict[str, Any]):
        from safetensors import safe_open

        self.folder = folder
        self.count = int(index["prompts"])
        self.shard_size = int(index["shard_size"])
        self.shards = list(index["shards"])
        if len(self.shards) != -(-self.count // self.shard_size):
            raise ValueError(f"{len(self.shards)} shards for {self.count} prompts of {self.shard_size} a shard")
        rows, self.keys = 0, []
        for name in self.shards:  # headers only: a missing or short shard is found now
            with safe_open(str(folder / name), framework="pt") as f:
                self.keys = sorted(f.keys())
                rows += f.get_slice(self.keys[0]).get_shape()[0]
        if rows != self.count:
            raise ValueError(f"the shards hold {rows} rows, the index says {self.count}")
        self._slices: dict[int, dict[str, Any]] = {}  # shard -> its open (memory-mapped) tensors

    def __len__(self) -> int:
        return self.count

    def __getstate__(self) -> dict[str, Any]:  # copies reopen the shards
        return {**self.__dict__, "_slices": {}}

    def _shard(self, i: int) -> dict[str, Any]:
        if i not in self._slices:
            from safetensors import safe_open

            f = safe_open(str(self.folder / self.shards[i]), framework="pt")
            self._slices[i] = {k: f.get_slice(k) for k in self.keys}
        return self._slices[i]

    def rows(self, rows: np.ndarray | list[int]) -> dict[str, torch.Tensor]:
        """The embeddings of rows ``rows`` (repeats allowed), float32; only those rows are read."""
        rows = [int(r) for r in rows]
        uniq = sorted(set(rows))
        if uniq and (uniq[0] < 0 or uniq[-1] >= self.count):
            raise IndexError(f"prompt cache {self.folder} has rows 0 .. {self.count - 1}, not {uniq[0]} .. {uniq[-1]}")
        read: dict[int, dict[str, torch.Tensor]] = {}  # each row read once, in file order
        for r in uniq:
            shard, j = self._shard(r // self.shard_size), r % self.shard_size
            read[r] = {k: shard[k][j : j + 1] for k in self.keys}
        return {k: torch.cat([read[r][k] for r in rows]).float() for k in self.keys}


class PromptTable:
    """The embeddings of a prompt list by position: ``table(idx)`` is the condition of prompts
    ``idx`` (a tensor of positions), read from a :class:`PromptStore`.

    Attributes:
        store: the cache of the deduplicated prompts.
        rows: for each prompt of the list, its row in ``store`` (int32, one a prompt).
    """

    def __init__(self, store: PromptStore, rows: np.ndarray):
        self.store = store
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def __call__(self, idx: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.store.rows(self.rows[np.asarray(idx, dtype=np.int64)])


def cached_prompt_table(
    prompts: list[str],
    encode: Encode,
    identity: dict[str, Any],
    dtype: torch.dtype | str | None = None,
    batch_size: int = 64,
    shard_size: int = PROMPT_SHARD_SIZE,
    row_key: str = "encoder_hidden_states",
) -> PromptTable:
    """The :class:`PromptTable` of ``prompts``, encoded once into the on-disk cache.

    The cache is a folder ``prompt_cache_dir() / prompt_cache_key(...)`` of the deduplicated prompts
    (first appearance order). A complete folder loads without calling ``encode``; an incomplete
    one is resumed (:func:`onestep.teachers.shards.write_shards`), with a progress bar.

    Args:
        prompts: the prompt list (repeats allowed).
        encode: embeddings of a batch of prompts (float32, CPU, one row a prompt).
        identity: what names the encoder and its settings in the key (JSON-serialisable).
        dtype: storage dtype (default float32; ``time_ids`` always float32).
        batch_size: prompts per ``encode`` call.
        shard_size: prompts per shard (a cache written with another shard size still loads).
        row_key: a tensor ``encode`` always gives (``class_labels`` for AudioLDM's CLAP embeddings).
    """
    if shard_size < 1:
        raise ConfigError(f"shard_size must be at least 1 (got {shard_size})")
    dtype = cache_dtype(dtype)
    uniq = list(dict.fromkeys(prompts))
    pos = {p: i for i, p in enumerate(uniq)}
    rows = np.fromiter((pos[p] for p in prompts), dtype=np.int32, count=len(prompts))
    del pos
    folder = prompt_cache_dir() / prompt_cache_key(uniq, identity, dtype)

    def encode_rows(start: int, stop: int, bar) -> dict[str, torch.Tensor]:
        outs = []
        for j in range(start, stop, batch_size):
            batch = uniq[j : min(j + batch_size, stop)]
            outs.append({k: v if k in KEEP_FLOAT32 else v.to(dtype) for k, v in encode(batch).items()})
            bar.update(len(batch))
        return {k: torch.cat([o[k] for o in outs]) for k in outs[0]}

    def write() -> None:
        write_shards(folder, len(uniq), shard_size, encode_rows, tensor=row_key, count_key="prompts",
                     meta={"dtype": str(dtype)}, index={"format": PROMPT_CACHE_FORMAT, "dtype": str(dtype)},
                     desc="prompt embeddings", unit="prompt", what="prompt cache")
        log(f"cached the embeddings of {len(uniq)} prompts ({len(prompts)} with repeats) in {folder}")

    store = build_once(folder, lambda: read_cache(folder, lambda index: PromptStore(folder, index), "prompt cache"), write, "prompt cache")
    return PromptTable(store, rows)


__all__ = [
    "CACHE_DTYPES",
    "PROMPT_SHARD_SIZE",
    "PromptStore",
    "PromptTable",
    "cache_dtype",
    "cached_prompt_table",
    "prompt_cache_dir",
    "prompt_cache_key",
]
