"""onestep's trainers against the peers' scripts on the same model and data (issue 15): steps/s and peak RSS.

    python benchmarks/peers.py --lcm-script PATH/train_lcm_distill_sd_wds.py        # small SD, batch 4, 128 px
    python benchmarks/peers.py --lcm-script PATH --pipeline /tmp/onestep-scale/pipelines/sd15 --steps 6
    python benchmarks/peers.py --check                                              # onestep's side alone, seconds

**Consistency distillation against diffusers' LCM example.** The peer is not part of onestep: get it with
``git clone https://github.com/huggingface/diffusers`` (the script is
``examples/consistency_distillation/train_lcm_distill_sd_wds.py``) and ``pip install webdataset braceexpand``.
Both sides train the same teacher folder on the same captioned images at the same resolution, batch, DDIM
grid (50 points), guidance range (LCM's w in [5, 15], onestep's s = w + 1), guidance embedding (256),
Huber loss (c = 0.001), learning rate (8e-6), float32 (``mixed_precision no``), no gradient checkpointing:
onestep as ``onestep train sd15_lcm --teacher ... --real_images ...``, the peer with its own flags, reading a
webdataset tar of the same images and captions.

What each side does per step, as written: the peer encodes the batch's captions with the text encoder and
its images with the VAE every step and runs the teacher's conditional and unconditional passes one after
the other; onestep encodes every caption and image once before the first step (the prompt and latent
caches, counted in its start-up time) and runs the guided teacher as one batched pass. Both run the online
student forward and backward and the EMA target forward.

**The peer's CPU autocast.** The peer runs its teacher passes inside ``torch.autocast(device)`` without a
dtype: fp16 on a GPU, bfloat16 on a CPU, whatever ``--mixed_precision`` says. onestep's side runs float32
(``mixed_precision no``), so by default the peer runs with its CPU autocast disabled (float32 too), by a
shim around its import: the same arithmetic on both sides. ``--peer-autocast as-is`` runs it untouched
(on a CPU without bf16 units, such as the AMD EPYC of earlier figures, every bf16 operation is emulated:
a bf16 convolution ran 141x slower than float32 there, ``benchmarks/frozen_compute.py``). Nothing else
of the peer is changed.

**How it is measured.** Each side runs in a fresh interpreter (``--child``) under a shim that records the
time of every update of the progress bar whose total is the run's step count (one update per optimizer
step on both sides), and its peak RSS (``VmHWM``; the parent also reads the child's rusage with
``os.wait4``). Seconds per step: the median interval after ``--warmup`` steps. Start-up: from the child's
start to the first step's end. The sides alternate, ``--repeats`` times each.

**DMD2 against the official DMD2 code** (tianweiy/DMD2) is not run: see RESULTS.md ("Peers") for why.

Output: a markdown table (printed and written to ``--out``), ``--json`` with every run.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tarfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(1, str(ROOT / "tests"))  # t2i_fixtures: the offline CLIP vocabulary, captioned images

#: the small SD1.5-shaped pipeline: SD1.5's block layout at a fifth of its widths (~1/25 of its UNet)
SMALL = dict(widths=(64, 128, 256, 256), text_hidden=256, text_layers=4, vae_widths=(16, 32, 64, 64))
#: what both sides share (LCM's published SD1.5 recipe, minus what only a GPU runs well)
SHARED = dict(num_ddim_timesteps=50, huber_c=0.001, lr=8e-6, w_min=5.0, w_max=15.0, embedding_dim=256)


# ------------------------------------------------------------------ inputs


def build_sd(folder: Path, widths=SMALL["widths"], text_hidden=SMALL["text_hidden"], text_layers=SMALL["text_layers"],
             vae_widths=SMALL["vae_widths"], tokens: int = 77, seed: int = 0) -> Path:
    """A random-weight SD1.5-shaped pipeline folder (UNet with SD1.5's block types and 2 layers a block, a
    VAE that downsamples 8x, a CLIP text encoder with ``tokens`` positions, an offline byte-level tokenizer),
    float32, reused when its ``.complete`` marker exists."""
    import torch
    from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from t2i_fixtures import write_clip_vocab
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    if (folder / ".complete").is_file():
        return folder
    tok_dir = folder / "tokenizer"
    vocab = write_clip_vocab(tok_dir)
    tokenizer = CLIPTokenizer.from_pretrained(tok_dir, model_max_length=tokens)
    torch.manual_seed(seed)
    text = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(vocab), hidden_size=text_hidden, intermediate_size=2 * text_hidden, num_hidden_layers=text_layers,
        num_attention_heads=4, max_position_embeddings=tokens, bos_token_id=len(vocab) - 2, eos_token_id=len(vocab) - 1,
        pad_token_id=len(vocab) - 1))
    unet = UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=tuple(widths),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=text_hidden, attention_head_dim=8, norm_num_groups=min(32, widths[0]))
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=tuple(vae_widths), layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * len(vae_widths), up_block_types=("UpDecoderBlock2D",) * len(vae_widths),
        norm_num_groups=min(16, vae_widths[0]), sample_size=128)
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              prediction_type="epsilon", clip_sample=False, steps_offset=1)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(folder, safe_serialization=True)
    (folder / ".complete").write_text("random weights from benchmarks/peers.py\n")
    return folder


def write_data(folder: Path, n: int, side: int) -> tuple[Path, Path, Path]:
    """``n`` captioned random images (``side`` px) as an image folder (``metadata.jsonl``, for onestep), the
    same images and captions as one webdataset tar (``NNNNNN.png`` + ``NNNNNN.txt``, for the peer), and the
    captions as a prompt file."""
    from t2i_fixtures import write_image_folder

    images = folder / f"images-{side}"
    if not (images / "metadata.jsonl").is_file():
        write_image_folder(images, n=n, size=side)
    rows = [json.loads(line) for line in (images / "metadata.jsonl").read_text().splitlines() if line.strip()]
    shard = folder / f"shard-{side}.tar"
    with tarfile.open(shard, "w") as tar:
        for i, row in enumerate(rows):
            tar.add(images / row["file_name"], arcname=f"{i:06d}.png")
            caption = folder / "caption.tmp"
            caption.write_text(row["text"])
            tar.add(caption, arcname=f"{i:06d}.txt")
        caption.unlink()
    prompts = folder / "prompts.txt"
    prompts.write_text("\n".join(r["text"] for r in rows) + "\n")
    return images, shard, prompts


def onestep_argv(teacher: Path, images: Path, prompts: Path, out: Path, resolution: int, batch: int, steps: int) -> list[str]:
    """``onestep train sd15_lcm`` with the shared settings."""
    s = SHARED
    return ["train", "sd15_lcm", "--teacher", str(teacher), "--real_images", str(images), "--prompts", str(prompts),
            "--output-dir", str(out), "--resolution", str(resolution), "--batch_size", str(batch), "--max_steps", str(steps),
            "--num_ddim_timesteps", str(s["num_ddim_timesteps"]), "--loss", "huber", "--huber_c", str(s["huber_c"]),
            "--lr_generator", str(s["lr"]), "--guidance_scale_range", f"[{s['w_min'] + 1}, {s['w_max'] + 1}]",
            "--guidance_embedding_dim", str(s["embedding_dim"]), "--mixed_precision", "no", "--gradient_checkpointing", "false",
            "--checkpoint_every", "0", "--preview_every", "0", "--eval_every", "0", "--overwrite", "true"]


def peer_argv(teacher: Path, shard: Path, out: Path, resolution: int, batch: int, steps: int) -> list[str]:
    """The LCM example's flags for the same run (its data loader needs at least one worker)."""
    s = SHARED
    return ["--pretrained_teacher_model", str(teacher), "--output_dir", str(out), "--train_shards_path_or_url", str(shard),
            "--resolution", str(resolution), "--train_batch_size", str(batch), "--max_train_steps", str(steps),
            "--max_train_samples", "1000000", "--num_ddim_timesteps", str(s["num_ddim_timesteps"]), "--loss_type", "huber",
            "--huber_c", str(s["huber_c"]), "--learning_rate", str(s["lr"]), "--w_min", str(s["w_min"]), "--w_max", str(s["w_max"]),
            "--unet_time_cond_proj_dim", str(s["embedding_dim"]), "--mixed_precision", "no", "--dataloader_num_workers", "1",
            "--validation_steps", "1000000", "--checkpointing_steps", "1000000", "--seed", "0"]


