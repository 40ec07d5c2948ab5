"""What a run exports: the generator as the student folder holds it (EMA weights, LoRA merged,
averaged, gathered under FSDP), written a tensor at a time; previews of it during training.

:class:`ExportMixin` is part of :class:`~onestep.trainers.base.DistillTrainer`; the checkpoints
(:mod:`.checkpoint`) write its :meth:`ExportMixin.export_state` as
:data:`onestep.weights.EXPORT_WEIGHTS`.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

import torch
from accelerate.logging import get_logger
from torch import nn

from onestep.conditioning import Cond
from onestep.config import config_to_dict
from onestep.denoiser import Denoiser
from onestep.errors import TrainingDiverged
from onestep.files import replace_dir, staging_dir
from onestep.lora import lora_layers_for_diffusers, merged_lora, merged_lora_state
from onestep.weights import StateDict, average_with, averaged_state

from .memory import float32_copy, to_float32
from .sharding import full, gather_full, is_sharded

logger = get_logger(__name__)


class ExportMixin:
    """The student a :class:`~onestep.trainers.base.DistillTrainer` exports, and its previews."""

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
    def export_view(self) -> Iterator[nn.Module | None]:
        """A network that samples as the export would now, for previews and periodic evaluation, on the
        main process (None on the others; every process must enter it: FSDP gathers).

        Without FSDP and ``export_average_with`` it is the trained network itself, with the EMA weights
        standing in its trained parameters inside the ``with`` (restored after), so no whole copy is
        made (a LoRA SDXL generator's merged float32 copy is 10.3 GB, on the GPU when training there).
        A LoRA generator then samples unmerged, its adapters on its base weights as in training: the
        merged export's function, within the rounding of the merge and of the base's storage dtype."""
        c = self.config
        if self.fsdp or c.export_average_with is not None:
            yield self.generator_on_main()
            return
        if not self.accelerator.is_main_process:
            yield None
            return
        with self._ema_weights_in(self.generator.backbone) as net:
            yield net

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
        # LoRA: the EMA's adapters stand in the network, read as the entries are written; a full
        # generator's EMA weights are the EMA's own tensors (no swap, no copy)
        with self._ema_weights_in(net) if c.generator_lora_rank else nullcontext():
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

    @contextmanager
    def _ema_weights_in(self, net: nn.Module) -> Iterator[nn.Module]:
        """``net`` (the trained generator) with the EMA weights standing in its trained parameters inside the
        ``with``, its own restored after; ``net`` as it is without EMA."""
        trained = [p for p in net.parameters() if p.requires_grad] if self.ema is not None else []
        if trained:
            self.ema.store(trained)
            self.ema.copy_to(trained)
        try:
            yield net
        finally:
            if trained:
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
        if net is None:
            with self.export_view() as view:
                return self.preview_samples(n, view)
        gen = self.sampling_generator(net)
        was_training = net.training
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

        with self.export_view() as net:
            if not self.accelerator.is_main_process:
                return None
            x = images_of(self, self.preview_samples(net=net)[0])
        path = self.output_dir / "previews" / f"step-{step:06d}.png"
        save_samples_picture(x, path, title=f"{self.method_name} step {step}", nrow=10)
        if self.config.log_with != "none":
            log_picture(self.accelerator, path, step)  # the same grid, as an image in the trackers
        return path


__all__ = ["ExportMixin"]
