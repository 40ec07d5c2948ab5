"""The Gradio page: inputs on the left, the student's images (and the teacher's) on the right; for audio
(mel-spectrogram) students also a player with the first sample's sound; for super-resolution students an
image upload on the left and the inputs (nearest, bicubic) above the outputs; video clips as frame strips.

Changing an input regenerates the student at once (one step is instant); *Generate* also runs
the teacher for the side-by-side comparison. The API endpoint ``/generate`` is what the
button calls, so ``gradio_client`` sees exactly what the page sees.
"""

from __future__ import annotations

import importlib.util
import os
import random
from pathlib import Path
from typing import Any

from onestep.errors import OnestepError

from .gallery import input_items, result_items
from .model import DemoModel
from .request import MAX_SEED, MAX_TEACHER_STEPS, DemoRequest, DemoResult

# Tiny images (16x16 digits) are shown at their own resolution and scaled up without blurring.
CSS = """
#student-gallery img, #teacher-gallery img { image-rendering: pixelated; }
#demo-status { min-height: 3em; }
"""
ALL_CLASSES = "all"
LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")


def _gradio():
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    try:
        import gradio as gr
    except ImportError as e:
        raise OnestepError("the demo needs gradio: pip install 'onestep[demo]'") from e
    return gr


def format_status(result: DemoResult) -> str:
    """The latency line shown above the galleries (Markdown)."""
    lat = result.latency()
    s = lat["student"]
    n = lat["num_images"]
    unit = "point" if result.student_samples.ndim == 2 else "image"
    line = (
        f"**student**, {s['steps']} step{'s' if s['steps'] > 1 else ''}: **{s['ms_per_image']:.2f} ms per {unit}** "
        f"({n} {unit}{'s' if n > 1 else ''} in {s['ms_total']:.1f} ms)"
    )
    if lat["teacher"] is not None:
        t = lat["teacher"]
        line += (
            f"  \n**teacher**, {t['steps']} DDIM steps, CFG {t['guidance_scale']:g}: **{t['ms_per_image']:.2f} ms per {unit}** "
            f"({t['ms_total']:.1f} ms), the student is **{lat['speedup']:.0f}x** faster"
        )
    device = "GPU (cuda)" if lat["gpu"] else "CPU, no GPU"
    return f"{line}  \nmeasured around the sampler call on {device}"


def _class_choices(model: DemoModel) -> list[tuple[str, str]]:
    return [(ALL_CLASSES, ALL_CLASSES)] + [(str(c), str(c)) for c in range(model.num_classes)]


def _count_label(model: DemoModel) -> str:
    return "number of points (one scatter picture)" if model.is_points else "number of images"


def _default_count(model: DemoModel) -> int:
    return 1000 if model.is_points else 8


def _image_label(model: DemoModel) -> str:
    if model.kind != "image":
        return "low-res image"
    h, w = model.lowres_size
    empty = "; empty: held-out test digits" if model.has_example_images else ""
    return f"low-res image (resized to {w}x{h}{empty})"


