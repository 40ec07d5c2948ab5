"""Consistency trajectory students (CTM, Kim et al., 2024, arXiv:2310.02279; SoundCTM, Saito et al., 2024,
arXiv:2405.18503): one network that jumps from any time ``t`` to any earlier time ``s`` of the teacher's
ODE trajectory.

On a variance-preserving teacher (``x_t = a_t x0 + s_t e``) the jump is CTM's ``G`` (CTM Lemma 1:
``G(x_t, t, s) = (s / t) x_t + (1 - s / t) g(x_t, t, s)`` with EDM's ``sigma = t``) written for VP
labels, which is one DDIM step with the network's own x0 estimate ``g``:

    G(x_t, t, s) = a_s g + s_s (x_t - a_t g) / s_t,        g = g_theta(x_t, t, s),

with ``G(x_t, t, t) = x_t`` (the boundary condition) and ``G(x_t, t, 0) = g``: label ``0`` is the end of
the trajectory (``a = 1, s = 0``), the sample. ``g`` is the teacher's backbone with one more input, the
target label ``s`` (:class:`JumpInput`): extra class-table rows (one block per allowed ``s``) for
class-conditional UNets, ``timestep_cond`` (a zero-initialised projection of the sinusoidal embedding of
``s``) for ``UNet2DConditionModel``. At start ``g`` is the teacher's x0 for every ``s``: ``G`` is one DDIM
step of the teacher, and the student stays a plain diffusers model.

Sampling (CTM's gamma-sampling, sec. 5): from ``t_i`` to ``t_{i+1}``, jump to ``s~`` with
``sigma(s~) = sqrt(1 - gamma^2) sigma(t_{i+1})`` (``sigma = s_t / a_t``, the VE noise level) and add fresh
noise back up to ``t_{i+1}``: ``x = a_{i+1} (G / a_s~ + sqrt(sigma_{i+1}^2 - sigma_s~^2) z)``. ``gamma = 0``
is deterministic (the ODE, jump by jump); ``gamma = 1`` jumps to the end and re-noises (consistency models'
multistep sampling). The last step jumps to the end. SoundCTM's nu-sampling: the student is trained
conditional and unconditional (the condition dropped), and each jump interpolates the two,
``G_nu = G(.., null) + nu (G(.., c) - G(.., null))``; ``G`` is linear in ``g``, so that is CFG with scale
``nu`` on ``g``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Callable

import torch
from torch import nn

from .conditioning import Cond, cat_cond, cfg
from .consistency import ddim_step, guidance_scale_embedding
from .denoiser import Denoiser, feature_map, is_transformer
from .errors import ConfigError
from .schedule import NoiseSchedule, expand_like

JUMP_KINDS = ("class_table", "timestep_cond")


@dataclass
class JumpInput:
    """How a CTM student receives its jump target ``s`` (a timestep label).

    Attributes:
        kind: ``"class_table"`` (class label ``y + level(s) * stride``, ``s`` one of ``levels``) or
            ``"timestep_cond"`` (any integer ``s``, its sinusoidal embedding of size ``embedding_dim``).
        levels: the allowed ``s`` labels, ascending, starting at 0 (``class_table``).
        stride: rows per level in a ``class_table`` (the teacher's class embeddings, null class included).
        embedding_dim: ``time_cond_proj_dim`` for ``timestep_cond``.
    """

    kind: str
    levels: list[int] = field(default_factory=list)
    stride: int = 0
    embedding_dim: int = 0

    def __post_init__(self):
        if self.kind not in JUMP_KINDS:
            raise ConfigError(f"jump input kind must be one of {JUMP_KINDS} (got {self.kind!r})")
        if self.kind == "class_table" and (not self.levels or self.levels[0] != 0 or self.stride < 1):
            raise ConfigError("a class_table jump input needs levels starting at 0 and a stride >= 1")
        if self.kind == "timestep_cond" and self.embedding_dim < 2:
            raise ConfigError("a timestep_cond jump input needs embedding_dim >= 2")

    @classmethod
    def for_backbone(cls, backbone: nn.Module, levels: list[int], embedding_dim: int) -> "JumpInput":
        """``timestep_cond`` for a ``UNet2DConditionModel``, else a class table over ``levels``."""
        if type(backbone).__name__ == "UNet2DConditionModel":
            return cls("timestep_cond", embedding_dim=embedding_dim)
        rows = getattr(getattr(backbone, "config", None), "num_class_embeds", None)
        if rows is None:
            raise ConfigError(
                f"CTM needs a way to feed the jump target s to the student: {type(backbone).__name__} has neither a "
                "class-embedding table nor a timestep_cond input (UNet2DConditionModel)"
            )
        return cls("class_table", levels=sorted(set(int(v) for v in levels) | {0}), stride=int(rows))

    def snap(self, s: torch.Tensor) -> torch.Tensor:
        """The label each ``s`` is actually fed as: the nearest level (``class_table``), else ``s`` rounded."""
        s = torch.as_tensor(s)
        if self.kind != "class_table":
            return s.round().long()
        levels = torch.as_tensor(self.levels, device=s.device)
        return levels[self.level(s)]

    def level(self, s: torch.Tensor) -> torch.Tensor:
        levels = torch.as_tensor(self.levels, dtype=torch.float32, device=s.device)
        return (s.float()[:, None] - levels[None, :]).abs().argmin(dim=1)

    def apply(self, cond: Cond, s: torch.Tensor) -> Cond:
        """The backbone's condition for jump targets ``s`` (``(B,)`` labels)."""
        if self.kind == "timestep_cond":
            emb = guidance_scale_embedding(s.float().cpu() / 1000.0, self.embedding_dim).to(s.device)
            return {**({} if cond is None else dict(cond)), "timestep_cond": emb}
        if cond is None or isinstance(cond, dict):
            raise ConfigError("a class_table jump input needs class labels as the condition")
        return cond + self.stride * self.level(s).to(cond.device)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def jump(schedule: NoiseSchedule, x_t: torch.Tensor, g: torch.Tensor, t: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """``G(x_t, t, s)`` from the x0 estimate ``g``: the DDIM step ``a_s g + s_s (x_t - a_t g) / s_t``
    (:func:`~onestep.consistency.ddim_step`); ``x_t`` itself where ``s >= t`` and ``g`` where ``s == 0`` (the
    end), float32."""
    t, s = t.to(x_t.device), s.to(x_t.device)
    g, x = g.float(), x_t.float()
    out = torch.where(expand_like(s == 0, x), g, ddim_step(schedule, x, g, t, s))
    return torch.where(expand_like(s >= t, x), x, out)


def clip_through(g: torch.Tensor, clip: float | None) -> torch.Tensor:
    """``g`` clamped to ``[-clip, clip]`` in value (the teacher's sampler clamps its x0 so), with the gradient of
    ``g`` itself (straight through: a clamped estimate still learns). ``clip`` None: ``g``."""
    if clip is None:
        return g
    return g + (g.clamp(-clip, clip) - g).detach()


def ve_sigma(schedule: NoiseSchedule, t: torch.Tensor) -> torch.Tensor:
    """``sigma = s_t / a_t`` (float64), 0 at label 0 (the end)."""
    a, s = schedule.alpha_sigma(t)
    return torch.where(torch.as_tensor(t) == 0, torch.zeros((), dtype=torch.float64), s.double() / a.double())


def gamma_target(schedule: NoiseSchedule, t_next: int, gamma: float, jump_input: JumpInput | None = None) -> int:
    """The label ``s~`` of a gamma-sampling jump towards ``t_next``: ``sigma(s~) = sqrt(1 - gamma^2) sigma(t_next)``,
    snapped to the student's allowed targets. ``gamma = 0``: ``t_next``; ``gamma = 1``: 0 (the end)."""
    if gamma <= 0 or t_next == 0:
        s = float(t_next)
    elif gamma >= 1:
        s = 0.0
    else:
        sig = (1 - gamma**2) ** 0.5 * ve_sigma(schedule, torch.tensor([t_next]))
        s = float(schedule.timestep_for_log_snr(-2 * sig.log()))
    s = min(s, float(t_next))
    if jump_input is None:
        return int(round(s))
    return int(jump_input.snap(torch.tensor([s]))[0])


class CTMDenoiser(Denoiser):
    """A CTM student: ``g(x_t, t, s)``, its jumps ``G`` and gamma/nu-sampling.

    Called like any :class:`Denoiser` (``student(x_t, t, cond)``) it returns the one-jump sample
    ``G(x_t, t, 0)`` under nu-guidance, so the plain x0-then-re-noise sampler is its gamma = 1 sampling;
    :meth:`trajectory_sample` runs any gamma.

    Args:
        backbone, schedule, prediction_type: as for :class:`~onestep.denoiser.Denoiser`.
        jump_input: how ``s`` reaches the backbone.
        nu: SoundCTM's interpolation of the conditional and unconditional student (1: the conditional one).
        gamma: CTM's gamma of :meth:`trajectory_sample`.
        null_cond: ``(n, device) -> Cond``, the unconditional condition (needed when ``nu != 1``).
        clip: the teacher's x0 clamp, applied to ``g`` in every jump (None: none).
    """

    def __init__(
        self,
        backbone: nn.Module,
        schedule: NoiseSchedule,
        prediction_type: str,
        jump_input: JumpInput,
        nu: float = 1.0,
        gamma: float = 0.0,
        null_cond: Callable[..., Cond] | None = None,
        clip: float | None = None,
    ):
        super().__init__(backbone, schedule, prediction_type)
        if not 0 <= gamma <= 1:
            raise ConfigError(f"gamma must lie in [0, 1] (got {gamma})")
        self.jump_input = jump_input
        self.nu = float(nu)
        self.gamma = float(gamma)
        self.null_cond = null_cond
        self.clip = clip

    def g(self, x_t: torch.Tensor, t: torch.Tensor, s: torch.Tensor, cond: Cond = None, return_features: bool = False):
        """The x0 estimate ``g_theta(x_t, t, s)`` (float32)."""
        s = torch.as_tensor(s, device=x_t.device).expand(x_t.shape[0])
        return super().forward(x_t, t, self.jump_input.apply(cond, s), return_features=return_features)

    def guided_g(self, x_t: torch.Tensor, t: torch.Tensor, s: torch.Tensor, cond: Cond = None) -> torch.Tensor:
        """``g`` under nu-guidance: ``g(.., null) + nu (g(.., cond) - g(.., null))`` (one batched pass)."""
        if self.nu == 1.0 or cond is None:
            return self.g(x_t, t, s, cond)
        if self.null_cond is None:
            raise ConfigError("nu-sampling (nu != 1) needs the unconditional condition: set null_cond")
        n = x_t.shape[0]
        s = torch.as_tensor(s, device=x_t.device).expand(n)
        both = self.g(torch.cat([x_t, x_t]), torch.cat([t, t]), torch.cat([s, s]), cat_cond(cond, self.null_cond(n, device=x_t.device)))
        return cfg(both[n:], both[:n], self.nu)

    def jump(self, x_t: torch.Tensor, t: torch.Tensor, s: torch.Tensor, cond: Cond = None) -> torch.Tensor:
        """``G(x_t, t, s)`` under nu-guidance (``g`` clamped to ``clip``)."""
        s = torch.as_tensor(s, device=x_t.device).expand(x_t.shape[0])
        return jump(self.schedule, x_t, clip_through(self.guided_g(x_t, t, s, cond), self.clip), t.to(x_t.device), s)

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, cond: Cond = None, return_features: bool = False):
        """``G(x_t, t, 0)``: the sample one jump gives (nu-guided)."""
        if return_features:
            return self.g(x_t, t, torch.zeros_like(t), cond, return_features=True)
        return clip_through(self.guided_g(x_t, t, torch.zeros_like(t), cond), self.clip)

    def trajectory_sample(
        self,
        timesteps: list[int],
        noise: torch.Tensor,
        cond: Cond = None,
        renoise: Callable[[tuple[int, ...]], torch.Tensor] | None = None,
        clip: float | None = None,
    ) -> torch.Tensor:
        """Gamma-sampling through ``timesteps`` (descending labels; noise enters labelled ``timesteps[0]``).
        ``len(timesteps)`` jumps: to each next timestep (via ``s~`` and fresh noise when gamma > 0), then to the end."""
        x, n = noise, noise.shape[0]
        for i, t in enumerate(timesteps):
            tt = torch.full((n,), int(t), dtype=torch.long, device=x.device)
            last = i == len(timesteps) - 1
            t_next = 0 if last else int(timesteps[i + 1])
            s = gamma_target(self.schedule, t_next, self.gamma, self.jump_input)
            x = self.jump(x, tt, torch.full((n,), s, dtype=torch.long, device=x.device), cond)
            if clip is not None and s == 0:
                x = x.clamp(-clip, clip)
            if last or s == t_next:
                continue
            if renoise is None:
                raise ValueError("gamma-sampling with gamma > 0 needs a renoise function for the fresh noise")
            a_s = 1.0 if s == 0 else float(self.schedule.alpha_sigma(torch.tensor([s]))[0])
            a_n = float(self.schedule.alpha_sigma(torch.tensor([t_next]))[0])
            sig_s, sig_n = (float(ve_sigma(self.schedule, torch.tensor([v]))) for v in (s, t_next))
            std = max(sig_n**2 - sig_s**2, 0.0) ** 0.5
            x = a_n * (x / a_s + std * renoise(tuple(x.shape)).to(x))
        return x


def feature_modules(backbone: nn.Module) -> list[nn.Module]:
    """The modules whose outputs make the teacher's feature space: a UNet's down blocks and mid block
    (the encoder half, SoundCTM's default), or every other block of a transformer."""
    if is_transformer(backbone):
        return list(backbone.transformer_blocks)[::2]
    mods = list(getattr(backbone, "down_blocks", [])) + [m for m in [getattr(backbone, "mid_block", None)] if m is not None]
    if not mods:
        raise ConfigError(f"{type(backbone).__name__} has no down/mid blocks to read features from; use distance: l2")
    return mods


def teacher_features(den: Denoiser, x: torch.Tensor, t: torch.Tensor, cond: Cond = None) -> list[torch.Tensor]:
    """The teacher's feature maps of ``x`` at labels ``t`` (one forward pass; gradients flow to ``x``)."""
    feats: list[torch.Tensor] = []
    hook = lambda m, i, o: feats.append(feature_map(den.backbone, o, x))  # noqa: E731
    handles = [m.register_forward_hook(hook) for m in feature_modules(den.backbone)]
    try:
        den(x, t, cond)
    finally:
        for h in handles:
            h.remove()
    return feats


def feature_distance(a: list[torch.Tensor], b: list[torch.Tensor]) -> torch.Tensor:
    """Per-sample ``sum_l mean((a_l / |a_l| - b_l / |b_l|)^2)``, each map unit-normalised over channels
    at every position (SoundCTM's teacher-feature distance; LPIPS without learned weights)."""
    def unit(f: torch.Tensor) -> torch.Tensor:
        f = f.float()
        return f / (f.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)

    return sum((unit(fa) - unit(fb)).pow(2).flatten(1).mean(1) for fa, fb in zip(a, b))


__all__ = [
    "JUMP_KINDS",
    "CTMDenoiser",
    "JumpInput",
    "clip_through",
    "feature_distance",
    "feature_modules",
    "gamma_target",
    "jump",
    "teacher_features",
    "ve_sigma",
]
