"""How one decode iteration runs the model for every active sequence, each with its own KV cache.

`SlotRunner` batches the built-in Transformer for real: every sequence owns a slot of a preallocated
KV buffer [max_batch, heads, context, head_dim] per layer; a decode step writes each sequence's new
key/value at its own position, attends over the slots up to the longest sequence with a padding
mask, and runs every matmul once for the whole batch. Prefill runs the model's own cached forward
on the prompts that join in the same iteration, right-padded into one batch, and copies each one's
cache into its slot.

`StepwiseRunner` is for any other model `model_outputs` drives (Hugging Face causal LMs): each
sequence keeps the model's own cache object and is stepped on its own within the iteration, so
sequences still join and leave at every step, but the matmuls are not batched.

`WholeRequestRunner` serves a `ryzen_core.Backend` (an export, or a generate function plugins' `on_infer`
made): its `generate` makes a whole request per call, so requests run one after another.
"""
from __future__ import annotations

import time

import torch
import torch.nn.functional as F

from ryzen_core import Transformer, model_outputs


class SlotRunner:
    """Batched decoding of the built-in Transformer over per-slot KV buffers of different lengths."""

    batched = True

    def __init__(self, model: Transformer, max_batch: int):
        self.model, self.config = model, model.config
        self.free = list(range(max_batch))
        self.lengths = [0] * max_batch
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []
        self.max_batch = max_batch

    def _allocate(self, like: torch.Tensor) -> None:
        c = self.config
        shape = (self.max_batch, c.n_heads, c.context_length, c.head_dim)
        self.keys = [torch.zeros(shape, dtype=like.dtype) for _ in range(c.n_layers)]
        self.values = [torch.zeros(shape, dtype=like.dtype) for _ in range(c.n_layers)]

    def prefill(self, seq, prompt: list[int]) -> torch.Tensor:
        """Logits [V] after the prompt; the sequence takes a free slot holding the prompt's cache."""
        return self.prefill_many([seq])[0]

    @torch.inference_mode()
    def prefill_many(self, seqs: list) -> torch.Tensor:
        """Logits [B, V] after each sequence's prompt, from one forward over the prompts right-padded to the
        longest (causal attention keeps the padding out of every real position); each sequence takes a free
        slot holding its prompt's cache, the padding's keys and values left out."""
        lengths = [len(seq.prompt) for seq in seqs]
        longest = max(lengths)
        ids = torch.tensor([seq.prompt + [seq.prompt[-1]] * (longest - len(seq.prompt)) for seq in seqs])
        logits, past = model_outputs(self.model, ids, None)
        if not self.keys:
            self._allocate(past[0][0])
        for row, (seq, length) in enumerate(zip(seqs, lengths)):
            seq.slot = self.free.pop()
            for layer, (k, v) in enumerate(past):
                self.keys[layer][seq.slot, :, :length] = k[row, :, :length]
                self.values[layer][seq.slot, :, :length] = v[row, :, :length]
            self.lengths[seq.slot] = length
        return logits[torch.arange(len(seqs)), torch.tensor(lengths) - 1]

    @torch.inference_mode()
    def step(self, seqs: list, tokens: list[int]) -> torch.Tensor:
        """Logits [B, V] after appending tokens[i] to seqs[i]: one batched forward of one position each."""
        model, d_model = self.model, self.config.d_model
        slots = torch.tensor([s.slot for s in seqs])
        positions = torch.tensor([self.lengths[s.slot] for s in seqs])
        span = int(positions.max()) + 1
        # Row i sees its own keys 0..positions[i]; the slots' padding beyond is masked out.
        mask = (torch.arange(span)[None, :] <= positions[:, None])[:, None, None, :]
        x = model.tok_emb(torch.tensor(tokens)[:, None]) + model.pos_emb(positions)[:, None, :]
        for layer, block in enumerate(model.blocks):
            attn = block.attn
            q, k, v = attn.qkv(block.norm_attn(x)).split(d_model, dim=2)
            q, k, v = (t.view(len(seqs), 1, attn.n_heads, attn.head_dim).transpose(1, 2) for t in (q, k, v))
            self.keys[layer][slots, :, positions] = k[:, :, 0]
            self.values[layer][slots, :, positions] = v[:, :, 0]
            y = F.scaled_dot_product_attention(q, self.keys[layer][slots, :, :span],
                                               self.values[layer][slots, :, :span], attn_mask=mask)
            x = x + attn.proj(y.transpose(1, 2).reshape(len(seqs), 1, d_model))
            x = x + block.mlp(block.norm_mlp(x))
        for s in seqs:
            self.lengths[s.slot] += 1
        return model.lm_head(model.norm_final(x))[:, 0]

    def release(self, seq) -> None:
        if getattr(seq, "slot", None) is not None:
            self.free.append(seq.slot)
            seq.slot = None


class StepwiseRunner:
    """Any model `model_outputs` drives: each sequence steps with its own cache inside the iteration."""

    batched = False

    def __init__(self, model: torch.nn.Module):
        self.model = model

    @torch.inference_mode()
    def prefill(self, seq, prompt: list[int]) -> torch.Tensor:
        logits, seq.past = model_outputs(self.model, torch.tensor([prompt]), None)
        return logits[0, -1]

    def prefill_many(self, seqs: list) -> torch.Tensor:
        return torch.stack([self.prefill(seq, seq.prompt) for seq in seqs])

    @torch.inference_mode()
    def step(self, seqs: list, tokens: list[int]) -> torch.Tensor:
        rows = []
        for seq, token in zip(seqs, tokens):
            logits, seq.past = model_outputs(self.model, torch.tensor([[token]]), seq.past)
            rows.append(logits[0, -1])
        return torch.stack(rows)

    def release(self, seq) -> None:
        seq.past = None


class Abandoned(Exception):
    """Raised inside a backend's generate (from its on_token) to stop a request nobody waits for."""


class WholeRequestRunner:
    """A backend whose `generate` makes one whole request per call: no batching, no joining mid-way."""

    batched = False
    whole_requests = True

    def __init__(self, backend, description: str):
        self.backend, self.name, self.description = backend, backend.name, description

    def generate(self, seq, eos_id: int | None) -> list[tuple[int, float]]:
        """The new tokens of `seq` with the time each was made; raises Abandoned once the sequence is
        cancelled or past its deadline (checked after every token)."""
        stamps = []

        def on_token(i: int) -> None:
            stamps.append(time.perf_counter())
            if seq.cancelled or stamps[-1] > seq.deadline:
                raise Abandoned("cancelled" if seq.cancelled else "timeout")

        s = seq.sampling
        with torch.inference_mode():
            out = self.backend.generate(torch.tensor([seq.prompt]), s.max_tokens, temperature=s.temperature,
                                        top_k=s.top_k, top_p=s.top_p, eos_token_id=eos_id, generator=seq.generator,
                                        on_token=on_token)
        new = out[0, len(seq.prompt):].tolist()
        end = time.perf_counter()
        return [(token, stamps[i] if i < len(stamps) else end) for i, token in enumerate(new)]

    def release(self, seq) -> None:
        pass


def runner_for(model: torch.nn.Module, max_batch: int):
    """The batched runner for the built-in Transformer, the stepwise one for anything else."""
    inner = getattr(model, "_orig_mod", model)
    return SlotRunner(inner, max_batch) if isinstance(inner, Transformer) else StepwiseRunner(model)
