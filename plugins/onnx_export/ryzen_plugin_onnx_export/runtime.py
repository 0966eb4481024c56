"""onnxruntime inference for our exports, behind the core `Backend` protocol.

Two graph layouts (export.json's `graph`):
  * "fused" (graph_builder.py): GroupQueryAttention over one preallocated KV buffer per
    layer. `FusedOrtBackend` binds each buffer with IOBinding as both past and present,
    so a decode step writes one position in place and copies no cache.
  * "traced" (the dynamo export, kept for models the builder does not write):
    `OrtBackend` feeds the previous step's presents back, which grow by one position.
Both sample with the torch loop's `sample_next`, so for the same generator seed every
backend picks the same tokens from the same logits.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from ryzen_core import sample_next

from .export import MODEL_FILE, ExportError, graph_facts, read_manifest

GRAPH_OPTIMIZATION_LEVELS = ("disable", "basic", "extended", "all")
# Set by the core's validator in a worker process that runs one backend alone, and the
# thread count it pins every backend of the validation to.
ISOLATED_ENV = "RYZEN_BACKEND_ISOLATED"
THREADS_ENV = "RYZEN_BACKEND_THREADS"

Decoder = Callable[[np.ndarray], np.ndarray]  # token ids [B, T] -> last-position logits [B, V]


def spinning_default() -> bool:
    """Spin only when nothing else shares the process: spinning workers make each decode
    step faster but burn the cores for a moment after every run, which slows torch code
    running right after them in the same process."""
    return os.environ.get(ISOLATED_ENV) == "1"


def session_options(threads: int | None = None, graph_optimization: str = "all", inter_op_threads: int = 1,
                    allow_spinning: bool | None = None):
    """onnxruntime SessionOptions from the plugin's settings.

    threads=None takes the validator's pinned count (THREADS_ENV) where it is set, else lets
    onnxruntime use one intra-op thread per physical core. Sequential
    execution with one inter-op thread suits a decoder: its graph is a chain, so parallel
    branches buy nothing and would compete with the intra-op pool. allow_spinning=None
    follows `spinning_default()`.
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
    spinning = spinning_default() if allow_spinning is None else allow_spinning
    if threads is None and os.environ.get(THREADS_ENV, "").isdigit():
        threads = int(os.environ[THREADS_ENV])
    options = ort.SessionOptions()
    options.graph_optimization_level = levels[graph_optimization]
    options.intra_op_num_threads = threads or 0
    options.inter_op_num_threads = inter_op_threads
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
    options.log_severity_level = 3  # errors only: shape-inference chatter is not actionable
    return options


class _ExportBackend:
    """What both layouts share: the manifest, input checks and the sampling loop."""

    def __init__(self, export_dir: str | os.PathLike, threads: int | None = None, graph_optimization: str = "all",
                 inter_op_threads: int = 1, allow_spinning: bool | None = None):
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
        self.spinning = spinning_default() if allow_spinning is None else allow_spinning
        try:
            self.session = ort.InferenceSession(
                str(model_path), providers=["CPUExecutionProvider"],
                sess_options=session_options(threads, graph_optimization, inter_op_threads, self.spinning))
        except Exception as exc:  # onnxruntime raises its own Fail/InvalidGraph/... types
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ExportError(f"{model_path} cannot be loaded by onnxruntime: {first[:300]}") from None
        # What the runtime table reads (docs/plugins.md, load_backend); the graph parsed, so these read it safely.
        self.weight_bytes, positions = graph_facts(model_path)
        self.kv_bytes_per_position = 2 * self.layers * self.kv_heads * self.head_dim * 4
        if self.hard_context_limit and positions is not None and self.context_length > positions:
            raise ExportError(f"{self.export_dir / 'export.json'} claims context_length {self.context_length}, "
                              f"but the graph's position table has {positions} rows")

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

    def _empty_past(self, batch: int) -> list[np.ndarray]:
        empty = np.zeros((batch, self.kv_heads, 0, self.head_dim), dtype=np.float32)
        return [empty] * (2 * self.layers)

    def _decoder(self, batch: int, capacity: int) -> Decoder:
        raise NotImplementedError

    def generate(self, input_ids: torch.Tensor, max_new_tokens: int, *, temperature: float = 0.0, top_k: int = 0,
                 top_p: float = 1.0, eos_token_id: int | None = None, generator: torch.Generator | None = None,
                 on_token: Callable[[int], None] | None = None) -> torch.Tensor:
        """Prompt plus new tokens, [B, T + produced]; the same contract as ryzen_core.generate:
        rows that hit eos early are padded with eos, and the loop stops once every row has."""
        ids = self._check_ids(input_ids, max_new_tokens)
        batch = ids.shape[0]
        finished = np.zeros(batch, dtype=bool)
        decode = self._decoder(batch, ids.shape[1] + max_new_tokens)
        produced = np.empty((batch, max_new_tokens), dtype=np.int64)
        step_input, steps = ids, 0
        for step in range(max_new_tokens):
            logits = decode(step_input)
            if temperature == 0.0:  # numpy's argmax, like torch's, takes the first of tied maxima
                new_token = logits.argmax(axis=-1)
            else:
                new_token = sample_next(torch.from_numpy(logits), temperature, top_k, top_p, generator).numpy()
            if eos_token_id is not None:
                new_token[finished] = eos_token_id
                finished |= new_token == eos_token_id
            produced[:, step] = new_token
            steps = step + 1
            step_input = produced[:, step:step + 1].copy()
            if on_token is not None:
                on_token(step)
            if eos_token_id is not None and finished.all():
                break
        sequence = input_ids.detach().cpu()
        new_tokens = torch.from_numpy(produced[:, :steps]).to(sequence.dtype)
        return torch.cat([sequence, new_tokens], dim=1).to(input_ids.device)


