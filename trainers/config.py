"""The settings every method shares: :class:`DistillConfig`.

A method's config subclasses it (``DMD2Config(DistillConfig)``) beside its trainer, trl style.
Every field has a help string (``onestep train <preset> --show-config``) and is validated in
``__post_init__``; YAML presets and ``--key value`` overrides fill it (:mod:`onestep.config`).
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass

import torch

from onestep.config import config_field
from onestep.errors import ConfigError
from onestep.export_variants import EXPORT_VARIANTS
from onestep.lora import LORA_TARGET_SETS
from onestep.teachers import Teacher, load_teacher
from onestep.weights import weights_file

from .memory import FROZEN_COMPUTE
from .tracking import check_log_with, eval_clip_folder, eval_metric_of

MIXED_PRECISION = ("no", "fp16", "bf16")
#: see DistillConfig.fake_loss_weighting
FAKE_LOSS_WEIGHTINGS = ("native", "snr+1")
#: Fields that were renamed: an old YAML key gets a message naming the new one.
RENAMED_FIELDS = {
    "dm_t_min": "loss_t_range",
    "dm_t_max": "loss_t_range",
    "vsd_t_min": "loss_t_range",
    "vsd_t_max": "loss_t_range",
    "sid_t_min": "loss_t_range",
    "sid_t_max": "loss_t_range",
}

#: diffusers' and trl's names for fields, accepted as they are (``--checkpointing_steps 500``).
ALIASES = {
    "resume_from_checkpoint": "resume",
    "report_to": "log_with",
    "checkpointing_steps": "checkpoint_every",
    "checkpoints_total_limit": "checkpoint_total_limit",
    "validation_steps": "preview_every",
    "num_train_steps": "max_steps",
    "max_train_steps": "max_steps",
    "train_batch_size": "batch_size",
    "per_device_train_batch_size": "batch_size",
}


@dataclass
class DistillConfig:
    """Settings every method shares. Every field can be set in YAML or as ``--key value``."""

    #: The fake scores this method can train with (a class attribute, not a field).
    FAKE_SCORES = ("copy", "lora")

    method: str = config_field("training method: dmd2, vsd, fdistill, sid, consistency, disback-<base> (see onestep train --list-presets)", "dmd2")
    teacher: str = config_field(
        "built-in teacher (digits, gmm-ring8, gmm-ring8-unbalanced, gmm-grid25), a local diffusers pipeline folder, "
        "or a Hugging Face Hub id (owner/name) with allow_hub",
        "digits",
    )
    allow_hub: bool = config_field(
        "let a teacher given as a Hub id (owner/name) load through huggingface_hub: safetensors, configs and tokenizers "
        "only, into the HF cache; a cached copy loads offline (HF_HUB_OFFLINE=1). Also on with ONESTEP_ALLOW_HUB=1",
        False,
    )
    output_dir: str | None = config_field("run folder (default runs/<config name>); the student lands in <output_dir>/student")
    seed: int = config_field("seed for initialisation, noise and data order; the same seed repeats a run", 0)
    max_steps: int = config_field("training iterations; each updates the fake score, the generator every fake_updates_per_generator-th", 1000)
    batch_size: int = config_field("samples per process per micro-batch", 32)
    gradient_accumulation_steps: int = config_field(
        "micro-batches of batch_size accumulated into every update, the generator's and the fake score's alike "
        "(their mean gradient): the effective batch is batch_size x this x processes. fake_updates_per_generator "
        "and max_steps count updates, not micro-batches",
        1,
    )
    fake_score: str = config_field("fake score as a full 'copy' of the teacher or 'lora' adapters on the teacher's own weights", "copy")
    lora_rank: int = config_field("LoRA rank when fake_score is 'lora'", 16)
    lora_alpha: float | None = config_field("LoRA alpha (default: the rank)")
    lora_targets: str | list[str] = config_field(
        "layers the LoRA fake score adapts: 'attention' (the attention projections to_q, to_k, to_v, to_out.0, as "
        "SwiftBrush / SNOOPI tune them), 'all' (every Linear and Conv2d; SD3: attention and feed-forward layers "
        "of the blocks) or a list of layer-name suffixes, e.g. [to_q, to_v]",
        "attention",
    )
    generator_lora_rank: int = config_field(
        "0: train the whole generator; > 0: train LoRA adapters of this rank on it (merged into the exported weights)", 0
    )
    generator_lora_alpha: float | None = config_field("LoRA alpha of the generator adapters (default: their rank)")
    generator_lora_targets: str | list[str] = config_field(
        "layers the generator's LoRA adapts: 'all' (as the DMD2 and LCM LoRAs), 'attention' or layer-name suffixes", "all"
    )
    lr_generator: float = config_field("AdamW learning rate of the generator", 1e-5)
    lr_fake: float = config_field("AdamW learning rate of the fake score (and heads)", 1e-5)
    adam_beta1: float = config_field("AdamW beta1", 0.9)
    adam_beta2: float = config_field("AdamW beta2", 0.999)
    weight_decay: float = config_field("AdamW weight decay", 0.01)
    fused_adam: bool = config_field(
        "AdamW's fused kernel (one kernel over every tensor instead of a Python loop with a .item() per tensor; "
        "3.6x faster updates on the digits UNet on CPU); off under FSDP, where the sharded loop keeps the default", True
    )
    warmup_steps: int = config_field("linear learning-rate warm-up, in optimizer steps of each network", 0)
    max_grad_norm: float = config_field("gradient clipping norm (0 disables)", 10.0)
    max_nonfinite_updates: int = config_field(
        "an update whose gradients are not finite is skipped (and counted in the logs as nonfinite/skipped); "
        "this many in a row stop the run, naming the step and the last good checkpoint",
        10,
    )
    mixed_precision: str | None = config_field(
        "'no', 'fp16' or 'bf16' (bf16 recommended on GPU; fp16 diverges for DMD2); unset: the launcher's choice "
        "(accelerate launch --mixed_precision or its config file; 'no' without a launcher). A value that contradicts "
        "a launcher asking for fp16 or bf16 is an error; the run folder's config.json records what ran"
    )
    fsdp: bool = config_field(
        "shard the generator, fake score, teacher and heads across processes (FSDP2, one unit per block): "
        "on by itself under accelerate's FSDP config (configs/accelerate/fsdp.yaml); set it to shard under a "
        "plain multi-process launch (CPU/gloo)",
        False,
    )
    fake_updates_per_generator: int = config_field("two time-scale ratio: fake-score updates per generator update", 5)
    ema_decay: float = config_field("EMA decay of the generator (0 disables; the export uses the EMA weights when on)", 0.0)
    generator_timesteps: list[int] = config_field(
        "timestep labels the generator is evaluated at: one entry for a one-step student, K for K steps "
        "(first entry: the label of pure-noise input)",
        factory=lambda: [999],
    )
    guidance_scale: float = config_field("CFG scale of the teacher (real score) during training; 1 = no guidance", 1.0)
    loss_t_range: list[float] = config_field(
        "[low, high]: the noise levels of the generator's loss (distribution matching, VSD, SiD) are drawn as "
        "t ~ U{low T .. high T}, fractions of the schedule's T",
        factory=lambda: [0.02, 0.98],
    )
    fake_loss_weighting: str = config_field(
        "weighting of the fake score's denoising loss over noise levels: 'native' (MSE in the backbone's own "
        "prediction space: eps-MSE weighs the x0 error by SNR_t and leaves the x0 predictions at high noise "
        "almost untrained) or 'snr+1' (the x0 error weighed by SNR_t + 1, v-prediction MSE, at the noise levels "
        "the generator's loss reads, t <= loss_t_range[1] T; SNR_t above them, where x0 is not resolvable)",
        "native",
    )
    regression_warmup_steps: int = config_field("iterations of warm start by regression onto teacher ODE samples (0 disables)", 0)
    lr_regression: float | None = config_field(
        "learning rate of the generator during the regression warm start (unset: lr_generator); plain regression "
        "takes a larger step than distribution matching does", None
    )
    regression_pairs: int = config_field("noise/sample pairs drawn from the teacher's ODE for the warm start", 2048)
    regression_ode_steps: int = config_field("DDIM steps of the teacher ODE for the warm-start pairs", 50)
    checkpoint_every: int = config_field("save a checkpoint-{step} folder every N iterations (0: only at the end)", 0)
    checkpoint_total_limit: int = config_field("keep at most this many checkpoints (0: keep all)", 2)
    resume: str | None = config_field(
        "'latest' or a checkpoint folder to resume from; 'latest' starts a new run when there is no checkpoint yet"
    )
    overwrite: bool = config_field(
        "start over in an output_dir that holds another run (its checkpoints, student, previews, logs and "
        "config.json are removed first); without it, or resume, such a folder is refused and nothing is touched",
        False,
    )
    init_generator: str | None = config_field(
        "start the generator from these weights instead of the teacher's: a student folder or a .safetensors "
        "file of the generator network (loaded strictly)"
    )
    init_fake_score: str | None = config_field(
        "start the fake score from a .safetensors file of its trainable weights (as DisBack nodes and "
        "save_trainable write them; loaded strictly)"
    )
    log_every: int = config_field("log losses every N iterations", 10)
    log_with: str = config_field(
        "tracker: any accelerate supports (tensorboard, wandb, comet_ml, mlflow, aim, clearml, dvclive, swanlab, trackio; "
        "its package installed), 'all' (every installed one) or 'none'",
        "tensorboard",
    )
    preview_every: int = config_field("write a preview grid every N iterations, also logged as an image to the trackers (0 disables)", 0)
    preview_num: int = config_field("samples in a preview grid", 20)
    eval_every: int = config_field(
        "score the generator an export would hold every N iterations (0 disables): digits-FID for the digits teacher, "
        "CLIP score on the validation prompts for text-to-image teachers (needs eval_clip_model); logged as "
        "eval/digits_fid or eval/clip_score and shown on the progress bar",
        0,
    )
    eval_num_samples: int = config_field("samples each periodic evaluation draws (fixed seeds, classes or validation prompts in turn)", 300)
    eval_clip_model: str | None = config_field("local CLIP model folder for eval_every's CLIP score (default: clip_model, when the method has one)")
    export: bool = config_field("export the student to <output_dir>/student at the end", True)
    export_average_with: str | None = config_field(
        "average the exported generator with another student of the same architecture (a student folder or a "
        ".safetensors of its generator): (1 - export_average_weight) * this + export_average_weight * that. "
        "SwiftBrush v2 averages a fully trained and a LoRA-trained student 50/50"
    )
    export_average_weight: float = config_field("weight of export_average_with in the average", 0.5)
    export_variant: str = config_field(
        "'fp16' or 'bf16': also write the exported generator's weights in that dtype as a diffusers variant "
        "(unet/diffusion_pytorch_model.fp16.safetensors beside the float32 file; from_pretrained(..., variant='fp16', "
        "torch_dtype=torch.float16) loads it); 'none': float32 only",
        "none",
    )
    # Text-to-image teachers (a Stable Diffusion / SDXL pipeline folder); other teachers ignore these.
    prompts: str | None = config_field(
        "text-to-image: training prompts: a text file (one a line), JSONL, JSON (COCO captions or an array), CSV, "
        "parquet (a file or a folder; pip install pyarrow) or a Hugging Face datasets save_to_disk folder (pip install datasets)"
    )
    prompt_column: str | None = config_field(
        "text-to-image: the field / column of the prompts file holding the prompt (default: caption, prompt or text, "
        "the first present)"
    )
    validation_prompts: str | None = config_field("text-to-image: a prompt file for previews (default: a fixed list of 8 prompts)")
    negative_prompt: str | None = config_field("text-to-image: replaces the empty prompt as the unconditional branch of guidance")
    resolution: int | None = config_field("text-to-image: image side in pixels (default: the UNet's sample_size times the VAE factor)")
    num_frames: int | None = config_field("text-to-video teachers (TextToVideoSDPipeline folders): frames per clip (default 16)")
    audio_length_in_s: float | None = config_field(
        "text-to-audio teachers (AudioLDMPipeline folders): seconds per clip (default: the UNet's sample_size, as the pipeline)"
    )
    real_audio: str | None = config_field(
        "text-to-audio teachers: a folder of mono 16-bit WAV files at the vocoder's rate with captions (metadata.jsonl with "
        "file_name and text, or a .txt per file), for consistency distillation and GAN terms; latents cached as for real_images"
    )
    real_images: str | None = config_field(
        "text-to-image: a folder of images with captions (metadata.jsonl with file_name and text, or a .txt per image) "
        "for GAN terms and consistency distillation; VAE latents are cached under $ONESTEP_CACHE/latents"
    )
    cache_text_embeddings: bool = config_field("text-to-image: encode the prompt set once (frozen text encoders) instead of every batch", True)
    gradient_checkpointing: bool = config_field("recompute activations in the backward pass (diffusers UNets): less memory, ~30% slower", False)
    allow_tf32: bool = config_field("TF32 matmuls and convolutions on Ampere+ GPUs", True)
    attention: str = config_field(
        "attention kernels of the diffusers backbones: 'sdpa' (torch scaled_dot_product_attention, diffusers' default) "
        "or 'xformers' (memory-efficient attention; CUDA only, needs `pip install xformers`)",
        "sdpa",
    )
    frozen_dtype: str = config_field(
        "dtype of the frozen weights (the teacher backbone, the base weights under LoRA adapters, the VAE) and of the "
        "prompt cache's text embeddings: 'auto' "
        "(bf16 / fp16 as mixed_precision, else float32), 'float32', 'bf16' or 'fp16'; trainable weights stay float32",
        "auto",
    )
    channels_last: bool = config_field(
        "store the backbones' 4-D weights channels-last (NHWC): convolutions then run in that layout "
        "(benchmarks/speed_features.py: measure before turning it on)", False
    )
    torch_compile: bool = config_field(
        "torch.compile every backbone (generator, fake score, teacher) in place: the first steps compile (minutes on a "
        "CPU), later steps run faster; pays off on long runs (benchmarks/speed_features.py). Not with fsdp", False
    )
    frozen_compute: str = config_field(
        "what frozen weights stored in bf16 / fp16 compute in: 'storage' (their own dtype; inputs are cast to it), "
        "'float32' (each layer's weight upcast as it runs: the memory of bf16 storage at float32 speed, for CPUs "
        "without bf16 / fp16 units, where a bf16 convolution can be 100x slower) or 'auto' (float32 on such CPUs, "
        "else storage)",
        "auto",
    )

    def __post_init__(self):
        positive = (
            "max_steps", "batch_size", "fake_updates_per_generator", "regression_pairs", "regression_ode_steps", "preview_num",
            "max_nonfinite_updates", "gradient_accumulation_steps",
        )
        for name in positive:
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1 (got {getattr(self, name)})")
        for name in ("warmup_steps", "checkpoint_every", "checkpoint_total_limit", "log_every", "preview_every", "regression_warmup_steps",
                     "weight_decay", "max_grad_norm", "eval_every"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0 (got {getattr(self, name)})")
        for name in ("adam_beta1", "adam_beta2"):
            if not 0 <= getattr(self, name) < 1:
                raise ConfigError(f"{name} must lie in [0, 1) (got {getattr(self, name)})")
        for name in ("lora_alpha", "generator_lora_alpha", "resolution", "num_frames", "audio_length_in_s"):
            if getattr(self, name) is not None and getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be > 0 when set (got {getattr(self, name)})")
        for name in ("lr_generator", "lr_fake"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"{name} must be > 0 (got {getattr(self, name)})")
        if self.lr_regression is not None and not self.lr_regression > 0:
            raise ConfigError(f"lr_regression must be > 0 when set (got {self.lr_regression})")
        if not 0 <= self.ema_decay < 1:
            raise ConfigError(f"ema_decay must lie in [0, 1) (got {self.ema_decay})")
        if self.mixed_precision is not None and self.mixed_precision not in MIXED_PRECISION:
            raise ConfigError(f"mixed_precision must be one of {MIXED_PRECISION} (got {self.mixed_precision!r})")
        if self.fsdp and self.mixed_precision == "fp16":
            raise ConfigError("fsdp: fp16 needs a gradient scaler the sharded loop does not have; use mixed_precision: bf16")
        if self.fake_score not in self.FAKE_SCORES:
            raise ConfigError(f"fake_score must be one of {self.FAKE_SCORES} for {self.method} (got {self.fake_score!r})")
        check_interval("loss_t_range", self.loss_t_range, strict=True, upper=1.0)
        if not 0 <= self.export_average_weight <= 1:
            raise ConfigError(f"export_average_weight must lie in [0, 1] (got {self.export_average_weight})")
        if self.export_average_with is not None:
            weights_file(self.export_average_with)  # a clear error now, not after training
        if self.export_variant not in EXPORT_VARIANTS:
            raise ConfigError(f"export_variant must be one of {EXPORT_VARIANTS} (got {self.export_variant!r})")
        check_log_with(self.log_with)  # a tracker accelerate supports, installed
        if self.eval_num_samples < 2:
            raise ConfigError(f"eval_num_samples must be at least 2 (got {self.eval_num_samples})")
        if self.eval_every:
            eval_metric_of(self.teacher, eval_clip_folder(self))  # something to score, or a clear error now
        if not self.generator_timesteps or any(isinstance(t, bool) or not isinstance(t, int) or t < 0 for t in self.generator_timesteps):
            raise ConfigError(f"generator_timesteps must be a non-empty list of integers >= 0 (got {self.generator_timesteps})")
        if sorted(self.generator_timesteps, reverse=True) != list(self.generator_timesteps) or len(set(self.generator_timesteps)) != len(self.generator_timesteps):
            raise ConfigError(f"generator_timesteps must be strictly decreasing (got {self.generator_timesteps})")
        if self.guidance_scale < 0:
            raise ConfigError(f"guidance_scale must be >= 0 (got {self.guidance_scale})")
        if self.generator_lora_rank < 0 or self.lora_rank < 1:
            raise ConfigError(f"need lora_rank >= 1 and generator_lora_rank >= 0 (got {self.lora_rank}, {self.generator_lora_rank})")
        for name in ("lora_targets", "generator_lora_targets"):
            v = getattr(self, name)
            if not (v in LORA_TARGET_SETS or (isinstance(v, list) and v and all(isinstance(x, str) for x in v))):
                raise ConfigError(f"{name} must be one of {LORA_TARGET_SETS} or a list of layer names (got {v!r})")
        if self.fake_loss_weighting not in FAKE_LOSS_WEIGHTINGS:
            raise ConfigError(f"fake_loss_weighting must be one of {FAKE_LOSS_WEIGHTINGS} (got {self.fake_loss_weighting!r})")
        if self.attention not in ("sdpa", "xformers"):
            raise ConfigError(f"attention must be 'sdpa' or 'xformers' (got {self.attention!r})")
        if self.frozen_compute not in FROZEN_COMPUTE:
            raise ConfigError(f"frozen_compute must be one of {FROZEN_COMPUTE} (got {self.frozen_compute!r})")
        if self.frozen_dtype not in ("auto", "float32", "bf16", "fp16"):
            raise ConfigError(f"frozen_dtype must be 'auto', 'float32', 'bf16' or 'fp16' (got {self.frozen_dtype!r})")

    def teacher_options(self) -> dict:
        """Loader options a method adds to :func:`load_teacher_for`'s (none here; see TAD-SR's upscaler options)."""
        return {}


def check_interval(name: str, value: list[float], strict: bool = False, upper: float | None = None) -> None:
    """``value`` must be ``[low, high]`` with ``0 <= low <= high`` (``low < high`` when ``strict``) and
    ``high <= upper`` when given; a :class:`ConfigError` naming ``name`` otherwise."""
    ok = len(value) == 2 and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)
    if ok:
        low, high = value
        ok = 0 <= low and (low < high if strict else low <= high) and (upper is None or high <= upper)
    if not ok:
        bound = f" <= {upper:g}" if upper is not None else ""
        raise ConfigError(f"{name} must be [low, high] with 0 <= low {'<' if strict else '<='} high{bound} (got {value})")


def resolve_mixed_precision(configured: str | None) -> str | None:
    """What the trainer passes to ``Accelerator(mixed_precision=...)``: the config's value, or None (the
    launcher's choice, which accelerate reads from ``ACCELERATE_MIXED_PRECISION``) when it has none.

    ``accelerate launch`` always exports that variable, ``no`` when nobody asked for mixed precision,
    so a config value conflicts only with a launcher asking for ``fp16`` or ``bf16``."""
    launcher = os.environ.get("ACCELERATE_MIXED_PRECISION")
    if configured is not None and launcher not in (None, "", "no", configured):
        raise ConfigError(
            f"mixed_precision: the config says {configured!r} but the launcher asks for {launcher!r}; remove "
            f"mixed_precision from the config to follow the launcher, or launch with --mixed_precision {configured}"
        )
    return configured


def method_of(config_class: type[DistillConfig]) -> str:
    """The method name a config class stands for: its ``method`` field's default."""
    return next(f.default for f in dataclasses.fields(config_class) if f.name == "method")


