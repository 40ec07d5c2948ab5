"""digits-FID figures and evaluation speed on CPU.

    OMP_NUM_THREADS=1 python benchmarks/eval_digits.py --num-samples 300 --teacher-steps 10 25 50 \
        --student runs/quickstart/student --json eval_digits.json

Prints (and writes as JSON):

- the floor: real digits against themselves, split at random in halves (898 vs 899), and
  ``N`` real digits against all 1797 (a lower bound: they are part of the reference);
- the digits teacher at each ``--teacher-steps`` (guided DDIM, its default CFG) and each
  ``--student`` (its own steps), ``N`` samples each, seeds ``0..N-1``, classes ``i % 10``,
  against all 1797 real digits; with class accuracy (digits SVC);
- seconds per 1000 images for evaluation: features through torch-fidelity's extractor loop plus
  FID, and KID (100 subsets of min(1000, N) images) on top.
"""

from __future__ import annotations

import argparse
import json
import time

import torch


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--num-samples", type=int, default=300)
    p.add_argument("--teacher-steps", type=int, nargs="*", default=[10, 25, 50])
    p.add_argument("--student", nargs="*", default=[])
    p.add_argument("--timing-images", type=int, default=1000)
    p.add_argument("--json", default=None)
    a = p.parse_args(argv)

    from onestep.digits import classify_digits, digits_dataset
    from onestep.eval import digits_fid
    from onestep.eval.metrics import compute_fid_kid
    from onestep.eval.generate import sample_student_images
    from onestep.export import load_student
    from onestep.samplers.student import teacher_sample_from_seeds
    from onestep.teachers import load_teacher

    n = a.num_samples
    real = digits_dataset()[0]
    perm = torch.randperm(len(real), generator=torch.Generator().manual_seed(0))
    half = len(real) // 2
    rows = [
        {"what": f"real digits, halves ({half} vs {len(real) - half})", "fid": digits_fid(real[perm[:half]], real[perm[half:]]), "samples": half},
        {"what": f"real digits, {n} vs all {len(real)}", "fid": digits_fid(real[perm[:n]]), "samples": n},
    ]
    labels = [i % 10 for i in range(n)]
    y = torch.tensor(labels)
    teacher = load_teacher("digits")
    for steps in a.teacher_steps:
        t0 = time.perf_counter()
        x = teacher_sample_from_seeds(teacher.denoiser(), teacher, range(n), labels, steps, teacher.guidance_scale, batch_size=100)
        rows.append({"what": f"teacher, {steps} DDIM steps, CFG {teacher.guidance_scale:g}", "fid": digits_fid(x), "samples": n,
                     "class_acc": float((classify_digits(x) == y).float().mean()), "sample_s": time.perf_counter() - t0})
    for path in a.student:
        s = load_student(path)
        t0 = time.perf_counter()
        x, lab, ts = sample_student_images(s, n, batch_size=100)
        rows.append({"what": f"student {path} ({len(ts)} step)", "fid": digits_fid(x), "samples": n,
                     "class_acc": float((classify_digits(x) == torch.tensor(lab)).float().mean()), "sample_s": time.perf_counter() - t0})

    # Evaluation speed: timing images (real digits repeated) against the cached real-digits reference.
    m = a.timing_images
    imgs = real[torch.arange(m) % len(real)]
    compute_fid_kid(imgs[:10], kid=False)  # warm: the reference statistics cached, torch-fidelity imported
    t0 = time.perf_counter()
    compute_fid_kid(imgs, kid=False)
    fid_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    compute_fid_kid(imgs, kid=True)
    kid_s = time.perf_counter() - t0
    speed = {"images": m, "fid_seconds_per_1000": fid_s * 1000 / m, "fid_kid_seconds_per_1000": kid_s * 1000 / m, "threads": torch.get_num_threads()}

    for r in rows:
        extra = f"  class acc {r['class_acc']:.1%}" if "class_acc" in r else ""
        print(f"{r['what']:<48} digits-FID {r['fid']:8.3f}  ({r['samples']} samples){extra}")
    print(f"evaluation, {m} images, digits extractor via torch-fidelity: FID {speed['fid_seconds_per_1000']:.2f} s / 1000 images; "
          f"FID + KID {speed['fid_kid_seconds_per_1000']:.2f} s / 1000 images ({speed['threads']} threads)")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"rows": rows, "speed": speed, "num_samples": n}, f, indent=2)


if __name__ == "__main__":
    main()
