"""Measurements of each technique: compression against quality, on real text.

Used by on_train_end (one trained model, plus the baseline of the same `ryzen run` when
there is one) and by benchmarks/bench_compression.py (controlled pairs of models). Every speed and
memory comparison is interleaved A B A B with ryzen_core.paired_ratios.
"""
from __future__ import annotations

import contextlib
import copy
import math
import os
import time
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .matryoshka import output_head, prefix_sizes, truncated_head
from .quantization import QuantizedIndex
from .retrieval import RetrievalSet, ndcg_per_query, overlap_at_k, retrieval_metrics
from .saved_activations import (LEVELS, PeakTensorBytes, compressed_saved_activations, optimizer_state_tensors,
                                tensor_bytes)
from .sparse import apply_topk, current_sparsity, topk_layers


# (method, rescore_with) rows of every retrieval table
SEARCHES: list[tuple[str, str | None]] = [("float32", None), ("int8", None), ("binary", None),
                                          ("binary-rescore", "binary"), ("binary-rescore", "int8"),
                                          ("binary-rescore", "float32")]


def machine() -> dict[str, Any]:
    from ryzen_core import cpu_features

    cpu = cpu_features()
    return {"cpu": cpu.model, "usable_cores": cpu.usable_cores, "torch_threads": torch.get_num_threads(),
            "load_average_1m": os.getloadavg()[0], "torch": torch.__version__}


# ----------------------------------------------------------------------------- language model quality


@torch.inference_mode()
def split_loss(model: torch.nn.Module, split: torch.Tensor, batch_size: int, max_batches: int,
              head_dims: int | None = None) -> float:
    """Mean next-token loss (nats) over the first batches of a packed split, optionally with a truncated head."""
    from ryzen_core import lm_logits

    was_training = model.training
    model.eval()
    rows = split[: batch_size * max_batches]
    total, count = 0.0, 0
    try:
        with truncated_head(model, head_dims):
            for i in range(0, len(rows), batch_size):
                batch = rows[i: i + batch_size]
                logits = lm_logits(model, batch[:, :-1]).float()
                total += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1),
                                         reduction="sum").item()
                count += batch[:, 1:].numel()
    finally:
        model.train(was_training)
    return total / count


def perplexity_by_head_dims(model, split, divisors: Sequence[int], batch_size: int, max_batches: int) -> dict[int, float]:
    sizes = prefix_sizes(output_head(model).in_features, divisors)
    return {size: math.exp(split_loss(model, split, batch_size, max_batches, size)) for size in sizes}


def perplexity_by_sparsity(model, split, levels: Sequence[float], batch_size: int, max_batches: int) -> dict[float, float]:
    """Test perplexity with top-k at each sparsity (0.0 = dense); the model's own sparsity is restored after."""
    had_topk, own = bool(topk_layers(model)), current_sparsity(model)
    own_k = topk_layers(model)[0].k if had_topk else None
    out = {}
    try:
        for level in sorted({0.0, *levels}):
            apply_topk(model, level)
            out[level] = math.exp(split_loss(model, split, batch_size, max_batches))
    finally:
        for layer in apply_topk(model, own):
            layer.k = own_k
    return out


# ----------------------------------------------------------------------------- decode speed


