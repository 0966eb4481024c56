"""Hook implementations of the compression plugin (entry-point name `compression`)."""
from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict

from ryzen_core import hookimpl

from .saved_activations import compressed_saved_activations


class CompressionSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    saved_activations: Literal["off", "bf16"] = "bf16"
    """Precision of the tensors autograd keeps for backward during training."""


@hookimpl
def ryzen_settings():
    return CompressionSettings


@hookimpl
def transform_forward(forward, settings, record):
    if settings.saved_activations == "off":
        return None
    import torch

    record("saved_activations", dtype=settings.saved_activations)

    def compressed_forward(input_ids, targets):
        with compressed_saved_activations(torch.bfloat16):
            return forward(input_ids, targets)

    return compressed_forward
