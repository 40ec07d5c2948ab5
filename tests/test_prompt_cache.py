"""The on-disk prompt-embedding cache of text-to-image teachers (onestep/teachers/prompt_cache.py) on
tiny SD / SDXL pipelines: batches equal to per-batch encoding, duplicates encoded once, a second
load without the text encoders, an interrupted encode resumed, no prompt-set-sized tensor in RAM."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest
import torch
from safetensors import safe_open
from t2i_fixtures import PROMPTS, latent_cache_in_tmp, make_tiny_sd, make_tiny_sdxl  # noqa: F401 (fixtures)

from onestep.teachers import load_teacher
from onestep.teachers.prompt_cache import prompt_cache_dir
from onestep.teachers.text import PromptEncoder, TextConditioning

#: Repeats, the empty prompt (zeros under SDXL's force_zeros_for_empty_prompt) and more than one batch.
TRAIN = PROMPTS * 3 + ["", PROMPTS[0]] + [f"prompt number {i}" for i in range(70)]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    return {"sd": make_tiny_sd(tmp_path_factory.mktemp("pc_sd")), "sdxl": make_tiny_sdxl(tmp_path_factory.mktemp("pc_sdxl"))}


class CountingEncoder(PromptEncoder):
    """The real SD prompt encoder, recording what it encodes; raises once ``fail_at`` prompts are done."""

    def __init__(self, folder, fail_at: int | None = None):
        super().__init__(folder, xl=False, size=(16, 16))
        self.encoded: list[str] = []
        self.fail_at = fail_at

    def encode(self, prompts, batch_size=64):
        if self.fail_at is not None and len(self.encoded) >= self.fail_at:
            raise RuntimeError("interrupted")
        self.encoded += prompts
        return super().encode(prompts, batch_size)


def _same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype == torch.float32 and a[k].shape == b[k].shape, k
        assert torch.equal(a[k], b[k]), k


def _batches(cond: TextConditioning, seeds=range(4), n: int = 24):
    return [cond.sample_prompts(n, generator=torch.Generator().manual_seed(s)) for s in seeds]


def _cache_folders():
    return sorted(d for d in prompt_cache_dir().iterdir() if d.is_dir())


@pytest.mark.parametrize("kind", ["sd", "sdxl"])
def test_cached_batches_equal_per_batch_encoding(kind, folders):
    cached = load_teacher(folders[kind], prompts=TRAIN, negative_prompt="blurry").conditioning
    fresh = load_teacher(folders[kind], prompts=TRAIN, negative_prompt="blurry", cache_text_embeddings=False).conditioning
    assert fresh._train is None and not any(p in fresh._known for p in TRAIN[-70:])  # per batch, nothing kept
    for (ca, pa), (cb, pb) in zip(_batches(cached), _batches(fresh)):
        assert pa == pb
        _same(ca, cb)
    assert set(ca) == ({"encoder_hidden_states", "text_embeds", "time_ids"} if kind == "sdxl" else {"encoder_hidden_states"})
    _same(cached.null(3), fresh.null(3))
    _same(cached.empty(3), fresh.empty(3))
    _same(cached.from_labels([0, 1]), fresh.from_labels([0, 1]))
    if kind == "sdxl":  # the training prompt "" is zeros, as in the pipeline; time ids are the image size
        row = cached._train(torch.tensor([TRAIN.index("")]))
        assert row["encoder_hidden_states"].abs().sum() == 0 and row["time_ids"].tolist() == [[16, 16, 0, 0, 16, 16]]
    assert cached.encoder._parts is None  # the text encoders are freed after caching


def test_duplicates_are_encoded_once(folders):
    enc = CountingEncoder(folders["sd"])
    cond = TextConditioning(encoder=enc, prompts=TRAIN, validation_prompts=["a validation prompt"]).prepare()
    unique = list(dict.fromkeys(TRAIN))
    counts = Counter(enc.encoded)
    assert all(counts[p] == 1 for p in unique) and len(enc.encoded) == len(unique) + 1  # + the validation prompt
    store = cond._train.store
    assert len(store) == len(unique) and len(cond._train) == len(TRAIN)
    index = json.loads((store.folder / "index.json").read_text())
    rows = 0
    for name in index["shards"]:
        with safe_open(str(store.folder / name), framework="pt") as f:
            rows += f.get_slice("encoder_hidden_states").get_shape()[0]
    assert index["prompts"] == rows == len(unique)
    # Each training prompt maps to its unique row.
    assert [unique[r] for r in cond._train.rows] == TRAIN


@pytest.mark.parametrize("kind", ["sd", "sdxl"])
def test_second_load_reads_the_cache_without_the_text_encoder(kind, folders, monkeypatch):
    first = load_teacher(folders[kind], prompts=TRAIN).conditioning
    before = _cache_folders()

    def refuse(self):
        raise AssertionError("the text encoder was loaded")

    monkeypatch.setattr(PromptEncoder, "_load", refuse)
    second = load_teacher(folders[kind], prompts=TRAIN).conditioning
    assert _cache_folders() == before
    for (ca, pa), (cb, pb) in zip(_batches(first), _batches(second)):
        assert pa == pb
        _same(ca, cb)
    _same(first.null(2), second.null(2))
    _same(first.empty(2), second.empty(2))
    _same(first.from_labels(list(range(first.num_classes))), second.from_labels(list(range(second.num_classes))))
    with pytest.raises(AssertionError, match="was loaded"):  # a prompt never seen still needs the encoder
        second.from_labels(["a prompt that is in no cache"])


def test_an_interrupted_encode_resumes_and_ends_identical(folders):
    prompts = [f"caption {i}" for i in range(10)]
    options = dict(prompts=prompts, validation_prompts=["v"], cache_shard_size=3)
    # The fixed prompts ("" and "v") are encoded first, then shards of 3: stop before the second shard.
    first = CountingEncoder(folders["sd"], fail_at=5)
    with pytest.raises(RuntimeError, match="interrupted"):
        TextConditioning(encoder=first, **options).prepare()
    (partial,) = [d for d in _cache_folders() if not (d / "index.json").exists()]
    assert sorted(p.name for p in partial.iterdir()) == ["shard-00000.safetensors"]  # no index, no temp file

    second = CountingEncoder(folders["sd"])
    cond = TextConditioning(encoder=second, **options).prepare()
    assert second.encoded == prompts[3:]  # only the missing shards
    index = json.loads((partial / "index.json").read_text())
    assert index["prompts"] == 10 and index["shard_size"] == 3 and len(index["shards"]) == 4
    assert sorted(p.name for p in partial.iterdir()) == ["index.json"] + index["shards"]

    fresh = TextConditioning(encoder=PromptEncoder(folders["sd"], xl=False, size=(16, 16)), cache_embeddings=False, **options).prepare()
    for (ca, pa), (cb, pb) in zip(_batches(cond), _batches(fresh)):
        assert pa == pb
        _same(ca, cb)
    _same(cond._train(torch.arange(10)), fresh.encode(prompts))


def _tensors(obj, seen=None):
    """Every torch tensor reachable from ``obj`` through attributes, dicts, lists and tuples."""
    seen = set() if seen is None else seen
    if id(obj) in seen:
        return
    seen.add(id(obj))
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _tensors(v, seen)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _tensors(v, seen)
    elif hasattr(obj, "__dict__") and not isinstance(obj, type):
        for v in vars(obj).values():
            yield from _tensors(v, seen)


def test_no_tensor_of_the_prompt_set_stays_in_memory(folders):
    prompts = [f"prompt {i % 25}" for i in range(200)]  # 200 prompts, 25 unique
    cond = load_teacher(folders["sdxl"], prompts=prompts).conditioning
    tensors = list(_tensors(cond))
    assert tensors  # the fixed prompts' rows (9 of them, one row each)
    assert all(t.shape[0] not in (200, 25) for t in tensors if t.ndim)
    assert isinstance(cond._train.rows, np.ndarray) and cond._train.rows.dtype == np.int32 and cond._train.rows.shape == (200,)
    assert cond.sample(4)["encoder_hidden_states"].shape == (4, 16, 32)


def test_bf16_storage_halves_the_cache_and_comes_back_float32(folders):
    cond = load_teacher(folders["sdxl"], prompts=TRAIN, text_cache_dtype="bf16").conditioning
    # the text encoders run in the cache's dtype too: encoding per batch with bf16 encoders gives what the cache holds
    fresh = load_teacher(folders["sdxl"], prompts=TRAIN, cache_text_embeddings=False, text_cache_dtype="bf16").conditioning
    with safe_open(str(cond._train.store.folder / "shard-00000.safetensors"), framework="pt") as f:
        assert f.get_slice("encoder_hidden_states").get_dtype() == "BF16" and f.get_slice("time_ids").get_dtype() == "F32"
    ((ca, _),), ((cb, _),) = _batches(cond, [0]), _batches(fresh, [0])
    for k in ca:
        assert ca[k].dtype == torch.float32
        expected = cb[k] if k == "time_ids" else cb[k].to(torch.bfloat16).float()
        assert torch.equal(ca[k], expected), k
