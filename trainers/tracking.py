"""Trackers, preview images in them, and evaluation every ``eval_every`` steps.

- ``log_with`` (alias ``report_to``) names any tracker accelerate supports (``tensorboard``,
  ``wandb``, ``comet_ml``, ``mlflow``, ``aim``, ``clearml``, ``dvclive``, ``swanlab``, ``trackio``),
  ``all`` (every one installed) or ``none``. :func:`check_log_with` refuses, at config time, a
  tracker whose package is not installed, naming the ``pip install`` that fixes it.
- :func:`log_picture` puts a preview grid (the PNG :meth:`save_preview` wrote) into the trackers:
  TensorBoard through its ``SummaryWriter.add_image``, wandb as a ``wandb.Image``, and
  accelerate's own ``log_images`` for aim, clearml and swanlab (mlflow, comet_ml, dvclive and
  trackio get the scalars only).
- :class:`RunTracking` scores, every ``eval_every`` steps, the generator an export would hold
  (EMA weights, LoRA merged; gathered under FSDP): digits-FID against the real digits for the
  digits teacher, CLIP score on the validation prompts for text-to-image teachers with a local
  CLIP folder. It logs ``eval/digits_fid`` or ``eval/clip_score`` and shows it on the progress bar.

The scoring functions are ``onestep.eval``'s own (:func:`onestep.eval.digits_fid`,
:func:`onestep.eval.clip_score`), but trainers do not import ``onestep.eval`` (DESIGN.md's layers),
so whoever builds the trainer hands them over as ``trainer.scorers`` (:data:`SCORERS` names
them); ``onestep train`` does. In Python::

    from onestep.eval import clip_score, digits_fid

    trainer = make_trainer(config)
    trainer.scorers = {"digits_fid": digits_fid, "clip_score": clip_score}
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from accelerate.logging import get_logger

from onestep.errors import ConfigError

logger = get_logger(__name__)

#: accelerate's tracker names -> the package ``pip install`` needs (the name itself when absent)
TRACKER_PACKAGES = {"comet_ml": "comet-ml"}
#: What the periodic evaluation scores, by metric: the ``onestep.eval`` function it calls.
SCORERS = {"digits_fid": "onestep.eval.digits_fid", "clip_score": "onestep.eval.clip_score"}
#: Latents decoded at once for the CLIP score of a latent teacher.
DECODE_BATCH = 16


# ------------------------------------------------------------------ trackers
def tracker_names() -> list[str]:
    """Every tracker accelerate supports (its ``LoggerType`` values, ``all`` left out; TensorBoard and wandb first)."""
    from accelerate.utils import LoggerType

    names = [t.value for t in LoggerType if t.value != "all"]
    return sorted(names, key=lambda n: (n not in ("tensorboard", "wandb"), n != "tensorboard"))


def installed_trackers() -> list[str]:
    """The trackers whose package is installed, as accelerate itself decides (what ``all`` starts)."""
    from accelerate.tracking import get_available_trackers

    return [str(getattr(t, "value", t)) for t in get_available_trackers()]


def check_log_with(value: Any) -> None:
    """A :class:`ConfigError` unless ``value`` is ``none``, ``all`` (with a tracker installed) or a
    tracker accelerate supports whose package is installed."""
    names = tracker_names()
    if not isinstance(value, str) or value not in (*names, "all", "none"):
        raise ConfigError(f"log_with must be one of {', '.join(names)}, all or none (got {value!r})")
    if value == "none":
        return
    installed = installed_trackers()
    if value == "all" and not installed:
        raise ConfigError("log_with: all, but no tracker is installed; pip install tensorboard (or log_with: none)")
    if value != "all" and value not in installed:
        package = TRACKER_PACKAGES.get(value, value)
        raise ConfigError(f"log_with: {value} is not installed; pip install {package} (or log_with: tensorboard / none)")


def log_picture(accelerator, path: str | Path, step: int, tag: str = "preview") -> None:
    """Log the picture at ``path`` (a preview grid) as an image at ``step`` to every tracker the run
    started that can take one (none started: nothing is read)."""
    trackers = [t for t in accelerator.trackers if t.name in ("tensorboard", "wandb", "aim", "clearml", "swanlab")]
    if not trackers:
        return
    import numpy as np
    from PIL import Image

    with Image.open(path) as im:
        image = np.asarray(im.convert("RGB"))
    for tracker in trackers:
        if tracker.name == "tensorboard":
            tracker.writer.add_image(tag, image, global_step=step, dataformats="HWC")
        elif tracker.name == "wandb":
            import wandb

            tracker.log({tag: wandb.Image(image, caption=f"step {step}")}, step=step)
        elif tracker.name == "swanlab":
            tracker.log_images({tag: [image]}, step=step)
        else:  # aim, clearml: one image a key
            tracker.log_images({tag: image}, step=step)


# ------------------------------------------------------ periodic evaluation
def _metric(name: str, digits: bool, text: bool, clip_model: str | None) -> str:
    if digits:
        return "digits_fid"
    if text and clip_model is None:
        raise ConfigError(
            f"eval_every: teacher {name} is text-to-image, scored with the CLIP score: set eval_clip_model to a local "
            "CLIP model folder (or eval_every: 0)"
        )
    if text:
        return "clip_score"
    raise ConfigError(
        f"eval_every: nothing to score during training for teacher {name} (digits-FID needs the digits teacher, the "
        "CLIP score a text-to-image teacher and eval_clip_model); set eval_every: 0 and score checkpoints with onestep eval"
    )


def _json_object(path: Path) -> dict:
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def eval_metric_of(teacher: str, clip_model: str | None) -> str | None:
    """What ``eval_every`` scores for the teacher a config names, read from its name or folder:
    ``digits_fid`` or ``clip_score``; a :class:`ConfigError` when there is nothing to score; None
    for a path that is not a folder (loading the teacher names that)."""
    if teacher == "digits" or teacher.startswith("gmm-"):
        return _metric(teacher, teacher == "digits", False, clip_model)
    path = Path(teacher).expanduser()
    if not path.is_dir():
        return None
    digits = _json_object(path / "onestep_teacher.json").get("data") == "digits"
    text = any(str(k).startswith("text_encoder") for k in _json_object(path / "model_index.json"))
    return _metric(teacher, digits, text, clip_model)


def eval_clip_folder(config) -> str | None:
    """The CLIP folder of the periodic CLIP score: ``eval_clip_model``, else the method's ``clip_model``."""
    return config.eval_clip_model or getattr(config, "clip_model", None)


