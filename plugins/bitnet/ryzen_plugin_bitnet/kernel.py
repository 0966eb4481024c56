"""Ternary inference from the packed weights: unpack to int8 once at load, int8 x int8 -> int32 per step.

Per layer and token: the same RMSNorm and absmax int8 quantizer as training (`quant.py`), then the
integer product `acc = q @ t^T` (exact: |acc| <= 128 * in_features, far inside int32), then
`y = acc * step * scale`. `acc` is the fake-quant forward's integer grid, exactly; only the final
float rescale differs from training's `(q * step) @ (t * scale)^T` by rounding.

The product is `torch._int_mm` (oneDNN/fbgemm int8 GEMM; VNNI where the CPU has it). Each layer
checks once at load that it runs for this shape and equals the exact product, else it uses an int32
matmul (slower, same integers) and says so in `kernel`. There is no hand-written C++/AVX-512 kernel:
the 2-bit codes are not read at decode time, the int8 copy is (1 byte per weight).
"""
from __future__ import annotations

import copy

import torch
import torch.nn as nn

from .packed import load_packed
from .quant import BitLinear, quantizable_linears, quantized_input, replace_module, ternary_weights

KERNELS = ("int_mm", "int32")


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


class TernaryLinear(nn.Module):
    """A BitLinear for inference: int8 ternary weights [out, in], fp32 scale, integer product."""

    def __init__(self, t: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None,
                 input_norm: bool = True, kernel: str | None = None):
        super().__init__()
        if t.dtype != torch.int8 or t.dim() != 2:
            raise ValueError(f"ternary weights must be a 2-d int8 tensor, got {t.dtype} {tuple(t.shape)}")
        self.out_features, self.in_features = t.shape
        self.register_buffer("ternary", t.contiguous())
        self.register_buffer("scale", scale.reshape(()).float())
        self.register_buffer("bias", None if bias is None else bias.float())
        self.input_norm = input_norm
        self.kernel = kernel if kernel is not None else "int_mm" if int_mm_works(self.ternary) else "int32"
        if self.kernel not in KERNELS:
            raise ValueError(f"kernel must be one of {KERNELS}, not {self.kernel!r}")

    def integer_forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(acc int32 [M, out], step [M, 1]) for x [..., in] flattened to M rows."""
        q, step = quantized_input(x.reshape(-1, self.in_features).float(), self.input_norm)
        return int8_matmul(q.to(torch.int8), self.ternary.t(), self.kernel), step

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        acc, step = self.integer_forward(x)
        y = acc.float() * (step * self.scale)
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*x.shape[:-1], self.out_features).to(x.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, kernel={self.kernel}"


def ternary_model(model: nn.Module, packed: dict | None = None, input_norm: bool = True) -> nn.Module:
    """A copy of `model` (BitLinear or plain Linear layers) with each quantized layer a TernaryLinear.

    With `packed` (from `load_packed`) the weights come from it, after checking they are exactly the
    quantization of the model's own weights (a stale file is an error, not a silent other model)."""
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
        replace_module(copied, name, TernaryLinear(t.to(torch.int8), scale, bias, norm))
    return copied


def load_ternary_model(model: nn.Module, path, input_norm: bool = True) -> nn.Module:
    return ternary_model(model, load_packed(path), input_norm)
