"""Memory and speed of a text-to-image teacher's prompt set: the on-disk prompt cache against the
in-RAM table it replaced.

    python benchmarks/prompt_cache.py --num-prompts 20000 --tokens 77 --hidden 128

Writes a text file of N prompts (``--repeat-every k``: every k-th prompt repeats an earlier one),
builds a tiny SD pipeline from config (the tests' tiny UNet and VAE, a CLIP text encoder of
``--tokens`` x ``--hidden``: SD1.5 is 77 x 768) and runs each path in a fresh interpreter, so that
each peak RSS (``resource.getrusage``) is its own:

- ``baseline``: the pipeline's text encoder loaded and the fixed prompts (empty, validation)
  encoded; the floor every path stands on;
- ``ram``: the former path (onestep before 2026-11-30, reproduced here): the whole deduplicated
  set encoded into float32 tensors held in memory, indexed per training prompt;
- ``disk``: :class:`onestep.teachers.text.TextConditioning` with ``cache_embeddings`` (encode into
  the sharded safetensors cache under a fresh ``ONESTEP_CACHE``, then read batches from it);
- ``reload``: the same again with the cache complete (no text encoder is loaded).

Each reports the prepare time (encode throughput in unique prompts per second), the peak RSS after
preparing and after drawing ``--batches`` batches of ``--batch-size``, the anonymous (private) RSS at
the end (the shards' pages read through the memory map count in RSS but are the page cache's, not
the process's), and the milliseconds per batch drawn.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent


def build_pipeline(out: Path, tokens: int, hidden: int) -> Path:
    """A tiny SD-style pipeline folder whose text encoder gives ``tokens`` x ``hidden`` embeddings."""
    sys.path.insert(0, str(ROOT / "tests"))
    from diffusers import DDIMScheduler, StableDiffusionPipeline
    from t2i_fixtures import SD_SCHEDULER, tiny_unet, tiny_vae, write_clip_vocab
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    torch.manual_seed(0)
    write_clip_vocab(out / "vocab")
    tok = CLIPTokenizer.from_pretrained(out / "vocab", model_max_length=tokens)
    vocab = len(tok)
    config = CLIPTextConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2, num_attention_heads=2,
        max_position_embeddings=tokens, bos_token_id=vocab - 2, eos_token_id=vocab - 1, pad_token_id=vocab - 1,
    )
    pipe = StableDiffusionPipeline(
        vae=tiny_vae(), text_encoder=CLIPTextModel(config), tokenizer=tok, unet=tiny_unet(hidden),
        scheduler=DDIMScheduler(**SD_SCHEDULER), safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.save_pretrained(out / "pipeline", safe_serialization=True)
    return out / "pipeline"


def write_prompts(path: Path, n: int, repeat_every: int) -> int:
    """``n`` prompts, one a line; every ``repeat_every``-th repeats an earlier one. Returns the unique count."""
    subjects = ["cat", "lighthouse", "bowl of ramen", "astronaut", "cabin", "fisherman", "city skyline", "sports car"]
    styles = ["a photo", "an oil painting", "a watercolor", "a pencil sketch", "a 3d render"]
    lines = []
    for i in range(n):
        j = i // 2 if repeat_every and i and i % repeat_every == 0 else i
        lines.append(f"{styles[j % len(styles)]} of a {subjects[j % len(subjects)]}, variation {j}")
    path.write_text("\n".join(lines) + "\n")
    return len(set(lines))


def _rss_mb() -> dict[str, float]:
    status = Path("/proc/self/status").read_text().splitlines()
    field = {line.split(":")[0]: line.split()[1] for line in status if line.startswith(("VmRSS", "RssAnon"))}
    return {"rss_mb": int(field["VmRSS"]) / 1024, "anon_mb": int(field["RssAnon"]) / 1024}


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kilobytes on Linux


def legacy_prepare(cond) -> dict[str, torch.Tensor]:
    """The in-RAM path the cache replaced (``TextConditioning.prepare`` before 2026-11-30), kept here to compare."""
    from onestep.conditioning import index_cond

    cond._empty_row()
    cond.encode([cond.negative_prompt or ""] + list(cond.validation_prompts))
    uniq = list(dict.fromkeys(cond.prompts))
    pos = {p: i for i, p in enumerate(uniq)}
    table = index_cond(cond.encode(uniq), torch.tensor([pos[p] for p in cond.prompts]))
    for p in uniq:
        if p not in cond.validation_prompts and p not in ("", cond.negative_prompt):
            cond._known.pop(p, None)
    cond.encoder.release()
    return table


def run_phase(phase: str, pipeline: Path, prompts: Path, batches: int, batch_size: int) -> dict:
    from onestep.teachers.text import PromptEncoder, read_prompts, text_conditioning

    lines = read_prompts(prompts) if phase != "baseline" else None
    cond = text_conditioning(PromptEncoder(pipeline, False, (16, 16)), lines, None, None, cache_embeddings=phase in ("disk", "reload"))
    start = time.perf_counter()
    table = None
    if phase == "ram":
        table = legacy_prepare(cond)
    else:
        cond.prepare()
    prepare_s = time.perf_counter() - start
    out = {"phase": phase, "prepare_s": prepare_s, "peak_after_prepare_mb": _peak_mb()}
    if lines:
        unique = len(set(lines))
        out |= {"prompts": len(lines), "unique": unique, "prompts_per_s": unique / prepare_s}
        g = torch.Generator().manual_seed(0)
        start = time.perf_counter()
        for _ in range(batches):
            if table is not None:
                idx = torch.randint(0, len(lines), (batch_size,), generator=g)
                batch = {k: v[idx] for k, v in table.items()}
            else:
                batch = cond.sample(batch_size, generator=g)
        out |= {"ms_per_batch": 1000 * (time.perf_counter() - start) / batches, "batch_shape": list(batch["encoder_hidden_states"].shape)}
        if table is None:
            store = cond._train.store
            out["cache_mb"] = sum((store.folder / s).stat().st_size for s in store.shards) / 2**20
            out["encoder_loaded"] = cond.encoder._parts is not None
    out |= {"peak_mb": _peak_mb(), **{f"end_{k}": v for k, v in _rss_mb().items()}}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--num-prompts", type=int, default=100_000)
    ap.add_argument("--repeat-every", type=int, default=10, help="every k-th prompt repeats an earlier one (0: all unique)")
    ap.add_argument("--tokens", type=int, default=16, help="text tokens per prompt (SD1.5: 77)")
    ap.add_argument("--hidden", type=int, default=16, help="text encoder width (SD1.5: 768)")
    ap.add_argument("--batches", type=int, default=200)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--phases", default="baseline,ram,disk,reload")
    ap.add_argument("--workdir", help="where the pipeline, the prompt file and the cache go (default: a temporary folder)")
    ap.add_argument("--json", help="also write the figures here")
    ap.add_argument("--phase", help=argparse.SUPPRESS)
    ap.add_argument("--pipeline", help=argparse.SUPPRESS)
    ap.add_argument("--prompts", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.phase:  # a child: one phase, one JSON line
        print(json.dumps(run_phase(a.phase, Path(a.pipeline), Path(a.prompts), a.batches, a.batch_size)), flush=True)
        return

    work = Path(a.workdir or tempfile.mkdtemp(prefix="prompt-cache-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    pipeline = build_pipeline(work, a.tokens, a.hidden)
    prompt_file = work / "prompts.txt"
    unique = write_prompts(prompt_file, a.num_prompts, a.repeat_every)
    env = {**os.environ, "ONESTEP_CACHE": str(work / "cache")}
    results = {
        "num_prompts": a.num_prompts, "unique": unique, "tokens": a.tokens, "hidden": a.hidden,
        "row_kb_float32": a.tokens * a.hidden * 4 / 1024, "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs",
        "torch": torch.__version__, "phases": [],
    }
    print(f"{a.num_prompts} prompts ({unique} unique), embeddings {a.tokens} x {a.hidden} ({results['row_kb_float32']:.1f} KB float32 each)")
    for phase in a.phases.split(","):
        cmd = [sys.executable, __file__, "--phase", phase, "--pipeline", str(pipeline), "--prompts", str(prompt_file),
               "--batches", str(a.batches), "--batch-size", str(a.batch_size)]
        r = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if r.returncode:
            sys.exit(f"phase {phase} failed:\n{r.stderr[-3000:]}")
        row = json.loads(r.stdout.strip().splitlines()[-1])
        results["phases"].append(row)
        print(json.dumps(row))
    if a.json:
        Path(a.json).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
