"""Prompt sets as users have them (onestep/prompts.py): text, JSONL, JSON arrays, COCO captions, CSV,
parquet files and folders, Hugging Face ``datasets`` folders; the column rule; clear errors for empty
sets, missing columns and missing optional packages; one prompt-cache key per prompt set whatever
the file format. Parquet / datasets cases skip when pyarrow / datasets are not installed
(``pip install -e ".[test,data]"`` runs them)."""

from __future__ import annotations

import json
import sys

import pytest
import torch
from t2i_fixtures import PROMPTS, latent_cache_in_tmp, make_tiny_sd  # noqa: F401 (fixtures)

from onestep.errors import ConfigError, OnestepError
from onestep.prompts import prompt_set, read_prompts
from onestep.teachers.prompt_cache import prompt_cache_key

#: prompt_cache_key(PROMPTS, PINNED_IDENTITY, float32) as the key was before this module existed:
#: existing caches must keep their names.
PINNED_IDENTITY = {"encoder": "pinned"}
PINNED_KEY = "d81147423e951ce193573ca86f835bf7"


def _key(prompts: list[str]) -> str:
    return prompt_cache_key(list(dict.fromkeys(prompts)), PINNED_IDENTITY, torch.float32)


def _one_line(excinfo) -> str:
    msg = str(excinfo.value)
    assert "\n" not in msg
    return msg


def write_formats(tmp_path, prompts: list[str]) -> dict:
    """The same prompts in every format that needs no optional package."""
    files = {}
    files["txt"] = tmp_path / "p.txt"
    files["txt"].write_text("\n".join(prompts) + "\n\n")
    files["jsonl"] = tmp_path / "p.jsonl"
    files["jsonl"].write_text("\n".join(json.dumps({"id": i, "caption": p}) for i, p in enumerate(prompts)) + "\n")
    files["jsonl_in_json"] = tmp_path / "lines.json"  # JSONL under a .json name, as read before
    files["jsonl_in_json"].write_text("\n".join(json.dumps({"text": p}) for p in prompts) + "\n")
    files["json_array"] = tmp_path / "array.json"
    files["json_array"].write_text(json.dumps(prompts))
    files["coco"] = tmp_path / "captions_train2017.json"
    coco = {
        "info": {"description": "tiny"},
        "images": [{"id": 10 + i, "file_name": f"{i:012d}.jpg"} for i in range(len(prompts))],
        "annotations": [{"image_id": 10 + i, "id": 100 + i, "caption": p} for i, p in enumerate(prompts)],
    }
    files["coco"].write_text(json.dumps(coco))  # one line, as COCO ships it
    files["csv"] = tmp_path / "p.csv"
    files["csv"].write_text("id,caption\n" + "".join(f'{i},"{p}"\n' for i, p in enumerate(prompts)))
    return files


def test_every_format_gives_the_same_prompts_and_cache_key(tmp_path):
    assert _key(PROMPTS) == PINNED_KEY
    for kind, path in write_formats(tmp_path, PROMPTS).items():
        got = read_prompts(path)
        assert got == PROMPTS, kind
        assert _key(got) == PINNED_KEY, kind


