"""The one training loop every method shares.

:class:`DistillTrainer` owns the :class:`accelerate.Accelerator`, the triad, the
optimizers (AdamW with warm-up), gradient clipping, mixed precision, the two
time-scale schedule (``fake_updates_per_generator`` fake-score updates per
generator update), the EMA of the generator, checkpoints (``accelerator.save_state``
into ``checkpoint-{step}``, ``--resume latest``), logging (``accelerator.log``,
TensorBoard by default), a tqdm bar, preview grids and the export at the end.

A method subclasses it and overrides :meth:`generator_loss` and
:meth:`fake_score_loss` (and :meth:`build_heads` when it adds networks).
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from onestep.conditioning import Cond, cond_to, index_cond
from onestep.config import config_to_dict
from onestep.denoiser import Denoiser
from onestep.errors import ConfigError
from onestep.sharding import (
    SHARDED_STATE,
    clip_grad_norm,
    fsdp_requested,
    fsdp_settings,
    full,
    gather_full,
    load_sharded_checkpoint,
    save_sharded_checkpoint,
    shard,
)
from onestep.teachers import Teacher, load_teacher
from onestep.triad import Triad

MIXED_PRECISION = ("no", "fp16", "bf16")
#: In a checkpoint folder: the generator as an export would hold it (EMA weights, LoRA merged),
#: written when those differ from the raw weights in model.safetensors.
EXPORT_WEIGHTS = "generator_export.safetensors"


def _help(text: str, default=None, factory=None):
    if factory is not None:
        return field(default_factory=factory, metadata={"help": text})
    return field(default=default, metadata={"help": text})


@dataclass
class DistillConfig:
    """Settings every method shares. Every field can be set in YAML or as ``--key value``."""

    method: str = _help("training method: dmd2, vsd, fdistill, sid, consistency, disback-<base> (see onestep train --list-presets)", "dmd2")
    teacher: str = _help("built-in teacher (digits, gmm-ring8, gmm-ring8-unbalanced, gmm-grid25) or a local diffusers pipeline folder", "digits")
    output_dir: str | None = _help("run folder (default runs/<config name>); the student lands in <output_dir>/student")
    seed: int = _help("seed for initialisation, noise and data order; the same seed repeats a run", 0)
    max_steps: int = _help("training iterations; each updates the fake score, the generator every fake_updates_per_generator-th", 1000)
    batch_size: int = _help("samples per process per iteration", 32)
    fake_score: str = _help("fake score as a full 'copy' of the teacher or 'lora' adapters on the teacher's own weights", "copy")
    lora_rank: int = _help("LoRA rank when fake_score is 'lora'", 16)
    lora_alpha: float | None = _help("LoRA alpha (default: the rank)")
    generator_lora_rank: int = _help(
        "0: train the whole generator; > 0: train LoRA adapters of this rank on it (merged into the exported weights)", 0
    )
    generator_lora_alpha: float | None = _help("LoRA alpha of the generator adapters (default: their rank)")
    lr_generator: float = _help("AdamW learning rate of the generator", 1e-5)
    lr_fake: float = _help("AdamW learning rate of the fake score (and heads)", 1e-5)
    adam_beta1: float = _help("AdamW beta1", 0.9)
    adam_beta2: float = _help("AdamW beta2", 0.999)
    weight_decay: float = _help("AdamW weight decay", 0.01)
    warmup_steps: int = _help("linear learning-rate warm-up, in optimizer steps of each network", 0)
    max_grad_norm: float = _help("gradient clipping norm (0 disables)", 10.0)
    mixed_precision: str = _help("'no', 'fp16' or 'bf16' (bf16 recommended on GPU; fp16 diverges for DMD2)", "no")
    fsdp: bool = _help(
        "shard the generator, fake score, teacher and heads across processes (FSDP2, one unit per block): "
        "on by itself under accelerate's FSDP config (configs/accelerate/fsdp.yaml); set it to shard under a "
        "plain multi-process launch (CPU/gloo)",
        False,
    )
    fake_updates_per_generator: int = _help("two time-scale ratio: fake-score updates per generator update", 5)
    ema_decay: float = _help("EMA decay of the generator (0 disables; the export uses the EMA weights when on)", 0.0)
    generator_timesteps: list[int] = _help(
        "timestep labels the generator is evaluated at: one entry for a one-step student, K for K steps "
        "(first entry: the label of pure-noise input)",
        factory=lambda: [999],
    )
    guidance_scale: float = _help("CFG scale of the teacher (real score) during training; 1 = no guidance", 1.0)
    regression_warmup_steps: int = _help("iterations of warm start by regression onto teacher ODE samples (0 disables)", 0)
    regression_pairs: int = _help("noise/sample pairs drawn from the teacher's ODE for the warm start", 2048)
    regression_ode_steps: int = _help("DDIM steps of the teacher ODE for the warm-start pairs", 50)
    checkpoint_every: int = _help("save a checkpoint-{step} folder every N iterations (0: only at the end)", 0)
    checkpoint_total_limit: int = _help("keep at most this many checkpoints (0: keep all)", 2)
    resume: str | None = _help("'latest' or a checkpoint folder to resume from")
    init_generator: str | None = _help(
        "start the generator from these weights instead of the teacher's: a student folder or a .safetensors "
        "file of the generator network (loaded strictly)"
    )
    init_fake_score: str | None = _help(
        "start the fake score from a .safetensors file of its trainable weights (as DisBack nodes and "
        "save_trainable write them; loaded strictly)"
    )
    log_every: int = _help("log losses every N iterations", 10)
    log_with: str = _help("'tensorboard' or 'none'", "tensorboard")
    preview_every: int = _help("write a preview grid every N iterations (0 disables)", 0)
    preview_num: int = _help("samples in a preview grid", 20)
    export: bool = _help("export the student to <output_dir>/student at the end", True)
    # Text-to-image teachers (a Stable Diffusion / SDXL pipeline folder); other teachers ignore these.
    prompts: str | None = _help(
        "text-to-image: training prompts, a text file (one a line), JSONL (caption/prompt/text field) or CSV (caption column)"
    )
    validation_prompts: str | None = _help("text-to-image: a prompt file for previews (default: a fixed list of 8 prompts)")
    negative_prompt: str | None = _help("text-to-image: replaces the empty prompt as the unconditional branch of guidance")
    resolution: int | None = _help("text-to-image: image side in pixels (default: the UNet's sample_size times the VAE factor)")
    real_images: str | None = _help(
        "text-to-image: a folder of images with captions (metadata.jsonl with file_name and text, or a .txt per image) "
        "for GAN terms and consistency distillation; VAE latents are cached under $ONESTEP_CACHE/latents"
    )
    cache_text_embeddings: bool = _help("text-to-image: encode the prompt set once (frozen text encoders) instead of every batch", True)
    gradient_checkpointing: bool = _help("recompute activations in the backward pass (diffusers UNets): less memory, ~30% slower", False)
    allow_tf32: bool = _help("TF32 matmuls and convolutions on Ampere+ GPUs", True)
    attention: str = _help(
        "attention kernels of the diffusers backbones: 'sdpa' (torch scaled_dot_product_attention, diffusers' default) "
        "or 'xformers' (memory-efficient attention; CUDA only, needs `pip install xformers`)",
        "sdpa",
    )
    frozen_dtype: str = _help(
        "dtype of the frozen weights (the teacher backbone, the base weights under LoRA adapters, the VAE): 'auto' "
        "(bf16 / fp16 as mixed_precision, else float32), 'float32', 'bf16' or 'fp16'; trainable weights stay float32",
        "auto",
    )

    def __post_init__(self):
        positive = ("max_steps", "batch_size", "fake_updates_per_generator", "regression_pairs", "regression_ode_steps", "preview_num")
        for name in positive:
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1 (got {getattr(self, name)})")
        for name in ("warmup_steps", "checkpoint_every", "checkpoint_total_limit", "log_every", "preview_every", "regression_warmup_steps"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0 (got {getattr(self, name)})")
        for name in ("lr_generator", "lr_fake"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"{name} must be > 0 (got {getattr(self, name)})")
        if not 0 <= self.ema_decay < 1:
            raise ConfigError(f"ema_decay must lie in [0, 1) (got {self.ema_decay})")
        if self.mixed_precision not in MIXED_PRECISION:
            raise ConfigError(f"mixed_precision must be one of {MIXED_PRECISION} (got {self.mixed_precision!r})")
        if self.fsdp and self.mixed_precision == "fp16":
            raise ConfigError("fsdp: fp16 needs a gradient scaler the sharded loop does not have; use mixed_precision: bf16")
        if self.fake_score not in ("copy", "lora"):
            raise ConfigError(f"fake_score must be 'copy' or 'lora' (got {self.fake_score!r})")
        if self.log_with not in ("tensorboard", "none"):
            raise ConfigError(f"log_with must be 'tensorboard' or 'none' (got {self.log_with!r})")
        if not self.generator_timesteps or any(not isinstance(t, int) for t in self.generator_timesteps):
            raise ConfigError("generator_timesteps must be a non-empty list of integers")
        if sorted(self.generator_timesteps, reverse=True) != list(self.generator_timesteps) or len(set(self.generator_timesteps)) != len(self.generator_timesteps):
            raise ConfigError(f"generator_timesteps must be strictly decreasing (got {self.generator_timesteps})")
        if self.guidance_scale < 0:
            raise ConfigError(f"guidance_scale must be >= 0 (got {self.guidance_scale})")
        if self.generator_lora_rank < 0 or self.lora_rank < 1:
            raise ConfigError(f"need lora_rank >= 1 and generator_lora_rank >= 0 (got {self.lora_rank}, {self.generator_lora_rank})")
        if self.attention not in ("sdpa", "xformers"):
            raise ConfigError(f"attention must be 'sdpa' or 'xformers' (got {self.attention!r})")
        if self.frozen_dtype not in ("auto", "float32", "bf16", "fp16"):
            raise ConfigError(f"frozen_dtype must be 'auto', 'float32', 'bf16' or 'fp16' (got {self.frozen_dtype!r})")


class _LoopState:
    """The step counter, saved with every checkpoint.

    The trainer's random stream is re-seeded from ``(seed, rank, step)`` at every
    iteration, so a resumed run draws exactly what an uninterrupted one would, on any
    number of processes, without storing a generator state per rank.
    """

    def __init__(self, seed: int, rank: int):
        self.step = 0
        self.seed, self.rank = seed, rank
        self.rng = torch.Generator()
        self.shared_rng = torch.Generator()  # the same on every process: for choices that change control flow
        self.reseed()

    def reseed(self) -> None:
        self.rng.manual_seed((self.seed * 1_000_003 + self.rank) * 1_000_003 + self.step)
        self.shared_rng.manual_seed((self.seed * 1_000_003 - 1) * 1_000_003 + self.step)

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step = int(state["step"])
        self.reseed()


def _warmup_lambda(warmup: int):
    return lambda step: min(1.0, (step + 1) / warmup) if warmup > 0 else 1.0


class DistillTrainer:
    """Shared loop; methods override :meth:`generator_loss` and :meth:`fake_score_loss`.

    Args:
        config: the method's config dataclass.
        teacher: an already loaded teacher (default: ``load_teacher(config.teacher)``).
    """

    method_name = "base"
    uses_real_data = False
    #: make_batch adds ``batch["prompts"]``, the prompt of each sample (text-to-image teachers only)
    wants_prompts = False

    def __init__(self, config: DistillConfig, teacher: Teacher | None = None):
        from accelerate import Accelerator
        from accelerate.utils import ProjectConfiguration, set_seed

        self.config = c = config
        if c.output_dir is None:
            raise ConfigError("output_dir is not set")
        self.output_dir = Path(c.output_dir)
        self.accelerator = Accelerator(
            mixed_precision=c.mixed_precision,
            log_with=None if c.log_with == "none" else c.log_with,
            project_config=ProjectConfiguration(project_dir=str(self.output_dir), logging_dir=str(self.output_dir / "logs")),
        )
        acc = self.accelerator
        set_seed(c.seed)  # identical initialisation on every process
        if c.allow_tf32 and torch.cuda.is_available():
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        self.teacher_spec = teacher if teacher is not None else load_teacher_for(c, acc.device)
        T = self.teacher_spec.schedule.num_train_timesteps
        if max(c.generator_timesteps) >= T or min(c.generator_timesteps) < 0:
            raise ConfigError(f"generator_timesteps must lie in [0, {T - 1}] for this teacher (got {c.generator_timesteps})")
        self.triad = Triad(self.teacher_spec, fake_score=c.fake_score, lora_rank=c.lora_rank, lora_alpha=c.lora_alpha)
        self.schedule = self.triad.schedule
        self.conditioning = self.triad.conditioning
        if c.generator_lora_rank:
            add_lora(self.triad.generator.backbone, c.generator_lora_rank, c.generator_lora_alpha, "generator")
        if c.gradient_checkpointing:
            for net in (self.triad.generator.backbone, self.triad.fake.backbone):
                if not hasattr(net, "enable_gradient_checkpointing"):
                    raise ConfigError(f"gradient_checkpointing: {type(net).__name__} does not support it (diffusers models do)")
                net.enable_gradient_checkpointing()
        # attention kernels and the dtype of frozen weights (onestep/memory.py)
        from onestep.memory import apply_memory_switches

        apply_memory_switches(self)
        if c.init_generator:
            load_trainable(self.triad.generator.backbone, _weights_file(c.init_generator), "init_generator")
        if c.init_fake_score:
            load_trainable(self.triad.fake.backbone, _weights_file(c.init_fake_score), "init_fake_score")
        self.heads = nn.ModuleDict(self.build_heads())

        # Each process draws its own noise: the stream depends on the seed, the rank and the step.
        self.state = _LoopState(c.seed, acc.process_index)

        self.generator = self.triad.generator
        self.fake = self.triad.fake
        self.fsdp = fsdp_requested(acc, c.fsdp)
        if self.fsdp:
            self._shard_networks()
        g_params = [p for p in self.generator.parameters() if p.requires_grad]
        f_params = self.triad.trainable_fake_parameters() + [p for p in self.heads.parameters() if p.requires_grad]
        adam = dict(betas=(c.adam_beta1, c.adam_beta2), weight_decay=c.weight_decay)
        self.opt_g = torch.optim.AdamW(g_params, lr=c.lr_generator, **adam)
        self.opt_f = torch.optim.AdamW(f_params, lr=c.lr_fake, **adam)
        self.sched_g = torch.optim.lr_scheduler.LambdaLR(self.opt_g, _warmup_lambda(c.warmup_steps))
        self.sched_f = torch.optim.lr_scheduler.LambdaLR(self.opt_f, _warmup_lambda(c.warmup_steps))

        self.ema = None
        if c.ema_decay > 0:
            from diffusers.training_utils import EMAModel

            self.ema = EMAModel(g_params, decay=c.ema_decay)

        # Models are prepared (device placement, identical start on every rank, safetensors in
        # save_state) but always called unwrapped: gradients are averaged explicitly after each
        # backward (_sync_gradients), so any graph between teacher, fake score, heads and
        # generator is allowed without DistributedDataParallel's one-forward-one-backward rule.
        # With FSDP the networks are already sharded (and placed); checkpoints are written by
        # onestep.sharding, since accelerate's FSDP2 prepare takes one model per call.
        if not self.fsdp:
            models = [self.generator, self.fake] + ([self.heads] if len(list(self.heads.parameters())) else [])
            prepared = acc.prepare(*models, self.opt_g, self.opt_f, self.sched_g, self.sched_f)
            self.opt_g, self.opt_f, self.sched_g, self.sched_f = prepared[len(models):]
            self.generator = acc.unwrap_model(prepared[0])
            self.fake = acc.unwrap_model(prepared[1])
            self.heads = acc.unwrap_model(prepared[2]) if len(models) == 3 else self.heads.to(acc.device)
        self.teacher = self.triad.teacher.to(acc.device)
        if self.teacher_spec.vae is not None:
            self.teacher_spec.vae.to(acc.device)
        if not self.fsdp:
            acc.register_for_checkpointing(self.state)
        if self.ema is not None:
            self.ema.to(acc.device)
            if not self.fsdp:
                acc.register_for_checkpointing(self.ema)
        self._regression_pairs: tuple[torch.Tensor, torch.Tensor, Cond] | None = None

    def _shard_networks(self) -> None:
        """FSDP: shard the generator, the fake score (with LoRA: the backbone it shares with the
        teacher), a separate teacher copy and the heads, each block its own unit."""
        import copy

        kwargs = fsdp_settings(self.accelerator)
        device = self.accelerator.device
        # The export rebuilds the whole generator from gathered weights: keep its structure
        # (on the meta device) and its buffers (small), not a second copy of its weights.
        template = copy.deepcopy(self.generator.backbone)
        self._export_buffers = {n: b.clone() for n, b in template.named_buffers()}
        self._export_template = template.to("meta")
        nets = [self.generator.backbone, self.fake.backbone, self.triad.teacher.backbone, self.heads]
        nets += self.extra_sharded_networks()
        for net in nets:
            shard(net.to(device), **kwargs)
        # What a checkpoint holds: each trained network with its optimizer (names are file names).
        self._sharded = {"generator": self.generator.backbone, "fake_score": nn.ModuleDict({"fake": self.fake.backbone, "heads": self.heads})}

    # ---------------------------------------------------------------- hooks
    def extra_sharded_networks(self) -> list[nn.Module]:
        """FSDP: more networks a method calls, to shard with the triad (built here, before sharding)."""
        return []

    def build_heads(self) -> dict[str, nn.Module]:
        """Extra trainable networks (GAN head, ...) updated with the fake score."""
        return {}

    def generator_loss(self, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, float]]:
        raise NotImplementedError

    def fake_score_loss(self, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, float]]:
        raise NotImplementedError

    # ------------------------------------------------------------- helpers
    @property
    def device(self) -> torch.device:
        return self.accelerator.device

    @property
    def rng(self) -> torch.Generator:
        return self.state.rng

    def randn(self, shape: tuple[int, ...]) -> torch.Tensor:
        return torch.randn(shape, generator=self.rng).to(self.device)

    def sample_t(self, n: int, low: float = 0.0, high: float = 1.0) -> torch.Tensor:
        """Integer timesteps uniform in ``[low*T, high*T)`` (fractions of the schedule)."""
        T = self.schedule.num_train_timesteps
        lo, hi = int(round(low * T)), min(T - 1, int(round(high * T)) - (1 if high >= 1 else 0))
        return self.schedule.sample_t(n, lo, max(lo, hi), generator=self.rng, device=self.device)

    def make_batch(self) -> dict[str, Any]:
        """Generator inputs for one iteration (noise, conditions) and real data if the method uses it."""
        n = self.config.batch_size
        shape = (n, *self.teacher_spec.sample_shape)
        batch: dict[str, Any] = {"noise": self.randn(shape)}
        if self.wants_prompts:  # the prompt strings too (text teachers), e.g. for a CLIP loss
            batch["cond"], batch["prompts"] = self.conditioning.sample_prompts(n, generator=self.rng, device=self.device)
        else:
            batch["cond"] = self.conditioning.sample(n, generator=self.rng, device=self.device)
        batch["uncond"] = self.conditioning.null(n, device=self.device)
        if self.uses_real_data and self.teacher_spec.real_data is not None:
            x, y = self.teacher_spec.real_data(n, self.rng)
            batch["real"] = x.to(self.device)
            batch["real_cond"] = cond_to(y, self.device)
        return batch

    def generate(self, batch: dict[str, Any]) -> torch.Tensor:
        """The generator's sample for ``batch``, with gradient, at the timestep being trained.

        One-step students: ``G(z, t_0)``. K-step students use backward simulation
        (DMD2): draw ``k`` in ``0..K-1``, run the current generator ``k`` steps without
        gradient (predict x0, re-noise to the next timestep with fresh noise), then
        train on its prediction at the ``k``-th timestep.
        """
        ts = self.config.generator_timesteps
        z, cond = batch["noise"], batch["cond"]
        n = z.shape[0]
        # k is drawn alike on every process: the processes must run the same passes (FSDP's collectives)
        k = int(torch.randint(0, len(ts), (1,), generator=self.state.shared_rng)) if len(ts) > 1 else 0
        x_in = z
        if k > 0:
            from onestep.samplers.student import student_sample

            with torch.no_grad():
                x0 = student_sample(self.generator, ts[:k], z, cond, renoise=lambda shape: self.randn(shape))
                x_in = self.schedule.add_noise(x0, self.randn(tuple(z.shape)), torch.full((n,), ts[k], device=self.device))
        t = torch.full((n,), ts[k], dtype=torch.long, device=self.device)
        return self.generator(x_in, t, cond)

    def generate_and_noise(self, batch: dict[str, Any], low: float, high: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The generator step's opening: ``x = G(z)`` with gradient (kept detached in ``batch["x_gen"]``
        for the fake-score step), ``t ~ U{low T .. high T}`` and ``x_t = a_t sg(x) + s_t e``."""
        x = self.generate(batch)
        batch["x_gen"] = x.detach()
        t = self.sample_t(x.shape[0], low, high)
        with torch.no_grad():
            x_t = self.schedule.add_noise(x.detach(), self.randn(tuple(x.shape)), t)
        return x, x_t, t

    def detached_sample(self, batch: dict[str, Any]) -> torch.Tensor:
        """The generator sample of this iteration without gradient: the one the generator step
        made (``batch["x_gen"]``) or, on fake-score-only iterations, a fresh one."""
        x = batch.get("x_gen")
        if x is None:
            with torch.no_grad():
                x = self.generate(batch)
        return x.detach()

    def noised(self, x0: torch.Tensor, t: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(x_t, t, noise)`` for clean ``x0`` with ``t ~ U{0 .. T-1}`` unless given."""
        if t is None:
            t = self.sample_t(x0.shape[0])
        noise = self.randn(tuple(x0.shape))
        return self.schedule.add_noise(x0, noise, t), t, noise

    def denoising_loss_of(self, pred_x0: torch.Tensor, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """Plain diffusion loss in the backbone's own prediction space (eps-MSE for eps teachers)."""
        pt = self.fake.prediction_type
        pred = self.schedule.from_x0(pred_x0, x_t, t, pt)
        if pt == "epsilon":
            target = noise
        elif pt == "flow":  # the velocity, exactly (rebuilding it from x_t loses precision at small sigma)
            target = noise.float() - x0.float()
        else:
            target = self.schedule.from_x0(x0, x_t, t, pt)
        return F.mse_loss(pred.float(), target.float())

    def denoising_loss(self, net: nn.Module, x0: torch.Tensor, cond: Cond) -> torch.Tensor:
        """``net``'s diffusion loss on clean ``x0`` at ``t ~ U{0 .. T-1}``."""
        x_t, t, noise = self.noised(x0)
        return self.denoising_loss_of(net(x_t, t, cond), x0, x_t, t, noise)

    # ------------------------------------------------------- warm start
    @torch.no_grad()
    def _make_regression_pairs(self):
        from onestep.samplers.ddim import ddim_sample

        c = self.config
        g = torch.Generator().manual_seed(c.seed + 12345)  # the same pairs on resume and on every rank
        n = c.regression_pairs
        z = torch.randn((n, *self.teacher_spec.sample_shape), generator=g)
        cond = self.conditioning.sample(n, generator=g)
        uncond = self.conditioning.null(n)
        ys = []
        for i in range(0, n, 512):
            sl = slice(i, i + 512)
            ys.append(
                ddim_sample(
                    self.teacher,
                    z[sl].to(self.device),
                    cond_to(index_cond(cond, sl), self.device),
                    cond_to(index_cond(uncond, sl), self.device),
                    num_steps=c.regression_ode_steps,
                    guidance_scale=c.guidance_scale,
                    clip=self.teacher_spec.clip,
                ).cpu()
            )
        return z, torch.cat(ys), cond

    def regression_loss(self, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, float]]:
        """DMD's regression warm start: MSE between ``G(z)`` and the teacher's ODE sample from ``z``."""
        if self._regression_pairs is None:
            self._regression_pairs = self._make_regression_pairs()
        z_all, y_all, c_all = self._regression_pairs
        idx = torch.randint(0, len(z_all), (self.config.batch_size,), generator=self.rng)
        z, y = z_all[idx].to(self.device), y_all[idx].to(self.device)
        cond = cond_to(index_cond(c_all, idx), self.device)
        t = torch.full((len(idx),), self.config.generator_timesteps[0], dtype=torch.long, device=self.device)
        x = self.generator(z, t, cond)
        batch["x_gen"] = x.detach()
        batch["cond"] = cond
        loss = F.mse_loss(x.float(), y.float())
        return loss, {"loss/regression": loss.item()}

    # ---------------------------------------------------------------- loop
    def _sync_gradients(self, params: list[nn.Parameter]) -> None:
        """Average gradients over processes in one flat all-reduce (missing gradients count as zero)."""
        acc = self.accelerator
        if acc.num_processes == 1 or not params or self.fsdp:  # FSDP reduce-scatters the mean itself
            return
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        flat = torch.cat([p.grad.reshape(-1) for p in params])
        flat = acc.reduce(flat, reduction="mean")
        offset = 0
        for p in params:
            n = p.numel()
            p.grad.copy_(flat[offset : offset + n].view_as(p))
            offset += n

    def _update(self, loss: torch.Tensor, params_of: nn.Module, opt, sched) -> float:
        acc = self.accelerator
        acc.backward(loss)
        if self.fsdp:  # the optimizer's own (sharded) parameters: a module shows gathered copies between passes
            params = [p for group in opt.param_groups for p in group["params"]]
        else:
            params = [p for p in params_of.parameters() if p.requires_grad]
        self._sync_gradients(params)
        norm = 0.0
        if self.config.max_grad_norm > 0:
            if self.fsdp:
                norm = clip_grad_norm(params, self.config.max_grad_norm)
            else:
                norm = float(acc.clip_grad_norm_(params, self.config.max_grad_norm))
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        return norm

    def is_generator_step(self, step: int) -> bool:
        return step % self.config.fake_updates_per_generator == 0 or step < self.config.regression_warmup_steps

    def is_fake_step(self, step: int) -> bool:
        """Whether iteration ``step`` updates the fake score (and heads): every iteration by default."""
        return True

    def train_step(self) -> dict[str, float]:
        """One iteration: maybe a generator update, then a fake-score update."""
        step = self.state.step
        self.state.reseed()
        batch = self.make_batch()
        logs: dict[str, float] = {}
        self.generator.train()
        self.fake.train()
        if self.is_generator_step(step):
            # autocast (bf16/fp16 mixed precision; a no-op with "no") also covers the teacher, which is not prepared
            with self.accelerator.autocast():
                if step < self.config.regression_warmup_steps:
                    loss_g, lg = self.regression_loss(batch)
                else:
                    loss_g, lg = self.generator_loss(batch)
            logs.update(lg)
            logs["grad_norm/generator"] = self._update(loss_g, self.generator, self.opt_g, self.sched_g)
            if self.ema is not None:
                self.ema.step([p for p in self.generator.parameters() if p.requires_grad])
        self.opt_f.zero_grad(set_to_none=True)  # drop any gradient the generator step left behind
        if self.is_fake_step(step):
            with self.accelerator.autocast():
                loss_f, lf = self.fake_score_loss(batch)
            logs.update(lf)
            params = nn.ModuleList([self.fake, self.heads])
            logs["grad_norm/fake"] = self._update(loss_f, params, self.opt_f, self.sched_f)
        self.state.step += 1
        return logs

    def train(self) -> Path | None:
        """Run the loop to ``max_steps``; returns the exported student folder (main process)."""
        from tqdm.auto import tqdm

        acc, c = self.accelerator, self.config
        self.output_dir.mkdir(parents=True, exist_ok=True)
        if acc.is_main_process:
            (self.output_dir / "config.json").write_text(json.dumps(config_to_dict(c), indent=2) + "\n")
        if c.resume:
            self.load_checkpoint(c.resume)
        if acc.is_main_process and c.log_with != "none":
            acc.init_trackers("onestep", config=_flat_hparams(config_to_dict(c)))
        bar = tqdm(
            total=c.max_steps, initial=self.state.step, desc=f"{self.method_name} distillation", disable=not acc.is_main_process
        )
        start = time.time()
        first = self.state.step
        logs: dict[str, float] = {}
        while self.state.step < c.max_steps:
            logs.update(self.train_step())  # the latest value of every key since the last log
            step = self.state.step
            bar.update(1)
            if c.log_every and (step % c.log_every == 0 or step == c.max_steps):
                logs["lr/generator"] = self.sched_g.get_last_lr()[0]
                acc.log(logs, step=step)
                shown = {k.split("/")[-1]: f"{v:.3g}" for k, v in logs.items() if k.startswith("loss/")}
                bar.set_postfix(shown)
                logs = {}
            if c.preview_every and step % c.preview_every == 0:
                self.save_preview(step)
            if c.checkpoint_every and step % c.checkpoint_every == 0 and step < c.max_steps:
                self.save_checkpoint()
        bar.close()
        self.train_seconds = time.time() - start
        self.steps_run = self.state.step - first
        self.save_checkpoint()
        student = self.export() if c.export else None
        acc.wait_for_everyone()
        acc.end_training()
        return student

    # -------------------------------------------------- checkpoint / resume
    def checkpoints(self) -> list[Path]:
        found = [p for p in self.output_dir.glob("checkpoint-*") if p.name.split("-")[-1].isdigit()]
        return sorted(found, key=lambda p: int(p.name.split("-")[-1]))

    def save_checkpoint(self) -> Path:
        acc = self.accelerator
        path = self.output_dir / f"checkpoint-{self.state.step}"
        acc.wait_for_everyone()
        if self.fsdp:
            save_sharded_checkpoint(path, acc, self._sharded_with_optimizers(), self._trainer_state(), self.ema, self._ema_names())
        else:
            acc.save_state(str(path))
        if self.ema is not None or self.config.generator_lora_rank:
            # The weights an export would hold now (EMA, LoRA merged) as safetensors, for evaluation:
            # save_state keeps the EMA copy only in a pickle. (With FSDP every process gathers.)
            from safetensors.torch import save_file

            net = self.generator_on_main()
            if acc.is_main_process:
                state = {k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()}
                save_file(state, str(path / EXPORT_WEIGHTS))
        if acc.is_main_process and self.config.checkpoint_total_limit:
            for old in self.checkpoints()[: -self.config.checkpoint_total_limit]:
                shutil.rmtree(old, ignore_errors=True)
        acc.wait_for_everyone()
        return path

    def load_checkpoint(self, which: str) -> None:
        if which == "latest":
            found = self.checkpoints()
            if not found:
                raise ConfigError(f"--resume latest: no checkpoint-* folder in {self.output_dir}")
            path = found[-1]
        else:
            path = Path(which)
            if not path.is_dir():
                raise ConfigError(f"--resume {which}: not a checkpoint folder")
        if self.fsdp:
            info = load_sharded_checkpoint(path, self._sharded_with_optimizers(), self.ema, self._ema_names())
            self.state.load_state_dict({"step": info["step"]})
            self.sched_g.load_state_dict(info["sched_generator"])
            self.sched_f.load_state_dict(info["sched_fake_score"])
        elif (path / SHARDED_STATE).is_file():
            raise ConfigError(f"--resume {path}: the checkpoint was written with FSDP; resume it with fsdp (the same launch)")
        else:
            self.accelerator.load_state(str(path))

    def _sharded_with_optimizers(self) -> dict[str, tuple[nn.Module, torch.optim.Optimizer]]:
        return {"generator": (self._sharded["generator"], self.opt_g), "fake_score": (self._sharded["fake_score"], self.opt_f)}

    def _trainer_state(self) -> dict[str, Any]:
        return {"step": self.state.step, "sched_generator": self.sched_g.state_dict(), "sched_fake_score": self.sched_f.state_dict()}

    def _ema_names(self) -> list[str]:
        return [n for n, p in self.generator.backbone.named_parameters() if p.requires_grad]

    # ------------------------------------------------------ export / preview
    def generator_for_export(self) -> nn.Module:
        """The generator backbone to export (a copy holding the EMA weights when EMA is on, with
        LoRA adapters merged into plain layers when the generator is LoRA)."""
        import copy

        if self.fsdp:
            return self._gathered_generator()
        net = self.generator.backbone
        if self.ema is None and not self.config.generator_lora_rank:
            return net
        net = copy.deepcopy(net)
        if self.ema is not None:
            self.ema.copy_to([p for p in net.parameters() if p.requires_grad])
        return merged_lora(net) if self.config.generator_lora_rank else net

    def generator_on_main(self) -> nn.Module | None:
        """:meth:`generator_for_export` on the main process, None on the others. Every process must
        call it: with FSDP the weights are gathered from all of them."""
        if self.fsdp or self.accelerator.is_main_process:
            return self.generator_for_export()
        return None

    def _gathered_generator(self) -> nn.Module | None:
        """FSDP: the whole generator rebuilt from its shards on the main process (None on the others;
        every process must call this, the gathering is collective)."""
        import copy

        state = gather_full(self.generator.backbone)
        shadow = [full(s) for s in self.ema.shadow_params] if self.ema is not None else None
        if not self.accelerator.is_main_process:
            return None
        net = copy.deepcopy(self._export_template)
        net.load_state_dict(state, strict=True, assign=True)
        for name, buf in self._export_buffers.items():  # non-persistent buffers are not in a state dict
            owner, _, leaf = name.rpartition(".")
            module = net.get_submodule(owner) if owner else net
            if module._buffers[leaf].is_meta:
                module._buffers[leaf] = buf.clone()
        left = [n for n, t in list(net.named_parameters()) + list(net.named_buffers()) if t.is_meta]
        if left:
            raise RuntimeError(f"FSDP export: weights not gathered for {left[:3]}")
        net = net.to(self.device)
        if shadow is not None:
            with torch.no_grad():
                for p, s in zip([p for p in net.parameters() if p.requires_grad], shadow):
                    p.copy_(s)
        return merged_lora(net) if self.config.generator_lora_rank else net

    def export_timesteps(self) -> list[int]:
        """The sampling timesteps written into the student's onestep.json."""
        return list(self.config.generator_timesteps)

    def export_meta(self) -> dict[str, Any]:
        """Method-specific fields added to the student's onestep.json."""
        return {}

    def export(self) -> Path | None:
        from onestep.export import export_student

        net = self.generator_on_main()
        if not self.accelerator.is_main_process:
            return None
        return export_student(
            self.output_dir / "student",
            net,
            self.teacher_spec,
            method=self.method_name,
            prediction_type=self.generator.prediction_type,
            timesteps=self.export_timesteps(),
            extra={"config": config_to_dict(self.config), **self.export_meta()},
        )

    @torch.no_grad()
    def preview_samples(self, n: int | None = None, net: nn.Module | None = None) -> tuple[torch.Tensor, Cond]:
        """Samples of the generator that would be exported now (EMA weights when EMA is on),
        for fixed seeds (the same across a run). ``net``: that generator, when already at hand."""
        from onestep.samplers.student import sample_student_from_seeds

        n = n or self.config.preview_num
        labels = [i % max(1, self.conditioning.num_classes) for i in range(n)]
        gen = Denoiser(net if net is not None else self.generator_for_export(), self.schedule, self.generator.prediction_type)
        was_training = self.generator.training
        gen.eval()
        x, cond = sample_student_from_seeds(
            gen, self.teacher_spec, self.config.generator_timesteps, seeds=range(n), labels=labels, device=self.device
        )
        gen.train(was_training)
        return x, cond

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        """Images from generator samples: the teacher's VAE decode for latent teachers, else ``x``."""
        return self.teacher_spec.decode(x)

    def save_preview(self, step: int) -> Path | None:
        from onestep.viz import save_samples_picture

        net = self.generator_on_main()
        if not self.accelerator.is_main_process:
            return None
        x, _ = self.preview_samples(net=net)
        if self.teacher_spec.vae is not None:
            with torch.no_grad():
                x = self.decode(x.to(self.device)).clamp(-1, 1).cpu()
        path = self.output_dir / "previews" / f"step-{step:06d}.png"
        save_samples_picture(x, path, title=f"{self.method_name} step {step}", nrow=10)
        return path


