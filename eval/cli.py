"""The ``onestep eval`` command group (``fid``, ``clip``, ``run``): arguments here, work in
:mod:`onestep.eval.commands` (imported only when a command runs, so ``onestep --help`` stays fast)."""

from __future__ import annotations

import argparse

EPILOG = """\
examples:
  onestep eval fid --student runs/quickstart/student --num-samples 1000          # digits-FID/KID vs the real digits
  onestep eval fid --images samples/ --ref my_real_images/ --extractor inception --inception-weights ~/inception.pth
  onestep eval fid --student S --extractor inception --ref-stats ref.npz --inception-weights W   # ref.npz: mu, sigma
  onestep eval clip --student my_t2i_student --prompts prompts.txt --clip-model ~/clip-vit-b-32
  onestep eval run --run runs/quickstart --report                                # every checkpoint, a curve

Each command writes metrics.json (and with --report, report.md and its PNGs) into --out.
"""


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--output-dir", "--output_dir", "--out", dest="out", help="output folder for metrics.json and the report (default: next to the evaluated folder)")
    p.add_argument("--report", action="store_true", help="also write report.md with plots (matplotlib PNG)")
    p.add_argument("--seed", type=int, default=0, help="seed of the first sample; sample i uses seed+i")
    p.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda when there is one)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def _fid_like(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ref", default=None, help="reference: 'digits' (the bundled real digits) or a folder of images (default: digits, unless --ref-stats names an existing file)")
    p.add_argument("--ref-stats", help="a .npz with mu and sigma (and features, for KID): read if it exists, else computed from --ref and written there")
    p.add_argument("--extractor", default="digits", help="'digits' (CPU-scale, 16x16 digits), 'inception' (torch-fidelity's Inception-v3) or a name registered with onestep.eval.extractors.register_extractor")
    p.add_argument("--inception-weights", help="local Inception-v3 weights (torch-fidelity's weights-inception-2015-12-05-6726825d.pth or a .safetensors); default: the torch hub cache")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--no-kid", action="store_true", help="FID only")
    p.add_argument("--kid-subset-size", type=int, default=1000, help="KID subset size (capped at the number of images)")
    p.add_argument("--cache-dir", help="where reference statistics are cached (default $ONESTEP_CACHE/fid-stats or ~/.cache/onestep/fid-stats)")


def add_parser(sub) -> argparse.ArgumentParser:
    """Add ``eval`` with its three subcommands to the top-level subparsers ``sub``."""
    e = sub.add_parser(
        "eval",
        help="score students: FID/KID (torch-fidelity), CLIP score, whole training runs",
        description="Evaluate students. Every command writes metrics.json and prints a short table.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    es = e.add_subparsers(dest="eval_command", metavar="EVAL_COMMAND")

    f = es.add_parser("fid", help="FID and KID of a student or an image folder against a reference")
    f.add_argument("--student", help="student folder (sampled on the fly)")
    f.add_argument("--images", help="folder of images (or an `onestep sample` output folder)")
    f.add_argument("--num-samples", type=int, default=1000, help="samples drawn from --student (default 1000)")
    f.add_argument("--steps", type=int, default=None, help="sampling steps (default: the student's own)")
    _fid_like(f)
    _common(f)

    c = es.add_parser("clip", help="CLIP score of a text-to-image student over a prompt file")
    c.add_argument("--prompts", required=True, help="text (one prompt a line), .jsonl or .csv with a caption column")
    c.add_argument("--caption-column", help="CSV column / JSONL field of the prompt (default: caption, prompt or text)")
    c.add_argument("--clip-model", required=True, help="local transformers CLIPModel folder (safetensors)")
    c.add_argument("--student", help="text-to-image student: a diffusers pipeline folder (model_index.json)")
    c.add_argument("--images", help="folder of images, file i (by name) for prompt i")
    c.add_argument("--num-samples", type=int, default=None, help="score only the first N prompts")
    c.add_argument("--steps", type=int, default=None, help="sampling steps (default: the student's own)")
    c.add_argument("--guidance-scale", type=float, default=1.0, help="guidance passed to the pipeline (default 1: none)")
    c.add_argument("--batch-size", type=int, default=32)
    _common(c)

    r = es.add_parser("run", help="evaluate every checkpoint of a training run and write the curve")
    r.add_argument("--run", required=True, help="run folder (checkpoint-*/ and student/)")
    r.add_argument("--num-samples", type=int, default=500, help="samples per checkpoint (default 500)")
    _fid_like(r)
    _common(r)
    e.set_defaults(eval_parser=e)
    return e


def run(args) -> int:
    """Run the parsed ``onestep eval ...`` command."""
    from onestep.errors import OnestepError

    from . import commands

    if args.eval_command is None:
        args.eval_parser.print_help()
        return 2
    progress = not args.no_progress
    if args.batch_size < 1:
        raise OnestepError("--batch-size must be at least 1")
    if args.eval_command == "clip":
        rec = commands.clip_command(
            prompts=args.prompts, clip_model=args.clip_model, student=args.student, images=args.images,
            caption_column=args.caption_column, num_samples=args.num_samples, steps=args.steps, seed=args.seed,
            guidance_scale=args.guidance_scale, batch_size=args.batch_size, out=args.out, report=args.report,
            device=args.device, progress=progress,
        )
    else:
        if args.num_samples < 2:
            raise OnestepError("--num-samples must be at least 2 (FID needs a covariance)")
        common = dict(
            ref=args.ref if args.ref is not None or args.ref_stats else "digits", ref_stats=args.ref_stats,
            extractor=args.extractor, inception_weights=args.inception_weights, num_samples=args.num_samples,
            seed=args.seed, batch_size=args.batch_size, kid=not args.no_kid, kid_subset_size=args.kid_subset_size,
            out=args.out, report=args.report, device=args.device, cache_dir=args.cache_dir, progress=progress,
        )
        if args.eval_command == "fid":
            rec = commands.fid_command(student=args.student, images=args.images, steps=args.steps, **common)
        else:
            rec = commands.run_command(run=args.run, **common)
    print(f"wrote {rec['out']}/metrics.json" + (" and report.md" if args.report else ""))
    return 0
