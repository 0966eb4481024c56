"""Tests for ryzen_core.data: corpora, splits, tokenizer cache, packing, batch sampling."""
from __future__ import annotations

import argparse
import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers import tiny_sets
from ryzen_core import data
from ryzen_core.data import (
    BatchSampler,
    DataError,
    Document,
    Tokenizer,
    load_documents,
    pack,
    prepare_data,
    split_documents,
    tokenize_documents,
    train_tokenizer,
    unigram_perplexity,
)

SAMPLE_TEXTS = [
    "def add(a, b):\n    return a + b\n",
    "The quick brown fox jumps over the lazy dog.\n" * 3,
    "Grüße aus Köln — naïve café, 東京, emoji 🙂\n",
    "for i in range(10):\n    print(i * i)\n",
    "class Point:\n    def __init__(self, x, y):\n        self.x, self.y = x, y\n",
]


def make_docs(count: int, prefix: str = "doc") -> list[Document]:
    return [Document(f"{prefix}{i}.txt", f"text of document {i}\n") for i in range(count)]


@pytest.fixture(scope="module")
def small_tokenizer(tmp_path_factory) -> Tokenizer:
    return train_tokenizer(SAMPLE_TEXTS * 4, 320, tmp_path_factory.mktemp("cache"))


# --- corpora ---------------------------------------------------------------


def test_stdlib_listing_is_sorted_and_excludes_tests_and_site_packages():
    files = data.stdlib_source_files()
    root = data.stdlib_root()
    relative = [p.relative_to(root).as_posix() for p in files]
    assert len(relative) > 100
    assert relative == sorted(relative)
    assert all(r.endswith(".py") for r in relative)
    for r in relative:
        assert not set(r.split("/")[:-1]) & {"test", "tests", "idle_test", "site-packages"}, r
    assert "os.py" in relative and "json/decoder.py" in relative


def test_stdlib_documents_follow_listing_order_and_respect_limit():
    documents = load_documents("stdlib", max_documents=30)
    assert len(documents) == 30
    ids = [d.id for d in documents]
    assert ids == sorted(ids)
    assert all(d.text.strip() for d in documents)
    assert documents[0].text == (data.stdlib_root() / documents[0].id).read_text(encoding="utf-8")


def test_directory_loads_text_files_recursively_sorted(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / ".git").mkdir()
    (tmp_path / "b.txt").write_text("bee", encoding="utf-8")
    (tmp_path / "a.md").write_text("# ay", encoding="utf-8")
    (tmp_path / "sub" / "c.py").write_text("x = 1\n", encoding="utf-8")
    (tmp_path / "sub" / "blank.txt").write_text("  \n", encoding="utf-8")
    (tmp_path / "notes.json").write_text("{}", encoding="utf-8")
    (tmp_path / ".git" / "HEAD.txt").write_text("ignored", encoding="utf-8")
    documents = load_documents(tmp_path)
    assert [d.id for d in documents] == ["a.md", "b.txt", "sub/c.py"]
    assert [d.text for d in documents] == ["# ay", "bee", "x = 1\n"]


def test_single_text_file_is_cut_into_documents_of_paragraphs(tmp_path):
    path = tmp_path / "book.txt"
    path.write_text("line one\nline two\n", encoding="utf-8")
    assert load_documents(path) == [Document("book.txt#0", "line one\nline two\n")]
    paragraphs = [f"paragraph {i}: " + "word " * 300 for i in range(12)]  # about 1,500 characters each
    path.write_text("\n\n".join(paragraphs), encoding="utf-8")
    documents = load_documents(path)
    assert "".join(d.text for d in documents) == path.read_text()  # nothing lost, nothing added
    assert len(documents) == 6 and all(len(d.text) <= 4096 for d in documents)
    assert documents[0].text.startswith("paragraph 0") and documents[1].text.startswith("paragraph 2")


def test_jsonl_uses_configured_field_and_skips_blank_lines(tmp_path):
    path = tmp_path / "corpus.jsonl"
    path.write_text('{"body": "first"}\n\n{"body": "second", "other": 1}\n', encoding="utf-8")
    documents = load_documents(path, text_field="body")
    assert documents == [Document("corpus.jsonl:1", "first"), Document("corpus.jsonl:3", "second")]
    assert load_documents(path, text_field="body", max_documents=1) == documents[:1]


def test_jsonl_invalid_line_names_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "ok"}\n{"text": "ok"}\n{not json\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"bad\.jsonl line 3: invalid JSON"):
        load_documents(path)


