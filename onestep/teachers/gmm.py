"""Analytic 2-D Gaussian-mixture teachers and the small MLP used to distil them.

A mixture of isotropic Gaussians ``sum_k w_k N(mu_k, sig_k^2 I)`` stays a mixture
under the VP forward process ``x_t = a_t x_0 + s_t eps``:
``p_t = sum_k w_k N(a_t mu_k, (a_t^2 sig_k^2 + s_t^2) I)``. Its score, and hence
the exact eps prediction ``-s_t * score``, is available in closed form, so these
teachers are exact and have no weights. :class:`MLPDenoiser` is the diffusers
model used as student and fake score for them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config
from diffusers.models.embeddings import get_timestep_embedding
from diffusers.utils import BaseOutput
from torch import nn

from ..errors import TeacherError

GMM_SCHEDULER_CONFIG = dict(
    num_train_timesteps=1000,
    beta_schedule="linear",
    beta_start=1e-4,
    beta_end=0.02,
    prediction_type="epsilon",
)

Mixture = tuple[torch.Tensor, torch.Tensor, torch.Tensor]

#: Seed of the fixed random Fourier frequencies of :class:`MLPDenoiser` (``fourier_features > 0``).
FOURIER_SEED = 0


def _ring(k: int = 8, radius: float = 4.0) -> torch.Tensor:
    angles = 2 * math.pi * torch.arange(k, dtype=torch.float64) / k
    return radius * torch.stack([angles.cos(), angles.sin()], dim=1)


def _grid(values: tuple[float, ...] = (-4.0, -2.0, 0.0, 2.0, 4.0)) -> torch.Tensor:
    v = torch.tensor(values, dtype=torch.float64)
    gx, gy = torch.meshgrid(v, v, indexing="ij")
    return torch.stack([gx.reshape(-1), gy.reshape(-1)], dim=1)


def _preset(means: torch.Tensor, std: float, weights: torch.Tensor | None = None) -> Mixture:
    k = means.shape[0]
    w = torch.ones(k, dtype=torch.float64) if weights is None else weights.to(torch.float64)
    return means, torch.full((k,), std, dtype=torch.float64), w / w.sum()


GMM_PRESETS: dict[str, Mixture] = {
    "gmm-ring8": _preset(_ring(), 0.3),
    "gmm-ring8-unbalanced": _preset(_ring(), 0.3, torch.arange(1, 9, dtype=torch.float64)),
    "gmm-grid25": _preset(_grid(), 0.2),
}


#: Keyword arguments of :class:`MLPDenoiser` for the fresh generator and fake score of a preset
#: (absent: the plain default network). The 25 modes of gmm-grid25 need steps in the noise->sample
#: map that the plain 2-D input learns too slowly (its students lay on the grid lines): random
#: Fourier features of the input (see :class:`MLPDenoiser`).
GMM_STUDENT_CONFIGS: dict[str, dict] = {
    "gmm-grid25": {"fourier_features": 64, "fourier_scale": 2.0},
}


def gmm_student(name: str) -> "MLPDenoiser":
    """A fresh student / fake-score network for the mixture preset ``name``."""
    return MLPDenoiser(**GMM_STUDENT_CONFIGS.get(name, {}))


def gmm_mixture(name: str) -> Mixture:
    """``(means (K, 2), stds (K,), weights (K,))`` of a preset, as fresh float64 tensors."""
    if name not in GMM_PRESETS:
        raise TeacherError(f"unknown Gaussian-mixture teacher {name!r}; expected one of {', '.join(GMM_PRESETS)}")
    means, stds, weights = GMM_PRESETS[name]
    return means.clone(), stds.clone(), weights.clone()


def _timesteps(timestep: int | torch.Tensor, batch: int, device: torch.device) -> torch.Tensor:
    """A python int, 0-d or ``(B,)`` tensor as a ``(B,)`` tensor on ``device``."""
    t = torch.as_tensor(timestep, device=device)
    if t.ndim == 0:
        t = t.expand(batch)
    return t.reshape(batch)


class GaussianMixtureScore(nn.Module):
    """Exact eps-prediction backbone of a noised isotropic Gaussian mixture (VP schedule).

    Args:
        means: ``(K, D)`` component centres.
        stds: ``(K,)`` component standard deviations.
        weights: ``(K,)`` mixture weights (normalised here).
        alphas_cumprod: ``abar_t`` for ``t = 0 .. T-1``.

    Everything is stored as float64 buffers; the module has no parameters.
    """

    def __init__(
        self,
        means: torch.Tensor,
        stds: torch.Tensor,
        weights: torch.Tensor,
        alphas_cumprod: torch.Tensor,
    ):
        super().__init__()
        means = torch.as_tensor(means, dtype=torch.float64)
        stds = torch.as_tensor(stds, dtype=torch.float64)
        weights = torch.as_tensor(weights, dtype=torch.float64)
        if means.ndim != 2 or stds.shape != means.shape[:1] or weights.shape != means.shape[:1]:
            raise TeacherError("a Gaussian mixture needs means (K, D), stds (K,) and weights (K,)")
        if not bool((stds > 0).all()) or not bool((weights >= 0).all()) or float(weights.sum()) <= 0:
            raise TeacherError("mixture stds must be positive and weights non-negative with a positive sum")
        self.register_buffer("means", means)
        self.register_buffer("stds", stds)
        self.register_buffer("weights", weights / weights.sum())
        self.register_buffer("alphas_cumprod", torch.as_tensor(alphas_cumprod, dtype=torch.float64))

    @property
    def dim(self) -> int:
        return self.means.shape[1]

    def _alpha_sigma(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        ac = self.alphas_cumprod[t.to(self.alphas_cumprod.device).long()]
        return ac.sqrt(), (1 - ac).sqrt()

    def _components(self, x_t: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per-component log joint ``log w_k + log N_k(x_t)`` ``(B, K)``, residuals ``(B, K, D)``, variances ``(B, K)``."""
        x = x_t.to(self.means.device, torch.float64)
        a, s = self._alpha_sigma(_timesteps(t, x.shape[0], x.device))
        var = a[:, None] ** 2 * self.stds**2 + s[:, None] ** 2
        diff = x[:, None, :] - a[:, None, None] * self.means
        sq = (diff**2).sum(-1)
        log_n = -0.5 * self.dim * torch.log(2 * math.pi * var) - 0.5 * sq / var
        return self.weights.log() + log_n, diff, var

    def log_prob(self, x_t: torch.Tensor, t: int | torch.Tensor) -> torch.Tensor:
        """Exact ``log p_t(x_t)`` per sample, ``(B,)`` float64."""
        logits, _, _ = self._components(x_t, t)
        return torch.logsumexp(logits, dim=1)

    def score(self, x_t: torch.Tensor, t: int | torch.Tensor) -> torch.Tensor:
        """Exact ``grad log p_t(x_t)`` ``(B, D)`` float64, via softmax responsibilities."""
        logits, diff, var = self._components(x_t, t)
        resp = torch.softmax(logits, dim=1)
        return -(resp[:, :, None] * diff / var[:, :, None]).sum(1)

    def forward(
        self,
        sample: torch.Tensor,
        timestep: int | torch.Tensor,
        class_labels: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Exact eps prediction ``-s_t * score`` (float32, shaped like ``sample``)."""
        x = sample.reshape(sample.shape[0], -1)
        t = _timesteps(timestep, x.shape[0], self.means.device)
        _, s = self._alpha_sigma(t)
        eps = -s[:, None] * self.score(x, t)
        return eps.to(device=sample.device, dtype=torch.float32).reshape(sample.shape)

    @torch.no_grad()
    def sample(self, n: int, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``n`` draws from the clean mixture: ``(x0 (n, D) float32, component index (n,))``."""
        dev = generator.device if generator is not None else self.means.device
        k = torch.multinomial(self.weights.to(dev), n, replacement=True, generator=generator)
        noise = torch.randn(n, self.dim, generator=generator, device=dev, dtype=torch.float64)
        x0 = self.means.to(dev)[k] + self.stds.to(dev)[k, None] * noise
        return x0.float(), k


@dataclass
class MLPDenoiserOutput(BaseOutput):
    """Output of :class:`MLPDenoiser`: the raw prediction ``(B, sample_dim)``."""

    sample: torch.Tensor


class ResidualBlock(nn.Module):
    """Pre-norm residual MLP block conditioned on an embedding: ``h + W2 silu(W1 norm(h) + emb)``."""

    def __init__(self, hidden_dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(hidden_dim)
        self.fc1 = nn.Linear(hidden_dim, hidden_dim)
        self.emb_proj = nn.Linear(hidden_dim, hidden_dim)
        self.fc2 = nn.Linear(hidden_dim, hidden_dim)
        self.act = nn.SiLU()

    def forward(self, h: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        return h + self.fc2(self.act(self.fc1(self.norm(h)) + self.emb_proj(emb)))


class MLPDenoiser(ModelMixin, ConfigMixin):
    """Small residual MLP denoiser for low-dimensional data (student / fake score for GMM teachers).

    ``num_layers`` residual blocks in all: ``(num_layers - 1) // 2`` down blocks, one
    ``mid_block`` (its ``(B, hidden_dim)`` output is the bottleneck feature for GAN
    heads) and the rest as up blocks. The output layer is zero-initialised, so a fresh
    model predicts 0.

    ``fourier_features > 0`` feeds the input layer ``[x, sin(x B), cos(x B)]`` instead of
    ``x``, with a fixed ``B`` ``(sample_dim, fourier_features)`` drawn from
    ``N(0, fourier_scale^2)`` with a fixed seed (rebuilt from the config, not stored). A
    one-step generator of a mixture with many well separated modes (gmm-grid25) needs a
    map from noise that is flat inside each mode and jumps between them; a plain MLP of
    the 2-D input learns such steps slowly (spectral bias) and leaves samples on the
    lines between modes, random Fourier features of the input let it draw them sharply.
    ``fourier_features = 0`` (the default) is the plain network, unchanged.
    """

    @register_to_config
    def __init__(
        self,
        sample_dim: int = 2,
        hidden_dim: int = 256,
        num_layers: int = 4,
        time_embed_dim: int = 64,
        num_class_embeds: int | None = None,
        fourier_features: int = 0,
        fourier_scale: float = 1.0,
    ):
        super().__init__()
        if num_layers < 1:
            raise ValueError("num_layers must be at least 1")
        if fourier_features < 0 or fourier_scale <= 0:
            raise ValueError("fourier_features must be >= 0 and fourier_scale > 0")
        n_down = (num_layers - 1) // 2
        self.time_embedding = nn.Sequential(
            nn.Linear(time_embed_dim, hidden_dim), nn.SiLU(), nn.Linear(hidden_dim, hidden_dim)
        )
        self.class_embedding = nn.Embedding(num_class_embeds, hidden_dim) if num_class_embeds else None
        if fourier_features:
            # A generator of its own: the global RNG (the networks' initialisation) is not consumed.
            g = torch.Generator().manual_seed(FOURIER_SEED)
            freqs = torch.randn(sample_dim, fourier_features, generator=g) * fourier_scale
            self.register_buffer("fourier_freqs", freqs, persistent=False)
        else:
            self.fourier_freqs = None
        self.input_proj = nn.Linear(sample_dim + 2 * fourier_features, hidden_dim)
        self.down_blocks = nn.ModuleList(ResidualBlock(hidden_dim) for _ in range(n_down))
        self.mid_block = ResidualBlock(hidden_dim)
        self.up_blocks = nn.ModuleList(ResidualBlock(hidden_dim) for _ in range(num_layers - 1 - n_down))
        self.out_norm = nn.LayerNorm(hidden_dim)
        self.out_act = nn.SiLU()
        self.out_proj = nn.Linear(hidden_dim, sample_dim)
        nn.init.zeros_(self.out_proj.weight)
        nn.init.zeros_(self.out_proj.bias)

    def forward(
        self,
        sample: torch.Tensor,
        timestep: int | torch.Tensor,
        class_labels: torch.Tensor | None = None,
        return_dict: bool = True,
    ) -> MLPDenoiserOutput | tuple[torch.Tensor]:
        """Raw prediction for ``sample`` ``(B, sample_dim)`` at integer ``timestep``.

        ``class_labels`` is required when the model has class embeddings and ignored
        otherwise (as in diffusers' ``UNet2DModel``).
        """
        dtype = self.input_proj.weight.dtype
        t = _timesteps(timestep, sample.shape[0], sample.device)
        t_emb = get_timestep_embedding(t, self.config.time_embed_dim, flip_sin_to_cos=True, downscale_freq_shift=0)
        emb = self.time_embedding(t_emb.to(dtype))
        if self.class_embedding is not None:
            if class_labels is None:
                raise ValueError("class_labels must be given: this MLPDenoiser is class-conditional")
            emb = emb + self.class_embedding(class_labels.to(sample.device).long())
        x = sample.to(dtype)
        if self.fourier_freqs is not None:
            proj = x @ self.fourier_freqs.to(dtype)
            x = torch.cat([x, proj.sin(), proj.cos()], dim=1)
        h = self.input_proj(x)
        for block in self.down_blocks:
            h = block(h, emb)
        h = self.mid_block(h, emb)
        for block in self.up_blocks:
            h = block(h, emb)
        out = self.out_proj(self.out_act(self.out_norm(h)))
        if not return_dict:
            return (out,)
        return MLPDenoiserOutput(sample=out)
