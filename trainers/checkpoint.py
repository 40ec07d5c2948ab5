"""What a run leaves on disk: checkpoints, the exported student and preview grids.

:class:`CheckpointMixin` is part of :class:`~onestep.trainers.base.DistillTrainer`. It writes
``checkpoint-{step}`` folders, safetensors and JSON only (:mod:`.checkpoint_files`; with FSDP,
whole tensors gathered from the shards), plus each of the method's
:meth:`~onestep.trainers.base.DistillTrainer.extra_networks` as ``<name>.safetensors`` and, when
EMA or a LoRA generator is on, the weights an export would hold
(:data:`onestep.weights.EXPORT_WEIGHTS`). It resumes from them, builds the generator to
export (EMA weights, LoRA merged, gathered under FSDP) and exports it as a student folder.
"""

from __future__ import annotations

import copy
import json
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from accelerate.logging import get_logger
from torch import nn

from onestep.conditioning import Cond
from onestep.config import config_to_dict
from onestep.denoiser import Denoiser
from onestep.errors import ConfigError, TrainingDiverged
from onestep.files import replace_dir, staging_dir
from onestep.lora import lora_layers_for_diffusers, merged_lora, merged_lora_state
from onestep.weights import EXPORT_WEIGHTS, StateDict, average_with, averaged_state, load_trainable, save_state, save_tensors

from .checkpoint_files import CHECKPOINT_FORMAT, load_training_state, save_training_state
from .memory import float32_copy, to_float32
from .sharding import fsdp_settings, full, gather_full, is_sharded, load_whole, shard

logger = get_logger(__name__)

#: Written last into a checkpoint folder: a folder without it is incomplete.
CHECKPOINT_MARKER = "checkpoint.json"


class LoopState:
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

    def reseed(self, micro: int = 0) -> None:
        """Seed both streams for this step (and micro-batch ``micro`` of a gradient-accumulated update)."""
        own = (self.seed * 1_000_003 + self.rank) * 1_000_003 + self.step
        shared = (self.seed * 1_000_003 - 1) * 1_000_003 + self.step
        if micro:
            own, shared = own * 1_000_003 + micro, shared * 1_000_003 + micro
        self.rng.manual_seed(own)
        self.shared_rng.manual_seed(shared)

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step = int(state["step"])
        self.reseed()


