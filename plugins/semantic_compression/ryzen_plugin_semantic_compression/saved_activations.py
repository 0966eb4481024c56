"""Compressed saved activations: the tensors autograd keeps for backward, stored in bf16 or int8.

Between forward and backward, a training step holds every activation some backward formula
needs; for a small model with a long context that, not the weights, is most of its memory.
`saved_tensors_hooks` lets us store a compressed copy instead and expand it when backward
asks for it. Levels, from exact to smallest:

- off:  fp32 as autograd saves it.
- bf16: 2 bytes per value (8-bit mantissa; relative error <= 2^-9).
- int8: 1 byte per value, affine per row of the last dimension (its own min and step), plus
        8 bytes per row; the error is at most half a step, (max - min) / 510.

`PeakTensorBytes` measures what this buys: the peak of live tensor bytes during a step.
"""
from __future__ import annotations

import contextlib
import weakref
from typing import Iterable, Literal

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

Level = Literal["off", "bf16", "int8"]
LEVELS: tuple[Level, ...] = ("off", "bf16", "int8")
COMPRESSIBLE = (torch.float32, torch.float16, torch.bfloat16)


QUANTIZE_CHUNK = 1 << 18  # elements per chunk: bounds the float temporaries of (de)quantization to 1 MiB


def _quantize_rows(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """int8 codes, per-row minimum and step of `t` viewed as rows of its last dimension.

    Done a chunk of rows at a time: quantizing in one go would allocate float temporaries the
    size of the tensor, at the very moment memory is meant to be saved.
    """
    rows = t.detach().reshape(-1, t.shape[-1])
    codes = torch.empty(rows.shape, dtype=torch.int8)
    low = torch.empty(rows.shape[0], 1)
    step = torch.empty(rows.shape[0], 1)
    chunk = max(1, QUANTIZE_CHUNK // rows.shape[1])
    for start in range(0, rows.shape[0], chunk):
        block = rows[start:start + chunk].float()
        block_low = block.amin(dim=1, keepdim=True)
        block_step = (block.amax(dim=1, keepdim=True) - block_low).clamp_min(1e-12) / 255.0
        low[start:start + chunk], step[start:start + chunk] = block_low, block_step
        codes[start:start + chunk] = ((block - block_low) / block_step).round_().sub_(128.0)
    return codes, low, step


def _dequantize_rows(codes: torch.Tensor, low: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
    out = torch.empty(codes.shape)
    chunk = max(1, QUANTIZE_CHUNK // codes.shape[1])
    for start in range(0, codes.shape[0], chunk):
        block = codes[start:start + chunk].float().add_(128.0)
        out[start:start + chunk] = block.mul_(step[start:start + chunk]).add_(low[start:start + chunk])
    return out


class ActivationCompressor:
    """pack/unpack for one forward pass (one cache of already-packed tensors).

    Skipped, because compressing them would cost memory or accuracy for nothing:
    tensors sharing storage with a parameter (autograd saves a weight by reference; a copy
    would add memory), integer tensors, and tensors under `min_elements` (norm statistics).
    A tensor saved by several ops (the residual stream, q/k/v views) is packed once.
    """

    def __init__(self, level: Level, parameters: Iterable[torch.Tensor] = (), min_elements: int = 1024):
        if level not in LEVELS:
            raise ValueError(f"unknown saved-activation level {level!r}; choose from {LEVELS}")
        self.level, self.min_elements = level, min_elements
        self.parameter_storages = {p.untyped_storage().data_ptr() for p in parameters}
        self._packed: dict[tuple, tuple[weakref.ref, object, int]] = {}
        self.bytes_in = self.bytes_out = 0

    def _skip(self, t: torch.Tensor) -> bool:
        return (self.level == "off" or t.dtype not in COMPRESSIBLE or t.numel() < self.min_elements
                or t.layout != torch.strided or t.untyped_storage().data_ptr() in self.parameter_storages
                or (self.level == "bf16" and t.dtype != torch.float32))

    def pack(self, t: torch.Tensor):
        if self._skip(t):
            return ("exact", t)
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride(), t.dtype)
        cached = self._packed.get(key)
        # The weak reference proves the cached entry is this very tensor, not a later one that reuses the address.
        if cached is not None and cached[0]() is t and t._version == cached[2]:
            return cached[1]
        self.bytes_in += t.numel() * t.element_size()
        if self.level == "bf16":
            packed = ("bf16", t.detach().to(torch.bfloat16), t.dtype)
            self.bytes_out += t.numel() * 2
        else:
            codes, low, step = _quantize_rows(t)
            packed = ("int8", codes, low, step, t.shape, t.dtype)
            self.bytes_out += codes.numel() + low.numel() * 8
        self._packed[key] = (weakref.ref(t), packed, t._version)
        return packed

    @staticmethod
    def unpack(packed):
        kind = packed[0]
        if kind == "exact":
            return packed[1]
        if kind == "bf16":
            return packed[1].to(packed[2])
        _, codes, low, step, shape, dtype = packed
        return _dequantize_rows(codes, low, step).reshape(shape).to(dtype)


@contextlib.contextmanager
def compressed_saved_activations(level: Level = "bf16", model: torch.nn.Module | None = None,
                                 min_elements: int = 1024):
    """Inside this context, tensors saved for backward are stored at `level`; yields the compressor
    (its bytes_in / bytes_out say how much it packed). Pass the model so its weights are left alone."""
    compressor = ActivationCompressor(level, model.parameters() if model is not None else (), min_elements)
    if level == "off":
        yield compressor
        return
    try:
        with torch.autograd.graph.saved_tensors_hooks(compressor.pack, compressor.unpack):
            yield compressor
    finally:
        compressor._packed.clear()  # the graph keeps what it needs; the cache must not outlive the forward


class PeakTensorBytes(TorchDispatchMode):
    """Live bytes of the tensors created while active, and their peak.

    Every op's outputs pass through the dispatcher; each new storage is counted once and
    uncounted when it is freed (a weak-reference finalizer on the storage). Tensors that
    existed before entry (weights, optimizer state) are not counted: add them yourself.
    Memory that torch allocates outside tensors (oneDNN scratch) is not seen.
    """

    def __init__(self):
        super().__init__()
        self.live: dict[int, int] = {}
        self.current = self.peak = 0
        self.peak_op = ""
        """The op whose output set the peak: where in the step memory is tightest."""

    def _free(self, key: int) -> None:
        self.current -= self.live.pop(key, 0)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.layout == torch.strided:
                storage = t.untyped_storage()
                key, size = storage.data_ptr(), storage.nbytes()
                if size == 0 or key in self.live:
                    continue
                self.live[key] = size
                self.current += size
                if self.current > self.peak:
                    self.peak, self.peak_op = self.current, str(func)
                weakref.finalize(storage, self._free, key)
        return out


def tensor_bytes(tensors: Iterable[torch.Tensor]) -> int:
    """Bytes of the distinct storages behind `tensors`."""
    seen: dict[int, int] = {}
    for t in tensors:
        storage = t.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
    return sum(seen.values())


def optimizer_state_tensors(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    return [v for state in optimizer.state.values() for v in state.values() if isinstance(v, torch.Tensor)]
