"""Inference backends: one interface for everything the validator measures.

A backend computes logits without a cache (for perplexity and parity) and generates
with a KV cache. The core provides the torch backend; plugins add others (the onnx
plugin's onnxruntime backends) by returning them from `on_export` under "backends".
"""
from __future__ import annotations

from typing import Callable, Protocol, runtime_checkable

import torch

from .models import generate as torch_generate
from .models import lm_logits

OnToken = Callable[[int], None]


@runtime_checkable
class Backend(Protocol):
    name: str

    def logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        """[B, T, V] float32 logits for every position, no cache."""

    def generate(self, input_ids: torch.Tensor, max_new_tokens: int, *, temperature: float = 0.0, top_k: int = 0,
                 top_p: float = 1.0, eos_token_id: int | None = None, generator: torch.Generator | None = None,
                 on_token: OnToken | None = None) -> torch.Tensor:
        """Prompt plus new tokens; `on_token(i)` is called right after token i is produced (0 = after prefill)."""


GenerateFn = Callable[..., torch.Tensor]


class TorchBackend:
    """A torch model; `generate_fn` replaces the plain KV-cache loop (the result of the `on_infer` fold).

    A generate function that runs another model (a quantized copy, say) carries that model's
    `logits(input_ids)` (an InferencePath's `logits`), so perplexity is measured on what actually generates.
    """

    def __init__(self, model: torch.nn.Module, name: str = "torch", generate_fn: GenerateFn | None = None):
        self.model, self.name = model, name
        self.wraps_generation = generate_fn is not None
        # A wrapped generate function runs what its plugin made; it says its own facts, if any.
        facts = model_facts(model) if generate_fn is None else backend_facts(generate_fn)
        self.precision, self.weight_bytes, self.kv_bytes_per_position = (facts[f] for f in FACTS)
        self._generate = generate_fn or self.plain_generate
        self._logits = getattr(generate_fn, "logits", None)

    def plain_generate(self, input_ids, max_new_tokens, **sampling):
        return torch_generate(self.model, input_ids, max_new_tokens, **sampling)

    @torch.inference_mode()
    def logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self._logits is not None:
            return self._logits(input_ids)
        self.model.eval()
        return lm_logits(self.model, input_ids).float()

    def generate(self, input_ids, max_new_tokens, **sampling):
        return self._generate(input_ids, max_new_tokens, **sampling)


FACTS = ("precision", "weight_bytes", "kv_bytes_per_position")
"""What a backend may say of itself for the runtime table (docs/plugins.md): the precision of its
weights ('fp32', 'int8', 'q4_0', ...), the bytes of weights one decode step reads, and the KV-cache
bytes one position adds. Each is optional."""


def backend_facts(backend) -> dict:
    """FACTS from the backend's attributes (or properties); None where it does not say."""
    return {fact: getattr(backend, fact, None) for fact in FACTS}


def model_facts(model: torch.nn.Module) -> dict:
    """FACTS of a plain torch model: every weight once (a tied head counts as the head), except lookup
    tables, which a decode step reads one row of."""
    from .models import is_hf_model

    inner = getattr(model, "_orig_mod", model)
    parameters = {id(p): p for p in inner.parameters()}
    read_by_matmul = {id(m.weight) for m in inner.modules() if isinstance(m, torch.nn.Linear)}
    lookup_only = {id(m.weight) for m in inner.modules() if isinstance(m, torch.nn.Embedding)} - read_by_matmul
    dtypes = {p.dtype for key, p in parameters.items() if key in read_by_matmul}
    config = inner.config.get_text_config(decoder=True) if is_hf_model(inner) else getattr(inner, "config", None)
    kv = None
    if config is not None and hasattr(config, "n_layers"):
        kv = 2 * config.n_layers * config.d_model * 4
    elif config is not None and hasattr(config, "num_hidden_layers"):
        heads = config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        kv = 2 * config.num_hidden_layers * (getattr(config, "num_key_value_heads", None) or heads) * head_dim * 4
    return {"precision": {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtypes.pop())
            if len(dtypes) == 1 else None,
            "weight_bytes": sum(p.numel() * p.element_size() for k, p in parameters.items() if k not in lookup_only),
            "kv_bytes_per_position": kv}


