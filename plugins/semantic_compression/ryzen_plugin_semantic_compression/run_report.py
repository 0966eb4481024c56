"""on_train_end: measure every technique on the model a run just trained, and report it.

Writes compression_analysis.json and compression_report.md into the variant's directory and
records the figures as events (they land in optimization_analysis.json). Inside `ryzen run`
the run's baseline (trained without this plugin, handed over live as `context.baseline`) is
measured beside this variant's model, so each table compares a model trained with the
techniques against the same model trained without them.
"""
from __future__ import annotations

import copy
import json
import logging
import time
from pathlib import Path
from typing import Any, Callable

from ryzen_core import context_length

from .embedders import MINILM, MINILM_MISSING, EncoderEmbedder, LMEmbedder, load_minilm, minilm_path
from .evaluation import (evaluate_embedder, float_ndcg, machine, matryoshka_embedding_comparison, mlp_decode_speed,
                         perplexity_by_head_dims,
                         perplexity_by_sparsity, sparse_decode_speed, training_step_memory,
                         truncated_head_decode_speed)
from .matryoshka import output_head
from .retrieval import load_retrieval_set
from .sparse import apply_topk, current_sparsity
from .tables import (decode_table, head_dims_table, matryoshka_embedding_table, memory_table, retrieval_tables,
                     sparsity_table)

log = logging.getLogger(__name__)
PERPLEXITY_TOLERANCE = 0.05  # "within 5%" of the dense model
REFERENCE = "baseline"  # what the baseline is called in the tables


def live_baseline(handle):
    """A copy of the run's live baseline model (measuring swaps its MLPs for top-k ones), or None."""
    if handle is None or handle.model is None:
        return None
    return copy.deepcopy(handle.model)


def highest_level_within(ppl: dict[float, float], tolerance: float = PERPLEXITY_TOLERANCE) -> float | None:
    dense = ppl[0.0]
    ok = [level for level, p in ppl.items() if level > 0 and p <= dense * (1 + tolerance)]
    return max(ok) if ok else None


class Measurement:
    """What one on_train_end measures: the models, the data, the settings, and the results so far."""

    def __init__(self, model, name: str, baseline, config, settings, record: Callable, data):
        self.model, self.name, self.settings, self.record, self.data = model, name, settings, record, data
        self.models = {name: model, **({REFERENCE: baseline} if baseline is not None else {})}
        self.batch_size = config.train.batch_size
        self.batches = settings.perplexity_batches or config.validate_.perplexity_batches
        self.seed = config.train.seed
        self.results: dict[str, Any] = {"machine": machine(), "models": list(self.models), "skipped": {},
                                        "section_s": {}}
        self._clock = time.perf_counter()

    def done(self, section: str) -> None:
        now = time.perf_counter()
        self.results["section_s"][section] = now - self._clock
        log.info("compression: %s measured in %.1f s", section, now - self._clock)
        self._clock = now


def evaluate_run(model, run_dir: Path, config, settings, record, data, baseline=None,
                 name: str = "optimized") -> Path:
    """Measure every technique on `model` (called `name`) and on `baseline` if given; returns the report's path."""
    run_dir = Path(run_dir)
    m = Measurement(model, name, baseline, config, settings, record, data)
    measure_head_dims(m)
    measure_sparsity(m)
    measure_retrieval(m)
    measure_embedding_training(m, run_dir / "matryoshka-embedder")
    measure_saved_activations(m)
    (run_dir / "compression_analysis.json").write_text(json.dumps(m.results, indent=2, default=str) + "\n")
    report = run_dir / "compression_report.md"
    report.write_text(markdown(m.results))
    return report


def measure_head_dims(m: Measurement) -> None:
    """1. Matryoshka: the LM head on hidden-state prefixes."""
    m.results["perplexity_by_head_dims"] = {
        name: perplexity_by_head_dims(model, m.data.test, m.settings.matryoshka_divisors, m.batch_size, m.batches)
        for name, model in m.models.items()}
    m.record("matryoshka_head_perplexity", **{n: {str(k): v for k, v in p.items()}
                                               for n, p in m.results["perplexity_by_head_dims"].items()})
    m.done("Matryoshka head perplexity")


