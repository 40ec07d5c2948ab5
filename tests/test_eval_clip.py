"""CLIP score on a tiny random transformers CLIPModel with an offline byte-level tokenizer; prompt files."""

import json

import pytest
import torch

from onestep.cli import main
from onestep.errors import OnestepError
from onestep.eval import clip_score, read_prompts


@pytest.fixture(scope="module")
def tiny_clip_dir(tmp_path_factory):
    from t2i_fixtures import make_tiny_clip

    return make_tiny_clip(tmp_path_factory.mktemp("tiny_clip"), image_size=32, max_positions=77)


PROMPTS = ["a photo of a three", "zero", "a seven, drawn badly", "eight", "one one one", "a nine"]


def test_clip_score_equals_the_stated_formula(tiny_clip_dir):
    from transformers import CLIPModel, CLIPTokenizer

    from onestep.clip import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

    torch.manual_seed(1)
    images = torch.rand(len(PROMPTS), 3, 40, 48) * 2 - 1  # not square, not the model's size
    res = clip_score(images, PROMPTS, tiny_clip_dir, batch_size=4)

    # By hand, the CLIP image processor's steps for a folder without preprocessor_config.json (OpenAI CLIP's at
    # the model's image_size 32), after the uint8 quantisation: resize the short side 40 -> 32, the long side to
    # int(32 * 48 / 40) = 38, as PIL resizes a uint8 image: bicubic (torch's antialiased bicubic is PIL's filter)
    # first along the width, then along the height, each pass saturating to the pixel range; centre crop
    # 32x32 (columns 3..34); rescale to [0, 1]; normalise with OpenAI's mean and std.
    u8 = ((images.clamp(-1, 1) + 1) * 127.5).round() / 255
    bicubic = dict(mode="bicubic", antialias=True, align_corners=False)
    x = torch.nn.functional.interpolate(u8, size=(40, 38), **bicubic).clamp(0, 1)
    x = torch.nn.functional.interpolate(x, size=(32, 38), **bicubic).clamp(0, 1)[..., 3:35]
    x = (x - torch.tensor(OPENAI_CLIP_MEAN).view(1, 3, 1, 1)) / torch.tensor(OPENAI_CLIP_STD).view(1, 3, 1, 1)
    model = CLIPModel.from_pretrained(tiny_clip_dir).eval()
    tok = CLIPTokenizer.from_pretrained(tiny_clip_dir)(PROMPTS, padding="max_length", max_length=77, truncation=True, return_tensors="pt")
    with torch.no_grad():
        e_i = model.get_image_features(pixel_values=x).pooler_output
        e_t = model.get_text_features(**tok).pooler_output
    cos = (e_i / e_i.norm(dim=-1, keepdim=True) * (e_t / e_t.norm(dim=-1, keepdim=True))).sum(-1)
    expected = 100 * cos.clamp_min(0)
    assert torch.allclose(torch.tensor(res["per_sample"], dtype=torch.float32), expected, atol=1e-4)
    assert res["clip_score"] == pytest.approx(float(expected.double().mean()), abs=1e-4)
    assert all(0 <= s <= 100 for s in res["per_sample"])
    # uint8 images give the same scores as the floats they quantise to; the batch size does not matter.
    as_u8 = ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    assert clip_score(as_u8, PROMPTS, tiny_clip_dir, batch_size=6)["per_sample"] == pytest.approx(res["per_sample"], abs=1e-4)


def test_clip_score_checks_its_inputs(tiny_clip_dir, tmp_path):
    with pytest.raises(OnestepError, match="2 images for 3 prompts"):
        clip_score(torch.zeros(2, 3, 32, 32), ["a", "b", "c"], tiny_clip_dir)
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(OnestepError, match="pickle files are not loaded"):
        clip_score(torch.zeros(1, 3, 32, 32), ["a"], tmp_path)


def test_read_prompts_text_jsonl_csv(tmp_path):
    (tmp_path / "p.txt").write_text("a cat\n\n  a dog  \n")
    assert read_prompts(tmp_path / "p.txt") == ["a cat", "a dog"]
    (tmp_path / "p.jsonl").write_text('{"caption": "a cat", "id": 1}\n\n{"prompt": "a dog"}\n"a bird"\n')
    assert read_prompts(tmp_path / "p.jsonl") == ["a cat", "a dog", "a bird"]
    (tmp_path / "q.jsonl").write_text('{"txt": "x"}\n')
    assert read_prompts(tmp_path / "q.jsonl", column="txt") == ["x"]
    with pytest.raises(OnestepError, match=r"q.jsonl:1: no caption/prompt/text"):
        read_prompts(tmp_path / "q.jsonl")
    (tmp_path / "p.csv").write_text('id,caption\n1,"a cat, sitting"\n2,a dog\n')
    assert read_prompts(tmp_path / "p.csv") == ["a cat, sitting", "a dog"]
    (tmp_path / "r.csv").write_text("id,desc\n1,x\n")
    assert read_prompts(tmp_path / "r.csv", column="desc") == ["x"]
    with pytest.raises(OnestepError, match="no caption column"):
        read_prompts(tmp_path / "r.csv")
    with pytest.raises(OnestepError, match="does not exist"):
        read_prompts(tmp_path / "nope.txt")


