"""DisBack: distribution backtracking around a score-distillation method
(Zhang et al., 2024, "Distribution Backtracking Builds a Faster Convergence Trajectory
for Diffusion Distillation", arXiv:2408.15991).

Wraps DMD2, VSD, f-distill or SiD (``method: disback-dmd2`` ...). Iterations run in stages:

0. (only with ``regression_warmup_steps``, for students that cannot start as a copy of the
   teacher, e.g. the analytic gmm teachers) the generator's regression warm start, while the
   fake score learns the teacher's own data, so that it starts stage 1 close to the teacher.
1. degradation recording, ``disback_record_steps`` iterations: the generator G0 is frozen;
   the fake score is trained with the base method's fake-score loss on G0's samples, and
   N + 1 nodes of it are saved along the way (``disback/node-00.safetensors`` at the start,
   close to the teacher, ... ``node-N`` at the end, close to the score of G0's samples).
2. backtracking: the fake score continues from node N; the generator is trained with the
   base method, its "real" score being node N-1, then N-2, ... each for
   ``disback_interval`` generator steps, and finally the teacher itself, to the end.

Nodes hold the fake score's trainable weights (the whole network for a full copy, the
adapters for LoRA) and load strictly: a missing or unexpected tensor is an error. The
current stage and target are derived from the step, so a resumed run continues with the
same target; ``disback/state.json`` shows them.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from accelerate.logging import get_logger
from torch import nn

from onestep.config import config_field
from onestep.errors import ConfigError
from onestep.files import write_file, write_text
from onestep.triad import weight_sharing_copy
from onestep.weights import load_trainable, save_tensors, save_trainable

from .sharding import gather_trainable, load_whole
from .dmd2 import DMD2Config, DMD2Trainer
from .fdistill import FDistillConfig, FDistillTrainer
from .sid import SiDConfig, SiDTrainer
from .vsd import VSDConfig, VSDTrainer

logger = get_logger(__name__)

@dataclass
class DisBackFields:
    """The DisBack settings added to the base method's config."""

    disback_nodes: int = config_field("N: the degradation path is saved as N + 1 fake-score nodes", 4)
    disback_record_steps: int = config_field("iterations of stage 1 (degradation recording, generator frozen)", 200)
    disback_interval: int = config_field("generator steps spent on each intermediate target in stage 2", 50)

    def check_disback(self) -> None:
        if self.disback_nodes < 1 or self.disback_record_steps < self.disback_nodes or self.disback_interval < 1:
            raise ConfigError(
                "need disback_nodes >= 1, disback_record_steps >= disback_nodes and disback_interval >= 1 "
                f"(got {self.disback_nodes}, {self.disback_record_steps}, {self.disback_interval})"
            )


