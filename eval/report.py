"""What every ``onestep eval`` command leaves behind: ``metrics.json``, a short table, and with
``--report`` a Markdown report with its plots (matplotlib PNG)."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch


def student_info(student) -> dict[str, Any]:
    """The student's ``onestep.json`` fields an evaluation records: path, method, teacher, timesteps."""
    meta = student.meta
    return {
        "path": str(student.path),
        "method": meta.get("method"),
        "teacher": meta.get("teacher"),
        "timesteps": list(student.timesteps),
        "model_class": meta.get("model_class"),
    }


def write_metrics(out: Path, record: dict[str, Any]) -> Path:
    """Write ``out/metrics.json`` (with the onestep version and the date added)."""
    import onestep

    out.mkdir(parents=True, exist_ok=True)
    record = {"onestep_version": onestep.__version__, "date": time.strftime("%Y-%m-%d %H:%M:%S"), **record}
    path = out / "metrics.json"
    path.write_text(json.dumps(record, indent=2, default=str) + "\n")
    return path


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4g}" if abs(v) < 1e4 else f"{v:.0f}"
    return str(v)


def format_table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    """A plain fixed-width table of ``rows`` (dicts) over ``columns``."""
    cells = [[c for c in columns]] + [[_fmt(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(columns))]
    lines = ["  ".join(v.rjust(w) for v, w in zip(row, widths)) for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def markdown_table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    out = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    out += ["| " + " | ".join(_fmt(r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(out)


def plot_curve(points: list[dict[str, Any]], metrics: list[str], path: Path, title: str = "") -> Path:
    """Metric(s) against training step, one panel per metric; ``points`` hold ``step`` and the metrics."""
    from onestep.viz import _plt, _save

    plt = _plt()
    metrics = [m for m in metrics if any(p.get(m) is not None for p in points)]
    fig, axes = plt.subplots(1, max(1, len(metrics)), figsize=(4.2 * max(1, len(metrics)), 3.4), squeeze=False)
    for ax, m in zip(axes[0], metrics):
        pts = sorted((p["step"], p[m]) for p in points if p.get(m) is not None)
        ax.plot([s for s, _ in pts], [v for _, v in pts], marker="o")
        ax.set_xlabel("training step")
        ax.set_ylabel(m)
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    path.parent.mkdir(parents=True, exist_ok=True)
    return _save(fig, path, dpi=100)


def save_grid(images: torch.Tensor, path: Path, title: str = "", nrow: int = 10) -> Path:
    from onestep.viz import save_samples_picture

    return save_samples_picture(images, path, title=title, nrow=nrow)


def write_report(out: Path, title: str, record: dict[str, Any], table: str, pictures: list[tuple[str, str]]) -> Path:
    """``out/report.md``: a heading, the Markdown table, the pictures (caption, file name in ``out``)
    and the settings that produced the numbers."""
    settings = {k: v for k, v in record.items() if k not in ("points", "metrics", "rows")}
    lines = [f"# {title}", "", table, ""]
    for caption, name in pictures:
        lines += [f"![{caption}]({name})", "", f"*{caption}*", ""]
    lines += ["## Settings", "", "```json", json.dumps(settings, indent=2, default=str), "```", ""]
    path = out / "report.md"
    path.write_text("\n".join(lines))
    return path
