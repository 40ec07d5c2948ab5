"""Speed and memory of text-to-image distillation at real model size (needs a CUDA GPU).

The UNets and VAEs are built from the published SD1.5 and SDXL configs with random weights
(speed and memory do not depend on the weights); prompt embeddings are random tensors of the
right shape (the training loop reads cached embeddings, so the text encoders are not timed).

    python benchmarks/sd_speed.py --model sd15 --json benchmarks/sd_speed_sd15.json
    python benchmarks/sd_speed.py --model sdxl --batch-size 2
    python benchmarks/sd_speed.py --model tiny --device cpu      # a smoke test of the script itself

Measures, in bf16 autocast (``--mixed-precision``):
- DMD2 seconds per iteration (a generator update and a fake-score update every iteration) and
  peak GPU memory, for the fake score as a full copy and as LoRA, with and without gradient
  checkpointing (SD1.5: batch 8 of 64x64 latents);
- one-step sampling latency at the model's resolution (UNet + VAE decode, batch 1) against the
  50-step DDIM teacher with classifier-free guidance (one batched cond/uncond UNet call per step).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
import zlib

import torch

SD15_UNET = dict(
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=768, attention_head_dim=8, norm_num_groups=32,
)
SDXL_UNET = dict(
    sample_size=128, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), cross_attention_dim=2048,
    use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816, norm_num_groups=32,
)
TINY_UNET = dict(
    sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(8, 16),
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=16, attention_head_dim=4, norm_num_groups=4,
)
SD_VAE = dict(
    in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(128, 256, 512, 512), layers_per_block=2,
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, norm_num_groups=32,
    sample_size=512, scaling_factor=0.18215,
)
TINY_VAE = dict(
    in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 8), layers_per_block=1,
    down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=4, sample_size=16,
)
SD_SCHEDULE = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", prediction_type="epsilon")
MODELS = {
    "sd15": dict(unet=SD15_UNET, vae=SD_VAE, tokens=77, hidden=768, xl=False, batch=8),
    "sdxl": dict(unet=SDXL_UNET, vae={**SD_VAE, "sample_size": 1024, "scaling_factor": 0.13025}, tokens=77, hidden=2048, xl=True, batch=2),
    "tiny": dict(unet=TINY_UNET, vae=TINY_VAE, tokens=16, hidden=16, xl=False, batch=2),
}


class RandomPromptEncoder:
    """Stands in for the text encoders: a fixed random embedding per prompt, of the real shapes."""

    def __init__(self, tokens: int, hidden: int, xl: bool, size: int):
        self.tokens, self.hidden, self.xl, self.size = tokens, hidden, xl, (size, size)

    def cache_identity(self) -> dict:
        """Names this stand-in in the on-disk prompt cache's key (the teacher caches its prompt set there)."""
        return {"class": type(self).__name__, "tokens": self.tokens, "hidden": self.hidden, "xl": self.xl, "size": list(self.size)}

    def encode(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        out = {"encoder_hidden_states": [], "text_embeds": [], "time_ids": []}
        for p in prompts:
            g = torch.Generator().manual_seed(zlib.crc32(p.encode()))  # the same embedding in every process
            out["encoder_hidden_states"].append(torch.randn(1, self.tokens, self.hidden, generator=g))
            out["text_embeds"].append(torch.randn(1, 1280, generator=g))
            out["time_ids"].append(torch.tensor([[*self.size, 0, 0, *self.size]], dtype=torch.float32))
        keys = ("encoder_hidden_states", "text_embeds", "time_ids") if self.xl else ("encoder_hidden_states",)
        return {k: torch.cat(out[k]) for k in keys}

    def release(self) -> None:
        pass


def random_teacher(model: str):
    """A :class:`~onestep.teachers.Teacher` with a randomly initialised UNet and VAE of the published size."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    from onestep.schedule import NoiseSchedule
    from onestep.teachers import Teacher
    from onestep.teachers.latents import LatentVAE
    from onestep.teachers.text import TextConditioning

    spec = MODELS[model]
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**spec["unet"])
    vae = LatentVAE(AutoencoderKL(**spec["vae"]))
    side = spec["unet"]["sample_size"] * vae.scale_factor
    encoder = RandomPromptEncoder(spec["tokens"], spec["hidden"], spec["xl"], side)
    cond = TextConditioning(encoder=encoder, prompts=[f"prompt {i}" for i in range(64)], validation_prompts=["a cat"]).prepare()
    return Teacher(
        name=f"random-{model}", backbone=unet, schedule=NoiseSchedule.from_scheduler_config(SD_SCHEDULE),
        prediction_type="epsilon", conditioning=cond, sample_shape=(4, spec["unet"]["sample_size"], spec["unet"]["sample_size"]),
        guidance_scale=7.5, vae=vae, meta={"pipeline_folder": None},
    )


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def dmd2_figures(model: str, fake_score: str, checkpointing: bool, batch_size: int, iterations: int, mixed_precision: str) -> dict:
    from onestep.trainers import DMD2Config, DMD2Trainer

    teacher = random_teacher(model)
    with tempfile.TemporaryDirectory() as d:
        cfg = DMD2Config(
            teacher=teacher.name, output_dir=d, batch_size=batch_size, fake_score=fake_score, lora_rank=64,
            gradient_checkpointing=checkpointing, mixed_precision=mixed_precision, fake_updates_per_generator=1,
            guidance_scale=1.75, log_with="none", export=False, generator_timesteps=[999],
        )
        tr = DMD2Trainer(cfg, teacher=teacher)
        device = tr.device
        for _ in range(2):  # warm-up
            tr.train_step()
        _sync(device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        for _ in range(iterations):
            tr.train_step()
        _sync(device)
        dt = (time.perf_counter() - t0) / iterations
        peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None
    del tr
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return {"fake_score": fake_score, "gradient_checkpointing": checkpointing, "batch_size": batch_size,
            "sec_per_iteration": dt, "peak_gib": peak}


@torch.no_grad()
def sampling_figures(model: str, device: torch.device, repeats: int, teacher_steps: int, dtype: torch.dtype) -> dict:
    from onestep.samplers.ddim import ddim_sample
    from onestep.samplers.student import student_sample

    teacher = random_teacher(model)
    teacher.backbone.to(device, dtype)
    teacher.vae.to(device, dtype)
    den = teacher.denoiser()
    cond = {k: v.to(device, dtype) for k, v in teacher.conditioning.from_labels([0]).items()}
    uncond = {k: v.to(device, dtype) for k, v in teacher.conditioning.null(1).items()}
    noise = torch.randn(1, *teacher.sample_shape, device=device, dtype=dtype)

    def student():
        return teacher.vae.decode(student_sample(den, [999], noise, cond).to(dtype))

    def guided_teacher():
        return teacher.vae.decode(ddim_sample(den, noise, cond, uncond, num_steps=teacher_steps, guidance_scale=7.5).to(dtype))

    def timed(fn, n):
        fn()
        out = []
        for _ in range(n):
            _sync(device)
            t0 = time.perf_counter()
            fn()
            _sync(device)
            out.append(time.perf_counter() - t0)
        return statistics.median(out)

    s = timed(student, repeats)
    t = timed(guided_teacher, max(1, repeats // 10))
    side = teacher.sample_shape[-1] * teacher.vae.scale_factor
    return {"resolution": side, "student_ms": s * 1e3, "teacher_ms": t * 1e3, "teacher_steps": teacher_steps, "ratio": t / s}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=sorted(MODELS), default="sd15")
    p.add_argument("--batch-size", type=int, default=None, help="DMD2 batch (default: 8 for sd15, 2 for sdxl)")
    p.add_argument("--iterations", type=int, default=5)
    p.add_argument("--repeats", type=int, default=20, help="timed one-step samples (the teacher gets a tenth)")
    p.add_argument("--teacher-steps", type=int, default=50)
    p.add_argument("--mixed-precision", default="bf16", choices=("no", "bf16", "fp16"))
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--skip-training", action="store_true")
    p.add_argument("--json", default=None)
    a = p.parse_args()
    device = torch.device(a.device)
    if a.model != "tiny" and device.type != "cuda":
        raise SystemExit("real-size figures need a CUDA GPU; use --model tiny to smoke-test on CPU")
    mp = a.mixed_precision if device.type == "cuda" else "no"
    batch = a.batch_size or MODELS[a.model]["batch"]
    result = {
        "model": a.model, "device": torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__, "mixed_precision": mp, "dmd2": [], "sampling": None,
    }
    if not a.skip_training:
        for fake in ("lora", "copy"):
            for ckpt in (True, False):
                try:
                    row = dmd2_figures(a.model, fake, ckpt, batch, a.iterations, mp)
                except torch.cuda.OutOfMemoryError:
                    row = {"fake_score": fake, "gradient_checkpointing": ckpt, "batch_size": batch, "error": "out of memory"}
                    torch.cuda.empty_cache()
                result["dmd2"].append(row)
                print(json.dumps(row))
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(mp, torch.float32)
    result["sampling"] = sampling_figures(a.model, device, a.repeats, a.teacher_steps, dtype)
    print(json.dumps(result["sampling"]))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