def torch_backend(model: torch.nn.Module, name: str, host=None, plugins=(), tokenizer=None,
                  config=None) -> TorchBackend:
    """A variant's torch backend: the plain KV-cache loop, or what its plugins' `on_infer` fold made of it."""
    backend = TorchBackend(model, name)
    if host is None or not plugins:
        return backend
    plain = backend.plain_generate
    generate_fn = host.fold("on_infer", host.active(plugins), "generate", plain, model=model, tokenizer=tokenizer,
                            config=config, context=host.contexts.get(host.variant))
    return backend if generate_fn is plain else TorchBackend(model, name, generate_fn)


class HFGenerateBackend:
    """A Hugging Face causal LM driven by its own `model.generate()`: what a user would run without Ryzen.

    Greedy unless a temperature is given. Every step is timestamped by a `StoppingCriteria`
    that transformers calls right after it appends each new token (the optimum-benchmark way),
    so `on_token` means the same here as in the torch loop. transformers is imported on first use.
    """

    def __init__(self, model: torch.nn.Module, name: str = "hf-generate"):
        self.model, self.name = model, name
        self.precision, self.weight_bytes, self.kv_bytes_per_position = (model_facts(model)[f] for f in FACTS)

    @torch.inference_mode()
    def logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        self.model.eval()
        return lm_logits(self.model, input_ids).float()

    def generate(self, input_ids: torch.Tensor, max_new_tokens: int, *, temperature: float = 0.0, top_k: int = 0,
                 top_p: float = 1.0, eos_token_id: int | None = None, generator: torch.Generator | None = None,
                 on_token: OnToken | None = None) -> torch.Tensor:
        from transformers import GenerationConfig, StoppingCriteriaList

        sampling = temperature > 0.0
        settings = dict(max_new_tokens=max_new_tokens, do_sample=sampling, use_cache=True, num_beams=1,
                        eos_token_id=eos_token_id, bos_token_id=None,
                        # Padding only fills rows that finished at eos; with no eos nothing is ever padded.
                        pad_token_id=eos_token_id if eos_token_id is not None else 0)
        if eos_token_id is None:
            settings["min_new_tokens"] = max_new_tokens  # never stop early: every run does the same work
        if sampling:
            settings.update(temperature=temperature, top_k=top_k, top_p=top_p)
        criteria = StoppingCriteriaList([_token_stamp_criteria(on_token, input_ids.shape[1])] if on_token else [])
        was_training = self.model.training
        # generate() fills every field left unset from model.generation_config (a shipped eos id,
        # repetition_penalty, ...); a blank one for the call keeps decoding exactly what was asked.
        shipped_config = self.model.generation_config
        self.model.generation_config = GenerationConfig()
        self.model.eval()
        try:
            with torch.random.fork_rng(enabled=sampling and generator is not None):
                if sampling and generator is not None:
                    # transformers samples from the global RNG; seed it from `generator` so runs repeat.
                    torch.manual_seed(int(torch.randint(0, 2**62, (1,), generator=generator)))
                return self.model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                                           generation_config=GenerationConfig(**settings), stopping_criteria=criteria)
        finally:
            self.model.generation_config = shipped_config
            self.model.train(was_training)


def _token_stamp_criteria(on_token: OnToken, prompt_len: int):
    """A transformers StoppingCriteria that reports each new token to `on_token` and never stops generation."""
    from transformers import StoppingCriteria

    class TokenStamp(StoppingCriteria):
        def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs) -> torch.Tensor:
            on_token(input_ids.shape[1] - prompt_len - 1)
            return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)

    return TokenStamp()
