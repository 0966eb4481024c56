"""Matryoshka fine-tuning of sentence encoders: the nested contrastive loss, the training loop, saving, the CLI."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ryzen_plugin_semantic_compression.embedders import EncoderEmbedder, load_embedder
from ryzen_plugin_semantic_compression.embedding_training import (AdaptedEmbedder, AdaptorTraining,
                                                                  EmbeddingTraining, MatryoshkaAdaptor,
                                                                  nested_contrastive_loss, train_adaptor,
                                                                  train_embedder)
from ryzen_plugin_semantic_compression.evaluation import matryoshka_embedding_comparison, paired_bootstrap
from ryzen_plugin_semantic_compression.retrieval import RetrievalSet


def test_nested_contrastive_loss_is_the_weighted_mean_of_prefix_losses():
    torch.manual_seed(0)
    q, d = torch.randn(6, 16), torch.randn(6, 16)

    def mnrl(size):
        scores = 20.0 * F.normalize(q[:, :size], dim=-1) @ F.normalize(d[:, :size], dim=-1).T
        return F.cross_entropy(scores, torch.arange(6))

    torch.testing.assert_close(nested_contrastive_loss(q, d, [16], [1.0]), mnrl(16))
    torch.testing.assert_close(nested_contrastive_loss(q, d, [4, 16], [3.0, 1.0]), (3 * mnrl(4) + mnrl(16)) / 4)
    with pytest.raises(ValueError, match="pair up"):
        nested_contrastive_loss(q, d[:5], [16], [1.0])


def test_nested_terms_reach_only_the_leading_dimensions():
    torch.manual_seed(0)
    q = torch.randn(6, 16, requires_grad=True)
    d = torch.randn(6, 16)
    plain = torch.autograd.grad(nested_contrastive_loss(q, d, [16], [1.0]), q)[0]
    nested = torch.autograd.grad(nested_contrastive_loss(q, d, [4, 16], [1.0, 1.0]), q)[0]
    torch.testing.assert_close(nested[:, 4:], plain[:, 4:] / 2)  # the full-width term, half the weight
    assert not torch.allclose(nested[:, :4], plain[:, :4] / 2)  # plus the prefix term on the first 4


def test_training_is_deterministic_learns_and_changes_the_weights(encoder_dir, word_pairs):
    before = EncoderEmbedder(encoder_dir)
    initial = before.encode([q for q, _ in word_pairs])
    runs = []
    for _ in range(2):
        embedder = EncoderEmbedder(encoder_dir)
        plan = train_embedder(embedder, word_pairs, EmbeddingTraining(sizes=[8, 32], weights=[1.0, 1.0], steps=30,
                                                                   batch_size=8, lr=3e-3, seed=1))
        runs.append((plan.losses, embedder))
    assert runs[0][0] == runs[1][0]  # same seed, same batches, same losses
    losses = runs[0][0]
    assert np.mean(losses[-5:]) < 0.5 * np.mean(losses[:5])
    assert not np.allclose(runs[0][1].encode([q for q, _ in word_pairs]), initial)
    assert not runs[0][1].model.training  # left in eval mode for encoding


def test_too_few_pairs_for_a_batch_is_an_error(encoder_dir, word_pairs):
    with pytest.raises(ValueError, match="fewer than one batch"):
        train_embedder(EncoderEmbedder(encoder_dir), word_pairs[:3], EmbeddingTraining(sizes=[32], weights=[1.0],
                                                                                   batch_size=8))


def test_saved_encoder_loads_back_with_the_same_embeddings(encoder_dir, tmp_path, word_pairs):
    embedder = EncoderEmbedder(encoder_dir)
    train_embedder(embedder, word_pairs, EmbeddingTraining(sizes=[32], weights=[1.0], steps=2, batch_size=8, lr=1e-3))
    embedder.save(tmp_path / "tuned")
    loaded = load_embedder(str(tmp_path / "tuned"))
    assert isinstance(loaded, EncoderEmbedder) and loaded.normalize and loaded.pooling == "mean"
    texts = [d for _, d in word_pairs]
    np.testing.assert_allclose(loaded.encode(texts), embedder.encode(texts), atol=1e-6)
    assert (tmp_path / "tuned" / "model.safetensors").is_file()


def test_paired_bootstrap():
    steady = paired_bootstrap([0.2] * 50, [0.5] * 50)
    assert steady["mean_difference"] == pytest.approx(0.3) and steady["ci95_low"] == pytest.approx(0.3)
    mixed = paired_bootstrap([0.0, 1.0] * 50, [1.0, 0.0] * 50)
    assert mixed["ci95_low"] < 0 < mixed["ci95_high"]


@pytest.mark.parametrize("method", ["adaptor", "full"])
def test_comparison_trains_both_variants_on_the_same_batches(encoder_dir, tmp_path, word_pairs, method):
    rset = RetrievalSet(name="tiny", queries=[q for q, _ in word_pairs], documents=[d for _, d in word_pairs],
                        relevant=list(range(len(word_pairs))), document_ids=[str(i) for i in range(len(word_pairs))])
    training = dict(epochs=3, batch_size=8, lr=3e-3, max_tokens=16) if method == "adaptor" else \
        dict(steps=6, batch_size=8, lr=3e-3, max_tokens=16)
    result = matryoshka_embedding_comparison(lambda: EncoderEmbedder(encoder_dir), rset, [4, 1], None, training,
                                             method=method, base_spec=str(encoder_dir), pairs=word_pairs,
                                             save_nested_to=tmp_path / "m")
    assert result["sizes"] == [8, 32]
    assert result["nested"]["training"]["prefix_sizes"] == [8, 32]
    assert result["plain"]["training"]["prefix_sizes"] == [32]
    assert result["nested"]["training"]["first_loss"] != result["plain"]["training"]["first_loss"]
    assert len(result["nested"]["ndcg_per_query"][8]) == len(word_pairs)
    full = next(r["ndcg@10"] for r in result["nested"]["rows"] if r["dims"] == 32 and r["search"] == "float32")
    quarter = next(r["ndcg@10"] for r in result["nested"]["rows"] if r["dims"] == 8 and r["search"] == "float32")
    assert result["retention"]["nested"][8] == pytest.approx(quarter / full)
    assert ("pca" in result["variants"]) == (method == "adaptor")
    saved = load_embedder(str(tmp_path / "m"))  # the nested model, ready for `ryzen embed --model`
    texts = [q for q, _ in word_pairs]
    assert not np.allclose(saved.encode(texts), EncoderEmbedder(encoder_dir).encode(texts), atol=1e-4)


def test_adaptor_starts_as_the_identity_and_learns(word_pairs):
    torch.manual_seed(0)
    queries = torch.randn(64, 16)
    documents = queries @ torch.linalg.qr(torch.randn(16, 16))[0] + 0.1 * torch.randn(64, 16)  # a rotated copy
    assert torch.equal(MatryoshkaAdaptor(16)(queries), queries)
    plans = [AdaptorTraining(sizes=[4, 16], weights=[1.0, 1.0], epochs=40, batch_size=16, lr=1e-2, seed=3)
             for _ in range(2)]
    adaptors = [train_adaptor(queries, documents, plan) for plan in plans]
    assert plans[0].losses == plans[1].losses and plans[0].describe()["steps"] == 160
    assert np.mean(plans[0].losses[-4:]) < 0.5 * np.mean(plans[0].losses[:4])
    torch.testing.assert_close(adaptors[0].weight, adaptors[1].weight)
    with pytest.raises(ValueError, match="fewer than one batch"):
        train_adaptor(queries[:8], documents[:8], plans[0])


def test_adapted_embedder_saves_and_loads(encoder_dir, tmp_path, word_pairs):
    base = EncoderEmbedder(encoder_dir)
    adaptor = MatryoshkaAdaptor(base.dim)
    with torch.no_grad():
        adaptor.weight.copy_(torch.randn(base.dim, base.dim))
    embedder = AdaptedEmbedder(base, adaptor, str(encoder_dir))
    embedder.save(tmp_path / "adapted", {"note": "test"})
    loaded = load_embedder(str(tmp_path / "adapted"))
    texts = [q for q, _ in word_pairs]
    np.testing.assert_allclose(loaded.encode(texts), embedder.encode(texts), atol=1e-5)
    np.testing.assert_allclose(embedder.encode(texts), base.encode(texts) @ adaptor.weight.detach().numpy().T,
                               atol=1e-5)


def test_embed_train_command(ryzen_cli, encoder_dir, tmp_path, word_pairs):
    pairs_file = tmp_path / "pairs.jsonl"
    pairs_file.write_text("".join(json.dumps({"query": q, "document": d}) + "\n" for q, d in word_pairs))
    for method, extra in (("adaptor", ["--epochs", "2"]), ("full", ["--steps", "3", "--no-bf16"])):
        out = tmp_path / method
        result = ryzen_cli("embed-train", str(pairs_file), "--model", str(encoder_dir), "--out", str(out), "--method",
                       method, "--batch-size", "8", "--divisors", "4,1", *extra)
        assert result.returncode == 0, result.stderr[-2000:]
        info = json.loads((out / ("adaptor.json" if method == "adaptor" else "ryzen_embedding_training.json"))
                          .read_text())
        plan = info["training"] if method == "adaptor" else info
        assert plan["prefix_sizes"] == [8, 32] and plan["steps"] == (4 if method == "adaptor" else 3)
        assert info["training_pairs"] == len(word_pairs)
        loaded = load_embedder(str(out))
        assert isinstance(loaded, AdaptedEmbedder if method == "adaptor" else EncoderEmbedder)

    for bad, message in ((["--divisors", "4,x"], "comma-separated"), (["--divisors", "0"], "divisors must be"),
                         ([], "fewer than one batch of 128")):
        result = ryzen_cli("embed-train", str(pairs_file), "--model", str(encoder_dir), "--out", str(tmp_path / "x"), *bad)
        assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr
    result = ryzen_cli("embed-train", str(tmp_path / "missing.jsonl"), "--out", str(tmp_path / "x"))
    assert result.returncode == 2 and "neither stdlib-functions nor a .jsonl file" in result.stderr
