"""The ``onestep eval`` command group (``fid``, ``clip``, ``clap``, ``run``, ``t2i``, ``sr``): arguments here, work in
:mod:`onestep.eval.commands` (imported only when a command runs, so ``onestep --help`` stays fast)."""

from __future__ import annotations

import argparse

EPILOG = """\
examples:
  onestep eval fid --student runs/quickstart/student --num-samples 1000          # digits-FID/KID vs the real digits
  onestep eval fid --images samples/ --ref my_real_images/ --extractor inception --inception-weights ~/inception.pth
  onestep eval fid --student S --extractor inception --ref-stats ref.npz --inception-weights W   # ref.npz: mu, sigma
  onestep eval clip --student my_t2i_student --prompts prompts.txt --clip-model ~/clip-vit-b-32
  onestep eval clap --student my_audioldm_student --prompts prompts.txt --clap-model ~/clap-htsat-unfused   # sounds vs prompts
  onestep eval run --run runs/quickstart --report                                # every checkpoint, a curve
  onestep eval t2i --student S --captions annotations/captions_val2014.json --images val2014/ --clip ~/clip-vit-l-14 \\
      --num-samples 30000 --inception-weights ~/weights-inception-2015-12-05-6726825d.pth   # COCO FID-30K, CLIP, P/R

Each command writes metrics.json (and with --report, report.md and its PNGs) into --out.
"""