# ------------------------------------------------------------------ the child: one run under the shim


def record_steps(total: int) -> list[float]:
    """Patch tqdm so that every update of a bar whose total is ``total`` appends ``time.perf_counter()`` to the
    returned list (both trainers update their step bar once per optimizer step)."""
    from tqdm import std

    times: list[float] = []
    update = std.tqdm.update

    def timed_update(self, n=1):
        if self.total == total:
            times.extend([time.perf_counter()] * int(n))
        return update(self, n)

    std.tqdm.update = timed_update
    return times


def cpu_autocast_off() -> None:
    """Make every ``torch.autocast("cpu")`` a no-op (float32). The peer has two: its teacher passes' without a
    dtype (bf16 on a CPU) and its target pass's with its weight dtype (float32 under ``mixed_precision no``)."""
    import torch

    class Fp32OnCpu(torch.autocast):
        def __init__(self, device_type, *args, **kwargs):
            if device_type == "cpu":
                kwargs["enabled"] = False
            super().__init__(device_type, *args, **kwargs)

    torch.autocast = Fp32OnCpu


def peak_rss() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def child(side: str, steps: int, argv: list[str], result: Path, script: str | None, autocast: str) -> None:
    start = time.perf_counter()
    times = record_steps(steps)
    try:
        if side == "onestep":
            from onestep.cli import main as onestep_main

            code = onestep_main(argv)
            if code:
                raise SystemExit(code)
        else:
            import runpy

            if autocast == "fp32-on-cpu":
                cpu_autocast_off()
            sys.argv = [script, *argv]
            runpy.run_path(script, run_name="__main__")
    finally:
        result.write_text(json.dumps({"start": start, "steps": [t - start for t in times], "peak_rss": peak_rss()}))


