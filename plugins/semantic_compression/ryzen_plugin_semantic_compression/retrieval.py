"""Retrieval sets from text nobody here wrote, and the metrics they are scored with.

Two sets are built from the Python standard library, one pair per function:
- stdlib-functions: the docstring's summary (first paragraph) is the query, the function's
  source with the docstring cut out is the document (otherwise the answer would be in the
  document verbatim). Natural language to code.
- stdlib-code-halves: the first half of a function's source is the query, the second half
  the document. Code to code.
Only files in the validation and test splits of the stdlib corpus are used, so a model
trained with Ryzen's default data never saw these documents. Users pass their own pairs
as JSON lines.
"""
from __future__ import annotations

import ast
import functools
import hashlib
import json
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

STDLIB_FUNCTIONS = "stdlib-functions"
STDLIB_CODE_HALVES = "stdlib-code-halves"
MAX_DOCUMENT_CHARS = 4000  # embedders truncate to their context anyway; this bounds tokenizer work


@dataclass(frozen=True)
class RetrievalSet:
    """Queries, a corpus, and for each query the index of its one relevant document."""

    name: str
    queries: list[str]
    documents: list[str]
    relevant: list[int]
    document_ids: list[str]

    def __post_init__(self):
        if len(self.queries) != len(self.relevant):
            raise ValueError("every query needs exactly one relevant document")
        if any(not 0 <= r < len(self.documents) for r in self.relevant):
            raise ValueError("a relevant index points outside the corpus")

    def describe(self) -> dict:
        return {"name": self.name, "queries": len(self.queries), "documents": len(self.documents)}


def _summary(docstring: str) -> str:
    first_paragraph = docstring.strip().split("\n\n")[0]
    return " ".join(first_paragraph.split())


def _functions(path_id: str, source: str) -> list[tuple[str, str | None, str]]:
    """(id, docstring summary or None, source without the docstring) for each function or method of one file."""
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):  # a few stdlib files are templates or use future syntax
        return []
    lines = source.splitlines()
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        docstring = ast.get_docstring(node, clean=True)
        start = node.lineno - 1  # the def line (decorators left out: they rarely say what the function does)
        if docstring:
            doc_node = node.body[0]
            kept = lines[start:doc_node.lineno - 1] + lines[doc_node.end_lineno:node.end_lineno]
        else:
            kept = lines[start:node.end_lineno]
        body = textwrap.dedent("\n".join(kept)).strip()
        found.append((f"{path_id}:{node.lineno}", _summary(docstring) if docstring else None,
                      body[:MAX_DOCUMENT_CHARS]))
    return found


@functools.lru_cache(maxsize=4)
def _stdlib_functions(splits: tuple[str, ...]) -> list[tuple[str, str | None, str]]:
    """Every function of the stdlib files in `splits` (cached: reading and parsing the stdlib takes seconds)."""
    from ryzen_core import load_documents, split_documents

    parts = split_documents(load_documents("stdlib"))
    chosen = [doc for name, docs in parts.items() if name in splits for doc in docs]
    return [f for doc in chosen for f in _functions(doc.id, doc.text)]


def _subset(pairs: list, max_pairs: int | None) -> list:
    """A fixed subset chosen by a hash of each pair's id: the same on every machine with the same Python."""
    if max_pairs is None or len(pairs) <= max_pairs:
        return pairs
    kept = sorted(pairs, key=lambda p: hashlib.sha256(p[0].encode()).digest())[:max_pairs]
    return sorted(kept, key=lambda p: p[0])


def stdlib_function_set(max_pairs: int | None = None, min_summary_words: int = 4,
                        splits: Sequence[str] = ("validation", "test")) -> RetrievalSet:
    """Docstring summary -> function source (docstring removed) from the stdlib files of the given splits.

    Summaries shared by several functions ("Return self.") are dropped, because such a query
    has more than one right answer; so are duplicate bodies and bodies under three lines.
    """
    candidates = [(i, summary, body) for i, summary, body in _stdlib_functions(tuple(splits))
                  if summary and len(summary.split()) >= min_summary_words and len(body.splitlines()) >= 3]
    summary_count: dict[str, int] = {}
    body_count: dict[str, int] = {}
    for _, summary, body in candidates:
        summary_count[summary.lower()] = summary_count.get(summary.lower(), 0) + 1
        body_count[body] = body_count.get(body, 0) + 1
    pairs = _subset([p for p in candidates if summary_count[p[1].lower()] == 1 and body_count[p[2]] == 1], max_pairs)
    if not pairs:
        raise ValueError("no documented functions found in the chosen stdlib splits")
    return RetrievalSet(name=STDLIB_FUNCTIONS, queries=[p[1] for p in pairs], documents=[p[2] for p in pairs],
                        relevant=list(range(len(pairs))), document_ids=[p[0] for p in pairs])


