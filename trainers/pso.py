"""PSO: tuning an already distilled student with Pairwise Sample Optimization (Miao et al., 2024, "Tuning
Timestep-Distilled Diffusion Model Using Pairwise Sample Optimization", arXiv:2410.03190, ICLR 2025).

Fine-tuning a few-step student with the plain diffusion loss on new images degrades it (blurry in the
paper; speckled on digits, benchmarks/pso_style.py): the loss retrains the network as an ordinary
denoiser of ``a_t x + s_t e`` and undoes what distillation made of its few-step input. PSO instead raises
the likelihood of the target images *relative to reference images drawn from the student itself*,
measured against a frozen copy of the initial student, with the Bradley-Terry (DPO) objective of
Diffusion-DPO (Wallace et al., 2023). The student only has to separate the targets from its own samples,
and the frozen reference anchors it (DPO's implicit KL term), so its samples move toward the targets
and stay sharp.

Per iteration (PSO's pairwise objective in this project's notation):

1. a batch of target images ``x+`` with their conditions ``c`` (a style set: ``targets``);
2. reference images ``x-`` for the same ``c``: ``online`` from the current student (the paper's online
   PSO), ``offline`` from the initial student, generated once before training (offline PSO), or
   ``pairs``: given (winner, loser) pairs, ``x+`` preferred over ``x-`` (the preference-tuning mode);
3. one noise level per pair and one noise ``e`` shared by both images (as Diffusion-DPO):
   ``t`` uniform over the student's own sampling timesteps (``noise_levels: student``), and
   ``x+_t = a_t x+ + s_t e``, ``x-_t = a_t x- + s_t e``;
4. per-sample denoising errors ``E(net, x) = ||eps - eps_net(x_t, t, c)||^2 / D`` (the student's own
   prediction space: ``denoising_loss_of``, so ``fake_loss_weighting`` chooses the weighting) of the
   tuned student ``theta`` and of the frozen initial student ``ref``;
5. ``margin = [E(theta, x+) - E(ref, x+)] - [E(theta, x-) - E(ref, x-)]`` and
   ``loss = -log sigmoid(-beta * margin) = softplus(beta * margin)``.

A lower margin means the tuned student denoises the targets better, relative to the reference, than it
denoises the reference images: -log p(x) is bounded by the weighted sum of these errors over t (the ELBO),
so ``-margin`` stands for ``log p_theta(x+)/p_ref(x+) - log p_theta(x-)/p_ref(x-)`` and the loss is DPO's.
``naive: true`` is the baseline, plain diffusion fine-tuning on the targets: ``E(theta, x+)`` at the same
noise levels, no reference images, no frozen copy.

Choices where the paper leaves one:

- *Noise levels.* Diffusion-DPO draws ``t`` uniform on [0, T); PSO notes that a timestep-distilled model
  samples at a few timesteps only and reads it there. Here ``t`` is drawn from the student's own
  ``generator_timesteps`` (``noise_levels: uniform`` gives Diffusion-DPO's draw). For a K-step student
  the state at step ``k`` is ``a_k x0_hat + s_k e`` with the previous step's x0 prediction; we noise the
  final images instead (the only thing known of a target image). For the quickstart's one-step student,
  whose input is pure noise labelled t = 600, the surrogate is the error at label 600 on
  ``a x + s e`` (a = 0.58, s = 0.81 in the squaredcos schedule): the network's denoising of the style at
  the label its one step runs at. That input is not what the student sees when sampling (pure noise),
  but the same network maps both; it is where the student's weights read label 600, and the only label
  whose training reaches its samples. The naive baseline trains at the same levels, so the comparison
  isolates the objective. A one-step student labelled T-1 reads next to nothing of the image there
  (sqrt(abar) = 5e-5 with squaredcos, 0.068 for SD1.5): the trainer warns, and such students take
  ``noise_levels: uniform`` (the SD1.5 preset does).
- *beta.* The errors are means over pixels (as in Diffusion-DPO's code), so beta also carries DPO's
  factor T and the weighting over t; it is set per teacher in the presets. On digits the margins reach a
  few 1e-3 within a hundred steps, so beta = 500 puts ``beta * margin`` at order 1.
- *Online reference model.* Online PSO draws ``x-`` from the current student, the likelihood ratio
  stays against the frozen initial student (DPO's reference policy).
- *Offline pairs* pair ``offline_pairs`` targets drawn once (fixed seed) with the initial student's
  samples for their conditions; each step draws pairs from that set.
- The frozen reference is rebuilt from ``student`` on resume, not kept in checkpoints.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from onestep.conditioning import Cond, cat_cond, cond_to, index_cond
from onestep.config import config_field
from onestep.denoiser import Denoiser
from onestep.errors import ConfigError, OnestepError
from onestep.styles import STYLE_SETS, paired_sets
from onestep.teachers import Teacher
from onestep.weights import weights_file

from .base import DistillTrainer
from .config import DistillConfig, load_teacher_for

PAIR_SOURCES = ("online", "offline", "pairs")
NOISE_LEVELS = ("student", "uniform")


@dataclass
class PSOConfig(DistillConfig):
    """PSO settings. ``generator_timesteps`` comes from the student; ``fake_updates_per_generator`` is not
    used (the student learns every iteration; there is no fake score)."""

    FAKE_SCORES = ("none",)

    method: str = config_field("training method", "pso")
    fake_score: str = config_field("PSO trains no fake score: 'none'", "none")
    student: str | None = config_field(
        "the distilled student folder to tune (required; `onestep quickstart` writes runs/quickstart/student, "
        "`onestep train digits_dmd2` runs/digits_dmd2/student); the tuned student samples at its timesteps"
    )
    targets: str = config_field(
        "the images to tune toward: 'thick-digits' (the bundled digits, strokes thickened; digits teacher), "
        "'teacher' (the teacher's own data: real_images for text-to-image teachers, with their captions as "
        "prompts) or a folder of images (pixel-space teachers; class sub-folders 0/, 1/, ... give labels)",
        "thick-digits",
    )
    pairs: str = config_field(
        "where the reference (losing) images come from: 'online' (the current student, each step), 'offline' "
        "(the initial student, generated once) or 'pairs' (given losers: see losers)",
        "online",
    )
    losers: str | None = config_field(
        "pairs mode: the losing image of each target, index-aligned with targets: 'digits' (the real digits "
        "thick-digits is made from) or a folder with the same file names as the targets folder"
    )
    beta: float = config_field("beta of the Bradley-Terry objective softplus(beta * margin) (margins are per-pixel mean errors)", 500.0)
    naive: bool = config_field("baseline: plain diffusion fine-tuning on the targets (no reference images, no frozen copy)", False)
    noise_levels: str = config_field(
        "where the errors are read: 'student' (t from the student's own timesteps, PSO) or 'uniform' "
        "(t ~ U{0 .. T-1}, Diffusion-DPO)",
        "student",
    )
    offline_pairs: int = config_field("offline mode: target / reference pairs generated before training", 1024)

    def __post_init__(self):
        super().__post_init__()
        if not isinstance(self.student, str) or not self.student.strip():
            raise ConfigError("student: set it to the distilled student folder to tune (`onestep quickstart` writes "
                              "runs/quickstart/student; `onestep train digits_dmd2` runs/digits_dmd2/student)")
        if not isinstance(self.targets, str) or not self.targets.strip():
            raise ConfigError(f"targets must be {STYLE_SETS[0]!r}, 'teacher' or a folder of images (got {self.targets!r})")
        if self.pairs not in PAIR_SOURCES:
            raise ConfigError(f"pairs must be one of {PAIR_SOURCES} (got {self.pairs!r})")
        if self.noise_levels not in NOISE_LEVELS:
            raise ConfigError(f"noise_levels must be one of {NOISE_LEVELS} (got {self.noise_levels!r})")
        if (self.pairs == "pairs") != (self.losers is not None):
            raise ConfigError("losers and pairs: 'pairs' go together: pairs 'pairs' needs losers (e.g. 'digits'), and "
                              f"losers needs pairs 'pairs' (got pairs {self.pairs!r}, losers {self.losers!r})")
        if self.naive and self.pairs != "online":
            raise ConfigError("naive fine-tuning uses no reference images: leave pairs at 'online' (its default)")
        if not self.beta > 0:
            raise ConfigError(f"beta must be > 0 (got {self.beta})")
        if self.offline_pairs < 1:
            raise ConfigError(f"offline_pairs must be at least 1 (got {self.offline_pairs})")
        if self.regression_warmup_steps:
            raise ConfigError("regression_warmup_steps is a DMD warm start; PSO tunes a trained student (set 0)")


def pso_loss(err_w: torch.Tensor, err_w_ref: torch.Tensor, err_l: torch.Tensor, err_l_ref: torch.Tensor, beta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """PSO / Diffusion-DPO loss from per-sample errors of the tuned and the reference model on the winning
    (target) and losing (reference) images: ``mean softplus(beta * margin)`` and ``margin``, with
    ``margin = (err_w - err_w_ref) - (err_l - err_l_ref)``."""
    margin = (err_w.float() - err_w_ref.float()) - (err_l.float() - err_l_ref.float())
    return F.softplus(beta * margin).mean(), margin


class PSOTrainer(DistillTrainer):
    config_class = PSOConfig
    config: PSOConfig

    def __init__(self, config: PSOConfig, teacher: Teacher | None = None):
        from onestep.export import read_student_meta

        c = config
        folder = Path(c.student).expanduser()
        if not folder.is_dir():
            raise ConfigError(f"student {c.student}: no such student folder; train one first (`onestep quickstart` writes "
                              "runs/quickstart/student, `onestep train digits_dmd2` runs/digits_dmd2/student)")
        try:
            self.student_meta = meta = read_student_meta(folder)
        except OnestepError as e:
            raise ConfigError(f"student: {e}") from e
        other = [k for k in ("consistency", "ctm", "boot") if meta.get(k)]
        if other:  # their sampler is not the network's plain x0 prediction, which PSO tunes
            raise ConfigError(f"student: PSO here tunes students whose output is the network's x0 prediction (DMD2, VSD, "
                              f"f-distill, SiD, DisBack, sCM); {other[0]} students are not supported")
        if c.generator_timesteps not in ([999], meta["timesteps"]):
            raise ConfigError(f"generator_timesteps: PSO keeps the student's own {meta['timesteps']}; leave it unset")
        weights = weights_file(folder)
        if c.init_generator not in (None, str(weights)):
            raise ConfigError("init_generator: PSO starts from the weights of `student`; leave init_generator unset")
        c.generator_timesteps, c.init_generator = list(meta["timesteps"]), str(weights)
        teacher = teacher if teacher is not None else load_teacher_for(c)
        self.target_x, self.target_cond, self.loser_x, self.target_draw = self._image_sets(c, teacher)
        super().__init__(c, teacher)
        self.offline: tuple[torch.Tensor, torch.Tensor, Cond] | None = None
        if c.pairs == "offline" and not c.naive:
            self.offline = self._offline_pairs()
        a = self.schedule.alpha_sigma(torch.tensor(c.generator_timesteps))[0]
        if c.noise_levels == "student" and float(a.max()) < 0.1:
            from accelerate.logging import get_logger

            get_logger(__name__).warning(
                f"noise_levels 'student': at the student's timesteps {c.generator_timesteps} sqrt(abar) is at most "
                f"{float(a.max()):.3f}, so its denoising errors read almost nothing of the images; use noise_levels: uniform")

    # ------------------------------------------------------------ data
    @staticmethod
    def _image_sets(c: PSOConfig, teacher: Teacher):
        """(targets, their conditions, losers or None, a sampler for targets held by the teacher or None)."""
        if c.targets == "teacher":
            if teacher.real_data is None:
                raise ConfigError(f"targets 'teacher': teacher {teacher.name} brings no images (text-to-image teachers take "
                                  "real_images: a captioned folder of the style)")
            if c.pairs == "pairs":
                raise ConfigError("pairs mode pairs two index-aligned sets; targets 'teacher' is drawn at random: "
                                  "give targets and losers as folders with the same file names")
            return None, None, None, teacher.real_data
        if teacher.conditioning.kind == "text":
            raise ConfigError("text-to-image teachers: put the style images with captions in real_images and set targets: teacher")
        return (*paired_sets(c.targets, c.losers, teacher), None)

    def draw_targets(self, n: int, generator: torch.Generator) -> tuple[torch.Tensor, Cond, torch.Tensor | None]:
        """``n`` targets with their conditions (and, in pairs mode, their losers), on the device."""
        if self.target_draw is not None:
            x, cond = self.target_draw(n, generator)
            return x.to(self.device), cond_to(cond, self.device), None
        idx = torch.randint(0, len(self.target_x), (n,), generator=generator)
        losers = self.loser_x[idx].to(self.device) if self.loser_x is not None else None
        return self.target_x[idx].to(self.device), cond_to(index_cond(self.target_cond, idx), self.device), losers

    @torch.no_grad()
    def sample_from(self, net: nn.Module, cond: Cond, n: int) -> torch.Tensor:
        """Samples of a student network (the current generator or the frozen reference) for ``cond``, at
        the student's timesteps, from the run's random stream."""
        from onestep.samplers.student import student_sample

        z = self.randn((n, *self.teacher_spec.sample_shape))
        return student_sample(net, self.config.generator_timesteps, z, cond, renoise=self.randn, clip=self.teacher_spec.clip)

    def _offline_pairs(self) -> tuple[torch.Tensor, torch.Tensor, Cond]:
        """Offline PSO: ``offline_pairs`` targets (fixed seed) and the initial student's samples for them."""
        g = torch.Generator().manual_seed(self.config.seed)
        x, cond, _ = self.draw_targets(self.config.offline_pairs, g)
        refs = []
        for i in range(0, len(x), 256):
            part = index_cond(cond, slice(i, i + 256))
            refs.append(self.sample_from(self.reference, part, min(256, len(x) - i)))
        return x, torch.cat(refs), cond

    # ------------------------------------------------------------ networks
    def extra_networks(self) -> dict[str, nn.Module]:
        """The frozen reference: a copy of the student as it starts (none for the naive baseline)."""
        if self.config.naive:
            return {}
        return {"reference": copy.deepcopy(self.generator.backbone).requires_grad_(False).eval()}

    def saved_extra_networks(self) -> dict[str, nn.Module]:
        return {}  # rebuilt from `student` on resume

    @property
    def reference(self) -> Denoiser:
        return Denoiser(self.extras["reference"], self.schedule, self.generator.prediction_type)

    def is_generator_step(self, step: int) -> bool:
        return True

    def is_fake_step(self, step: int) -> bool:
        return False

    # ------------------------------------------------------------ the loss
    def pair_batch(self, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor | None, Cond]:
        """Step 1-2: targets, reference (losing) images and their shared conditions."""
        c, n = self.config, self.config.batch_size
        if self.offline is not None:
            idx = torch.randint(0, len(self.offline[0]), (n,), generator=self.rng)
            x_w, x_l, cond = self.offline
            return x_w[idx.to(x_w.device)], x_l[idx.to(x_l.device)], index_cond(cond, idx.to(x_w.device))
        x_w, cond, x_l = self.draw_targets(n, self.rng)
        if c.naive or x_l is not None:
            return x_w, x_l, cond
        return x_w, self.sample_from(self.generator, cond, n), cond  # online: the current student

    def noise_levels(self, n: int) -> torch.Tensor:
        """Step 3: ``t`` from the student's own timesteps, or uniform on [0, T)."""
        if self.config.noise_levels == "uniform":
            return self.sample_t(n)
        ts = torch.tensor(self.config.generator_timesteps, dtype=torch.long)
        return ts[torch.randint(0, len(ts), (n,), generator=self.rng)].to(self.device)

    def errors(self, net: nn.Module, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor, noise: torch.Tensor, cond: Cond) -> torch.Tensor:
        """Step 4: ``net``'s denoising error of each sample (the plain diffusion loss, one sample at a time)."""
        pred = net(x_t, t, cond)
        return torch.stack([self.denoising_loss_of(pred[i : i + 1], x0[i : i + 1], x_t[i : i + 1], t[i : i + 1], noise[i : i + 1])
                            for i in range(len(x0))])

    def generator_loss(self, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, float]]:
        c = self.config
        x_w, x_l, cond = self.pair_batch(batch)
        n = x_w.shape[0]
        t = self.noise_levels(n)
        noise = self.randn(tuple(x_w.shape))
        x_w_t = self.schedule.add_noise(x_w, noise, t)
        if c.naive:  # the baseline: plain diffusion fine-tuning on the targets
            loss = self.denoising_loss_of(self.generator(x_w_t, t, cond), x_w, x_w_t, t, noise)
            return loss, {"loss/naive": loss.item()}
        # both images of a pair at the same t with the same noise, in one pass of each network
        x0 = torch.cat([x_w, x_l])
        x_t = torch.cat([x_w_t, self.schedule.add_noise(x_l, noise, t)])
        t2, noise2 = torch.cat([t, t]), torch.cat([noise, noise])
        cond2 = cat_cond(cond, cond)
        err = self.errors(self.generator, x0, x_t, t2, noise2, cond2)
        with torch.no_grad():
            err_ref = self.errors(self.reference, x0, x_t, t2, noise2, cond2)
        loss, margin = pso_loss(err[:n], err_ref[:n], err[n:], err_ref[n:], c.beta)
        return loss, {
            "loss/pso": loss.item(), "pso/margin": margin.mean().item(), "pso/accuracy": (margin < 0).float().mean().item(),
            "pso/err_target": err[:n].mean().item(), "pso/err_reference": err[n:].mean().item(),
        }

    def fake_score_loss(self, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, float]]:
        raise RuntimeError("PSO trains no fake score")  # is_fake_step is always False

    # ------------------------------------------------------------ export
    def export_meta(self) -> dict[str, Any]:
        c = self.config
        return {"pso": {"student": c.student, "student_method": self.student_meta.get("method"), "targets": c.targets,
                        "pairs": None if c.naive else c.pairs, "naive": c.naive, "beta": c.beta, "noise_levels": c.noise_levels}}


__all__ = ["PSOConfig", "PSOTrainer", "pso_loss"]
