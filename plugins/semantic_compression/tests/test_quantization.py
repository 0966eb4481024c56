"""Embedding quantization: sizes, exactness of the search paths, metrics and the on-disk index."""
from __future__ import annotations

import numpy as np
import pytest

from ryzen_plugin_semantic_compression.quantization import (BinaryCodec, Int8Codec, QuantizedIndex, load_index,
                                                            popcount, save_index, top_k)
from ryzen_plugin_semantic_compression.retrieval import overlap_at_k, ranks_of_relevant, retrieval_metrics


def clustered(n_docs=300, dim=64, seed=0):
    """Documents around random centres and queries near their own document: a set with a right answer."""
    rng = np.random.default_rng(seed)
    docs = rng.normal(size=(n_docs, dim)).astype(np.float32)
    queries = (docs + 0.6 * rng.normal(size=docs.shape)).astype(np.float32)
    return queries, docs


def test_binary_index_is_one_32nd_of_float32_and_int8_one_quarter():
    queries, docs = clustered(dim=384)
    index = QuantizedIndex.build(docs, center=False)
    sizes = index.sizes()
    assert sizes["binary"] * 32 == sizes["float32"]
    assert sizes["int8"] * 4 == sizes["float32"]
    assert index.binary.dtype == np.uint8 and index.binary.shape == (300, 384 // 8)
    # the calibration vectors do not grow with the corpus
    assert index.calibration_bytes()["binary"] == 2 * 384 * 4


def test_hamming_matches_unpacked_bits():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(20, 72)).astype(np.float32)  # 72 bits: not a multiple of 64, the uint8 path
    codec = BinaryCodec.calibrate(x)
    codes = codec.encode(x)
    bits = x > codec.threshold
    expected = (bits[:, None, :] != bits[None, :, :]).sum(-1)
    np.testing.assert_array_equal(codec.hamming(codes[:5], codes), expected[:5])
    wide = rng.normal(size=(10, 128)).astype(np.float32)  # the uint64 path
    wcodec = BinaryCodec.calibrate(wide)
    wbits = wide > wcodec.threshold
    np.testing.assert_array_equal(wcodec.hamming(wcodec.encode(wide), wcodec.encode(wide)),
                                  (wbits[:, None, :] != wbits[None, :, :]).sum(-1))
    assert popcount(np.array([255, 1, 0], dtype=np.uint8)).tolist() == [8, 1, 0]


def test_median_threshold_sets_half_the_bits():
    _, docs = clustered()
    index = QuantizedIndex.build(docs, center=False)
    bits = np.unpackbits(index.binary, axis=1, count=index.dims)
    assert abs(bits.mean() - 0.5) < 0.01


def test_int8_round_trip_error_is_within_half_a_step():
    _, docs = clustered()
    codec = Int8Codec.calibrate(docs)
    codes = codec.encode(docs)
    assert codes.dtype == np.int8
    error = np.abs(codec.decode(codes) - docs)
    assert (error <= codec.scale / 2 + 1e-6).all()
    q = docs[:3]
    np.testing.assert_allclose(codec.scores(q, codes), q @ codec.decode(codes).T, rtol=1e-4, atol=1e-4)


def test_rescoring_the_whole_shortlist_with_float32_equals_float32_search():
    queries, docs = clustered()
    index = QuantizedIndex.build(docs, center=True)
    q = index.prepare_queries(queries)
    exact = index.search(q, 10, "float32")
    rescored = index.search(q, 10, "binary-rescore", rescore_multiplier=len(docs), rescore_with="float32")
    np.testing.assert_array_equal(rescored, exact)


def test_rescoring_recovers_what_hamming_loses():
    queries, docs = clustered(n_docs=500, dim=32)  # few bits: Hamming alone is coarse
    index = QuantizedIndex.build(docs, center=False)
    q = index.prepare_queries(queries)
    relevant = list(range(len(docs)))
    ndcg = {m: retrieval_metrics(index.search(q, 10, m, 4, w), relevant)["ndcg@10"]
            for m, w in [("float32", "int8"), ("binary", "int8"), ("binary-rescore", "int8"),
                         ("binary-rescore", "binary")]}
    assert ndcg["binary-rescore"] > ndcg["binary"] + 0.05
    assert ndcg["binary-rescore"] >= 0.95 * ndcg["float32"]


def test_matryoshka_prefix_index_keeps_only_the_prefix():
    queries, docs = clustered(dim=64)
    index = QuantizedIndex.build(docs, center=False, dims=16)
    assert index.float32.shape == (300, 16) and index.binary.shape == (300, 2)
    assert index.prepare_queries(queries).shape == (300, 16)


def test_metrics_on_a_known_ranking():
    rankings = np.array([[0, 1, 2], [2, 1, 0], [5, 6, 7]])
    relevant = [0, 1, 3]
    assert ranks_of_relevant(rankings, relevant).tolist() == [0, 1, -1]
    m = retrieval_metrics(rankings, relevant)
    assert m["recall@1"] == pytest.approx(1 / 3)
    assert m["recall@10"] == pytest.approx(2 / 3)
    assert m["ndcg@10"] == pytest.approx((1 + 1 / np.log2(3)) / 3)
    assert overlap_at_k(rankings, rankings[::-1], 3) == pytest.approx(1 / 3)
    assert top_k(np.array([[0.1, 0.9, 0.5]]), 2).tolist() == [[1, 2]]


def test_index_round_trips_through_disk_without_pickle(tmp_path):
    queries, docs = clustered()
    index = QuantizedIndex.build(docs, center=True, dims=32)
    save_index(index, tmp_path, {"model": "test"})
    loaded, info = load_index(tmp_path)
    assert info["model"] == "test" and info["dims"] == 32 and info["centered"]
    q = index.prepare_queries(queries)
    for method in ("float32", "int8", "binary", "binary-rescore"):
        np.testing.assert_array_equal(loaded.search(loaded.prepare_queries(queries), 5, method),
                                      index.search(q, 5, method))
