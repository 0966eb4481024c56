"""Choosing one answer from several paths: majority vote (self-consistency) and best-of-N with a verifier.

Ties go to the answer that appeared first, which makes both rules deterministic and lets adaptive
sampling stop early with exactly the answer the full N paths would have given.
"""
from __future__ import annotations

from typing import Hashable, Sequence


def vote_counts(keys: Sequence[Hashable | None]) -> dict[Hashable, tuple[int, int]]:
    """{key: (count, first index)} over the parsed answers; None (unparsable) casts no vote."""
    counts: dict[Hashable, tuple[int, int]] = {}
    for i, key in enumerate(keys):
        if key is None:
            continue
        count, first = counts.get(key, (0, i))
        counts[key] = (count + 1, first)
    return counts


def majority_vote(keys: Sequence[Hashable | None]) -> tuple[Hashable | None, int]:
    """(winning key, its count); the earliest-seen key wins a tie; (None, 0) when nothing parsed."""
    counts = vote_counts(keys)
    if not counts:
        return None, 0
    key = min(counts, key=lambda k: (-counts[k][0], counts[k][1]))
    return key, counts[key][0]


def vote_decided(keys: Sequence[Hashable | None], remaining: int) -> bool:
    """True when `remaining` more votes cannot change the majority winner.

    A rival already seen needs leader - rival more votes to tie (and wins the tie only if it was seen
    first); an answer not yet seen needs leader votes and always loses a tie.
    """
    counts = vote_counts(keys)
    if not counts:
        return remaining == 0
    leader = min(counts, key=lambda k: (-counts[k][0], counts[k][1]))
    lead_count, lead_first = counts[leader]
    if remaining > lead_count:  # an answer not seen yet could still overtake
        return False
    for key, (count, first) in counts.items():
        needed = lead_count - count + (1 if first > lead_first else 0)
        if key != leader and remaining >= needed:
            return False
    return True


def best_of_n(rewards: Sequence[float]) -> int:
    """Index of the first path with the highest reward."""
    if not rewards:
        raise ValueError("best_of_n needs at least one reward")
    best = max(rewards)
    return next(i for i, r in enumerate(rewards) if r == best)
