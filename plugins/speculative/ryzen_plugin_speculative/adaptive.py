"""How many tokens to draft next, from how the last drafts fared.

The rule, cheap enough to run every step:
- length: +2 after a draft kept whole, -1 after one cut short (transformers' "heuristic" schedule for
  assistant tokens), within 1 .. max_draft;
- pause: a verification forward yields the kept drafts plus one token of the target's. While the running
  average of that yield (exponentially weighted, half its weight on the last step) is below
  `min_tokens_per_forward` (what a verification forward costs in one-token steps), drafting stops for
  `pause` steps. The pause starts at 4 steps and doubles, up to 64, each time drafting pauses again
  without a draft kept in between; a kept draft resets it. So on text that does not repeat its input,
  drafting costs a probe now and then.
"""
from __future__ import annotations

FIRST_PAUSE, LONGEST_PAUSE = 4, 64
YIELD_WEIGHT = 0.5  # of the newest step in the running yield


class DraftLength:
    def __init__(self, max_draft: int, adaptive: bool = True, min_tokens_per_forward: float = 2.0):
        self.max_draft, self.adaptive, self.threshold = max_draft, adaptive, min_tokens_per_forward
        self.length = max(1, max_draft // 2) if adaptive else max_draft
        self.tokens_per_forward = float(self.length + 1)  # optimistic start: the first drafts are tried
        self.paused_for, self.pause = 0, FIRST_PAUSE
        self.pauses = 0  # times drafting paused, for the record

    def next(self) -> int:
        """Tokens to draft this step (0: decode plainly)."""
        if self.paused_for > 0:
            self.paused_for -= 1
            return 0
        return self.length

    def update(self, drafted: int, kept: int) -> None:
        """After a verification of `drafted` tokens (> 0) of which the first `kept` were accepted."""
        if not self.adaptive or drafted == 0:
            return
        self.length = min(self.max_draft, self.length + 2) if kept == drafted else max(1, self.length - 1)
        self.tokens_per_forward = (1 - YIELD_WEIGHT) * self.tokens_per_forward + YIELD_WEIGHT * (kept + 1)
        if kept > 0:
            self.pause = FIRST_PAUSE
        if self.tokens_per_forward < self.threshold:
            self.paused_for, self.pauses = self.pause, self.pauses + 1
            self.pause = min(LONGEST_PAUSE, 2 * self.pause)
            self.tokens_per_forward = self.threshold  # the probe after the pause starts from the threshold
