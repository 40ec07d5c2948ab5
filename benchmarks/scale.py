"""The real-scale CPU rehearsal (issue 12): the published SD1.5, SDXL and SD3-medium architectures with
RANDOM weights, tiny latents (16x16), batch 1, through the real training loop to the exported student.

    python benchmarks/scale.py                              # every row (hours on 2 CPU cores, ~60 GB of disk)
    python benchmarks/scale.py --rows sd15-dmd2 --max-steps 2
    python benchmarks/scale.py --arch tiny                  # the tests' tiny pipelines: the script itself, in seconds
    python benchmarks/scale.py --rows sd15-lcm --json scale.json --out table.md

Rows (``--rows``, comma separated; each a preset of configs/ with the rehearsal's overrides, given to
``load_config`` exactly as ``onestep train PRESET --key value`` gives them):

    sd15-dmd2        sd15_dmd2, fake score LoRA, bf16 frozen weights, gradient checkpointing, GAN head (real images)
    sdxl-dmd2-lora   sdxl_dmd2_lora (LoRA generator, LoRA fake score), bf16 frozen, gradient checkpointing
    sd3-dmd2-lora    sd3_dmd2_lora, bf16 frozen; 4 training prompts and 1 validation prompt (T5-XXL encodes
                     256 tokens a prompt: about 2.4 TFLOP, a minute or more a prompt on 2 CPU cores)
    sd15-vsd         sd15_vsd_pgsb, bf16 frozen
    sd15-lcm         sd15_lcm, bf16 frozen (consistency distillation noises real images)

Every row: resolution such that latents are 16x16, batch 1, ``--max-steps`` iterations (default 2),
checkpoints / previews / periodic eval off, export on, and the CPU settings ``--cpu-overrides``
(default ``mixed_precision no``, ``frozen_compute auto``): the presets ask for bf16 mixed precision,
which on a CPU without bf16 units (this one: AVX2) emulates every bf16 operation (a bf16 3x3
convolution ran 141x slower than float32, ``benchmarks/frozen_compute.py``); frozen weights stay in
bf16 storage and compute in float32.

Weights: each architecture's pipeline folder is written once under ``--workdir`` (default
/tmp/onestep-scale): the config-only folder of ``benchmarks/memory_plan.py`` filled with random weights,
one component at a time, built directly in bfloat16 (no float32 copy of T5-XXL's 4.7B parameters is
ever held) and saved as safetensors, with offline tokenizers (tests/t2i_fixtures.py's byte-level CLIP
vocabulary, its unigram T5 tokenizer). A ``.complete`` marker makes a rerun reuse the folder.
Disk: SD1.5 ~2 GB, SDXL ~7 GB, SD3-medium ~15 GB (T5 9.5 GB), plus each run's exported student.

Each row trains in a FRESH child interpreter (``--child-train ROW``), so its peak RSS is its own: the
parent reads the child's rusage with ``os.wait4`` (ru_maxrss). The child times loading (building the
trainer: weights, prompt encoding, real-image latents) and every iteration (``train_step``) apart,
measures the bytes the trained weights, AdamW moments and frozen weights hold and asks
``memory_plan(config)`` for the same figures. A second fresh child (``--child-load``) loads the
exported student with plain diffusers (``DiffusionPipeline.from_pretrained``, float32 as exported; bf16
for SD3, whose T5-XXL is 19 GB in float32) and samples one step. A failing row is recorded with the tail of its stderr; the next row runs.

Output: a markdown table (printed, and written to ``--out``) and ``--json`` (rows plus
``bench_meta.run_meta()``, the date and the command). Columns: plan / measured is the memory plan's
bytes over the bytes the run held (1.00 = exact), for the trained weights (generator + fake score)
and their AdamW moments.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(1, str(ROOT / "tests"))  # t2i_fixtures: tiny pipelines, offline tokenizers, captioned images

GIB = 1024**3
LATENT = 16  # latent side of every row
DEFAULT_WORKDIR = Path("/tmp/onestep-scale")

#: row -> (architecture, preset, overrides as on the command line, needs real images)
ROWS: dict[str, tuple[str, str, list[str], bool]] = {
    "sd15-dmd2": ("sd15", "sd15_dmd2", ["--fake_score", "lora", "--frozen_dtype", "bf16", "--gradient_checkpointing", "true",
                                        "--gan_weight_generator", "1e-3", "--gan_weight_discriminator", "1e-2"], True),
    "sdxl-dmd2-lora": ("sdxl", "sdxl_dmd2_lora", ["--frozen_dtype", "bf16", "--gradient_checkpointing", "true"], False),
    "sd3-dmd2-lora": ("sd3-medium", "sd3_dmd2_lora", ["--frozen_dtype", "bf16", "--gradient_checkpointing", "true"], False),
    "sd15-vsd": ("sd15", "sd15_vsd_pgsb", ["--frozen_dtype", "bf16"], False),
    "sd15-lcm": ("sd15", "sd15_lcm", ["--frozen_dtype", "bf16"], True),
}
#: rows that train on fewer prompts than ``--num-prompts``, with one validation prompt: SD3's T5-XXL
#: encodes 256 tokens a prompt, about 2.4 TFLOP each, minutes a prompt on 2 CPU cores
FEW_PROMPTS = {"sd3-dmd2-lora": 4}
#: what every row adds on this CPU (see the module docstring; ``--cpu-overrides`` replaces it)
CPU_OVERRIDES = "--mixed_precision no --frozen_compute auto"
TINY = {"sd15": "make_tiny_sd", "sdxl": "make_tiny_sdxl", "sd3-medium": "make_tiny_sd3"}
CLIP_TOKENS = 77


# ------------------------------------------------------------------ inputs: weights, prompts, images


def write_prompts(path: Path, n: int = 48) -> Path:
    """``n`` generated prompts, one a line."""
    subjects = ["a red cube", "an old lighthouse", "two green cats", "a yellow house", "a bowl of ramen", "a mountain lake",
                "a steam train", "a paper boat"]
    styles = ["at sunset", "in the snow", "oil painting", "studio photo", "watercolor", "isometric render"]
    lines = [f"{subjects[i % len(subjects)]}, {styles[(i // len(subjects)) % len(styles)]}" for i in range(n)]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    return path


def write_tokenizers(folder: Path, arch: str, index: dict) -> None:
    """Offline tokenizers beside the encoders: the byte-level CLIP vocabulary (77 tokens) and, for SD3,
    the unigram T5 tokenizer of tests/t2i_fixtures.py. Both fit inside the real vocabularies."""
    import tempfile

    from t2i_fixtures import tiny_t5_tokenizer, write_clip_vocab
    from transformers import CLIPTokenizer

    with tempfile.TemporaryDirectory() as tmp:
        write_clip_vocab(Path(tmp))
        clip = CLIPTokenizer.from_pretrained(tmp, model_max_length=CLIP_TOKENS)
    names = ["tokenizer"] + (["tokenizer_2"] if arch in ("sdxl", "sd3-medium") else [])
    for name in names:
        clip.save_pretrained(folder / name)
        index[name] = ["transformers", "CLIPTokenizer"]
    if arch == "sd3-medium":
        tiny_t5_tokenizer().save_pretrained(folder / "tokenizer_3")
        index["tokenizer_3"] = ["transformers", "T5TokenizerFast"]
    return len(clip)


def build_weights(folder: Path, arch: str) -> Path:
    """A full random-weight pipeline folder of ``arch`` (reused when its ``.complete`` marker exists)."""
    import torch

    if (folder / ".complete").is_file():
        return folder
    from memory_plan import write_architecture

    partial = folder.with_name(folder.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    write_architecture(partial, arch)
    index = json.loads((partial / "model_index.json").read_text())
    if arch == "sd15":
        index |= {"safety_checker": [None, None], "feature_extractor": [None, None], "requires_safety_checker": False}
    vocab = write_tokenizers(partial, arch, index)
    components = [(k, v) for k, v in index.items() if isinstance(v, list) and v[0] in ("diffusers", "transformers")
                  and (partial / k / "config.json").is_file()]
    previous = torch.get_default_dtype()
    for seed, (name, (library, class_name)) in enumerate(components):
        t0 = time.perf_counter()
        torch.manual_seed(seed)
        torch.set_default_dtype(torch.bfloat16)  # initialised in bf16: no float32 copy is ever held
        try:
            if library == "diffusers":
                import diffusers

                cls = getattr(diffusers, class_name)
                model = cls.from_config(cls.load_config(partial / name))
            else:
                import transformers

                config = transformers.AutoConfig.from_pretrained(partial / name)
                if class_name.startswith("CLIP"):  # the offline tokenizer's start / end ids (pooled output at the end token)
                    config.bos_token_id, config.eos_token_id, config.pad_token_id = vocab - 2, vocab - 1, vocab - 1
                model = getattr(transformers, class_name)(config)
        finally:
            torch.set_default_dtype(previous)
        n = sum(p.numel() for p in model.parameters())
        model.save_pretrained(partial / name, safe_serialization=True)
        del model
        gc.collect()
        print(f"  {arch}/{name}: {class_name}, {n / 1e6:.0f}M params, {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
    (partial / "model_index.json").write_text(json.dumps(index, indent=2))
    shutil.rmtree(folder, ignore_errors=True)
    partial.rename(folder)
    (folder / ".complete").write_text("random bf16 weights from benchmarks/scale.py\n")
    return folder


def build_tiny(folder: Path, arch: str) -> Path:
    """The tests' tiny pipeline of ``arch`` (tests/t2i_fixtures.py), reused when complete."""
    import t2i_fixtures

    if not (folder / ".complete").is_file():
        shutil.rmtree(folder, ignore_errors=True)
        kwargs = {"t5": True} if arch == "sd3-medium" else {}
        getattr(t2i_fixtures, TINY[arch])(folder, **kwargs)
        (folder / ".complete").write_text("tests/t2i_fixtures.py\n")
    return folder


