"""Speculative decoding for Ryzen: drafts verified by the target model in one cached forward, so the
output is exactly what plain decoding would give (greedy: the same tokens; sampling: the same distribution)."""

from .decoding import SpeculationStats, speculative_generate
from .draft_model import DraftModelDrafter, LookupThenModelDrafter
from .drafters import PromptLookupDrafter
from .settings import SpeculativeSettings

__all__ = ["DraftModelDrafter", "LookupThenModelDrafter", "PromptLookupDrafter", "SpeculationStats",
           "SpeculativeSettings", "speculative_generate"]
