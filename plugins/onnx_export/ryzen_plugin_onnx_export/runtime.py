"""onnxruntime inference for our exports, behind the core `Backend` protocol."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from ryzen_core.models.generate import sample_next

from .export import MODEL_FILE, ExportError, read_manifest

GRAPH_OPTIMIZATION_LEVELS = ("disable", "basic", "extended", "all")


def session_options(threads: int | None = None, graph_optimization: str = "all", inter_op_threads: int = 1,
                    allow_spinning: bool = False):
    """onnxruntime SessionOptions from the plugin's settings.

    threads=None lets onnxruntime use one intra-op thread per physical core. Sequential
    execution with one inter-op thread suits a decoder: its graph is a chain, so parallel
    branches buy nothing and would compete with the intra-op pool. Spinning idle workers
    make each decode step faster but burn the cores for a moment after every run, which
    slows torch code running right after in the same process; turn it off when mixing.
    """
    import onnxruntime as ort

    levels = {
        "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    }
    if graph_optimization not in levels:
        raise ValueError(f"graph_optimization must be one of {GRAPH_OPTIMIZATION_LEVELS}, got {graph_optimization!r}")
    options = ort.SessionOptions()
    options.graph_optimization_level = levels[graph_optimization]
    options.intra_op_num_threads = threads or 0
    options.inter_op_num_threads = inter_op_threads
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.add_session_config_entry("session.intra_op.allow_spinning", "1" if allow_spinning else "0")
    options.log_severity_level = 3  # errors only: shape-inference chatter is not actionable
    return options


class OrtBackend:
    """An onnx export (fp32 or int8) run by onnxruntime on the CPU.

    `logits` runs without a cache (past_len 0); `generate` prefills once and then feeds
    one token plus the previous step's presents, sampling with the same `sample_next`
    as the torch loop so both backends pick the same tokens for the same generator seed.
    """

    def __init__(self, export_dir: str | os.PathLike, threads: int | None = None, graph_optimization: str = "all",
                 inter_op_threads: int = 1, allow_spinning: bool = False):
        import onnxruntime as ort

        self.export_dir = Path(export_dir)
        manifest = read_manifest(self.export_dir)
        if manifest is None:
            raise ExportError(f"{self.export_dir} is not an onnx export (no valid export.json)")
        try:
            self.layers = int(manifest["layers"])
            self.kv_heads = int(manifest["kv_heads"])
            self.head_dim = int(manifest["head_dim"])
            self.vocab_size = int(manifest["vocab_size"])
            self.context_length = int(manifest["context_length"])
            self.hard_context_limit = bool(manifest["hard_context_limit"])
            self.precision = str(manifest["precision"])
            self.input_names = list(manifest["input_names"])
            self.output_names = list(manifest["output_names"])
        except (KeyError, TypeError, ValueError) as exc:
            raise ExportError(f"{self.export_dir / 'export.json'} is incomplete: {exc!r}") from None
        self.eos_token_id: int | None = manifest.get("eos_token_id")
        self.manifest = manifest
        self.name = f"onnxruntime-{self.precision}"
        model_path = self.export_dir / MODEL_FILE
        if not model_path.is_file():
            raise ExportError(f"{self.export_dir} has export.json but no {MODEL_FILE}")
        self.session = ort.InferenceSession(
            str(model_path), sess_options=session_options(threads, graph_optimization, inter_op_threads, allow_spinning),
            providers=["CPUExecutionProvider"],
        )

    # -- one graph call ------------------------------------------------------------
    def _empty_past(self, batch: int) -> list[np.ndarray]:
        empty = np.zeros((batch, self.kv_heads, 0, self.head_dim), dtype=np.float32)
        return [empty] * (2 * self.layers)

    def step(self, input_ids: np.ndarray, past: list[np.ndarray]) -> tuple[np.ndarray, list[np.ndarray]]:
        """One forward: logits [B, T, V] and the presents to feed next time."""
        feeds = {"input_ids": input_ids}
        feeds.update(zip(self.input_names[1:], past))
        outputs = self.session.run(self.output_names, feeds)
        return outputs[0], outputs[1:]

    def _check_ids(self, input_ids: torch.Tensor, max_new_tokens: int = 0) -> np.ndarray:
        if input_ids.dim() != 2 or input_ids.shape[1] == 0:
            raise ValueError(f"input_ids must be a non-empty [batch, seq] tensor, got shape {tuple(input_ids.shape)}")
        if max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
        total = input_ids.shape[1] + max_new_tokens
        if self.hard_context_limit and total > self.context_length:
            raise ValueError(f"prompt length {input_ids.shape[1]} + max_new_tokens {max_new_tokens} = {total} "
                             f"exceeds the model's context_length {self.context_length}")
        return input_ids.detach().cpu().to(torch.int64).numpy()

    # -- Backend protocol ------------------------------------------------------------
    def logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        ids = self._check_ids(input_ids)
        logits, _ = self.step(ids, self._empty_past(ids.shape[0]))
        return torch.from_numpy(logits)

    def generate(self, input_ids: torch.Tensor, max_new_tokens: int, *, temperature: float = 0.0, top_k: int = 0,
                 top_p: float = 1.0, eos_token_id: int | None = None, generator: torch.Generator | None = None,
                 on_token: Callable[[int], None] | None = None) -> torch.Tensor:
        """Prompt plus new tokens, [B, T + produced]; the same contract as ryzen_core.models.generate:
        rows that hit eos early are padded with eos, and the loop stops once every row has."""
        ids = self._check_ids(input_ids, max_new_tokens)
        sequence = input_ids.detach().cpu()
        finished = torch.zeros(ids.shape[0], dtype=torch.bool)
        step_input, past = ids, self._empty_past(ids.shape[0])
        for step in range(max_new_tokens):
            logits, past = self.step(step_input, past)
            new_token = sample_next(torch.from_numpy(logits[:, -1, :]), temperature, top_k, top_p, generator)
            if eos_token_id is not None:
                new_token = new_token.masked_fill(finished, eos_token_id)
                finished |= new_token == eos_token_id
            sequence = torch.cat([sequence, new_token.unsqueeze(1).to(sequence.dtype)], dim=1)
            step_input = new_token.unsqueeze(1).to(torch.int64).numpy()
            if on_token is not None:
                on_token(step)
            if eos_token_id is not None and bool(finished.all()):
                break
        return sequence.to(input_ids.device)
