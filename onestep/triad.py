"""The triad every distribution-matching method shares: teacher, fake score, generator.

| role        | what it is                                                   | trained? |
|-------------|--------------------------------------------------------------|----------|
| teacher     | the pretrained denoiser (with classifier-free guidance)      | frozen   |
| fake score  | a full copy of the teacher, or LoRA adapters on its weights  | yes      |
| generator   | initialised from the teacher; noise to sample in 1 (K) steps | yes      |

With ``fake_score="lora"`` the teacher and the fake score share one backbone: the
adapters off give the teacher, on give the fake score, and memory holds one copy
of the base weights. The adapters are zero-initialised, so at step 0 the fake
score equals the teacher. ``fake_score="none"`` builds no fake score (consistency
distillation trains the generator against the teacher alone).

A LoRA generator (``generator_lora_rank > 0``) shares the teacher's base weights too: its
backbone is a second module tree whose frozen parameters and buffers *are* the teacher's
tensors (:func:`weight_sharing_copy`), with its own adapters. Memory then holds one copy of
the base for all three roles (SDXL: 5.1 GB in bf16 instead of 10.3). Being separate modules,
the generator and the teacher / fake score need no adapter switching, so gradient
checkpointing's recomputation always runs the adapters it ran the first time. Under FSDP the
generator keeps its own copy (``share_base=False``): sharding shards each module's tensors.
"""

from __future__ import annotations

import copy

from torch import nn

from .denoiser import Denoiser
from .errors import ConfigError
from .lora import add_lora
from .teachers import Teacher

FAKE_SCORES = ("copy", "lora", "none")


class Triad:
    """Teacher, fake score and generator built from one :class:`~onestep.teachers.Teacher`.

    Args:
        teacher: the frozen teacher.
        fake_score: ``"copy"`` (a full trainable copy), ``"lora"`` (adapters on the teacher's weights)
            or ``"none"`` (no fake score: ``fake`` is None).
        lora_rank, lora_alpha: LoRA size when ``fake_score="lora"``.
        lora_targets: the layers the fake score's LoRA adapts: ``"attention"`` (the attention
            projections, as VSD / SwiftBrush tune them), ``"all"`` or module-name suffixes
            (:func:`onestep.lora.lora_target_modules`).
        generator_lora_rank, generator_lora_alpha, generator_lora_targets: a LoRA generator
            (rank 0: the generator is a full trainable copy) and its adapters' size and layers.
        share_base: let a LoRA generator share the teacher's frozen base weights (False: it gets
            its own copy; FSDP needs that).
    """

    def __init__(
        self,
        teacher: Teacher,
        fake_score: str = "copy",
        lora_rank: int = 16,
        lora_alpha: float | None = None,
        lora_targets: str | list[str] = "attention",
        generator_lora_rank: int = 0,
        generator_lora_alpha: float | None = None,
        generator_lora_targets: str | list[str] = "all",
        share_base: bool = True,
    ):
        if fake_score not in FAKE_SCORES:
            raise ConfigError(f"fake_score must be one of {FAKE_SCORES}, not {fake_score!r}")
        self.teacher_spec = teacher
        self.schedule = teacher.schedule
        self.conditioning = teacher.conditioning
        self.fake_score_kind = fake_score
        pt = teacher.trainable_prediction_type

        # Generator: a trainable copy of the teacher (or a fresh net for analytic teachers); a LoRA
        # generator's base is the teacher's own tensors (taken before the fake score's adapters join them).
        self.shares_generator_base = bool(
            generator_lora_rank and share_base and not teacher.analytic and teacher.student_factory is None
        )
        if self.shares_generator_base:
            generator = weight_sharing_copy(teacher.backbone)
            generator.train()
        else:
            generator = teacher.new_backbone()

        self.fake: Denoiser | None
        if fake_score == "none":
            self.teacher = teacher.denoiser()
            self.fake = None
        elif fake_score == "copy":
            self.teacher = teacher.denoiser()
            self.fake = Denoiser(teacher.new_backbone(), self.schedule, pt)
        else:
            if teacher.analytic:
                raise ConfigError(
                    f"fake_score='lora' needs a neural teacher; {teacher.name} is analytic. Use fake_score='copy'"
                )
            backbone = teacher.backbone
            # Base weights stay frozen; only the adapters train.
            add_lora(backbone, lora_rank, lora_alpha, "fake_score", lora_targets)
            self.teacher = Denoiser(backbone, self.schedule, pt, use_adapters=False)
            self.fake = Denoiser(backbone, self.schedule, pt, use_adapters=True)
        if generator_lora_rank:  # after the fake score's adapters: the same random draws as always
            add_lora(generator, generator_lora_rank, generator_lora_alpha, "generator", generator_lora_targets)
        self.generator = Denoiser(generator, self.schedule, pt)

    def trainable_fake_parameters(self) -> list[nn.Parameter]:
        return [] if self.fake is None else [p for p in self.fake.parameters() if p.requires_grad]

    def teacher_parameters(self) -> dict[str, nn.Parameter]:
        """The teacher's own weights (base weights only when the fake score is LoRA)."""
        return {n: p for n, p in self.teacher.backbone.named_parameters() if "lora_" not in n}


def weight_sharing_copy(net: nn.Module, frozen_only: bool = False) -> nn.Module:
    """A second module tree of ``net`` whose parameters and buffers are ``net``'s own tensor objects
    (nothing is copied but the modules and small non-tensor attributes). Changing a shared tensor in
    place (``p.data = ...``, ``.to(device)``, casting) changes it for both; adapters added to the copy
    afterwards are its own. ``frozen_only``: parameters with ``requires_grad`` (LoRA adapters) are
    copied, the frozen ones and the buffers shared."""
    shared = [p for p in net.parameters() if not (frozen_only and p.requires_grad)] + list(net.buffers())
    return copy.deepcopy(net, {id(t): t for t in shared})
