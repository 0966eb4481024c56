"""The packed ternary format: 2 bits per weight plus one fp32 scale per tensor, in safetensors.

Layout of `ternary.safetensors` (format `ryzen-bitnet-i2`, version 1), per quantized layer NAME
(its module name, e.g. `blocks.0.attn.qkv` or `model.layers.0.self_attn.q_proj`):

- `NAME.packed`: uint8 [out_features, ceil(in_features / 4)]. Row i holds the weights of output i;
  weight j sits in byte j // 4 at bits 2*(j % 4) .. 2*(j % 4) + 1 (the first weight in the low bits).
  The code is t + 1: 0 = -1, 1 = 0, 2 = +1 (3 is never written). Padding at the end of a row is code 1.
- `NAME.scale`: fp32 [1], the absmean scale: the layer's weight is t * scale.
- `NAME.bias`: fp32 [out_features], only for a layer with a bias.

The header's metadata has `format`, `version` and `shapes` (JSON: NAME -> [out_features, in_features]).
Only the quantized layers are here; embeddings, norms and the LM head stay in the checkpoint in fp32.
Codes and scale are the training quantizer's own (`ternary_weights`), so loading gives back the very
integers and scale the fake-quant forward used.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn as nn
from safetensors import safe_open
from safetensors.torch import save_file

from .quant import quantizable_linears, ternary_weights

FORMAT, VERSION = "ryzen-bitnet-i2", "1"
PER_BYTE = 4
FILE_NAME = "ternary.safetensors"


def pack_ternary(t: torch.Tensor) -> torch.Tensor:
    """[out, in] values in {-1, 0, 1} -> uint8 [out, ceil(in / 4)], four 2-bit codes per byte."""
    out_features, in_features = t.shape
    padded = -(-in_features // PER_BYTE) * PER_BYTE
    codes = torch.ones(out_features, padded, dtype=torch.uint8)
    codes[:, :in_features] = (t.to(torch.int8) + 1).to(torch.uint8)
    codes = codes.view(out_features, -1, PER_BYTE)
    return codes[..., 0] | codes[..., 1] << 2 | codes[..., 2] << 4 | codes[..., 3] << 6


def unpack_ternary(packed: torch.Tensor, in_features: int) -> torch.Tensor:
    """The inverse of `pack_ternary`: int8 [out, in_features] in {-1, 0, 1}."""
    codes = torch.stack([(packed >> (2 * k)) & 3 for k in range(PER_BYTE)], dim=-1)
    return codes.view(packed.shape[0], -1)[:, :in_features].to(torch.int8) - 1


def save_packed(model: nn.Module, path: Path) -> dict[str, int]:
    """Write `model`'s quantized layers to `path` in the packed format; bytes of each format, for the report."""
    tensors, shapes = {}, {}
    for name in quantizable_linears(model):
        layer = model.get_submodule(name)
        t, scale = ternary_weights(layer.weight)
        tensors[f"{name}.packed"] = pack_ternary(t)
        tensors[f"{name}.scale"] = scale.reshape(1)
        if layer.bias is not None:
            tensors[f"{name}.bias"] = layer.bias.detach().float().contiguous()
        shapes[name] = list(layer.weight.shape)
    path = Path(path)
    save_file(tensors, str(path), metadata={"format": FORMAT, "version": VERSION, "shapes": json.dumps(shapes)})
    weights = sum(o * i for o, i in shapes.values())
    return {"layers": len(shapes), "weights": weights, "fp32_bytes": 4 * weights, "bf16_bytes": 2 * weights,
            "packed_bytes": sum(t.numel() * t.element_size() for t in tensors.values()),
            "file_bytes": path.stat().st_size}


def load_packed(path: Path) -> dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]]:
    """NAME -> (t as int8 [out, in], scale fp32 [1], bias or None), from a file `save_packed` wrote."""
    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata() or {}
        if metadata.get("format") != FORMAT or metadata.get("version") != VERSION:
            raise ValueError(f"{path} is not a {FORMAT} v{VERSION} file (metadata {metadata})")
        keys = set(handle.keys())
        layers = {}
        for name, (out_features, in_features) in json.loads(metadata["shapes"]).items():
            packed = handle.get_tensor(f"{name}.packed")
            if packed.shape != (out_features, -(-in_features // PER_BYTE)):
                raise ValueError(f"{path}: {name}.packed has shape {tuple(packed.shape)}, not that of "
                                 f"[{out_features}, {in_features}] packed")
            bias = handle.get_tensor(f"{name}.bias") if f"{name}.bias" in keys else None
            layers[name] = (unpack_ternary(packed, in_features), handle.get_tensor(f"{name}.scale"), bias)
    return layers