def vae_factor(folder: Path) -> int:
    vae = json.loads((folder / "vae" / "config.json").read_text())
    return 2 ** (len(vae["block_out_channels"]) - 1)


def real_images(workdir: Path, side: int) -> Path:
    """A small folder of random captioned images (``metadata.jsonl``: file_name, text), ``side`` px."""
    from t2i_fixtures import write_image_folder

    folder = workdir / f"images-{side}"
    if not (folder / "metadata.jsonl").is_file():
        write_image_folder(folder, n=8, size=side)
    return folder


# ------------------------------------------------------------------ children


def _bytes(params) -> int:
    return sum(p.numel() * p.element_size() for p in params)


def _unique(params) -> list:
    seen, out = set(), []
    for p in params:
        if id(p) not in seen:
            seen.add(id(p))
            out.append(p)
    return out


def _moments(opt, params) -> int:
    if opt is None:
        return 0
    ids = {id(p) for p in params}
    return sum(sum(v.numel() * v.element_size() for k, v in s.items() if k != "step" and hasattr(v, "numel"))
               for p, s in opt.state.items() if id(p) in ids)


def _plan_bytes(rows, role: str, what: str) -> int:
    return sum(r.bytes for r in rows if r.role.startswith(role) and r.what.startswith(what))


def child_train(row: str, teacher: Path, prompts: Path, out_dir: Path, resolution: int, max_steps: int, images: str | None,
                cpu_overrides: str = CPU_OVERRIDES, validation_prompts: Path | None = None, preview: bool = False) -> dict:
    """Build the config as the CLI does, train, measure; the result as a dict (one JSON line on stdout). ``preview``:
    one preview grid (2 samples) after the last iteration, its seconds and the peak RSS after it recorded apart."""
    import torch

    from onestep.config import parse_overrides
    from onestep.trainers import load_config, make_trainer
    from onestep.trainers.plan import memory_plan, resident_bytes

    _, preset, extra, _ = ROWS[row]
    argv = [*extra, *cpu_overrides.split(), "--teacher", str(teacher), "--prompts", str(prompts), "--resolution", str(resolution),
            "--batch_size", "1", "--max_steps", str(max_steps), "--checkpoint_every", "0",
            "--preview_every", str(max_steps) if preview else "0", "--preview_num", "2",
            "--eval_every", "0", "--log_with", "none", "--export", "true", "--overwrite", "true"]
    if images:
        argv += ["--real_images", images]
    if validation_prompts:
        argv += ["--validation_prompts", str(validation_prompts)]
    config = load_config(preset, parse_overrides(argv), output_dir=str(out_dir))
    plan, assumptions = memory_plan(config)

    t0 = time.perf_counter()
    tr = make_trainer(config)
    load_s = time.perf_counter() - t0
    step_s: list[float] = []
    step = tr.train_step

    hwm: list[int] = []

    def timed_step():
        t = time.perf_counter()
        logs = step()
        step_s.append(time.perf_counter() - t)
        hwm.append(_peak_rss())  # the peak so far: after the last step, the peak of loading and training
        return logs

    tr.train_step = timed_step  # the loop calls self.train_step(): each iteration timed, loading and export not
    previews: list[tuple[float, int]] = []
    save_preview = tr.save_preview

    def timed_preview(step):
        t = time.perf_counter()
        path = save_preview(step)
        previews.append((time.perf_counter() - t, _peak_rss()))  # the peak so far, the preview's included
        return path

    tr.save_preview = timed_preview
    t1 = time.perf_counter()
    student = tr.train()
    train_s = time.perf_counter() - t1

    g = [p for p in tr.generator.parameters() if p.requires_grad]
    f = tr.triad.trainable_fake_parameters()
    frozen = _unique([p for p in tr.teacher.backbone.parameters() if not p.requires_grad]
                     + [p for p in tr.generator.backbone.parameters() if not p.requires_grad]
                     + (list(tr.teacher_spec.vae.parameters()) if tr.teacher_spec.vae is not None else []))
    measured = {"generator_weights": _bytes(g), "generator_adamw": _moments(tr.opt_g, g),
                "fake_weights": _bytes(f), "fake_adamw": _moments(tr.opt_f, f), "frozen": _bytes(frozen)}
    planned = {"generator_weights": _plan_bytes(plan, "generator", "weights"), "generator_adamw": _plan_bytes(plan, "generator", "AdamW"),
               "fake_weights": _plan_bytes(plan, "fake score", "weights"), "fake_adamw": _plan_bytes(plan, "fake score", "AdamW"),
               "frozen": sum(r.bytes for r in plan if "frozen" in r.what), "resident": resident_bytes(plan)}
    networks = {"backbone": type(tr.teacher.backbone).__name__,
                "backbone_params": sum(p.numel() for p in tr.triad.teacher_parameters().values()),
                "fake_score": config.fake_score, "generator_lora_rank": config.generator_lora_rank}
    return {"row": row, "preset": preset, "overrides": argv, "resolution": resolution,
            "latent": resolution // vae_factor(teacher), "load_s": load_s, "step_s": step_s,
            "s_per_iteration": sum(step_s) / len(step_s) if step_s else None,
            "train_loop_s": getattr(tr, "train_seconds", None), "after_loop_s": train_s - sum(step_s),
            "steps_run": getattr(tr, "steps_run", len(step_s)), "measured": measured, "plan": planned,
            "train_peak_rss_gib": hwm[-1] / GIB if hwm else None,
            "preview_s": previews[-1][0] if previews else None, "preview_peak_rss_gib": previews[-1][1] / GIB if previews else None,
            "frozen_dtype": assumptions["frozen_dtype"], "networks": networks,
            "student": str(student) if student else None, "torch_threads": torch.get_num_threads()}


