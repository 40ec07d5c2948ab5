"""The one training loop every method shares.

:class:`DistillTrainer` owns the :class:`accelerate.Accelerator`, the triad, the optimizers
(AdamW with warm-up), gradient averaging and clipping, mixed precision, the two time-scale
schedule (``fake_updates_per_generator`` fake-score updates per generator update), the EMA
of the generator, logging (``accelerator.log``, TensorBoard by default), a tqdm bar, and
the helpers methods share (noise, timesteps, the generator's sample, denoising losses).

Beside it: the config (:mod:`.config`), checkpoints, export and previews (:mod:`.checkpoint`),
FSDP (:mod:`.sharding`), memory switches (:mod:`.memory`) and the regression warm start
(:mod:`.warmstart`).

A method subclasses it with its ``config_class`` and overrides :meth:`generator_loss` and
:meth:`fake_score_loss`; :meth:`build_heads` adds trained heads (a GAN discriminator),
:meth:`extra_networks` adds frozen networks the method keeps beside the triad (a consistency
target, DisBack's node target) and :meth:`after_generator_step` runs after each generator
update. A method never overrides the step itself.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from onestep.config import config_to_dict, flat_hparams
from onestep.errors import ConfigError, TrainingDiverged
from onestep.files import write_text
from onestep.teachers import Teacher
from onestep.triad import Triad
from onestep.weights import check_same_network, load_trainable, weights_file

from .checkpoint import CheckpointMixin, LoopState
from .exporting import ExportMixin
from .helpers import MethodHelpers
from .interrupt import StopRequest
from .config import DistillConfig, load_teacher_for, method_of, resolve_mixed_precision
from .sharding import average_gradients, clip_grad_norm, fsdp_requested
from .warmstart import RegressionWarmStart


def _accumulate(logs: dict[str, float], new: dict[str, float], k: int) -> None:
    """Add one micro-batch's logged values to ``logs`` as the mean over ``k`` micro-batches (``k = 1``: as they are)."""
    for key, v in new.items():
        logs[key] = v if k == 1 else logs.get(key, 0.0) + v / k


def _warmup_lambda(warmup: int):
    return lambda step: min(1.0, (step + 1) / warmup) if warmup > 0 else 1.0


def _regression_lambda(base, factor: float, steps: int):
    """``base`` times ``factor`` for the first ``steps`` updates (the regression warm start's own rate)."""
    return lambda step: base(step) * (factor if step < steps else 1.0)


