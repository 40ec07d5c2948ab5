"""``onestep eval t2i``: the COCO captions protocol on a tiny fake COCO folder, a tiny random SD
pipeline as the student and a tiny CLIP built from config; subset selection, the resize/crop,
the reference cache, bad input."""

import json

import numpy as np
import pytest
import torch

from onestep.cli import main
from onestep.errors import OnestepError
from onestep.eval.t2i import read_coco_captions, resize_center_crop, select_subset
from test_eval_fidelity import random_inception_state  # noqa: F401 (a fixture: torch-fidelity's Inception, random weights)

# (height, width) of the fake COCO images: landscape, portrait, square, and one grey image.
SIZES = [(24, 36), (36, 24), (28, 28), (20, 30), (30, 20), (26, 26), (24, 32), (32, 24)]


def write_fake_coco(root, year: str = "2014", n: int = len(SIZES)):
    """A COCO-style split: ``root/images/*.jpg`` and ``root/captions.json`` (two captions per image but one,
    plus a listed image without captions)."""
    from PIL import Image

    rng = np.random.default_rng(0)
    folder = root / "images"
    folder.mkdir(parents=True)
    images, annotations = [], []
    for i, (h, w) in enumerate(SIZES[:n]):
        image_id = 1000 + 7 * i
        name = f"COCO_val2014_{image_id:012d}.jpg" if year == "2014" else f"{image_id:012d}.jpg"
        arr = rng.integers(0, 256, (h, w) if i == 3 else (h, w, 3), dtype=np.uint8)
        Image.fromarray(arr).save(folder / name, quality=95)
        images.append({"id": image_id, "file_name": name, "height": h, "width": w})
        for c in range(1 if i == 0 else 2):
            annotations.append({"id": len(annotations), "image_id": image_id, "caption": f"picture {i} caption {c} "})
    images.append({"id": 5, "file_name": "no_captions.jpg", "height": 10, "width": 10})  # listed, never captioned
    (root / "captions.json").write_text(json.dumps({"info": {}, "images": images, "annotations": annotations}))
    return root / "captions.json", folder


@pytest.fixture(scope="module")
def coco(tmp_path_factory):
    return write_fake_coco(tmp_path_factory.mktemp("coco"))


@pytest.fixture(scope="module")
def tiny_sd_student(tmp_path_factory):
    from t2i_fixtures import make_tiny_sd

    return make_tiny_sd(tmp_path_factory.mktemp("sd") / "student")


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    from t2i_fixtures import make_tiny_clip

    return make_tiny_clip(tmp_path_factory.mktemp("clip"), image_size=32, max_positions=77)


def test_subset_is_one_caption_per_image_fixed_by_the_seed(coco, tmp_path):
    captions, images = coco
    pool = read_coco_captions(captions, images)
    assert [im.image_id for im in pool] == sorted(1000 + 7 * i for i in range(len(SIZES)))  # the uncaptioned image is left out
    assert pool[0].captions == ("picture 0 caption 0",)  # stripped
    a = select_subset(pool, 5, seed=0)
    assert len(a) == 5 and len({s["image_id"] for s in a}) == 5
    for s in a:
        i = (s["image_id"] - 1000) // 7
        assert s["caption"] in {f"picture {i} caption 0", f"picture {i} caption 1"} and s["path"].is_file()
    assert [(s["image_id"], s["caption"]) for s in select_subset(pool, 5, seed=0)] == [(s["image_id"], s["caption"]) for s in a]
    others = [tuple((s["image_id"], s["caption"]) for s in select_subset(pool, 5, seed=k)) for k in range(1, 6)]
    assert any(o != tuple((s["image_id"], s["caption"]) for s in a) for o in others)
    # The 2017 naming (bare ids) reads the same way.
    c17, i17 = write_fake_coco(tmp_path / "c17", year="2017", n=3)
    assert [im.path.name for im in read_coco_captions(c17, i17)] == ["000000001000.jpg", "000000001007.jpg", "000000001014.jpg"]


