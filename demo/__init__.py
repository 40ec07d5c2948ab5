"""The Gradio demo for one-step sampling: ``onestep demo --student DIR [--teacher T]``.

:mod:`onestep.demo.model` holds what runs (no gradio needed), :mod:`onestep.demo.request` what a
request asks for and the checks on it; :mod:`onestep.demo.app` builds the page. The demo samples through :mod:`onestep.samplers`, like ``onestep sample``.
"""

from .model import DemoModel
from .request import DemoInputError, DemoRequest, DemoResult

__all__ = ["DemoInputError", "DemoModel", "DemoRequest", "DemoResult", "build_app", "launch_demo"]


def __getattr__(name: str):
    # The page needs gradio; import it only when asked for.
    if name in ("build_app", "launch_demo"):
        from . import app

        return getattr(app, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