def _peak_rss() -> int:
    """This process's peak RSS so far in bytes (``VmHWM``)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def child_load(folder: Path, resolution: int) -> dict:
    """Load the student with plain diffusers (no onestep import) and sample one step at ``resolution``: in
    float32 as exported, or bf16 for a folder with T5-XXL; the pipeline to latents, then the VAE decode in
    float32 (on a CPU without bf16 units a bf16 convolution decoder takes minutes at 128 px: the SD1.5
    row's bf16 decode ran over 3 minutes)."""
    import numpy as np
    import torch
    from diffusers import DiffusionPipeline

    t0 = time.perf_counter()
    # float32 as exported; a folder with T5-XXL (SD3) in bf16 whole (19 GB of T5 in float32 would not fit
    # beside the transformer, and pipelines need one dtype for the embeddings and the backbone)
    dtype = torch.bfloat16 if (folder / "text_encoder_3").is_dir() else torch.float32
    pipe = DiffusionPipeline.from_pretrained(folder, torch_dtype=dtype)
    load_s = time.perf_counter() - t0
    t1 = time.perf_counter()
    # SD3: 16 T5 tokens, not 256 (T5-XXL in bf16 on a CPU without bf16 units takes minutes a prompt)
    extra = {"max_sequence_length": 16} if (folder / "text_encoder_3").is_dir() else {}
    latents = pipe("a red cube, studio photo", num_inference_steps=1, height=resolution, width=resolution, guidance_scale=1.0,
                   output_type="latent", generator=torch.Generator().manual_seed(0), **extra).images
    sample_s = time.perf_counter() - t1
    t2 = time.perf_counter()
    vae = pipe.vae.to(torch.float32)
    z = latents.float() / vae.config.scaling_factor + (getattr(vae.config, "shift_factor", None) or 0.0)
    with torch.no_grad():
        image = vae.decode(z).sample.permute(0, 2, 3, 1).numpy()
    return {"pipeline": type(pipe).__name__, "load_s": load_s, "sample_s": sample_s, "decode_s": time.perf_counter() - t2,
            "latent_shape": list(latents.shape), "image_shape": list(image.shape), "finite": bool(np.isfinite(image).all()),
            "onestep_imported": "onestep" in sys.modules}


# ------------------------------------------------------------------ parent


def run_child(argv: list[str], log: Path) -> tuple[int, int, dict | None, str]:
    """Run ``scale.py argv`` in a fresh interpreter; (exit code, peak RSS in bytes, its JSON line, stderr tail)."""
    log.parent.mkdir(parents=True, exist_ok=True)
    out_file = log.with_suffix(".out")
    with open(out_file, "w") as out, open(log, "w") as err:
        p = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), *argv], stdout=out, stderr=err)
        _, status, usage = os.wait4(p.pid, 0)  # the child's own rusage: ru_maxrss in KiB on Linux
        p.returncode = os.waitstatus_to_exitcode(status)
    result = None
    for line in reversed(out_file.read_text().splitlines()):
        if line.startswith("{"):
            result = json.loads(line)
            break
    tail = "\n".join(log.read_text(errors="replace").splitlines()[-15:])
    return p.returncode, usage.ru_maxrss * 1024, result, tail


