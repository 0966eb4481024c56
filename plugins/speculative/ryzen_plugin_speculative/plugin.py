"""The speculative plugin (entry-point name `speculative`): one `SpeculativePlugin` per variant.

- on_infer: replaces the variant's generation with speculative decoding on the same model (prompt-lookup
  drafts verified in one cached forward), lossless by construction; records the settings once and, after
  every generation, its acceptance figures and the totals so far.

It changes no weights and no training, so `ryzen run --plugins speculative` shares the baseline's weights
and validation compares the two decoders on one model: agreement with the baseline is the losslessness
check, the decode tok/s ratio the speed-up.
"""
from __future__ import annotations

from typing import Any

from ryzen_core import InferencePath, Plugin, hookimpl

from .settings import SpeculativeSettings


class SpeculativePlugin(Plugin):
    """Speculative decoding: more than one token per target forward where drafts are right."""

    Settings = SpeculativeSettings

    def __init__(self, settings: SpeculativeSettings | None = None, context: Any = None):
        super().__init__(settings, context)
        self.totals = None  # SpeculationStats over every generation of this variant, once on_infer ran

    @hookimpl
    def on_infer(self, generate, model, record):
        from .decoding import SpeculationStats

        settings = self.settings
        if not settings.enabled:
            record("speculation_off", reason="speculative.enabled is false")
            return None
        if isinstance(generate, InferencePath) and generate.logits is not None:
            # An earlier plugin generates with another model (a quantized copy, say); drafting against
            # `model` would silently measure a different model than the one that runs.
            record("speculation_off", reason="an earlier plugin's on_infer generates with another model")
            return None
        self.totals = SpeculationStats()
        record("speculation", drafter="prompt_lookup", replaces="the plain KV-cache loop (same model)",
               **settings.model_dump())
        return self.speculative_generate(model, record)

    def speculative_generate(self, model, record=None):
        """`generate(input_ids, max_new_tokens, *, temperature, top_k, top_p, eos_token_id, generator,
        on_token)` by speculative decoding on `model`, counting into `self.totals`."""
        from .adaptive import DraftLength
        from .decoding import SpeculationStats, speculative_generate
        from .drafters import PromptLookupDrafter

        settings = self.settings

        def generate(input_ids, max_new_tokens, **sampling):
            drafter = PromptLookupDrafter(settings.ngram_max, settings.ngram_min)
            schedule = DraftLength(settings.max_draft, settings.adaptive, settings.min_tokens_per_forward)
            this_call = SpeculationStats()
            sequence = speculative_generate(model, input_ids, max_new_tokens, drafter=drafter,
                                            draft_length=schedule, stats=this_call, **sampling)
            if self.totals is not None:
                self.totals.add(this_call)
            if record is not None:
                record("generation", batch=int(input_ids.shape[0]), **this_call.summary(),
                       totals=self.totals.summary() if self.totals is not None else None)
            return sequence

        # The same weights generate, so the runtime table can class it by their precision; bytes per token
        # are left unsaid: one forward reads the weights once for several tokens.
        dtypes = {p.dtype for p in model.parameters() if p.is_floating_point()}
        generate.precision = {"torch.float32": "fp32", "torch.bfloat16": "bf16", "torch.float16": "fp16"}.get(
            str(dtypes.pop())) if len(dtypes) == 1 else None
        return generate
