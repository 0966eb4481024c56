"""The plugin's commands: `ryzen embed` builds a compressed index from a text collection; `ryzen search`
queries it and reports how much of the float32 index's answer the compressed search recovers;
`ryzen embed-train` fine-tunes an encoder with the Matryoshka (nested) contrastive loss.

register_commands (plugin.py) adds them to the `ryzen` group. None needs a run config: each names
its model (`--model`) and its data itself."""
from __future__ import annotations

import json
import time
from pathlib import Path

import click

from .retrieval import STDLIB_CODE_HALVES, STDLIB_FUNCTIONS

SEARCH_METHODS = ("binary-rescore", "binary", "int8", "float32")


def _collection(source: str, text_field: str, max_documents: int | None) -> tuple[list[str], list[str]]:
    """(ids, texts) of a collection: a built-in stdlib set's documents, or a file/directory/.jsonl."""
    if source in (STDLIB_FUNCTIONS, STDLIB_CODE_HALVES):
        from .retrieval import load_retrieval_set

        rset = load_retrieval_set(source, max_documents)
        return rset.document_ids, rset.documents
    from ryzen_core import load_documents

    documents = load_documents(source, text_field=text_field, max_documents=max_documents)
    return [d.id for d in documents], [d.text for d in documents]


def _embedder(model_spec: str, batch_size: int = 32):
    """The embedder `--model` names, or a one-line error (exit 2) saying what to install or fix."""
    from ryzen_core import ConfigError, RyzenError

    from .embedders import load_embedder

    try:
        return load_embedder(model_spec, batch_size)
    # the minilm extra missing, a directory that is no model, a run with several models
    except (ModuleNotFoundError, ValueError, RyzenError) as exc:
        raise ConfigError(f"--model {model_spec}: {exc}") from None


@click.command("embed")
@click.argument("source")
@click.option("--model", "model_spec", default="minilm", show_default=True,
              help="'minilm' (all-MiniLM-L6-v2 from the minilm extra), a sentence-transformers/transformers "
                   "encoder directory, or a model trained here (its LM, mean-pooled): a run directory holding "
                   "one model or one variant's directory, e.g. runs/x/optimized.")
@click.option("--out", "out_dir", required=True, type=click.Path(path_type=Path, file_okay=False),
              help="Index directory to write.")
@click.option("--dims", type=click.IntRange(min=1), default=None,
              help="Keep only this Matryoshka prefix of each embedding.")
@click.option("--text-field", default="text", show_default=True, help="Field holding the text in a .jsonl source.")
@click.option("--max-documents", type=click.IntRange(min=1), default=None)
@click.option("--batch-size", type=click.IntRange(min=1), default=32, show_default=True)
def embed(source, model_spec, out_dir, dims, text_field, max_documents, batch_size):
    """Embed the documents of SOURCE and write float32, int8 and binary indexes.

    SOURCE is 'stdlib-functions' or 'stdlib-code-halves' (functions of the held-out stdlib
    files), a text file, a directory of .txt/.md/.py files, or a .jsonl file.
    """
    from .quantization import QuantizedIndex, save_index

    embedder = _embedder(model_spec, batch_size)  # before reading the collection: fail fast
    ids, texts = _collection(source, text_field, max_documents)
    if dims is not None and dims > embedder.dim:
        raise click.BadParameter(f"{dims} exceeds the model's {embedder.dim} dimensions", param_hint="--dims")
    started = time.perf_counter()
    embeddings = embedder.encode(texts)
    elapsed = time.perf_counter() - started
    index = QuantizedIndex.build(embeddings, center=embedder.center, dims=dims)
    spec = model_spec if model_spec == "minilm" else str(Path(model_spec).resolve())
    save_index(index, out_dir, {"model": spec, "model_name": embedder.name, "full_dim": embedder.dim,
                                "source": source})
    with open(out_dir / "documents.jsonl", "w", encoding="utf-8") as handle:
        for doc_id, text in zip(ids, texts):
            handle.write(json.dumps({"id": doc_id, "text": text}) + "\n")
    sizes = index.sizes()
    click.echo(f"{len(texts)} documents embedded with {embedder.name} in {elapsed:.1f} s "
               f"({index.dims} of {embedder.dim} dimensions) -> {out_dir}")
    for name in ("float32", "int8", "binary"):
        click.echo(f"  {name:<8} {sizes[name]:>12,} bytes  ({sizes['float32'] / sizes[name]:.0f}x smaller than float32)")

@click.command("search")
@click.argument("index_dir", type=click.Path(path_type=Path, file_okay=False, exists=True))
@click.argument("queries", nargs=-1)
@click.option("--queries-file", type=click.Path(path_type=Path, dir_okay=False, exists=True),
              help="More queries, one per line.")
