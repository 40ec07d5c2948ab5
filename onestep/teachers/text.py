"""Text for text-to-image teachers: prompt sets (read by :mod:`onestep.prompts`), the prompt encoders of the
SD / SDXL pipelines and the cached text conditioning built on them.

Conditioning (:class:`TextConditioning`) is a dict of tensors per sample, exactly what the UNet
takes: ``encoder_hidden_states`` (SD), plus ``text_embeds`` (pooled) and ``time_ids`` (SDXL,
``[H, W, 0, 0, H, W]`` in pixels). Prompts are encoded as the diffusers pipelines encode them
(SD: the last hidden state; SDXL: the penultimate hidden states of both encoders, concatenated,
and the second encoder's projection), so a student exported as a pipeline folder gives the same
images in plain diffusers. The prompt set is encoded once (the text encoders are frozen) into an
on-disk cache (:mod:`onestep.teachers.prompt_cache`), not held in memory: a batch reads its rows.
The unconditional branch of guidance is the negative prompt's embedding when a config gives one,
else the empty prompt's (zeros for SDXL folders with ``force_zeros_for_empty_prompt``, as the SDXL
pipeline does). The SD3 encoder (:class:`onestep.teachers.sd3.SD3PromptEncoder`) builds on
:class:`PromptEncoder`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from ..conditioning import Cond, Conditioning, cond_to
from ..errors import ConfigError, TeacherError
from ..precision import store_small_compute_float32
from ..prompts import CAPTION_COLUMNS, jsonl_records, prompt_set, read_prompts
from .base import dtype_option
from .prompt_cache import PROMPT_SHARD_SIZE, cached_prompt_table

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

# ----------------------------------------------------------------------- prompt encoding


class PromptEncoder:
    """Encodes prompts as the diffusers SD / SDXL pipelines do; loads its text encoders lazily.

    Args:
        folder: the pipeline folder (``text_encoder/``, ``tokenizer/``, SDXL: ``*_2/`` too).
        xl: SDXL-style (two encoders, pooled embeddings and time ids).
        size: image size ``(H, W)`` in pixels (SDXL time ids).
        device: where the encoders run.
        dtype: what the encoders' weights load in (a run's frozen dtype: SD3's T5-XXL is 19 GB in
            float32, 9.5 in bf16); embeddings are returned in float32 whatever it is.
        compute: ``"storage"`` (compute in ``dtype``) or ``"float32"`` (Linear weights kept in ``dtype``,
            upcast as they run: :mod:`onestep.precision`, for CPUs without bf16 units).
    """

    def __init__(
        self, folder: str | Path, xl: bool, size: tuple[int, int], device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
        compute: str = "storage",
    ):
        self.folder = Path(folder)
        self.xl = xl
        self.size = (int(size[0]), int(size[1]))
        self.device = torch.device(device)
        self.dtype = dtype
        self.compute = compute if dtype != torch.float32 else "storage"
        self._parts: list[tuple[Any, nn.Module]] | None = None

    #: the tensor every row of a prompt cache of this encoder holds
    row_key = "encoder_hidden_states"

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
                    enc = enc_cls.from_pretrained(self.folder / enc_name, use_safetensors=True, **dtype_option(self.dtype))
                except (OSError, ValueError) as e:
                    raise TeacherError(f"{self.folder}: cannot load {enc_name}/ and {tok_name}/ ({e})") from e
                if self.compute == "float32":
                    store_small_compute_float32(enc, self.dtype)
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
        """What a student folder records to rebuild this encoder (:func:`onestep.pipeline.student_text_parts`)."""
        return {"text_encoders": self.text_encoders, "family": self.family}

    def cache_identity(self) -> dict[str, Any]:
        """What names this encoder in a prompt cache's key (:mod:`onestep.teachers.prompt_cache`): its
        class, :meth:`describe`, the image size, and the names, sizes and modification times of the
        files in its tokenizer and text encoder folders (not the folder's path: a moved folder keeps
        its cache; a copied one, with new modification times, encodes again)."""
        files = []
        for tok_name, enc_name, _, _ in self._components():
            for part in (tok_name, enc_name):
                for f in sorted((self.folder / part).rglob("*")):
                    if f.is_file():
                        st = f.stat()
                        files.append([f.relative_to(self.folder).as_posix(), st.st_size, st.st_mtime_ns])
        identity = {"class": type(self).__name__, **self.describe(), "size": list(self.size), "files": files}
        if self.dtype != torch.float32:  # (float32 encoders keep the keys caches had before this field)
            identity["encoder_dtype"] = str(self.dtype).removeprefix("torch.")
            if self.compute == "float32":
                identity["encoder_compute"] = "float32"
        return identity

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
        cache_embeddings: encode the whole prompt set once into the on-disk cache (True) or each batch anew.
        zero_empty_prompt: the empty prompt's embedding is zeros (SDXL ``force_zeros_for_empty_prompt``).
        cache_dtype: storage dtype of the on-disk cache (None: float32; conditions come back float32).
        cache_shard_size: prompts per shard of the on-disk cache.
    """

    kind: str = "text"
    encoder: PromptEncoder | None = field(default=None, repr=False)
    prompts: list[str] = field(default_factory=list, repr=False)
    validation_prompts: list[str] = field(default_factory=list)
    negative_prompt: str | None = None
    cache_embeddings: bool = True
    zero_empty_prompt: bool = False
    cache_dtype: torch.dtype | str | None = None
    cache_shard_size: int = PROMPT_SHARD_SIZE

    def __post_init__(self):
        super().__post_init__()
        self.num_classes = len(self.validation_prompts)
        self._known: dict[str, dict[str, torch.Tensor]] = {}  # the fixed prompts (and new ones asked for)
        self._train: Callable[[torch.Tensor], Cond] | None = None  # the training prompts' table

    @property
    def guidable(self) -> bool:
        return True

    # ------------------------------------------------------------ encoding
    def encode(self, prompts: list[str], remember: bool = True) -> dict[str, torch.Tensor]:
        """Embeddings of ``prompts`` (float32, CPU); prompts seen before come from memory, new ones
        are encoded (and kept in memory when ``remember``)."""
        new = sorted({p for p in prompts if p not in self._known and not (p == "" and self.zero_empty_prompt)})
        fresh: dict[str, dict[str, torch.Tensor]] = {}
        if new:
            if self.encoder is None:
                raise ConfigError("this text conditioning has no text encoder; only its cached prompts can be used")
            enc = self.encoder.encode(new)
            fresh = {p: {k: v[i : i + 1] for k, v in enc.items()} for i, p in enumerate(new)}
            if remember:
                self._known.update(fresh)
        rows = [self._empty_row() if (p == "" and self.zero_empty_prompt) else fresh.get(p) or self._known[p] for p in prompts]
        return {k: torch.cat([r[k] for r in rows]) for k in rows[0]}

    def _empty_row(self) -> dict[str, torch.Tensor]:
        if not self.zero_empty_prompt:
            return self.encode([""])
        if "\0zeros" not in self._known:  # zeros shaped as any row (time ids kept: they are the image size)
            like = next(iter(self._known.values()), None)
            if like is None and self.encoder is None:
                raise ConfigError("no text encoder to size the zero embedding")
            like = like if like is not None else self.encoder.encode(["_"])
            self._known["\0zeros"] = {k: (v if k == "time_ids" else torch.zeros_like(v)) for k, v in like.items()}
        return self._known["\0zeros"]

    def prompt_table(self, prompts: list[str]) -> Callable[[torch.Tensor], Cond]:
        """``table(idx)``: the condition of ``prompts[i]`` for each ``i`` of the tensor ``idx``.

        With ``cache_embeddings`` the prompts are encoded once into the on-disk cache of
        :mod:`onestep.teachers.prompt_cache` (deduplicated, resumable; a complete cache loads
        without the text encoders) and a batch reads only its rows; otherwise each batch is encoded
        anew and nothing is kept."""
        if not self.cache_embeddings:
            return lambda idx: self.encode([prompts[i] for i in idx.tolist()], remember=False)
        if self.encoder is None:
            raise ConfigError("this text conditioning has no text encoder to key its prompt cache with")
        identity = {**self.encoder.cache_identity(), "zero_empty_prompt": self.zero_empty_prompt}
        return cached_prompt_table(prompts, lambda batch: self.encode(batch, remember=False), identity, self.cache_dtype,
                                   shard_size=self.cache_shard_size, row_key=self.encoder.row_key)

    def prepare(self) -> "TextConditioning":
        """Encode the empty / negative prompt, the validation prompts and (when caching) the prompt
        set now. With ``cache_embeddings`` both go through the on-disk cache (:meth:`prompt_table`),
        the few fixed prompts are then held in memory, and the text encoders are freed (they load
        again only if a new prompt comes)."""
        fixed = list(dict.fromkeys([self.negative_prompt or "", "", *self.validation_prompts]))
        if not self.cache_embeddings:
            self._empty_row()
            self.encode(fixed)
            return self
        table = self.prompt_table(fixed)(torch.arange(len(fixed)))
        self._known.update({p: {k: v[i : i + 1] for k, v in table.items()} for i, p in enumerate(fixed)})
        self._empty_row()
        if self.prompts:
            self._train = self.prompt_table(self.prompts)
        if self.encoder is not None:
            self.encoder.release()
        return self

    # ---------------------------------------------------- Conditioning API
    def sample(self, n: int, generator: torch.Generator | None = None, device="cpu") -> Cond:
        return self.sample_prompts(n, generator, device)[0]

    def sample_prompts(self, n: int, generator: torch.Generator | None = None, device="cpu") -> tuple[Cond, list[str]]:
        """:meth:`sample` and the prompts it drew (the same draw: one random stream for both)."""
        if not self.prompts:
            raise ConfigError(
                "a text-to-image teacher needs training prompts: set prompts: to a text file (one a line), JSONL, "
                "JSON (COCO captions), CSV, parquet or a Hugging Face datasets folder (caption/prompt/text column)"
            )
        idx = torch.randint(0, len(self.prompts), (n,), generator=generator)
        prompts = [self.prompts[i] for i in idx.tolist()]
        if self._train is not None:
            return cond_to(self._train(idx), device), prompts
        return cond_to(self.encode(prompts, remember=False), device), prompts

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


