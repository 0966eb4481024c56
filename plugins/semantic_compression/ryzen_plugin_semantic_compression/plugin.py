"""The compression plugin (entry-point name `compression`): one CompressionPlugin per variant.

- on_model_load: top-k sparse feed-forward activations (TopKMLP) when a sparsity is asked for.
- transform_forward: the Matryoshka nested loss, and compressed saved activations.
- on_epoch_end: moves sparsity and the saved-activation level toward their targets while
  validation loss stays within tolerance; reverts and freezes a knob that broke it.
- on_train_end: measures what each technique bought on this model (evaluation.py).
- on_infer: decoding, and the perplexity validation measures, with the LM head on a truncated hidden
  state (`lm_head_dims`).
- register_commands: `ryzen embed`, `ryzen search` and `ryzen embed-train` (cli.py).

What on_epoch_end remembers between evaluations lives on the instance and is saved in every
checkpoint (state_dict), so a resumed run judges the pending change as the uninterrupted one would.
torch is imported inside the hooks: this module loads whenever `ryzen` starts.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Literal

from pydantic import ConfigDict, Field, field_validator, model_validator

from ryzen_core import Adaptation, InferencePath, Plugin, PluginSettings, ReportSection, hookimpl

Level = Literal["off", "bf16", "int8"]
LEVEL_ORDER = ("off", "bf16", "int8")


class CompressionSettings(PluginSettings):
    model_config = ConfigDict(use_attribute_docstrings=True)

    # 1. Matryoshka representation learning
    matryoshka: bool = True
    """Add the nested loss over prefixes of the final hidden state."""
    matryoshka_divisors: list[int] = Field(default_factory=lambda: [16, 8, 4, 2, 1], min_length=1)
    """Prefix sizes as d / divisor (d = hidden size); 1 is the full width."""
    matryoshka_weights: list[float] | None = None
    """One weight per divisor (same order). Default: the full width weighs as much as all smaller prefixes
    together (equal weights cost much more full-width quality; see the README)."""
    matryoshka_token_stride: int = Field(1, ge=1)
    """Estimate the prefix losses on every N-th position only: each costs a full logits matrix, and a
    stride of 4 cut that cost but raised validation loss (README)."""
    lm_head_dims: int | None = Field(None, gt=0)
    """Decode (on_infer) with the LM head on only the first N hidden dimensions; validation measures
    perplexity through that head too."""

    # 3. Sparse activations
    sparsity: float = Field(0.0, ge=0.0, lt=1.0)
    """Fraction of feed-forward hidden activations zeroed per token (top-k keeps the rest); the current value."""
    sparsity_target: float = Field(0.0, ge=0.0, lt=1.0)
    """on_epoch_end raises `sparsity` toward this while validation loss stays within tolerance."""
    sparsity_step: float = Field(0.125, gt=0.0, le=1.0)
    """How far one on_epoch_end change moves `sparsity`."""

    # 4. Compressed saved activations
    saved_activations: Level = "bf16"
    """Precision of the tensors autograd keeps for backward; the current value."""
    saved_activations_target: Level = "bf16"
    """on_epoch_end moves `saved_activations` toward this level, one level per evaluation."""

    val_loss_tolerance: float = Field(0.02, ge=0.0)
    """A change is kept while validation loss <= best so far * (1 + tolerance); otherwise it is reverted."""

    # What on_train_end measures
    evaluate: bool = True
    """on_train_end measures every technique on the trained model (and the run's baseline) and reports it."""
    retrieval_sources: list[str] = Field(default_factory=lambda: ["stdlib-functions", "stdlib-code-halves"],
                                         min_length=1)
    """Retrieval sets for the trained models: 'stdlib-functions' (docstring -> source), 'stdlib-code-halves'
    (first half of a function -> second half), or .jsonl files of query/document pairs. MiniLM uses the first."""
    retrieval_pairs: int | None = Field(None, gt=0)
    """Cap on the pairs per retrieval set (a fixed hash-chosen subset); default all."""
    minilm: bool = True
    """Also evaluate all-MiniLM-L6-v2 when the `minilm` extra is installed (skipped with a reason otherwise)."""
    embedding_training: Literal["adaptor", "full", "off"] = "adaptor"
    """Matryoshka for sentence embeddings: train `embedding_model` on stdlib training-split pairs with the nested
    contrastive loss, and again without it (the control), and compare their prefixes on the first retrieval set.
    adaptor: a linear map on the frozen encoder's embeddings (about 2 minutes for MiniLM on 2 cores, mostly
    encoding the pairs); full: fine-tune the encoder itself (about 6 minutes per 80 steps each); off: skip."""
    embedding_model: str = "minilm"
    """The pretrained encoder: 'minilm' (the minilm extra; skipped with `minilm: false`) or a
    sentence-transformers/transformers encoder directory."""
    embedding_epochs: int = Field(10, gt=0)
    """adaptor: passes over the training pairs."""
    embedding_steps: int = Field(80, gt=0)
    """full: fine-tuning steps."""
    embedding_batch_size: int | None = Field(None, ge=2)
    """Pairs per step (the batch's other documents are each query's negatives); default 128 (adaptor), 32 (full)."""
    embedding_lr: float | None = Field(None, gt=0)
    """AdamW learning rate; default 1e-3 constant (adaptor), 5e-5 peak with warmup and linear decay (full)."""
    embedding_max_tokens: int = Field(128, ge=8)
    """Training texts are cut to this many tokens (evaluation uses the model's own limit)."""
    embedding_bf16: bool | Literal["auto"] = "auto"
    """full: fine-tune under bf16 autocast; auto: where the CPU has native bf16 (AVX-512 BF16 or AMX)."""
    rescore_multiplier: int = Field(4, ge=1)
    """Binary search shortlists k * this many documents for rescoring."""
    sparsity_levels: list[float] = Field(default_factory=lambda: [0.5, 0.75, 0.875, 0.9375])
    """Sparsities at which test perplexity is measured after training."""
    perplexity_batches: int | None = Field(None, gt=0)
    """Test batches (train.batch_size rows) per perplexity figure; default validate.perplexity_batches, so the
    figures match the core report's test perplexity."""
    decode_new_tokens: int = Field(48, ge=2)
    """Greedy tokens per timed batch-1 generation (capped by the context)."""
    decode_repeats: int = Field(7, gt=0)
    """Interleaved A/B pairs per decode-speed comparison."""
    decode_threads: int | None = Field(1, gt=0)
    """Intra-op threads for the decode-speed comparisons (None: torch's current setting)."""
    memory_batch_size: int | None = Field(None, gt=0)
    """Batch of the saved-activation memory measurement; default train.batch_size."""
    memory_repeats: int = Field(3, gt=0)
    """Interleaved off/level pairs of that measurement (the peak is deterministic; repeats show it is)."""

    @field_validator("saved_activations", "saved_activations_target", mode="before")
    @classmethod
    def _yaml_off(cls, value):
        # YAML (config files and --set) reads a bare `off` as the boolean False.
        return "off" if value is False else value

    @field_validator("embedding_model")
    @classmethod
    def _encoder_directory(cls, value: str) -> str:
        if value != "minilm" and not (Path(value) / "config.json").is_file():
            raise ValueError(f"{value!r} is neither 'minilm' nor an encoder directory (no config.json)")
        return value

    @model_validator(mode="after")
    def _consistent(self):
        if self.matryoshka_weights is not None and len(self.matryoshka_weights) != len(self.matryoshka_divisors):
            raise ValueError("matryoshka_weights needs one weight per matryoshka_divisors entry")
        if self.matryoshka_weights is not None and (any(w < 0 for w in self.matryoshka_weights)
                                                    or sum(self.matryoshka_weights) <= 0):
            raise ValueError("matryoshka_weights must be non-negative with a positive sum")
        if any(not 0.0 <= s < 1.0 for s in self.sparsity_levels):
            raise ValueError("sparsity_levels must lie in [0, 1)")
        return self

    @property
    def uses_sparsity(self) -> bool:
        return self.sparsity > 0 or self.sparsity_target > 0


def _evaluations_left(config, metrics: dict) -> bool | None:
    """Whether another evaluation follows this one (None when the budget is only time)."""
    train = config.train
    step = metrics["step"]
    tokens_per_step = metrics["tokens"] / max(step, 1)
    budgets = [b for b in (train.max_steps, train.max_tokens and math.ceil(train.max_tokens / tokens_per_step)) if b]
    if not budgets:
        return None
    return step + train.eval_every <= min(budgets)


def _next_level(current: str, target: str) -> str:
    i, j = LEVEL_ORDER.index(current), LEVEL_ORDER.index(target)
    return LEVEL_ORDER[i + (1 if j > i else -1)]


def _follow(model, name: str, value) -> None:
    """Make the model match a knob's new value; the setting itself changes through the host (Adaptation)."""
    if name == "sparsity":
        from .sparse import apply_topk

        apply_topk(model, value)


class CompressionPlugin(Plugin):
    """The compression techniques for one variant, and the adaptation state of its training run."""

    Settings = CompressionSettings

    def __init__(self, settings: CompressionSettings | None = None, context=None):
        super().__init__(settings, context)
        self.best_val = math.inf
        self.pending: tuple[str, Any] | None = None
        """(setting, value before the change) awaiting the next evaluation's verdict."""
        self.frozen: set[str] = set()
        """Knobs reverted once: left alone for the rest of the run."""

    def state_dict(self) -> dict[str, Any]:
        return {"best_val": None if math.isinf(self.best_val) else self.best_val,
                "pending": list(self.pending) if self.pending is not None else None, "frozen": sorted(self.frozen)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best_val = math.inf if state.get("best_val") is None else float(state["best_val"])
        self.pending = tuple(state["pending"]) if state.get("pending") else None
        self.frozen = set(state.get("frozen") or ())

    @hookimpl
    def on_model_load(self, model, record):
        settings = self.settings
        if not settings.uses_sparsity:
            return
        from .sparse import apply_topk

        layers = apply_topk(model, settings.sparsity)
        record("sparse_activations", layers=len(layers), width=layers[0].width, k=layers[0].k,
               sparsity=settings.sparsity, target=settings.sparsity_target)

    @hookimpl
    def transform_forward(self, forward, model, record):
        from .matryoshka import matryoshka_loss, nested_weights, output_head
        from .saved_activations import compressed_saved_activations
        from .sparse import apply_topk, topk_layers

        settings = self.settings
        if settings.uses_sparsity and topk_layers(model):
            apply_topk(model, settings.sparsity)  # after a resume the restored setting is the current one
        head = output_head(model) if settings.matryoshka else None
        if head is not None:
            sizes, weights = nested_weights(head.in_features, settings.matryoshka_divisors,
                                            settings.matryoshka_weights)
            record("matryoshka", prefix_sizes=sizes, weights=weights, token_stride=settings.matryoshka_token_stride)
        record("saved_activations", level=settings.saved_activations, target=settings.saved_activations_target)

        def compressed_forward(input_ids, targets):
            # Settings are read per call (the host replaces them on an Adaptation): changes apply from the next step.
            with compressed_saved_activations(self.settings.saved_activations, model):
                out = forward(input_ids, targets)
                if head is None:
                    return out
                if out.hidden is None:
                    raise ValueError("the forward returned no hidden state for the Matryoshka loss")
                return out.with_loss(matryoshka_loss(out.hidden, head, targets, out.loss, sizes, weights,
                                                      self.settings.matryoshka_token_stride))

        return compressed_forward

    @hookimpl
    def on_epoch_end(self, epoch, metrics, model, config, record):
        """One change per evaluation, judged at the next: kept if validation loss stays within
        tolerance of the best so far, else reverted and that knob frozen for the rest of the run."""
        settings = self.settings
        val = float(metrics["val_loss"])
        limit = self.best_val * (1.0 + settings.val_loss_tolerance)
        if self.pending is not None:
            name, previous = self.pending
            self.pending = None
            if val > limit:
                _follow(model, name, previous)
                self.frozen.add(name)
                record("reverted", epoch=epoch, setting=name, tried=getattr(settings, name), back_to=previous,
                       val_loss=val, limit=limit, reason="validation loss above tolerance")
                return Adaptation({name: previous}, reason="validation loss above tolerance")
        self.best_val = min(self.best_val, val)
        if _evaluations_left(config, metrics) is False:
            return None  # a change now would never be validated
        name, value = self._next_change()
        if name is None:
            return None
        previous = getattr(settings, name)
        _follow(model, name, value)
        self.pending = (name, previous)
        record("adapting", epoch=epoch, setting=name, previous=previous, value=value, val_loss=val,
               best_val_loss=self.best_val, tolerance=settings.val_loss_tolerance)
        return Adaptation({name: value})

    def _next_change(self) -> tuple[str | None, Any]:
        """(setting, value) of the next step toward the targets: sparsity first, then the saved-activation level."""
        s = self.settings
        if "sparsity" not in self.frozen and s.sparsity < s.sparsity_target:
            return "sparsity", min(s.sparsity_target, round(s.sparsity + s.sparsity_step, 6))
        if "saved_activations" not in self.frozen and s.saved_activations != s.saved_activations_target:
            return "saved_activations", _next_level(s.saved_activations, s.saved_activations_target)
        return None, None

    # ------------------------------------------------------------------------- inference and the report

    @hookimpl
    def on_infer(self, generate, model, record):
        dims = self.settings.lm_head_dims
        if dims is None:
            return None
        from ryzen_core import lm_logits

        from .matryoshka import truncated_head

        record("truncated_head_decode", dims=dims)

        def generate_truncated(input_ids, max_new_tokens, **sampling):
            with truncated_head(model, dims):
                return generate(input_ids, max_new_tokens, **sampling)

        def truncated_logits(input_ids):  # perplexity measured on the head that generates
            with truncated_head(model, dims):
                return lm_logits(model.eval(), input_ids).float()

        return InferencePath(generate_truncated, logits=truncated_logits)

    @hookimpl
    def on_train_end(self, model, run_dir, config, record):
        from .sparse import save_sparsity

        save_sparsity(model, Path(run_dir))
        if not self.settings.evaluate:
            return None
        from .run_report import evaluate_run, live_baseline

        context = self.context
        report = evaluate_run(model, Path(run_dir), config, self.settings, record, context.data,
                              baseline=live_baseline(context.baseline), name=context.variant)
        return ReportSection(report.read_text(), files={"report": report,
                                                        "analysis": report.with_name("compression_analysis.json")})

    @hookimpl
    def register_commands(self, cli):
        from .cli import embed, embed_train, search

        for command in (embed, search, embed_train):
            cli.add_command(command)
