"""The Gradio demo: its sampling (no server), the launched app through gradio_client, and a real
headless Chromium clicking Generate. The app runs as its own process and is stopped by its PID."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from onestep.demo import DemoInputError, DemoModel, DemoRequest
from onestep.demo.gallery import gallery_items
from onestep.demo.model import MAX_IMAGES
from onestep.export import export_student, load_student
from onestep.samplers.student import sample_student_from_seeds, teacher_sample_from_seeds
from onestep.teachers import load_teacher
from onestep.viz import to_uint8


def _require(module: str):
    """The demo's test dependencies are in the test extra: CI must have them, a developer may not."""
    if os.environ.get("CI"):
        return __import__(module)
    return pytest.importorskip(module)


def perturbed_student(folder, teacher, method: str, timestep: int, seed: int):
    """A one-step student whose generator is a copy of ``teacher`` with small random changes."""
    net = teacher.new_backbone()
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.01 * torch.randn_like(p))
    return export_student(folder, net, teacher, method=method, timesteps=[timestep])


@pytest.fixture(scope="module")
def demo_student(tmp_path_factory, tiny_teacher_dir):
    """A one-step student of the tiny teacher (its generator is a perturbed copy of the teacher)."""
    return perturbed_student(tmp_path_factory.mktemp("demo") / "student", load_teacher(tiny_teacher_dir), "dmd2", 800, seed=1)


@pytest.fixture(scope="module")
def gmm_student(tmp_path_factory):
    from onestep.teachers.gmm import MLPDenoiser

    return export_student(tmp_path_factory.mktemp("demo_gmm") / "student", MLPDenoiser(), load_teacher("gmm-ring8"), "dmd2", [999])


# The sampling behind the page (no server) -------------------------------------------------------


def test_demo_samples_through_the_same_samplers_as_onestep_sample(demo_student, tiny_teacher_dir):
    model = DemoModel.load(demo_student, tiny_teacher_dir, device="cpu", warm_up=False)
    result = model.run(DemoRequest(label=3, seed=5, num_images=3, steps=1, teacher_steps=4))
    student, teacher = load_student(demo_student), load_teacher(tiny_teacher_dir)
    ref, _ = sample_student_from_seeds(student.generator, student, [800], [5, 6, 7], [3, 3, 3])
    torch.testing.assert_close(result.student_samples, ref, rtol=0, atol=0)
    ref_t = teacher_sample_from_seeds(teacher.denoiser(), teacher, [5, 6, 7], [3, 3, 3], 4, teacher.guidance_scale)
    torch.testing.assert_close(result.teacher_samples, ref_t, rtol=0, atol=0)
    lat = result.latency()
    assert lat["student"]["ms_per_image"] > 0 and lat["teacher"]["ms_per_image"] > 0 and lat["speedup"] > 0
    assert lat["gpu"] is False and lat["num_images"] == 3 and lat["teacher"]["steps"] == 4
    # "all" classes cycles 0, 1, 2, ... like `onestep sample`; two steps re-noise at evenly spaced labels.
    two = model.run(DemoRequest(label=None, seed=0, num_images=4, steps=2, with_teacher=False))
    assert two.labels == [0, 1, 2, 3] and two.timesteps == [800, 400] and two.teacher_samples is None
    items = gallery_items(result.student_samples, result.seeds, result.labels)
    assert [c for _, c in items] == ["class 3, seed 5", "class 3, seed 6", "class 3, seed 7"]
    np.testing.assert_array_equal(items[0][0], to_uint8(ref)[0, ..., 0])


@pytest.mark.parametrize(
    "req, message",
    [
        (dict(steps=0), r"steps must lie in \[1, 4\]"),
        (dict(steps=5), r"steps must lie in \[1, 4\]"),
        (dict(num_images=MAX_IMAGES + 1), r"number of images must lie in \[1, 16\]"),
        (dict(num_images=0), "number of images"),
        (dict(seed=-1), "seed must be a whole number"),
        (dict(label=10), r"class must lie in \[0, 9\]"),
        (dict(teacher_steps=0), "teacher steps"),
    ],
)
def test_demo_refuses_bad_requests_with_a_message(demo_student, tiny_teacher_dir, req, message):
    model = DemoModel(load_student(demo_student), load_teacher(tiny_teacher_dir), device="cpu")
    with pytest.raises(DemoInputError, match=message):
        model.run(DemoRequest(**req))


