"""Markdown tables of the measurements (shared by on_train_end's report and the benchmark)."""
from __future__ import annotations

from typing import Any, Mapping

from ryzen_core import format_ratio, markdown_table

MIB = 1024 * 1024


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def retrieval_tables(result: Mapping[str, Any]) -> str:
    """Precisions at full width, then Matryoshka prefixes, for one embedder on one retrieval set."""
    rows = result["rows"]
    full = result["dim"]
    head = (f"**{result['model']}** on {result['set']['name']} ({result['set']['queries']} queries, "
            f"{result['set']['documents']} documents; random ranking nDCG@10 = {result['random_ndcg@10']:.3f}; "
            f"embedding took {result['encode_s']:.1f} s)")
    precision = [[r["search"], f"{r['recall@1']:.3f}", f"{r['recall@10']:.3f}", f"{r['ndcg@10']:.3f}",
                  _pct(r["ndcg_vs_float32_full"]), f"{r['bytes_per_doc']:g}", f"{r['compression']:.0f}x",
                  f"{r['rescore_bytes_per_doc']:g}" if r["rescore_bytes_per_doc"] else "-",
                  f"{r['overlap_with_float32_at_10']:.3f}"]
                 for r in rows if r["dims"] == full]
    prefixes = []
    for dims in sorted({r["dims"] for r in rows}):
        by = {r["search"]: r for r in rows if r["dims"] == dims}
        f32, b = by["float32"], by["binary+rescore(binary)"]
        prefixes.append([f"{dims} (d/{full // dims})" if dims != full else f"{dims} (d)", f"{f32['recall@1']:.3f}",
                         f"{f32['recall@10']:.3f}", f"{f32['ndcg@10']:.3f}", _pct(f32["ndcg_vs_float32_full"]),
                         f"{b['ndcg@10']:.3f}", _pct(b["ndcg_vs_float32_full"]), f"{b['compression']:.0f}x"])
    return "\n".join([
        head, "",
        markdown_table(["search (full width)", "recall@1", "recall@10", "nDCG@10", "of float32", "bytes/doc in memory",
                        "compression", "rescore bytes/doc", "overlap@10 with float32"], precision), "",
        markdown_table(["Matryoshka prefix", "recall@1", "recall@10", "nDCG@10 float32", "of full float32",
                        "nDCG@10 binary+rescore(binary)", "of full float32", "compression"], prefixes),
    ])


def head_dims_table(by_model: Mapping[str, Mapping[int, float]]) -> str:
    names = list(by_model)
    sizes = sorted({s for ppl in by_model.values() for s in ppl})
    full = max(sizes)
    rows = [[f"{s} (d/{full // s})" if s != full else f"{s} (d)",
             *[f"{by_model[n][s]:.2f} ({by_model[n][s] / by_model[n][full]:.2f}x)" if s in by_model[n] else "-"
               for n in names]] for s in sizes]
    return markdown_table(["LM head on hidden prefix", *[f"test ppl, {n} (x of its full head)" for n in names]], rows)


def sparsity_table(by_model: Mapping[str, Mapping[float, float]], reference: str | None = None) -> str:
    """Test perplexity per sparsity; each cell is also compared with `reference`'s dense perplexity
    (a model trained sparse is judged against the dense model, not against itself made dense)."""
    names = list(by_model)
    levels = sorted({lv for ppl in by_model.values() for lv in ppl})

    def base(name: str) -> float:
        return by_model[reference or name][0.0]

    rows = [[f"{lv:g}", *[f"{by_model[n][lv]:.2f} ({by_model[n][lv] / base(n) - 1:+.1%})"
                          if lv in by_model[n] else "-" for n in names]] for lv in levels]
    against = f"vs dense {reference}" if reference else "vs its dense"
    return markdown_table(["FFN sparsity (top-k)", *[f"test ppl, {n} ({against})" for n in names]], rows)


def decode_table(comparisons: Mapping[str, Mapping[str, Any]]) -> str:
    rows = [[name, f"{c['tokens_per_s_a']:.1f}", f"{c['tokens_per_s_b']:.1f}", format_ratio(c, 3), c["n"],
             c["verdict"]] for name, c in comparisons.items()]
    return markdown_table(["batch-1 decode, B vs A", "A tok/s (median)", "B tok/s (median)",
                           "median ratio B/A [95% interval]", "pairs", "verdict"], rows)