@contextlib.contextmanager
def torch_threads(threads: int | None):
    """Run the block with `threads` intra-op threads (None: leave as is).

    Batch-1 decode of a small model is a chain of tiny ops; with 2 OpenMP threads on a
    shared 2-core machine a single preempted worker stalls every op, and per-run rates
    swing by 10x. One thread measures the work, not the scheduling.
    """
    previous = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def decode_comparison(model: torch.nn.Module, prompt: torch.Tensor, new_tokens: int, repeats: int,
                      setup_a: Callable[[], None], setup_b: Callable[[], None], warmup: int = 1,
                      threads: int | None = 1) -> dict[str, Any]:
    """Batch-1 greedy decode tokens/s of one model in two configurations, interleaved A B A B.

    `setup_a` / `setup_b` switch the model into each configuration before each run.
    """
    from ryzen_core import TorchBackend, paired_ratios, time_generation

    backend = TorchBackend(model, "torch")

    def run(setup):
        def measure() -> float:
            setup()
            return time_generation(backend, prompt, new_tokens).decode_tokens_per_s
        return measure

    with torch_threads(threads):
        comparison = paired_ratios(run(setup_a), run(setup_b), warmup=warmup, repeats=repeats, higher_is_better=True)
    result = comparison.to_dict()
    result.update(tokens_per_s_a=float(np.median(comparison.values_a)), tokens_per_s_b=float(np.median(comparison.values_b)),
                  prompt_tokens=int(prompt.shape[1]), new_tokens=new_tokens, threads=torch.get_num_threads()
                  if threads is None else threads)
    return result


def sparse_decode_speed(model, sparsity: float, prompt, new_tokens: int, repeats: int,
                        threads: int | None = 1) -> dict[str, Any]:
    """Dense MLPs (A) against top-k MLPs with the gathered down-projection (B), same weights."""
    own = topk_layers(model)[0].k if topk_layers(model) else None
    try:
        result = decode_comparison(model, prompt, new_tokens, repeats, lambda: apply_topk(model, 0.0),
                                   lambda: apply_topk(model, sparsity), threads=threads)
    finally:
        for layer in apply_topk(model, 0.0):
            layer.k = own
    result.update(sparsity=sparsity, a="dense feed-forward", b=f"top-k (sparsity {sparsity:g}), gathered down-projection")
    return result


def truncated_head_decode_speed(model, dims: int, prompt, new_tokens: int, repeats: int,
                                threads: int | None = 1) -> dict[str, Any]:
    """Full LM head (A) against the head on the first `dims` hidden dimensions (B)."""
    from ryzen_core import TorchBackend, paired_ratios, time_generation

    backend = TorchBackend(model, "torch")

    def full() -> float:
        return time_generation(backend, prompt, new_tokens).decode_tokens_per_s

    def truncated() -> float:
        with truncated_head(model, dims):
            return time_generation(backend, prompt, new_tokens).decode_tokens_per_s

    with torch_threads(threads):
        comparison = paired_ratios(full, truncated, warmup=1, repeats=repeats, higher_is_better=True)
    result = comparison.to_dict()
    result.update(dims=dims, tokens_per_s_a=float(np.median(comparison.values_a)),
                  tokens_per_s_b=float(np.median(comparison.values_b)), new_tokens=new_tokens, threads=threads)
    return result


def mlp_decode_speed(layer, sparsity: float, calls: int = 200, repeats: int = 15,
                     threads: int | None = 1) -> dict[str, Any]:
    """One feed-forward layer alone on single tokens: dense (A) vs top-k with the gathered down-projection (B).

    Each measurement times `calls` forwards of one token under inference_mode; rounds are
    interleaved A B A B. Without the rest of the model around it this isolates whether
    reading k rows instead of d_ff actually beats the dense matrix-vector product.
    """
    from ryzen_core import paired_ratios

    own = layer.k
    x = torch.randn(1, 1, layer._down.out_features)  # the MLP maps d_model -> d_model
    k = max(1, round(layer.width * (1.0 - sparsity)))

    def run(k_value):
        def measure() -> float:
            layer.k = k_value
            with torch.inference_mode():
                started = time.perf_counter()
                for _ in range(calls):
                    layer(x)
                return calls / (time.perf_counter() - started)
        return measure

    was_training = layer.training
    layer.eval()
    try:
        with torch_threads(threads):
            comparison = paired_ratios(run(None), run(k), warmup=2, repeats=repeats, higher_is_better=True)
    finally:
        layer.k = own
        layer.train(was_training)
    result = comparison.to_dict()
    result.update(tokens_per_s_a=float(np.median(comparison.values_a)), tokens_per_s_b=float(np.median(comparison.values_b)),
                  sparsity=sparsity, k=k, width=layer.width, calls_per_measurement=calls, threads=threads)
    return result