def test_resize_center_crop_is_shorter_side_then_centre():
    from PIL import Image

    rng = np.random.default_rng(1)
    arr = rng.integers(0, 256, (20, 40, 3), dtype=np.uint8)  # H 20, W 40
    out = resize_center_crop(Image.fromarray(arr), 10)
    # By hand: the shorter side 20 -> 10, so 40 -> 20 wide (PIL bicubic), then columns 5..14.
    expected = np.asarray(Image.fromarray(arr).resize((20, 10), Image.BICUBIC))[:, 5:15]
    assert out.dtype == torch.uint8 and out.shape == (3, 10, 10)
    np.testing.assert_array_equal(out.permute(1, 2, 0).numpy(), expected)
    # A tensor gives what its PIL image gives; portrait crops rows; grey becomes RGB; the right size passes as is.
    t = torch.from_numpy(arr).permute(2, 0, 1)
    assert torch.equal(resize_center_crop(t, 10), out)
    tall = resize_center_crop(t.transpose(1, 2), 10)
    expected_tall = np.asarray(Image.fromarray(np.ascontiguousarray(arr.transpose(1, 0, 2))).resize((10, 20), Image.BICUBIC))[5:15]
    np.testing.assert_array_equal(tall.permute(1, 2, 0).numpy(), expected_tall)
    grey = resize_center_crop(t[:1], 10)
    assert grey.shape == (3, 10, 10) and torch.equal(grey[0], grey[2])
    assert torch.equal(resize_center_crop(t[:, :10, :10], 10), t[:, :10, :10])


def test_eval_t2i_end_to_end_with_inception_and_clip(tmp_path, capsys, coco, tiny_sd_student, tiny_clip, random_inception_state):
    from safetensors.torch import save_file

    from onestep.eval import clip_score
    from onestep.eval.clip import sample_pipeline
    from onestep.eval.images import as_uint8, load_images

    captions, images = coco
    weights = tmp_path / "inception.safetensors"
    save_file(random_inception_state, weights)
    out = tmp_path / "ev"
    argv = ["eval", "t2i", "--student", str(tiny_sd_student), "--captions", str(captions), "--images", str(images), "--clip", str(tiny_clip),
            "--num-samples", "6", "--resolution", "32", "--seed", "3", "--batch-size", "4", "--inception-weights", str(weights),
            "--cache-dir", str(tmp_path / "cache"), "--out", str(out), "--no-progress"]
    assert main(argv + ["--report", "--save-images", str(tmp_path / "gen")]) == 0
    printed = capsys.readouterr().out
    for col in ("fid", "kid", "precision", "recall", "clip_score"):
        assert col in printed
    rec = json.loads((out / "metrics.json").read_text())
    m = rec["metrics"]
    assert rec["command"] == "t2i" and rec["num_samples"] == 6 and rec["resolution"] == 32 and rec["seeds"] == [3, 8]
    assert rec["extractor"] == "onestep-inception-v3" and rec["feature_layer"] == "2048" and not rec["reference"]["cached"]
    assert np.isfinite(m["fid"]) and m["fid"] >= 0 and np.isfinite(m["kid"]) and 0 <= m["precision"] <= 1 and 0 <= m["recall"] <= 1
    assert 0 <= m["clip_score"] <= 100 and rec["prc_neighborhood"] == 3
    subset = [json.loads(line) for line in (out / "subset.jsonl").read_text().splitlines()]
    pool = read_coco_captions(captions, images)
    assert [(s["image_id"], s["caption"]) for s in subset] == [(s["image_id"], s["caption"]) for s in select_subset(pool, 6, seed=3)]
    # The generated images are the student's for seeds 3.. (as `onestep eval clip` samples them), scored at their own size.
    x, _ = sample_pipeline(tiny_sd_student, [s["caption"] for s in subset], seed=3, batch_size=6)
    assert m["clip_score"] == pytest.approx(clip_score(x, [s["caption"] for s in subset], tiny_clip)["clip_score"], abs=1e-4)
    saved = sorted((tmp_path / "gen").glob("*.png"))
    assert len(saved) == 6 and (out / "samples.png").is_file() and "samples.png" in (out / "report.md").read_text()
    assert torch.equal(load_images(tmp_path / "gen"), as_uint8(x))
    assert len(list((tmp_path / "cache").glob("coco-6-32px-onestep-inception-v3-*.npz"))) == 1


