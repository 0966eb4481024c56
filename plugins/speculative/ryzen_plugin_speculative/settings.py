"""The `speculative:` section of a run config."""
from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator

from ryzen_core import PluginSettings


class SpeculativeSettings(PluginSettings):
    """How drafts are made and how many are verified per target forward (README, Settings)."""

    enabled: bool = True
    """False leaves generation to the plain KV-cache loop (the plugin only records that)."""
    drafter: Literal["lookup", "model", "auto"] = "auto"
    """lookup: prompt lookup only. model: the draft model of `draft_run` only. auto: prompt lookup without
    a `draft_run`; with one, prompt lookup where the text repeats (a match of `ngram_max` tokens), the draft
    model elsewhere."""
    draft_run: Path | None = None
    """The run directory of a `ryzen train` run of a smaller model on the target's tokenizer (README)."""
    max_draft: int = Field(8, ge=1, le=64)
    """Most drafted tokens verified in one target forward."""
    ngram_max: int = Field(3, ge=1, le=16)
    """Prompt lookup: the longest suffix of the text so far searched for an earlier occurrence (tried first)."""
    ngram_min: int = Field(1, ge=1, le=16)
    """Prompt lookup: the shortest suffix tried before giving up on a draft for this step."""
    adaptive: bool = True
    """Adapt the draft length (+2 after a draft kept whole, -1 otherwise) and pause drafting while it does
    not pay (below); False drafts `max_draft` tokens whenever a match exists."""
    min_tokens_per_forward: float = Field(2.0, ge=1.0, le=64.0)
    """Adaptive: what a verification forward costs in one-token steps of the target. Drafting pauses while
    the running average of tokens per step (kept drafts + 1) over the step's cost (this, plus `draft_cost`
    per draft-model forward) is below 1, for a number of steps that doubles each time it pauses again
    without a step that paid in between. The default is what a forward over 2-8 tokens costs for the
    default model on 2 cores (README)."""
    draft_cost: float | None = Field(None, ge=0.0, le=64.0)
    """Adaptive, with a draft model: its one-token step in one-token steps of the target. None measures it
    when the draft model is loaded (a few alternated forwards of each, medians; recorded)."""

    @field_validator("draft_run")
    @classmethod
    def _a_run_directory(cls, path: Path | None) -> Path | None:
        from .draft_run import check_run_directory

        return None if path is None else check_run_directory(path)

    @model_validator(mode="after")
    def _consistent(self):
        if self.ngram_min > self.ngram_max:
            raise ValueError(f"ngram_min ({self.ngram_min}) must not exceed ngram_max ({self.ngram_max})")
        if self.drafter == "model" and self.draft_run is None:
            raise ValueError("drafter 'model' needs speculative.draft_run (the run directory of the draft model)")
        if self.draft_cost is not None and self.draft_run is None:
            raise ValueError("draft_cost is set but there is no draft_run: prompt lookup runs no model, so its "
                             "drafts cost nothing to make")
        if self.drafter == "lookup" and self.draft_run is not None:
            raise ValueError("draft_run is set but drafter is 'lookup', which would not use it; "
                             "set drafter to 'model' or 'auto'")
        return self