# ----------------------------------------------------------------------------- retrieval


def retrieval_rows(queries: np.ndarray, documents: np.ndarray, relevant: Sequence[int], center: bool,
                   sizes: Sequence[int], rescore_multiplier: int = 4, k: int = 10) -> list[dict[str, Any]]:
    """One row per (prefix size, search): quality, bytes per document, compression and agreement with float32.

    `compression` is float32 at full width over this row's in-memory codes; for rescoring
    against int8 or float32 the documents' int8/float32 copies must also be at hand
    (`rescore_bytes_per_doc`), typically on disk.
    """
    full = documents.shape[1]
    rows = []
    for size in sizes:
        index = QuantizedIndex.build(documents, center=center, dims=size)
        prepared = index.prepare_queries(queries)
        reference = index.search(prepared, k, "float32")
        per_doc = {name: nbytes / len(documents) for name, nbytes in index.sizes().items()}
        for method, rescore_with in SEARCHES:
            started = time.perf_counter()
            ranking = index.search(prepared, k, method, rescore_multiplier, rescore_with or "int8")
            elapsed = time.perf_counter() - started
            codes = "float32" if method == "float32" else ("int8" if method == "int8" else "binary")
            name = method if rescore_with is None else f"binary+rescore({rescore_with})"
            rows.append(dict(
                dims=size, search=name, **retrieval_metrics(ranking, relevant),
                overlap_with_float32_at_10=overlap_at_k(ranking, reference, k),
                bytes_per_doc=per_doc[codes], compression=full * 4 / per_doc[codes],
                rescore_bytes_per_doc=per_doc[rescore_with] if rescore_with in ("int8", "float32") else 0.0,
                search_ms_per_query=1e3 * elapsed / len(queries)))
    base = next(r["ndcg@10"] for r in rows if r["dims"] == full and r["search"] == "float32")
    for row in rows:
        row["ndcg_vs_float32_full"] = row["ndcg@10"] / base if base > 0 else None
    return rows


def evaluate_embedder(embedder, rset: RetrievalSet, divisors: Sequence[int], rescore_multiplier: int,
                      per_query_at: Sequence[int] = ()) -> dict[str, Any]:
    """Retrieval rows for every prefix and search; `per_query_at` adds each query's float32 nDCG@10 at those
    prefix sizes (for paired comparisons between models)."""
    started = time.perf_counter()
    documents = embedder.encode(rset.documents)
    queries = embedder.encode(rset.queries)
    return evaluate_embeddings(embedder.name, embedder.center, queries, documents, rset, divisors, rescore_multiplier,
                               per_query_at, encode_s=time.perf_counter() - started)


def evaluate_embeddings(name: str, center: bool, queries: np.ndarray, documents: np.ndarray, rset: RetrievalSet,
                        divisors: Sequence[int], rescore_multiplier: int, per_query_at: Sequence[int] = (),
                        encode_s: float | None = None) -> dict[str, Any]:
    sizes = prefix_sizes(documents.shape[1], divisors)
    rows = retrieval_rows(queries, documents, rset.relevant, center, sizes, rescore_multiplier)
    result = {"model": name, "dim": int(documents.shape[1]), "centered": center,
              "set": rset.describe(), "encode_s": encode_s, "random_ndcg@10": random_ndcg(len(rset.documents)),
              "rows": rows}
    if per_query_at:
        result["ndcg_per_query"] = {}
        for size in per_query_at:
            index = QuantizedIndex.build(documents, center=center, dims=size)
            ranking = index.search(index.prepare_queries(queries), 10, "float32")
            result["ndcg_per_query"][size] = ndcg_per_query(ranking, rset.relevant).tolist()
    return result


