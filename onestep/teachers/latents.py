"""Latent space for text-to-image teachers: the frozen VAE between images and latents, captioned
image folders (the real data of methods with a GAN term) and the on-disk cache of their latents.

The generator, the fake score and the teacher work on VAE latents (``sample_shape = (C, H / f,
W / f)``); the VAE decodes only for previews, sampling and evaluation. Real images are encoded once
and cached as safetensors shards under :func:`onestep.files.cache_dir` ``("latents")``.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from ..errors import ConfigError
from ..files import IMAGE_SUFFIXES, cache_dir
from .shards import build_once, log, read_cache, write_shards
from .text import TextConditioning, jsonl_records


class LatentVAE(nn.Module):
    """The teacher's frozen ``AutoencoderKL`` between images in ``[-1, 1]`` and scaled latents
    (``z = (E(x) - shift) * scaling_factor``; decoding inverts it, as the pipelines do)."""

    def __init__(self, vae: nn.Module):
        super().__init__()
        self.vae = vae.requires_grad_(False).eval()

    @property
    def scale_factor(self) -> int:
        """Pixels per latent cell."""
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    def _shift(self) -> float:
        return float(getattr(self.vae.config, "shift_factor", None) or 0.0)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Images (float32, about ``[-1, 1]``, not clamped) from latents; latent clips ``(B, C, F, h, w)``
        frame by frame into ``(B, 3, F, H, W)``, as ``TextToVideoSDPipeline`` decodes them."""
        if z.ndim == 5:
            b, _, f = z.shape[:3]
            frames = self.decode(z.permute(0, 2, 1, 3, 4).flatten(0, 1))
            return frames.unflatten(0, (b, f)).permute(0, 2, 1, 3, 4)
        x = z / self.vae.config.scaling_factor
        if self._shift():
            x = x + self._shift()
        return self.vae.decode(x.to(self.vae.dtype)).sample.float()

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Latents (the posterior mean) of images in ``[-1, 1]``."""
        z = self.vae.encode(images.to(self.vae.dtype)).latent_dist.mode().float()
        return (z - self._shift()) * self.vae.config.scaling_factor


# --------------------------------------------------------------------------- real images


def read_image_captions(folder: str | Path, suffixes: tuple[str, ...] = IMAGE_SUFFIXES, option: str = "real_images") -> list[tuple[Path, str]]:
    """``(image, caption)`` pairs of a folder: captions from ``metadata.jsonl`` (``file_name`` and
    ``text``/``caption``/``prompt``, the diffusers image-folder convention) or a ``.txt`` file
    beside each image. ``suffixes``: the files to pair without a ``metadata.jsonl`` (``.wav`` for
    ``option`` ``real_audio``)."""
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise ConfigError(f"{option} {folder} is not a folder")
    meta = folder / "metadata.jsonl"
    pairs: list[tuple[Path, str]] = []
    if meta.is_file():
        for n, item in jsonl_records(meta):
            caption = next((item[k] for k in ("text", "caption", "prompt") if isinstance(item.get(k), str)), None)
            if "file_name" not in item or caption is None:
                raise ConfigError(f"{meta}:{n}: needs 'file_name' and a 'text' (or caption/prompt) field")
            img = folder / item["file_name"]
            if not img.is_file():
                raise ConfigError(f"{meta}:{n}: {img} does not exist")
            pairs.append((img, caption))
    else:
        for img in sorted(p for p in folder.iterdir() if p.suffix.lower() in suffixes):
            txt = img.with_suffix(".txt")
            if not txt.is_file():
                raise ConfigError(f"{img} has no caption: add {txt.name} or a metadata.jsonl (file_name, text)")
            pairs.append((img, txt.read_text(encoding="utf-8").strip()))
    if not pairs:
        raise ConfigError(f"{option} {folder}: no captioned {'images' if option == 'real_images' else 'files'}")
    return pairs


def luma(x: torch.Tensor) -> torch.Tensor:
    """Grey images from RGB ones, ``(..., 3, H, W)`` to ``(..., 1, H, W)``: ITU-R 601 luma, the weights of
    PIL's ``convert("L")``."""
    return (x * torch.tensor([0.299, 0.587, 0.114], dtype=x.dtype).view(3, 1, 1)).sum(-3, keepdim=True)


def load_image(path: Path, size: int) -> torch.Tensor:
    """``(3, size, size)`` in ``[-1, 1]``: the short side resized to ``size`` (bicubic), centre-cropped."""
    import numpy as np
    from PIL import Image

    img = Image.open(path).convert("RGB")
    w, h = img.size
    s = size / min(w, h)
    img = img.resize((max(size, round(w * s)), max(size, round(h * s))), Image.BICUBIC)
    w, h = img.size
    left, top = (w - size) // 2, (h - size) // 2
    img = img.crop((left, top, left + size, top + size))
    return torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1).float() / 127.5 - 1


def latent_cache_dir() -> Path:
    """``$ONESTEP_CACHE/latents``, default ``~/.cache/onestep/latents``."""
    return cache_dir("latents")


#: Images per safetensors shard of a latent cache.
LATENT_SHARD_SIZE = 1024
LATENT_CACHE_FORMAT = 1


