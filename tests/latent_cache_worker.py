"""Run under `accelerate launch` (2 CPU processes) by test_t2i_memory.py: both ranks ask for the
latent cache of one image folder; rank 1 comes late. Each rank writes how many images it encoded
and the sum of the latents it got (a fresh interpreter per rank: no fork after OpenMP)."""

import json
import sys
import time
from pathlib import Path

from accelerate import Accelerator
from conftest import leave_launch
from test_t2i_memory import CountingVAE

from onestep.teachers import load_teacher
from onestep.teachers.latents import encode_image_folder, latent_cache_dir, read_image_captions


def main(sd_dir: Path, image_dir: Path) -> None:
    acc = Accelerator()
    vae = CountingVAE(load_teacher(sd_dir).vae.vae)
    if acc.process_index == 1:
        time.sleep(1.0)  # rank 1 comes late and finds a complete cache: it must still meet rank 0 at the barrier
    latents = encode_image_folder(read_image_captions(image_dir), vae, 16, shard_size=2)
    (latent_cache_dir() / f"rank{acc.process_index}.json").write_text(json.dumps([vae.images, latents.sum().item()]))
    acc.wait_for_everyone()
    leave_launch()


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