def random_ndcg(n_documents: int, k: int = 10) -> float:
    """Expected nDCG@k of a random ranking with one relevant document among n."""
    return sum(1.0 / math.log2(r + 2) for r in range(min(k, n_documents))) / n_documents


def float_ndcg(result: dict[str, Any], dims: int) -> float:
    return next(r["ndcg@10"] for r in result["rows"] if r["dims"] == dims and r["search"] == "float32")


def paired_bootstrap(a: Sequence[float], b: Sequence[float], resamples: int = 2000, seed: int = 0) -> dict[str, float]:
    """Mean of b - a over paired items (queries) with a 95% percentile-bootstrap interval."""
    diff = np.asarray(b, dtype=np.float64) - np.asarray(a, dtype=np.float64)
    rng = np.random.default_rng(seed)
    means = diff[rng.integers(0, len(diff), size=(resamples, len(diff)))].mean(axis=1)
    low, high = np.percentile(means, [2.5, 97.5])
    return {"mean_difference": float(diff.mean()), "ci95_low": float(low), "ci95_high": float(high),
            "items": int(len(diff)), "resamples": resamples}


def matryoshka_embedding_comparison(load_base: Callable[[], Any], rset: RetrievalSet, divisors: Sequence[int],
                                    weights: Sequence[float] | None, training: dict[str, Any], method: str = "adaptor",
                                    base_spec: str = "minilm", rescore_multiplier: int = 4, save_nested_to=None,
                                    pairs: Sequence[tuple[str, str]] | None = None,
                                    progress: Callable[[str], Callable[[int, float], None] | None] | None = None,
                                    sweep: Sequence[dict[str, Any]] = ()) -> dict[str, Any]:
    """Train one pretrained embedder twice, identically but for the loss: the nested contrastive loss over
    prefixes ("nested") and the full width alone ("plain"); evaluate both and the untouched model on `rset`.

    method "adaptor": a linear adaptor on the frozen encoder's embeddings (train_adaptor; `training` holds
    AdaptorTraining fields plus max_tokens for encoding the training pairs). Also reported: the untouched
    embeddings rotated onto their principal axes (fitted on the training pairs), the unsupervised way to put
    the most variance first. method "full": the encoder itself is fine-tuned (train_embedder; EmbeddingTraining
    fields plus max_tokens and bf16). `load_base` returns a fresh copy of the embedder named `base_spec`.
    The margin at each prefix is the per-query nDCG@10 of nested minus plain with a paired bootstrap interval:
    a clear margin is an interval above zero. `pairs` defaults to the stdlib training-split pairs that share
    nothing with `rset`. `sweep` (adaptor only): further AdaptorTraining settings, each trained nested and plain
    on the same embeddings, summarised in out["sweep"] (how much the verdict depends on the chosen settings).
    """
    from .embedding_training import (AdaptedEmbedder, AdaptorTraining, EmbeddingTraining, encode_pairs, fine_tune,
                                     train_adaptor, training_pairs)
    from .matryoshka import nested_weights

    training = dict(training)
    max_tokens, bf16 = training.pop("max_tokens", None), training.pop("bf16", False)
    pairs = training_pairs([rset]) if pairs is None else pairs
    base = load_base()
    width = base.dim
    sizes = prefix_sizes(width, divisors)
    plans = {"nested": nested_weights(width, divisors, weights), "plain": ([width], [1.0])}
    out: dict[str, Any] = {"method": method, "set": rset.describe(), "training_pairs": len(pairs),
                           "max_tokens": max_tokens, "bf16_autocast": bf16 if method == "full" else False,
                           "sizes": sizes, "variants": ["base", "nested", "plain"]}

    def evaluate(name: str, queries, documents, encode_s=None) -> dict[str, Any]:
        return evaluate_embeddings(name, base.center, queries, documents, rset, divisors, rescore_multiplier,
                                   per_query_at=sizes, encode_s=encode_s)

    started = time.perf_counter()
    eval_queries, eval_documents = base.encode(rset.queries), base.encode(rset.documents)
    out["base"] = evaluate(base.name, eval_queries, eval_documents, time.perf_counter() - started)
    if method == "adaptor":
        started = time.perf_counter()
        train_queries, train_documents = encode_pairs(base, pairs, max_tokens)
        out["training_encode_s"] = time.perf_counter() - started
        axes = principal_axes(np.concatenate([train_queries, train_documents]))
        out["pca"] = evaluate(f"{base.name}, principal axes", eval_queries @ axes.T, eval_documents @ axes.T)
        out["variants"].insert(1, "pca")
        for variant, (plan_sizes, plan_weights) in plans.items():
            plan = AdaptorTraining(sizes=plan_sizes, weights=plan_weights, **training)
            embedder = AdaptedEmbedder(base, train_adaptor(train_queries, train_documents, plan), base_spec,
                                       name=f"{base.name} + adaptor trained {variant}")
            out[variant] = {**evaluate(embedder.name, embedder.adapt(eval_queries), embedder.adapt(eval_documents)),
                            "training": plan.describe()}
            if variant == "nested" and save_nested_to is not None:
                embedder.save(save_nested_to, {"training": plan.describe(), "pairs": len(pairs)})
                out["nested"]["saved_to"] = str(save_nested_to)
        out["sweep"] = [adaptor_sweep_entry(base, base_spec, plans, {**training, **changes},
                                            (train_queries, train_documents), (eval_queries, eval_documents),
                                            sizes, evaluate) for changes in sweep]
    elif method == "full":
        del base
        for variant, (plan_sizes, plan_weights) in plans.items():
            embedder = load_base()
            plan = fine_tune(embedder, pairs, EmbeddingTraining(sizes=plan_sizes, weights=plan_weights, **training),
                             max_tokens, bf16, progress(variant) if progress else None)
            embedder.name = f"{embedder.name}, fine-tuned {variant}"
            out[variant] = {**evaluate_embedder(embedder, rset, divisors, rescore_multiplier, per_query_at=sizes),
                            "training": plan.describe()}
            if variant == "nested" and save_nested_to is not None:
                embedder.save(save_nested_to)
                out["nested"]["saved_to"] = str(save_nested_to)
    else:
        raise ValueError(f"unknown embedding training method {method!r} (adaptor or full)")
    out["margin_nested_minus_plain"] = {
        size: paired_bootstrap(out["plain"]["ndcg_per_query"][size], out["nested"]["ndcg_per_query"][size])
        for size in sizes}
    out["retention"] = {variant: {size: float_ndcg(out[variant], size) / float_ndcg(out[variant], width)
                                  for size in sizes} for variant in out["variants"]}
    return out