def _params(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.0f}M" if n >= 1e6 else f"{n / 1e3:.0f}k"


def _ratio(plan: int, measured: int) -> float | None:
    return plan / measured if measured else None


def _fmt(x, spec: str = ".2f") -> str:
    return "-" if x is None else format(x, spec)


def table(rows: list[dict]) -> str:
    head = ("| row | networks | load s | s/iteration | peak RSS GiB: training / with checkpoint + export | plan/measured trained weights "
            "| plan/measured AdamW | frozen weights GiB (plan / measured) | student loads in diffusers |\n|---|---|---:|---:|---:|---:|---:|---:|---|")
    lines = [head]
    for r in rows:
        if r.get("error"):
            lines.append(f"| {r['row']} | {r.get('networks_text', '-')} | - | - | {_fmt(r.get('peak_rss_gib'))} | - | - | - | "
                         f"failed: {r['error']} |")
            continue
        load = r.get("load") or {}
        loads = ("yes" if load.get("finite") else "loads, sample not finite") if load.get("ok") else f"no ({load.get('error', '?')})"
        lines.append(
            f"| {r['row']} | {r['networks_text']} | {_fmt(r['load_s'], '.1f')} | {_fmt(r['s_per_iteration'], '.2f')} "
            f"| {_fmt(r.get('train_peak_rss_gib'))} / {_fmt(r['peak_rss_gib'])} | {_fmt(r['ratio_trained'], '.3f')} | {_fmt(r['ratio_adamw'], '.3f')} "
            f"| {r['plan']['frozen'] / GIB:.2f} / {r['measured']['frozen'] / GIB:.2f} | {loads} |")
    return "\n".join(lines) + "\n"