def test_jsonl_missing_field_names_line_and_field(tmp_path):
    path = tmp_path / "missing.jsonl"
    path.write_text('{"text": "ok"}\n{"content": "no text"}\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"missing\.jsonl line 2: missing text field 'text'"):
        load_documents(path)


def test_missing_path_and_empty_corpus_raise_data_error(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_documents(tmp_path / "nowhere")
    with pytest.raises(DataError, match="no non-empty documents"):
        load_documents(tmp_path)
    assert issubclass(DataError, ValueError)


# --- splits ----------------------------------------------------------------


def test_split_is_disjoint_complete_deterministic_and_by_document():
    documents = make_docs(400)
    splits = split_documents(documents)
    parts = [splits.train, splits.validation, splits.test]
    ids = [[d.id for d in part] for part in parts]
    assert sorted(sum(ids, [])) == sorted(d.id for d in documents)
    assert len(set(sum(ids, []))) == len(documents)
    assert all(part for part in parts)
    assert 300 < len(splits.train) < 400
    assert split_documents(list(documents)) == splits
    # Whole documents move together and keep their corpus order.
    assert splits.train == [d for d in documents if d in splits.train]


def test_split_is_stable_when_a_document_is_added():
    documents = make_docs(200)
    before = split_documents(documents)
    after = split_documents(documents + [Document("new-file.txt", "new")])
    for name in ("train", "validation", "test"):
        old_ids = {d.id for d in getattr(before, name)}
        new_ids = {d.id for d in getattr(after, name)} - {"new-file.txt"}
        assert old_ids == new_ids, name


def test_split_guarantees_non_empty_splits_and_rejects_tiny_corpora():
    for count in (3, 4, 5, 8):
        splits = split_documents(make_docs(count))
        assert splits.train and splits.validation and splits.test
    with pytest.raises(DataError, match="at least 3 documents"):
        split_documents(make_docs(2))
    with pytest.raises(DataError, match="fractions"):
        split_documents(make_docs(10), fractions=(0.5, 0.5, 0.0))


# --- tokenizer -------------------------------------------------------------


@pytest.mark.parametrize("text", [
    "plain ascii text",
    "Grüße, naïve café — 東京 🙂 ∑ x²",
    "never-seen script: Ελληνικά ქართული\r\n\ttabs  and  spaces ",
    "a literal <|endoftext|> inside a document",
])
def test_tokenizer_round_trips_exactly(small_tokenizer, text):
    ids = small_tokenizer.encode(text)
    assert small_tokenizer.decode(ids) == text
    assert small_tokenizer.eos_id not in ids


def test_tokenizer_basics_and_save_load(small_tokenizer, tmp_path):
    assert small_tokenizer.eos_id == small_tokenizer.backend.token_to_id("<|endoftext|>")
    assert 257 <= small_tokenizer.vocab_size <= 320
    assert small_tokenizer.encode_batch(SAMPLE_TEXTS) == [small_tokenizer.encode(t) for t in SAMPLE_TEXTS]
    small_tokenizer.save(tmp_path / "tok")
    for loaded in (Tokenizer.load(tmp_path / "tok"), Tokenizer.from_hf_dir(tmp_path / "tok")):
        assert loaded.eos_id == small_tokenizer.eos_id
        assert loaded.vocab_size == small_tokenizer.vocab_size
        assert loaded.encode(SAMPLE_TEXTS[2]) == small_tokenizer.encode(SAMPLE_TEXTS[2])


def test_from_hf_dir_reads_eos_from_tokenizer_config(small_tokenizer, tmp_path):
    (tmp_path / "tokenizer.json").write_text(small_tokenizer.to_json(), encoding="utf-8")
    with pytest.raises(DataError, match="eos_token"):
        Tokenizer.from_hf_dir(tmp_path)
    config = {"eos_token": {"content": "<|endoftext|>", "special": True}}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    assert Tokenizer.from_hf_dir(tmp_path).eos_id == small_tokenizer.eos_id


def test_tokenizer_cache_hit_skips_training_and_key_tracks_content(tmp_path, monkeypatch):
    first = train_tokenizer(SAMPLE_TEXTS, 300, tmp_path)
    cached = list((tmp_path / "tokenizers").glob("*/tokenizer.json"))
    assert len(cached) == 1

    def must_not_train(*args, **kwargs):
        raise AssertionError("trained again despite a cache hit")

    monkeypatch.setattr(data, "_train_bpe", must_not_train)
    second = train_tokenizer(list(SAMPLE_TEXTS), 300, tmp_path)
    assert second.to_json() == first.to_json()
    monkeypatch.undo()

    key = data.tokenizer_cache_key(SAMPLE_TEXTS, 300)
    assert cached[0].parent.name == key
    assert data.tokenizer_cache_key(SAMPLE_TEXTS[:-1] + [SAMPLE_TEXTS[-1] + "!"], 300) != key
    assert data.tokenizer_cache_key(SAMPLE_TEXTS, 301) != key
    # Text boundaries are part of the content.
    assert data.tokenizer_cache_key(["ab", "c"], 300) != data.tokenizer_cache_key(["a", "bc"], 300)
    train_tokenizer(SAMPLE_TEXTS + ["one more text"], 300, tmp_path)
    assert len(list((tmp_path / "tokenizers").glob("*/tokenizer.json"))) == 2
    assert not list((tmp_path / "tokenizers").rglob("*.tmp"))


def test_train_tokenizer_rejects_vocab_below_byte_alphabet(tmp_path):
    with pytest.raises(DataError, match="vocab_size"):
        train_tokenizer(SAMPLE_TEXTS, 100, tmp_path)


# --- token streams and packing --------------------------------------------


def test_tokenize_documents_joins_with_eos_and_caches(small_tokenizer, tmp_path, monkeypatch):
    documents = [Document(f"d{i}", text) for i, text in enumerate(SAMPLE_TEXTS)]
    tokens = tokenize_documents(small_tokenizer, documents, tmp_path)
    assert tokens.dtype == np.int32
    expected: list[int] = []
    for i, text in enumerate(SAMPLE_TEXTS):
        if i:
            expected.append(small_tokenizer.eos_id)
        expected.extend(small_tokenizer.encode(text))
    assert tokens.tolist() == expected
    assert len(list((tmp_path / "tokens").glob("*.npy"))) == 1

    def must_not_encode(texts):
        raise AssertionError("encoded again despite a cache hit")

    monkeypatch.setattr(small_tokenizer, "encode_batch", must_not_encode)
    assert np.array_equal(tokenize_documents(small_tokenizer, documents, tmp_path), tokens)
    monkeypatch.undo()
    renamed = [Document("renamed", documents[0].text)] + documents[1:]
    tokenize_documents(small_tokenizer, renamed, tmp_path)
    assert len(list((tmp_path / "tokens").glob("*.npy"))) == 2


def test_pack_shapes_and_shifted_targets():
    tokens = np.arange(23, dtype=np.int32)
    packed = pack(tokens, seq_len=4)
    assert packed.dtype == torch.long and packed.shape == (4, 5)
    assert packed.flatten().tolist() == list(range(20))
    inputs, targets = packed[:, :-1], packed[:, 1:]
    assert torch.equal(targets, inputs + 1)
    with pytest.raises(DataError, match="fewer than one window"):
        pack(np.arange(4, dtype=np.int32), seq_len=4)


# --- batch sampling --------------------------------------------------------


def test_batch_sampler_reproducible_per_epoch_and_rows_used_once():
    sampler = BatchSampler(num_rows=50, batch_size=8, seed=3)
    epoch0 = sampler.batches_for_epoch(0)
    assert len(epoch0) == len(sampler) == 6
    assert all(b.shape == (8,) and b.dtype == torch.long for b in epoch0)
    assert all(torch.equal(a, b) for a, b in zip(epoch0, BatchSampler(50, 8, seed=3).batches_for_epoch(0)))
    assert not torch.equal(torch.cat(epoch0), torch.cat(sampler.batches_for_epoch(1)))
    assert not torch.equal(torch.cat(epoch0), torch.cat(BatchSampler(50, 8, seed=4).batches_for_epoch(0)))
    used = torch.cat(epoch0).tolist()
    assert len(used) == len(set(used)) == 48 and set(used) <= set(range(50))

    keep_tail = BatchSampler(50, 8, seed=3, drop_last=False).batches_for_epoch(0)
    assert [len(b) for b in keep_tail] == [8] * 6 + [2]
    assert sorted(torch.cat(keep_tail).tolist()) == list(range(50))


def test_batch_sampler_ranks_shard_the_single_process_global_batch():
    single = BatchSampler(num_rows=70, batch_size=12, seed=7).batches_for_epoch(2)
    rank0 = BatchSampler(70, 6, seed=7, rank=0, world_size=2).batches_for_epoch(2)
    rank1 = BatchSampler(70, 6, seed=7, rank=1, world_size=2).batches_for_epoch(2)
    assert len(single) == len(rank0) == len(rank1) == 5
    for whole, part0, part1 in zip(single, rank0, rank1):
        assert len(part0) == len(part1) == 6
        assert not set(part0.tolist()) & set(part1.tolist())
        assert sorted(part0.tolist() + part1.tolist()) == sorted(whole.tolist())


def test_batch_sampler_rejects_impossible_configurations():
    with pytest.raises(DataError, match="global batch"):
        BatchSampler(num_rows=5, batch_size=4, seed=0, world_size=2)
    with pytest.raises(DataError, match="rank"):
        BatchSampler(num_rows=100, batch_size=4, seed=0, rank=2, world_size=2)


# --- pipeline --------------------------------------------------------------


def test_unigram_perplexity_hand_computed():
    # counts+1 over vocab 4 = [3, 2, 1, 1] / 7; eval tokens 0 and 1 -> p = 3/7, 2/7.
    perplexity = unigram_perplexity(np.array([0, 0, 1]), np.array([0, 1]), vocab_size=4)
    assert perplexity == pytest.approx(math.sqrt(49 / 6))
    # An unseen token gets the smoothed mass 1/7.
    assert unigram_perplexity(np.array([0, 0, 1]), np.array([3]), vocab_size=4) == pytest.approx(7.0)


def test_prepare_data_on_small_stdlib_slice_then_from_cache(tmp_path, monkeypatch):
    prepared = prepare_data("stdlib", 300, 32, tmp_path, max_documents=30)
    sizes = prepared.split_sizes
    assert sum(s["documents"] for s in sizes.values()) == 30
    for name in ("train", "validation", "test"):
        rows = getattr(prepared, name)
        assert rows.dtype == torch.long and rows.shape[1] == 33
        assert rows.shape[0] == sizes[name]["rows"] == sizes[name]["tokens"] // 33
        assert int(rows.max()) < prepared.tokenizer.vocab_size
    assert 1.0 < prepared.unigram_perplexity < 10 * prepared.tokenizer.vocab_size

    monkeypatch.setattr(data, "_train_bpe", lambda *a: pytest.fail("retrained a cached tokenizer"))
    again = prepare_data("stdlib", 300, 32, tmp_path, max_documents=30)
    assert torch.equal(again.train, prepared.train)
    assert again.unigram_perplexity == prepared.unigram_perplexity


def test_prepare_data_with_tokenizer_dir_and_too_small_split(tmp_path, small_tokenizer):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(12):
        (corpus / f"doc{i:02}.txt").write_text(" ".join(SAMPLE_TEXTS) * (i + 2), encoding="utf-8")
    small_tokenizer.save(tmp_path / "tok")
    prepared = prepare_data(corpus, 9999, 16, tmp_path / "cache", tokenizer_dir=tmp_path / "tok")
    assert prepared.tokenizer.to_json() == small_tokenizer.to_json()
    assert not (tmp_path / "cache" / "tokenizers").exists()
    with pytest.raises(DataError, match="split .* too small"):
        prepare_data(corpus, 300, 100_000, tmp_path / "cache")


def test_directory_reads_regular_files_only(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "a.txt").write_text("alpha", encoding="utf-8")
    (tmp_path / "outside.txt").write_text("secret", encoding="utf-8")
    os.mkfifo(corpus / "pipe.txt")  # reading it would block forever
    (corpus / "zero.txt").symlink_to("/dev/zero")  # reading it would never end
    (corpus / "link.txt").symlink_to(tmp_path / "outside.txt")  # a path out of the corpus
    (corpus / "b.md").write_text("beta", encoding="utf-8")
    assert [d.id for d in load_documents(corpus)] == ["a.txt", "b.md"]


def test_two_files_are_split_by_position_within_them(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for name in ("one.txt", "two.txt"):
        (corpus / name).write_text("\n\n".join(" ".join(SAMPLE_TEXTS) for _ in range(40)), encoding="utf-8")
    prepared = prepare_data(corpus, 300, 16, tmp_path / "cache")
    assert all(size["rows"] > 0 for size in prepared.split_sizes.values())
    assert sum(size["documents"] for size in prepared.split_sizes.values()) >= 3


def test_the_readme_text_corpus_trains(ryzen, tmp_path):
    book = tmp_path / "book.txt"  # a plain text file, as README's config section offers
    book.write_text(Path(argparse.__file__).read_text(encoding="utf-8"), encoding="utf-8")
    result = ryzen("train", *tiny_sets(f"data.source={book}", "train.max_steps=2"), "--out", str(tmp_path / "run"))
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads((tmp_path / "run" / "training_metrics_report.json").read_text())
    assert all(size["documents"] >= 1 for size in report["data"]["split_sizes"].values())
