"""The speculative plugin (entry-point name `speculative`): one `SpeculativePlugin` per variant.

- on_infer: replaces the variant's generation with speculative decoding on the same model (prompt-lookup
  or draft-model drafts verified in one cached forward), lossless by construction; loads the draft model
  (`draft_run`) and checks its tokenizer against the target's; records the settings once and, after every
  generation, its acceptance figures and the totals so far.

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
        self.draft_model = None  # loaded from settings.draft_run by on_infer

    @hookimpl
    def on_infer(self, generate, model, tokenizer, record):
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
        if settings.draft_run is not None:
            from .draft_run import load_draft_model

            # A ConfigError here (another tokenizer) disables the plugin with that one line; the run goes on plain.
            self.draft_model = load_draft_model(settings.draft_run, model, tokenizer)
        self.totals = SpeculationStats()
        record("speculation", drafting=self.drafting(), replaces="the plain KV-cache loop (same model)",
               draft_parameters=sum(p.numel() for p in self.draft_model.parameters()) if self.draft_model else None,
               **settings.model_dump(mode="json"))
        return self.speculative_generate(model, record)

    def drafting(self) -> str:
        """What drafts: "prompt_lookup", "draft_model" or "prompt_lookup+draft_model" (auto with a draft model)."""
        if self.draft_model is None:
            return "prompt_lookup"
        return "draft_model" if self.settings.drafter == "model" else "prompt_lookup+draft_model"

    def new_drafter(self):
        """A drafter for one generation (a draft model's keeps that generation's cache)."""
        from .draft_model import DraftModelDrafter, LookupThenModelDrafter
        from .drafters import PromptLookupDrafter

        settings, kind = self.settings, self.drafting()
        if kind == "prompt_lookup":
            return PromptLookupDrafter(settings.ngram_max, settings.ngram_min)
        if kind == "draft_model":
            return DraftModelDrafter(self.draft_model)
        strict_lookup = PromptLookupDrafter(settings.ngram_max, settings.ngram_max)
        return LookupThenModelDrafter(strict_lookup, DraftModelDrafter(self.draft_model))

    def speculative_generate(self, model, record=None):
        """`generate(input_ids, max_new_tokens, *, temperature, top_k, top_p, eos_token_id, generator,
        on_token)` by speculative decoding on `model`, counting into `self.totals`."""
        from .adaptive import DraftLength
        from .decoding import SpeculationStats, speculative_generate

        settings = self.settings

        def generate(input_ids, max_new_tokens, **sampling):
            drafter = self.new_drafter()
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
