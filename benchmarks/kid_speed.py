"""KID from features: torch-fidelity's ``kid_features_to_metric`` against onestep's ``kid_from_features``.

    python benchmarks/kid_speed.py --threads 2
    python benchmarks/kid_speed.py --n 1000 5000 --dims 2048 64 --threads 2 --json kid_speed.json

Random float64 features (this project's extractors return float64), the generated side shifted a
little from the reference side, both sides ``N`` rows; KID with the project's defaults (100 subsets
of ``min(1000, N)`` rows, seed 0). For each (N, D): FID from the same features (for scale), the
torch-fidelity time, onestep's time in float64 (the default) and float32, and each one's relative
difference from torch-fidelity's KID mean. ``--no-baseline`` skips torch-fidelity (slow).
"""

from __future__ import annotations

import argparse
import time


def _best(fn, repeats: int):
    out, best = None, float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return out, best


def measure(n: int, d: int, subsets: int, size: int, repeats: int, baseline: bool) -> dict:
    import numpy as np
    import torch
    from torch_fidelity.metric_fid import fid_statistics_to_metric
    from torch_fidelity.metric_kid import KEY_METRIC_KID_MEAN, kid_features_to_metric

    from onestep.eval.frechet import feature_statistics
    from onestep.eval.metrics import kid_from_features

    rng = np.random.default_rng(0)
    ref = np.maximum(rng.normal(size=(n, d)), 0)
    gen = np.maximum(rng.normal(0.05, 1.0, size=(n, d)), 0)
    size = min(size, n)

    def fid():
        (m1, s1), (m2, s2) = feature_statistics(gen), feature_statistics(ref)
        return fid_statistics_to_metric({"mu": m1, "sigma": s1}, {"mu": m2, "sigma": s2}, verbose=False)

    row = {"n": n, "dim": d, "subsets": subsets, "subset_size": size}
    _, row["fid_s"] = _best(fid, repeats)
    if baseline:
        k, row["torch_fidelity_s"] = _best(
            lambda: kid_features_to_metric(torch.from_numpy(gen), torch.from_numpy(ref), kid_subsets=subsets,
                                           kid_subset_size=size, rng_seed=0, verbose=False), repeats)
        row["kid_torch_fidelity"] = k[KEY_METRIC_KID_MEAN]
    for name, dtype in (("f64", torch.float64), ("f32", torch.float32)):
        (mean, _), row[f"onestep_{name}_s"] = _best(lambda: kid_from_features(gen, ref, subsets, size, 0, dtype), repeats)
        row[f"kid_onestep_{name}"] = mean
        if baseline:
            row[f"rel_diff_{name}"] = abs(mean - row["kid_torch_fidelity"]) / abs(row["kid_torch_fidelity"])
    return row


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, nargs="+", default=[1000, 5000], help="rows a side")
    p.add_argument("--dims", type=int, nargs="+", default=[2048, 64], help="feature widths (Inception 2048, digits 64)")
    p.add_argument("--subsets", type=int, default=100)
    p.add_argument("--subset-size", type=int, default=1000)
    p.add_argument("--repeats", type=int, default=1, help="best of this many runs")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (numpy follows OMP_NUM_THREADS)")
    p.add_argument("--no-baseline", action="store_true", help="skip torch-fidelity's own KID")
    p.add_argument("--json", default=None, help="also write the rows here")
    a = p.parse_args(argv)

    import torch

    if a.threads:
        torch.set_num_threads(a.threads)
    rows = [measure(n, d, a.subsets, a.subset_size, a.repeats, not a.no_baseline) for n in a.n for d in a.dims]
    head = f"{'N':>6} {'D':>5} {'FID s':>7} {'tf KID s':>9} {'f64 s':>7} {'f32 s':>7} {'speedup':>8} {'rel f64':>9} {'rel f32':>9}"
    print(head)
    for r in rows:
        tf = r.get("torch_fidelity_s")
        print(f"{r['n']:>6} {r['dim']:>5} {r['fid_s']:>7.3f} {tf if tf is not None else float('nan'):>9.3f} "
              f"{r['onestep_f64_s']:>7.3f} {r['onestep_f32_s']:>7.3f} "
              f"{(tf / r['onestep_f64_s']) if tf else float('nan'):>7.1f}x "
              f"{r.get('rel_diff_f64', float('nan')):>9.1e} {r.get('rel_diff_f32', float('nan')):>9.1e}")
    if a.json:
        from bench_meta import write_rows  # benchmarks/, on sys.path when the script runs

        write_rows(a.json, rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