def test_parquet_file_and_folder(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    table = pa.table({"id": list(range(len(PROMPTS))), "text": PROMPTS, "url": ["x"] * len(PROMPTS)})
    pq.write_table(table, tmp_path / "p.parquet")
    assert read_prompts(tmp_path / "p.parquet") == PROMPTS
    assert _key(read_prompts(tmp_path / "p.parquet")) == PINNED_KEY
    # a folder of shards (as the Hub serves datasets) is read in name order
    shards = tmp_path / "shards" / "data"
    shards.mkdir(parents=True)
    pq.write_table(table.slice(2), shards / "train-00001-of-00002.parquet")
    pq.write_table(table.slice(0, 2), shards / "train-00000-of-00002.parquet")
    assert read_prompts(tmp_path / "shards") == PROMPTS
    # the column rule: caption before prompt before text; a named column wins; else an error listing the columns
    pq.write_table(pa.table({"text": ["t"], "caption": ["c"], "prompt": ["p"]}), tmp_path / "all.parquet")
    assert read_prompts(tmp_path / "all.parquet") == ["c"]
    assert read_prompts(tmp_path / "all.parquet", column="text") == ["t"]
    pq.write_table(pa.table({"id": [1, 2], "sentence": ["a cat", "a dog"]}), tmp_path / "other.parquet")
    with pytest.raises(OnestepError) as e:
        read_prompts(tmp_path / "other.parquet")
    assert "no caption column" in _one_line(e) and "columns: id, sentence" in str(e.value) and "prompt_column" in str(e.value)
    assert read_prompts(tmp_path / "other.parquet", column="sentence") == ["a cat", "a dog"]
    with pytest.raises(OnestepError, match="no nope column"):
        read_prompts(tmp_path / "other.parquet", column="nope")
    # several captions a row are each a prompt; a null is an error naming the row
    pq.write_table(pa.table({"captions": [["a", "b"], ["c"]]}), tmp_path / "lists.parquet")
    assert read_prompts(tmp_path / "lists.parquet", column="captions") == ["a", "b", "c"]
    pq.write_table(pa.table({"text": ["a", None]}), tmp_path / "null.parquet")
    with pytest.raises(OnestepError, match="row 1 of column 'text' is null"):
        read_prompts(tmp_path / "null.parquet")
    (tmp_path / "bad.parquet").write_text("not parquet")
    with pytest.raises(OnestepError, match="not a readable parquet file"):
        read_prompts(tmp_path / "bad.parquet")


def test_datasets_folder(tmp_path):
    datasets = pytest.importorskip("datasets")
    ds = datasets.Dataset.from_dict({"image_id": list(range(len(PROMPTS))), "caption": PROMPTS})
    ds.save_to_disk(str(tmp_path / "ds"))
    assert read_prompts(tmp_path / "ds") == PROMPTS
    assert _key(read_prompts(tmp_path / "ds")) == PINNED_KEY
    # a DatasetDict: its train split
    datasets.DatasetDict({"train": ds, "test": ds.select([0])}).save_to_disk(str(tmp_path / "dd"))
    assert read_prompts(tmp_path / "dd") == PROMPTS
    assert read_prompts(tmp_path / "dd" / "test") == PROMPTS[:1]
    datasets.DatasetDict({"a": ds, "b": ds}).save_to_disk(str(tmp_path / "ab"))
    with pytest.raises(OnestepError, match="splits a, b and no 'train'"):
        read_prompts(tmp_path / "ab")
    other = datasets.Dataset.from_dict({"id": [1], "sentence": ["a cat"]})
    other.save_to_disk(str(tmp_path / "other"))
    with pytest.raises(OnestepError) as e:
        read_prompts(tmp_path / "other")
    assert "columns: id, sentence" in _one_line(e)
    assert read_prompts(tmp_path / "other", column="sentence") == ["a cat"]


def test_missing_optional_packages_are_one_line_errors(tmp_path, monkeypatch):
    (tmp_path / "p.parquet").write_bytes(b"PAR1")
    folder = tmp_path / "ds"
    folder.mkdir()
    (folder / "dataset_dict.json").write_text('{"splits": ["train"]}')
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # import pyarrow -> ImportError
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(OnestepError) as e:
        read_prompts(tmp_path / "p.parquet")
    assert "pip install pyarrow" in _one_line(e)
    with pytest.raises(OnestepError) as e:
        read_prompts(folder)
    assert "pip install datasets" in _one_line(e) and "save_to_disk" in str(e.value)


def test_empty_and_blank_prompt_sets_are_errors(tmp_path):
    cases = {
        "empty.txt": "",
        "blank.txt": "\n   \n\t\n",
        "blank.csv": 'caption\n""\n"  "\n',
        "blank.jsonl": '{"caption": ""}\n{"caption": " "}\n',
        "empty_coco.json": json.dumps({"images": [], "annotations": []}),
        "empty_array.json": "[]",
    }
    for name, text in cases.items():
        (tmp_path / name).write_text(text)
        with pytest.raises(OnestepError, match="no prompts|prompts are blank") as e:
            read_prompts(tmp_path / name)
        _one_line(e)
    with pytest.raises(ConfigError, match="prompts: all 2 prompts are blank"):
        prompt_set(["", " "], "prompts")
    with pytest.raises(ConfigError, match="prompts: no prompts"):
        prompt_set([], "prompts")
    with pytest.raises(OnestepError, match=r"validation_prompts: .*blank.txt: no prompts"):
        prompt_set(str(tmp_path / "blank.txt"), "validation_prompts")
    # a blank prompt among others is kept (as before: it is the empty prompt)
    (tmp_path / "some.csv").write_text('caption\n"a cat"\n""\n')
    assert read_prompts(tmp_path / "some.csv") == ["a cat", ""]


def test_bad_files_name_the_place(tmp_path):
    (tmp_path / "coco.json").write_text(json.dumps({"annotations": [{"caption": "a"}, {"image_id": 3}]}))
    with pytest.raises(OnestepError, match=r"annotations\[1\]: no caption string field"):
        read_prompts(tmp_path / "coco.json")
    (tmp_path / "coco_other.json").write_text(json.dumps({"annotations": [{"sentence": "a"}]}))
    assert read_prompts(tmp_path / "coco_other.json", column="sentence") == ["a"]
    (tmp_path / "broken.jsonl").write_text('{"caption": "a"}\n{oops\n')
    with pytest.raises(OnestepError, match="broken.jsonl:2: not JSON"):
        read_prompts(tmp_path / "broken.jsonl")
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(OnestepError, match="neither a Hugging Face datasets folder"):
        read_prompts(tmp_path / "empty_dir")
    with pytest.raises(OnestepError, match="does not exist"):
        read_prompts(tmp_path / "nope.txt")


def test_teacher_reads_a_table_through_prompt_column_and_shares_the_cache(tmp_path):
    """A tiny SD teacher: the prompts from a CSV with a named column give the text file's
    conditioning and land in the same prompt-cache folder."""
    from onestep.teachers import load_teacher

    sd = make_tiny_sd(tmp_path / "sd")
    files = write_formats(tmp_path, PROMPTS)
    (tmp_path / "named.csv").write_text("id,sentence\n" + "".join(f'{i},"{p}"\n' for i, p in enumerate(PROMPTS)))
    a = load_teacher(sd, prompts=str(files["txt"])).conditioning
    b = load_teacher(sd, prompts=str(tmp_path / "named.csv"), prompt_column="sentence").conditioning
    assert a.prompts == b.prompts == PROMPTS
    assert a._train.store.folder == b._train.store.folder
    with pytest.raises(OnestepError, match="prompts: .*no caption column"):
        load_teacher(sd, prompts=str(tmp_path / "named.csv"))
