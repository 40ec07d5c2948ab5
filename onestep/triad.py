"""The triad every distribution-matching method shares: teacher, fake score, generator.

| role        | what it is                                                   | trained? |
|-------------|--------------------------------------------------------------|----------|
| teacher     | the pretrained denoiser (with classifier-free guidance)      | frozen   |
| fake score  | a full copy of the teacher, or LoRA adapters on its weights  | yes      |
| generator   | initialised from the teacher; noise to sample in 1 (K) steps | yes      |

With ``fake_score="lora"`` the teacher and the fake score share one backbone: the
adapters off give the teacher, on give the fake score, and memory holds one copy
of the base weights. The adapters are zero-initialised, so at step 0 the fake
score equals the teacher.
"""

from __future__ import annotations

from torch import nn

from .denoiser import Denoiser
from .errors import ConfigError
from .teachers import Teacher

LORA_LAYER_TYPES = (nn.Linear, nn.Conv2d)


#: Inside a transformer block, LoRA adapts these layers: the attention projections of the image
#: and text streams and the feed-forward layers (the usual SD3 LoRA set, plus the MLPs).
TRANSFORMER_LORA_LAYERS = (
    "attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0",
    "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out",
    "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2",
)


def lora_target_modules(backbone: nn.Module) -> list[str]:
    """The layers LoRA adapts by default: every Linear and Conv2d layer of a UNet (or MLP); for a
    transformer (SD3), the attention projections and feed-forward layers of its blocks
    (:data:`TRANSFORMER_LORA_LAYERS`), not the patch / timestep / text embedders or AdaLN layers."""
    from .denoiser import is_transformer

    if is_transformer(backbone):
        return [
            name for name, m in backbone.named_modules()
            if isinstance(m, nn.Linear) and name.startswith("transformer_blocks.") and name.endswith(TRANSFORMER_LORA_LAYERS)
        ]
    return [name for name, m in backbone.named_modules() if isinstance(m, LORA_LAYER_TYPES) and name]


class Triad:
    """Teacher, fake score and generator built from one :class:`~onestep.teachers.Teacher`.

    Args:
        teacher: the frozen teacher.
        fake_score: ``"copy"`` (a full trainable copy) or ``"lora"`` (adapters on the teacher's weights).
        lora_rank, lora_alpha: LoRA size when ``fake_score="lora"``.
        lora_targets: module names to adapt; default every Linear and Conv2d layer.
    """

    def __init__(
        self,
        teacher: Teacher,
        fake_score: str = "copy",
        lora_rank: int = 16,
        lora_alpha: float | None = None,
        lora_targets: list[str] | None = None,
    ):
        if fake_score not in ("copy", "lora"):
            raise ConfigError(f"fake_score must be 'copy' or 'lora', not {fake_score!r}")
        self.teacher_spec = teacher
        self.schedule = teacher.schedule
        self.conditioning = teacher.conditioning
        self.fake_score_kind = fake_score
        pt = teacher.trainable_prediction_type

        # Generator: a trainable copy of the teacher (or a fresh net for analytic teachers).
        self.generator = Denoiser(teacher.new_backbone(), self.schedule, pt)

        if fake_score == "copy":
            self.teacher = teacher.denoiser()
            self.fake = Denoiser(teacher.new_backbone(), self.schedule, pt)
        else:
            if teacher.analytic:
                raise ConfigError(
                    f"fake_score='lora' needs a neural teacher; {teacher.name} is analytic. Use fake_score='copy'"
                )
            from peft import LoraConfig, inject_adapter_in_model

            backbone = teacher.backbone
            targets = lora_targets or lora_target_modules(backbone)
            config = LoraConfig(
                r=lora_rank,
                lora_alpha=lora_alpha if lora_alpha is not None else lora_rank,
                init_lora_weights=True,  # B = 0: the fake score starts equal to the teacher
                target_modules=targets,
            )
            inject_adapter_in_model(config, backbone, adapter_name="fake_score")
            # Base weights stay frozen; only the adapters train.
            for name, p in backbone.named_parameters():
                p.requires_grad_("lora_" in name)
            self.teacher = Denoiser(backbone, self.schedule, pt, use_adapters=False)
            self.fake = Denoiser(backbone, self.schedule, pt, use_adapters=True)

    def trainable_fake_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.fake.parameters() if p.requires_grad]

    def teacher_parameters(self) -> dict[str, nn.Parameter]:
        """The teacher's own weights (base weights only when the fake score is LoRA)."""
        return {n: p for n, p in self.teacher.backbone.named_parameters() if "lora_" not in n}
