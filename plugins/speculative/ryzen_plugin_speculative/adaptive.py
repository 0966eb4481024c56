"""How many tokens to draft next, from how the last drafts fared.

The rule, cheap enough to run every step:
- length: +2 after a draft kept whole, -1 after one cut short (transformers' "heuristic" schedule for
  assistant tokens), within 1 .. max_draft;
- pause: a running acceptance rate (drafted tokens kept, exponentially weighted with half its weight on
  the last step) below `min_acceptance` stops drafting for `pause` steps. The pause starts at 4 steps
  and doubles, up to 64, each time drafting pauses again without a kept draft in between; a kept draft
  resets it. A verification step that keeps nothing costs a wider forward for the same one token, so on
  text that does not repeat its input the cost is a probe now and then.
"""
from __future__ import annotations

FIRST_PAUSE, LONGEST_PAUSE = 4, 64
RATE_WEIGHT = 0.5  # of the newest step in the running acceptance rate


class DraftLength:
    def __init__(self, max_draft: int, adaptive: bool = True, min_acceptance: float = 0.2):
        self.max_draft, self.adaptive, self.min_acceptance = max_draft, adaptive, min_acceptance
        self.length = max(1, max_draft // 2) if adaptive else max_draft
        self.rate = 1.0  # optimistic start: the first drafts are tried
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
        self.rate = (1 - RATE_WEIGHT) * self.rate + RATE_WEIGHT * kept / drafted
        if kept > 0:
            self.pause = FIRST_PAUSE
        if self.rate < self.min_acceptance:
            self.paused_for, self.pauses = self.pause, self.pauses + 1
            self.pause = min(LONGEST_PAUSE, 2 * self.pause)
            self.rate = self.min_acceptance  # the probe after the pause starts from the threshold