@pytest.fixture(scope="module")
def text_student(tmp_path_factory):
    from t2i_fixtures import make_tiny_sd, write_prompts

    from conftest import tiny_config
    from onestep.trainers import make_trainer

    root = tmp_path_factory.mktemp("text_student")
    sd = make_tiny_sd(root / "sd")
    cfg = tiny_config("dmd2", root, sd, prompts=str(write_prompts(root / "prompts.txt")), generator_timesteps=[999], batch_size=2, max_steps=1)
    return make_trainer(cfg).train()


def test_text_student_samples_the_prompt_with_nasa_and_checks_its_inputs(text_student, monkeypatch, tmp_path):
    from onestep.samplers.student import sample_text_student

    monkeypatch.setenv("ONESTEP_CACHE", str(tmp_path))
    model = DemoModel.load(text_student, device="cpu")
    assert model.kind == "text"
    with pytest.raises(DemoInputError, match="prompt is empty"):
        model.check(DemoRequest(prompt="   "))
    with pytest.raises(DemoInputError, match="NASA alpha"):
        model.check(DemoRequest(prompt="a cat", nasa_alpha=2.0))
    with pytest.raises(DemoInputError, match="set NASA alpha above 0"):
        model.run(DemoRequest(prompt="a cat", negative_prompt="blurry", nasa_alpha=0.0))
    # The page's images are the sampler's: same prompt, seeds, negative prompt and alpha.
    result = model.run(DemoRequest(prompt="a red cube", seed=3, num_images=2, negative_prompt="blurry", nasa_alpha=0.3))
    expected = sample_text_student(model.student, ["a red cube"], [3, 4], 1, "blurry", 0.3)
    assert result.student_samples.shape == expected.shape and expected.shape[1] == 3
    torch.testing.assert_close(result.student_samples, expected, rtol=0, atol=0)
    assert result.student_seconds > 0 and result.labels is None
    plain = model.run(DemoRequest(prompt="a red cube", seed=3, num_images=2))
    assert (plain.student_samples - expected).abs().max() > 0  # NASA changed the image
    (img, caption), _ = gallery_items(result.student_samples, result.seeds, None)
    assert img.shape[-1] == 3 and img.dtype == np.uint8 and caption == "seed 3"


def test_2d_student_gives_one_scatter_picture_and_a_mismatched_teacher_is_refused(gmm_student, tiny_teacher_dir):
    model = DemoModel.load(gmm_student, device="cpu", warm_up=False)
    assert model.is_points and model.kind == "none" and model.max_count > MAX_IMAGES
    result = model.run(DemoRequest(seed=0, num_images=300))
    assert result.student_samples.shape == (300, 2) and result.labels is None
    (pic, caption), = gallery_items(result.student_samples, result.seeds, None)
    assert pic.ndim == 3 and pic.shape[2] == 3 and pic.std() > 0 and caption == "300 points, seeds 0-299"
    with pytest.raises(DemoInputError, match="not class-conditional"):
        model.check(DemoRequest(label=1))
    with pytest.raises(DemoInputError, match="shape"):
        DemoModel(load_student(gmm_student), load_teacher(tiny_teacher_dir))


@pytest.fixture(scope="module")
def sr_student(tmp_path_factory):
    """A one-step student of the built-in digits-sr teacher (a perturbed copy of the teacher)."""
    return perturbed_student(tmp_path_factory.mktemp("demo_sr") / "student", load_teacher("digits-sr"), "tadsr", 600, seed=2)


