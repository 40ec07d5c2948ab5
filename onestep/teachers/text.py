"""Text for text-to-image teachers: prompt files (text, JSONL, CSV)."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

from ..errors import OnestepError

CAPTION_COLUMNS = ("caption", "prompt", "text")


def read_prompts(path: str | Path, column: str | None = None) -> list[str]:
    """Prompts from a file: text (one prompt a line, blank lines skipped), JSONL (one object a
    line with a ``caption``/``prompt``/``text`` field, or a JSON string) or CSV (a header with a
    ``caption`` column, or ``column``)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise OnestepError(f"prompt file {path} does not exist")
    text = path.read_text(encoding="utf-8")
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".json"):
        prompts = [_caption_of(item, column, f"{path}:{n}") for n, item in jsonl_records(path, text)]
    elif suffix == ".csv":
        rows = list(csv.DictReader(text.splitlines()))
        if not rows:
            raise OnestepError(f"{path}: no rows under a header")
        col = column or next((c for c in CAPTION_COLUMNS if c in rows[0]), None)
        if col is None or col not in rows[0]:
            raise OnestepError(f"{path}: no {column or 'caption'} column (columns: {', '.join(rows[0])}); pass --caption-column")
        prompts = [r[col] for r in rows]
    else:
        prompts = [line.strip() for line in text.splitlines() if line.strip()]
    if not prompts:
        raise OnestepError(f"{path}: no prompts")
    return prompts


def jsonl_records(path: Path, text: str | None = None) -> list[tuple[int, Any]]:
    """``(line number, parsed object)`` for each non-blank line of a JSONL file; a line that is not
    JSON is an error naming the file and line."""
    text = path.read_text(encoding="utf-8") if text is None else text
    records = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            records.append((n, json.loads(line)))
        except json.JSONDecodeError as e:
            raise OnestepError(f"{path}:{n}: not JSON ({e.msg})") from e
    return records


def _caption_of(item: Any, column: str | None, where: str) -> str:
    if isinstance(item, str):
        return item
    if isinstance(item, dict):
        for key in [column] if column else CAPTION_COLUMNS:
            if isinstance(item.get(key), str):
                return item[key]
    raise OnestepError(f"{where}: no {column or '/'.join(CAPTION_COLUMNS)} string field")
