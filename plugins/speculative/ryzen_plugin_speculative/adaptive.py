"""How many tokens to draft next, from how the last drafts fared and what drafting costs.

Costs are counted in one-token steps of the target (plain decoding's step). A verifying step costs
`verify_cost` (`min_tokens_per_forward`: the target's forward over the last token and the drafts) plus
`draft_cost` for each forward of the draft model that made its drafts (the draft model's one-token step
over the target's; 0 for prompt lookup, which runs no model). It yields the kept drafts plus one token
of the target's; plain decoding yields 1 per step, so a step pays when yield / cost >= 1.

The rule, cheap enough to run every step:
- length: +2 after a draft kept whole, -1 after one cut short (transformers' "heuristic" schedule for
  assistant tokens), within 1 .. max_draft; it starts at max_draft // 2 for free drafts, at 1 for a draft
  model's;
- pause: while the running average of yield / cost (exponentially weighted, half its weight on the last
  step) is below 1, drafting stops for `pause` steps. The pause starts at 4 steps and doubles each time
  drafting pauses again without a step that paid in between; a step that paid resets it. With prompt
  lookup (cost 0) that is the rule of tokens per verification forward against `min_tokens_per_forward`,
  and with its default of 2 a step pays exactly when a draft is kept;
- the longest pause is 64 times what a failed probe of one draft wastes (verify_cost - 1 + draft_cost
  steps), so probing a useless drafter costs about 1/64 of the time (64 steps for prompt lookup at the
  default; 107 for a draft model at 0.68 of the target's step). A draft model's probe also pays its
  catch-up forward over the tokens since the last one, which this does not count;
- a drafter that cannot pay even if every draft were kept ((max_draft + 1) / (verify_cost + max_draft x
  draft_cost) < 1; a draft model as slow as the target) never drafts.

Memory. One `DraftLength` may serve many generations (the plugin keeps one for its draft model, per
variant; prompt lookup's is made afresh for each generation): its length, running yield and pause carry
over from one generation to the next, so a draft model that did not pay stays paused into the next
generation instead of being tried afresh. A generation of 32 tokens holds only a few doublings of the
pause, and each fresh start pays its first probes again (README: with a useless draft model, 0.88-0.90x
of plain decoding in a fresh 32-token generation, 0.93-1.06x once the schedule has learnt). `pauses`
counts over its life; a caller wanting per-generation counts takes differences.
"""
from __future__ import annotations

FIRST_PAUSE, LONGEST_PAUSE_IN_PROBES = 4, 64
YIELD_WEIGHT = 0.5  # of the newest step in the running yield per cost


class DraftLength:
    def __init__(self, max_draft: int, adaptive: bool = True, min_tokens_per_forward: float = 2.0,
                 draft_cost: float = 0.0):
        if draft_cost < 0:
            raise ValueError(f"draft_cost must be >= 0, got {draft_cost}")
        self.max_draft, self.adaptive = max_draft, adaptive
        self.verify_cost, self.draft_cost = min_tokens_per_forward, draft_cost
        # A draft model starts at one draft, so that a first try of a useless one costs little; free drafts
        # at half the most. The running yield starts optimistic: as if half the most were drafted and kept.
        half = max(1, max_draft // 2)
        self.length = max_draft if not adaptive else 1 if draft_cost > 0 else half
        self.yield_per_cost = (half + 1) / self.step_cost(half)
        self.paused_for, self.pause = 0, FIRST_PAUSE
        self.longest_pause = max(FIRST_PAUSE, round(LONGEST_PAUSE_IN_PROBES * (self.step_cost(1) - 1)))
        self.pauses = 0  # times drafting paused, for the record
        self.hopeless = adaptive and (max_draft + 1) < self.step_cost(max_draft)

    def step_cost(self, draft_forwards: int) -> float:
        """A verifying step's cost in one-token target steps, its drafts made by `draft_forwards` forwards."""
        return self.verify_cost + draft_forwards * self.draft_cost

    def next(self) -> int:
        """Tokens to draft this step (0: decode plainly)."""
        if self.hopeless:
            return 0
        if self.paused_for > 0:
            self.paused_for -= 1
            return 0
        return self.length

    def update(self, drafted: int, kept: int, draft_forwards: int = 0) -> None:
        """After a verification of `drafted` tokens (> 0) of which the first `kept` were accepted, drafted
        with `draft_forwards` forwards of a draft model (0: prompt lookup drafted them)."""
        if not self.adaptive or drafted == 0:
            return
        self.length = min(self.max_draft, self.length + 2) if kept == drafted else max(1, self.length - 1)
        step_yield = (kept + 1) / self.step_cost(draft_forwards)
        self.yield_per_cost = (1 - YIELD_WEIGHT) * self.yield_per_cost + YIELD_WEIGHT * step_yield
        if step_yield >= 1:
            self.pause = FIRST_PAUSE
        if self.yield_per_cost < 1:
            self.paused_for, self.pauses = self.pause, self.pauses + 1
            self.pause = min(self.longest_pause, 2 * self.pause)
            self.yield_per_cost = 1.0  # the probe after the pause starts from break-even