T2I_PROTOCOL = """\
the COCO protocol (GigaGAN's COCO evaluation, which DMD2 and other one-step papers follow):
  1. captions: a COCO captions file (captions_val2014.json, captions_train2014.json or the 2017
     ones: {"images": [{"id", "file_name"}], "annotations": [{"image_id", "caption"}]}) and the
     folder holding its images. Every image it names must be there.
  2. subset: --num-samples images (30000, 10000, 5000 ...) drawn at random without replacement
     among the images that have a caption, and one of each image's captions, both with --seed;
     the list is written to subset.jsonl (image_id, file_name, caption).
  3. generated: one image per caption from the student (a diffusers pipeline folder), image i
     with seed --seed + i, --steps and --guidance-scale (default: the student's steps, no CFG).
  4. both sides: the shorter side resized to --resolution (PIL bicubic), then a centre crop to
     resolution x resolution. 256 is the default (GigaGAN's evaluation resolution for FID-30K);
     512 is the other common choice. Compare only numbers computed at one resolution.
  5. FID and KID with torch-fidelity's Inception-v3 (2048 pool features; it resizes to 299 itself),
     weights from a local file (--inception-weights, or the torch hub cache; no download).
     The reference is the subset's own real images; their features are cached (--cache-dir).
  6. precision and recall (k-NN manifolds, k=3, as torch-fidelity's prc) on the same features.
  7. CLIP score (100 * max(cos, 0), averaged) of each generated image at its own size against its
     caption, with a local CLIPModel folder (--clip); skipped without one.
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
    p.add_argument("--no-prc", action="store_true", help="skip precision/recall (k-NN manifolds, k=3, as torch-fidelity's prc)")
    p.add_argument("--cache-dir", help="where reference statistics are cached (default $ONESTEP_CACHE/fid-stats or ~/.cache/onestep/fid-stats)")


def _t2i_parser(es) -> None:
    t = es.add_parser(
        "t2i",
        help="a text-to-image student on COCO captions: FID-30K/10K/5K, KID, precision/recall, CLIP score",
        description="Evaluate a text-to-image student on COCO captions, as the papers report it.",
        epilog=T2I_PROTOCOL,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    t.add_argument("--student", required=True, help="text-to-image student: a diffusers pipeline folder (model_index.json)")
    t.add_argument("--captions", required=True, help="COCO captions JSON (captions_val2014.json, captions_train2014.json, or the 2017 ones)")
    t.add_argument("--images", required=True, help="the folder of that split's images (val2014/, train2014/, val2017/ ...)")
    t.add_argument("--clip", "--clip-model", dest="clip_model", help="local transformers CLIPModel folder for the CLIP score (skipped without one)")
    t.add_argument("--num-samples", type=int, default=30000, help="captions (and images) in the subset: 30000 (FID-30K, default), 10000, 5000 ...")
    t.add_argument("--resolution", type=int, default=256, help="both sides resized (shorter side) and centre-cropped to this square size (default 256; 512 also common)")
    t.add_argument("--steps", type=int, default=None, help="sampling steps (default: the student's own)")
    t.add_argument("--guidance-scale", type=float, default=1.0, help="guidance passed to the pipeline (default 1: none)")
    t.add_argument("--extractor", default="inception", help="'inception' (default; torch-fidelity's Inception-v3, local weights) or another registered extractor")
    t.add_argument("--inception-weights", help="local Inception-v3 weights (torch-fidelity's weights-inception-2015-12-05-6726825d.pth or a .safetensors); default: the torch hub cache")
    t.add_argument("--batch-size", type=int, default=32, help="images per pipeline call and per feature batch (default 32)")
    t.add_argument("--no-kid", action="store_true", help="no KID")
    t.add_argument("--kid-subset-size", type=int, default=1000, help="KID subset size (capped at the number of images)")
    t.add_argument("--no-prc", action="store_true", help="skip precision/recall")
    t.add_argument("--save-images", help="also write the generated images (PNG, at the student's size, named by subset index) here")
    t.add_argument("--cache-dir", help="where the subset's reference features are cached (default $ONESTEP_CACHE/fid-stats or ~/.cache/onestep/fid-stats)")
    _common(t)


def add_parser(sub) -> argparse.ArgumentParser:
    """Add ``eval`` with its five subcommands to the top-level subparsers ``sub``."""
    e = sub.add_parser(
        "eval",
        help="score students: FID/KID/precision/recall (torch-fidelity), CLIP score, whole training runs, COCO text-to-image, super-resolution",
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

    a = es.add_parser("clap", help="CLAP score of a text-to-audio student over a prompt file")
    a.add_argument("--prompts", required=True, help="text (one prompt a line), .jsonl or .csv with a caption column")
    a.add_argument("--caption-column", help="CSV column / JSONL field of the prompt (default: caption, prompt or text)")
    a.add_argument("--clap-model", required=True, help="local transformers ClapModel folder (safetensors, its feature extractor "
                   "and tokenizer), e.g. laion/clap-htsat-unfused saved with save_pretrained")
    a.add_argument("--student", help="text-to-audio student: a diffusers AudioLDMPipeline folder (model_index.json)")
    a.add_argument("--audio", help="folder of mono 16-bit WAV files, file i (by name) for prompt i")
    a.add_argument("--num-samples", type=int, default=None, help="score only the first N prompts")
    a.add_argument("--steps", type=int, default=None, help="sampling steps (default: the student's own)")
    a.add_argument("--guidance-scale", type=float, default=1.0, help="guidance passed to the pipeline (default 1: none)")
    a.add_argument("--batch-size", type=int, default=16)
    _common(a)

    r = es.add_parser("run", help="evaluate every checkpoint of a training run and write the curve")
    r.add_argument("--run", required=True, help="run folder (checkpoint-*/ and student/)")
    r.add_argument("--num-samples", type=int, default=500, help="samples per checkpoint (default 500)")
    _fid_like(r)
    _common(r)
    sr = es.add_parser("sr", help="PSNR, perceptual error and sharpness of a super-resolution student against the ground truth")
    sr.add_argument("--student", required=True, help="super-resolution student folder (digits-sr's or an SD x4 upscaler's)")
    sr.add_argument("--images", help="folder of high-res ground-truth images, degraded as in training (default for digits-sr "
                    "students: the 297 held-out digits)")
    sr.add_argument("--num-samples", type=int, default=None, help="score only the first N images (default: all)")
    sr.add_argument("--steps", type=int, default=None, help="sampling steps (default: the student's own)")
    sr.add_argument("--batch-size", type=int, default=64)
    _common(sr)
    _t2i_parser(es)
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
    if args.eval_command == "t2i":
        from .t2i import t2i_command

        rec = t2i_command(
            student=args.student, captions=args.captions, images=args.images, clip_model=args.clip_model, num_samples=args.num_samples,
            resolution=args.resolution, seed=args.seed, steps=args.steps, guidance_scale=args.guidance_scale, extractor=args.extractor,
            inception_weights=args.inception_weights, batch_size=args.batch_size, kid=not args.no_kid, kid_subset_size=args.kid_subset_size,
            prc=not args.no_prc, save_images=args.save_images, out=args.out, report=args.report, device=args.device,
            cache_dir=args.cache_dir, progress=progress,
        )
    elif args.eval_command == "sr":
        from .sr import sr_command

        rec = sr_command(student=args.student, images=args.images, num_samples=args.num_samples, steps=args.steps, seed=args.seed,
                         batch_size=args.batch_size, out=args.out, report=args.report, device=args.device, progress=progress)
    elif args.eval_command == "clap":
        from .clap import clap_command

        rec = clap_command(
            prompts=args.prompts, clap_model=args.clap_model, student=args.student, audio=args.audio,
            caption_column=args.caption_column, num_samples=args.num_samples, steps=args.steps, seed=args.seed,
            guidance_scale=args.guidance_scale, batch_size=args.batch_size, out=args.out, report=args.report,
            device=args.device, progress=progress,
        )
    elif args.eval_command == "clip":
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
            out=args.out, report=args.report, device=args.device, cache_dir=args.cache_dir, progress=progress, prc=not args.no_prc,
        )
        if args.eval_command == "fid":
            rec = commands.fid_command(student=args.student, images=args.images, steps=args.steps, **common)
        else:
            rec = commands.run_command(run=args.run, **common)
    print(f"wrote {rec['out']}/metrics.json" + (" and report.md" if args.report else ""))
    return 0