def load_teacher_for(
    config: DistillConfig, device: torch.device | str = "cpu", text_cache_dtype: torch.dtype | None = None,
    weights_dtype: torch.dtype | None = None, text_compute: str = "storage",
) -> Teacher:
    """The teacher of ``config``, with its text-to-image options (ignored by other teachers);
    ``text_cache_dtype``: the storage dtype of the prompt cache and of the text encoders' weights
    (None: float32); ``weights_dtype``: what a text-to-image teacher's denoiser loads in (None: float32);
    ``text_compute``: what text encoders in bf16 / fp16 compute in (``"storage"`` or ``"float32"``)."""
    return load_teacher(
        config.teacher,
        allow_hub=config.allow_hub,
        prompts=config.prompts,
        prompt_column=config.prompt_column,
        validation_prompts=config.validation_prompts,
        negative_prompt=config.negative_prompt,
        resolution=config.resolution,
        num_frames=config.num_frames,
        audio_length_in_s=config.audio_length_in_s,
        real_audio=config.real_audio,
        real_images=config.real_images,
        cache_text_embeddings=config.cache_text_embeddings,
        text_cache_dtype=text_cache_dtype,
        device=device,
        **({"weights_dtype": weights_dtype} if weights_dtype not in (None, torch.float32) else {}),
        **({"text_compute": text_compute} if text_compute != "storage" else {}),
        **config.teacher_options(),
    )



def load_teacher_with_data(config: DistillConfig, teacher: Teacher | None, what: str) -> Teacher:
    """``teacher``, or :func:`load_teacher_for` ``config`` when None, refusing one without real samples: ``what``
    (e.g. "consistency distillation") noises real samples."""
    teacher = teacher if teacher is not None else load_teacher_for(config)
    if teacher.real_data is None:
        raise ConfigError(
            f"{what} noises real samples, and teacher {teacher.name} brings no data (built-in digits and gmm-* teachers "
            "do; a text-to-image teacher takes real_images, an AudioLDM one real_audio; another diffusers folder names its "
            "data in onestep_teacher.json)"
        )
    return teacher


__all__ = ["MIXED_PRECISION", "ALIASES", "RENAMED_FIELDS", "DistillConfig", "check_interval", "load_teacher_for", "load_teacher_with_data", "method_of", "resolve_mixed_precision"]
