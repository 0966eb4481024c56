"""BitNet b1.58 quantization-aware training: `BitLinear` and the rule for which layers become one.

The recipe of arXiv 2402.17764 and its "training tips" note:
- weights: absmean per tensor, `t = clamp(round(w / mean|w|), -1, 1)`, used as `t * mean|w|`;
- activations: absmax per token to int8, `q = clamp(round(x / step), -128, 127)`, `step = max|x| / 127`;
- a parameter-free RMSNorm on the input before it is quantized (the paper's SubLN/RMSNorm role: the
  quantized input has unit scale whatever the layer before it wrote). Without a gain it adds no parameter, so a BitLinear's
  state_dict is a Linear's and checkpoints load into the plain model, where the plugin swaps again;
- straight-through estimator: the forward uses the quantized values, the backward treats both
  quantizers as the identity, so gradients reach the latent full-precision weights unchanged.

Embeddings and the LM head stay in full precision. The inference kernel (kernel.py) calls the same
`ternary_weights` and `quantized_input`, so its integers are these integers.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

EPS = 1e-5  # floor of the scales (an all-zero tensor or token) and the RMSNorm epsilon
INT8_MAX = 127


def rms_norm(x: torch.Tensor) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + EPS)


def ternary_weights(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(t, scale): t in {-1, 0, 1} (float), scale = mean|w| as a 0-d fp32 tensor; weight ~ t * scale."""
    scale = weight.detach().abs().mean().clamp(min=EPS).float()
    return (weight.detach() / scale).round().clamp(-1, 1), scale


def int8_activations(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(q, step): q integral in [-128, 127] (float), step = max|x| / 127 per token (last dim kept as 1)."""
    step = x.detach().abs().amax(-1, keepdim=True).clamp_(min=EPS) / INT8_MAX
    return (x.detach() / step).round_().clamp_(-INT8_MAX - 1, INT8_MAX), step


def quantized_input(x: torch.Tensor, input_norm: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(q, step) of the input as BitLinear multiplies it: `q * step` is the int8 absmax quantization of
    rms_norm(x) (or of x). Absmax quantization does not see a per-token factor, so q is taken from x
    itself and the norm's factor only scales the step: fewer operations, and training and the kernel
    share these very integers."""
    q, step = int8_activations(x)
    if input_norm:
        step = step * torch.rsqrt(x.detach().pow(2).mean(-1, keepdim=True) + EPS)
    return q, step


class BitLinear(nn.Linear):
    """A Linear trained ternary: fake-quantized weights and inputs in the forward, STE in the backward."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False, input_norm: bool = True,
                 device=None, dtype=None):
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.input_norm = input_norm

    @classmethod
    def from_linear(cls, linear: nn.Linear, input_norm: bool = True) -> "BitLinear":
        """A BitLinear sharing `linear`'s parameters (no copy: the optimizer, if any, still holds them)."""
        layer = cls.__new__(cls)
        nn.Module.__init__(layer)
        layer.in_features, layer.out_features, layer.input_norm = linear.in_features, linear.out_features, input_norm
        layer.weight, layer.bias = linear.weight, linear.bias
        return layer

    def normalized(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x) if self.input_norm else x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, step = quantized_input(x, self.input_norm)
        x = self.normalized(x)  # only for the gradient: the straight-through path goes through the norm
        t, scale = ternary_weights(self.weight)
        # Straight-through: the value is exactly the quantized one (adding an exact zero), the gradient
        # the identity's. The usual `w + (w_q - w).detach()` rounds twice and is off by an ulp.
        x_q = q * step + (x - x.detach())
        w_q = (t * scale).to(self.weight.dtype) + (self.weight - self.weight.detach())
        return F.linear(x_q.to(w_q.dtype), w_q, self.bias)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, ternary, input_norm={self.input_norm}"


def quantizable_linears(model: nn.Module) -> list[str]:
    """Names of the Linear layers BitNet quantizes: all but the LM head and any Linear whose weight is
    an embedding's (a tied head). Works for the built-in Transformer and HF Llama-style models alike."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    head = head if head is not None else getattr(model, "lm_head", None)
    embedding_weights = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    return [name for name, module in model.named_modules()
            if isinstance(module, nn.Linear) and module is not head and id(module.weight) not in embedding_weights]


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


def swap_in_bitlinear(model: nn.Module, input_norm: bool = True) -> list[str]:
    """Turn the quantizable Linear layers of `model` into BitLinear, in place; the names swapped."""
    names = quantizable_linears(model)
    for name in names:
        module = model.get_submodule(name)
        if isinstance(module, BitLinear):
            module.input_norm = input_norm
        else:
            replace_module(model, name, BitLinear.from_linear(module, input_norm))
    return names
