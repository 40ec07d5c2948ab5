"""The one-step sampler's overhead over the bare generator forward (plus the VAE decode of latent students).

    python benchmarks/sampling_overhead.py --student /tmp/so/digits/student --threads 2
    python benchmarks/sampling_overhead.py --student /tmp/so/digits/student /tmp/so/sd/student --batch 1 64 --json so.json

For each student and batch size, median wall time (interleaved runs, after a warm-up) of:

- sampler: what ``onestep sample`` and the demo call: ``sample_student_from_seeds`` (class /
  unconditional students) or ``sample_text_student`` (text-to-image students, with the decode);
- bare: the generator forward on noise and conditions made beforehand, one call per sampling
  timestep (then the clamp, and the VAE decode for latent students): the floor a sampler can reach.

overhead = sampler / bare - 1, from wall time and from this process's CPU time (``time.process_time``:
less swayed by other processes on a shared machine; run it with ``--threads 1`` for that). ``--profile`` prints the sampler's top functions (cProfile) per row.
"""

from __future__ import annotations

import argparse
import statistics
import time


def _run_sampler(student, seeds, labels, prompts):
    from onestep.samplers.student import sample_student_from_seeds, sample_text_student

    if prompts is not None:
        return sample_text_student(student, prompts, seeds, batch_size=len(seeds))
    return sample_student_from_seeds(student.generator, student, student.timesteps, seeds, labels, batch_size=len(seeds))[0]


def measure(path: str, batch: int, repeats: int, prompt: str, profile: bool) -> dict:
    import torch

    from onestep.export import load_student

    student = load_student(path)
    text = student.conditioning.kind == "text"
    seeds = list(range(batch))
    labels = None if text or student.conditioning.kind == "none" else [i % student.conditioning.num_classes for i in seeds]
    prompts = [prompt] if text else None
    noise = torch.randn(batch, *student.sample_shape, generator=torch.Generator().manual_seed(0))
    cond = student.conditioning.from_labels([prompt] * batch if text else (labels or []))
    steps = [torch.full((batch,), int(t), dtype=torch.long) for t in student.timesteps]

    @torch.no_grad()
    def bare():
        x = noise
        for tt in steps:
            x = student.generator(x, tt, cond)
            if student.clip is not None:
                x = x.clamp(-student.clip, student.clip)
        return student.decode(x).clamp(-1, 1) if student.vae is not None else x

    sampler = lambda: _run_sampler(student, seeds, labels, prompts)  # noqa: E731
    sampler(), bare()  # warm-up (and the prompt's embedding enters the conditioning's memory)
    times = {"sampler": [], "bare": [], "sampler_cpu": [], "bare_cpu": []}
    for _ in range(repeats):
        for name, fn in (("sampler", sampler), ("bare", bare)):
            t0, c0 = time.perf_counter(), time.process_time()
            fn()
            times[name].append(time.perf_counter() - t0)
            times[name + "_cpu"].append(time.process_time() - c0)
    if profile:
        import cProfile
        import pstats

        pr = cProfile.Profile()
        pr.runcall(sampler)
        pstats.Stats(pr).sort_stats("cumulative").print_stats(18)
    med = {k: statistics.median(v) for k, v in times.items()}
    return {"student": path, "kind": "text" if text else student.conditioning.kind, "batch": batch, "steps": len(steps),
            "sampler_ms": 1e3 * med["sampler"], "bare_ms": 1e3 * med["bare"], "overhead": med["sampler"] / med["bare"] - 1,
            "sampler_cpu_ms": 1e3 * med["sampler_cpu"], "bare_cpu_ms": 1e3 * med["bare_cpu"],
            "overhead_cpu": med["sampler_cpu"] / med["bare_cpu"] - 1, "repeats": repeats}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--student", nargs="+", required=True, help="student folders")
    p.add_argument("--batch", type=int, nargs="+", default=[1, 64])
    p.add_argument("--repeats", type=int, default=30, help="timed runs of each (median)")
    p.add_argument("--prompt", default="a red cube", help="the prompt for text-to-image students")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    p.add_argument("--profile", action="store_true", help="cProfile the sampler once per row")
    p.add_argument("--json", default=None, help="also write the rows here")
    a = p.parse_args(argv)

    import torch

    if a.threads:
        torch.set_num_threads(a.threads)
    rows = [measure(s, b, a.repeats, a.prompt, a.profile) for s in a.student for b in a.batch]
    print(f"{'student':<24} {'kind':<5} {'batch':>5} {'steps':>5} {'sampler ms':>10} {'bare ms':>9} {'overhead':>8}"
          f" {'cpu: sampler':>12} {'bare':>8} {'overhead':>8}")
    for r in rows:
        print(f"{r['student'][-24:]:<24} {r['kind']:<5} {r['batch']:>5} {r['steps']:>5} {r['sampler_ms']:>10.2f} "
              f"{r['bare_ms']:>9.2f} {100 * r['overhead']:>7.1f}% {r['sampler_cpu_ms']:>12.2f} {r['bare_cpu_ms']:>8.2f}"
              f" {100 * r['overhead_cpu']:>7.1f}%")
    if a.json:
        from bench_meta import write_rows  # benchmarks/, on sys.path when the script runs

        write_rows(a.json, rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
