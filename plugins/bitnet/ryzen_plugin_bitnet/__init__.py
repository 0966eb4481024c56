"""Ryzen plugin `bitnet`: BitNet b1.58 ternary training, 2-bit packed weights and a packed ternary CPU kernel."""
from .kernel import TernaryLinear, ternary_model
from .packed import load_packed, pack_ternary, save_packed, unpack_ternary
from .quant import BitLinear, int8_activations, swap_in_bitlinear, ternary_weights

__all__ = ["BitLinear", "TernaryLinear", "int8_activations", "load_packed", "pack_ternary", "save_packed",
           "swap_in_bitlinear", "ternary_model", "ternary_weights", "unpack_ternary"]
