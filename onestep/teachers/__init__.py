"""Teachers: the built-in ones (``digits``, ``gmm-*``) and diffusers checkpoints on disk.

:func:`load_teacher` turns a name or a local path into a :class:`Teacher`: a frozen
backbone with its schedule, prediction type, conditioning and sample shape. Nothing
here reaches a model hub; weights load only from safetensors.
"""

from __future__ import annotations

import copy
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from ..conditioning import Cond, Conditioning
from ..denoiser import Denoiser
from ..errors import TeacherError
from ..schedule import NoiseSchedule

ASSETS = Path(__file__).resolve().parent.parent / "assets"
DIGITS_TEACHER = ASSETS / "digits-teacher"
PICKLE_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth", ".pkl", ".pickle")

RealSampler = Callable[[int, torch.Generator], tuple[torch.Tensor, Cond]]


@dataclass
class Teacher:
    """A frozen teacher and what is needed to distil it.

    Attributes:
        name: built-in name or the path it was loaded from.
        backbone: the network (frozen; ``requires_grad`` off).
        schedule: its noise schedule.
        prediction_type: ``"epsilon"``, ``"v_prediction"`` or ``"sample"``.
        conditioning: how it is conditioned (and the null condition for guidance).
        sample_shape: shape of one sample, e.g. ``(1, 16, 16)`` or ``(2,)``.
        guidance_scale: a sensible default CFG scale for sampling it.
        clip: clamp x0 predictions to ``[-clip, clip]`` when sampling (None: no clamp).
        sha256: a hash of its weights (or of its analytic definition).
        real_data: draws ``(x0, cond)`` from the teacher's training data, if there is any.
        student_factory: builds a fresh student backbone when the generator cannot be a
            copy of the teacher (analytic teachers); None means "copy the teacher".
        student_prediction_type: what such fresh networks predict (default: the teacher's).
            Analytic teachers use ``v_prediction``: an eps-predicting generator at t = T-1
            would amplify its errors by s_T / a_T (about 150 for the gmm schedule).
        analytic: True when the teacher has no weights (exact score).
        vae: for latent teachers (text-to-image), the frozen autoencoder between images and
            the latents the teacher works on (:class:`onestep.teachers.sd.LatentVAE`); None for
            pixel-space teachers.
    """

    name: str
    backbone: nn.Module
    schedule: NoiseSchedule
    prediction_type: str
    conditioning: Conditioning
    sample_shape: tuple[int, ...]
    guidance_scale: float = 1.0
    clip: float | None = None
    sha256: str = ""
    real_data: RealSampler | None = None
    student_factory: Callable[[], nn.Module] | None = None
    student_prediction_type: str | None = None
    analytic: bool = False
    meta: dict = field(default_factory=dict)
    vae: nn.Module | None = None

    def __post_init__(self):
        self.backbone.requires_grad_(False)
        self.backbone.eval()
        if self.vae is not None:
            self.vae.requires_grad_(False).eval()

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        """Images from samples: the VAE decode of latents, or the samples themselves."""
        return x if self.vae is None else self.vae.decode(x)

    def denoiser(self) -> Denoiser:
        return Denoiser(self.backbone, self.schedule, self.prediction_type)

    @property
    def trainable_prediction_type(self) -> str:
        """Prediction type of the networks :meth:`new_backbone` builds."""
        return self.student_prediction_type or self.prediction_type

    def new_backbone(self) -> nn.Module:
        """A trainable network shaped for this teacher: a copy of it, or a fresh student."""
        net = self.student_factory() if self.student_factory is not None else copy.deepcopy(self.backbone)
        net.requires_grad_(True)
        net.train()
        return net