def latent_cache_key(pairs: list[tuple[Path, str]], vae: LatentVAE, size: int) -> str:
    """The name of the cache folder of ``pairs``: a hash of the images (resolved paths, sizes,
    modification times), the image size and the VAE weights. Any change gives a new folder."""
    h = hashlib.sha256()
    for img, _ in pairs:
        st = img.stat()
        h.update(f"{img.resolve()}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    h.update(f"{size}|".encode())
    for k, v in sorted(vae.vae.state_dict().items())[:4]:
        h.update(k.encode() + v.float().sum().item().hex().encode())
    return h.hexdigest()[:32]


def _read_latent_cache(folder: Path) -> torch.Tensor | None:
    """The latents of a complete cache folder (its ``index.json`` names every shard), else None."""
    from safetensors import safe_open

    def load(index: dict) -> torch.Tensor | None:
        parts = []
        for name in index["shards"]:
            with safe_open(str(folder / name), framework="pt") as f:
                parts.append(f.get_tensor("latents"))
        latents = torch.cat(parts)
        return latents if len(latents) == index.get("images") else None

    return read_cache(folder, load, "latent cache")


def _encode_shards(pairs: list[tuple[Path, str]], vae: LatentVAE, size: int, folder: Path, device, batch_size: int,
                   shard_size: int, show_progress: bool, load: Callable[[Path], torch.Tensor]) -> None:
    """Write every missing shard of ``folder``, then ``index.json`` (last: it marks the cache complete)."""

    def encode(start: int, stop: int, bar) -> dict[str, torch.Tensor]:
        vae.to(device)  # only once a shard is missing
        dtype = next(vae.parameters()).dtype
        chunk, outs = pairs[start:stop], []
        for j in range(0, len(chunk), batch_size):
            x = torch.stack([load(p) for p, _ in chunk[j : j + batch_size]]).to(device, dtype)
            outs.append(vae.encode(x).float().cpu())
            bar.update(len(x))
        return {"latents": torch.cat(outs)}

    index = {
        "format": LATENT_CACHE_FORMAT,
        "size": size,
        "first_image": str(pairs[0][0].resolve()),
        "last_image": str(pairs[-1][0].resolve()),
    }
    write_shards(folder, len(pairs), shard_size, encode, tensor="latents", count_key="images", meta={"size": str(size)},
                 index=index, desc="VAE latents", unit="img", what="latent cache", show_progress=show_progress)


def encode_image_folder(
    pairs: list[tuple[Path, str]],
    vae: LatentVAE,
    size: int,
    device: torch.device | str = "cpu",
    batch_size: int = 8,
    shard_size: int = LATENT_SHARD_SIZE,
    load: Callable[[Path], torch.Tensor] | None = None,
) -> torch.Tensor:
    """VAE latents of the images (float32, CPU), computed once and cached on disk.

    The cache is a folder ``latent_cache_dir() / latent_cache_key(...)``: safetensors shards of
    ``shard_size`` images (``shard-00000.safetensors``, ...) and an ``index.json`` written last
    (image count, shard names, size, the first and last image). A folder with its index loads
    without touching the VAE; without one, the shards already written are kept and only the
    missing ones are encoded, so an interrupted encode resumes where it stopped. The key changes
    with the images (paths, sizes, modification times), ``size`` and the VAE weights.

    Several processes: inside an ``accelerate`` run (the trainers load their teacher after creating
    the ``Accelerator``) the main process encodes and the others wait for it at a barrier, then
    every process reads the same cache. Outside one, independent processes may encode the same
    shards at once; each shard and the index are written to a temporary name and renamed, so a
    reader never sees a partial file.

    Args:
        pairs: ``(image, caption)`` pairs (see :func:`read_image_captions`).
        vae: the teacher's VAE.
        size: image side in pixels.
        device: where the VAE encodes.
        batch_size: images per VAE call.
        shard_size: images per shard (a cache written with another shard size still loads).
        load: what the VAE encodes of a file (default :func:`load_image` at ``size``; AudioLDM teachers
            give :func:`onestep.teachers.audioldm.load_mel`'s spectrograms, ``size`` their frames).
    """
    if shard_size < 1:
        raise ConfigError(f"shard_size must be at least 1 (got {shard_size})")
    folder = latent_cache_dir() / latent_cache_key(pairs, vae, size)

    def write() -> None:
        _encode_shards(pairs, vae, size, folder, device, batch_size, shard_size, show_progress=True,
                       load=load or (lambda p: load_image(p, size)))
        log(f"cached VAE latents of {len(pairs)} images in {folder}")

    return build_once(folder, lambda: _read_latent_cache(folder), write, "latent cache")


def image_folder_data(
    folder: str | Path, conditioning: TextConditioning, vae: LatentVAE, size: int, device="cpu", shard_size: int = LATENT_SHARD_SIZE,
    pairs: list[tuple[Path, str]] | None = None, load: Callable[[Path], torch.Tensor] | None = None,
):
    """A real-data sampler ``(n, generator) -> (latents, caption embeddings)`` over a captioned folder
    (latents cached on disk by :func:`encode_image_folder`, ``shard_size`` images a shard; captions
    by :meth:`TextConditioning.prompt_table`: the on-disk prompt cache, or encoded per batch).
    ``pairs`` and ``load``: the folder's files already read and what the VAE encodes of each (sounds)."""
    pairs = pairs if pairs is not None else read_image_captions(folder)
    latents = encode_image_folder(pairs, vae, size, device, shard_size=shard_size, load=load)
    captions = conditioning.prompt_table([c for _, c in pairs])

    def draw(n: int, generator: torch.Generator):
        idx = torch.randint(0, len(latents), (n,), generator=generator)
        return latents[idx], captions(idx)

    return draw


__all__ = [
    "LATENT_SHARD_SIZE",
    "LatentVAE",
    "encode_image_folder",
    "image_folder_data",
    "latent_cache_dir",
    "latent_cache_key",
    "load_image",
    "luma",
    "read_image_captions",
]