def test_sr_student_upscales_uploads_and_held_out_digits_beside_its_teacher(sr_student):
    import dataclasses

    import torch.nn.functional as F

    from onestep.demo.gallery import input_items, result_items
    from onestep.samplers.student import super_resolve
    from onestep.teachers.sr import digits_sr_split

    model = DemoModel.load(sr_student, "digits-sr", device="cpu", warm_up=False)
    assert model.kind == "image" and model.lowres_size == (4, 4) and model.has_example_images
    assert "super-resolution (x4, low-res 4x4 inputs)" in model.describe()
    # No upload: the held-out digits, degraded as training degraded them; sample i upscales digit i.
    result = model.run(DemoRequest(seed=3, num_images=3, teacher_steps=2))
    lowres = F.interpolate(digits_sr_split("test")[:3], scale_factor=0.25, mode="area")
    torch.testing.assert_close(result.lowres, lowres, rtol=0, atol=0)
    torch.testing.assert_close(result.student_samples, super_resolve(model.student, lowres, [3, 4, 5]), rtol=0, atol=0)
    t = model.teacher
    spec = dataclasses.replace(t, conditioning=t.conditioning.with_images(t.conditioning.from_lowres(lowres, (16, 16))["image"]))
    ref_t = teacher_sample_from_seeds(t.denoiser(), spec, [3, 4, 5], [0, 1, 2], 2, t.guidance_scale)
    torch.testing.assert_close(result.teacher_samples, ref_t, rtol=0, atol=0)
    assert [c for _, c in result_items(result)] == ["input 0, seed 3", "input 1, seed 4", "input 2, seed 5"]
    items = input_items(result)
    assert [c for _, c in items[:2]] == ["input 0, low-res 4x4", "input 0, bicubic"] and len(items) == 6
    assert all(img.shape == (16, 16) and img.dtype == np.uint8 for img, _ in items)
    # An upload (RGB, any size) becomes one grey 4x4 input: the luma, area-averaged; every sample upscales it.
    rgb = np.random.default_rng(0).integers(0, 256, (32, 24, 3), dtype=np.uint8)
    up = model.run(DemoRequest(seed=0, num_images=2, image=rgb, with_teacher=False))
    luma = torch.from_numpy(rgb.astype(np.float32) / 255 @ np.array([0.299, 0.587, 0.114], dtype=np.float32))
    expected = F.interpolate((luma * 2 - 1)[None, None], size=(4, 4), mode="area")
    torch.testing.assert_close(up.lowres, expected, rtol=0, atol=1e-6)
    torch.testing.assert_close(up.student_samples, super_resolve(model.student, expected, [0, 1]), rtol=0, atol=1e-6)
    assert (up.student_samples[0] - up.student_samples[1]).abs().max() > 0  # two seeds, one input
    assert len(input_items(up)) == 2
    with pytest.raises(DemoInputError, match="grey or RGB picture"):
        model.run(DemoRequest(image=np.zeros((4, 4, 2), dtype=np.uint8)))


def test_image_upload_is_refused_for_other_students_and_video_clips_show_as_strips(demo_student):
    model = DemoModel(load_student(demo_student), device="cpu")
    with pytest.raises(DemoInputError, match="does not take a low-res image"):
        model.check(DemoRequest(image=np.zeros((4, 4), dtype=np.uint8)))
    clips = torch.rand(2, 1, 4, 16, 16) * 2 - 1
    (strip, caption), _ = gallery_items(clips, [7, 8], [3, 4])
    assert strip.shape == (16, 4 * 17 - 1) and caption == "class 3, seed 7"
    np.testing.assert_array_equal(strip[:, 17:33], to_uint8(clips[0, :, 1][None])[0, ..., 0])
    assert (strip[:, 16] == 255).all()  # one white column between frames


def test_swap_student_keeps_the_current_one_on_error(demo_student, tmp_path):
    from onestep.errors import StudentFormatError

    model = DemoModel(load_student(demo_student), device="cpu")
    with pytest.raises(StudentFormatError, match="onestep.json is missing"):
        model.swap_student(tmp_path)
    with pytest.raises(DemoInputError, match="folder is empty"):
        model.swap_student(" ")
    assert model.student.path == Path(demo_student)