@click.option("-k", "--k", "k", type=click.IntRange(min=1), default=10, show_default=True)
@click.option("--method", type=click.Choice(SEARCH_METHODS), default="binary-rescore", show_default=True)
@click.option("--rescore-with", type=click.Choice(["int8", "binary", "float32"]), default="int8",
              show_default=True, help="What the binary shortlist is re-ranked against (float query).")
@click.option("--rescore-multiplier", type=click.IntRange(min=1), default=4, show_default=True)
@click.option("--show", type=click.IntRange(min=0), default=3, show_default=True,
              help="Results printed per query (0: only the recall summary).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def search(index_dir, queries, queries_file, k, method, rescore_with, rescore_multiplier, show, as_json):
    """Search INDEX_DIR (written by `ryzen embed`) for each query; report recall@k against float32."""
    from .quantization import load_index
    from .retrieval import overlap_at_k

    texts = list(queries)
    if queries_file is not None:
        texts += [line.strip() for line in queries_file.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not texts:
        raise click.UsageError("give at least one query (arguments or --queries-file)")
    index, info = load_index(index_dir)
    with open(index_dir / "documents.jsonl", encoding="utf-8") as handle:
        documents = [json.loads(line) for line in handle]
    embedder = _embedder(info["model"])
    prepared = index.prepare_queries(embedder.encode(texts))
    started = time.perf_counter()
    ranking = index.search(prepared, k, method, rescore_multiplier, rescore_with)
    search_s = time.perf_counter() - started
    reference = index.search(prepared, k, "float32")
    recall = overlap_at_k(ranking, reference, k)
    results = [{"query": q, "results": [documents[int(i)]["id"] for i in row]} for q, row in zip(texts, ranking)]
    summary = {"method": method, "rescore_with": rescore_with if method == "binary-rescore" else None,
               "k": k, "queries": len(texts), f"recall@{k}_vs_float32": recall,
               "search_ms_per_query": 1e3 * search_s / len(texts), "index_bytes": info["bytes"]}
    if as_json:
        click.echo(json.dumps({"summary": summary, "results": results}, indent=2))
        return
    for q, row in zip(texts, ranking):
        if show:
            click.echo(f"query: {q}")
            for rank, i in enumerate(row[:show], start=1):
                doc = documents[int(i)]
                first_line = doc["text"].strip().splitlines()[0][:100] if doc["text"].strip() else ""
                click.echo(f"  {rank}. {doc['id']}  {first_line}")
    label = method if method != "binary-rescore" else f"binary-rescore ({rescore_with}, x{rescore_multiplier})"
    click.echo(f"{label}: recall@{k} against the float32 index {recall:.3f} over {len(texts)} queries, "
               f"{summary['search_ms_per_query']:.2f} ms per query")


@click.command("embed-train")
@click.argument("pairs")
@click.option("--model", "model_spec", default="minilm", show_default=True,
              help="'minilm', a sentence-transformers/transformers encoder directory, or (adaptor only) a "
                   "Ryzen run directory.")
@click.option("--out", "out_dir", required=True, type=click.Path(path_type=Path, file_okay=False),
              help="Directory for the result: an adaptor (adaptor.safetensors + adaptor.json, naming the "
                   "frozen model) or a fine-tuned encoder (sentence-transformers layout, safetensors).")
@click.option("--method", type=click.Choice(["adaptor", "full"]), default="adaptor", show_default=True,
              help="adaptor: train a linear map on the frozen model's embeddings (fast); full: fine-tune "
                   "the encoder itself.")
@click.option("--divisors", default="16,8,4,2,1", show_default=True,
              help="Matryoshka prefix sizes as d / divisor, comma-separated.")
@click.option("--plain", is_flag=True, help="Train the full width only (no nested terms), as a control.")
@click.option("--epochs", type=click.IntRange(min=1), default=10, show_default=True, help="adaptor: passes.")
@click.option("--steps", type=click.IntRange(min=1), default=80, show_default=True, help="full: steps.")
@click.option("--batch-size", type=click.IntRange(min=2), default=None,
              help="Pairs per step; default 128 (adaptor), 32 (full).")
@click.option("--lr", type=click.FloatRange(min=0, min_open=True), default=None,
              help="Learning rate; default 1e-3 (adaptor), 5e-5 (full).")
@click.option("--max-tokens", type=click.IntRange(min=8), default=128, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--bf16/--no-bf16", default=None, help="full: bf16 autocast (default: where the CPU has native bf16).")
def embed_train(pairs, model_spec, out_dir, method, divisors, plain, epochs, steps, batch_size, lr,
                max_tokens, seed, bf16):
    """Train an embedding model on PAIRS with the Matryoshka contrastive loss, so its embeddings can be cut to
    a prefix; `ryzen embed --model OUT --dims N` then uses the result.

    PAIRS is 'stdlib-functions' (docstring summary -> source from the stdlib's training-split files, none shared
    with the held-out evaluation set) or a .jsonl file of {"query", "document"} pairs.
    """
    from .embedders import EncoderEmbedder
    from .embedding_training import AdaptorTraining, EmbeddingTraining
    from .matryoshka import nested_weights

    sizes_from = _divisors(divisors)
    training = _training_pairs(pairs)
    batch_size = batch_size or (AdaptorTraining if method == "adaptor" else EmbeddingTraining).batch_size
    if len(training) < batch_size:
        raise click.BadParameter(f"{len(training)} pairs, fewer than one batch of {batch_size}",
                                 param_hint="--batch-size")
    embedder = _embedder(model_spec)
    if method == "full" and not isinstance(embedder, EncoderEmbedder):
        raise click.BadParameter("--method full needs an encoder directory or 'minilm'", param_hint="--model")
    sizes, weights = ([embedder.dim], [1.0]) if plain else nested_weights(embedder.dim, sizes_from)
    chosen = {k: v for k, v in dict(batch_size=batch_size, lr=lr).items() if v is not None}
    started = time.perf_counter()
    about = {"pairs": pairs, "training_pairs": len(training), "max_tokens": max_tokens}
    if method == "adaptor":
        plan = AdaptorTraining(sizes=sizes, weights=weights, epochs=epochs, seed=seed, **chosen)
        _train_adaptor(embedder, model_spec, training, plan, out_dir, about)
    else:
        plan = EmbeddingTraining(sizes=sizes, weights=weights, steps=steps, seed=seed, **chosen)
        _fine_tune(embedder, model_spec, training, plan, out_dir, about, bf16)
    info = plan.describe()
    click.echo(f"{method}: {embedder.name} on {len(training)} pairs, {info['steps']} steps, "
               f"{time.perf_counter() - started:.0f} s; loss {info['first_loss']:.4f} -> "
               f"{info['last_losses_mean']:.4f} (mean of the last 10); prefixes {sizes} -> {out_dir}")


def _divisors(text: str) -> list[int]:
    try:
        divisors = [int(d) for d in text.split(",")]
    except ValueError:
        raise click.BadParameter(f"{text!r} is not a comma-separated list of integers", param_hint="--divisors")
    if any(d < 1 for d in divisors):
        raise click.BadParameter(f"Matryoshka divisors must be >= 1, got {text}", param_hint="--divisors")
    return divisors


def _training_pairs(pairs: str) -> list[tuple[str, str]]:
    """(query, document) pairs of `embed-train`'s PAIRS argument."""
    from .embedding_training import training_pairs
    from .retrieval import jsonl_pair_set, stdlib_function_set

    if pairs == STDLIB_FUNCTIONS:
        return training_pairs([stdlib_function_set()])
    if Path(pairs).is_file():
        rset = jsonl_pair_set(pairs)
        return [(q, rset.documents[r]) for q, r in zip(rset.queries, rset.relevant)]
    raise click.BadParameter(f"{pairs!r} is neither {STDLIB_FUNCTIONS} nor a .jsonl file", param_hint="PAIRS")


def _train_adaptor(embedder, model_spec: str, training, plan, out_dir: Path, about: dict) -> None:
    """An adaptor on the frozen embedder, saved as adaptor.safetensors + adaptor.json."""
    from .embedding_training import AdaptedEmbedder, encode_pairs, train_adaptor

    click.echo(f"embedding {len(training)} pairs with {embedder.name} ...", err=True)
    queries, documents = encode_pairs(embedder, training, about["max_tokens"])
    spec = model_spec if model_spec == "minilm" else str(Path(model_spec).resolve())
    AdaptedEmbedder(embedder, train_adaptor(queries, documents, plan), spec).save(
        out_dir, {**about, "training": plan.describe()})


def _fine_tune(embedder, model_spec: str, training, plan, out_dir: Path, about: dict, bf16: bool | None) -> None:
    """The encoder itself fine-tuned, saved in the sentence-transformers layout with ryzen_embedding_training.json."""
    from tqdm.auto import tqdm

    from .embedding_training import fine_tune, native_bf16

    use_bf16 = native_bf16("auto" if bf16 is None else bf16)
    with tqdm(total=plan.steps, desc="fine-tuning", unit="step", disable=None) as bar:
        def progress(step: int, loss: float) -> None:
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.3f}")

        fine_tune(embedder, training, plan, about["max_tokens"], use_bf16, progress)
    embedder.save(out_dir)
    (out_dir / "ryzen_embedding_training.json").write_text(json.dumps(
        {"base": model_spec, **about, "bf16_autocast": use_bf16, **plan.describe()}, indent=2) + "\n")