def run_row(row: str, args, workdir: Path, prompts: Path) -> dict:
    arch = ROWS[row][0]
    rec: dict = {"row": row, "arch": arch if args.arch == "published" else f"tiny-{arch}", "networks_text": arch}
    logs = workdir / "logs"
    folder = workdir / "pipelines" / (arch if args.arch == "published" else f"tiny-{arch}")
    t0 = time.perf_counter()
    code, rss, _, tail = run_child(["--child-build", arch, "--folder", str(folder), "--arch", args.arch], logs / f"build-{arch}.log")
    if code != 0:
        return rec | {"error": f"building the {arch} weights failed (exit {code})", "stderr_tail": tail}
    rec["build_s"] = time.perf_counter() - t0
    resolution = LATENT * vae_factor(folder)
    if row in FEW_PROMPTS:
        prompts = write_prompts(workdir / f"prompts-{FEW_PROMPTS[row]}.txt", FEW_PROMPTS[row])
    train_argv = ["--child-train", row, "--folder", str(folder), "--prompts", str(prompts), "--resolution", str(resolution),
                  "--max-steps", str(args.max_steps), "--run-dir", str(workdir / "runs" / row), "--cpu-overrides", args.cpu_overrides]
    if args.preview:
        train_argv.append("--preview")
    if ROWS[row][3]:
        train_argv += ["--images", str(real_images(workdir, resolution))]
    if row in FEW_PROMPTS:
        train_argv += ["--validation-prompts", str(write_prompts(workdir / "validation-1.txt", 1))]
    code, rss, res, tail = run_child(train_argv, logs / f"train-{row}.log")
    rec["peak_rss_gib"] = rss / GIB
    if code != 0 or res is None:
        return rec | {"error": f"training failed (exit {code}; log {logs / f'train-{row}.log'})", "stderr_tail": tail}
    rec |= res
    m, p = res["measured"], res["plan"]
    rec["ratio_trained"] = _ratio(p["generator_weights"] + p["fake_weights"], m["generator_weights"] + m["fake_weights"])
    rec["ratio_adamw"] = _ratio(p["generator_adamw"] + p["fake_adamw"], m["generator_adamw"] + m["fake_adamw"])
    n = res["networks"]
    gen = f"LoRA r{n['generator_lora_rank']}" if n["generator_lora_rank"] else "full"
    rec["networks_text"] = f"{n['backbone']} {_params(n['backbone_params'])}; generator {gen}; fake score {n['fake_score']}"
    if res["student"]:
        code, lrss, lres, ltail = run_child(["--child-load", res["student"], "--resolution", str(resolution)], logs / f"load-{row}.log")
        rec["load"] = ({"ok": True, **lres} if code == 0 and lres else {"ok": False, "error": f"exit {code}", "stderr_tail": ltail})
        rec["load"]["peak_rss_gib"] = lrss / GIB
    else:
        rec["load"] = {"ok": False, "error": "no student exported"}
    run_dir = workdir / "runs" / row
    if run_dir.is_dir():  # the final checkpoint and the student: SD1.5's are 17 + 3.6 GB, SDXL's more
        rec["run_folder_gib"] = sum(f.stat().st_size for f in run_dir.rglob("*") if f.is_file()) / GIB
        if not args.keep_runs:
            shutil.rmtree(run_dir, ignore_errors=True)
    return rec


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated rows (default all): {', '.join(ROWS)}")
    p.add_argument("--arch", choices=("published", "tiny"), default="published",
                   help="published: the real SD1.5 / SDXL / SD3-medium architectures (random weights); tiny: the tests' tiny pipelines")
    p.add_argument("--max-steps", type=int, default=2, help="training iterations per row (default 2)")
    p.add_argument("--workdir", type=Path, default=DEFAULT_WORKDIR,
                   help="weights, runs, prompts, images and child logs (default /tmp/onestep-scale; tiny: <workdir>/tiny)")
    p.add_argument("--out", type=Path, default=HERE / "scale-out" / "table.md", help="the markdown table (default benchmarks/scale-out/table.md)")
    p.add_argument("--json", type=Path, help="write the rows (and run_meta, date, command) here")
    p.add_argument("--preview", action="store_true", help="one preview grid (2 samples) after the last iteration; its seconds and "
                   "the peak RSS after it go into --json as preview_s, preview_peak_rss_gib")
    p.add_argument("--keep-runs", action="store_true", help="keep each row's run folder (checkpoint and student); default: removed once measured")
    p.add_argument("--cpu-overrides", default=CPU_OVERRIDES,
                   help=f"config overrides every row gets (default {CPU_OVERRIDES!r}; '' for the presets' own settings)")
    # the children (fresh interpreters started by the parent)
    p.add_argument("--child-build", metavar="ARCH", help=argparse.SUPPRESS)
    p.add_argument("--child-train", metavar="ROW", help=argparse.SUPPRESS)
    p.add_argument("--child-load", metavar="FOLDER", help=argparse.SUPPRESS)
    p.add_argument("--folder", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--prompts", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--images", help=argparse.SUPPRESS)
    p.add_argument("--resolution", type=int, help=argparse.SUPPRESS)
    p.add_argument("--run-dir", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--validation-prompts", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.child_build:
        (build_weights if args.arch == "published" else build_tiny)(args.folder, args.child_build)
        return 0
    if args.child_train:
        res = child_train(args.child_train, args.folder, args.prompts, args.run_dir, args.resolution, args.max_steps, args.images,
                          args.cpu_overrides, args.validation_prompts, args.preview)
        print(json.dumps(res), flush=True)
        return 0
    if args.child_load:
        print(json.dumps(child_load(Path(args.child_load), args.resolution)), flush=True)
        return 0

    rows = [r.strip() for r in args.rows.split(",") if r.strip()]
    unknown = [r for r in rows if r not in ROWS]
    if unknown:
        p.error(f"unknown rows {', '.join(unknown)}; choose from {', '.join(ROWS)}")
    workdir = args.workdir / "tiny" if args.arch == "tiny" else args.workdir
    workdir.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("ONESTEP_CACHE", str(workdir / "cache"))  # the children's latent / prompt caches
    prompts = write_prompts(workdir / "prompts.txt")
    results = []
    for i, row in enumerate(rows, 1):
        print(f"[{i}/{len(rows)}] {row}: training (logs under {workdir / 'logs'})", file=sys.stderr, flush=True)
        t0 = time.perf_counter()
        rec = run_row(row, args, workdir, prompts)
        rec["row_wall_s"] = time.perf_counter() - t0
        if rec.get("error"):
            print(f"[{i}/{len(rows)}] {row}: FAILED: {rec['error']}\n{rec.get('stderr_tail', '')}", file=sys.stderr, flush=True)
        else:
            print(f"[{i}/{len(rows)}] {row}: {rec['s_per_iteration']:.2f} s/iteration, peak RSS {rec['peak_rss_gib']:.2f} GiB, "
                  f"student loads: {rec['load'].get('ok')} ({rec['row_wall_s']:.0f} s)", file=sys.stderr, flush=True)
        results.append(rec)
    text = table(results)
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(f"`{' '.join([Path(sys.argv[0]).name, *sys.argv[1:]])}`\n\n" + text)
    if args.json:
        from bench_meta import run_meta

        meta = run_meta() | {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                             "command": " ".join(sys.argv), "omp_num_threads": os.environ.get("OMP_NUM_THREADS")}
        args.json.write_text(json.dumps({"meta": meta, "rows": results}, indent=1) + "\n")
    return 0 if not any(r.get("error") for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