def build_app(model: DemoModel, allow_load: bool = True):
    """Build the ``gradio.Blocks`` page for ``model`` (call ``.launch()`` on it, or use :func:`launch_demo`).

    ``allow_load`` adds the "student folder" field that loads another student folder from this
    machine's disk; leave it off when the page is reachable from other machines.
    """
    gr = _gradio()

    def request(label, prompt, negative, alpha, seed, steps, count, teacher_steps, image, with_teacher: bool) -> DemoRequest:
        return DemoRequest(
            label=None if label in (None, "", ALL_CLASSES) else int(label),
            prompt=prompt or "",
            negative_prompt=negative or "",
            nasa_alpha=float(alpha or 0.0),
            seed=None if seed is None else int(seed),
            steps=None if steps is None else int(steps),
            num_images=None if count is None else int(count),
            teacher_steps=int(teacher_steps or 1),
            with_teacher=with_teacher,
            image=image if model.kind == "image" else None,  # a hidden upload field keeps its last picture
        )

    def generate(with_teacher: bool):
        # A generator: the student's images reach the page before the (much slower) teacher runs.
        def fn(label, prompt, negative, alpha, seed, steps, count, teacher_steps, image=None):
            req = request(label, prompt, negative, alpha, seed, steps, count, teacher_steps, image, with_teacher)
            try:
                result = model.run_student(req)
                student = result_items(result, title=f"{len(result.timesteps)}-step student")
                inputs = input_items(result) or None
                if model.teacher is None or not with_teacher:
                    yield format_status(result), student, None, result.latency(), inputs
                    return
                pending = f"  \n**teacher**: sampling {req.teacher_steps} DDIM steps for the same seeds ..."
                yield format_status(result) + pending, student, None, result.latency(), inputs
                model.run_teacher(req, result)
            except OnestepError as e:
                raise gr.Error(str(e), print_exception=False) from e
            teacher = result_items(result, teacher=True, title=f"teacher, {result.teacher_steps} steps")
            yield format_status(result), student, teacher, result.latency(), inputs

        return fn

    def sound(label, prompt, negative, alpha, seed, steps, count, teacher_steps, image=None):
        # Audio students: play the first sample (same seed and class as the gallery's first picture) through
        # the toy vocoder, or an AudioLDM student's own. Re-sampling one sample is cheaper than keeping results
        # between events.
        if model.audio is None:
            return gr.Audio(value=None, visible=False)
        req = request(label, prompt, negative, alpha, seed, steps, 1, teacher_steps, image, False)
        try:
            result = model.run_student(req)
        except OnestepError:
            return gr.Audio(value=None, visible=True)  # the generate event shows the error
        return gr.Audio(value=model.sound_of(result.student_samples), visible=True)

    def load_student(path: str):
        try:
            model.swap_student(path)
        except OnestepError as e:
            raise gr.Error(f"{e} (still serving {model.student.path})", print_exception=False) from e
        return (
            model.describe(),
            gr.Radio(choices=_class_choices(model), value=ALL_CLASSES, visible=model.kind == "class"),
            gr.Textbox(visible=model.kind == "text"),
            gr.Textbox(visible=model.kind == "text"),
            gr.Slider(visible=model.kind == "text"),
            gr.Image(value=None, visible=model.kind == "image", label=_image_label(model)),
            gr.Slider(maximum=model.max_steps, value=1),
            gr.Slider(maximum=model.max_count, value=_default_count(model), label=_count_label(model)),
            f"loaded {model.student.path}",
            None,
            None,
            None,
            gr.Gallery(value=None, visible=model.kind == "image"),
        )

    has_teacher = model.teacher is not None
    # delete_cache: Gradio keeps every image it served under /tmp/gradio; drop those over an hour old, hourly
    with gr.Blocks(title="onestep demo", analytics_enabled=False, delete_cache=(3600, 3600)) as app:
        gr.Markdown("# onestep: one-step sampling")
        header = gr.Markdown(model.describe(), elem_id="demo-header")
        with gr.Row():
            with gr.Column(scale=1, min_width=300):
                label = gr.Radio(
                    _class_choices(model), value=ALL_CLASSES, label="class", visible=model.kind == "class", elem_id="class-picker"
                )
                prompt = gr.Textbox(label="prompt", lines=2, visible=model.kind == "text", elem_id="prompt")
                negative = gr.Textbox(label="negative prompt", visible=model.kind == "text", elem_id="negative-prompt")
                alpha = gr.Slider(
                    0.0, 1.0, value=0.0, step=0.05, label="NASA alpha (negative prompt strength; 0 turns it off)",
                    visible=model.kind == "text", elem_id="nasa-alpha",
                )
                image = gr.Image(
                    label=_image_label(model), type="numpy", sources=["upload", "clipboard"], visible=model.kind == "image",
                    elem_id="lowres-image", height=160,
                )
                with gr.Row():
                    seed = gr.Number(value=0, precision=0, label="seed (image i uses seed + i)", elem_id="seed", scale=3)
                    randomize = gr.Button("random", elem_id="random-seed", scale=1)
                steps = gr.Slider(1, model.max_steps, value=1, step=1, label="student steps", elem_id="steps")
                count = gr.Slider(1, model.max_count, value=_default_count(model), step=1, label=_count_label(model), elem_id="count")
                teacher_steps = gr.Slider(
                    1, MAX_TEACHER_STEPS, value=50, step=1, label="teacher DDIM steps", visible=has_teacher, elem_id="teacher-steps"
                )
                button = gr.Button("Generate", variant="primary", elem_id="generate")
                gr.Markdown(
                    "Changing an input redraws the student at once"
                    + ("; **Generate** also runs the teacher for the comparison." if has_teacher else ".")
                )
                with gr.Accordion("student folder", open=False, visible=allow_load):
                    folder = gr.Textbox(value=str(model.student.path), label="student folder", elem_id="student-folder")
                    load = gr.Button("Load student", elem_id="load-student")
            with gr.Column(scale=2):
                status = gr.Markdown(elem_id="demo-status")
                inputs_gallery = gr.Gallery(
                    label="input: low-res (nearest) and bicubic upsampling", columns=4, object_fit="contain", format="png",
                    elem_id="input-gallery", visible=model.kind == "image", height="auto",
                )
                student_gallery = gr.Gallery(
                    label="student", columns=4, object_fit="contain", format="png", elem_id="student-gallery", height="auto"
                )
                teacher_gallery = gr.Gallery(
                    label="teacher (same seeds and classes)", columns=4, object_fit="contain", format="png",
                    elem_id="teacher-gallery", visible=has_teacher, height="auto",
                )
                student_audio = gr.Audio(
                    label="student, first sample (Griffin-Lim vocoder)", type="numpy", interactive=False,
                    visible=model.audio is not None, elem_id="student-audio", format="wav",
                )
                with gr.Accordion("latency (JSON)", open=False):
                    latency = gr.JSON(elem_id="latency")

        inputs = [label, prompt, negative, alpha, seed, steps, count, teacher_steps, image]
        outputs = [status, student_gallery, teacher_gallery, latency, inputs_gallery]
        button.click(generate(True), inputs, outputs, api_name="generate", trigger_mode="always_last").then(
            sound, inputs, student_audio, api_visibility="private", show_progress="hidden"
        )
        gr.on(
            [label.change, seed.change, steps.release, count.release, prompt.change, negative.change, alpha.release, image.change],
            generate(False), inputs, outputs, api_visibility="private", trigger_mode="always_last", show_progress="minimal",
        ).then(sound, inputs, student_audio, api_visibility="private", show_progress="hidden")
        randomize.click(lambda: random.randint(0, MAX_SEED), None, seed, api_visibility="private")
        if allow_load:
            load.click(
                load_student, folder,
                [header, label, prompt, negative, alpha, image, steps, count, status, student_gallery, teacher_gallery, latency, inputs_gallery],
                api_name="load_student",
            ).then(lambda: gr.Audio(value=None, visible=model.audio is not None), None, student_audio, api_visibility="private")
    return app


def launch_demo(
    student: str | Path,
    teacher: str | Path | None = None,
    host: str = "127.0.0.1",
    port: int | None = 7860,
    share: bool = False,
    block: bool = True,
) -> Any:
    """Load the models once, build the page and serve it on ``host:port`` (127.0.0.1: this machine only).

    With ``block=False`` the server runs in a thread and the ``gradio.Blocks`` app is returned.
    """
    if importlib.util.find_spec("gradio") is None:  # say so before spending time on loading the models
        raise OnestepError("the demo needs gradio: pip install 'onestep[demo]'")
    model = DemoModel.load(student, teacher)
    # Only a page served to this machine alone may open other folders on its disk.
    app = build_app(model, allow_load=host in LOCAL_HOSTS and not share)
    try:
        app.launch(
            server_name=host, server_port=port, share=share, show_error=True, ssr_mode=False, css=CSS,
            prevent_thread_lock=not block, footer_links=["api"],
        )
    except OSError as e:
        raise OnestepError(f"cannot serve the demo on {host}:{port} ({e}); pick another --port") from e
    return app