def memory_table(by_model: Mapping[str, Mapping[str, Any]]) -> str:
    rows = []
    for name, m in by_model.items():
        off = m["levels"]["off"]
        rows.append([name, "off", f"{off['peak_bytes'] / MIB:.1f}", f"{off['step_peak_bytes'] / MIB:.1f}", "-", "-", "-"])
        for level, r in m["levels"].items():
            if level == "off":
                continue
            cmp = r["vs_off"]
            rows.append([name, level, f"{r['peak_bytes'] / MIB:.1f}", f"{r['step_peak_bytes'] / MIB:.1f}",
                         _pct(r["reduction"]), format_ratio(cmp, 3),
                         f"{m['gradient_cosine'][level]:.5f}"])
    return markdown_table(["model, batch", "saved activations", "peak MiB (weights + AdamW + step)",
                           "of which allocated in the step", "peak reduction", "ratio off/level [95% interval]",
                           "gradient cosine vs exact"], rows)


def matryoshka_embedding_table(comparison: Mapping[str, Any]) -> str:
    """nDCG@10 per prefix for the untouched model, its nested and plain trainings, and the paired margin."""
    sizes = comparison["sizes"]
    full = sizes[-1]
    retention = comparison["retention"]
    nested, plain = comparison["nested"]["training"], comparison["plain"]["training"]
    columns = {"base": "untouched", "pca": "untouched, principal axes", "plain": "trained plain",
               "nested": "trained nested"}
    variants = [v for v in ("base", "pca", "plain", "nested") if v in comparison["variants"]]

    def ndcg(variant: str, dims: int) -> str:
        value = next(r["ndcg@10"] for r in comparison[variant]["rows"] if r["dims"] == dims and r["search"] == "float32")
        return f"{value:.3f} ({_pct(retention[variant][dims])})"

    rows = []
    for dims in sizes:
        margin = comparison["margin_nested_minus_plain"][dims]
        rows.append([f"{dims} (d/{full // dims})" if dims != full else f"{dims} (d)",
                     *[ndcg(v, dims) for v in variants],
                     f"{margin['mean_difference']:+.3f} [{margin['ci95_low']:+.3f}, {margin['ci95_high']:+.3f}]"])
    if comparison["method"] == "adaptor":
        how = (f"a linear adaptor (d x d, starts as the identity) on its frozen embeddings, {nested['epochs']} epochs "
               f"({nested['steps']} steps) of {nested['batch_size']} pairs, AdamW lr {nested['lr']:g}; texts cut to "
               f"{comparison['max_tokens']} tokens for encoding the pairs ({comparison['training_encode_s']:.0f} s)")
    else:
        how = (f"the whole encoder fine-tuned, {nested['steps']} steps of {nested['batch_size']} pairs, AdamW lr "
               f"{nested['lr']:g} with warmup and linear decay, texts cut to {comparison['max_tokens']} tokens, bf16 "
               f"autocast {'on' if comparison['bf16_autocast'] else 'off'}")
    head = (f"**{comparison['base']['model']}** trained on {comparison['training_pairs']} stdlib training-split pairs "
            f"(docstring summary -> source; none shared with the evaluation set): {how}; in-batch contrastive loss "
            f"(scale {nested['scale']:g}), seed {nested['seed']}, the same batches for both. Nested: prefixes "
            f"{nested['prefix_sizes']} weighted {[round(w, 3) for w in nested['weights']]}; plain: the full width "
            f"alone. Training took {plain['seconds']:.1f} s (plain) and {nested['seconds']:.1f} s (nested). "
            f"Evaluated on {comparison['set']['name']} ({comparison['set']['queries']} queries): float32 nDCG@10 "
            f"(share of the same model's full width). Margin: per-query nDCG@10 of nested minus plain, mean with a "
            f"95% paired bootstrap interval.")
    return "\n".join([head, "", markdown_table(["prefix", *[columns[v] for v in variants],
                                                "nested - plain [95% CI]"], rows)])


def embedding_sweep_table(comparison: Mapping[str, Any]) -> str:
    """One row per adaptor setting of the sweep: d/4 quality and retention, nested against plain."""
    sizes = comparison["sizes"]
    full, quarter = sizes[-1], max(s for s in sizes if s <= sizes[-1] // 4)
    rows = []
    for entry in comparison["sweep"]:
        n, p = entry["ndcg@10"]["nested"], entry["ndcg@10"]["plain"]
        margin = entry["margin_nested_minus_plain"][quarter]
        settings = entry["settings"]
        rows.append([f"{settings['epochs']} epochs, lr {settings['lr']:g}, batch {settings['batch_size']}",
                     f"{n[quarter]:.3f} ({_pct(n[quarter] / n[full])})", f"{n[full]:.3f}",
                     f"{p[quarter]:.3f} ({_pct(p[quarter] / p[full])})", f"{p[full]:.3f}",
                     f"{margin['mean_difference']:+.3f} [{margin['ci95_low']:+.3f}, {margin['ci95_high']:+.3f}]"])
    return markdown_table([f"adaptor setting", f"nested d/4 = {quarter}", "nested full", f"plain d/4", "plain full",
                           "nested - plain at d/4 [95% CI]"], rows)