def measure_sparsity(m: Measurement) -> None:
    """3. Sparse activations: perplexity at several sparsities, and decode speed where it stays within 5%."""
    settings, model = m.settings, m.model
    own = current_sparsity(model)
    levels = sorted({*settings.sparsity_levels, *([own] if own > 0 else [])})
    by_sparsity = {name: perplexity_by_sparsity(mod, m.data.test, levels, m.batch_size, m.batches)
                   for name, mod in m.models.items()}
    m.results["perplexity_by_sparsity"] = by_sparsity
    m.record("sparsity_perplexity", **{n: {str(k): v for k, v in p.items()} for n, p in by_sparsity.items()})
    decode_level = own if own > 0 else highest_level_within(by_sparsity[m.name])
    prompt = m.data.test[:1, : min(32, m.data.test.shape[1] - 1)]
    new_tokens = min(settings.decode_new_tokens, context_length(model) - prompt.shape[1])
    decode: dict[str, Any] = {}
    if decode_level is None:
        m.results["skipped"]["sparse_decode"] = (f"no sparsity level keeps test perplexity within "
                                                 f"{PERPLEXITY_TOLERANCE:.0%} of dense for this model")
    else:
        decode[f"whole model, top-k {decode_level:g} vs dense FFN"] = sparse_decode_speed(
            model, decode_level, prompt, new_tokens, settings.decode_repeats, settings.decode_threads)
        layer = apply_topk(model, current_sparsity(model))[0]
        decode[f"one FFN layer alone, top-k {decode_level:g} vs dense"] = mlp_decode_speed(
            layer, decode_level, repeats=max(settings.decode_repeats, 5), threads=settings.decode_threads)
        for comparison in list(decode):
            m.record("sparse_decode", comparison=comparison, **_compact(decode[comparison]))
    quarter = output_head(model).in_features // 4
    decode["LM head on d/4 vs full"] = truncated_head_decode_speed(model, quarter, prompt, new_tokens,
                                                                   settings.decode_repeats, settings.decode_threads)
    m.record("truncated_head_decode", **_compact(decode["LM head on d/4 vs full"]))
    m.results["decode"] = decode
    m.done("sparsity perplexity and decode speed")


def measure_retrieval(m: Measurement) -> None:
    """2. Embedding quantization and Matryoshka prefixes on real retrieval sets."""
    settings = m.settings
    m.results["retrieval"] = []
    for source in settings.retrieval_sources:
        rset = load_retrieval_set(source, settings.retrieval_pairs)
        for name, model in m.models.items():
            result = evaluate_embedder(LMEmbedder(model, m.data.tokenizer, name=f"{name} LM"), rset,
                                       settings.matryoshka_divisors, settings.rescore_multiplier)
            m.results["retrieval"].append(result)
            m.record("retrieval", **_retrieval_summary(result))
    if settings.minilm:
        if minilm_path() is None:
            m.results["skipped"]["minilm"] = MINILM_MISSING
            m.record("skipped", what="minilm", reason=MINILM_MISSING)
        else:
            rset = load_retrieval_set(settings.retrieval_sources[0], settings.retrieval_pairs)
            result = evaluate_embedder(load_minilm(), rset, settings.matryoshka_divisors, settings.rescore_multiplier)
            m.results["retrieval"].append(result)
            m.record("retrieval", **_retrieval_summary(result))
    m.done("retrieval")


def measure_embedding_training(m: Measurement, save_nested_to: Path) -> None:
    """1b. Matryoshka for sentence embeddings: a pretrained encoder trained with and without the nested loss."""
    settings = m.settings
    wants_minilm = settings.embedding_model == MINILM
    if settings.embedding_training == "off" or (wants_minilm and not settings.minilm):
        return
    if wants_minilm and minilm_path() is None:
        m.results["skipped"]["matryoshka_embeddings"] = MINILM_MISSING
        return
    rset = load_retrieval_set(settings.retrieval_sources[0], settings.retrieval_pairs)
    comparison = matryoshka_embedding_comparison(
        load_minilm if wants_minilm else lambda: EncoderEmbedder(settings.embedding_model),
        rset, settings.matryoshka_divisors, settings.matryoshka_weights,
        training=embedding_training_arguments(settings, m.seed),
        method=settings.embedding_training, base_spec=settings.embedding_model,
        rescore_multiplier=settings.rescore_multiplier, save_nested_to=save_nested_to,
        progress=_embedding_progress(settings.embedding_steps))
    m.results["matryoshka_embeddings"] = comparison
    m.record("matryoshka_embeddings", **matryoshka_embedding_summary(comparison))
    m.done("Matryoshka embedding training")