class OrtBackend(_ExportBackend):
    """A traced (dynamo) export: `step` feeds the previous presents back, growing them by the new tokens."""

    def step(self, input_ids: np.ndarray, past: list[np.ndarray]) -> tuple[np.ndarray, list[np.ndarray]]:
        """One forward: logits [B, T, V] and the presents to feed next time."""
        feeds = {"input_ids": input_ids}
        feeds.update(zip(self.input_names[1:], past))
        outputs = self.session.run(self.output_names, feeds)
        return outputs[0], outputs[1:]

    def logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        ids = self._check_ids(input_ids)
        logits, _ = self.step(ids, self._empty_past(ids.shape[0]))
        return torch.from_numpy(logits)

    def _decoder(self, batch: int, capacity: int) -> Decoder:
        past = self._empty_past(batch)

        def decode(step_ids: np.ndarray) -> np.ndarray:
            nonlocal past
            logits, past = self.step(step_ids, past)
            return logits[:, -1, :]
        return decode


class FusedOrtBackend(_ExportBackend):
    """The builder's graph: GroupQueryAttention reads and writes one KV buffer per layer in place."""

    def _feeds(self, ids: np.ndarray, past_len: int) -> dict[str, np.ndarray]:
        batch, new_len = ids.shape
        positions = np.arange(past_len, past_len + new_len, dtype=np.int64)
        return {"input_ids": ids, "attention_mask": np.ones((batch, past_len + new_len), dtype=np.int64),
                "position_ids": np.broadcast_to(positions, (batch, new_len)).copy()}

    def logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        ids = self._check_ids(input_ids)
        feeds = self._feeds(ids, 0)
        feeds.update(zip(self.input_names[3:], self._empty_past(ids.shape[0])))
        return torch.from_numpy(self.session.run(["logits"], feeds)[0])

    def _mask_value(self, batch: int, total: int):
        """An all-ones [batch, total] attention mask as an OrtValue, made once per shape and
        kept: creating one costs about as much as a small model's whole Python step."""
        import onnxruntime as ort

        if self._ones.size < batch * total:
            self._ones = np.ones(max(batch * total, 2 * self._ones.size), dtype=np.int64)
            self._masks = {}  # they point into the old array
        value = self._masks.get((batch, total))
        if value is None:
            value = ort.OrtValue.ortvalue_from_numpy(self._ones[:batch * total].reshape(batch, total))
            self._masks[(batch, total)] = value
        return value

    def _decoder(self, batch: int, capacity: int) -> Decoder:
        import onnxruntime as ort

        if not hasattr(self, "_ones"):
            self._ones, self._masks = np.ones(0, dtype=np.int64), {}
        binding = self.session.io_binding()
        shape = (batch, self.kv_heads, capacity, self.head_dim)
        # Kept alive by the closure: the binding holds raw pointers into these arrays.
        buffers = [np.zeros(shape, dtype=np.float32) for _ in range(2 * self.layers)]
        for past_name, present_name, buffer in zip(self.input_names[3:], self.output_names[1:], buffers):
            value = ort.OrtValue.ortvalue_from_numpy(buffer)
            binding.bind_ortvalue_input(past_name, value)
            binding.bind_ortvalue_output(present_name, value)
        # A decode step writes its token and position into these bound [batch, 1] arrays in
        # place (an OrtValue shares a numpy array's memory), so it binds only the mask.
        step_ids, step_positions = np.zeros((batch, 1), dtype=np.int64), np.zeros((batch, 1), dtype=np.int64)
        step_values = (ort.OrtValue.ortvalue_from_numpy(step_ids), ort.OrtValue.ortvalue_from_numpy(step_positions))
        past_len = 0
        logits = np.empty(0, dtype=np.float32)

        def decode(new_ids: np.ndarray) -> np.ndarray:
            nonlocal past_len, logits
            new_len = new_ids.shape[1]
            if logits.shape[:2] != new_ids.shape:  # prefill, then once for the first decode step
                logits = np.empty((*new_ids.shape, self.vocab_size), dtype=np.float32)
                binding.bind_ortvalue_output("logits", ort.OrtValue.ortvalue_from_numpy(logits))
                if new_len == 1:
                    binding.bind_ortvalue_input("input_ids", step_values[0])
                    binding.bind_ortvalue_input("position_ids", step_values[1])
            total = past_len + new_len
            if new_len == 1:
                step_ids[:] = new_ids
                step_positions.fill(past_len)
            else:
                binding.bind_cpu_input("input_ids", np.ascontiguousarray(new_ids))
                binding.bind_cpu_input("position_ids", np.broadcast_to(
                    np.arange(past_len, total, dtype=np.int64), (batch, new_len)).copy())
            binding.bind_ortvalue_input("attention_mask", self._mask_value(batch, total))
            self.session.run_with_iobinding(binding)
            past_len = total
            return logits[:, -1, :]
        decode.buffers = buffers  # noqa: B010 - ownership, see above
        decode.step_arrays = (step_ids, step_positions)  # noqa: B010 - the same
        return decode


def load_export(export_dir: str | os.PathLike, **options) -> _ExportBackend:
    """The backend for an export directory, by the graph layout its manifest names."""
    manifest = read_manifest(export_dir)
    if manifest is None:
        raise ExportError(f"{export_dir} is not an onnx export (no valid export.json)")
    cls = FusedOrtBackend if manifest.get("graph") == "fused" else OrtBackend
    return cls(export_dir, **options)
