"""The referee of the ``sounds`` teacher: a small CNN classifier of its mel spectrograms, class accuracy
and a mel-spectrogram FID on its features.

The network (:class:`SoundsFeatureNet`) classifies the six synthetic sound classes of :mod:`onestep.audio`
from normalised log-mels ``(N, 1, 32, 16)`` in [-1, 1]. It is trained on the ``"train"`` split (the
teacher's data) with small time shifts and noise, its held-out accuracy is measured on the ``"test"``
split, and it ships as safetensors in ``onestep/assets/sounds-features/``:

    OMP_NUM_THREADS=1 python -m onestep.eval.audio --out onestep/assets/sounds-features

Its features are the 64 pre-activations of the layer before the logits, standardised per unit with the
training split's mean and std. mel-FID (:func:`mel_fid`) is the Frechet distance of those features
between two sets of spectrograms; :func:`audio_scores` gives class accuracy and mel-FID of generated
spectrograms against the held-out real ones (600 sounds, 100 a class). FID is biased upwards for small
sets: compare values on the same number of samples.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import time
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .digits_net import StandardisedFeatureNet

from onestep.audio import FRAMES, N_MELS, NUM_CLASSES

FEATURE_DIM = 64


def _asset_dir() -> Path:
    import onestep.assets

    return Path(onestep.assets.__file__).resolve().parent / "sounds-features"


class SoundsFeatureNet(StandardisedFeatureNet):
    """Two conv stages (32x16 -> 16x8 -> 8x4), a 64-unit feature layer and a 6-way classifier.

    ``features(x)`` returns the standardised pre-activations of the feature layer ``(N, 64)``;
    ``forward(x)`` the class logits ``(N, 6)``."""

    def __init__(self, width: int = 24, feature_dim: int = FEATURE_DIM, num_classes: int = NUM_CLASSES, dropout: float = 0.3):
        super().__init__()
        self.conv = nn.Sequential(
            nn.Conv2d(1, width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(width, 2 * width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        )
        self.feature = nn.Linear(2 * width * (N_MELS // 4) * (FRAMES // 4), feature_dim)
        self.head = nn.Sequential(nn.ReLU(), nn.Dropout(dropout), nn.Linear(feature_dim, num_classes))
        self._standardise(feature_dim)


def _check(mels: torch.Tensor) -> torch.Tensor:
    from onestep.errors import OnestepError

    if mels.ndim != 4 or tuple(mels.shape[1:]) != (1, N_MELS, FRAMES):
        raise OnestepError(f"sounds features need mel spectrograms of shape (N, 1, {N_MELS}, {FRAMES}), got {tuple(mels.shape)}")
    return mels.detach().float().cpu().clamp(-1, 1)


@lru_cache(maxsize=1)
def load_sounds_feature_net(path: str | None = None) -> SoundsFeatureNet:
    """The shipped sounds classifier (eval mode, frozen, on CPU), or one saved at ``path``."""
    from safetensors.torch import load_file

    from onestep.errors import OnestepError

    folder = Path(path) if path is not None else _asset_dir()
    cfg_file, weights = folder / "config.json", folder / "model.safetensors"
    if not weights.is_file() or not cfg_file.is_file():
        raise OnestepError(f"sounds feature extractor not found in {folder}; make it with `python -m onestep.eval.audio`")
    cfg = json.loads(cfg_file.read_text())
    net = SoundsFeatureNet(width=cfg["width"], feature_dim=cfg["feature_dim"], num_classes=cfg["num_classes"])
    net.load_state_dict(load_file(weights))
    net.requires_grad_(False)
    return net.eval()


@torch.no_grad()
def sounds_features(mels: torch.Tensor, batch_size: int = 512) -> np.ndarray:
    """``(N, 64)`` float64 features of mel spectrograms ``(N, 1, 32, 16)`` in [-1, 1] (clamped)."""
    net, x = load_sounds_feature_net(), _check(mels)
    out = [net.features(x[i : i + batch_size]).double() for i in range(0, len(x), batch_size)]
    return torch.cat(out).numpy() if out else np.zeros((0, FEATURE_DIM))


@torch.no_grad()
def classify_sounds(mels: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
    """Predicted class of each mel spectrogram ``(N,)``."""
    net, x = load_sounds_feature_net(), _check(mels)
    return torch.cat([net(x[i : i + batch_size]).argmax(1) for i in range(0, len(x), batch_size)])


def mel_fid(fake: torch.Tensor, real: torch.Tensor | None = None) -> float:
    """mel-FID: the Frechet distance between sounds-classifier features of two sets of mel spectrograms
    (``real`` default: the 600 held-out real sounds, :func:`onestep.audio.sounds_dataset` ``("test")``)."""
    from onestep.audio import sounds_dataset

    from .frechet import feature_statistics, frechet_distance

    real = sounds_dataset("test")[0] if real is None else real
    mu1, s1 = feature_statistics(sounds_features(fake))
    mu2, s2 = feature_statistics(sounds_features(real))
    return frechet_distance(mu1, s1, mu2, s2)


def audio_scores(mels: torch.Tensor, labels: torch.Tensor | list[int], real: torch.Tensor | None = None) -> dict[str, float]:
    """Class accuracy (the referee's prediction against the asked ``labels``) and mel-FID against the
    held-out real sounds (or ``real``) of generated mel spectrograms."""
    y = torch.as_tensor(labels).long()
    return {"class_accuracy": float((classify_sounds(mels) == y).float().mean()), "mel_fid": mel_fid(mels, real)}


def _augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Shift each spectrogram by -1..1 frames (padding with silence) and add noise of std 0.05."""
    n = x.shape[0]
    padded = F.pad(x, (1, 1), value=-1.0)
    dx = torch.randint(0, 3, (n,), generator=gen)
    out = torch.stack([padded[i, :, :, dx[i] : dx[i] + FRAMES] for i in range(n)])
    return (out + 0.05 * torch.randn(out.shape, generator=gen)).clamp(-1, 1)


def train(out: Path, epochs: int = 15, batch_size: int = 64, lr: float = 2e-3, seed: int = 0, width: int = 24) -> dict:
    """Train the referee on the ``"train"`` split, measure it on ``"test"``, save it in ``out``."""
    from safetensors.torch import save_file

    from onestep.audio import sounds_dataset

    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    x, y = sounds_dataset("train")
    xt, yt = sounds_dataset("test")
    net = SoundsFeatureNet(width=width)
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-4)
    steps = epochs * ((len(x) + batch_size - 1) // batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps)
    start = time.perf_counter()
    for _ in range(epochs):
        net.train()
        perm = torch.randperm(len(x), generator=gen)
        for i in range(0, len(perm), batch_size):
            idx = perm[i : i + batch_size]
            loss = F.cross_entropy(net(_augment(x[idx], gen)), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    net.eval()
    with torch.no_grad():
        pre = net.pre_activations(x).double()
        net.feature_mean.copy_(pre.mean(0).float())
        net.feature_std.copy_(pre.std(0).clamp_min(1e-6).float())
        acc_test = float((net(xt).argmax(1) == yt).float().mean())
        acc_train = float((net(x).argmax(1) == y).float().mean())
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, out / "model.safetensors")
    config = {
        "architecture": "SoundsFeatureNet",
        "width": width,
        "feature_dim": FEATURE_DIM,
        "num_classes": NUM_CLASSES,
        "features": "pre-activations of the 64-unit layer before the logits, standardised per unit with the train split's mean and std",
        "input": f"normalised log-mel spectrograms (N, 1, {N_MELS}, {FRAMES}) in [-1, 1] (onestep.audio.mel_spectrogram)",
        "training": {"data": "onestep.audio.sounds_dataset('train')", "seed": seed, "epochs": epochs, "batch_size": batch_size,
                     "lr": lr, "augmentation": "time shift by -1..1 frames, gaussian noise std 0.05",
                     "seconds": round(time.perf_counter() - start, 1)},
        "train_accuracy": acc_train,
        "heldout_accuracy": acc_test,
        "sha256": hashlib.sha256((out / "model.safetensors").read_bytes()).hexdigest(),
        "command": "python -m onestep.eval.audio --out onestep/assets/sounds-features",
    }
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return config


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="onestep/assets/sounds-features", help="output folder")
    p.add_argument("--epochs", type=int, default=15)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    cfg = train(Path(a.out), epochs=a.epochs, seed=a.seed)
    print(json.dumps({k: cfg[k] for k in ("train_accuracy", "heldout_accuracy", "sha256")}), f"in {cfg['training']['seconds']} s")


if __name__ == "__main__":
    main()


__all__ = ["SoundsFeatureNet", "audio_scores", "classify_sounds", "load_sounds_feature_net", "mel_fid", "sounds_features"]
