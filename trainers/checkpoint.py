"""Checkpoints of a run: writing ``checkpoint-{step}`` folders and resuming from them.

:class:`CheckpointMixin` is part of :class:`~onestep.trainers.base.DistillTrainer`. It writes
``checkpoint-{step}`` folders, safetensors and JSON only (:mod:`.checkpoint_files`; with FSDP,
whole tensors gathered from the shards), plus each of the method's
:meth:`~onestep.trainers.base.DistillTrainer.extra_networks` as ``<name>.safetensors`` and, when
EMA or a LoRA generator is on, the weights an export would hold
(:data:`onestep.weights.EXPORT_WEIGHTS`, from :mod:`.exporting`). It resumes from them.
"""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path
from typing import Any

import torch
from accelerate.logging import get_logger
from torch import nn

from onestep.denoiser import Denoiser
from onestep.errors import ConfigError
from onestep.files import replace_dir, staging_dir
from onestep.weights import EXPORT_WEIGHTS, load_trainable, save_state, save_tensors

from .checkpoint_files import CHECKPOINT_FORMAT, load_training_state, save_training_state
from .sharding import fsdp_settings, gather_full, load_whole, shard

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
    """Checkpoint and resume of a :class:`~onestep.trainers.base.DistillTrainer` (its export and previews:
    :class:`~onestep.trainers.exporting.ExportMixin`)."""

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


__all__ = ["CHECKPOINT_MARKER", "CheckpointMixin", "LoopState"]