@torch.no_grad()
def images_of(trainer, x: torch.Tensor) -> torch.Tensor:
    """Generator samples ``x`` as images in [-1, 1] on the CPU: decoded by the teacher's VAE, a few at a
    time, for latent teachers; as they are otherwise (previews and the periodic evaluation)."""
    if trainer.teacher_spec.vae is None:
        return x
    return torch.cat([trainer.decode(z.to(trainer.device)).clamp(-1, 1).cpu() for z in x.split(DECODE_BATCH)])


class RunTracking:
    """The periodic evaluation of a trainer's run (``eval_every``; nothing at all when it is 0).

    Built before the run writes anything: a teacher with nothing to score, a CLIP folder that does
    not load or missing ``trainer.scorers`` raise a :class:`ConfigError` there, not mid-run.
    """

    def __init__(self, trainer):
        self.trainer = trainer
        c = trainer.config
        self.every = c.eval_every
        self.shown: dict[str, str] = {}  # the latest score, for the progress bar
        if not self.every:
            return
        spec = trainer.teacher_spec
        clip_folder = eval_clip_folder(c)
        self.metric = _metric(spec.name, spec.meta.get("data") == "digits", spec.conditioning.kind == "text", clip_folder)
        scorers = getattr(trainer, "scorers", None) or {}
        if self.metric not in scorers:
            raise ConfigError(
                f"eval_every: the trainer has no {self.metric} function; onestep train hands onestep.eval's to it, in "
                f"Python set trainer.scorers = {{'{self.metric}': {SCORERS[self.metric]}}} (trainers do not import onestep.eval)"
            )
        self.score_fn = scorers[self.metric]
        self.clip = None
        if self.metric == "clip_score" and trainer.accelerator.is_main_process:
            from onestep.clip import load_clip

            self.clip = load_clip(clip_folder, device=trainer.device, what="eval_clip_model")

    def due(self, step: int) -> bool:
        return bool(self.every) and step % self.every == 0

    def evaluate(self, step: int) -> dict[str, float]:
        """Score the generator an export would hold now, log ``eval/<metric>`` at ``step`` and keep it
        for the progress bar. Every process must call it (FSDP gathers the generator from all of
        them); only the main one samples and scores, with the fixed seeds of :meth:`preview_samples`,
        leaving the training's random streams as they were."""
        tr = self.trainer
        acc = tr.accelerator
        with tr.export_view() as net:  # the EMA weights stand in the generator while it samples
            if not acc.is_main_process:
                return {}
            n = tr.config.eval_num_samples
            devices = [acc.device] if acc.device.type == "cuda" else []
            with torch.random.fork_rng(devices=devices), torch.no_grad():
                x, _ = tr.preview_samples(n=n, net=net)
                if self.metric == "digits_fid":
                    value = float(self.score_fn(x))
                else:
                    x = images_of(tr, x)
                    valid = tr.conditioning.validation_prompts
                    prompts = [valid[i % len(valid)] for i in range(n)]
                    value = float(self.score_fn(x, prompts, self.clip)["clip_score"])
        logs = {f"eval/{self.metric}": value}
        acc.log(logs, step=step)
        logger.info(f"step {step}: eval/{self.metric} = {value:.4g} ({n} samples)")
        self.shown = {self.metric: f"{value:.3g}"}
        tr.run_metrics = {self.metric: value, "step": step, "samples": n}
        return logs


__all__ = ["SCORERS", "TRACKER_PACKAGES", "RunTracking", "check_log_with", "eval_metric_of", "images_of", "installed_trackers", "log_picture", "tracker_names"]