# ------------------------------------------------------------------ parent


def summarise(rec: dict, warmup: int) -> dict:
    """Seconds per step (median interval after ``warmup`` steps) and start-up (start to the first step's end)."""
    t = rec["steps"]
    gaps = [b - a for a, b in zip(t[warmup:], t[warmup + 1:])]
    return {"s_per_step": statistics.median(gaps) if gaps else None, "startup_s": t[0] if t else None,
            "steps_recorded": len(t), "intervals": gaps}


def run_side(side: str, argv: list[str], steps: int, work: Path, script: str | None, autocast: str, threads: int | None) -> dict:
    work.mkdir(parents=True, exist_ok=True)
    result, log = work / "result.json", work / "log.txt"
    env = dict(os.environ)
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", side, "--child-steps", str(steps), "--child-result",
           str(result), "--peer-autocast", autocast, *(["--lcm-script", script] if script else []), "--", *argv]
    t0 = time.perf_counter()
    with open(log, "w") as f:
        p = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env)
        _, status, usage = os.wait4(p.pid, 0)
    wall = time.perf_counter() - t0
    code = os.waitstatus_to_exitcode(status)
    if code != 0 or not result.is_file():
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-20:])
        raise SystemExit(f"{side} failed (exit {code}); the end of {log}:\n{tail}")
    rec = json.loads(result.read_text())
    return {"side": side, "wall_s": wall, "peak_rss_gib": max(rec["peak_rss"], usage.ru_maxrss * 1024) / 1024**3, **rec}


