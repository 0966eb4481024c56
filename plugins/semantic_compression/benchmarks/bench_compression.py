"""Compression benchmark: each technique of the compression plugin against quality, on real text.

    python plugins/semantic_compression/benchmarks/bench_compression.py \
        --out plugins/semantic_compression/benchmarks/bench_results

Trains the built-in model on the Python standard library with the core Trainer (same seed,
data and step budget for every variant): plain, Matryoshka (nested loss), saved
activations in bf16 and in int8, and top-k sparsity raised by on_epoch_end toward its
target. Then measures:

- retrieval (recall@1/10, nDCG@10) of float32, int8, binary and binary+rescore indexes and
  of Matryoshka prefixes, for all-MiniLM-L6-v2 (if the `minilm` extra is installed) and
  for the trained models' pooled hidden states, on held-out stdlib functions;
- test perplexity with the LM head on hidden-state prefixes, and with top-k at several
  sparsities; batch-1 decode tokens/s sparse vs dense and truncated vs full head
  (interleaved pairs, ryzen_core.paired_ratios);
- Matryoshka sentence embeddings: MiniLM trained on stdlib training-split pairs with the
  nested contrastive loss and without it (a linear adaptor on frozen embeddings, and full
  fine-tuning), prefixes evaluated on the held-out functions;
- peak tensor memory of a training step with each saved-activation level, and the
  validation loss each level trained to.

Writes bench_results.json and bench_results.md into --out. Everything runs offline.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger("bench_compression")

DIVISORS = [16, 8, 4, 2, 1]
VARIANTS: dict[str, dict[str, Any] | None] = {
    "plain": None,  # no plugin: the core forward alone
    "matryoshka": dict(matryoshka=True, saved_activations="off", saved_activations_target="off"),
    "saved-bf16": dict(matryoshka=False, saved_activations="bf16", saved_activations_target="bf16"),
    "saved-int8": dict(matryoshka=False, saved_activations="int8", saved_activations_target="int8"),
    "sparse-adaptive": dict(matryoshka=False, saved_activations="off", saved_activations_target="off",
                            sparsity=0.0, sparsity_target=0.875, sparsity_step=0.25),
}


def train_variants(config, data, names: list[str], work_dir: Path) -> tuple[dict, dict]:
    from ryzen_core import PluginHost, Trainer

    from ryzen_plugin_semantic_compression.plugin import CompressionPlugin, CompressionSettings

    models, summaries = {}, {}
    for name in names:
        host = PluginHost()
        host.register(CompressionPlugin, "compression")
        settings = VARIANTS[name]
        host.settings = {"compression": CompressionSettings(evaluate=False, **(settings or {}))}
        plugins = [] if settings is None else ["compression"]
        started = time.perf_counter()
        trainer = Trainer(config, host, plugins, work_dir / name, data, label=name)
        result = trainer.fit()
        test_loss = trainer.evaluate(data.test, max_batches=config.validate_.perplexity_batches)
        summary = result.metrics.summary()
        summaries[name] = {
            "settings": settings, "final_val_loss": summary["final_val_loss"], "test_loss": test_loss,
            "test_perplexity": math.exp(test_loss), "median_tokens_per_s": summary["median_tokens_per_s"],
            "train_wall_s": time.perf_counter() - started, "adaptations": result.metrics.adaptations,
            "events": [e.__dict__ for e in host.events if e.hook == "on_epoch_end"],
        }
        log.info("%s: val loss %.4f, test ppl %.2f, %.0f tok/s, %.0f s", name, summary["final_val_loss"],
                 math.exp(test_loss), summary["median_tokens_per_s"], summaries[name]["train_wall_s"])
        models[name] = result.model.eval()
    return models, summaries


def wide_ffn_model(vocab_size: int):
    """Random weights, wider feed-forward (d_ff = 4 d): decode speed does not depend on the weights' values."""
    from ryzen_core import Transformer, TransformerConfig

    torch.manual_seed(0)
    return Transformer(TransformerConfig(vocab_size=vocab_size, d_model=512, n_heads=8, n_layers=4, d_ff=2048,
                                         context_length=128)).eval()


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "bench_results")
    parser.add_argument("--preset", default="simple")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--eval-every", type=int, default=50)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--retrieval-pairs", type=int, default=None, help="cap per retrieval set (default: all)")
    parser.add_argument("--perplexity-batches", type=int, default=16)
    parser.add_argument("--decode-repeats", type=int, default=15)
    parser.add_argument("--decode-threads", type=int, default=1,
                        help="intra-op threads for decode timing (2 threads on a shared 2-core machine swing 10x)")
    parser.add_argument("--decode-new-tokens", type=int, default=64)
    parser.add_argument("--memory-repeats", type=int, default=2)
    parser.add_argument("--memory-batch", type=int, default=32, help="batch of the scaled-preset memory rows")
    parser.add_argument("--no-minilm", action="store_true")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--embedding-methods", default="adaptor,full",
                        help="Matryoshka sentence embeddings: train MiniLM nested vs plain this way (adaptor, full; "
                             "empty: skip)")
    parser.add_argument("--embedding-epochs", type=int, default=10)
    parser.add_argument("--embedding-steps", type=int, default=80)
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    for noisy in ("ryzen_core.data", "ryzen_core.trainer", "httpx", "transformers"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    torch.set_num_threads(args.threads)

    from ryzen_core import load_config, load_data

    from ryzen_plugin_semantic_compression.evaluation import machine, perplexity_by_head_dims

    started = time.perf_counter()
    args.out.mkdir(parents=True, exist_ok=True)
    config = load_config(None, [f"model.preset={args.preset}", f"train.max_steps={args.steps}",
                                f"train.eval_every={args.eval_every}", "train.checkpoint_every=1000000",
                                f"validate.perplexity_batches={args.perplexity_batches}"])
    data = load_data(config)
    results: dict[str, Any] = {"command": " ".join(["python", *sys.argv]), "machine": machine(),
                               "config": config.dump(), "skipped": {}}

    with tempfile.TemporaryDirectory(prefix="bench-compression-") as tmp:
        models, results["training"] = train_variants(config, data, args.variants.split(","), Path(tmp))

    # Matryoshka: LM head on hidden prefixes.
    results["perplexity_by_head_dims"] = {
        name: perplexity_by_head_dims(models[name], data.test, DIVISORS, config.train.batch_size,
                                      args.perplexity_batches)
        for name in ("plain", "matryoshka") if name in models}
    measure_sparsity_and_decode(models, data, config.train.batch_size, args, results)
    measure_retrieval(models, data, args, results)
    measure_saved_activations(models, data, config, args, results)
    results["wall_s"] = time.perf_counter() - started

    (args.out / "bench_results.json").write_text(json.dumps(results, indent=2, default=str) + "\n")
    (args.out / "bench_results.md").write_text(markdown(results))
    print(markdown(results))


def measure_sparsity_and_decode(models: dict, data, batch: int, args, results: dict[str, Any]) -> None:
    """Sparse activations post hoc on the plain model and on the model trained toward its target; batch-1
    decode speed of top-k and of the truncated LM head."""
    from ryzen_plugin_semantic_compression.evaluation import (mlp_decode_speed, perplexity_by_sparsity,
                                                              sparse_decode_speed, truncated_head_decode_speed)
    from ryzen_plugin_semantic_compression.run_report import highest_level_within
    from ryzen_plugin_semantic_compression.sparse import apply_topk, current_sparsity, topk_layers

    levels = [0.25, 0.5, 0.625, 0.75, 0.875, 0.9375]
    sparse_names = [n for n in ("plain", "sparse-adaptive") if n in models]
    results["perplexity_by_sparsity"] = {
        name: perplexity_by_sparsity(models[name], data.test, sorted({*levels, current_sparsity(models[name])} - {0.0}),
                                     batch, args.perplexity_batches) for name in sparse_names}
    prompt = data.test[:1, :32]
    decode: dict[str, Any] = {}
    threads, repeats, new_tokens = args.decode_threads, args.decode_repeats, args.decode_new_tokens
    if "plain" in models:
        level = highest_level_within(results["perplexity_by_sparsity"]["plain"])
        if level is None:
            results["skipped"]["plain sparse decode"] = "no post-hoc sparsity keeps perplexity within 5%"
        else:
            decode[f"plain model, top-k post hoc at {level:g} vs dense"] = sparse_decode_speed(
                models["plain"], level, prompt, new_tokens, repeats, threads)
            decode[f"one FFN layer of it alone ({models['plain'].config.d_model}->{models['plain'].config.d_ff}), "
                   f"top-k {level:g} vs dense"] = mlp_decode_speed(topk_layers(models["plain"])[0], level,
                                                                   repeats=repeats, threads=threads)
    if "sparse-adaptive" in models:
        own = current_sparsity(models["sparse-adaptive"])
        wide = wide_ffn_model(data.tokenizer.vocab_size)
        decode[f"sparse-adaptive model at its trained {own:g} vs dense"] = sparse_decode_speed(
            models["sparse-adaptive"], own, prompt, new_tokens, repeats, threads)
        decode[f"one FFN layer of it alone, top-k {own:g} vs dense"] = mlp_decode_speed(
            topk_layers(models["sparse-adaptive"])[0], own, repeats=repeats, threads=threads)
        wide_layer = apply_topk(wide, 0.0)[0]
        decode[f"wider FFN layer alone (512->2048, random weights), top-k {own:g} vs dense"] = mlp_decode_speed(
            wide_layer, own, repeats=repeats, threads=threads)
        decode[f"random d=512 d_ff=2048 x4 layers, whole model, top-k {own:g} vs dense"] = sparse_decode_speed(
            wide, own, prompt, new_tokens, repeats, threads)
    if "matryoshka" in models:
        quarter = models["matryoshka"].config.d_model // 4
        decode[f"matryoshka model, LM head on {quarter} (d/4) vs full"] = truncated_head_decode_speed(
            models["matryoshka"], quarter, prompt, new_tokens, repeats, threads)
    results["decode"] = decode


def measure_retrieval(models: dict, data, args, results: dict[str, Any]) -> None:
    """Quantized indexes and Matryoshka prefixes for MiniLM and the trained models; then MiniLM trained with
    and without the nested contrastive loss."""
    from ryzen_plugin_semantic_compression.embedders import MINILM_MISSING, LMEmbedder, load_minilm, minilm_path
    from ryzen_plugin_semantic_compression.embedding_training import native_bf16
    from ryzen_plugin_semantic_compression.evaluation import evaluate_embedder, matryoshka_embedding_comparison
    from ryzen_plugin_semantic_compression.retrieval import STDLIB_CODE_HALVES, STDLIB_FUNCTIONS, load_retrieval_set

    results["retrieval"] = []
    functions = load_retrieval_set(STDLIB_FUNCTIONS, args.retrieval_pairs)
    halves = load_retrieval_set(STDLIB_CODE_HALVES, args.retrieval_pairs)
    if args.no_minilm:
        results["skipped"]["minilm"] = "--no-minilm"
    elif minilm_path() is None:
        results["skipped"]["minilm"] = MINILM_MISSING
        log.warning("skipping MiniLM: %s", MINILM_MISSING)
    else:
        results["retrieval"].append(evaluate_embedder(load_minilm(), functions, DIVISORS, 4))
    for name in ("plain", "matryoshka"):
        if name in models:
            for rset in (functions, halves):
                embedder = LMEmbedder(models[name], data.tokenizer, name=f"{name} LM")
                results["retrieval"].append(evaluate_embedder(embedder, rset, DIVISORS, 4))

    results["matryoshka_embeddings"] = {}
    methods = [m for m in args.embedding_methods.split(",") if m]
    if methods and minilm_path() is not None and not args.no_minilm:
        sweep = [dict(epochs=e, lr=lr, batch_size=b) for e, lr, b in
                 ((5, 1e-3, 128), (20, 1e-3, 128), (10, 3e-4, 128), (40, 3e-4, 128), (10, 1e-3, 256))]
        for method in methods:
            # batch size and learning rate: each method's defaults (AdaptorTraining, EmbeddingTraining)
            training = (dict(epochs=args.embedding_epochs, seed=0, max_tokens=128) if method == "adaptor" else
                        dict(steps=args.embedding_steps, seed=0, max_tokens=128, bf16=native_bf16()))
            results["matryoshka_embeddings"][method] = matryoshka_embedding_comparison(
                load_minilm, functions, DIVISORS, None, training, method=method,
                sweep=sweep if method == "adaptor" else ())
            log.info("Matryoshka embeddings (%s) done", method)


def measure_saved_activations(models: dict, data, config, args, results: dict[str, Any]) -> None:
    """Peak training-step memory per saved-activation level: the trained plain model, and the scaled preset."""
    from ryzen_core import Transformer, TransformerConfig

    from ryzen_plugin_semantic_compression.evaluation import training_step_memory

    batch = config.train.batch_size
    memory = {}
    if "plain" in models:
        memory[f"{args.preset} (trained plain), batch {batch}x{config.data.seq_len}"] = training_step_memory(
            models["plain"], data.train[:batch], repeats=args.memory_repeats)
    torch.manual_seed(0)
    scaled = TransformerConfig.from_preset("scaled", vocab_size=data.tokenizer.vocab_size)
    rows = data.train[:args.memory_batch]
    shape = f"batch {args.memory_batch}x{config.data.seq_len}"
    memory[f"scaled (random init), {shape}"] = training_step_memory(Transformer(scaled), rows,
                                                                    repeats=args.memory_repeats)
    results["saved_activation_memory"] = memory


def markdown(results: dict[str, Any]) -> str:
    from ryzen_core import markdown_table

    from ryzen_plugin_semantic_compression.tables import (decode_table, embedding_sweep_table, head_dims_table,
                                                          matryoshka_embedding_table, memory_table, retrieval_tables,
                                                          sparsity_table)

    m = results["machine"]
    training = results["training"]
    plain = training.get("plain")
    rows = [[name, f"{t['final_val_loss']:.4f}",
             f"{t['final_val_loss'] / plain['final_val_loss'] - 1:+.2%}" if plain else "-",
             f"{t['test_perplexity']:.2f}", f"{t['median_tokens_per_s']:.0f}", f"{t['train_wall_s']:.0f}",
             "; ".join(f"step {a['step']}: {a['changes']}" for a in t["adaptations"]) or "-"]
            for name, t in training.items()]
    lines = [
        "# Compression benchmark", "",
        f"Command: `{results['command']}`", "",
        f"Machine: {m['cpu']}, {m['usable_cores']} usable cores, torch {m['torch']} ({m['torch_threads']} threads); "
        f"1-minute load average {m['load_average_1m']:.2f} at the start (the machine is shared). "
        f"Total wall time {results['wall_s'] / 60:.1f} min.", "",
    ]
    if results["skipped"]:
        lines += ["Skipped:", ""] + [f"- {k}: {v}" for k, v in results["skipped"].items()] + [""]
    lines += ["## Training (same seed, data and steps)", "",
              markdown_table(["variant", "final val loss", "vs plain", "test ppl", "median train tok/s", "wall s",
                              "on_epoch_end changes"], rows), "",
              "## Matryoshka: LM head on hidden-state prefixes", "", head_dims_table(results["perplexity_by_head_dims"]),
              "", "## Sparse activations", "",
              sparsity_table(results["perplexity_by_sparsity"], "plain" if "plain" in results["perplexity_by_sparsity"]
                             else None), "",
              "## Decode speed, batch 1 (interleaved pairs)", "", decode_table(results["decode"]), "",
              "## Retrieval", ""]
    for result in results["retrieval"]:
        lines += [retrieval_tables(result), ""]
    for method, comparison in results.get("matryoshka_embeddings", {}).items():
        lines += [f"## Matryoshka sentence embeddings ({method}): trained with and without the nested loss", "",
                  matryoshka_embedding_table(comparison), ""]
        if comparison.get("sweep"):
            lines += ["Other adaptor settings, same embeddings and pairs:", "", embedding_sweep_table(comparison), ""]
    lines += ["## Compressed saved activations: peak memory of one training step", "",
              memory_table(results["saved_activation_memory"]), ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