def add_lora(net: nn.Module, rank: int, alpha: float | None, name: str) -> None:
    """Inject zero-initialised LoRA adapters into every Linear and Conv2d layer of ``net`` and train only them."""
    from peft import LoraConfig, inject_adapter_in_model

    from onestep.triad import lora_target_modules

    config = LoraConfig(r=rank, lora_alpha=alpha if alpha is not None else rank, init_lora_weights=True, target_modules=lora_target_modules(net))
    inject_adapter_in_model(config, net, adapter_name=name)
    for n, p in net.named_parameters():
        p.requires_grad_("lora_" in n)


def merged_lora(net: nn.Module) -> nn.Module:
    """``net`` with its LoRA adapters merged into the base weights and the peft wrappers replaced by
    the plain layers (in place): a network that plain diffusers can save and load."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    wrapped = [(name, m) for name, m in net.named_modules() if isinstance(m, BaseTunerLayer)]
    for name, m in wrapped:
        m.merge()
        parent_name, _, child = name.rpartition(".")
        parent = net.get_submodule(parent_name) if parent_name else net
        setattr(parent, child, m.get_base_layer())
    for p in net.parameters():
        p.requires_grad_(True)
    return net


def load_teacher_for(config: DistillConfig, device: torch.device | str = "cpu") -> Teacher:
    """The teacher of ``config``, with its text-to-image options (ignored by other teachers)."""
    return load_teacher(
        config.teacher,
        prompts=config.prompts,
        validation_prompts=config.validation_prompts,
        negative_prompt=config.negative_prompt,
        resolution=config.resolution,
        real_images=config.real_images,
        cache_text_embeddings=config.cache_text_embeddings,
        device=device,
    )


def _flat_hparams(d: dict[str, Any]) -> dict[str, Any]:
    """TensorBoard hparams take only scalars and strings."""
    out = {}
    for k, v in d.items():
        if isinstance(v, (int, float, str, bool)):
            out[k] = v
        elif v is None:
            out[k] = "none"
        else:
            out[k] = str(v)
    return out


def _weights_file(path: str) -> Path:
    p = Path(path)
    if p.is_dir():
        p = p / "generator" / "diffusion_pytorch_model.safetensors"
    if p.suffix != ".safetensors":
        raise ConfigError(f"{path}: weights load only from .safetensors files (or a student folder), never from pickles")
    if not p.is_file():
        raise ConfigError(f"{path}: no such weights file")
    return p


def trainable_state(net: nn.Module) -> dict[str, torch.Tensor]:
    """Every trainable parameter of ``net`` by name (a full network, or only the adapters of a LoRA one)."""
    return {n: p.detach().cpu().contiguous().clone() for n, p in net.named_parameters() if p.requires_grad}


def save_trainable(net: nn.Module, path: str | Path, metadata: dict[str, str] | None = None) -> Path:
    """Write :func:`trainable_state` of ``net`` to a safetensors file."""
    from safetensors.torch import save_file

    save_file(trainable_state(net), str(path), metadata=metadata)
    return Path(path)


def load_trainable(net: nn.Module, path: str | Path, what: str = "weights", trainable: set[str] | None = None) -> None:
    """Load a safetensors file into ``net`` strictly: its keys must be exactly ``net``'s state dict
    (a full save) or exactly its trainable parameters (:func:`save_trainable`), with matching shapes.
    ``trainable``: those parameters' names, when ``net`` is a frozen copy of the network that trained."""
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{what}: {path} is missing")
    tensors = load_file(str(path))
    full = set(net.state_dict())
    if trainable is None:
        trainable = {n for n, p in net.named_parameters() if p.requires_grad}
    if set(tensors) == full:
        expected = net.state_dict()
    elif set(tensors) == set(trainable):
        expected = dict(net.named_parameters())
    else:
        missing, unexpected = sorted(set(trainable) - set(tensors)), sorted(set(tensors) - full)
        raise ConfigError(f"{what}: {path} does not match the network: missing {missing[:3]}, unexpected {unexpected[:3]}")
    with torch.no_grad():
        for n, v in tensors.items():
            if expected[n].shape != v.shape:
                raise ConfigError(f"{what}: {path}: {n} has shape {tuple(v.shape)}, expected {tuple(expected[n].shape)}")
            expected[n].copy_(v)


def inject_gradient(x: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """Loss whose gradient with respect to ``x`` is ``grad / x.numel()``:
    ``0.5 * mean((x - sg(x - grad))^2)`` (computed in float32, non-finite values zeroed)."""
    grad = torch.nan_to_num(grad.float())
    target = (x.float() - grad).detach()
    return 0.5 * F.mse_loss(x.float(), target, reduction="mean")


__all__ = ["DistillConfig", "DistillTrainer", "inject_gradient", "load_trainable", "save_trainable", "trainable_state"]
