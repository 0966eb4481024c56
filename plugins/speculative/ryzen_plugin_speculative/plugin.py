"""The speculative plugin (entry-point name `speculative`): one `SpeculativePlugin` per variant.

- on_infer: replaces the variant's generation with speculative decoding on the same model (prompt-lookup
  or draft-model drafts verified in one cached forward), lossless by construction; loads the draft model
  (`draft_run`) and checks its tokenizer against the target's, and measures what its step costs against
  the target's (`draft_cost`); records the settings once and, after every generation, its acceptance
  figures and the totals so far.

The draft model's schedule (adaptive.py) lives as long as the plugin, so what it learnt of the draft
model's worth carries from one generation of the variant to the next; prompt lookup's starts afresh with
every generation.

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
        self.draft_cost = 0.0  # the draft model's step in target steps (settings.draft_cost, or measured)
        self.model_schedule = None  # the draft model's DraftLength, shared by every generation

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
            self.start_model_schedule(model)
        self.totals = SpeculationStats()
        record("speculation", drafting=self.drafting(), replaces="the plain KV-cache loop (same model)",
               draft_parameters=sum(p.numel() for p in self.draft_model.parameters()) if self.draft_model else None,
               **settings.model_dump(mode="json"),
               draft_step_cost=self.draft_cost if self.draft_model else None,
               draft_cost_measured=settings.draft_cost is None if self.draft_model else None)
        return self.speculative_generate(model, record)

    def start_model_schedule(self, model) -> None:
        """The draft model's cost (the setting, else measured against `model`) and its schedule."""
        from .adaptive import DraftLength
        from .step_cost import measured_draft_cost

        settings = self.settings
        if settings.draft_cost is not None:
            self.draft_cost = settings.draft_cost
        else:
            was_training = model.training
            model.eval()
            try:
                self.draft_cost = measured_draft_cost(model, self.draft_model)
            finally:
                model.train(was_training)
        self.model_schedule = DraftLength(settings.max_draft, settings.adaptive, settings.min_tokens_per_forward,
                                          self.draft_cost)

    def drafting(self) -> str:
        """What drafts: "prompt_lookup", "draft_model" or "prompt_lookup+draft_model" (auto with a draft model)."""
        if self.draft_model is None:
            return "prompt_lookup"
        return "draft_model" if self.settings.drafter == "model" else "prompt_lookup+draft_model"

    def new_drafter(self):
        """A drafter for one generation (a draft model's keeps that generation's cache); under `drafter:
        auto` the draft model drafts as the plugin's model schedule says."""
        from .draft_model import DraftModelDrafter, LookupThenModelDrafter
        from .drafters import PromptLookupDrafter

        settings, kind = self.settings, self.drafting()
        if kind == "prompt_lookup":
            return PromptLookupDrafter(settings.ngram_max, settings.ngram_min)
        if kind == "draft_model":
            return DraftModelDrafter(self.draft_model)
        strict_lookup = PromptLookupDrafter(settings.ngram_max, settings.ngram_max)
        return LookupThenModelDrafter(strict_lookup, DraftModelDrafter(self.draft_model), self.model_schedule)

    def new_schedule(self):
        """The decoding loop's schedule for one generation: the model schedule when only the draft model
        drafts, else a fresh one for prompt lookup, whose drafts cost nothing (under auto the draft
        model's steps go to the model schedule, which the drafter holds)."""
        from .adaptive import DraftLength

        settings = self.settings
        if self.drafting() == "draft_model":
            return self.model_schedule
        return DraftLength(settings.max_draft, settings.adaptive, settings.min_tokens_per_forward)

    def speculative_generate(self, model, record=None):
        """`generate(input_ids, max_new_tokens, *, temperature, top_k, top_p, eos_token_id, generator,
        on_token)` by speculative decoding on `model`, counting into `self.totals`."""
        from .decoding import SpeculationStats, speculative_generate

        def generate(input_ids, max_new_tokens, **sampling):
            drafter, schedule = self.new_drafter(), self.new_schedule()
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
