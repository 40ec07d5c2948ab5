"""The memory plan (``onestep train CONFIG --plan``) of the real SD1.5, SDXL and SD3-medium architectures.

    python benchmarks/memory_plan.py                      # a summary table, then each plan in full
    python benchmarks/memory_plan.py --json plans.json

Writes config-only pipeline folders (``model_index.json`` and each network's ``config.json``, no
weights) from the published architectures, then asks the plan of each preset with the fake score as
a full copy and as LoRA, frozen weights in float32 and in bf16. Nothing is loaded: the networks are
built on the meta device, so this runs in seconds on any machine.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

CLIP_L = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
              max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768)
CLIP_G = dict(vocab_size=49408, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
              max_position_embeddings=77, hidden_act="gelu", projection_dim=1280)
T5_XXL = dict(vocab_size=32128, d_model=4096, d_ff=10240, d_kv=64, num_heads=64, num_layers=24, feed_forward_proj="gated-gelu")
SD3_MEDIUM = dict(sample_size=128, patch_size=2, in_channels=16, num_layers=24, attention_head_dim=64, num_attention_heads=24,
                  joint_attention_dim=4096, caption_projection_dim=1536, pooled_projection_dim=2048, out_channels=16,
                  pos_embed_max_size=192)
SCHEDULER = {"_class_name": "DDIMScheduler", "num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012,
             "beta_schedule": "scaled_linear", "prediction_type": "epsilon", "clip_sample": False, "set_alpha_to_one": False,
             "steps_offset": 1}
FLOW_SCHEDULER = {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 3.0}
#: the pipeline class each architecture's folder declares
PIPELINES = {"sd15": "StableDiffusionPipeline", "sdxl": "StableDiffusionXLPipeline", "sd3-medium": "StableDiffusion3Pipeline"}


def write_architecture(folder: Path, name: str) -> Path:
    """A config-only pipeline folder of ``name`` (sd15, sdxl, sd3-medium)."""
    from diffusers import AutoencoderKL, SD3Transformer2DModel, UNet2DConditionModel
    from transformers import CLIPTextConfig, T5Config

    from sd_speed import SD15_UNET, SD_VAE, SDXL_UNET

    folder.mkdir(parents=True, exist_ok=True)
    index = {"_class_name": PIPELINES[name]}
    with torch.device("meta"):
        if name == "sd3-medium":
            backbone, part = SD3Transformer2DModel(**SD3_MEDIUM), "transformer"
            vae = AutoencoderKL(**{**SD_VAE, "latent_channels": 16, "scaling_factor": 1.5305, "shift_factor": 0.0609})
        else:
            backbone, part = UNet2DConditionModel(**(SD15_UNET if name == "sd15" else SDXL_UNET)), "unet"
            vae = AutoencoderKL(**SD_VAE)
    backbone.save_config(folder / part)
    vae.save_config(folder / "vae")
    index[part] = ["diffusers", type(backbone).__name__]
    index["vae"] = ["diffusers", "AutoencoderKL"]
    encoders = {"sd15": [("text_encoder", "CLIPTextModel", CLIP_L)],
                "sdxl": [("text_encoder", "CLIPTextModel", CLIP_L), ("text_encoder_2", "CLIPTextModelWithProjection", CLIP_G)],
                "sd3-medium": [("text_encoder", "CLIPTextModelWithProjection", CLIP_L),
                               ("text_encoder_2", "CLIPTextModelWithProjection", CLIP_G), ("text_encoder_3", "T5EncoderModel", T5_XXL)]}[name]
    for part_name, cls, cfg in encoders:
        config = T5Config(**cfg) if cls.startswith("T5") else CLIPTextConfig(**cfg)
        config.save_pretrained(folder / part_name)
        index[part_name] = ["transformers", cls]
    (folder / "scheduler").mkdir(exist_ok=True)
    scheduler = FLOW_SCHEDULER if name == "sd3-medium" else SCHEDULER
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(scheduler))
    index["scheduler"] = ["diffusers", scheduler["_class_name"]]
    (folder / "model_index.json").write_text(json.dumps(index, indent=2))
    return folder


ROWS = [  # (architecture, preset, overrides)
    ("sd15", "sd15_dmd2", {"fake_score": "copy"}),
    ("sd15", "sd15_dmd2", {"fake_score": "lora"}),
    ("sdxl", "sdxl_dmd2_lora", {"fake_score": "copy", "generator_lora_rank": 0}),
    ("sdxl", "sdxl_dmd2_lora", {}),
    ("sd3-medium", "sd3_dmd2_lora", {}),
]


def main() -> int:
    from onestep.trainers import load_config
    from onestep.trainers.plan import GIB, format_plan, memory_plan, resident_bytes

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", type=Path, help="write every plan's rows here")
    p.add_argument("--frozen-compute", default="storage", choices=("storage", "float32", "auto"),
                   help="what bf16 frozen weights compute in (default storage: a GPU's; float32 keeps norms and "
                        "embeddings float32, as on a CPU without bf16 units; auto: this machine's)")
    args = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="arch-"))
    out, full = [], []
    for arch, preset, overrides in ROWS:
        folder = work / arch
        if not folder.exists():
            write_architecture(folder, arch)
        for frozen in ("float32", "bf16"):
            config = load_config(preset, {**overrides, "teacher": str(folder), "frozen_dtype": frozen,
                                           "frozen_compute": args.frozen_compute}, output_dir=str(work / "run"))
            rows, assumptions = memory_plan(config)
            held = resident_bytes(rows)
            gen = "LoRA" if config.generator_lora_rank else "full"
            out.append({"architecture": arch, "preset": preset, "fake_score": config.fake_score, "generator": gen,
                        "frozen_dtype": frozen, "held_gib": round(held / GIB, 2),
                        "rows": [r.__dict__ for r in rows]})
            full.append(f"### {arch}, {preset}, fake score {config.fake_score}, generator {gen}, frozen {frozen}\n\n```\n"
                        f"{format_plan(rows, assumptions)}\n```\n")
    print("| architecture | preset | fake score | generator | frozen | held through training (GiB) | 24 / 48 / 80 GiB |")
    print("|---|---|---|---|---|---:|---|")
    for r in out:
        fits = " / ".join("yes" if r["held_gib"] < g else "no" for g in (24, 48, 80))
        print(f"| {r['architecture']} | {r['preset']} | {r['fake_score']} | {r['generator']} | {r['frozen_dtype']} | {r['held_gib']} | {fits} |")
    print()
    print("\n".join(full))
    if args.json:
        args.json.write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
