"""Matryoshka representation learning for sentence embeddings.

The nested loss of matryoshka.py trains an LM head on prefixes of the hidden state; for
retrieval the objective is the embedding's own: an in-batch contrastive loss (each query's
paired document is the positive, the batch's other documents the negatives; Multiple
Negatives Ranking, scale 20 = temperature 0.05), here computed on every prefix of the
pooled embedding, each prefix L2-normalised on its own, weighted as in matryoshka.py.
The same routine with the full width alone is the control: a model trained identically
without the nested terms.

Two ways to train a pretrained encoder with it:
- `train_adaptor`: the encoder stays frozen and a d x d linear map on its embeddings
  (initialised to the identity) is trained; the embeddings are computed once, so many
  epochs cost seconds (the supervised Matryoshka-Adaptor of Yoon et al., 2024).
- `train_embedder`: the encoder itself is fine-tuned (a forward and backward pass through
  it per step: about 5 s per step of 32 pairs for MiniLM on 2 cores).

Training pairs come from the standard library's training-split files (docstring summary ->
function source), so the evaluation sets, built from the validation and test files, stay
unseen; pairs whose query or document also occurs there are dropped.
"""
from __future__ import annotations

import contextlib
import logging
import math
import random
import time
from dataclasses import dataclass, field
from typing import Sequence

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)
SCALE = 20.0


def nested_contrastive_loss(queries: torch.Tensor, documents: torch.Tensor, sizes: Sequence[int],
                            weights: Sequence[float], scale: float = SCALE) -> torch.Tensor:
    """Weighted mean over prefix sizes of the in-batch contrastive loss; row i of each side is a pair."""
    if queries.shape != documents.shape:
        raise ValueError(f"queries {tuple(queries.shape)} and documents {tuple(documents.shape)} must pair up")
    labels = torch.arange(len(queries))
    total = queries.new_zeros(())
    for size, weight in zip(sizes, weights):
        q = F.normalize(queries[:, :size].float(), dim=-1)
        d = F.normalize(documents[:, :size].float(), dim=-1)
        total = total + weight * F.cross_entropy(scale * q @ d.T, labels)
    return total / sum(weights)


def training_pairs(exclude: Sequence = (), min_summary_words: int = 4) -> list[tuple[str, str]]:
    """(docstring summary, source) pairs from the stdlib's training-split files, none shared with `exclude`
    (RetrievalSets whose queries and documents must stay unseen)."""
    from .retrieval import stdlib_function_set

    train = stdlib_function_set(min_summary_words=min_summary_words, splits=("train",))
    seen_queries = {q.lower() for rset in exclude for q in rset.queries}
    seen_documents = {d for rset in exclude for d in rset.documents}
    return [(q, train.documents[r]) for q, r in zip(train.queries, train.relevant)
            if q.lower() not in seen_queries and train.documents[r] not in seen_documents]


@contextlib.contextmanager
def texts_cut_to(embedder, max_tokens: int | None):
    """Within the block the embedder cuts texts to `max_tokens` (never above its own limit): training and
    encoding the training pairs use short texts, evaluation the model's own limit."""
    own = embedder.max_tokens
    embedder.max_tokens = min(max_tokens or own, own)
    try:
        yield embedder
    finally:
        embedder.max_tokens = own


def native_bf16(setting: bool | str = "auto") -> bool:
    """bf16 autocast on or off; "auto": on where the CPU has native bf16 (AVX-512 BF16 or AMX)."""
    if setting != "auto":
        return bool(setting)
    from ryzen_core import hardware

    return hardware.native_bf16()


def encode_pairs(embedder, pairs: Sequence[tuple[str, str]], max_tokens: int | None):
    """(query embeddings, document embeddings) of the pairs, texts cut to `max_tokens`."""
    with texts_cut_to(embedder, max_tokens):
        return embedder.encode([q for q, _ in pairs]), embedder.encode([d for _, d in pairs])


def fine_tune(embedder, pairs: Sequence[tuple[str, str]], plan: "EmbeddingTraining", max_tokens: int | None,
              bf16: bool, progress=None) -> "EmbeddingTraining":
    """train_embedder with texts cut to `max_tokens` and, if asked, under bf16 autocast."""
    with texts_cut_to(embedder, max_tokens), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        return train_embedder(embedder, pairs, plan, progress)


def _run_summary(losses: list[float], seconds: float) -> dict:
    return {"scale": SCALE, "seconds": seconds, "first_loss": losses[0] if losses else None,
            "last_losses_mean": sum(losses[-10:]) / len(losses[-10:]) if losses else None}


@dataclass
class EmbeddingTraining:
    """How an embedder is fine-tuned; `sizes`/`weights` = [full width]/[1] is plain (no nesting)."""

    sizes: list[int]
    weights: list[float]
    steps: int = 80
    batch_size: int = 32
    lr: float = 5e-5
    warmup_fraction: float = 0.1
    seed: int = 0
    losses: list[float] = field(default_factory=list)
    seconds: float = 0.0

    def describe(self) -> dict:
        return {"prefix_sizes": self.sizes, "weights": self.weights, "steps": self.steps,
                "batch_size": self.batch_size, "lr": self.lr, "warmup_fraction": self.warmup_fraction,
                "seed": self.seed, **_run_summary(self.losses, self.seconds)}


