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
"""

from __future__ import annotations

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
    """

    def __init__(
        self,
        teacher: Teacher,
        fake_score: str = "copy",
        lora_rank: int = 16,
        lora_alpha: float | None = None,
        lora_targets: str | list[str] = "attention",
    ):
        if fake_score not in FAKE_SCORES:
            raise ConfigError(f"fake_score must be one of {FAKE_SCORES}, not {fake_score!r}")
        self.teacher_spec = teacher
        self.schedule = teacher.schedule
        self.conditioning = teacher.conditioning
        self.fake_score_kind = fake_score
        pt = teacher.trainable_prediction_type

        # Generator: a trainable copy of the teacher (or a fresh net for analytic teachers).
        self.generator = Denoiser(teacher.new_backbone(), self.schedule, pt)

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

    def trainable_fake_parameters(self) -> list[nn.Parameter]:
        return [] if self.fake is None else [p for p in self.fake.parameters() if p.requires_grad]

    def teacher_parameters(self) -> dict[str, nn.Parameter]:
        """The teacher's own weights (base weights only when the fake score is LoRA)."""
        return {n: p for n, p in self.teacher.backbone.named_parameters() if "lora_" not in n}