def test_page_opens_other_folders_only_when_served_to_this_machine(gmm_student):
    _require("gradio")
    from onestep.demo.app import build_app

    model = DemoModel(load_student(gmm_student), device="cpu")
    endpoints = lambda app: {fn.api_name for fn in app.fns.values() if fn.api_visibility == "public"}  # noqa: E731
    assert endpoints(build_app(model)) == {"generate", "load_student"}
    assert endpoints(build_app(model, allow_load=False)) == {"generate"}


def test_cli_demo_with_a_folder_that_is_not_a_student_exits_2(capsys, tmp_path):
    from onestep.cli import main

    assert main(["demo", "--student", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "onestep.json is missing" in err and len(err.strip().splitlines()) == 1


# The launched app -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def demo_server(demo_student, tiny_teacher_dir, tmp_path_factory):
    """``onestep demo`` as its own process on a free localhost port; stopped by its PID at the end."""
    _require("gradio")
    from demo_testing import start_demo, stop_demo

    log = tmp_path_factory.mktemp("demo_server") / "demo.log"
    proc, url = start_demo(demo_student, teacher=tiny_teacher_dir, log=log)
    try:
        yield proc, url
    finally:
        stop_demo(proc)
        assert proc.poll() is not None


def _image_size(item) -> tuple[int, int]:
    from PIL import Image

    path = item["image"] if isinstance(item["image"], str) else item["image"]["path"]
    with Image.open(path) as im:
        return im.size


@pytest.mark.slow  # the app's process takes 15-30 s to import torch, diffusers and gradio
def test_client_generate_returns_images_and_latency(demo_server, demo_student):
    client_mod = _require("gradio_client")
    proc, url = demo_server
    client = client_mod.Client(url, verbose=False)
    status, student, teacher, latency, inputs = client.predict("3", "", "", 0.0, 5, 1, 3, 4, None, api_name="/generate")
    assert len(student) == 3 and len(teacher) == 3 and not inputs  # a class student has no low-res inputs to show
    assert [_image_size(i) for i in student + teacher] == [(16, 16)] * 6
    assert [i["caption"] for i in student] == ["class 3, seed 5", "class 3, seed 6", "class 3, seed 7"]
    assert latency["student"]["ms_per_image"] > 0 and latency["teacher"]["ms_per_image"] > 0
    assert latency["gpu"] is False and latency["student"]["timesteps"] == [800]
    assert "ms per image" in status and "faster" in status
    # The pixels are the samplers' own output (one inference path).
    from PIL import Image

    s = load_student(demo_student)
    ref, _ = sample_student_from_seeds(s.generator, s, [800], [5, 6, 7], [3, 3, 3])
    path = student[0]["image"] if isinstance(student[0]["image"], str) else student[0]["image"]["path"]
    np.testing.assert_array_equal(np.asarray(Image.open(path).convert("L")), to_uint8(ref)[0, ..., 0])


@pytest.mark.slow  # the app's process takes 15-30 s to import torch, diffusers and gradio
def test_client_bad_input_returns_a_message_and_the_app_keeps_serving(demo_server, tmp_path):
    client_mod = _require("gradio_client")
    from gradio_client.exceptions import AppError

    proc, url = demo_server
    client = client_mod.Client(url, verbose=False)
    for args, message in [
        (("3", "", "", 0.0, 0, 9, 2, 4, None), "greater than maximum value 4"),  # steps out of range
        (("3", "", "", 0.0, 0, 1, 99, 4, None), "greater than maximum value 16"),  # too many images
        (("3", "", "", 0.0, -3, 1, 2, 4, None), "seed must be a whole number"),
    ]:
        with pytest.raises(AppError, match=message):
            client.predict(*args, api_name="/generate")
    with pytest.raises(AppError, match="onestep.json is missing.*still serving"):
        client.predict(str(tmp_path), api_name="/load_student")
    assert proc.poll() is None
    _, student, _, latency, _ = client.predict("all", "", "", 0.0, 0, 1, 2, 1, None, api_name="/generate")
    assert len(student) == 2 and latency["student"]["ms_total"] > 0


@pytest.mark.slow  # the app's process takes 15-30 s to import torch, diffusers and gradio
def test_client_loads_another_student_and_its_step_range(demo_server, demo_student, tiny_teacher_dir, tmp_path):
    client_mod = _require("gradio_client")
    from gradio_client.exceptions import AppError

    teacher = load_teacher(tiny_teacher_dir)
    two_step = export_student(tmp_path / "two_step", teacher.new_backbone(), teacher, "dmd2", [800, 400])
    _, url = demo_server
    client = client_mod.Client(url, verbose=False)
    try:
        header, *_ = client.predict(str(two_step), api_name="/load_student")
        assert "2 steps [800, 400]" in header
        _, student, _, latency, _ = client.predict("1", "", "", 0.0, 0, 2, 2, 1, None, api_name="/generate")
        assert len(student) == 2 and latency["student"]["timesteps"] == [800, 400]
        with pytest.raises(AppError, match="greater than maximum value 2"):  # a 2-step student: at most 2 steps
            client.predict("1", "", "", 0.0, 0, 3, 2, 1, None, api_name="/generate")
    finally:
        client.predict(str(demo_student), api_name="/load_student")


@pytest.mark.slow  # the app's process takes 15-30 s to import torch, diffusers and gradio
def test_browser_sets_a_class_clicks_generate_and_sees_images(demo_server, tmp_path):
    _require("selenium")
    import demo_testing as testing

    if testing.find_chromium() is None:
        if os.environ.get("CI"):
            pytest.fail("Chromium and chromedriver are missing (.ci/run installs them with apt-get)")
        pytest.skip("needs Debian's chromium and chromium-driver")
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    _, url = demo_server
    driver = testing.headless_chromium(tmp_path / "profile")
    shot = tmp_path / "demo.png"
    try:
        driver.get(url)
        testing.wait_for(driver, "#generate")
        driver.find_element(By.CSS_SELECTOR, '#class-picker [data-testid="7-radio-label"]').click()
        driver.find_element(By.CSS_SELECTOR, "#generate").click()

        def shows(gallery: str, text: str, n: int = 8) -> bool:
            """The gallery shows ``n`` loaded images and a caption holding ``text``."""
            return driver.execute_script(
                "const g = document.querySelector(arguments[0]);"
                "const ok = Array.from(g.querySelectorAll('img')).filter(i => i.complete && i.naturalWidth > 0);"
                "return ok.length === arguments[2] && g.innerText.includes(arguments[1]);",
                gallery, text, n,
            )

        wait = WebDriverWait(driver, 60)
        wait.until(lambda d: shows("#student-gallery", "class 7, seed 7"))
        wait.until(lambda d: shows("#teacher-gallery", "class 7, seed 0"))
        assert "ms per image" in driver.find_element(By.CSS_SELECTOR, "#demo-status").text
        driver.save_screenshot(str(shot))
        # A bad seed: a message in the page, and the page keeps working.
        seed = driver.find_element(By.CSS_SELECTOR, "#seed input")
        seed.send_keys(Keys.CONTROL, "a")
        seed.send_keys("-1", Keys.ENTER)
        wait.until(lambda d: d.find_elements(By.XPATH, "//*[contains(text(), 'seed must be a whole number')]"))
        seed.send_keys(Keys.CONTROL, "a")
        seed.send_keys("40", Keys.ENTER)
        wait.until(lambda d: shows("#student-gallery", "class 7, seed 47"))
    finally:
        if not shot.exists():
            driver.save_screenshot(str(shot))
        driver.quit()
        if os.environ.get("ONESTEP_TEST_ARTIFACTS") and shot.exists():
            out = Path(os.environ["ONESTEP_TEST_ARTIFACTS"])
            out.mkdir(parents=True, exist_ok=True)
            shutil.copy(shot, out / "demo_browser.png")
    from PIL import Image

    with Image.open(shot) as im:
        assert im.size[0] > 800 and im.getextrema() != ((255, 255), (255, 255), (255, 255))
