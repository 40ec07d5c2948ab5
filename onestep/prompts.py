"""Prompt sets as users have them: the files and folders a training or evaluation prompt set is read from.

:func:`read_prompts` reads

- a text file: one prompt a line, blank lines skipped (surrounding whitespace stripped);
- JSONL (``.jsonl``, or a ``.json`` file of one object a line): a JSON string, or an object with a
  ``caption`` / ``prompt`` / ``text`` field, a line;
- JSON (``.json``): COCO captions (``{"annotations": [{"caption": ...}, ...]}``, as
  ``captions_train2017.json``) or an array of strings / objects;
- CSV (``.csv``): a header with a ``caption`` / ``prompt`` / ``text`` column;
- parquet (a ``.parquet`` file, or a folder of them, read in name order; needs ``pyarrow``);
- a Hugging Face ``datasets`` folder written by ``save_to_disk`` (a ``Dataset``, or a
  ``DatasetDict`` whose ``train`` split, or only split, is read; needs ``datasets``).

A ``column`` names the field or column to read in every format that has them; without one the first
of :data:`CAPTION_COLUMNS` present is read, and a table with none of them is an error listing its
columns. A column of lists of strings (several captions a row) gives each of them.

Apart from text files, prompts are read exactly as stored (no stripping): the on-disk prompt cache
(:mod:`onestep.teachers.prompt_cache`) is keyed by the prompt strings alone, so one set of prompts
gives one cache whatever file it came from, and the keys of existing caches stay as they were. An
empty set, or one of blank prompts only, is an error.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any, Iterable

from .errors import ConfigError, OnestepError

#: Fields / columns read when none is named, first present wins.
CAPTION_COLUMNS = ("caption", "prompt", "text")
#: What to install for the optional readers.
DATA_EXTRA = "pip install 'onestep[data]'"


def read_prompts(path: str | Path, column: str | None = None) -> list[str]:
    """The prompts of a file or folder (text, JSONL, JSON / COCO captions, CSV, parquet, a Hugging Face
    ``datasets`` folder; see the module docstring), in file order, repeats kept.

    Args:
        path: the file or folder.
        column: the field / column holding the prompt (default: caption, prompt or text).

    Raises:
        OnestepError: a missing path, an unreadable file, a missing column, a missing optional
            package (``pyarrow``, ``datasets``), or no prompts.
    """
    path = Path(path).expanduser()
    if path.is_dir():
        prompts = _read_folder(path, column)
    elif not path.is_file():
        raise OnestepError(f"prompt file {path} does not exist")
    elif path.suffix.lower() == ".parquet":
        prompts = _read_parquet([path], path, column)
    else:
        text = path.read_text(encoding="utf-8")
        suffix = path.suffix.lower()
        if suffix == ".json":
            prompts = _read_json(path, text, column)
        elif suffix == ".jsonl":
            prompts = [_caption_of(item, column, f"{path}:{n}") for n, item in jsonl_records(path, text)]
        elif suffix == ".csv":
            prompts = _read_csv(path, text, column)
        else:
            prompts = [line.strip() for line in text.splitlines() if line.strip()]
    check_prompts(prompts, str(path))
    return prompts


def prompt_set(source: str | Path | list[str] | tuple[str, ...], what: str, column: str | None = None) -> list[str]:
    """A prompt set given as a list (kept as it is) or a file / folder (:func:`read_prompts`);
    ``what`` names it in errors (``prompts``, ``validation_prompts``)."""
    if isinstance(source, (list, tuple)):
        prompts = [str(p) for p in source]
        check_prompts(prompts, what, ConfigError)
        return prompts
    try:
        return read_prompts(source, column)
    except OnestepError as e:
        raise type(e)(f"{what}: {e}") from e


def check_prompts(prompts: list[str], where: str, error: type[OnestepError] = OnestepError) -> None:
    """Raise ``error`` unless ``prompts`` holds at least one prompt that is not blank."""
    if not prompts:
        raise error(f"{where}: no prompts")
    if not any(p.strip() for p in prompts):
        raise error(f"{where}: all {len(prompts)} prompts are blank")


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


def _read_json(path: Path, text: str, column: str | None) -> list[str]:
    """A ``.json`` file: COCO captions, an array, or (a file that is not one JSON document) JSONL."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        data = None  # several documents: JSONL (which names the bad line if there is one)
    if isinstance(data, dict) and "annotations" in data:
        notes = data["annotations"]
        if not isinstance(notes, list):
            raise OnestepError(f"{path}: 'annotations' is not a list (expected COCO captions: a list of objects with a caption)")
        return [_caption_of(a, column or "caption", f"{path}: annotations[{i}]") for i, a in enumerate(notes)]
    if isinstance(data, list):
        return [_caption_of(item, column, f"{path}: [{i}]") for i, item in enumerate(data)]
    return [_caption_of(item, column, f"{path}:{n}") for n, item in jsonl_records(path, text)]


