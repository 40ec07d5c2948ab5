"""The ``onestep`` command line: ``train``, ``sample``, ``quickstart``, ``demo``, ``eval``.

Errors a user can cause print one line on stderr and exit with code 2.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from pathlib import Path

from .errors import OnestepError

EPILOG_TRAIN = """\
examples:
  onestep train digits_dmd2                         # a shipped preset (configs/digits_dmd2.yaml)
  onestep train my.yaml --output-dir runs/x --max_steps 2000 --fake_score lora
  onestep train digits_dmd2 --resume latest          # continue from the newest checkpoint-* folder
  accelerate launch --multi_gpu --num_processes 2 -m onestep.cli train digits_dmd2

Any config field can be overridden as --key value (values are read as YAML).
`onestep train --list-presets` lists the presets; `onestep train CONFIG --show-config`
prints every field with its help and value.
"""


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="onestep",
        description="Distil diffusion models into one-step (and few-step) generators.",
    )
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    t = sub.add_parser(
        "train",
        help="distil a teacher into a student from a YAML config",
        description="Train a student with the method named in CONFIG (a YAML file or a shipped preset name).",
        epilog=EPILOG_TRAIN,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        add_help=False,  # -h with a CONFIG also lists that method's fields
    )
    t.set_defaults(train_parser=t)
    t.add_argument("-h", "--help", action="store_true", help="show this help (with CONFIG: and every config field) and exit")
    t.add_argument("config", nargs="?", help="YAML config file or preset name (e.g. digits_dmd2)")
    t.add_argument("--output-dir", "--output_dir", dest="output_dir", help="run folder (default runs/<config name>); the student lands in DIR/student")
    t.add_argument("--list-presets", action="store_true", help="list the shipped presets and exit")
    t.add_argument("--show-config", action="store_true", help="print the resolved config with each field's help and exit")
    t.add_argument(
        "--plan", action="store_true",
        help="print the memory the run's networks will hold (weights, gradients, optimizer, EMA, frozen copies; "
        "built on the meta device, nothing loaded) and exit",
    )

    s = sub.add_parser(
        "sample",
        help="sample an exported student",
        description="Sample a student folder: PNG pictures plus samples.npz (array 'samples', raw float32).",
    )
    s.add_argument("--student", required=True, help="student folder (with onestep.json and generator/)")
    s.add_argument("--num-samples", type=int, default=16, help="number of samples (default 16)")
    s.add_argument("--output-dir", "--output_dir", "--out", dest="out", required=True, help="output folder")
    s.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda when there is one)")
    s.add_argument("--steps", type=int, default=None, help="sampling steps (default: the student's own timesteps)")
    s.add_argument("--seed", type=int, default=0, help="seed of the first sample; sample i uses seed+i")
    s.add_argument("--class", dest="label", type=int, default=None, help="class label for class-conditional students (default: cycle 0..C-1)")
    s.add_argument("--batch-size", type=int, default=256)
    s.add_argument("--prompt", action="append", default=None, help="text-to-image students: a prompt (repeat for several; sample i gets prompt i mod n)")
    s.add_argument("--prompts", default=None, help="text-to-image students: a prompt file (text, JSONL or CSV with a caption column)")
    s.add_argument("--negative-prompt", default=None, help="text-to-image students: a negative prompt, applied with NASA (needs --nasa-alpha)")
    s.add_argument("--nasa-alpha", type=float, default=0.0, help="NASA scale for the negative prompt (SNOOPI: 0.1 for SD1.5, 0.2 for SD2.1)")
    s.add_argument("--gamma", type=float, default=None, help="CTM students: gamma of gamma-sampling, 0 (deterministic jumps) to 1 (jump to the end, re-noise); default: the student's")
    s.add_argument("--nu", type=float, default=None, help="CTM students: nu-sampling, g(null) + nu (g(c) - g(null)); 1 is the conditional student; default: the student's")
    s.add_argument("--image", default=None, help="super-resolution students: a folder of low-res images (or one file); sample i upscales image i mod n")

    q = sub.add_parser(
        "quickstart",
        help="distil the bundled digits teacher with DMD2, sample it and report",
        description="Distil the bundled digits teacher into a one-step student with DMD2 on this machine, then write "
        "a labelled comparison grid (samples.png) and timings (report.json) into the output folder.",
    )
    q.add_argument("--output-dir", "--output_dir", dest="output_dir", default="runs/quickstart", help="run folder (default runs/quickstart)")
    q.add_argument("--max-steps", "--max_steps", dest="max_steps", type=int, default=None, help="override the preset's training iterations")
    q.add_argument("--timing-samples", "--timing_samples", dest="timing_samples", type=int, default=100, help="images used to time student and teacher sampling")
    q.add_argument("--fid-samples", "--fid_samples", dest="fid_samples", type=int, default=300, help="images a side for digits-FID and class accuracy (default 300; the grid and timing images count)")

    d = sub.add_parser(
        "demo",
        help="serve a Gradio page that samples a student (and its teacher side by side)",
        description="Load a student folder once and serve a Gradio page: pick a class (or a prompt), a seed, steps "
        "and a number of images; see the images and the latency per image. With --teacher, the teacher's DDIM "
        "samples for the same seeds appear beside the student's. Needs: pip install 'onestep[demo]'.",
    )
    d.add_argument("--student", required=True, help="student folder (with onestep.json and generator/)")
    d.add_argument("--teacher", default=None, help="teacher to compare with: a built-in name (digits) or a diffusers folder")
    d.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    d.add_argument("--port", type=int, default=7860, help="port (default 7860)")
    d.add_argument("--share", action="store_true", help="also ask Gradio for a public share link (needs internet)")

    from onestep.eval.cli import add_parser as add_eval_parser

    add_eval_parser(sub)
    return p


def _cmd_train(args, extra: list[str]) -> int:
    from .config import field_help, list_presets, parse_overrides
    from .trainers import load_config, make_trainer, method_classes

    if args.list_presets:
        print("\n".join(list_presets()))
        return 0
    if args.help:
        args.train_parser.print_help()
        if args.config:
            config = load_config(args.config, parse_overrides(extra), output_dir=args.output_dir)
            print(f"\nconfig fields of {config.method} (set in the YAML or as --key value; current values from {args.config}):")
            _print_fields(config, method_classes(config.method)[0], field_help)
        return 0
    if not args.config:
        raise OnestepError("train needs a CONFIG (a YAML file or a preset; see --list-presets)")
    config = load_config(args.config, parse_overrides(extra), output_dir=args.output_dir)
    if args.show_config:
        _print_fields(config, method_classes(config.method)[0], field_help)
        return 0
    if args.plan:
        from .trainers.plan import format_plan, memory_plan

        print(format_plan(*memory_plan(config)))
        return 0
    trainer = make_trainer(config)
    if config.eval_every:  # eval's scoring functions, handed over: trainers do not import onestep.eval
        from onestep.eval import clip_score, digits_fid

        trainer.scorers = {"digits_fid": digits_fid, "clip_score": clip_score}
    student = trainer.train()
    code = 0
    if trainer.interrupted:
        import signal

        print(
            f"onestep train: stopped by {trainer.interrupted} at step {trainer.state.step}; checkpoint written to "
            f"{trainer.latest_checkpoint()}; the same command with --resume latest continues",
            file=sys.stderr,
        )
        code = 128 + int(getattr(signal, trainer.interrupted))
    elif student is not None:
        print(f"student written to {student}")
    _leave_process_group(code)
    return code


def _leave_process_group(code: int) -> None:
    """Under a multi-process launch, once the run has ended (every process has passed its last barrier
    and written everything): close the process group and leave with ``code`` at once. Interpreter
    teardown after a finished run has aborted a rank now and then ("terminate called without an
    active exception", about 1 launch in 4 under load, even with the group closed first) while
    torch's C++ threads were destroyed, and the launcher then reported the run as failed."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def _print_fields(config, cls, field_help) -> None:
    for name, _default, help_text in field_help(cls):
        print(f"{name} = {getattr(config, name)!r}\n    {help_text}")


def _cmd_sample(args, extra: list[str]) -> int:
    if extra:
        raise OnestepError(f"unknown arguments: {' '.join(extra)}")
    from .samplers.commands import sample_to_folder

    if args.num_samples < 1:
        raise OnestepError("--num-samples must be at least 1")
    prompts = list(args.prompt or [])
    if args.prompts:
        from onestep.teachers.text import read_prompts

        prompts += read_prompts(args.prompts)
    out = sample_to_folder(
        args.student, args.out, args.num_samples, steps=args.steps, seed=args.seed, label=args.label, batch_size=args.batch_size,
        prompts=prompts or None, negative_prompt=args.negative_prompt, nasa_alpha=args.nasa_alpha, device=args.device,
        gamma=args.gamma, nu=args.nu, images=args.image,
    )
    print(f"wrote {args.num_samples} samples to {out}")
    return 0


def _cmd_quickstart(args, extra: list[str]) -> int:
    if extra:
        raise OnestepError(f"unknown arguments: {' '.join(extra)}")
    from .quickstart import run_quickstart

    run_quickstart(Path(args.output_dir), max_steps=args.max_steps, timing_samples=args.timing_samples, fid_samples=args.fid_samples)
    return 0


def _cmd_demo(args, extra: list[str]) -> int:
    if extra:
        raise OnestepError(f"unknown arguments: {' '.join(extra)}")
    from onestep.demo.app import launch_demo

    launch_demo(args.student, args.teacher, host=args.host, port=args.port, share=args.share)
    return 0


def _cmd_eval(args, extra: list[str]) -> int:
    from onestep.eval.cli import run

    return run(args)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = _parser()
    args, extra = parser.parse_known_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    if args.command != "train" and extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    warnings.filterwarnings("ignore", category=FutureWarning)
    commands = {"train": _cmd_train, "sample": _cmd_sample, "quickstart": _cmd_quickstart, "demo": _cmd_demo, "eval": _cmd_eval}
    try:
        return commands[args.command](args, extra)
    except OnestepError as e:
        message = " ".join(line.strip() for line in str(e).splitlines() if line.strip())  # one line, whatever it quotes
        print(f"onestep {args.command}: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