def test_eval_t2i_reference_cache_digits_extractor_and_resolutions(tmp_path, coco, tiny_sd_student):
    captions, images = coco
    argv = ["eval", "t2i", "--student", str(tiny_sd_student), "--captions", str(captions), "--images", str(images), "--extractor", "digits",
            "--num-samples", "8", "--resolution", "16", "--cache-dir", str(tmp_path / "c"), "--no-progress"]
    assert main(argv) == 0
    metrics = tiny_sd_student.parent / f"eval-coco-{tiny_sd_student.name}" / "metrics.json"  # the default output folder
    rec = json.loads(metrics.read_text())
    assert rec["extractor"] == "onestep-digits" and rec["num_samples"] == 8 and rec["metrics"]["clip_score"] is None
    assert 0 <= rec["metrics"]["recall"] <= 1 and not rec["reference"]["cached"]
    # Again, without precision/recall: the reference features come from the cache, the FID is the same.
    assert main(argv + ["--no-prc"]) == 0
    rec2 = json.loads(metrics.read_text())
    assert rec2["reference"]["cached"] and rec2["metrics"]["fid"] == pytest.approx(rec["metrics"]["fid"], rel=1e-6)
    assert "precision" not in rec2["metrics"]
    # The cached reference features are those of the subset's real images, resized and centre-cropped.
    from onestep.eval.extractors import extract_features
    from onestep.eval.t2i import load_reference

    subset = select_subset(read_coco_captions(captions, images), 8, seed=0)
    with np.load(rec["reference"]["stats"]) as d:
        np.testing.assert_allclose(d["features"], extract_features(load_reference([s["path"] for s in subset], 16), "digits"), rtol=1e-5, atol=1e-5)
    # Another resolution is another reference (recomputed, cached under its own key).
    assert main(argv[:-5] + ["--resolution", "24", "--cache-dir", str(tmp_path / "c"), "--no-progress", "--out", str(tmp_path / "o")]) == 0
    assert len(list((tmp_path / "c").glob("coco-8-*.npz"))) == 2


def _bad(argv, capsys):
    code = main(argv)
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.count("\n") == 0 and err.startswith("onestep eval: error:"), err
    return err


def test_bad_input_is_one_clear_line_and_exit_2(tmp_path, capsys, coco, tiny_sd_student):
    captions, images = coco
    base = ["eval", "t2i", "--student", str(tiny_sd_student), "--extractor", "digits", "--no-progress", "--out", str(tmp_path / "o")]
    # missing captions file
    assert "no such file" in _bad(base + ["--captions", str(tmp_path / "nope.json"), "--images", str(images)], capsys)
    # not a COCO captions file
    (tmp_path / "bad.json").write_text('{"images": []}')
    assert "not a COCO captions file" in _bad(base + ["--captions", str(tmp_path / "bad.json"), "--images", str(images)], capsys)
    (tmp_path / "broken.json").write_text("{")
    assert "not a COCO captions file" in _bad(base + ["--captions", str(tmp_path / "broken.json"), "--images", str(images)], capsys)
    # captions without images: the folder of another split, and captions of images the file does not list
    (tmp_path / "empty_dir").mkdir()
    assert "are not there" in _bad(base + ["--captions", str(captions), "--images", str(tmp_path / "empty_dir")], capsys)
    data = json.loads(captions.read_text())
    data["annotations"].append({"id": 99, "image_id": 424242, "caption": "orphan"})
    (tmp_path / "orphan.json").write_text(json.dumps(data))
    assert "424242" in _bad(base + ["--captions", str(tmp_path / "orphan.json"), "--images", str(images)], capsys)
    # an empty subset: no captions at all, too few samples, more samples than captioned images
    (tmp_path / "none.json").write_text(json.dumps({"images": data["images"], "annotations": []}))
    assert "subset would be empty" in _bad(base + ["--captions", str(tmp_path / "none.json"), "--images", str(images)], capsys)
    assert "at least 2" in _bad(base + ["--captions", str(captions), "--images", str(images), "--num-samples", "0"], capsys)
    assert "only 8 captioned images" in _bad(base + ["--captions", str(captions), "--images", str(images)], capsys)  # default 30000
    # a student that is not a pipeline folder; a missing CLIP folder; Inception without weights
    ok = ["--captions", str(captions), "--images", str(images), "--num-samples", "4"]
    assert "not a text-to-image student" in _bad(["eval", "t2i", "--student", str(tmp_path), "--extractor", "digits", "--no-progress"] + ok, capsys)
    assert "--clip" in _bad(base + ok + ["--clip", str(tmp_path / "no_clip")], capsys)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TORCH_HOME", str(tmp_path / "empty_torch_home"))
        assert "--inception-weights" in _bad(["eval", "t2i", "--student", str(tiny_sd_student), "--no-progress"] + ok, capsys)


def test_help_explains_the_protocol(capsys):
    with pytest.raises(SystemExit) as e:
        main(["eval", "t2i", "--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    for words in ("30000", "one of each image's captions", "centre crop", "Inception-v3", "precision and recall", "CLIP score", "--seed + i"):
        assert words in text, words


def test_read_coco_captions_errors_directly(tmp_path):
    with pytest.raises(OnestepError, match="no such folder"):
        read_coco_captions(write_fake_coco(tmp_path, n=2)[0], tmp_path / "missing")
