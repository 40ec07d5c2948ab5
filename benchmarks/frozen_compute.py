"""What frozen bf16 weights should compute in on this machine: one UNet forward (and the backward to its
input, as the fake score's pass in a generator update needs) in four ways.

    python benchmarks/frozen_compute.py                       # SD1.5's UNet, 16x16 latents, batch 1
    python benchmarks/frozen_compute.py --unet tiny --json out.json

- ``float32``: float32 weights, float32 compute (the reference);
- ``bf16 storage, float32 compute``: ``frozen_compute: float32`` (:mod:`onestep.trainers.memory`):
  Linear / Conv2d weights held in bf16, upcast one layer at a time;
- ``bf16 storage and compute``: ``frozen_compute: storage``: weights and inputs in bf16;
- ``float32 weights, bf16 autocast``: what ``mixed_precision: bf16`` does to a float32 network.

Reports seconds per forward and per forward + backward, the bytes the weights hold and the largest
difference from the float32 output. The UNet is built from the published config with random weights
(speed does not depend on them). CPUs without AVX512-BF16 / AMX have no native bf16 kernels; there
the last two rows are the slow ones, and ``frozen_compute: auto`` picks float32 compute.
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

MODES = ("float32", "bf16 storage, float32 compute", "bf16 storage and compute", "float32 weights, bf16 autocast")


def build(kind: str) -> torch.nn.Module:
    from diffusers import UNet2DConditionModel

    from sd_speed import SD15_UNET, TINY_UNET

    torch.manual_seed(0)
    return UNet2DConditionModel(**(SD15_UNET if kind == "sd15" else TINY_UNET)).eval().requires_grad_(False)


def run(net, x, t, cond, backward: bool, autocast: bool) -> tuple[float, torch.Tensor]:
    xi = x.clone().requires_grad_(backward)
    start = time.perf_counter()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast), torch.set_grad_enabled(backward):
        out = net(xi, t, encoder_hidden_states=cond).sample.float()
    if backward:
        out.square().mean().backward()
    return time.perf_counter() - start, out.detach()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--unet", choices=("sd15", "tiny"), default="sd15", help="the architecture (tiny: a smoke test)")
    ap.add_argument("--latent", type=int, default=16, help="latent side (16: 128 px images)")
    ap.add_argument("--repeats", type=int, default=2, help="timed runs per mode after one warm-up (the slowest modes run once)")
    ap.add_argument("--slow-after", type=float, default=30.0, help="a mode whose warm-up took longer than this many seconds is timed once")
    ap.add_argument("--json", help="also write the figures here")
    args = ap.parse_args()

    from bench_meta import write_rows

    from onestep.trainers.memory import cast_frozen_backbone, storage_bytes

    base = build(args.unet)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, base.config.in_channels, args.latent, args.latent, generator=g)
    cond = torch.randn(1, 77, base.config.cross_attention_dim, generator=g)
    t = torch.tensor([500])
    rows, reference = [], None
    for mode in MODES:
        net = copy.deepcopy(base)
        if mode == "bf16 storage, float32 compute":
            cast_frozen_backbone(net, torch.bfloat16, compute="float32")
        elif mode == "bf16 storage and compute":
            cast_frozen_backbone(net, torch.bfloat16, compute="storage")
        autocast = mode.endswith("autocast")
        figures = {"mode": mode, "weights_GiB": round(storage_bytes(net.parameters()) / 1024**3, 3)}
        for backward in (False, True):
            warm, out = run(net, x, t, cond, backward, autocast)
            times = [warm] if warm > args.slow_after else [run(net, x, t, cond, backward, autocast)[0] for _ in range(args.repeats)]
            figures["forward_backward_s" if backward else "forward_s"] = round(min(times), 3)
            if not backward:
                reference = out if reference is None else reference
                figures["max_abs_diff"] = float((out - reference).abs().max())
        rows.append(figures)
        print(f"{mode:34s} forward {figures['forward_s']:8.3f} s   forward+backward {figures['forward_backward_s']:8.3f} s   "
              f"weights {figures['weights_GiB']:.2f} GiB   max |diff| {figures['max_abs_diff']:.3g}", flush=True)
        del net
    fp32 = rows[0]
    print("\n| mode | weights (GiB) | forward (s) | x float32 | forward + backward (s) | x float32 | max abs diff |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['mode']} | {r['weights_GiB']:.2f} | {r['forward_s']:.3f} | {r['forward_s'] / fp32['forward_s']:.2f} | "
              f"{r['forward_backward_s']:.3f} | {r['forward_backward_s'] / fp32['forward_backward_s']:.2f} | {r['max_abs_diff']:.3g} |")
    if args.json:
        write_rows(args.json, rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
