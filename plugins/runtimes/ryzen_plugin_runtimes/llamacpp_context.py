"""Several sequences decoded together in one llama.cpp context, through llama-cpp-python's
bindings of llama.cpp's C API, the way llama.cpp's own `batched` example does it.

llama-cpp-python's high-level `Llama` holds one sequence and copies every position's logits
into a numpy array as it goes; measured through it, llama.cpp pays Python work that its own
tools do not, and a batch of 8 runs as 8 sequences one after another. Here a decode step is
one `llama_decode` of one token per sequence (each with its own `seq_id` and position), and
the logits are read in place from llama.cpp's output buffer.
"""
from __future__ import annotations

import numpy as np

MIN_CAPACITY = 256  # positions per sequence a context is made for at least, so most requests reuse it


class LlamaCppSequences:
    """A llama.cpp context for `sequences` rows of up to `capacity` positions each, on a loaded model."""

    def __init__(self, model_pointer, n_vocab: int, sequences: int, capacity: int, threads: int):
        import llama_cpp as lc

        self.lc, self.n_vocab, self.sequences, self.capacity = lc, n_vocab, sequences, capacity
        params = lc.llama_context_default_params()
        params.n_ctx = capacity * sequences
        params.n_batch = params.n_ubatch = capacity * sequences  # a whole batch of prompts in one decode
        params.n_seq_max = sequences
        params.n_threads = params.n_threads_batch = threads
        params.no_perf = True
        self.context = lc.llama_init_from_model(model_pointer, params)
        if not self.context:
            raise RuntimeError(f"llama.cpp could not make a context for {sequences} x {capacity} positions")
        self.batch = lc.llama_batch_init(capacity * sequences, 0, 1)
        self.positions = 0

    def reset(self) -> None:
        """Forget every sequence (the KV cache is cleared, the buffers are kept)."""
        self.lc.llama_memory_clear(self.lc.llama_get_memory(self.context), True)
        self.positions = 0

    def step(self, feed: np.ndarray) -> np.ndarray:
        """Feed [sequences, T] new tokens at the next positions; the last position's logits [sequences, V]."""
        rows, new = feed.shape
        if rows != self.sequences:
            raise ValueError(f"this context holds {self.sequences} sequences, got a feed of {rows}")
        if self.positions + new > self.capacity:
            raise ValueError(f"{self.positions} + {new} positions exceed this context's {self.capacity}")
        batch, tokens = self.batch, feed.tolist()
        index = 0
        for row in range(rows):
            for offset, token in enumerate(tokens[row]):
                batch.token[index], batch.pos[index] = token, self.positions + offset
                batch.n_seq_id[index], batch.seq_id[index][0] = 1, row
                batch.logits[index] = offset == new - 1
                index += 1
        batch.n_tokens = index
        status = self.lc.llama_decode(self.context, batch)
        if status != 0:
            raise RuntimeError(f"llama_decode failed with status {status}")
        self.positions += new
        return np.stack([np.ctypeslib.as_array(self.lc.llama_get_logits_ith(self.context, (row + 1) * new - 1),
                                               shape=(self.n_vocab,)) for row in range(rows)])

    def close(self) -> None:
        if self.context:
            self.lc.llama_batch_free(self.batch)
            self.lc.llama_free(self.context)
            self.context = None

    def __del__(self) -> None:
        self.close()


def capacity_for(positions: int) -> int:
    """A context size that fits `positions`: powers of two from MIN_CAPACITY, so sizes repeat."""
    capacity = MIN_CAPACITY
    while capacity < positions:
        capacity *= 2
    return capacity