def _read_csv(path: Path, text: str, column: str | None) -> list[str]:
    reader = csv.DictReader(text.splitlines())
    rows = list(reader)
    if not rows:
        raise OnestepError(f"{path}: no rows under a header")
    col = pick_column(list(reader.fieldnames or rows[0]), column, str(path))
    return [r[col] for r in rows]


def pick_column(columns: list[str], column: str | None, where: str) -> str:
    """``column`` if ``columns`` has it, else (none named) the first of :data:`CAPTION_COLUMNS` there;
    an error listing ``columns`` otherwise."""
    if column is not None:
        if column in columns:
            return column
        raise OnestepError(f"{where}: no {column} column (columns: {', '.join(columns)})")
    found = next((c for c in CAPTION_COLUMNS if c in columns), None)
    if found is None:
        raise OnestepError(
            f"{where}: no caption column (looked for {', '.join(CAPTION_COLUMNS)}; columns: {', '.join(columns)}); "
            "name it with prompt_column (onestep train) or --caption-column (onestep eval)"
        )
    return found


def _strings(values: Iterable[Any], where: str, col: str) -> list[str]:
    """The prompts of a table column: strings, or lists of strings (several captions a row)."""
    out: list[str] = []
    for i, v in enumerate(values):
        if isinstance(v, str):
            out.append(v)
        elif isinstance(v, (list, tuple)) and all(isinstance(x, str) for x in v):
            out.extend(v)
        else:
            raise OnestepError(f"{where}: row {i} of column {col!r} is {type(v).__name__ if v is not None else 'null'}, not a string")
    return out


def _read_folder(path: Path, column: str | None) -> list[str]:
    if any((path / f).is_file() for f in ("dataset_dict.json", "state.json", "dataset_info.json")):
        return _read_datasets_folder(path, column)
    files = sorted(path.rglob("*.parquet"))
    if files:
        return _read_parquet(files, path, column)
    raise OnestepError(
        f"{path} is a folder but neither a Hugging Face datasets folder (save_to_disk) nor a folder of .parquet "
        "files; give a prompt file (text, JSONL, JSON, CSV, parquet)"
    )


def _read_parquet(files: list[Path], where: Path, column: str | None) -> list[str]:
    try:
        import pyarrow.parquet as pq
    except ImportError as e:
        raise OnestepError(f"{where}: reading parquet needs pyarrow: pip install pyarrow (or {DATA_EXTRA})") from e
    out: list[str] = []
    col = None
    for f in files:
        try:
            names = pq.read_schema(f).names
            col = pick_column(names, column or col, str(f))
            values = pq.read_table(f, columns=[col]).column(col).to_pylist()
        except OnestepError:
            raise
        except Exception as e:  # pyarrow's errors (ArrowInvalid, OSError) on a file that is not parquet
            raise OnestepError(f"{f}: not a readable parquet file ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from e
        out += _strings(values, str(f), col)
    return out


def _read_datasets_folder(path: Path, column: str | None) -> list[str]:
    try:
        import datasets
    except ImportError as e:
        raise OnestepError(
            f"{path} is a Hugging Face datasets folder (save_to_disk); reading it needs the datasets package: "
            f"pip install datasets (or {DATA_EXTRA})"
        ) from e
    try:
        ds = datasets.load_from_disk(str(path))
    except Exception as e:  # datasets raises FileNotFoundError / ValueError on a broken folder
        raise OnestepError(f"{path}: not a readable datasets folder ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from e
    where = str(path)
    if isinstance(ds, datasets.DatasetDict):
        splits = list(ds)
        split = "train" if "train" in ds else (splits[0] if len(splits) == 1 else None)
        if split is None:
            raise OnestepError(f"{path}: a DatasetDict with splits {', '.join(splits)} and no 'train'; point prompts at one split's folder ({path}/<split>)")
        ds, where = ds[split], f"{path} (split {split})"
    col = pick_column(list(ds.column_names), column, where)
    return _strings(ds[col], where, col)


__all__ = ["CAPTION_COLUMNS", "check_prompts", "jsonl_records", "pick_column", "prompt_set", "read_prompts"]
