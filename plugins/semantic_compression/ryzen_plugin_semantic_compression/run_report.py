"""on_train_end: measure every technique on the model a run just trained, and report it.

Writes compression_analysis.json and compression_report.md into the variant's run
directory and records the figures as events (they land in optimization_analysis.json).
Inside `ryzen run` the baseline of the same run (trained without this plugin) is loaded
from its checkpoint and measured beside the optimized model, so each table compares
a model trained with the techniques against the same model trained without them.
"""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

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


def baseline_model(run_dir: Path):
    """The model `ryzen run` trained without plugins next to this one, or None."""
    from .embedders import load_run_model

    sibling = Path(run_dir).parent / "baseline"
    if Path(run_dir).name == "baseline" or not (sibling / "training_checkpoint").is_dir():
        return None
    try:
        model, _, _ = load_run_model(Path(run_dir).parent, "baseline")
    except Exception as exc:  # a comparison we cannot make is reported, not fatal
        log.warning("compression: baseline model not loaded (%s)", exc)
        return None
    return model


def highest_level_within(ppl: dict[float, float], tolerance: float = PERPLEXITY_TOLERANCE) -> float | None:
    dense = ppl[0.0]
    ok = [level for level, p in ppl.items() if level > 0 and p <= dense * (1 + tolerance)]
    return max(ok) if ok else None


