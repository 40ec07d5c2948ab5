"""Teachers given as Hugging Face Hub ids (``owner/name``), opt-in.

A teacher spec that is not an existing path but has the shape of a Hub id resolves to a snapshot
folder of the Hugging Face cache through ``huggingface_hub.snapshot_download``, only when the user
allows it (``allow_hub: true`` in the config, or ``ONESTEP_ALLOW_HUB=1``). The download is restricted
to what the loaders read: ``model_index.json`` and the other JSON configs, tokenizer files, and the
default (non-variant) safetensors weights of each component; pickles (``.bin``, ``.ckpt``, ...) and
single-file checkpoints are never fetched, and no remote code runs (the loaders build the diffusers
and transformers classes they name themselves; nothing passes ``trust_remote_code``).

Offline (``HF_HUB_OFFLINE=1``, or no network) a snapshot already in the cache loads from it; one that
is not there is an error saying to download it or to pass a folder. The cache is ``HF_HUB_CACHE``
(default ``~/.cache/huggingface/hub``).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from ..errors import TeacherError
from ..files import PICKLE_SUFFIXES

#: Environment variable that allows Hub ids as teachers, as the ``allow_hub`` config field does.
ALLOW_HUB_ENV = "ONESTEP_ALLOW_HUB"
#: ``owner/name``: the characters the Hub allows, no leading dot or dash, no ``..``.
HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*")
#: The pipeline components whose weights the loaders read (not a safety checker or image encoder).
WEIGHT_PARTS = ("unet", "transformer", "vae", "text_encoder", "text_encoder_2", "text_encoder_3")
#: What a snapshot download fetches: configs, tokenizers, and the default (non-variant) safetensors of
#: the components above, sharded or not; not top-level single-file checkpoints, not fp16 / non-EMA variants.
ALLOW_PATTERNS = ["*.json", "*.txt", "tokenizer*/*"] + [
    f"{part}/{stem}{tail}"
    for part in WEIGHT_PARTS
    for stem in ("diffusion_pytorch_model", "model")
    for tail in (".safetensors", "-*-of-*.safetensors")
]
#: Never fetched, even where an allowed pattern matches (tokenizer folders).
IGNORE_PATTERNS = [f"*{s}" for s in PICKLE_SUFFIXES] + ["*.msgpack", "*.h5", "*.onnx", "*.onnx_data", "*.py"]
_TRUE = ("1", "true", "yes", "on")


def is_hub_id(spec: str) -> bool:
    """Whether ``spec`` has the shape of a Hub model id (``owner/name``) and is not an existing path."""
    return bool(HUB_ID.fullmatch(spec)) and ".." not in spec and not Path(spec).expanduser().exists()


def hub_allowed(allow_hub: bool | None = None) -> bool:
    """Hub ids are allowed: ``allow_hub`` (the config field) or ``ONESTEP_ALLOW_HUB`` set to 1/true/yes/on."""
    return bool(allow_hub) or os.environ.get(ALLOW_HUB_ENV, "").strip().lower() in _TRUE


def hub_offline() -> bool:
    """``HF_HUB_OFFLINE`` (or ``TRANSFORMERS_OFFLINE``) is set, now or when ``huggingface_hub`` was imported."""
    from huggingface_hub import constants

    env = (os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or "").strip().lower()
    return env in _TRUE or bool(constants.HF_HUB_OFFLINE)


def hub_cache_dir() -> str:
    """The Hugging Face hub cache: ``HF_HUB_CACHE`` as set now, else ``huggingface_hub``'s default."""
    from huggingface_hub import constants

    return os.environ.get("HF_HUB_CACHE") or constants.HF_HUB_CACHE


def _download_hint(repo_id: str) -> str:
    return f"download it (hf download {repo_id} --local-dir DIR) and pass the folder DIR, or pass a local diffusers pipeline folder"


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0]}" if text else type(e).__name__


def resolve_hub_teacher(repo_id: str, allow_hub: bool | None = None) -> Path:
    """The local snapshot folder of the Hub pipeline ``repo_id`` (downloaded into the Hugging Face
    cache when allowed and online; read from it offline).

    Args:
        repo_id: ``owner/name``.
        allow_hub: the config's opt-in (``ONESTEP_ALLOW_HUB=1`` also allows).

    Raises:
        TeacherError: Hub ids not allowed; offline and not cached; not found, gated or unreachable; a
            repository that is not a diffusers pipeline. One line, naming the fix.
    """
    if not hub_allowed(allow_hub):
        raise TeacherError(
            f"teacher {repo_id!r} is not an existing folder; to load it as a Hugging Face Hub id set allow_hub: true "
            f"(or {ALLOW_HUB_ENV}=1), or {_download_hint(repo_id)}"
        )
    from huggingface_hub import snapshot_download
    from huggingface_hub.utils import LocalEntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError

    offline = hub_offline()
    cache = hub_cache_dir()
    try:
        folder = snapshot_download(
            repo_id, cache_dir=cache, allow_patterns=ALLOW_PATTERNS, ignore_patterns=IGNORE_PATTERNS, local_files_only=offline
        )
    except (RepositoryNotFoundError, RevisionNotFoundError) as e:  # gated and private repos included
        raise TeacherError(
            f"teacher {repo_id!r}: not found on the Hugging Face Hub, or gated / private (accept its licence and "
            f"log in with `hf auth login`) ({_first_line(e)}); or {_download_hint(repo_id)}"
        ) from e
    except LocalEntryNotFoundError as e:
        why = "HF_HUB_OFFLINE is set" if offline else "the Hugging Face Hub cannot be reached"
        raise TeacherError(f"teacher {repo_id!r} is not in the Hugging Face cache ({cache}) and {why}: {_download_hint(repo_id)}") from e
    except (OSError, ValueError) as e:  # HTTP errors, a broken cache
        raise TeacherError(f"teacher {repo_id!r}: the Hugging Face Hub download failed ({_first_line(e)}); {_download_hint(repo_id)}") from e
    path = Path(folder)
    if not (path / "model_index.json").is_file():
        raise TeacherError(
            f"teacher {repo_id!r}: the snapshot {path} has no model_index.json, so it is not a diffusers pipeline "
            "repository (single-file checkpoints are not loaded); point teacher: at a diffusers-format repository or folder"
        )
    return path


__all__ = ["ALLOW_HUB_ENV", "ALLOW_PATTERNS", "IGNORE_PATTERNS", "hub_allowed", "hub_offline", "is_hub_id", "resolve_hub_teacher"]
