"""benchmarks/peers.py: the same data for both sides, the shims it runs them under, and onestep's side end to end."""

from __future__ import annotations

import json
import sys
import tarfile
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))


def test_both_sides_read_the_same_images_and_captions(tmp_path):
    import peers

    images, shard, prompts = peers.write_data(tmp_path, n=5, side=16)
    rows = [json.loads(line) for line in (images / "metadata.jsonl").read_text().splitlines()]
    with tarfile.open(shard) as tar:
        names = tar.getnames()
        assert names == [f"{i:06d}.{ext}" for i in range(5) for ext in ("png", "txt")]  # webdataset: one key, two files
        for i, row in enumerate(rows):
            assert tar.extractfile(f"{i:06d}.png").read() == (images / row["file_name"]).read_bytes()
            assert tar.extractfile(f"{i:06d}.txt").read().decode() == row["text"]
    assert prompts.read_text().split("\n")[:5] == [r["text"] for r in rows]


def test_the_step_clock_reads_only_the_run_bar(monkeypatch):
    from tqdm import std

    import peers

    monkeypatch.setattr(std.tqdm, "update", std.tqdm.update)  # undone after the test
    times = peers.record_steps(total=3)
    with std.tqdm(total=3, disable=True) as bar:
        for _ in range(3):
            bar.update(1)
    with std.tqdm(total=7, disable=True) as other:  # e.g. a loading bar
        other.update(2)
    assert len(times) == 3 and times == sorted(times)
    s = peers.summarise({"steps": [1.0, 2.0, 2.5, 3.5, 4.0]}, warmup=1)
    assert s["intervals"] == [0.5, 1.0, 0.5] and s["s_per_step"] == 0.5 and s["startup_s"] == 1.0


def test_the_peer_shim_runs_cpu_autocast_in_float32(monkeypatch):
    import peers

    monkeypatch.setattr(torch, "autocast", torch.autocast)
    a, b = torch.randn(4, 4), torch.randn(4, 4)
    with torch.autocast("cpu"):
        assert (a @ b).dtype == torch.bfloat16  # what the peer's teacher pass gets on a CPU, unshimmed
    peers.cpu_autocast_off()
    with torch.autocast("cpu"):
        assert (a @ b).dtype == torch.float32
    with torch.autocast("cpu", dtype=torch.bfloat16):  # every CPU autocast is off, not only the default dtype
        assert (a @ b).dtype == torch.float32


def test_onestep_side_takes_the_shared_settings(tmp_path):
    from onestep.config import parse_overrides
    from onestep.trainers import load_config

    import peers

    argv = peers.onestep_argv(Path("/teacher"), Path("/images"), Path("/prompts.txt"), tmp_path / "out", 128, 4, 30)
    assert argv[:2] == ["train", "sd15_lcm"]
    overrides = parse_overrides([a for a in argv[2:] if a != "--output-dir" and a != str(tmp_path / "out")])
    c = load_config("sd15_lcm", overrides, output_dir=str(tmp_path / "out"))
    s = peers.SHARED
    assert c.num_ddim_timesteps == s["num_ddim_timesteps"] and c.loss == "huber" and c.huber_c == s["huber_c"]
    assert list(c.guidance_scale_range) == [s["w_min"] + 1, s["w_max"] + 1]  # LCM's w, in onestep's s = w + 1
    assert c.lr_generator == s["lr"] and c.guidance_embedding_dim == s["embedding_dim"]
    assert c.mixed_precision == "no" and c.gradient_checkpointing is False and (c.resolution, c.batch_size, c.max_steps) == (128, 4, 30)
    peer = peers.peer_argv(Path("/teacher"), Path("/shard.tar"), tmp_path / "p", 128, 4, 30)
    flags = dict(zip(peer[::2], peer[1::2]))
    assert float(flags["--w_min"]) + 1 == c.guidance_scale_range[0] and float(flags["--w_max"]) + 1 == c.guidance_scale_range[1]
    assert flags["--loss_type"] == "huber" and float(flags["--learning_rate"]) == c.lr_generator
    assert int(flags["--num_ddim_timesteps"]) == c.num_ddim_timesteps and int(flags["--unet_time_cond_proj_dim"]) == c.guidance_embedding_dim


def test_check_runs_onestep_side_and_times_every_step(tmp_path, capsys):
    import peers

    assert peers.main(["--check", "--steps", "4", "--warmup", "1", "--resolution", "64", "--batch-size", "2",
                       "--workdir", str(tmp_path), "--json", str(tmp_path / "r.json")]) == 0
    rows = json.loads((tmp_path / "r.json").read_text())["rows"]
    assert len(rows) == 1 and rows[0]["side"] == "onestep"
    assert rows[0]["steps_recorded"] == 4 and len(rows[0]["intervals"]) == 2 and rows[0]["s_per_step"] > 0
    assert rows[0]["peak_rss_gib"] > 0.1 and rows[0]["wall_s"] > rows[0]["startup_s"] > 0
    assert (tmp_path / "runs" / "onestep-0" / "out" / "student" / "onestep.json").is_file()
    assert "| onestep consistency (sd15_lcm), run 1 |" in capsys.readouterr().out


def test_the_peer_is_required_unless_checking(capsys):
    import peers

    with pytest.raises(SystemExit):
        peers.main([])
    assert "--lcm-script is required" in capsys.readouterr().err


def test_trainer_memory_rows_are_the_presets_on_the_pipeline(tmp_path):
    from onestep.config import parse_overrides
    from onestep.trainers import load_config

    import trainer_memory
    from trainer_overhead import REAL_ROWS, ROWS

    for row in ROWS:
        for fake in [None] if row == "consistency" else trainer_memory.FAKE_SCORES:
            argv = trainer_memory.argv_for(row, fake, Path("/sd"), Path("/p.txt"), Path("/img"), tmp_path / "o", 128, 2, 4)
            preset = argv[1]
            rest = argv[2:]
            i = rest.index("--output-dir")
            c = load_config(preset, parse_overrides(rest[:i] + rest[i + 2:]), output_dir=str(tmp_path / "o"))
            assert preset == ROWS[row][0] and c.teacher == "/sd" and (c.resolution, c.batch_size, c.max_steps) == (128, 2, 4)
            assert (c.real_images == "/img") == (row in REAL_ROWS)
            if fake:
                assert c.fake_score == fake
    md = trainer_memory.table([{"row": "dmd2", "fake": "copy", "peak_rss_gib": 2.0, "s_per_step": 0.5},
                               {"row": "dmd2", "fake": "lora", "peak_rss_gib": 1.5, "s_per_step": 0.4}])
    assert "| dmd2 | lora | 1.50 | 0.400 | 0.75 |" in md
