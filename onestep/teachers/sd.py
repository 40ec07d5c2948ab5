"""Text-to-image teachers: Stable Diffusion (SD1.5 / SD2.1, eps or v prediction) and SDXL
pipeline folders on disk, in latent space.

A teacher folder is what ``pipeline.save_pretrained`` writes: ``model_index.json``, ``unet/``
(a ``UNet2DConditionModel``), ``vae/`` (``AutoencoderKL``), ``text_encoder/`` + ``tokenizer/``
(CLIP) and ``scheduler/``; SDXL adds ``text_encoder_2/`` (with projection: pooled embeddings)
and ``tokenizer_2/``. Everything loads with ``from_pretrained(path)`` from safetensors; nothing
reaches a hub and no remote code runs.

Latent space throughout: the generator, the fake score and the teacher work on VAE latents
(``sample_shape = (C, H / f, W / f)``); the VAE decodes only for previews, sampling and
evaluation.

Conditioning (:class:`TextConditioning`) is a dict of tensors per sample, exactly what the UNet
takes: ``encoder_hidden_states`` (SD), plus ``text_embeds`` (pooled) and ``time_ids`` (SDXL,
``[H, W, 0, 0, H, W]`` in pixels). Prompts are encoded as the diffusers pipelines encode them
(SD: the last hidden state; SDXL: the penultimate hidden states of both encoders, concatenated,
and the second encoder's projection), so a student exported as a pipeline folder gives the same
images in plain diffusers. The prompt set is encoded once and cached (the text encoders are
frozen); the unconditional branch of guidance is the negative prompt's embedding when a config
gives one, else the empty prompt's (zeros for SDXL folders with ``force_zeros_for_empty_prompt``,
as the SDXL pipeline does).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate.logging import get_logger
from torch import nn

from ..conditioning import Cond, Conditioning, cond_to, index_cond
from ..errors import ConfigError, TeacherError

logger = get_logger(__name__)

SD_PARTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
SDXL_PARTS = SD_PARTS + ("text_encoder_2", "tokenizer_2")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")

#: Previews of text-to-image runs use these prompts unless ``validation_prompts`` names a file.
DEFAULT_VALIDATION_PROMPTS = [
    "a photo of a cat sitting on a windowsill",
    "a red sports car on a mountain road, golden hour",
    "a bowl of ramen, studio lighting",
    "an astronaut riding a horse, oil painting",
    "a lighthouse on a cliff during a storm",
    "a cozy wooden cabin in a snowy forest",
    "a portrait of an old fisherman, dramatic light",
    "a watercolor painting of a city skyline",
]


def read_model_index(path: Path) -> dict[str, Any]:
    index_file = path / "model_index.json"
    if not index_file.is_file():
        raise TeacherError(f"{path} is not a diffusers pipeline folder: model_index.json is missing")
    try:
        return json.loads(index_file.read_text())
    except json.JSONDecodeError as e:
        raise TeacherError(f"{index_file}: not valid JSON ({e})") from e


def component_class(index: dict[str, Any], part: str) -> str | None:
    entry = index.get(part)
    if isinstance(entry, list) and len(entry) == 2:
        return entry[1]
    return None if entry is None else str(entry)


def is_sdxl(index: dict[str, Any]) -> bool:
    return component_class(index, "text_encoder_2") is not None or "XL" in str(index.get("_class_name", ""))


def check_parts(path: Path, index: dict[str, Any]) -> tuple[str, ...]:
    """The parts the folder must hold; raise naming the first one that is missing."""
    parts = SDXL_PARTS if is_sdxl(index) else SD_PARTS
    needs = f"a {'SDXL' if parts is SDXL_PARTS else 'Stable Diffusion'} folder needs {', '.join(parts)}"
    return require_parts(path, index, parts, "text-to-image", needs)


def require_parts(path: Path, index: dict[str, Any], parts: tuple[str, ...], kind: str, needs: str) -> tuple[str, ...]:
    """Check that ``model_index.json`` names each of ``parts`` and its folder exists, and that the
    weight folders hold no pickles; raise a :class:`TeacherError` naming the first missing part
    (``needs`` says what a ``kind`` folder must hold)."""
    from . import refuse_pickles

    for part in parts:
        if component_class(index, part) is None or not (path / part).is_dir():
            raise TeacherError(f"{path}: the {kind} pipeline has no '{part}' component ({needs})")
    for part in parts:
        if not part.startswith(("tokenizer", "scheduler")):
            refuse_pickles(path / part)
    return parts


# ---------------------------------------------------------------------------- prompts


class PromptEncoder:
    """Encodes prompts as the diffusers SD / SDXL pipelines do; loads its text encoders lazily.

    Args:
        folder: the pipeline folder (``text_encoder/``, ``tokenizer/``, SDXL: ``*_2/`` too).
        xl: SDXL-style (two encoders, pooled embeddings and time ids).
        size: image size ``(H, W)`` in pixels (SDXL time ids).
        device: where the encoders run.
    """

    def __init__(self, folder: str | Path, xl: bool, size: tuple[int, int], device: torch.device | str = "cpu"):
        self.folder = Path(folder)
        self.xl = xl
        self.size = (int(size[0]), int(size[1]))
        self.device = torch.device(device)
        self._parts: list[tuple[Any, nn.Module]] | None = None

    def _components(self) -> list[tuple[str, str, type, type]]:
        """``(tokenizer folder, encoder folder, tokenizer class, encoder class)`` of each text encoder."""
        from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

        names = [("tokenizer", "text_encoder", CLIPTokenizer, CLIPTextModel)]
        if self.xl:
            names.append(("tokenizer_2", "text_encoder_2", CLIPTokenizer, CLIPTextModelWithProjection))
        return names

    def _load(self) -> list[tuple[Any, nn.Module]]:
        if self._parts is None:
            parts = []
            for tok_name, enc_name, tok_cls, enc_cls in self._components():
                try:
                    tok = tok_cls.from_pretrained(self.folder / tok_name)
                    enc = enc_cls.from_pretrained(self.folder / enc_name, use_safetensors=True)
                except (OSError, ValueError) as e:
                    raise TeacherError(f"{self.folder}: cannot load {enc_name}/ and {tok_name}/ ({e})") from e
                parts.append((tok, enc.to(self.device).eval().requires_grad_(False)))
            self._parts = parts
        return self._parts

    @property
    def family(self) -> str:
        """Which pipeline's encoding this is: ``"sd"`` or ``"sdxl"`` (``"sd3"``: :class:`~onestep.teachers.sd3.SD3PromptEncoder`)."""
        return "sdxl" if self.xl else "sd"

    @property
    def text_encoders(self) -> int:
        return 2 if self.xl else 1

    def describe(self) -> dict[str, Any]:
        """What a student folder records to rebuild this encoder (:func:`student_text_parts`)."""
        return {"text_encoders": self.text_encoders, "family": self.family}

    def release(self) -> None:
        """Free the text encoders (they load again on the next :meth:`encode`)."""
        self._parts = None

    @torch.no_grad()
    def encode(self, prompts: list[str], batch_size: int = 64) -> dict[str, torch.Tensor]:
        """Embeddings of ``prompts`` (float32, CPU): ``encoder_hidden_states`` and, for SDXL,
        ``text_embeds`` and ``time_ids``."""
        outs = [self._encode(prompts[i : i + batch_size]) for i in range(0, len(prompts), batch_size)]
        return {k: torch.cat([o[k] for o in outs]) for k in outs[0]}

    def _encode(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        hidden, pooled = [], None
        for tok, enc in self._load():
            ids = tok(prompts, padding="max_length", max_length=tok.model_max_length, truncation=True, return_tensors="pt")
            input_ids = ids.input_ids.to(self.device)
            if not self.xl:
                # StableDiffusionPipeline: the last hidden state (attention mask only if the encoder asks for one).
                mask = ids.attention_mask.to(self.device) if getattr(enc.config, "use_attention_mask", False) else None
                return {"encoder_hidden_states": enc(input_ids, attention_mask=mask)[0].float().cpu()}
            out = enc(input_ids, output_hidden_states=True)
            if pooled is None and out[0].ndim == 2:  # the projection of the encoder that has one
                pooled = out[0]
            hidden.append(out.hidden_states[-2])
        h, w = self.size
        time_ids = torch.tensor([[h, w, 0, 0, h, w]], dtype=torch.float32).expand(len(prompts), -1).clone()
        return {
            "encoder_hidden_states": torch.cat(hidden, dim=-1).float().cpu(),
            "text_embeds": pooled.float().cpu(),
            "time_ids": time_ids,
        }


@dataclass(eq=False)
class TextConditioning(Conditioning):
    """Text conditioning with cached prompt embeddings.

    A condition is a dict of per-sample tensors (see the module docstring). ``sample`` draws
    prompts from ``prompts`` (the training prompt set), ``null`` is the negative prompt's
    embedding (or the empty prompt's), ``from_labels`` takes prompt strings or indices into
    ``validation_prompts``. ``num_classes`` is the number of validation prompts, so preview
    code that cycles through "classes" cycles through them.

    Attributes:
        encoder: encodes new prompts (None: only cached prompts are available).
        prompts: the training prompt set.
        validation_prompts: fixed prompts for previews.
        negative_prompt: replaces the empty prompt as the unconditional branch of guidance.
        cache_embeddings: encode the whole prompt set once (True) or each batch anew.
        zero_empty_prompt: the empty prompt's embedding is zeros (SDXL ``force_zeros_for_empty_prompt``).
    """

    kind: str = "text"
    encoder: PromptEncoder | None = field(default=None, repr=False)
    prompts: list[str] = field(default_factory=list, repr=False)
    validation_prompts: list[str] = field(default_factory=list)
    negative_prompt: str | None = None
    cache_embeddings: bool = True
    zero_empty_prompt: bool = False

    def __post_init__(self):
        super().__post_init__()
        self.num_classes = len(self.validation_prompts)
        self._known: dict[str, dict[str, torch.Tensor]] = {}
        self._table: dict[str, torch.Tensor] | None = None

    @property
    def guidable(self) -> bool:
        return True

    # ------------------------------------------------------------ encoding
    def encode(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        """Embeddings of ``prompts`` (CPU); prompts seen before come from the cache."""
        new = sorted({p for p in prompts if p not in self._known and not (p == "" and self.zero_empty_prompt)})
        if new:
            if self.encoder is None:
                raise ConfigError("this text conditioning has no text encoder; only its cached prompts can be used")
            enc = self.encoder.encode(new)
            for i, p in enumerate(new):
                self._known[p] = {k: v[i : i + 1] for k, v in enc.items()}
        rows = [self._empty_row() if (p == "" and self.zero_empty_prompt) else self._known[p] for p in prompts]
        return {k: torch.cat([r[k] for r in rows]) for k in rows[0]}

    def _empty_row(self) -> dict[str, torch.Tensor]:
        if not self.zero_empty_prompt:
            return self.encode([""])
        if "\0zeros" not in self._known:
            like = self.encoder.encode(["_"]) if self.encoder is not None else None
            if like is None:
                raise ConfigError("no text encoder to size the zero embedding")
            self._known["\0zeros"] = {k: (v if k == "time_ids" else torch.zeros_like(v)) for k, v in like.items()}
        return self._known["\0zeros"]

    def prepare(self) -> "TextConditioning":
        """Encode the empty / negative prompt, the validation prompts and (when caching) the prompt
        set now, then free the text encoders (they load again if a new prompt comes)."""
        self._empty_row()
        self.encode([self.negative_prompt or ""] + list(self.validation_prompts))
        if self.cache_embeddings and self.prompts:
            uniq = list(dict.fromkeys(self.prompts))
            pos = {p: i for i, p in enumerate(uniq)}
            table = self.encode(uniq)
            self._table = index_cond(table, torch.tensor([pos[p] for p in self.prompts]))
            for p in uniq:  # the table holds them now
                if p not in self.validation_prompts and p not in ("", self.negative_prompt):
                    self._known.pop(p, None)
        if self.encoder is not None and self.cache_embeddings:
            self.encoder.release()
        return self

    # ---------------------------------------------------- Conditioning API
    def sample(self, n: int, generator: torch.Generator | None = None, device="cpu") -> Cond:
        return self.sample_prompts(n, generator, device)[0]

    def sample_prompts(self, n: int, generator: torch.Generator | None = None, device="cpu") -> tuple[Cond, list[str]]:
        """:meth:`sample` and the prompts it drew (the same draw: one random stream for both)."""
        if not self.prompts:
            raise ConfigError(
                "a text-to-image teacher needs training prompts: set prompts: to a text file (one a line), "
                "a JSONL file (caption/prompt/text field) or a CSV file (caption column)"
            )
        idx = torch.randint(0, len(self.prompts), (n,), generator=generator)
        prompts = [self.prompts[i] for i in idx.tolist()]
        if self._table is not None:
            return cond_to(index_cond(self._table, idx), device), prompts
        return cond_to(self.encode(prompts), device), prompts

    def null(self, n: int, device="cpu") -> Cond:
        return cond_to(self.repeat(self.encode([self.negative_prompt]) if self.negative_prompt else self._empty_row(), n), device)

    def empty(self, n: int, device="cpu") -> Cond:
        """The empty prompt (what condition dropping uses, whatever the negative prompt)."""
        return cond_to(self.repeat(self._empty_row(), n), device)

    @staticmethod
    def repeat(row: dict[str, torch.Tensor], n: int) -> dict[str, torch.Tensor]:
        return {k: v.expand(n, *v.shape[1:]).clone() for k, v in row.items()}

    def from_labels(self, labels, device="cpu") -> Cond:
        """Prompt strings, or integer indices into ``validation_prompts``."""
        labels = list(labels.tolist() if isinstance(labels, torch.Tensor) else labels)
        prompts = []
        for lab in labels:
            if isinstance(lab, str):
                prompts.append(lab)
            elif not self.validation_prompts or not 0 <= int(lab) < len(self.validation_prompts):
                raise ConfigError(f"prompt index {lab} is outside the {len(self.validation_prompts)} validation prompts")
            else:
                prompts.append(self.validation_prompts[int(lab)])
        return cond_to(self.encode(prompts), device)

    def drop(self, cond: Cond, p: float, generator: torch.Generator | None = None) -> Cond:
        """Replace each condition by the empty prompt with probability ``p``."""
        if p <= 0:
            return cond
        n = next(iter(cond.values())).shape[0]
        mask = torch.rand(n, generator=generator) < p
        empty = self.empty(n)
        out = {}
        for k, v in cond.items():
            m = mask.to(v.device).reshape(n, *([1] * (v.ndim - 1)))
            out[k] = torch.where(m, empty[k].to(v), v)
        return out

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": "text",
            "num_classes": len(self.validation_prompts),
            "null_class": None,
            "negative_prompt": self.negative_prompt,
            "validation_prompts": list(self.validation_prompts),
            "zero_empty_prompt": self.zero_empty_prompt,
            **(self.encoder.describe() if self.encoder is not None else {"text_encoders": 1}),
            "image_size": list(self.encoder.size) if self.encoder is not None else None,
        }


# ------------------------------------------------------------------------------- VAE


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
        """Images (float32, about ``[-1, 1]``, not clamped) from latents."""
        x = z / self.vae.config.scaling_factor
        if self._shift():
            x = x + self._shift()
        return self.vae.decode(x.to(self.vae.dtype)).sample.float()

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Latents (the posterior mean) of images in ``[-1, 1]``."""
        z = self.vae.encode(images.to(self.vae.dtype)).latent_dist.mode().float()
        return (z - self._shift()) * self.vae.config.scaling_factor


# --------------------------------------------------------------------------- loading


def load_text_to_image_teacher(
    path: Path,
    name: str,
    prompts: str | list[str] | None = None,
    validation_prompts: str | list[str] | None = None,
    negative_prompt: str | None = None,
    resolution: int | None = None,
    real_images: str | None = None,
    cache_text_embeddings: bool = True,
    device: torch.device | str = "cpu",
):
    """Load a Stable Diffusion / SDXL pipeline folder as a latent :class:`~onestep.teachers.Teacher`.

    Args:
        path: the pipeline folder.
        name: what the teacher is called in logs and student metadata.
        prompts: the training prompt set: a file (text, JSONL or CSV, see
            :func:`onestep.teachers.text.read_prompts`) or a list.
        validation_prompts: prompts for previews (a file or a list; default: a fixed list).
        negative_prompt: replaces the empty prompt as guidance's unconditional branch.
        resolution: image side in pixels (default: the UNet's ``sample_size`` times the VAE factor).
        real_images: a folder of images with captions, for methods with a GAN term or real data.
        cache_text_embeddings: encode the prompt set once (the text encoders are frozen).
        device: where the text encoders and the VAE run while caching.
    """
    from diffusers import AutoencoderKL, UNet2DConditionModel

    from . import Teacher, _sha256_of
    from ..schedule import NoiseSchedule

    index = read_model_index(path)
    check_parts(path, index)
    xl = is_sdxl(index)
    try:
        unet = UNet2DConditionModel.from_pretrained(path / "unet", use_safetensors=True)
        vae = AutoencoderKL.from_pretrained(path / "vae", use_safetensors=True)
    except (OSError, ValueError) as e:
        raise TeacherError(f"{path}: cannot load the UNet or the VAE ({e})") from e
    if xl and getattr(unet.config, "addition_embed_type", None) != "text_time":
        raise TeacherError(f"{path}: an SDXL folder needs a UNet with addition_embed_type 'text_time'")
    sched_cfg = read_scheduler_config(path)
    schedule = NoiseSchedule.from_scheduler_config(sched_cfg)
    latent_vae = LatentVAE(vae)
    f = latent_vae.scale_factor
    side = int(resolution) if resolution else int(unet.config.sample_size) * f
    if side % f:
        raise ConfigError(f"resolution {side} is not a multiple of the VAE's factor {f}")
    conditioning = text_conditioning(
        PromptEncoder(path, xl, (side, side), device=device), prompts, validation_prompts, negative_prompt, cache_text_embeddings,
        zero_empty_prompt=bool(xl and index.get("force_zeros_for_empty_prompt", False)),
    )
    real_data = None
    if real_images:
        real_data = image_folder_data(real_images, conditioning, latent_vae, side, device=device)
    conditioning.prepare()
    return Teacher(
        name=name,
        backbone=unet,
        schedule=schedule,
        prediction_type=sched_cfg.get("prediction_type", "epsilon"),
        conditioning=conditioning,
        sample_shape=(int(unet.config.in_channels), side // f, side // f),
        guidance_scale=5.0 if xl else 7.5,
        clip=None,  # latents are not clamped
        sha256=_sha256_of(list((path / "unet").glob("*.safetensors"))),
        real_data=real_data,
        meta={"pipeline": index.get("_class_name"), "pipeline_folder": str(path.resolve()), "sdxl": xl, "resolution": side},
        vae=latent_vae,
    )


def read_scheduler_config(path: Path) -> dict[str, Any]:
    """``scheduler/scheduler_config.json`` of a pipeline folder; a :class:`TeacherError` when missing."""
    sched_file = path / "scheduler" / "scheduler_config.json"
    if not sched_file.is_file():
        raise TeacherError(f"{path}: scheduler/scheduler_config.json is missing")
    return json.loads(sched_file.read_text())


def text_conditioning(
    encoder: PromptEncoder,
    prompts: str | list[str] | None,
    validation_prompts: str | list[str] | None,
    negative_prompt: str | None,
    cache_embeddings: bool,
    zero_empty_prompt: bool = False,
) -> TextConditioning:
    """The teacher's :class:`TextConditioning` from the loaders' prompt options (files or lists)."""
    return TextConditioning(
        encoder=encoder,
        prompts=_prompt_list(prompts, "prompts") if prompts is not None else [],
        validation_prompts=_prompt_list(validation_prompts, "validation_prompts") if validation_prompts else list(DEFAULT_VALIDATION_PROMPTS),
        negative_prompt=negative_prompt or None,
        cache_embeddings=cache_embeddings,
        zero_empty_prompt=zero_empty_prompt,
    )


def _prompt_list(source: str | list[str], what: str) -> list[str]:
    from .text import read_prompts

    if isinstance(source, (list, tuple)):
        out = [str(p) for p in source]
    else:
        out = read_prompts(source)
    if not out:
        raise ConfigError(f"{what}: no prompts")
    return out


# ------------------------------------------------------------------------ real images


def read_image_captions(folder: str | Path) -> list[tuple[Path, str]]:
    """``(image, caption)`` pairs of a folder: captions from ``metadata.jsonl`` (``file_name`` and
    ``text``/``caption``/``prompt``, the diffusers image-folder convention) or a ``.txt`` file
    beside each image."""
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise ConfigError(f"real_images {folder} is not a folder")
    meta = folder / "metadata.jsonl"
    pairs: list[tuple[Path, str]] = []
    if meta.is_file():
        from .text import jsonl_records

        for n, item in jsonl_records(meta):
            caption = next((item[k] for k in ("text", "caption", "prompt") if isinstance(item.get(k), str)), None)
            if "file_name" not in item or caption is None:
                raise ConfigError(f"{meta}:{n}: needs 'file_name' and a 'text' (or caption/prompt) field")
            img = folder / item["file_name"]
            if not img.is_file():
                raise ConfigError(f"{meta}:{n}: {img} does not exist")
            pairs.append((img, caption))
    else:
        for img in sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES):
            txt = img.with_suffix(".txt")
            if not txt.is_file():
                raise ConfigError(f"{img} has no caption: add {txt.name} or a metadata.jsonl (file_name, text)")
            pairs.append((img, txt.read_text(encoding="utf-8").strip()))
    if not pairs:
        raise ConfigError(f"real_images {folder}: no captioned images")
    return pairs


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
    return Path(os.environ.get("ONESTEP_CACHE") or Path.home() / ".cache" / "onestep") / "latents"


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


def _shard_name(i: int) -> str:
    return f"shard-{i:05d}.safetensors"


def _write_atomically(path: Path, write) -> None:
    """``write(tmp)`` then rename onto ``path``: readers see a whole file or none, whatever the
    number of processes writing it."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _complete_shard(path: Path, start: int, count: int) -> bool:
    """Whether ``path`` is a shard of this cache holding images ``start .. start + count - 1``."""
    from safetensors import safe_open

    if not path.is_file():
        return False
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            return meta.get("start") == str(start) and f.get_slice("latents").get_shape()[0] == count
    except Exception:  # a foreign or damaged file: encode this shard again
        return False


def _read_latent_cache(folder: Path) -> torch.Tensor | None:
    """The latents of a complete cache folder (its ``index.json`` names every shard), else None."""
    from safetensors import safe_open

    index_file = folder / "index.json"
    if not index_file.is_file():
        return None
    try:
        index = json.loads(index_file.read_text())
        parts = []
        for name in index["shards"]:
            with safe_open(str(folder / name), framework="pt") as f:
                parts.append(f.get_tensor("latents"))
        latents = torch.cat(parts)
    except (OSError, KeyError, ValueError, RuntimeError) as e:
        _log(f"latent cache {folder} is unreadable ({e}); encoding again")
        return None
    return latents if len(latents) == index.get("images") else None


def _encode_shards(pairs: list[tuple[Path, str]], vae: LatentVAE, size: int, folder: Path, device, batch_size: int,
                   shard_size: int, show_progress: bool) -> None:
    """Write every missing shard of ``folder``, then ``index.json`` (last: it marks the cache complete)."""
    from safetensors.torch import save_file
    from tqdm.auto import tqdm

    folder.mkdir(parents=True, exist_ok=True)
    starts = list(range(0, len(pairs), shard_size))
    todo = [i for i, s in enumerate(starts) if not _complete_shard(folder / _shard_name(i), s, len(pairs[s : s + shard_size]))]
    if len(todo) < len(starts):
        _log(f"latent cache {folder}: {len(starts) - len(todo)} of {len(starts)} shards already on disk, resuming")
    if todo:
        vae = vae.to(device)
        dtype = next(vae.parameters()).dtype
    bar = tqdm(total=sum(len(pairs[starts[i] : starts[i] + shard_size]) for i in todo), desc="VAE latents", unit="img",
               disable=None if show_progress else True)
    for i in todo:
        chunk = pairs[starts[i] : starts[i] + shard_size]
        outs = []
        for j in range(0, len(chunk), batch_size):
            x = torch.stack([load_image(p, size) for p, _ in chunk[j : j + batch_size]]).to(device, dtype)
            outs.append(vae.encode(x).float().cpu())
            bar.update(len(x))
        latents = torch.cat(outs).contiguous()
        meta = {"start": str(starts[i]), "images": str(len(chunk)), "size": str(size)}
        _write_atomically(folder / _shard_name(i), lambda tmp: save_file({"latents": latents}, str(tmp), metadata=meta))
    bar.close()
    index = {
        "format": LATENT_CACHE_FORMAT,
        "images": len(pairs),
        "shard_size": shard_size,
        "shards": [_shard_name(i) for i in range(len(starts))],
        "size": size,
        "first_image": str(pairs[0][0].resolve()),
        "last_image": str(pairs[-1][0].resolve()),
        "key": folder.name,
    }
    _write_atomically(folder / "index.json", lambda tmp: tmp.write_text(json.dumps(index, indent=2) + "\n"))


def encode_image_folder(
    pairs: list[tuple[Path, str]],
    vae: LatentVAE,
    size: int,
    device: torch.device | str = "cpu",
    batch_size: int = 8,
    shard_size: int = LATENT_SHARD_SIZE,
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
    """
    from accelerate.state import PartialState, is_initialized

    if shard_size < 1:
        raise ConfigError(f"shard_size must be at least 1 (got {shard_size})")
    folder = latent_cache_dir() / latent_cache_key(pairs, vae, size)
    state = PartialState() if is_initialized() else None
    together = state is not None and state.num_processes > 1
    latents = None
    if not together or state.is_main_process:
        latents = _read_latent_cache(folder)
        if latents is None:
            _encode_shards(pairs, vae, size, folder, device, batch_size, shard_size, show_progress=True)
            _log(f"cached VAE latents of {len(pairs)} images in {folder}")
    if together:
        state.wait_for_everyone()  # every process passes here, cache found or not: no rank leaves early
    if latents is None:
        latents = _read_latent_cache(folder)
    if latents is None:
        raise ConfigError(f"the latent cache {folder} is incomplete after encoding; is the disk full? Delete the folder and run again")
    return latents


def _log(msg: str) -> None:
    """Log through accelerate's logger (main process only), or plain logging before accelerate starts."""
    try:
        logger.info(msg)
    except RuntimeError:  # no accelerate state yet (a teacher loaded outside a trainer)
        import logging

        logging.getLogger(__name__).info(msg)


def image_folder_data(
    folder: str | Path, conditioning: TextConditioning, vae: LatentVAE, size: int, device="cpu", shard_size: int = LATENT_SHARD_SIZE
):
    """A real-data sampler ``(n, generator) -> (latents, caption embeddings)`` over a captioned folder
    (latents cached on disk by :func:`encode_image_folder`, ``shard_size`` images a shard)."""
    pairs = read_image_captions(folder)
    latents = encode_image_folder(pairs, vae, size, device, shard_size=shard_size)
    captions = conditioning.encode([c for _, c in pairs])

    def draw(n: int, generator: torch.Generator):
        idx = torch.randint(0, len(latents), (n,), generator=generator)
        return latents[idx], index_cond(captions, idx)

    return draw


# ---------------------------------------------------------------------- student folders


def student_scheduler(meta: dict[str, Any]):
    """An ``LCMScheduler`` whose ``set_timesteps(K)`` gives the student's own timesteps for its K
    (``len(timesteps)``) and whose step is the student's: x0 from the prediction, re-noised with
    fresh noise to the next timestep, the last x0 returned. ``timestep_scaling`` is large enough
    that LCM's boundary scalings are exactly ``c_skip = 0``, ``c_out = 1`` in float32.

    For flow-matching (SD3) students, a ``FlowMatchEulerDiscreteScheduler`` with
    ``stochastic_sampling`` (see :func:`onestep.teachers.sd3.student_scheduler_config`)."""
    from diffusers import LCMScheduler

    from ..schedule import FLOW_SCHEDULERS, NoiseSchedule

    if meta["schedule"].get("_class_name") in FLOW_SCHEDULERS:
        from diffusers import FlowMatchEulerDiscreteScheduler

        from .sd3 import student_scheduler_config

        return FlowMatchEulerDiscreteScheduler(**student_scheduler_config(meta))
    schedule = dict(meta["schedule"])
    T = NoiseSchedule.from_scheduler_config(schedule).num_train_timesteps
    ts = [int(t) for t in meta["timesteps"]]
    original = _lcm_original_steps(ts, T)
    keys = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas", "rescale_betas_zero_snr")
    return LCMScheduler(
        **{k: schedule[k] for k in keys if schedule.get(k) is not None},
        original_inference_steps=original or len(ts),
        timestep_scaling=1e7,
        prediction_type=meta["prediction_type"],
        clip_sample=False,
        set_alpha_to_one=True,
        steps_offset=1,  # unused by LCMScheduler; 1 keeps the SD pipelines from warning about an old config
    )


def _lcm_original_steps(timesteps: list[int], T: int) -> int | None:
    """LCMScheduler's ``original_inference_steps`` N for which ``set_timesteps(K)`` picks exactly these
    timesteps (None when no N does: pass ``timesteps=`` to the pipeline then)."""
    import numpy as np

    k = len(timesteps)
    for n in [k, timesteps[0] + 1] + list(range(k, min(T, 1000) + 1)):
        if not k <= n <= T:
            continue
        step = T // n
        origin = (np.arange(1, n + 1) * step - 1)[::-1]
        idx = np.floor(np.linspace(0, n, num=k, endpoint=False)).astype(np.int64)
        if [int(t) for t in origin[idx]] == list(timesteps):
            return n
    return None


def write_pipeline_parts(out: Path, teacher, meta: dict[str, Any], generator_subfolder: str = "unet") -> None:
    """Make the student folder a diffusers pipeline: copy VAE, text encoder(s) and tokenizer(s) from
    the teacher's folder, add a scheduler for the student's timesteps (unless one is there) and
    ``model_index.json``, and the student network once more as a single file:
    ``student_unet.safetensors`` (SD / SDXL) or ``student_transformer.safetensors`` (SD3)."""
    from .sd3 import is_sd3, sd3_parts

    src = Path(teacher.meta["pipeline_folder"])
    index = read_model_index(src)
    if is_sd3(index):
        model, model_class, all_parts = "transformer", "SD3Transformer2DModel", sd3_parts(src, index)
    else:
        model, model_class, all_parts = "unet", "UNet2DConditionModel", SDXL_PARTS if is_sdxl(index) else SD_PARTS
    if generator_subfolder != model:
        raise ValueError(f"the student {model_class} must sit in {model}/ for diffusers to find it")
    parts = [p for p in all_parts if p not in (model, "scheduler")]
    for part in parts:
        shutil.copytree(src / part, out / part, dirs_exist_ok=True, ignore=shutil.ignore_patterns(*[f"*{s}" for s in _pickles()]))
    scheduler_dir = out / "scheduler"
    if not (scheduler_dir / "scheduler_config.json").is_file():
        student_scheduler(meta).save_pretrained(scheduler_dir)
    sched_cls = json.loads((scheduler_dir / "scheduler_config.json").read_text())["_class_name"]
    new_index = {k: v for k, v in index.items() if k.startswith("_") or not isinstance(v, list)}
    for part in parts:
        new_index[part] = index[part]
    for optional in ("safety_checker", "feature_extractor", "image_encoder", "text_encoder_3", "tokenizer_3"):
        if optional in index and optional not in parts:
            new_index[optional] = [None, None]
    if "requires_safety_checker" in index:
        new_index["requires_safety_checker"] = False
    new_index[model] = ["diffusers", model_class]
    new_index["scheduler"] = ["diffusers", sched_cls]
    (out / "model_index.json").write_text(json.dumps(new_index, indent=2, sort_keys=True) + "\n")
    weights = sorted((out / generator_subfolder).glob("*.safetensors"))
    single = out / f"student_{model}.safetensors"
    if len(weights) == 1:
        shutil.copyfile(weights[0], single)
    else:  # sharded: gather into one file
        from safetensors.torch import load_file, save_file

        state: dict[str, torch.Tensor] = {}
        for w in weights:
            state.update(load_file(str(w)))
        save_file(state, str(single))


def _pickles() -> tuple[str, ...]:
    from . import PICKLE_SUFFIXES

    return PICKLE_SUFFIXES


def student_text_parts(path: Path, meta: dict[str, Any], device: torch.device | str = "cpu") -> tuple[TextConditioning, LatentVAE]:
    """The text conditioning and VAE of a text-to-image student folder (its own copies of the teacher's parts)."""
    from diffusers import AutoencoderKL

    cm = meta["conditioning"]
    n = int(cm.get("text_encoders") or 1)
    family = cm.get("family") or ("sdxl" if n == 2 else "sd")
    for part in ("vae", "text_encoder", "tokenizer") + tuple(x for i in range(2, n + 1) for x in (f"text_encoder_{i}", f"tokenizer_{i}")):
        if not (path / part).is_dir():
            from ..errors import StudentFormatError

            raise StudentFormatError(f"{path}: a text-to-image student needs {part}/ (copied from the teacher at export)")
    size = cm.get("image_size") or [meta["sample_shape"][1] * 8] * 2
    if family == "sd3":
        from .sd3 import T5_MAX_LENGTH, SD3PromptEncoder

        encoder = SD3PromptEncoder(
            path, tuple(size), cm["joint_attention_dim"], t5=n == 3,
            max_sequence_length=cm.get("max_sequence_length", T5_MAX_LENGTH), device=device,
        )
    else:
        encoder = PromptEncoder(path, family == "sdxl", tuple(size), device=device)
    conditioning = TextConditioning(
        encoder=encoder,
        validation_prompts=list(cm.get("validation_prompts") or DEFAULT_VALIDATION_PROMPTS),
        negative_prompt=cm.get("negative_prompt"),
        zero_empty_prompt=bool(cm.get("zero_empty_prompt", False)),
    )
    vae = LatentVAE(AutoencoderKL.from_pretrained(path / "vae", use_safetensors=True)).to(device)
    return conditioning, vae


__all__ = [
    "DEFAULT_VALIDATION_PROMPTS",
    "LatentVAE",
    "PromptEncoder",
    "TextConditioning",
    "image_folder_data",
    "load_text_to_image_teacher",
    "read_image_captions",
    "student_scheduler",
    "student_text_parts",
    "write_pipeline_parts",
]
