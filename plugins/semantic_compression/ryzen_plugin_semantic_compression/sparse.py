"""Top-k sparsity of the feed-forward hidden activations, and a decode path that skips the zeros.

`TopKMLP` takes over an MLP's submodules under their own names, so state_dict keys do not
change and checkpoints stay loadable into a plain model. In training and for full
sequences it zeroes all but the k largest-magnitude hidden activations per token (the
gradient flows through the k kept ones). For one token without autograd (batch-1 decode)
it gathers only the k selected rows of the transposed down-projection and sums them
weighted by the activations (`F.embedding_bag`), so the down-projection reads k rows
instead of d_ff: the work shrinks by the sparsity. The up-projection stays dense: all of
its outputs are needed to find the top k.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

SPARSITY_FILE = "compression.json"


def keep_top_k(h: torch.Tensor, k: int) -> torch.Tensor:
    """h with all but its k largest |values| along the last dimension set to zero."""
    index = h.abs().topk(k, dim=-1, sorted=False).indices
    return torch.zeros_like(h).scatter(-1, index, h.gather(-1, index))


def k_for_sparsity(width: int, sparsity: float) -> int | None:
    """Kept activations for a sparsity (fraction zeroed); None means dense."""
    if not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity must be in [0, 1), got {sparsity}")
    if sparsity == 0.0:
        return None
    return max(1, round(width * (1.0 - sparsity)))


class TopKMLP(nn.Module):
    """The built-in MLP (up, activation, down) or a gated one (gate_proj, up_proj, down_proj, act_fn)."""

    def __init__(self, mlp: nn.Module, k: int | None):
        super().__init__()
        for name, child in mlp.named_children():
            self.add_module(name, child)
        if all(hasattr(mlp, n) for n in ("up", "activation", "down")):
            self.gated, self.down_proj_name = False, "down"
        elif all(hasattr(mlp, n) for n in ("gate_proj", "up_proj", "down_proj", "act_fn")):
            self.gated, self.down_proj_name = True, "down_proj"
            self.act_fn = mlp.act_fn  # a plain attribute on some transformers versions, not a child module
        else:
            raise TypeError(f"{type(mlp).__name__} is not a supported MLP (need up/activation/down or "
                            "gate_proj/up_proj/down_proj/act_fn)")
        self.original_class = type(mlp)
        self.width = self._down.in_features
        self.k = k
        self._rows: torch.Tensor | None = None
        self._rows_version: tuple[int, int] | None = None

    @property
    def _down(self) -> nn.Linear:
        return getattr(self, self.down_proj_name)

    def hidden(self, x: torch.Tensor) -> torch.Tensor:
        if self.gated:
            return self.act_fn(self.gate_proj(x)) * self.up_proj(x)
        return self.activation(self.up(x))

    def _finish(self, y: torch.Tensor) -> torch.Tensor:
        dropout = getattr(self, "dropout", None)
        return dropout(y) if dropout is not None else y

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.hidden(x)
        if self.k is None or self.k >= self.width:
            return self._finish(self._down(h))
        if x.shape[:-1].numel() == 1 and not torch.is_grad_enabled() and not self.training:
            return self._sparse_down(h)
        return self._finish(self._down(keep_top_k(h, self.k)))

    def down_rows(self) -> torch.Tensor:
        """down.weight transposed and contiguous ([d_ff, d_model]): one row per hidden unit.

        Rebuilt whenever the weight changes (an optimizer step bumps its version), so decoding
        after more training never uses stale rows. Costs one extra copy of the down-projection.
        """
        weight = self._down.weight
        version = (weight.data_ptr(), weight._version)
        if self._rows is None or self._rows_version != version:
            self._rows = weight.detach().t().contiguous()
            self._rows_version = version
        return self._rows

    def _sparse_down(self, h: torch.Tensor) -> torch.Tensor:
        flat = h.reshape(1, -1)
        index = flat.abs().topk(self.k, dim=-1, sorted=False).indices
        y = F.embedding_bag(index, self.down_rows(), per_sample_weights=flat.gather(-1, index), mode="sum")
        if self._down.bias is not None:
            y = y + self._down.bias
        return y.reshape(*h.shape[:-1], y.shape[-1])


def mlp_modules(model: nn.Module) -> list[tuple[nn.Module, str, nn.Module]]:
    """(parent, attribute, mlp) for each transformer block's feed-forward module."""
    found = []
    for parent in model.modules():
        child = getattr(parent, "mlp", None)
        if isinstance(child, nn.Module):
            found.append((parent, "mlp", child))
    return found


def apply_topk(model: nn.Module, sparsity: float) -> list[TopKMLP]:
    """Make every block's MLP a TopKMLP at this sparsity (idempotent); returns them."""
    layers = []
    for parent, name, mlp in mlp_modules(model):
        if not isinstance(mlp, TopKMLP):
            mlp = TopKMLP(mlp, None)
            setattr(parent, name, mlp)
        mlp.k = k_for_sparsity(mlp.width, sparsity)
        layers.append(mlp)
    if not layers:
        raise TypeError(f"{type(model).__name__} has no `mlp` submodules to sparsify")
    return layers


def topk_layers(model: nn.Module) -> list[TopKMLP]:
    return [m for m in model.modules() if isinstance(m, TopKMLP)]


def current_sparsity(model: nn.Module) -> float:
    layers = topk_layers(model)
    if not layers or layers[0].k is None:
        return 0.0
    return 1.0 - layers[0].k / layers[0].width


def save_sparsity(model: nn.Module, directory: Path) -> None:
    layers = topk_layers(model)
    data = {"topk": layers[0].k if layers else None, "width": layers[0].width if layers else None,
            "sparsity": current_sparsity(model)}
    directory.mkdir(parents=True, exist_ok=True)
    (directory / SPARSITY_FILE).write_text(json.dumps(data, indent=2) + "\n")


def restore_sparsity(model: nn.Module, directory: Path) -> None:
    """Re-apply the top-k a run recorded (a saved model's weights do not say how sparse it ran)."""
    path = Path(directory) / SPARSITY_FILE
    if not path.is_file():
        return
    data = json.loads(path.read_text())
    if data.get("topk"):
        for mlp in apply_topk(model, 0.0):
            mlp.k = int(data["topk"])
