"""The helpers methods share, part of :class:`~onestep.trainers.base.DistillTrainer`: the run's random
stream, timesteps, the generator's sample for a batch (with DMD2's backward simulation for K-step
students), noising, and the plain denoising loss; and :func:`inject_gradient`, the loss that hands a
hand-computed gradient to autograd.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from onestep.conditioning import Cond, cond_to
from onestep.schedule import expand_like

from .sharding import is_sharded, resharded


class MethodHelpers:
    """Noise, timesteps, batches and denoising losses on the trainer's triad and random stream."""

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
        """Plain diffusion loss, weighted over noise levels as ``config.fake_loss_weighting`` says:
        in the backbone's own prediction space (``native``: eps-MSE for eps teachers, the x0 error
        weighed by SNR_t), or (``snr+1``) the x0 error weighed by SNR_t + 1 at the noise levels the
        generator's loss reads (``t <= loss_t_range[1] T``) and by SNR_t above them. Above them an
        eps backbone cannot resolve x0 (with squaredcos, x0 = (x_t - s eps) / a with a ~ 5e-5 at
        t = 999): weight 1 there would train on eps errors magnified 20,000 times."""
        if self.config.fake_loss_weighting == "snr+1":
            a, s = (expand_like(v, x0) for v in self.schedule.alpha_sigma(t))
            read = expand_like(t <= self.config.loss_t_range[1] * self.schedule.num_train_timesteps, x0)
            w = (a / s.clamp(min=1e-8)) ** 2 + read.float()
            return (w * (pred_x0.float() - x0.float()) ** 2).mean()
        pt = self.generator.prediction_type  # the triad's one trainable prediction type
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


@torch.no_grad()
def ema_into(target: nn.Module, source: nn.Module, mu: float) -> None:
    """``theta_target <- mu theta_target + (1 - mu) theta_source``, parameter by parameter (FSDP: both as
    shards, alike). The target of consistency-style methods."""
    resharded(target, source)
    pairs = [(p_t, p_s.detach().to(p_t.dtype)) for p_t, p_s in zip(target.parameters(), source.parameters())]
    if pairs and not any(is_sharded(p_t) for p_t, _ in pairs):  # one fused call: the same values, a third less time
        torch._foreach_lerp_([p_t for p_t, _ in pairs], [p_s for _, p_s in pairs], 1 - mu)
        return
    for p_t, p_s in pairs:
        p_t.lerp_(p_s, 1 - mu)


def inject_gradient(x: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """Loss whose gradient with respect to ``x`` is ``grad / x.numel()``:
    ``0.5 * mean((x - sg(x - grad))^2)`` (computed in float32, non-finite values zeroed)."""
    grad = torch.nan_to_num(grad.float())
    target = (x.float() - grad).detach()
    return 0.5 * F.mse_loss(x.float(), target, reduction="mean")


__all__ = ["MethodHelpers", "ema_into", "inject_gradient"]