class CheckpointMixin:
    """Checkpoint, resume, export and previews of a :class:`~onestep.trainers.base.DistillTrainer`."""

    # ------------------------------------------------------------- sharding
    def _shard_networks(self) -> None:
        """FSDP: shard the generator, the fake score (with LoRA: the backbone it shares with the
        teacher), a separate teacher copy, the heads and the method's extra networks, each block
        its own unit."""
        kwargs = fsdp_settings(self.accelerator)
        device = self.accelerator.device
        # The export rebuilds the whole generator from gathered weights: keep its structure
        # (on the meta device) and its buffers (small), not a second copy of its weights.
        template = copy.deepcopy(self.generator.backbone)
        self._export_buffers = {n: b.clone() for n, b in template.named_buffers()}
        self._export_template = template.to("meta")
        extras = [net.backbone if isinstance(net, Denoiser) else net for net in self.extras.values()]
        nets = [self.generator.backbone, self.triad.teacher.backbone, self.heads, *extras]
        if self.fake is not None:
            nets.insert(1, self.fake.backbone)
        for net in nets:
            shard(net.to(device), **kwargs)

    def _place_networks(self) -> None:
        """Without FSDP: ``accelerator.prepare`` the trained networks, optimizers and schedulers (device
        placement, identical start on every rank, mixed precision); with FSDP (already sharded and
        placed) only the frozen parts move."""
        acc = self.accelerator
        if not self.fsdp:
            models = [self.generator] + ([self.fake] if self.fake is not None else [])
            has_heads = len(list(self.heads.parameters())) > 0
            models += [self.heads] if has_heads else []
            opts = [o for o in (self.opt_g, self.opt_f, self.sched_g, self.sched_f) if o is not None]
            prepared = acc.prepare(*models, *opts)
            nets, opts = [acc.unwrap_model(m) for m in prepared[: len(models)]], list(prepared[len(models) :])
            self.generator = nets.pop(0)
            self.fake = nets.pop(0) if self.fake is not None else None
            self.heads = nets.pop(0) if has_heads else self.heads.to(acc.device)
            self.opt_g = opts.pop(0)
            self.opt_f = opts.pop(0) if self.opt_f is not None else None
            self.sched_g = opts.pop(0)
            self.sched_f = opts.pop(0) if self.sched_f is not None else None
            self.extras = {name: net.to(acc.device) for name, net in self.extras.items()}
        self.teacher = self.triad.teacher.to(acc.device)
        if self.teacher_spec.vae is not None:
            self.teacher_spec.vae.to(acc.device)
        if self.ema is not None:
            self.ema.to(acc.device)

    # -------------------------------------------------- checkpoint / resume
    #: What a run writes into its folder besides its checkpoints.
    RUN_OUTPUTS = ("config.json", "student", "previews", "logs", "disback")

    def claim_output_dir(self) -> None:
        """Before a new run (no ``resume``) writes anything: refuse a folder that holds another run, or
        with ``overwrite`` remove that run's outputs (only those, never other files of the folder)."""
        acc = self.accelerator
        previous = [*self.checkpoints(), *(p for p in (self.output_dir / n for n in self.RUN_OUTPUTS) if p.exists())]
        acc.wait_for_everyone()  # every process has looked before any of them writes
        if not previous:
            return
        if not self.config.overwrite:
            raise ConfigError(
                f"{self.output_dir} holds another run ({', '.join(p.name for p in previous[:3])}); pass --resume latest "
                "to continue it, --overwrite true to start over, or another --output-dir"
            )
        if acc.is_main_process:
            staged = [p for p in self.output_dir.glob(".*") if p.name.endswith((".incomplete", ".old"))]
            for p in previous + staged:
                shutil.rmtree(p) if p.is_dir() else p.unlink()
        acc.wait_for_everyone()

    def checkpoints(self) -> list[Path]:
        """Every ``checkpoint-N`` folder of the run, oldest first (complete or not)."""
        found = [p for p in self.output_dir.glob("checkpoint-*") if p.name.split("-")[-1].isdigit()]
        return sorted(found, key=lambda p: int(p.name.split("-")[-1]))

    def save_checkpoint(self) -> Path:
        """Write ``checkpoint-{step}``: into a hidden staging folder, renamed into place once every file
        and the :data:`CHECKPOINT_MARKER` are written, so a crash never leaves a half checkpoint under
        that name. Refuses a generator with non-finite weights."""
        acc = self.accelerator
        final = self.output_dir / f"checkpoint-{self.state.step}"
        self.check_finite("checkpoint")
        acc.wait_for_everyone()
        if acc.is_main_process:
            staging_dir(final)
        acc.wait_for_everyone()
        path = final.with_name(f".{final.name}.incomplete")
        save_training_state(path, acc, self._trained_with_optimizers(), self._trainer_state(), self.ema, self._ema_names())
        for name, net in self.saved_extra_networks().items():
            # safetensors of the whole network (with FSDP every process gathers, the main one writes)
            if self.fsdp:
                state = gather_full(net)
                if acc.is_main_process:
                    save_tensors(state, path / f"{name}.safetensors")
            elif acc.is_main_process:
                save_state(net, path / f"{name}.safetensors")
        if self.export_differs():
            # The weights an export would hold now (EMA, LoRA merged, averaged), for evaluation;
            # written a tensor at a time, never held whole (with FSDP every process gathers).
            with self.export_state() as (_, state):
                if state is not None:
                    save_tensors(state, path / EXPORT_WEIGHTS)
        acc.wait_for_everyone()  # every process's files are in
        if acc.is_main_process:
            (path / CHECKPOINT_MARKER).write_text(json.dumps({"step": self.state.step, "format": CHECKPOINT_FORMAT}) + "\n")
            replace_dir(path, final)
            if self.config.checkpoint_total_limit:
                for old in self.checkpoints()[: -self.config.checkpoint_total_limit]:
                    # renamed aside first: a crash mid-removal leaves a hidden folder, never a gutted checkpoint-N
                    old.rename(old.with_name(f".{old.name}.old"))
            for aside in self.output_dir.glob(".checkpoint-*.old"):  # (and any an earlier crash left)
                shutil.rmtree(aside, ignore_errors=True)
        acc.wait_for_everyone()
        return final

    def latest_checkpoint(self) -> Path | None:
        """The newest complete checkpoint (one holding :data:`CHECKPOINT_MARKER`); incomplete ones, left by a
        crash of an older onestep, are skipped with a warning naming them."""
        for path in reversed(self.checkpoints()):
            if (path / CHECKPOINT_MARKER).is_file():
                return path
            logger.warning(f"--resume latest: skipping {path}: incomplete (no {CHECKPOINT_MARKER}; an interrupted write)")
        return None

    def load_checkpoint(self, which: str) -> bool:
        """Resume from ``which`` (``latest`` or a checkpoint folder); False when ``latest`` finds none
        (the run then starts fresh, as diffusers' training scripts do)."""
        if which == "latest":
            path = self.latest_checkpoint()
            if path is None:
                logger.warning(f"--resume latest: no complete checkpoint in {self.output_dir}; starting a new run")
                return False
        else:
            path = Path(which)
            if not path.is_dir():
                raise ConfigError(f"--resume {which}: not a checkpoint folder")
            if not (path / CHECKPOINT_MARKER).is_file():
                raise ConfigError(f"--resume {which}: incomplete checkpoint (no {CHECKPOINT_MARKER}); resume from an earlier one")
        info = load_training_state(path, self.accelerator, self._trained_with_optimizers(), self.ema, self._ema_names())
        self.state.load_state_dict({"step": info["step"]})
        self.sched_g.load_state_dict(info["sched_generator"])
        if self.sched_f is not None:
            self.sched_f.load_state_dict(info["sched_fake_score"])
        scaler = self.accelerator.scaler
        if scaler is not None and "grad_scaler" in info:
            scaler.load_state_dict(info["grad_scaler"])
        for name, net in self.saved_extra_networks().items():
            file = path / f"{name}.safetensors"
            if not file.is_file():
                raise ConfigError(f"--resume {path}: {file.name} is missing; the checkpoint does not match this run's networks")
            if self.fsdp:
                from safetensors.torch import load_file

                load_whole(net, load_file(str(file)), set(net.state_dict()), str(file))
            else:
                load_trainable(net, file, str(file))
        return True

    def _trained_with_optimizers(self) -> dict[str, tuple[nn.Module, torch.optim.Optimizer]]:
        """What a checkpoint holds, each trained network with its optimizer (names are file names)."""
        nets = {"generator": (self.generator.backbone, self.opt_g)}
        if self.opt_f is not None:
            trained = {"heads": self.heads} if self.fake is None else {"fake": self.fake.backbone, "heads": self.heads}
            nets["fake_score"] = (nn.ModuleDict(trained), self.opt_f)
        return nets

    def _trainer_state(self) -> dict[str, Any]:
        state = {"step": self.state.step, "sched_generator": self.sched_g.state_dict()}
        if self.sched_f is not None:
            state["sched_fake_score"] = self.sched_f.state_dict()
        if self.accelerator.scaler is not None:  # fp16
            state["grad_scaler"] = self.accelerator.scaler.state_dict()
        return state

    def _ema_names(self) -> list[str]:
        return [n for n, p in self.generator.backbone.named_parameters() if p.requires_grad]

    # ------------------------------------------------------ export / preview
    def export_differs(self) -> bool:
        """Whether the exported generator differs from the trained one (EMA, LoRA merged, an average)."""
        c = self.config
        return self.ema is not None or bool(c.generator_lora_rank) or c.export_average_with is not None

    def generator_for_export(self, lora: dict[str, torch.Tensor] | None = None) -> nn.Module:
        """The generator backbone to export: a copy holding the EMA weights when EMA is on, with LoRA
        adapters merged into plain layers when the generator is LoRA, averaged with
        ``export_average_with`` when set (the trained network itself when none of these apply).
        ``lora``: filled with the adapters in diffusers' LoRA form, before they are merged."""
        if self.fsdp:
            return self._gathered_generator(lora)
        net = self.generator.backbone
        if not self.export_differs():
            return net
        # a LoRA generator merges in float32: copied straight into float32 (its base may be frozen in bf16)
        net = float32_copy(net) if self.config.generator_lora_rank else copy.deepcopy(net)
        if self.ema is not None:
            self.ema.copy_to([p for p in net.parameters() if p.requires_grad])
        return self._finish_export(net, lora)

    @contextmanager
    def export_state(self, lora: dict[str, torch.Tensor] | None = None) -> Iterator[tuple[nn.Module | None, StateDict | None]]:
        """``(network, state dict)`` of the generator an export holds now (EMA weights, LoRA merged,
        averaged with ``export_average_with``) on the main process, ``(None, None)`` on the others; the
        network gives the config and class, the state dict the weights. Every process must enter it
        (with FSDP the weights are gathered). Write the weights inside the ``with``.

        Without FSDP nothing is copied whole: EMA weights are the EMA's own tensors, and a LoRA
        generator's merged float32 weights (and an average) are :class:`~onestep.weights.Deferred`,
        built one at a time as they are written (the merged copy of an SDXL UNet is 10.3 GB), while
        the EMA's adapters stand in the network. ``lora``: filled with the adapters in diffusers' form."""
        if self.fsdp:
            net = self._gathered_generator(lora)
            yield (None, None) if net is None else (net, net.state_dict())
            return
        if not self.accelerator.is_main_process:
            yield None, None
            return
        c, net = self.config, self.generator.backbone
        if not self.export_differs():
            yield net, net.state_dict()
            return
        trained = [p for p in net.parameters() if p.requires_grad]
        swap = self.ema is not None and bool(c.generator_lora_rank)  # the adapters are read as the entries are written
        if swap:
            self.ema.store(trained)
            self.ema.copy_to(trained)
        try:
            if c.generator_lora_rank:
                if lora is not None:
                    lora.update(lora_layers_for_diffusers(net, "generator"))
                state = merged_lora_state(net)
            else:
                state = net.state_dict()
                if self.ema is not None:
                    state.update(zip(self._ema_names(), self.ema.shadow_params))
            if c.export_average_with is not None:
                state = averaged_state(state, c.export_average_with, c.export_average_weight)
            yield net, state
        finally:
            if swap:
                self.ema.restore(trained)

    def _finish_export(self, net: nn.Module, lora: dict[str, torch.Tensor] | None = None) -> nn.Module:
        """LoRA merged into plain layers (its adapters first copied into ``lora`` in diffusers' form when
        given), then the average with ``export_average_with`` (in place)."""
        c = self.config
        if c.generator_lora_rank:
            if lora is not None:
                lora.update(lora_layers_for_diffusers(net, "generator"))
            net = merged_lora(to_float32(net))  # a base frozen in bf16/fp16 takes the adapters in float32
        if c.export_average_with is not None:
            average_with(net, c.export_average_with, c.export_average_weight)
        return net

    def generator_on_main(self, lora: dict[str, torch.Tensor] | None = None) -> nn.Module | None:
        """:meth:`generator_for_export` on the main process, None on the others. Every process must
        call it: with FSDP the weights are gathered from all of them."""
        if self.fsdp or self.accelerator.is_main_process:
            return self.generator_for_export(lora)
        return None

    def _gathered_generator(self, lora: dict[str, torch.Tensor] | None = None) -> nn.Module | None:
        """FSDP: the whole generator rebuilt from its shards on the main process (None on the others;
        every process must call this, the gathering is collective)."""
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
        return self._finish_export(net, lora)

    def export_timesteps(self) -> list[int]:
        """The sampling timesteps written into the student's onestep.json."""
        return list(self.config.generator_timesteps)

    def export_meta(self) -> dict[str, Any]:
        """Method-specific fields added to the student's onestep.json."""
        return {}

    def export(self) -> Path | None:
        from onestep.export import export_student
        from onestep.export_variants import diffusers_lora_blocker

        c = self.config
        self.check_finite("student")
        extra = {"config": config_to_dict(c), **self.export_meta(), **({"metrics": self.run_metrics} if self.run_metrics else {})}
        lora, why_not = None, None  # a LoRA generator of an SD / SDXL teacher: its adapters as a diffusers LoRA file too
        if c.generator_lora_rank:
            why_not = diffusers_lora_blocker(self.generator.backbone, self.teacher_spec, c.export_average_with, c.init_generator)
            lora = {} if why_not is None else None
            alpha = c.generator_lora_alpha or c.generator_lora_rank
            extra["diffusers_lora"] = {"rank": c.generator_lora_rank, "alpha": alpha, "file": None, **({"reason": why_not} if why_not else {})}
        with self.export_state(lora) as (net, state):
            if not self.accelerator.is_main_process:
                return None
            if why_not and self.teacher_spec.conditioning.kind == "text":
                logger.warning(f"export: the student has no diffusers LoRA file (lora/): {why_not}")
            final = self.output_dir / "student"
            staging = staging_dir(final)  # written aside, then renamed: an existing student is replaced only whole
            export_student(
                staging,
                net,
                self.teacher_spec,
                method=self.method_name,
                prediction_type=self.generator.prediction_type,
                timesteps=self.export_timesteps(),
                extra=extra,
                variant=None if c.export_variant == "none" else c.export_variant,
                lora_layers=lora,
                state=state,
            )
        return replace_dir(staging, final)

    def check_finite(self, what: str) -> None:
        """Refuse to write a generator whose weights are not all finite (into a checkpoint or a student)."""
        # each process checks what it holds (its shards under FSDP); every process learns the total
        bad = [n for n, p in self.generator.named_parameters() if not bool(torch.isfinite(p.to_local() if is_sharded(p) else p).all())]
        count = len(bad)
        if self.accelerator.num_processes > 1:
            count = int(self.accelerator.reduce(torch.tensor([count], device=self.device), reduction="sum").item())
        if count:
            raise TrainingDiverged(
                f"step {self.state.step}: the generator has non-finite weights ({bad[0] if bad else 'on another process'} "
                f"...); no {what} written. "
                f"The last good checkpoint: {self.latest_checkpoint() or 'none'}"
            )

    def sampling_generator(self, net: nn.Module) -> Denoiser:
        """The exported backbone ``net`` as the denoiser the student's sampler calls."""
        return Denoiser(net, self.schedule, self.generator.prediction_type)

    @torch.no_grad()
    def preview_samples(self, n: int | None = None, net: nn.Module | None = None) -> tuple[torch.Tensor, Cond]:
        """Samples of the generator that would be exported now (EMA weights when EMA is on),
        for fixed seeds (the same across a run). ``net``: that generator, when already at hand."""
        from onestep.samplers.student import sample_student_from_seeds

        n = n or self.config.preview_num
        labels = [i % max(1, self.conditioning.num_classes) for i in range(n)]
        gen = self.sampling_generator(net if net is not None else self.generator_for_export())
        was_training = self.generator.training
        gen.eval()
        x, cond = sample_student_from_seeds(
            gen, self.teacher_spec, self.export_timesteps(), seeds=range(n), labels=labels, device=self.device
        )
        gen.train(was_training)
        return x, cond

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        """Images from generator samples: the teacher's VAE decode for latent teachers, else ``x``."""
        return self.teacher_spec.decode(x)

    def save_preview(self, step: int) -> Path | None:
        from onestep.viz import save_samples_picture

        from .tracking import images_of, log_picture

        net = self.generator_on_main()
        if not self.accelerator.is_main_process:
            return None
        x = images_of(self, self.preview_samples(net=net)[0])
        path = self.output_dir / "previews" / f"step-{step:06d}.png"
        save_samples_picture(x, path, title=f"{self.method_name} step {step}", nrow=10)
        if self.config.log_with != "none":
            log_picture(self.accelerator, path, step)  # the same grid, as an image in the trackers
        return path


__all__ = ["CHECKPOINT_MARKER", "CheckpointMixin", "LoopState"]
