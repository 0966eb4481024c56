"""Rolling a KV cache back to a shorter length after the target rejected drafted tokens.

Two layouts (`ryzen_core.model_outputs`): the built-in Transformer's list of (k, v) per layer, each
[B, heads, T, head_dim], which is sliced (views; the next forward concatenates onto them), and a
transformers Cache object, which is cropped in place.
"""
from __future__ import annotations

from typing import Any


def cache_length(cache: Any) -> int:
    if isinstance(cache, (list, tuple)):
        return cache[0][0].shape[2]
    return cache.get_seq_length()


def crop_cache(cache: Any, length: int) -> Any:
    """The cache holding only its first `length` positions."""
    if isinstance(cache, (list, tuple)):
        return [(k[:, :, :length], v[:, :, :length]) for k, v in cache]
    if hasattr(cache, "crop"):
        surplus = cache.get_seq_length() - length
        if surplus > 0:
            # A negative argument removes that many positions, in transformers 4 (where a positive one is
            # the length to keep) and 5 (where a positive one is refused) alike.
            cache.crop(-surplus)
        return cache
    raise TypeError(f"cannot roll back a KV cache of type {type(cache).__name__}")
