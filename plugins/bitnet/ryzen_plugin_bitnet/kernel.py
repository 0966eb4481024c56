"""Ternary inference from the packed weights: a layer that multiplies int8 activations by ternary weights.

Per layer and token: the same RMSNorm and absmax int8 quantizer as training (`quant.py`), then the
integer product `acc = q @ t^T` (exact: |acc| <= 128 * in_features, far inside int32), then
`y = acc * step * scale`. `acc` is the fake-quant forward's integer grid, exactly; only the final
float rescale differs from training's `(q * step) @ (t * scale)^T` by rounding.

Two implementations of the product, chosen per layer (`kernel`):

- `cpp-vnni` / `cpp-avx2` / `cpp-scalar` (cpp_kernel.py): the whole layer in one C++ call that reads
  the 2-bit codes, at any number of rows (it was faster than the torch int8 path below from 1 to 512
  rows when measured, benchmarks/bench_kernel.py and the README).
- `int_mm` (`torch._int_mm`, oneDNN int8 GEMM) on an int8 copy of the weights, or `int32` (an int32
  matmul) where `_int_mm` is not exact for the shape: the fallback when the C++ kernel cannot be
  built, or when asked for.
"""
from __future__ import annotations

import copy

import torch
import torch.nn as nn

from . import cpp_kernel
from .head import quantize_head
from .packed import load_packed
from .quant import BitLinear, quantizable_linears, quantized_input, replace_module, ternary_weights

TORCH_KERNELS = ("int_mm", "int32")
CPP_KERNELS = tuple(cpp_kernel.ISA_NAMES.values())


def int8_matmul(a: torch.Tensor, b: torch.Tensor, kernel: str) -> torch.Tensor:
    """int8 [M, K] x int8 [K, N] -> int32 [M, N]."""
    if kernel == "int_mm":
        return torch._int_mm(a, b)
    return a.to(torch.int32) @ b.to(torch.int32)


def int_mm_works(t: torch.Tensor) -> bool:
    """Whether torch._int_mm multiplies activations by this weight exactly, at batch 1 and at 17 rows."""
    gen = torch.Generator().manual_seed(0)
    for rows in (1, 17):
        a = torch.randint(-128, 128, (rows, t.shape[1]), dtype=torch.int8, generator=gen)
        try:
            if not torch.equal(torch._int_mm(a, t.t()), a.to(torch.int32) @ t.t().to(torch.int32)):
                return False
        except RuntimeError:
            return False
    return True


def cpp_kernel_name(requested: str) -> str:
    """`cpp` -> the fastest C++ kernel this CPU runs; a named one is checked. Raises KernelUnavailable."""
    status = cpp_kernel.load()
    if not status.available:
        raise cpp_kernel.KernelUnavailable(f"the C++ ternary kernel is unavailable: {status.reason}")
    if requested == "cpp":
        return status.name
    if requested not in [cpp_kernel.ISA_NAMES[isa] for isa in cpp_kernel.usable_isas()]:
        raise cpp_kernel.KernelUnavailable(f"this CPU cannot run the {requested} kernel (best: {status.name})")
    return requested