def adaptor_sweep_entry(base, base_spec: str, plans: dict, settings: dict[str, Any], train: tuple, evaluation: tuple,
                        sizes: Sequence[int], evaluate: Callable) -> dict[str, Any]:
    """One adaptor setting of the sweep, trained nested and plain on the same embeddings: nDCG@10 and the margin."""
    from .embedding_training import AdaptedEmbedder, AdaptorTraining, train_adaptor

    trained = {}
    for variant, (plan_sizes, plan_weights) in plans.items():
        plan = AdaptorTraining(sizes=plan_sizes, weights=plan_weights, **settings)
        adaptor = AdaptedEmbedder(base, train_adaptor(*train, plan), base_spec)
        trained[variant] = evaluate(variant, *(adaptor.adapt(e) for e in evaluation))
    return {"settings": settings,
            "ndcg@10": {v: {s: float_ndcg(r, s) for s in sizes} for v, r in trained.items()},
            "margin_nested_minus_plain": {s: paired_bootstrap(trained["plain"]["ndcg_per_query"][s],
                                                              trained["nested"]["ndcg_per_query"][s])
                                          for s in sizes}}


def principal_axes(embeddings: np.ndarray) -> np.ndarray:
    """Orthonormal rows ordered by the variance of the (mean-removed) embeddings along them."""
    centered = embeddings - embeddings.mean(axis=0, keepdims=True)
    return np.linalg.svd(centered.astype(np.float64), full_matrices=False)[2].astype(np.float32)