def measure_saved_activations(m: Measurement) -> None:
    """4. Compressed saved activations: peak memory of a training step."""
    batch = m.data.train[: m.settings.memory_batch_size or m.batch_size]
    memory = {f"{m.name}, batch {tuple(batch[:, :-1].shape)}": training_step_memory(
        m.model, batch, repeats=m.settings.memory_repeats)}
    m.results["saved_activation_memory"] = memory
    for name, result in memory.items():
        m.record("saved_activation_memory", model=name, static_bytes=result["static_bytes"],
                 **{level: {"peak_bytes": r["peak_bytes"], "reduction": r.get("reduction")}
                    for level, r in result["levels"].items()}, gradient_cosine=result["gradient_cosine"])
    m.done("saved-activation memory")


def embedding_training_arguments(settings, seed: int) -> dict[str, Any]:
    """AdaptorTraining / EmbeddingTraining fields (plus max_tokens, bf16) from the plugin's settings; unset
    batch size and learning rate keep each method's own defaults."""
    from .embedding_training import native_bf16

    chosen = dict(batch_size=settings.embedding_batch_size, lr=settings.embedding_lr)
    arguments = dict({k: v for k, v in chosen.items() if v is not None}, seed=seed,
                     max_tokens=settings.embedding_max_tokens)
    if settings.embedding_training == "adaptor":
        return dict(arguments, epochs=settings.embedding_epochs)
    return dict(arguments, steps=settings.embedding_steps, bf16=native_bf16(settings.embedding_bf16))


def _embedding_progress(steps: int):
    """A progress bar per fine-tuning for a person watching; a log line every 20 steps otherwise (CI)."""
    import sys

    def start(variant: str):
        if sys.stderr.isatty():
            from tqdm.auto import tqdm

            bar = tqdm(total=steps, desc=f"embedder fine-tuning, {variant}", unit="step", leave=False)

            def update(step: int, loss: float) -> None:
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.3f}")
                if step + 1 == steps:
                    bar.close()
            return update

        def log_line(step: int, loss: float) -> None:
            if (step + 1) % 20 == 0 or step + 1 == steps:
                log.info("compression: embedder fine-tuning (%s) step %d/%d, loss %.4f", variant, step + 1, steps, loss)
        return log_line
    return start


def matryoshka_embedding_summary(comparison: dict[str, Any]) -> dict[str, Any]:
    """The figures of the comparison without the per-query lists (those stay in compression_analysis.json)."""
    sizes = comparison["sizes"]
    return {"method": comparison["method"], "set": comparison["set"], "training_pairs": comparison["training_pairs"],
            "ndcg@10": {v: {s: float_ndcg(comparison[v], s) for s in sizes} for v in comparison["variants"]},
            "retention": comparison["retention"], "margin_nested_minus_plain": comparison["margin_nested_minus_plain"],
            "training": {v: comparison[v]["training"] for v in ("nested", "plain")}}


def _compact(comparison: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in comparison.items() if k not in ("ratios", "values_a", "values_b")}


def _retrieval_summary(result: dict[str, Any]) -> dict[str, Any]:
    return {"model": result["model"], "set": result["set"], "rows": result["rows"]}


def markdown(results: dict[str, Any]) -> str:
    m = results["machine"]
    lines = ["# Compression plugin: measured on this run", "",
             f"Machine: {m['cpu']}, {m['usable_cores']} usable cores, torch {m['torch']} with {m['torch_threads']} "
             f"threads; 1-minute load average {m['load_average_1m']:.2f} when the measurements started.", ""]
    if results["skipped"]:
        lines += ["Skipped:", ""] + [f"- {k}: {v}" for k, v in results["skipped"].items()] + [""]
    lines += ["## Matryoshka: LM head on a prefix of the hidden state", "",
              head_dims_table(results["perplexity_by_head_dims"]), "",
              "## Sparse feed-forward activations", "",
              sparsity_table(results["perplexity_by_sparsity"],
                             REFERENCE if REFERENCE in results["perplexity_by_sparsity"] else None), "",
              decode_table(results["decode"]), "",
              "## Embedding quantization and Matryoshka prefixes", ""]
    for result in results["retrieval"]:
        lines += [retrieval_tables(result), ""]
    if "matryoshka_embeddings" in results:
        lines += ["## Matryoshka sentence embeddings: trained with and without the nested loss", "",
                  matryoshka_embedding_table(results["matryoshka_embeddings"]), ""]
    lines += ["## Compressed saved activations", "", memory_table(results["saved_activation_memory"]), ""]
    return "\n".join(lines)