def save_unet_teacher(out: str | Path, unet: nn.Module, scheduler_config: dict, meta: dict | None = None) -> Path:
    """Write a ``UNet2DModel`` teacher as a diffusers DDPM pipeline folder (``unet/``, ``scheduler/``,
    ``model_index.json``), plus ``onestep_teacher.json`` holding ``meta`` (conditioning, default guidance)."""
    import diffusers
    from diffusers import DDPMScheduler

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    unet.save_pretrained(out / "unet", safe_serialization=True)
    DDPMScheduler(**scheduler_config).save_pretrained(out / "scheduler")
    index = {
        "_class_name": "DDPMPipeline",
        "_diffusers_version": diffusers.__version__,
        "unet": ["diffusers", type(unet).__name__],
        "scheduler": ["diffusers", "DDPMScheduler"],
    }
    (out / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
    if meta is not None:
        (out / "onestep_teacher.json").write_text(json.dumps(meta, indent=2) + "\n")
    return out


def _sha256_of(paths: list[Path]) -> str:
    h = hashlib.sha256()
    for p in sorted(paths):
        with open(p, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def refuse_pickles(folder: Path) -> None:
    """Raise if ``folder`` holds pickle weights and no safetensors (we never unpickle)."""
    pickles = [p for p in folder.rglob("*") if p.suffix in PICKLE_SUFFIXES]
    if pickles and not list(folder.rglob("*.safetensors")):
        raise TeacherError(
            f"{folder} holds only pickle weights ({pickles[0].name}); onestep loads safetensors only. "
            "Convert it once with diffusers: Model.from_pretrained(path).save_pretrained(out, safe_serialization=True)"
        )


def load_teacher(spec: str | Path, **text_options) -> Teacher:
    """Load a teacher by built-in name (``digits``, ``gmm-ring8``, ``gmm-ring8-unbalanced``,
    ``gmm-grid25``) or from a local diffusers pipeline folder (``model_index.json`` with a
    ``unet`` and a ``scheduler``).

    Text-to-image folders (a ``UNet2DConditionModel`` with VAE, text encoder(s) and
    tokenizer(s): SD1.5, SD2.1, SDXL) load through :func:`onestep.teachers.sd.load_text_to_image_teacher`,
    flow-matching SD3 folders (an ``SD3Transformer2DModel``) through
    :func:`onestep.teachers.sd3.load_sd3_teacher`; both take ``text_options`` (``prompts``, ``validation_prompts``, ``negative_prompt``,
    ``resolution``, ``real_images``, ``cache_text_embeddings``, ``device``); other teachers ignore them."""
    s = str(spec)
    if s.startswith("gmm-"):
        return _gmm_teacher(s)
    if s == "digits":
        return _pipeline_teacher(DIGITS_TEACHER, name="digits")
    path = Path(s).expanduser()
    if not path.exists():
        raise TeacherError(
            f"teacher {s!r} is neither a built-in teacher (digits, gmm-ring8, gmm-ring8-unbalanced, "
            "gmm-grid25) nor an existing path; point teacher: (or --teacher) at your local diffusers pipeline folder"
        )
    if (path / "model_index.json").is_file():
        from .sd import component_class, load_text_to_image_teacher, read_model_index

        index = read_model_index(path)
        if component_class(index, "unet") == "UNet2DConditionModel":
            return load_text_to_image_teacher(path, name=str(path), **text_options)
        if component_class(index, "transformer") == "SD3Transformer2DModel":
            from .sd3 import load_sd3_teacher

            return load_sd3_teacher(path, name=str(path), **text_options)
    return _pipeline_teacher(path, name=str(path))


def _pipeline_teacher(path: Path, name: str) -> Teacher:
    from diffusers import UNet2DModel

    if not path.is_dir():
        raise TeacherError(f"teacher path {path} is not a folder (expected a diffusers pipeline folder)")
    index_file = path / "model_index.json"
    if not index_file.exists():
        raise TeacherError(f"{path} is not a diffusers pipeline folder: model_index.json is missing")
    index = json.loads(index_file.read_text())
    for part in ("unet", "scheduler"):
        if part not in index or not (path / part).is_dir():
            raise TeacherError(f"{path}: the pipeline has no '{part}' component (need unet and scheduler)")
    unet_class = index["unet"][1] if isinstance(index["unet"], list) else str(index["unet"])
    if unet_class != "UNet2DModel":
        raise TeacherError(
            f"{path}: unet is a {unet_class}; this loader handles UNet2DModel pipelines "
            "(text-to-image pipelines load through the text-to-image teacher)"
        )
    refuse_pickles(path / "unet")
    try:
        unet = UNet2DModel.from_pretrained(path / "unet", use_safetensors=True)
    except (OSError, EnvironmentError) as e:
        raise TeacherError(f"{path / 'unet'}: cannot load the UNet ({e})") from e
    sched_cfg = json.loads((path / "scheduler" / "scheduler_config.json").read_text())
    schedule = NoiseSchedule.from_scheduler_config(sched_cfg)
    meta_file = path / "onestep_teacher.json"
    meta = json.loads(meta_file.read_text()) if meta_file.exists() else {}
    cfg = unet.config
    if "conditioning" in meta:
        conditioning = Conditioning(**meta["conditioning"])
    elif cfg.num_class_embeds:
        # Convention without metadata: the last class embedding is the null class.
        conditioning = Conditioning("class", cfg.num_class_embeds - 1, cfg.num_class_embeds - 1)
    else:
        conditioning = Conditioning("none")
    size = cfg.sample_size if isinstance(cfg.sample_size, (list, tuple)) else (cfg.sample_size, cfg.sample_size)
    real_data = _digits_sampler() if meta.get("data") == "digits" else None
    clip = meta.get("clip_sample", 1.0 if sched_cfg.get("clip_sample", False) else None)
    return Teacher(
        name=name,
        backbone=unet,
        schedule=schedule,
        prediction_type=sched_cfg.get("prediction_type", "epsilon"),
        conditioning=conditioning,
        sample_shape=(cfg.in_channels, *size),
        guidance_scale=float(meta.get("guidance_scale", 1.0)),
        clip=clip,
        sha256=_sha256_of(list((path / "unet").glob("*.safetensors"))),
        real_data=real_data,
        meta=meta,
    )


def _digits_sampler() -> RealSampler:
    from ..digits import digits_dataset

    x_all, y_all = digits_dataset()

    def draw(n: int, generator: torch.Generator) -> tuple[torch.Tensor, Cond]:
        idx = torch.randint(0, len(x_all), (n,), generator=generator)
        return x_all[idx], y_all[idx]

    return draw


def _gmm_teacher(name: str) -> Teacher:
    from .gmm import GMM_SCHEDULER_CONFIG, GaussianMixtureScore, MLPDenoiser, gmm_mixture

    means, stds, weights = gmm_mixture(name)
    schedule = NoiseSchedule.from_scheduler_config(GMM_SCHEDULER_CONFIG)
    backbone = GaussianMixtureScore(means, stds, weights, schedule.alphas_cumprod)

    def draw(n: int, generator: torch.Generator) -> tuple[torch.Tensor, Cond]:
        return backbone.sample(n, generator=generator)[0], None

    definition = json.dumps({"means": means.tolist(), "stds": stds.tolist(), "weights": weights.tolist()})
    return Teacher(
        name=name,
        backbone=backbone,
        schedule=schedule,
        prediction_type="epsilon",
        conditioning=Conditioning("none"),
        sample_shape=(2,),
        guidance_scale=1.0,
        clip=None,
        sha256=hashlib.sha256(definition.encode()).hexdigest(),
        real_data=draw,
        student_factory=lambda: MLPDenoiser(),
        student_prediction_type="v_prediction",
        analytic=True,
        meta={"mixture": name},
    )
