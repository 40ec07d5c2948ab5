"""Train the digits feature extractor reproducibly (fixed seed, CPU, about a minute).

A :class:`~onestep.eval.digits_net.DigitsFeatureNet` classifies scikit-learn's digits
(16x16, as :mod:`onestep.digits` makes them). The first 1500 images (in a fixed random order)
train it, the other 297 measure its held-out accuracy, which is written into ``config.json``
next to the weights. Training inputs go through the same uint8 quantisation as evaluation,
shifted by up to one pixel and with a little noise, so that the features of generated digits
(which are never pixel-perfect) stay in the range the network has seen. At the end the
features are standardised with their per-unit mean and std over all 1797 real digits.

    python -m onestep.eval.train_digits_features --out onestep/assets/digits-features
"""

from __future__ import annotations

import argparse
import hashlib
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F

NUM_TRAIN = 1500


def _augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Shift each image by -1..1 pixels (padding with the background) and add noise of std 0.05."""
    n = x.shape[0]
    padded = F.pad(x, (1, 1, 1, 1), value=-1.0)
    dx = torch.randint(0, 3, (n,), generator=gen)
    dy = torch.randint(0, 3, (n,), generator=gen)
    out = torch.stack([padded[i, :, dy[i] : dy[i] + 16, dx[i] : dx[i] + 16] for i in range(n)])
    return (out + 0.05 * torch.randn(out.shape, generator=gen)).clamp(-1, 1)


def train(out: Path, epochs: int = 40, batch_size: int = 64, lr: float = 2e-3, seed: int = 0) -> dict:
    from safetensors.torch import save_file

    from onestep.digits import digits_dataset

    from .digits_net import FEATURE_DIM, PREPROCESSING, DigitsFeatureNet, network_input, quantize_digits

    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    x, y = digits_dataset()
    order = torch.randperm(len(x), generator=gen)
    tr, te = order[:NUM_TRAIN], order[NUM_TRAIN:]
    net = DigitsFeatureNet()
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-4)
    steps = epochs * ((NUM_TRAIN + batch_size - 1) // batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps)
    start = time.perf_counter()
    for epoch in range(epochs):
        net.train()
        perm = tr[torch.randperm(len(tr), generator=gen)]
        for i in range(0, len(perm), batch_size):
            idx = perm[i : i + batch_size]
            xb = network_input(quantize_digits(_augment(x[idx], gen)))
            loss = F.cross_entropy(net(xb), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    net.eval()
    with torch.no_grad():
        # Standardise the features with the real digits' per-unit statistics (all 1797 images).
        pre = net.pre_activations(network_input(quantize_digits(x))).double()
        net.feature_mean.copy_(pre.mean(0).float())
        net.feature_std.copy_(pre.std(0).clamp_min(1e-6).float())
        acc_test = float((net(network_input(quantize_digits(x[te]))).argmax(1) == y[te]).float().mean())
        acc_train = float((net(network_input(quantize_digits(x[tr]))).argmax(1) == y[tr]).float().mean())
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.contiguous() for k, v in net.state_dict().items()}
    save_file(state, out / "model.safetensors")
    sha = hashlib.sha256((out / "model.safetensors").read_bytes()).hexdigest()
    config = {
        "architecture": "DigitsFeatureNet",
        "width": 32,
        "feature_dim": FEATURE_DIM,
        "num_classes": 10,
        "features": "pre-activations of the 64-unit layer before the logits, standardised per unit with the real digits' mean and std",
        "preprocessing": PREPROCESSING,
        "training": {
            "data": "sklearn load_digits upsampled to 16x16 (onestep.digits)",
            "seed": seed,
            "train_images": NUM_TRAIN,
            "heldout_images": len(te),
            "epochs": epochs,
            "batch_size": batch_size,
            "lr": lr,
            "augmentation": "shift by -1..1 px, gaussian noise std 0.05, uint8 quantisation",
            "seconds": round(time.perf_counter() - start, 1),
        },
        "train_accuracy": acc_train,
        "heldout_accuracy": acc_test,
        "sha256": sha,
        "command": "python -m onestep.eval.train_digits_features --out onestep/assets/digits-features",
    }
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return config


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="onestep/assets/digits-features", help="output folder")
    p.add_argument("--epochs", type=int, default=40)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    cfg = train(Path(a.out), epochs=a.epochs, batch_size=a.batch_size, lr=a.lr, seed=a.seed)
    print(json.dumps({k: cfg[k] for k in ("train_accuracy", "heldout_accuracy", "sha256")}), f"in {cfg['training']['seconds']} s")


if __name__ == "__main__":
    main()