def table(rows: list[dict]) -> str:
    lines = ["| trainer | s / step (median) | steps / s | start-up s | whole run s | peak RSS GiB |", "|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['label']} | {r['s_per_step']:.3f} | {1 / r['s_per_step']:.2f} | {r['startup_s']:.1f} | {r['wall_s']:.1f} | {r['peak_rss_gib']:.2f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--lcm-script", default=None, help="path to diffusers' examples/consistency_distillation/train_lcm_distill_sd_wds.py")
    p.add_argument("--pipeline", default="small", help="'small' (built under --workdir) or an SD1.5-layout pipeline folder")
    p.add_argument("--resolution", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--steps", type=int, default=30, help="optimizer steps per run")
    p.add_argument("--warmup", type=int, default=5, help="steps left out of the median")
    p.add_argument("--repeats", type=int, default=1, help="runs per side, alternating")
    p.add_argument("--threads", type=int, default=None, help="OMP_NUM_THREADS for the children (default: inherited)")
    p.add_argument("--peer-autocast", choices=("fp32-on-cpu", "as-is"), default="fp32-on-cpu",
                   help="fp32-on-cpu: disable the peer's torch.autocast on a CPU (bf16 there); as-is: leave it")
    p.add_argument("--check", action="store_true", help="run onestep's side alone on a tiny pipeline (a smoke test)")
    p.add_argument("--workdir", type=Path, default=Path("/tmp/onestep-peers"))
    p.add_argument("--out", type=Path, default=None, help="write the table here too")
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--child", choices=("onestep", "peer"), default=None, help=argparse.SUPPRESS)
    p.add_argument("--child-steps", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--child-result", type=Path, default=None, help=argparse.SUPPRESS)
    p.add_argument("rest", nargs="*", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        child(args.child, args.child_steps, args.rest, args.child_result, args.lcm_script, args.peer_autocast)
        return 0
    if not args.check and not args.lcm_script:
        p.error("--lcm-script is required (or --check): clone https://github.com/huggingface/diffusers, then pass "
                "examples/consistency_distillation/train_lcm_distill_sd_wds.py")
    if args.lcm_script and not Path(args.lcm_script).is_file():
        p.error(f"--lcm-script {args.lcm_script}: no such file")
    work = args.workdir
    if args.check:
        teacher = build_sd(work / "check-sd", widths=(8, 8, 16, 16), text_hidden=16, text_layers=1, vae_widths=(8, 8, 8, 8))
    elif args.pipeline == "small":
        teacher = build_sd(work / "small-sd")
    else:
        teacher = Path(args.pipeline)
    images, shard, prompts = write_data(work, n=32, side=args.resolution)
    sides = ["onestep"] if args.check else ["onestep", "peer"]
    runs = []
    for r in range(args.repeats):
        for side in sides:
            run_dir = work / "runs" / f"{side}-{r}"
            if side == "onestep":
                argv_side = onestep_argv(teacher, images, prompts, run_dir / "out", args.resolution, args.batch_size, args.steps)
            else:
                argv_side = peer_argv(teacher, shard, run_dir / "out", args.resolution, args.batch_size, args.steps)
            print(f"{side} {r + 1}/{args.repeats}: {args.steps} steps ...", file=sys.stderr, flush=True)
            rec = run_side(side, argv_side, args.steps, run_dir, args.lcm_script, args.peer_autocast, args.threads)
            rec |= summarise(rec, args.warmup)
            rec["label"] = ("onestep consistency (sd15_lcm)" if side == "onestep" else "diffusers LCM example") + f", run {r + 1}"
            runs.append(rec)
    text = table(runs)
    by_side = {s: [r["s_per_step"] for r in runs if r["side"] == s] for s in sides}
    if "peer" in by_side:
        ratio = statistics.median(by_side["peer"]) / statistics.median(by_side["onestep"])
        rss = max(r["peak_rss_gib"] for r in runs if r["side"] == "peer") / max(r["peak_rss_gib"] for r in runs if r["side"] == "onestep")
        text += f"\nonestep's throughput over the peer's: {ratio:.2f}x; the peer's peak RSS over onestep's: {rss:.2f}x\n"
    print(text)
    if args.out:
        args.out.write_text(text)
    if args.json:
        from bench_meta import write_rows

        write_rows(str(args.json), [{k: v for k, v in r.items()} | {"teacher": str(teacher), "batch": args.batch_size,
                                                                      "resolution": args.resolution} for r in runs])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