def stdlib_code_halves_set(max_pairs: int | None = None, min_lines: int = 8,
                           splits: Sequence[str] = ("validation", "test")) -> RetrievalSet:
    """First half of a function's source -> its second half (docstrings removed).

    Code to code, so it suits a language model trained on code: the halves share identifiers
    and purpose but little text. Functions under `min_lines` lines are skipped.
    """
    pairs, seen = [], set()
    for i, _, body in _stdlib_functions(tuple(splits)):
        lines = body.splitlines()
        if len(lines) < min_lines or body in seen:
            continue
        seen.add(body)
        half = len(lines) // 2
        pairs.append((i, "\n".join(lines[:half]), "\n".join(lines[half:])))
    pairs = _subset(pairs, max_pairs)
    if not pairs:
        raise ValueError("no functions long enough found in the chosen stdlib splits")
    return RetrievalSet(name=STDLIB_CODE_HALVES, queries=[p[1] for p in pairs], documents=[p[2] for p in pairs],
                        relevant=list(range(len(pairs))), document_ids=[p[0] for p in pairs])


def jsonl_pair_set(path: str | Path, query_field: str = "query", document_field: str = "document",
                   max_pairs: int | None = None) -> RetrievalSet:
    """A user's own pairs: one JSON object per line with a query and its relevant document.

    Lines sharing a document share one corpus entry, so several queries may point at it.
    """
    path = Path(path)
    queries, relevant, documents, ids = [], [], [], []
    index_of: dict[str, int] = {}
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            record = json.loads(line)
            if not isinstance(record, dict) or not isinstance(record.get(query_field), str) \
                    or not isinstance(record.get(document_field), str):
                raise ValueError(f"{path} line {number}: needs string fields {query_field!r} and {document_field!r}")
            document = record[document_field]
            if document not in index_of:
                index_of[document] = len(documents)
                documents.append(document)
                ids.append(f"{path.name}:{number}")
            queries.append(record[query_field])
            relevant.append(index_of[document])
            if max_pairs is not None and len(queries) >= max_pairs:
                break
    if not queries:
        raise ValueError(f"{path} holds no query/document pairs")
    return RetrievalSet(name=path.name, queries=queries, documents=documents, relevant=relevant, document_ids=ids)


def load_retrieval_set(source: str, max_pairs: int | None = None) -> RetrievalSet:
    """'stdlib-functions', 'stdlib-code-halves', or a .jsonl file of {"query", "document"} pairs."""
    if source == STDLIB_FUNCTIONS:
        return stdlib_function_set(max_pairs=max_pairs)
    if source == STDLIB_CODE_HALVES:
        return stdlib_code_halves_set(max_pairs=max_pairs)
    if not Path(source).is_file():
        raise ValueError(f"retrieval set {source!r} is neither {STDLIB_FUNCTIONS}, {STDLIB_CODE_HALVES} nor a file")
    return jsonl_pair_set(source, max_pairs=max_pairs)


# ----------------------------------------------------------------------------- metrics


def ranks_of_relevant(rankings: np.ndarray, relevant: Sequence[int]) -> np.ndarray:
    """0-based position of each query's relevant document in its ranking, or -1 if it is not there."""
    hits = rankings == np.asarray(relevant)[:, None]
    found = hits.any(axis=1)
    return np.where(found, hits.argmax(axis=1), -1)


def retrieval_metrics(rankings: np.ndarray, relevant: Sequence[int]) -> dict[str, float]:
    """recall@1, recall@10, nDCG@10 and MRR@10 with one relevant document per query.

    With a single relevant document the ideal DCG is 1, so nDCG@10 = 1 / log2(rank + 2)
    for a hit at 0-based rank < 10 and 0 otherwise.
    """
    ranks = ranks_of_relevant(rankings[:, :10], relevant)
    hit = ranks >= 0
    safe = np.where(hit, ranks, 0)
    return {
        "recall@1": float((ranks == 0).mean()),
        "recall@10": float(hit.mean()),
        "ndcg@10": float(ndcg_per_query(rankings, relevant).mean()),
        "mrr@10": float(np.where(hit, 1.0 / (safe + 1.0), 0.0).mean()),
    }


def ndcg_per_query(rankings: np.ndarray, relevant: Sequence[int]) -> np.ndarray:
    """nDCG@10 of each query (one relevant document): 1 / log2(rank + 2) for a hit in the top 10, else 0."""
    ranks = ranks_of_relevant(rankings[:, :10], relevant)
    return np.where(ranks >= 0, 1.0 / np.log2(np.maximum(ranks, 0) + 2.0), 0.0)


def overlap_at_k(rankings: np.ndarray, reference: np.ndarray, k: int) -> float:
    """Mean fraction of the reference top-k (e.g. the float32 index's) found in the top-k of `rankings`."""
    k = min(k, rankings.shape[1], reference.shape[1])
    found = [len(set(a[:k].tolist()) & set(b[:k].tolist())) / k for a, b in zip(rankings, reference)]
    return float(np.mean(found))