class DisBackMixin:
    """Stages and targets of DisBack on top of a distribution-matching trainer."""

    def __init__(self, config, **kwargs):
        super().__init__(config, **kwargs)
        self.real_teacher = self.teacher
        self.node_dir = self.output_dir / "disback"
        self.current_target: int | None = None
        if self.teacher_spec.student_factory is not None and not (config.regression_warmup_steps or config.init_fake_score):
            raise ConfigError(
                f"DisBack on {self.teacher_spec.name}: the fake score is a fresh network, not a copy of the teacher; "
                "set regression_warmup_steps > 0 (it then learns the teacher's data meanwhile) or init_fake_score "
                "to a fake score fitted to the teacher"
            )
        # The teacher is the target only after N-1 intervals of backtracking: a run too short for that
        # trains its generator on the degraded nodes alone and never on the teacher.
        reach = self.backtrack_start + config.fake_updates_per_generator * (config.disback_nodes - 1) * config.disback_interval
        teacher_steps = self.generator_steps_since_backtrack(config.max_steps) - (config.disback_nodes - 1) * config.disback_interval
        if teacher_steps <= 0:
            logger.warning(
                f"DisBack: max_steps {config.max_steps} ends before the teacher becomes the target (iteration {reach}: "
                f"{config.disback_record_steps} recording iterations, then {config.disback_nodes - 1} nodes x "
                f"{config.disback_interval} generator steps); the generator trains on intermediate nodes only. Raise max_steps "
                "or lower disback_record_steps / disback_interval",
                main_process_only=True,
            )

    # ------------------------------------------------------------- stages
    @property
    def record_start(self) -> int:
        return self.config.regression_warmup_steps

    @property
    def backtrack_start(self) -> int:
        return self.record_start + self.config.disback_record_steps

    def node_step(self, i: int) -> int:
        """The iteration count (``state.step``) at which node ``i`` is saved."""
        c = self.config
        return self.record_start + round(i * c.disback_record_steps / c.disback_nodes)

    def node_path(self, i: int) -> Path:
        return self.node_dir / f"node-{i:02d}.safetensors"

    def stage(self, step: int) -> str:
        if step < self.record_start:
            return "warmup"
        return "record" if step < self.backtrack_start else "backtrack"

    def generator_steps_since_backtrack(self, step: int) -> int:
        """Generator updates in iterations ``[backtrack_start, step)``."""
        r, b = self.config.fake_updates_per_generator, self.backtrack_start
        return max(0, -(-step // r) - (-(-b // r)))

    def target_index(self, step: int) -> int:
        """Node used as the real score at ``step`` in stage 2: N-1, N-2, ..., then 0 (the teacher)."""
        c = self.config
        return max(0, c.disback_nodes - 1 - self.generator_steps_since_backtrack(step) // c.disback_interval)

    def is_generator_step(self, step: int) -> bool:
        if self.stage(step) == "record":
            return False  # G0 stays frozen while the path is recorded
        return super().is_generator_step(step)

    # -------------------------------------------------------------- loop
    @property
    def uses_real_data(self) -> bool:
        return self.config.regression_warmup_steps > 0 or super().uses_real_data

    def fake_score_loss(self, batch: dict[str, Any]):
        if self.stage(self.state.step) == "warmup":
            # Stage 0: the fresh fake score learns the teacher's data.
            loss = self.denoising_loss(self.fake, batch["real"], batch["real_cond"])
            return loss, {"loss/fake_teacher_data": loss.item()}
        return super().fake_score_loss(batch)

    def train_step(self) -> dict[str, float]:
        step = self.state.step
        if step == self.node_step(0):
            self.save_node(0)
        if self.stage(step) == "backtrack":
            self.set_target(self.target_index(step))
        logs = super().train_step()
        for i in range(1, self.config.disback_nodes + 1):
            if self.state.step == self.node_step(i):
                self.save_node(i)
        if self.current_target is not None:
            logs["disback/target"] = self.current_target
        return logs

    # ------------------------------------------------------------ nodes
    def extra_networks(self) -> dict[str, nn.Module]:
        # The network that holds a node as the real score: a frozen copy of the fake score, built
        # now, whole (under FSDP it is sharded with the triad; a sharded network cannot be copied later).
        # A LoRA fake score's copy shares the frozen base (one backbone in memory) and copies the adapters.
        shares = self.config.fake_score == "lora" and not self.fsdp
        node = weight_sharing_copy(self.fake, frozen_only=True) if shares else copy.deepcopy(self.fake)
        return {**super().extra_networks(), "node_target": node.requires_grad_(False).eval()}

    def saved_extra_networks(self) -> dict[str, nn.Module]:
        # The node target is read back from its node file on resume (set_target), not checkpointed.
        return {k: v for k, v in super().saved_extra_networks().items() if k != "node_target"}

    def _trainable_names(self) -> set[str]:
        return {n for n, p in self.fake.backbone.named_parameters() if p.requires_grad}

    def save_node(self, i: int) -> Path:
        acc = self.accelerator
        path = self.node_path(i)
        meta = {"node": str(i), "step": str(self.state.step)}
        if self.fsdp:  # gathered on every process, written by the main one
            names = self._trainable_names()
            state = {k: v for k, v in gather_trainable(self.fake.backbone).items() if k in names}
        if acc.is_main_process:
            self.node_dir.mkdir(parents=True, exist_ok=True)
            if self.fsdp:
                write_file(path, lambda tmp: save_tensors(state, tmp, metadata=meta))
            else:
                write_file(path, lambda tmp: save_trainable(self.fake.backbone, tmp, metadata=meta))
            self.write_state()
        acc.wait_for_everyone()
        return path

    def set_target(self, i: int) -> None:
        """Make node ``i`` the real score of the generator step (node 0 is the teacher itself)."""
        if i == self.current_target:
            return
        if i == 0:
            self.teacher = self.real_teacher
        else:
            target = self.extras["node_target"]
            # A node holds the fake score's trainable weights (all of it, or its LoRA adapters).
            if self.fsdp:
                from safetensors.torch import load_file

                path = self.node_path(i)
                if not path.is_file():
                    raise ConfigError(f"DisBack node {i}: {path} is missing")
                load_whole(target.backbone, load_file(str(path)), self._trainable_names(), f"DisBack node {i}: {path}")
            else:
                load_trainable(target.backbone, self.node_path(i), f"DisBack node {i}", self._trainable_names())
            self.teacher = target
        self.current_target = i
        if self.accelerator.is_main_process:
            # the step the schedule made it the target (a resumed run sets it again, later, to the same effect)
            since = next(s for s in range(self.backtrack_start, self.state.step + 1) if self.target_index(s) == i)
            self.write_state(since)

    def write_state(self, step: int | None = None) -> None:
        """``disback/state.json``: the stage and target at ``step`` (default: now) and the nodes saved."""
        step = self.state.step if step is None else step
        saved = sorted(p.name for p in self.node_dir.glob("node-*.safetensors"))
        target = None if self.current_target is None else ("teacher" if self.current_target == 0 else f"node-{self.current_target:02d}")
        state = {"stage": self.stage(step), "step": step, "target": target, "nodes": saved}
        write_text(self.node_dir / "state.json", json.dumps(state, indent=2) + "\n")


# One explicit (config, trainer) pair per base method.


@dataclass
class DisBackDMD2Config(DMD2Config, DisBackFields):
    method: str = config_field("training method", "disback-dmd2")

    def __post_init__(self):
        super().__post_init__()
        self.check_disback()


@dataclass
class DisBackVSDConfig(VSDConfig, DisBackFields):
    method: str = config_field("training method", "disback-vsd")

    def __post_init__(self):
        super().__post_init__()
        self.check_disback()


@dataclass
class DisBackFDistillConfig(FDistillConfig, DisBackFields):
    method: str = config_field("training method", "disback-fdistill")

    def __post_init__(self):
        super().__post_init__()
        self.check_disback()


@dataclass
class DisBackSiDConfig(SiDConfig, DisBackFields):
    method: str = config_field("training method", "disback-sid")

    def __post_init__(self):
        super().__post_init__()
        self.check_disback()


class DisBackDMD2Trainer(DisBackMixin, DMD2Trainer):
    config_class = DisBackDMD2Config


class DisBackVSDTrainer(DisBackMixin, VSDTrainer):
    config_class = DisBackVSDConfig


class DisBackFDistillTrainer(DisBackMixin, FDistillTrainer):
    config_class = DisBackFDistillConfig


class DisBackSiDTrainer(DisBackMixin, SiDTrainer):
    config_class = DisBackSiDConfig
