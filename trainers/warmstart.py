"""DMD's regression warm start: fit ``G(z)`` to the teacher's ODE sample from the same ``z``.

For students that cannot start as a copy of the teacher (the analytic gmm teachers' fresh
MLPs), the first ``regression_warmup_steps`` iterations of the loop regress the generator
onto ``regression_pairs`` noise / sample pairs drawn once from the teacher's guided DDIM ODE
(``regression_ode_steps`` steps), with a fixed seed, so a resumed run and every process draw
the same pairs.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from onestep.conditioning import Cond, cond_to, index_cond


class RegressionWarmStart:
    """The warm start of one trainer: its pairs (made on first use) and its loss."""

    #: Pairs are drawn from the teacher's ODE in chunks of this many.
    CHUNK = 512

    def __init__(self, trainer):
        self.trainer = trainer
        self._pairs: tuple[torch.Tensor, torch.Tensor, Cond] | None = None

    @torch.no_grad()
    def make_pairs(self) -> tuple[torch.Tensor, torch.Tensor, Cond]:
        """``(z, teacher ODE sample from z, condition)`` for ``regression_pairs`` draws, on the CPU."""
        from onestep.samplers.ddim import ddim_sample

        tr = self.trainer
        c = tr.config
        g = torch.Generator().manual_seed(c.seed + 12345)  # the same pairs on resume and on every rank
        n = c.regression_pairs
        z = torch.randn((n, *tr.teacher_spec.sample_shape), generator=g)
        cond = tr.conditioning.sample(n, generator=g)
        uncond = tr.conditioning.null(n)
        ys = []
        for i in range(0, n, self.CHUNK):
            sl = slice(i, i + self.CHUNK)
            ys.append(
                ddim_sample(
                    tr.teacher,
                    z[sl].to(tr.device),
                    cond_to(index_cond(cond, sl), tr.device),
                    cond_to(index_cond(uncond, sl), tr.device),
                    num_steps=c.regression_ode_steps,
                    guidance_scale=c.guidance_scale,
                    clip=tr.teacher_spec.clip,
                ).cpu()
            )
        return z, torch.cat(ys), cond

    def loss(self, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, float]]:
        """MSE between ``G(z)`` and the teacher's ODE sample from ``z``, for a batch of pairs
        (``batch["x_gen"]`` and ``batch["cond"]`` then describe that batch, for the fake-score step)."""
        tr = self.trainer
        if self._pairs is None:
            self._pairs = self.make_pairs()
        z_all, y_all, c_all = self._pairs
        idx = torch.randint(0, len(z_all), (tr.config.batch_size,), generator=tr.rng)
        z, y = z_all[idx].to(tr.device), y_all[idx].to(tr.device)
        cond = cond_to(index_cond(c_all, idx), tr.device)
        t = torch.full((len(idx),), tr.config.generator_timesteps[0], dtype=torch.long, device=tr.device)
        x = tr.generator(z, t, cond)
        batch["x_gen"] = x.detach()
        batch["cond"] = cond
        loss = F.mse_loss(x.float(), y.float())
        return loss, {"loss/regression": loss.item()}


__all__ = ["RegressionWarmStart"]