def test_eval_clip_cli_on_an_image_folder(tmp_path, capsys, tiny_clip_dir):
    from PIL import Image

    imgs = tmp_path / "imgs"
    imgs.mkdir()
    torch.manual_seed(2)
    x = (torch.rand(3, 3, 32, 32) * 255).round().to(torch.uint8)
    for i, im in enumerate(x):
        Image.fromarray(im.permute(1, 2, 0).numpy()).save(imgs / f"{i:03d}.png")
    (tmp_path / "p.txt").write_text("\n".join(PROMPTS[:3]))
    out = tmp_path / "ev"
    argv = ["eval", "clip", "--images", str(imgs), "--prompts", str(tmp_path / "p.txt"), "--clip-model", str(tiny_clip_dir), "--out", str(out), "--no-progress"]
    assert main(argv) == 0
    rec = json.loads((out / "metrics.json").read_text())
    assert rec["num_samples"] == 3 and "100 * max(cos" in rec["definition"]
    assert rec["metrics"]["clip_score"] == pytest.approx(clip_score(x, PROMPTS[:3], tiny_clip_dir)["clip_score"], abs=1e-4)
    assert "clip_score" in capsys.readouterr().out
    # A student folder that is not a text-to-image pipeline: one clear line, exit 2.
    code = main(argv[:2] + ["--student", str(tmp_path), "--prompts", str(tmp_path / "p.txt"), "--clip-model", str(tiny_clip_dir)])
    assert code == 2 and "not a text-to-image student" in capsys.readouterr().err


@pytest.mark.parametrize("grey", [False, True])
def test_clip_preprocessing_equals_the_clip_image_processor(tmp_path, grey):
    """The wrapper's tensor steps against transformers' CLIPImageProcessor given a PIL image.

    Tolerance: the processor resizes a uint8 image with PIL, which rounds the horizontal pass to
    uint8 (+-0.5 level), carries that through the vertical bicubic taps (absolute sum < 1.2) and
    rounds again (+-0.5 level): at most about 1.1 levels of 255 per pixel; the tensor path does not
    round. So pixel values may differ by 1.25 levels (times rescale / std after normalising), and on
    average by much less than one. Random noise is the worst case (largest overshoots)."""
    import numpy as np
    from PIL import Image
    from transformers import CLIPImageProcessor

    from onestep.clip import ClipPreprocessing

    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    CLIPImageProcessor(size={"shortest_edge": 24}, crop_size={"height": 20, "width": 22}, image_mean=mean, image_std=std).save_pretrained(tmp_path)
    processors = [CLIPImageProcessor.from_pretrained(tmp_path)]
    try:  # transformers >= 5: CLIPImageProcessor runs on torchvision; the PIL backend is its own class
        from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

        processors.append(CLIPImageProcessorPil.from_pretrained(tmp_path))
    except ImportError:
        pass
    ours = ClipPreprocessing.from_folder(tmp_path, image_size=999)  # the config wins over the model's size
    assert (ours.size, ours.crop, ours.resample, ours.mean, ours.std) == (24, (20, 22), 3, mean, std)
    levels = torch.tensor(std).view(1, 3, 1, 1) * 255  # one uint8 level after rescale and normalise, per channel
    rng = np.random.default_rng(0)
    for h, w in [(45, 37), (13, 17)]:  # down- and upscaling, neither square
        arr = rng.integers(0, 256, (h, w) if grey else (h, w, 3), dtype=np.uint8)
        u8 = torch.from_numpy(arr).unsqueeze(0) if grey else torch.from_numpy(arr).permute(2, 0, 1)
        mine = ours(u8[None])
        assert mine.shape == (1, 3, 20, 22)
        # floats in [-1, 1] holding the same pixels give the same input
        torch.testing.assert_close(ours(u8[None].float() / 127.5 - 1), mine, rtol=0, atol=1e-4)
        for proc in processors:
            ref = proc(images=Image.fromarray(arr), return_tensors="pt")["pixel_values"]
            diff = (mine - ref).abs() * levels
            assert diff.max() < 1.25 and diff.mean() < 0.5, (type(proc).__name__, h, w, diff.max(), diff.mean())