class TernaryLinear(nn.Module):
    """A BitLinear for inference: ternary weights, fp32 scale, integer product.

    `kernel`: None (the C++ kernel where it builds, else torch's), `cpp` (the C++ kernel or an error),
    `torch` (int_mm where it is exact, else int32), or one of CPP_KERNELS + TORCH_KERNELS by name.
    A C++ layer keeps only the blocked 2-bit codes as its buffer (what decode reads); a torch layer
    keeps the int8 weights."""

    def __init__(self, t: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None,
                 input_norm: bool = True, kernel: str | None = None):
        super().__init__()
        if t.dtype != torch.int8 or t.dim() != 2:
            raise ValueError(f"ternary weights must be a 2-d int8 tensor, got {t.dtype} {tuple(t.shape)}")
        if kernel is not None and kernel not in ("cpp", "torch", *CPP_KERNELS, *TORCH_KERNELS):
            raise ValueError(f"kernel must be cpp, torch, one of {CPP_KERNELS + TORCH_KERNELS} or None, "
                             f"not {kernel!r}")
        self.out_features, self.in_features = t.shape
        self.register_buffer("scale", scale.reshape(()).float())
        self.register_buffer("bias", None if bias is None else bias.float())
        self.input_norm, self.fallback_reason = input_norm, None
        self.kernel = self._choose_kernel(kernel)
        self.register_buffer("codes" if self.cpp else "ternary",
                             cpp_kernel.block_codes(t) if self.cpp else t.contiguous())
        self.scale_value, self.isa = float(self.scale), cpp_kernel.ISA_BY_NAME.get(self.kernel)
        if not self.cpp and self.kernel not in TORCH_KERNELS:
            self.kernel = "int_mm" if int_mm_works(self.ternary) else "int32"

    def _choose_kernel(self, kernel: str | None) -> str | None:
        """The C++ kernel's name, a torch kernel's, or None (a torch kernel, chosen once the weights are in)."""
        if kernel in TORCH_KERNELS:
            return kernel
        if kernel == "torch":
            return None
        try:
            return cpp_kernel_name(kernel or "cpp")
        except cpp_kernel.KernelUnavailable as exc:
            if kernel is not None:
                raise
            self.fallback_reason = str(exc)
            return None

    @property
    def cpp(self) -> bool:
        return self.kernel in CPP_KERNELS

    def integer_forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(acc int32 [M, out], step [M, 1]) for x [..., in] flattened to M rows."""
        x = x.reshape(-1, self.in_features).float()
        if self.cpp:
            return cpp_kernel.integer_forward(x.contiguous(), self.codes, self.out_features, self.input_norm, self.isa)
        q, step = quantized_input(x, self.input_norm)
        return int8_matmul(q.to(torch.int8), self.ternary.t(), self.kernel), step

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.cpp:
            flat = x.reshape(-1, self.in_features).float().contiguous()
            y = cpp_kernel.linear(flat, self.codes, self.out_features, self.scale_value, self.bias, self.input_norm,
                                  self.isa)
        else:
            acc, step = self.integer_forward(x)
            y = acc.float() * (step * self.scale)
            if self.bias is not None:
                y = y + self.bias
        return y.reshape(*x.shape[:-1], self.out_features).to(x.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, kernel={self.kernel}"


def kernel_description(model: nn.Module) -> str:
    """What the model's ternary layers run, for reports: e.g. `cpp-vnni`, or `torch-int8 fallback (reason): int_mm`."""
    layers = [m for m in model.modules() if isinstance(m, TernaryLinear)]
    kernels = sorted({m.kernel for m in layers})
    if layers and all(m.cpp for m in layers):
        return ", ".join(kernels)
    reasons = sorted({m.fallback_reason for m in layers if m.fallback_reason})
    why = f"fallback ({'; '.join(reasons)})" if reasons else "(asked for)"
    return f"torch-int8 {why}: {', '.join(kernels)}"


def ternary_model(model: nn.Module, packed: dict | None = None, input_norm: bool = True,
                  kernel: str | None = None, head: str = "fp32") -> nn.Module:
    """A copy of `model` (BitLinear or plain Linear layers) with each quantized layer a TernaryLinear.

    With `packed` (from `load_packed`) the weights come from it, after checking they are exactly the
    quantization of the model's own weights (a stale file is an error, not a silent other model).
    `kernel` as TernaryLinear's; `head` "int8" quantizes the LM head too (head.py; `head_kind` says what it
    became), "fp32" keeps it."""
    if head not in ("fp32", "int8"):
        raise ValueError(f"head must be fp32 or int8, not {head!r}")
    copied = copy.deepcopy(model).eval()
    names = quantizable_linears(copied)
    if packed is not None and set(packed) != set(names):
        raise ValueError(f"packed weights hold layers {sorted(packed)[:3]}..., the model quantizes {names[:3]}...")
    for name in names:
        layer = copied.get_submodule(name)
        t, scale = ternary_weights(layer.weight)
        bias = None if layer.bias is None else layer.bias.detach()
        if packed is not None:
            t_packed, scale_packed, bias = packed[name]
            if not (torch.equal(t_packed, t.to(torch.int8)) and torch.equal(scale_packed.reshape(()), scale)):
                raise ValueError(f"packed weights of {name} are not the quantized weights of this model")
        norm = layer.input_norm if isinstance(layer, BitLinear) else input_norm
        replace_module(copied, name, TernaryLinear(t.to(torch.int8), scale, bias, norm, kernel))
    if head == "int8":
        quantize_head(copied)
    return copied


def load_ternary_model(model: nn.Module, path, input_norm: bool = True, kernel: str | None = None,
                       head: str = "fp32") -> nn.Module:
    return ternary_model(model, load_packed(path), input_norm, kernel, head)
