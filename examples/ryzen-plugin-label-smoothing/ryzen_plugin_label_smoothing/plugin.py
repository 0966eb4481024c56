"""Label smoothing whose strength decays after each evaluation: a plugin to copy.

It shows the hooks a training plugin usually needs, each doing one small real thing:
a settings class, a loss term added the composing way (`transform_forward`), a setting
adapted from the validation curve (`on_epoch_end` -> Adaptation), a file and a report
section at the end (`on_train_end` -> ReportSection).

It is a `Plugin` class rather than a module of functions for one reason: the forward must
read the *current* amount, and the host applies an Adaptation by replacing the settings
object, which only an instance (`self.settings`) sees. A plugin that never adapts can be a
module of `@hookimpl` functions. The amount lives in the settings, which every checkpoint
saves, so a resume restores it without a `state_dict`.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from pydantic import Field

from ryzen_core import Adaptation, Plugin, PluginSettings, ReportSection, hookimpl


class SmoothingSettings(PluginSettings):
    """Config section `smoothing:` (or `--set smoothing.amount=0.2`)."""

    amount: float = Field(0.1, ge=0.0, lt=1.0)
    """Probability mass spread uniformly over the vocabulary."""
    decay: float = Field(0.5, ge=0.0, le=1.0)
    """Factor applied to `amount` after each evaluation (1.0 keeps it constant)."""


def smoothing_term(logits: torch.Tensor, targets: torch.Tensor, amount: float) -> torch.Tensor:
    """What label smoothing adds to a loss that already holds the next-token cross-entropy.

    With p = softmax(logits) over a vocabulary of V tokens and target y, per token:
        CE = -log p_y                      (what the plain forward's loss is)
        U  = -(1/V) * sum_c log p_c        (cross-entropy against the uniform distribution)
    Smoothing with amount e trains against (1-e)*onehot(y) + e/V, whose cross-entropy is
        (1-e)*CE + e*U  =  CE + e*(U - CE).
    So the smoothed loss is the incoming loss plus e*(U - CE), averaged over tokens. Adding it,
    instead of recomputing the loss from the logits, keeps every term earlier plugins put into
    `out.loss` (a Matryoshka loss, a penalty) with its weight, and later plugins see ours.
    """
    log_probs = torch.log_softmax(logits.float().reshape(-1, logits.size(-1)), dim=-1)
    cross_entropy = -log_probs.gather(1, targets.reshape(-1, 1)).squeeze(1)
    uniform = -log_probs.mean(dim=-1)
    return amount * (uniform - cross_entropy).mean()


class LabelSmoothing(Plugin):
    """Entry point `smoothing = "ryzen_plugin_label_smoothing.plugin:LabelSmoothing"`; one instance per variant."""

    Settings = SmoothingSettings

    @hookimpl
    def on_model_load(self, model, record):
        record("model_loaded", parameters=sum(p.numel() for p in model.parameters()))

    @hookimpl
    def transform_forward(self, forward, record):
        record("forward_wrapped", amount=self.settings.amount)

        def smoothed(input_ids, targets):
            out = forward(input_ids, targets)
            amount = self.settings.amount  # read per call: on_epoch_end's Adaptation applies from the next step
            if amount == 0.0:
                return out
            return out.with_loss(out.loss + smoothing_term(out.logits, targets, amount))

        return smoothed

    @hookimpl
    def on_train_start(self, optimizer, record):
        record("train_started", lr=optimizer.param_groups[0]["lr"])

    @hookimpl
    def on_epoch_end(self, epoch):
        # Smoothing helps early and costs perplexity late: shrink it as training goes on.
        # The host validates the change against SmoothingSettings and makes it the current settings.
        if self.settings.decay == 1.0:
            return None
        return Adaptation({"amount": round(self.settings.amount * self.settings.decay, 6)},
                          reason=f"decay after evaluation {epoch}")

    @hookimpl
    def on_train_end(self, metrics, run_dir, record):
        summary = {"final_amount": self.settings.amount, "final_val_loss": metrics.get("final_val_loss")}
        path = Path(run_dir, "label_smoothing.json")
        path.write_text(json.dumps(summary, indent=2))
        record("train_ended", **summary)
        val_loss = summary["final_val_loss"]
        loss_text = f"validation loss {val_loss:.4f}" if val_loss is not None else "no validation loss"
        return ReportSection(f"Label smoothing ended at {self.settings.amount:g} ({loss_text}).",
                             files={"summary": path})
