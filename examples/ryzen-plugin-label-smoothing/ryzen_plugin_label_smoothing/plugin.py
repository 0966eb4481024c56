"""Every hook a training plugin usually needs, each doing one small real thing.

Copy this package to start your own plugin: rename it, change the entry point in
pyproject.toml, and keep only the hooks you need.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field

from ryzen_core import hookimpl


class SmoothingSettings(BaseModel):
    """Config section `smoothing:` (or `--set smoothing.amount=0.2`)."""

    model_config = ConfigDict(extra="forbid")

    amount: float = Field(0.1, ge=0.0, lt=1.0)
    """Probability mass spread uniformly over the vocabulary."""
    decay: float = Field(0.5, ge=0.0, le=1.0)
    """Factor applied to `amount` after each evaluation (1.0 keeps it constant)."""


@hookimpl
def ryzen_settings():
    return SmoothingSettings


@hookimpl
def on_model_load(model, record):
    record("model_loaded", parameters=sum(p.numel() for p in model.parameters()))


@hookimpl
def transform_forward(forward, settings, record):
    record("forward_wrapped", amount=settings.amount)

    def smoothed(input_ids, targets):
        out = forward(input_ids, targets)
        logits = out.logits.float()
        loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1),
                               label_smoothing=settings.amount)
        return out.with_loss(loss)

    return smoothed


@hookimpl
def on_train_start(optimizer, record):
    record("train_started", lr=optimizer.param_groups[0]["lr"])


@hookimpl
def on_epoch_end(epoch, metrics, settings):
    # Smoothing helps early and costs perplexity late: shrink it as training goes on.
    if settings.decay == 1.0:
        return None
    settings.amount = round(settings.amount * settings.decay, 6)
    return {"amount": settings.amount}


@hookimpl
def on_train_end(metrics, run_dir, settings, record):
    summary = {"final_amount": settings.amount, "final_val_loss": metrics.get("final_val_loss")}
    Path(run_dir, "label_smoothing.json").write_text(json.dumps(summary, indent=2))
    record("train_ended", **summary)
    return {"report_markdown": f"Label smoothing ended at {settings.amount:g} "
                               f"(validation loss {summary['final_val_loss']:.4f})."}