def evaluate_run(model, run_dir, config, settings, record) -> dict[str, Any]:
    from ryzen_core.run import load_data

    run_dir = Path(run_dir)
    data = load_data(config)
    models = {"optimized": model}
    reference = baseline_model(run_dir)
    if reference is not None:
        models["baseline"] = reference
    batch_size = config.train.batch_size
    batches = settings.perplexity_batches or config.validate_.perplexity_batches
    results: dict[str, Any] = {"machine": machine(), "models": list(models), "skipped": {}, "section_s": {}}
    clock = [time.perf_counter()]

    def done(section: str) -> None:
        now = time.perf_counter()
        results["section_s"][section] = now - clock[0]
        log.info("compression: %s measured in %.1f s", section, now - clock[0])
        clock[0] = now

    # 1. Matryoshka: the LM head on hidden-state prefixes.
    results["perplexity_by_head_dims"] = {name: perplexity_by_head_dims(m, data.test, settings.matryoshka_divisors,
                                                                        batch_size, batches)
                                          for name, m in models.items()}
    record("matryoshka_head_perplexity", **{n: {str(k): v for k, v in p.items()}
                                             for n, p in results["perplexity_by_head_dims"].items()})
    done("Matryoshka head perplexity")

    # 3. Sparse activations: perplexity at several sparsities, and decode speed where it stays within 5%.
    own = current_sparsity(model)
    levels = sorted({*settings.sparsity_levels, *([own] if own > 0 else [])})
    results["perplexity_by_sparsity"] = {name: perplexity_by_sparsity(m, data.test, levels, batch_size, batches)
                                         for name, m in models.items()}
    record("sparsity_perplexity", **{n: {str(k): v for k, v in p.items()}
                                      for n, p in results["perplexity_by_sparsity"].items()})
    decode_level = own if own > 0 else highest_level_within(results["perplexity_by_sparsity"]["optimized"])
    prompt = data.test[:1, : min(32, data.test.shape[1] - 1)]
    new_tokens = min(settings.decode_new_tokens, _context(model) - prompt.shape[1])
    decode: dict[str, Any] = {}
    if decode_level is None:
        results["skipped"]["sparse_decode"] = (f"no sparsity level keeps test perplexity within "
                                               f"{PERPLEXITY_TOLERANCE:.0%} of dense for this model")
    else:
        decode[f"whole model, top-k {decode_level:g} vs dense FFN"] = sparse_decode_speed(
            model, decode_level, prompt, new_tokens, settings.decode_repeats, settings.decode_threads)
        layer = apply_topk(model, current_sparsity(model))[0]
        decode[f"one FFN layer alone, top-k {decode_level:g} vs dense"] = mlp_decode_speed(
            layer, decode_level, repeats=max(settings.decode_repeats, 5), threads=settings.decode_threads)
        for name in list(decode):
            record("sparse_decode", comparison=name, **_compact(decode[name]))
    quarter = output_head(model).in_features // 4
    decode["LM head on d/4 vs full"] = truncated_head_decode_speed(model, quarter, prompt, new_tokens,
                                                                   settings.decode_repeats, settings.decode_threads)
    record("truncated_head_decode", **_compact(decode["LM head on d/4 vs full"]))
    results["decode"] = decode
    done("sparsity perplexity and decode speed")

    # 2. Embedding quantization and Matryoshka prefixes on real retrieval sets.
    results["retrieval"] = []
    for source in settings.retrieval_sources:
        rset = load_retrieval_set(source, settings.retrieval_pairs)
        for name, m in models.items():
            result = evaluate_embedder(LMEmbedder(m, data.tokenizer, name=f"{name} LM"), rset,
                                       settings.matryoshka_divisors, settings.rescore_multiplier)
            results["retrieval"].append(result)
            record("retrieval", **_retrieval_summary(result))
    if settings.minilm:
        if minilm_path() is None:
            results["skipped"]["minilm"] = MINILM_MISSING
            record("skipped", what="minilm", reason=MINILM_MISSING)
        else:
            rset = load_retrieval_set(settings.retrieval_sources[0], settings.retrieval_pairs)
            result = evaluate_embedder(load_minilm(), rset, settings.matryoshka_divisors, settings.rescore_multiplier)
            results["retrieval"].append(result)
            record("retrieval", **_retrieval_summary(result))
    done("retrieval")

    # 1b. Matryoshka for sentence embeddings: a pretrained encoder trained with and without the nested loss.
    wants_minilm = settings.embedding_model == MINILM
    if settings.embedding_training != "off" and (settings.minilm or not wants_minilm):
        if wants_minilm and minilm_path() is None:
            results["skipped"]["matryoshka_embeddings"] = MINILM_MISSING
        else:
            rset = load_retrieval_set(settings.retrieval_sources[0], settings.retrieval_pairs)
            comparison = matryoshka_embedding_comparison(
                load_minilm if wants_minilm else lambda: EncoderEmbedder(settings.embedding_model),
                rset, settings.matryoshka_divisors, settings.matryoshka_weights,
                training=embedding_training_arguments(settings, config.train.seed),
                method=settings.embedding_training, base_spec=settings.embedding_model,
                rescore_multiplier=settings.rescore_multiplier, save_nested_to=run_dir / "matryoshka-embedder",
                progress=_embedding_progress(settings.embedding_steps))
            results["matryoshka_embeddings"] = comparison
            record("matryoshka_embeddings", **matryoshka_embedding_summary(comparison))
            done("Matryoshka embedding training")

    # 4. Compressed saved activations: peak memory of a training step.
    memory_batch = data.train[: settings.memory_batch_size or batch_size]
    results["saved_activation_memory"] = {
        f"optimized, batch {tuple(memory_batch[:, :-1].shape)}": training_step_memory(model, memory_batch,
                                                                                   repeats=settings.memory_repeats)}
    for name, m in results["saved_activation_memory"].items():
        record("saved_activation_memory", model=name, static_bytes=m["static_bytes"],
               **{level: {"peak_bytes": r["peak_bytes"], "reduction": r.get("reduction")}
                  for level, r in m["levels"].items()}, gradient_cosine=m["gradient_cosine"])
    done("saved-activation memory")

    (run_dir / "compression_analysis.json").write_text(json.dumps(results, indent=2, default=str) + "\n")
    (run_dir / "compression_report.md").write_text(markdown(results))
    return results


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


def _context(model) -> int:
    from ryzen_core.models.build import context_length

    return context_length(model)


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
                             "baseline" if "baseline" in results["perplexity_by_sparsity"] else None), "",
              decode_table(results["decode"]), "",
              "## Embedding quantization and Matryoshka prefixes", ""]
    for result in results["retrieval"]:
        lines += [retrieval_tables(result), ""]
    if "matryoshka_embeddings" in results:
        lines += ["## Matryoshka sentence embeddings: trained with and without the nested loss", "",
                  matryoshka_embedding_table(results["matryoshka_embeddings"]), ""]
    lines += ["## Compressed saved activations", "", memory_table(results["saved_activation_memory"]), ""]
    return "\n".join(lines)