class DistillTrainer(MethodHelpers, CheckpointMixin, ExportMixin):
    """Shared loop; methods override :meth:`generator_loss` and :meth:`fake_score_loss`.

    Args:
        config: the method's config dataclass (an instance of the trainer's ``config_class``).
        teacher: an already loaded teacher (default: ``load_teacher(config.teacher)``).
    """

    #: The method's config dataclass; its ``method`` default is the method's name (``method_name``).
    config_class: type[DistillConfig] = DistillConfig
    method_name = "base"
    uses_real_data = False
    #: make_batch adds ``batch["prompts"]``, the prompt of each sample (text-to-image teachers only)
    wants_prompts = False

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        cls.method_name = method_of(cls.config_class)

    def __init__(self, config: DistillConfig, teacher: Teacher | None = None):
        from accelerate import Accelerator
        from accelerate.utils import ProjectConfiguration, set_seed

        if not isinstance(config, self.config_class):
            raise ConfigError(f"{type(self).__name__} takes a {self.config_class.__name__}, not a {type(config).__name__}")
        self.config = c = config
        if c.output_dir is None:
            raise ConfigError("output_dir is not set")
        self.output_dir = Path(c.output_dir)
        self.accelerator = Accelerator(
            mixed_precision=resolve_mixed_precision(c.mixed_precision),
            step_scheduler_with_optimizer=False,  # one warm-up step per update, however many processes run
            log_with=None if c.log_with == "none" else c.log_with,
            project_config=ProjectConfiguration(project_dir=str(self.output_dir), logging_dir=str(self.output_dir / "logs")),
        )
        acc = self.accelerator
        c.mixed_precision = acc.mixed_precision  # what runs: the config's or the launcher's
        set_seed(c.seed)  # identical initialisation on every process
        if c.allow_tf32 and torch.cuda.is_available():
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        from .memory import apply_memory_switches, apply_speed_switches, resolve_frozen_compute, resolve_frozen_dtype

        # text embeddings are frozen outputs too: the prompt cache stores them in the frozen dtype
        frozen = resolve_frozen_dtype(c.frozen_dtype, acc.mixed_precision)
        # autocast's dtype on a CPU without units for it (whatever frozen_dtype says): every op is emulated
        half = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(acc.mixed_precision)
        if acc.device.type == "cpu" and half is not None and resolve_frozen_compute("auto", half, "cpu") == "float32":
            from accelerate.logging import get_logger

            get_logger(__name__).warning(
                f"mixed_precision {acc.mixed_precision} on a CPU without {acc.mixed_precision} units emulates every "
                "half-precision operation (a bf16 convolution ran 141x slower than float32 here); "
                "mixed_precision: no with frozen_dtype: bf16 keeps the memory saving at float32 speed"
            )
        # With no full copy of the teacher to train (LoRA fake score, LoRA generator), its weights load
        # straight into the frozen dtype: the float32 backbone never sits in memory whole.
        all_frozen = c.fake_score != "copy" and c.generator_lora_rank > 0
        self.teacher_spec = teacher if teacher is not None else load_teacher_for(
            c, acc.device, text_cache_dtype=frozen, weights_dtype=frozen if all_frozen else None,
            text_compute=resolve_frozen_compute(c.frozen_compute, frozen, acc.device),
        )
        T = self.teacher_spec.schedule.num_train_timesteps
        if max(c.generator_timesteps) >= T or min(c.generator_timesteps) < 0:
            raise ConfigError(f"generator_timesteps must lie in [0, {T - 1}] for this teacher (got {c.generator_timesteps})")
        self.fsdp = fsdp_requested(acc, c.fsdp)
        if self.fsdp and acc.mixed_precision == "fp16":
            raise ConfigError("fsdp: fp16 needs a gradient scaler the sharded loop does not have; use mixed_precision: bf16")
        self.triad = Triad(
            self.teacher_spec, c.fake_score, c.lora_rank, c.lora_alpha, c.lora_targets,
            generator_lora_rank=c.generator_lora_rank, generator_lora_alpha=c.generator_lora_alpha,
            generator_lora_targets=c.generator_lora_targets, share_base=not self.fsdp,
        )
        self.schedule = self.triad.schedule
        self.conditioning = self.triad.conditioning
        self.generator, self.fake = self.triad.generator, self.triad.fake
        trained = [self.generator.backbone] + ([self.fake.backbone] if self.fake is not None else [])
        if c.export_average_with is not None:  # the same network as the export, checked before training
            check_same_network(self.generator.backbone, c.export_average_with, "export_average_with")
        if c.gradient_checkpointing:
            for net in trained:
                if not hasattr(net, "enable_gradient_checkpointing"):
                    raise ConfigError(f"gradient_checkpointing: {type(net).__name__} does not support it (diffusers models do)")
                net.enable_gradient_checkpointing()
        apply_memory_switches(self)  # attention kernels and the dtype of frozen weights (trainers/memory.py)
        if c.init_generator:
            load_trainable(self.generator.backbone, weights_file(c.init_generator), "init_generator",
                           keep_frozen=self.triad.shares_generator_base)
        if c.init_fake_score:
            if self.fake is None:
                raise ConfigError(f"init_fake_score: {self.method_name} trains no fake score; remove it from the config")
            load_trainable(self.fake.backbone, weights_file(c.init_fake_score), "init_fake_score",
                           keep_frozen=c.fake_score == "lora")
        self.heads = nn.ModuleDict(self.build_heads())
        # frozen: evaluated without dropout (UNet3DConditionModel's temporal convolutions carry a fixed 0.1)
        self.extras: dict[str, nn.Module] = {k: net.eval() for k, net in self.extra_networks().items()}

        # Each process draws its own noise: the stream depends on the seed, the rank and the step.
        self.state = LoopState(c.seed, acc.process_index)

        if self.fsdp:
            self._shard_networks()
        g_params = [p for p in self.generator.parameters() if p.requires_grad]
        f_params = self.triad.trainable_fake_parameters() + [p for p in self.heads.parameters() if p.requires_grad]
        adam = dict(betas=(c.adam_beta1, c.adam_beta2), weight_decay=c.weight_decay)
        if c.fused_adam and not self.fsdp:
            adam["fused"] = True
        self.opt_g = torch.optim.AdamW(g_params, lr=c.lr_generator, **adam)
        g_lambda = _warmup_lambda(c.warmup_steps)
        if c.lr_regression is not None and c.regression_warmup_steps:
            # Every warm-start iteration is a generator update, so the scheduler's step count is the iteration.
            g_lambda = _regression_lambda(g_lambda, c.lr_regression / c.lr_generator, c.regression_warmup_steps)
        self.sched_g = torch.optim.lr_scheduler.LambdaLR(self.opt_g, g_lambda)
        # No fake score and no heads (consistency distillation without a GAN term): no second optimizer.
        self.opt_f = torch.optim.AdamW(f_params, lr=c.lr_fake, **adam) if f_params else None
        self.sched_f = torch.optim.lr_scheduler.LambdaLR(self.opt_f, _warmup_lambda(c.warmup_steps)) if f_params else None

        self.ema = None
        if c.ema_decay > 0:
            from diffusers.training_utils import EMAModel

            self.ema = EMAModel(g_params, decay=c.ema_decay, foreach=True)

        # Models are prepared (device placement, identical start on every rank, mixed precision)
        # but always called unwrapped: gradients are averaged explicitly after each backward
        # (average_gradients), so any graph between teacher, fake score, heads and generator is
        # allowed without DistributedDataParallel's one-forward-one-backward rule. With FSDP the
        # networks are already sharded (and placed), since accelerate's FSDP2 prepare takes one
        # model per call. Checkpoints are written by trainers/checkpoint_files.py either way.
        self._place_networks()
        apply_speed_switches(self)  # channels_last, torch_compile (trainers/memory.py)
        self.warm_start = RegressionWarmStart(self)
        self.nonfinite_updates, self.nonfinite_in_a_row = 0, {}  # updates skipped for non-finite gradients
        self.run_metrics: dict[str, Any] = {}  # the latest periodic evaluation (eval_every), for the student's card

    # ---------------------------------------------------------------- hooks
    def build_heads(self) -> dict[str, nn.Module]:
        """Extra trainable networks (GAN head, ...) updated with the fake score."""
        return {}

    def extra_networks(self) -> dict[str, nn.Module]:
        """Frozen networks the method keeps beside the triad (a consistency target, DisBack's node
        target), built once here: the loop places them, shards them with the triad under FSDP and
        keeps those of :meth:`saved_extra_networks` in every checkpoint (``<name>.safetensors``).
        Called after the triad and heads exist (``self.generator``, ``self.fake``)."""
        return {}

    def saved_extra_networks(self) -> dict[str, nn.Module]:
        """The extra networks a checkpoint holds (default: all; one rebuilt from other files on
        resume can be left out)."""
        return self.extras

    def after_generator_step(self) -> None:
        """Runs after each generator update; the default steps the generator's EMA (``ema_decay``)."""
        if self.ema is not None:
            self.ema.step([p for p in self.generator.parameters() if p.requires_grad])

    def generator_loss(self, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, float]]:
        raise NotImplementedError

    def fake_score_loss(self, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, float]]:
        raise NotImplementedError

    # ---------------------------------------------------------------- loop
    def _backward(self, loss: torch.Tensor) -> None:
        """Backward one micro-batch's loss, divided by their number: the gradients accumulate as the mean
        (each graph is freed before the next micro-batch runs)."""
        k = self.config.gradient_accumulation_steps
        self.accelerator.backward(loss / k if k > 1 else loss)

    def _update(self, params_of: nn.Module, opt, sched) -> float:
        """Average the accumulated gradients over processes, clip and step; returns the gradient norm. A
        non-finite norm skips the update (fp16 leaves that to its gradient scaler);
        ``max_nonfinite_updates`` of them in a row stop the run with :class:`~onestep.errors.TrainingDiverged`."""
        acc, c = self.accelerator, self.config
        if self.fsdp:  # the optimizer's own (sharded) parameters: a module shows gathered copies between passes
            params = [p for group in opt.param_groups for p in group["params"]]
        else:
            params = [p for p in params_of.parameters() if p.requires_grad]
            average_gradients(acc, params)  # (FSDP reduce-scatters the mean itself)
        max_norm = c.max_grad_norm if c.max_grad_norm > 0 else math.inf  # inf: measure the norm, clip nothing
        norm = clip_grad_norm(params, max_norm) if self.fsdp else float(acc.clip_grad_norm_(params, max_norm))
        which = "generator" if opt is self.opt_g else "fake score"
        if not math.isfinite(norm) and acc.mixed_precision != "fp16":
            opt.zero_grad(set_to_none=True)  # the weights stay as they were
            self.nonfinite_updates += 1
            self.nonfinite_in_a_row[which] = self.nonfinite_in_a_row.get(which, 0) + 1
            if self.nonfinite_in_a_row[which] >= c.max_nonfinite_updates:
                raise TrainingDiverged(
                    f"step {self.state.step}: {self.nonfinite_in_a_row[which]} {which} updates in a row had non-finite gradients; "
                    f"stopped. The last good checkpoint: {self.latest_checkpoint() or 'none'} (lower the learning "
                    "rates, or check the data)"
                )
            return norm
        self.nonfinite_in_a_row[which] = 0
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
        """One iteration: maybe a generator update, then maybe a fake-score (and heads) update, each over
        ``gradient_accumulation_steps`` micro-batches (their own noise: the stream is re-seeded per micro-batch)."""
        step, k = self.state.step, self.config.gradient_accumulation_steps
        batches = []
        for micro in range(k):
            self.state.reseed(micro)
            batches.append(self.make_batch())
        logs: dict[str, float] = {}
        for net in (self.generator, self.fake):  # back in train mode after a preview or an evaluation
            if net is not None and not (net.training and net.backbone.training):
                net.train()  # (walks every module: 5 ms a step for a LoRA-adapted UNet, so only when needed)
        if self.is_generator_step(step):
            for batch in batches:
                # autocast (bf16/fp16 mixed precision; a no-op with "no") also covers the teacher, which is not prepared
                with self.accelerator.autocast():
                    if step < self.config.regression_warmup_steps:
                        loss_g, lg = self.warm_start.loss(batch)
                    else:
                        loss_g, lg = self.generator_loss(batch)
                self._backward(loss_g)
                _accumulate(logs, lg, k)
            logs["grad_norm/generator"] = self._update(self.generator, self.opt_g, self.sched_g)
            self.after_generator_step()
        if self.opt_f is not None:
            self.opt_f.zero_grad(set_to_none=True)  # drop any gradient the generator step left behind
        if self.is_fake_step(step):
            for batch in batches:
                with self.accelerator.autocast():
                    loss_f, lf = self.fake_score_loss(batch)
                self._backward(loss_f)
                _accumulate(logs, lf, k)
            params = nn.ModuleList([m for m in (self.fake, self.heads) if m is not None])
            logs["grad_norm/fake"] = self._update(params, self.opt_f, self.sched_f)
        if self.nonfinite_updates:
            logs["nonfinite/skipped"] = float(self.nonfinite_updates)
        self.state.step += 1
        return logs

    def train(self) -> Path | None:
        """Run the loop to ``max_steps``; returns the exported student folder (main process), or None
        when SIGINT / SIGTERM stopped it (``self.interrupted`` names the signal; a checkpoint is written).
        The signal handlers are in place from before the run folder is written until the run ends."""
        self.interrupted: str | None = None
        with StopRequest(self.accelerator) as stop:
            return self._run(stop)

    def _run(self, stop: StopRequest) -> Path | None:
        from tqdm.auto import tqdm

        from .tracking import RunTracking

        acc, c = self.accelerator, self.config
        tracking = RunTracking(self)  # eval_every (trainers/tracking.py): its errors come before any write
        if not c.resume:
            self.claim_output_dir()  # another run's folder: refused (or cleared with overwrite) before any write
        self.output_dir.mkdir(parents=True, exist_ok=True)
        if acc.is_main_process:
            write_text(self.output_dir / "config.json", json.dumps(config_to_dict(c), indent=2) + "\n")
        if c.resume:
            self.load_checkpoint(c.resume)
        if acc.is_main_process and c.log_with != "none":
            acc.init_trackers("onestep", config=flat_hparams(config_to_dict(c)))
        bar = tqdm(
            total=c.max_steps, initial=self.state.step, desc=f"{self.method_name} distillation", disable=not acc.is_main_process
        )
        start = time.time()
        first = self.state.step
        logs: dict[str, float] = {}
        shown: dict[str, str] = {}
        while self.state.step < c.max_steps:
            logs.update(self.train_step())  # the latest value of every key since the last log
            step = self.state.step
            bar.update(1)
            if c.log_every and (step % c.log_every == 0 or step == c.max_steps):
                logs["lr/generator"] = self.sched_g.get_last_lr()[0]
                if self.sched_f is not None:
                    logs["lr/fake"] = self.sched_f.get_last_lr()[0]
                acc.log(logs, step=step)
                shown = {k.split("/")[-1]: f"{v:.3g}" for k, v in logs.items() if k.startswith("loss/")}
                bar.set_postfix({**shown, **tracking.shown})
                logs = {}
            if c.preview_every and step % c.preview_every == 0:
                self.save_preview(step)
            if tracking.due(step):
                tracking.evaluate(step)
                bar.set_postfix({**shown, **tracking.shown})
            if c.checkpoint_every and step % c.checkpoint_every == 0 and step < c.max_steps:
                self.save_checkpoint()
            if stop.requested():  # SIGINT / SIGTERM: checkpoint and leave, on every process at the same step
                self.interrupted = stop.signal_name
                break
        bar.close()
        self.train_seconds = time.time() - start
        self.steps_run = self.state.step - first
        self.save_checkpoint()
        student = self.export() if c.export and self.interrupted is None else None
        acc.wait_for_everyone()
        acc.end_training()
        return student


__all__ = ["DistillConfig", "DistillTrainer"]
