"""scikit-learn's bundled 8x8 digits, upsampled to 16x16: the data of the built-in teacher."""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F

RESOLUTION = 16
NUM_CLASSES = 10


@lru_cache(maxsize=1)
def _load() -> tuple[torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.from_numpy(d.images.astype(np.float32) / 16.0).unsqueeze(1)  # (N,1,8,8) in [0,1]
    x = F.interpolate(x, size=(RESOLUTION, RESOLUTION), mode="bilinear", align_corners=False)
    x = (x.clamp(0, 1) * 2 - 1).contiguous()  # [-1, 1]
    y = torch.from_numpy(d.target.astype(np.int64))
    return x, y


def digits_dataset() -> tuple[torch.Tensor, torch.Tensor]:
    """All 1797 digits as ``(images (N,1,16,16) in [-1,1], labels (N,))``."""
    x, y = _load()
    return x.clone(), y.clone()


@lru_cache(maxsize=1)
def _classifier():
    from sklearn.svm import SVC

    x, y = _load()
    clf = SVC(C=10.0, gamma="scale")
    clf.fit(x.flatten(1).numpy(), y.numpy())
    return clf


def classify_digits(images: torch.Tensor) -> torch.Tensor:
    """Predicted class of each 16x16 image in [-1, 1] (an SVC fitted on the whole digits set).

    A quick check that samples show the asked digit; it says nothing about speckle
    or blur, so look at the pictures too.
    """
    feats = images.detach().float().clamp(-1, 1).flatten(1).cpu().numpy()
    return torch.from_numpy(_classifier().predict(feats)).long()