def text_conditioning(
    encoder: PromptEncoder,
    prompts: str | list[str] | None,
    validation_prompts: str | list[str] | None,
    negative_prompt: str | None,
    cache_embeddings: bool,
    zero_empty_prompt: bool = False,
    cache_dtype: torch.dtype | str | None = None,
    prompt_column: str | None = None,
) -> TextConditioning:
    """The teacher's :class:`TextConditioning` from the loaders' prompt options (files, folders or lists,
    :func:`onestep.prompts.prompt_set`; ``prompt_column`` names the column of the ``prompts`` table);
    ``cache_dtype`` is the storage dtype of the on-disk prompt cache (None: float32)."""
    return TextConditioning(
        encoder=encoder,
        prompts=prompt_set(prompts, "prompts", prompt_column) if prompts is not None else [],
        validation_prompts=prompt_set(validation_prompts, "validation_prompts") if validation_prompts else list(DEFAULT_VALIDATION_PROMPTS),
        negative_prompt=negative_prompt or None,
        cache_embeddings=cache_embeddings,
        zero_empty_prompt=zero_empty_prompt,
        cache_dtype=cache_dtype,
    )


__all__ = [
    "CAPTION_COLUMNS",
    "DEFAULT_VALIDATION_PROMPTS",
    "PromptEncoder",
    "TextConditioning",
    "jsonl_records",
    "read_prompts",
    "text_conditioning",
]
