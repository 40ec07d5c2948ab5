"""Run under `accelerate launch` (2 CPU processes) by test_fsdp.py: the same DMD2 run three ways
in one launch, each process writing nothing but what the test compares.

- ``fsdp``: sharded (FSDP2), GAN head, EMA and a LoRA fake score, checkpoints every 2 steps;
- ``ddp``: the same run unsharded (gradients averaged by onestep's all-reduce);
- ``resumed``: sharded again, resumed from the ``fsdp`` run's checkpoint-2;
- ``lcm_fsdp`` / ``lcm_ddp``: consistency distillation (its EMA target reads the sharded weights), both ways;
- ``disback_fsdp`` / ``disback_ddp``: DisBack over DMD2 with a LoRA fake score (nodes written from
  gathered shards, read back into a sharded target), both ways.
"""

import json
import sys
from pathlib import Path

import torch

from conftest import leave_launch, tiny_config, tiny_dmd2_config
from onestep.trainers import make_trainer


def run(out: Path, teacher: str, name: str, **overrides) -> dict:
    if name.startswith("lcm"):
        config = tiny_config("consistency", out / name, teacher, max_steps=3, num_ddim_timesteps=10, **overrides)
    elif name.startswith("disback"):
        config = tiny_config(
            "disback-dmd2", out / name, teacher, max_steps=7, fake_score="lora", lora_rank=2, fake_updates_per_generator=1,
            disback_nodes=2, disback_record_steps=2, disback_interval=1, **overrides,
        )
    else:
        config = tiny_dmd2_config(
            out / name, teacher, max_steps=4, checkpoint_every=2, checkpoint_total_limit=0, ema_decay=0.5,
            fake_score="lora", lora_rank=2, gan_weight_generator=0.1, generator_timesteps=[800, 400],
            max_grad_norm=0.05, **overrides,  # clipping on: the global norm of sharded gradients matters
        )
    tr = make_trainer(config)
    local = sum(p.to_local().numel() if hasattr(p, "to_local") else p.numel() for p in tr.generator.parameters())
    total = sum(p.numel() for p in tr.generator.parameters())
    tr.accelerator.end_training = lambda: None  # it would close the process group the next run needs
    tr.train()
    return {"local_params": local, "total_params": total, "sharded": tr.fsdp}


def main(out: Path, teacher: str) -> None:
    results = {
        "fsdp": run(out, teacher, "fsdp", fsdp=True),
        "ddp": run(out, teacher, "ddp", fsdp=False),
    }
    # the resumed run reads the first run's checkpoint folder
    results["resumed"] = run(out, teacher, "resumed", fsdp=True, resume=str(out / "fsdp" / "run" / "checkpoint-2"))
    results["lcm_fsdp"] = run(out, teacher, "lcm_fsdp", fsdp=True)
    results["lcm_ddp"] = run(out, teacher, "lcm_ddp", fsdp=False)
    results["disback_fsdp"] = run(out, teacher, "disback_fsdp", fsdp=True)
    results["disback_ddp"] = run(out, teacher, "disback_ddp", fsdp=False)
    rank = torch.distributed.get_rank()
    (out / f"rank{rank}.json").write_text(json.dumps(results))
    torch.distributed.barrier()
    leave_launch()


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2])