# ----------------------------------------------------------------------------- saved-activation memory


def _train_step(model, optimizer, forward, batch, level) -> tuple[float, dict[str, int]]:
    optimizer.zero_grad(set_to_none=True)
    with compressed_saved_activations(level, model) as compressor:
        loss = forward(batch[:, :-1], batch[:, 1:]).loss
    loss.backward()
    optimizer.step()
    return loss.item(), {"packed_in": compressor.bytes_in, "packed_out": compressor.bytes_out}


def training_step_memory(model: torch.nn.Module, batch: torch.Tensor, levels: Sequence[str] = LEVELS,
                         repeats: int = 3, lr: float = 1e-4) -> dict[str, Any]:
    """Peak tensor memory of one training step (forward, backward, AdamW step) per saved-activation level.

    Measured on a copy of the model with its own optimizer, after one warm-up step so the
    optimizer state exists. Peak = weights + optimizer state (present before the step) +
    the peak of tensors allocated during the step (PeakTensorBytes). Levels are measured
    interleaved with "off" (paired_ratios, lower is better) and, on a separate copy, the
    gradient of one batch under each level is compared with the exact one (cosine).
    """
    from ryzen_core import paired_ratios, reference_forward

    work = copy.deepcopy(model).train()
    optimizer = torch.optim.AdamW(work.parameters(), lr=lr)
    forward = reference_forward(work)
    _train_step(work, optimizer, forward, batch, "off")
    static = tensor_bytes([*work.parameters(), *optimizer_state_tensors(optimizer)])
    details: dict[str, dict[str, Any]] = {}

    def measure(level: str) -> Callable[[], float]:
        def run() -> float:
            with PeakTensorBytes() as tracker:
                loss, packed = _train_step(work, optimizer, forward, batch, level)
            details[level] = {"peak_bytes": static + tracker.peak, "step_peak_bytes": tracker.peak,
                              "peak_at_op": tracker.peak_op, "loss": loss, **packed}
            return float(static + tracker.peak)
        return run

    results: dict[str, Any] = {"static_bytes": static, "batch_shape": list(batch.shape), "levels": {}}
    for level in levels:
        if level == "off":
            continue
        comparison = paired_ratios(measure("off"), measure(level), warmup=0, repeats=repeats,
                                   higher_is_better=False, better="smaller", worse="larger")
        results["levels"][level] = {**details[level], "vs_off": comparison.to_dict(),
                                    "reduction": 1.0 - float(np.median(comparison.values_b)) / float(np.median(comparison.values_a))}
    results["levels"]["off"] = details.get("off") or {}
    results["gradient_cosine"] = gradient_agreement(model, batch, [lv for lv in levels if lv != "off"])
    return results


def gradient_agreement(model, batch, levels: Sequence[str]) -> dict[str, float]:
    """Cosine similarity of the full gradient under each level with the exact gradient, same weights and batch."""
    from ryzen_core import reference_forward

    work = copy.deepcopy(model).train()
    forward = reference_forward(work)

    def gradient(level: str) -> torch.Tensor:
        work.zero_grad(set_to_none=True)
        with compressed_saved_activations(level, work):
            loss = forward(batch[:, :-1], batch[:, 1:]).loss
        loss.backward()
        return torch.cat([p.grad.reshape(-1) for p in work.parameters() if p.grad is not None])

    exact = gradient("off")
    exact = exact.double()
    return {level: float(F.cosine_similarity(exact, gradient(level).double(), dim=0)) for level in levels}