def train_embedder(embedder, pairs: Sequence[tuple[str, str]], plan: EmbeddingTraining, progress=None):
    """Fine-tune `embedder.model` in place with the nested contrastive loss; returns `plan` with its losses.

    The batches are the same for every plan with the same seed and pair list, so a nested
    and a plain run differ only in the loss. AdamW with linear warmup and linear decay.
    """
    if len(pairs) < plan.batch_size:
        raise ValueError(f"{len(pairs)} training pairs, fewer than one batch of {plan.batch_size}")
    rng = random.Random(plan.seed)
    torch.manual_seed(plan.seed)
    order: list[int] = []
    model = embedder.model
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=plan.lr)
    warmup = max(1, round(plan.steps * plan.warmup_fraction))

    def lr_factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return max(0.0, (plan.steps - step) / max(1, plan.steps - warmup))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
    started = time.perf_counter()
    try:
        for step in range(plan.steps):
            if len(order) < plan.batch_size:
                fresh = list(range(len(pairs)))
                rng.shuffle(fresh)
                order += fresh
            batch, order = order[: plan.batch_size], order[plan.batch_size:]
            queries = embedder.pooled([pairs[i][0] for i in batch])
            documents = embedder.pooled([pairs[i][1] for i in batch])
            loss = nested_contrastive_loss(queries, documents, plan.sizes, plan.weights)
            if not math.isfinite(loss.item()):
                raise FloatingPointError(f"embedding training loss became {loss.item()} at step {step}")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            scheduler.step()
            plan.losses.append(loss.item())
            if progress is not None:
                progress(step, loss.item())
    finally:
        model.eval()
        plan.seconds = time.perf_counter() - started
    return plan


class MatryoshkaAdaptor(torch.nn.Linear):
    """A d x d linear map applied to a frozen encoder's embeddings; starts as the identity."""

    def __init__(self, dim: int):
        super().__init__(dim, dim)
        with torch.no_grad():
            self.weight.copy_(torch.eye(dim))
            self.bias.zero_()


@dataclass
class AdaptorTraining:
    """How an adaptor is trained; `sizes`/`weights` = [full width]/[1] is plain (no nesting)."""

    sizes: list[int]
    weights: list[float]
    epochs: int = 10
    batch_size: int = 128
    lr: float = 1e-3
    seed: int = 0
    losses: list[float] = field(default_factory=list)
    seconds: float = 0.0

    def describe(self) -> dict:
        return {"prefix_sizes": self.sizes, "weights": self.weights, "epochs": self.epochs,
                "batch_size": self.batch_size, "lr": self.lr, "seed": self.seed, "steps": len(self.losses),
                **_run_summary(self.losses, self.seconds)}


def train_adaptor(queries, documents, plan: AdaptorTraining) -> MatryoshkaAdaptor:
    """Train an adaptor on paired embeddings (row i of `queries` pairs with row i of `documents`).

    AdamW at a constant rate, shuffled full batches each epoch (the last partial batch is
    dropped so every step has the same number of negatives); the same seed gives the same
    batches for a nested and a plain plan.
    """
    queries, documents = torch.as_tensor(queries, dtype=torch.float32), torch.as_tensor(documents, dtype=torch.float32)
    if len(queries) < plan.batch_size:
        raise ValueError(f"{len(queries)} training pairs, fewer than one batch of {plan.batch_size}")
    torch.manual_seed(plan.seed)
    adaptor = MatryoshkaAdaptor(queries.shape[1])
    optimizer = torch.optim.AdamW(adaptor.parameters(), lr=plan.lr, weight_decay=0.0)
    generator = torch.Generator().manual_seed(plan.seed)
    started = time.perf_counter()
    for _ in range(plan.epochs):
        order = torch.randperm(len(queries), generator=generator)
        for start in range(0, len(order) - plan.batch_size + 1, plan.batch_size):
            batch = order[start: start + plan.batch_size]
            loss = nested_contrastive_loss(adaptor(queries[batch]), adaptor(documents[batch]), plan.sizes, plan.weights)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            plan.losses.append(loss.item())
    plan.seconds = time.perf_counter() - started
    return adaptor.eval()


class AdaptedEmbedder:
    """A frozen embedder followed by a trained adaptor; saved as adaptor.safetensors + adaptor.json."""

    ADAPTOR_FILE, INFO_FILE = "adaptor.safetensors", "adaptor.json"

    def __init__(self, base, adaptor: MatryoshkaAdaptor, base_spec: str, name: str | None = None):
        self.base, self.adaptor, self.base_spec = base, adaptor, base_spec
        self.name = name or f"{base.name} + Matryoshka adaptor"
        self.dim, self.center = base.dim, base.center

    def encode(self, texts):
        return self.adapt(self.base.encode(texts))

    def adapt(self, embeddings):
        with torch.inference_mode():
            return self.adaptor(torch.as_tensor(embeddings, dtype=torch.float32)).numpy()

    def save(self, directory, info: dict | None = None) -> None:
        import json
        from pathlib import Path

        from safetensors.torch import save_file

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in self.adaptor.state_dict().items()}, str(directory / self.ADAPTOR_FILE))
        (directory / self.INFO_FILE).write_text(json.dumps({"base": self.base_spec, "dim": self.dim, **(info or {})},
                                                           indent=2) + "\n")

    @classmethod
    def load(cls, directory, load_base):
        """`load_base(spec)` loads the frozen embedder named in adaptor.json."""
        import json
        from pathlib import Path

        from safetensors.torch import load_file

        directory = Path(directory)
        info = json.loads((directory / cls.INFO_FILE).read_text())
        base = load_base(info["base"])
        adaptor = MatryoshkaAdaptor(base.dim)
        adaptor.load_state_dict(load_file(str(directory / cls.ADAPTOR_FILE)))
        return cls(base, adaptor.eval(), info["base"])
