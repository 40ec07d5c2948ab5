"""Run under `accelerate launch` by test_resume_ddp.py: train a few DMD2 steps on every rank and
write what each rank ended with (a fresh interpreter per rank: no fork after OpenMP)."""

import json
import sys
from pathlib import Path

import torch

from conftest import leave_launch, tiny_dmd2_config
from onestep.trainers import DMD2Trainer


def main(out: Path, teacher: str) -> None:
    tr = DMD2Trainer(tiny_dmd2_config(out, teacher, max_steps=3, export=False, warmup_steps=10))
    acc = tr.accelerator
    first_noise = tr.make_batch()["noise"].sum().reshape(1)
    for _ in range(3):  # train_step, not train(): train() ends with end_training, which closes the group
        tr.train_step()
    flat_g = torch.cat([p.detach().reshape(-1) for p in tr.generator.parameters()])
    flat_f = torch.cat([p.detach().reshape(-1) for p in tr.fake.parameters()])
    sums = acc.gather(torch.stack([flat_g.sum(), flat_g.abs().sum(), flat_f.abs().sum()]).reshape(1, 3))
    noises = acc.gather(first_noise)
    if acc.is_main_process:
        lrs = {"generator": tr.sched_g.get_last_lr()[0], "fake": tr.sched_f.get_last_lr()[0]}
        result = {"processes": acc.num_processes, "param_sums": sums.tolist(), "noise": noises.tolist(), "lr": lrs}
        (out / "ddp.json").write_text(json.dumps(result))
    # Leave together and close the group: a rank that exits while its peer still holds the gloo
    # connection can be aborted at teardown.
    acc.wait_for_everyone()
    leave_launch()


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2])
