"""What every engine backend shares: the request checks, the generation contract and the on_token stamps.

The contract is ryzen_core.generate's: the result is prompt plus new tokens; rows that
hit eos early are padded with eos and generation stops once every row has; with eos None
exactly `max_new_tokens` tokens are produced. `on_token(i)` runs right after token i exists
(0 = after prefill), which is where the validator takes its TTFT and decode timestamps.
"""
from __future__ import annotations

from typing import Callable

import numpy as np
import torch

from ryzen_core import OnToken, sample_next


def check_request(input_ids: torch.Tensor, max_new_tokens: int = 0, context_length: int | None = None) -> np.ndarray:
    """input_ids as an int64 [B, T] array, after the checks every backend makes."""
    if input_ids.dim() != 2 or input_ids.shape[1] == 0:
        raise ValueError(f"input_ids must be a non-empty [batch, seq] tensor, got shape {tuple(input_ids.shape)}")
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    total = input_ids.shape[1] + max_new_tokens
    if context_length is not None and total > context_length:
        raise ValueError(f"prompt length {input_ids.shape[1]} + max_new_tokens {max_new_tokens} = {total} "
                         f"exceeds the model's context_length {context_length}")
    return input_ids.detach().cpu().to(torch.int64).numpy()


def default_threads(threads: int | None) -> int:
    """Engines get torch's thread count unless told otherwise, so one setting pins every backend alike."""
    return threads or torch.get_num_threads()


class StepStamps:
    """Turns an engine's per-(step, row) token callbacks into one on_token(step) per step, in order."""

    def __init__(self, on_token: OnToken | None):
        self.on_token, self.next_step = on_token, 0

    def __call__(self, step: int) -> None:
        while self.next_step <= step:
            if self.on_token is not None:
                self.on_token(self.next_step)
            self.next_step += 1


def assemble(input_ids: torch.Tensor, new_rows: list[list[int]], eos_token_id: int | None) -> torch.Tensor:
    """Prompt plus each row's new tokens, rows that stopped early padded with eos to the longest row."""
    width = max((len(row) for row in new_rows), default=0)
    pad = eos_token_id if eos_token_id is not None else 0
    if eos_token_id is None and any(len(row) != width for row in new_rows):
        raise RuntimeError(f"engine returned rows of lengths {[len(r) for r in new_rows]} with eos disabled")
    new = torch.tensor([row + [pad] * (width - len(row)) for row in new_rows], dtype=input_ids.dtype)
    return torch.cat([input_ids.detach().cpu(), new.reshape(len(new_rows), width)], dim=1)


StepFn = Callable[[np.ndarray], np.ndarray]
"""Feeds [B, T] new token ids to an engine holding its own KV cache; returns the last position's logits [B, V]."""


def decode_loop(step: StepFn, input_ids: torch.Tensor, prompt: np.ndarray, max_new_tokens: int, *,
                temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, eos_token_id: int | None = None,
                generator: torch.Generator | None = None, on_token: OnToken | None = None) -> torch.Tensor:
    """Our sampling loop around an engine's forward, for engines without a generate of their own
    (sampling with the core's `sample_next`, so greedy picks match torch's for the same logits)."""
    sequence = input_ids.detach().cpu()
    finished = torch.zeros(prompt.shape[0], dtype=torch.bool)
    feed = prompt
    for index in range(max_new_tokens):
        logits = torch.from_numpy(np.ascontiguousarray(step(feed), dtype=np.float32))
        token = sample_next(logits, temperature, top_k, top_p, generator)
        if eos_token_id is not None:
            token = token.masked_fill(finished, eos_token_id)
            finished |= token == eos_token_id
        sequence = torch.cat([sequence, token.unsqueeze(1).to(sequence.dtype)], dim=1)
        feed = token.unsqueeze(1).to(torch.int64).numpy()
        if on_token is not None:
            on_token(index)
        if eos_token_id is not None and bool(finished.all()):
            break
    return sequence.to(input_ids.device)
