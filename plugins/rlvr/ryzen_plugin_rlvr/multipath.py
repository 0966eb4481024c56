"""Answering task problems with several sampled paths and a selection rule, and the `on_infer` wrapper.

Adaptive N samples in rounds and stops a prompt once its answer is decided: for majority vote, when
the paths still to come cannot change the winner (so the answer equals the full-N answer, with fewer
paths); for best-of-N, when a path reaches the task's maximum reward.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Hashable, Literal, Sequence

import torch

from .sampling import TaskCodec, bucket_by_length, generate_paths, path_seed
from .selection import best_of_n, majority_vote, vote_decided
from .tasks import Problem, Task

Selection = Literal["majority", "best_of_n"]


@dataclass(frozen=True)
class SolveConfig:
    paths: int = 8
    temperature: float = 0.4
    top_p: float = 1.0
    max_new_tokens: int | None = None
    """None: the task's own limit."""
    selection: Selection = "majority"
    adaptive: bool = False
    round_size: int = 4
    seed: int = 0
    max_batch_rows: int = 1024
    """Paths decoded together at most (memory bound: each row holds a KV cache)."""


@dataclass
class Solution:
    answer: Hashable | None
    completion: str
    """The chosen path's text."""
    chosen: int
    completions: list[str] = field(default_factory=list)
    answers: list[Hashable | None] = field(default_factory=list)
    rewards: list[float] | None = None
    """Verifier rewards of every path (best-of-N only)."""
    generated_tokens: int = 0

    @property
    def paths_used(self) -> int:
        return len(self.completions)


def _select(task: Task, problem: Problem, completions: list[str], answers: list, rewards: list[float] | None,
            selection: Selection) -> tuple[Hashable | None, int]:
    if selection == "best_of_n" and rewards is not None and max(rewards) > 0:
        i = best_of_n(rewards)
        return answers[i], i
    keys = [None if a is None else task.vote_key(a) for a in answers]
    winner, _ = majority_vote(keys)
    if winner is None:
        return None, 0
    i = keys.index(winner)
    return answers[i], i


def solve(model: torch.nn.Module, codec: TaskCodec, task: Task, problems: Sequence[Problem],
          config: SolveConfig) -> list[Solution]:
    """Answer every problem with up to `config.paths` paths; path k of problem i is seeded by (seed, i, k),
    so a smaller N sees exactly the first paths of a larger N."""
    if config.selection == "best_of_n" and not task.verifiable_at_inference:
        raise ValueError(f"task {task.name!r} cannot be verified at inference time; use majority selection")
    total = 1 if config.temperature == 0 else config.paths  # greedy paths are all the same path
    max_new = config.max_new_tokens or task.max_new_tokens
    prompts = [codec.prompt_ids(p.prompt) for p in problems]
    state = [Solution(None, "", 0, rewards=[] if config.selection == "best_of_n" else None) for _ in problems]
    active = list(range(len(problems)))
    done = 0
    while active and done < total:
        size = min(config.round_size if config.adaptive else total, total - done)
        for members in bucket_by_length([prompts[i] for i in active]).values():
            members = [active[m] for m in members]
            per_batch = max(1, config.max_batch_rows // size)
            for start in range(0, len(members), per_batch):
                chunk = members[start: start + per_batch]
                seeds = [[path_seed(config.seed, i, k) for k in range(done, done + size)] for i in chunk]
                paths = generate_paths(model, [prompts[i] for i in chunk], size, max_new, eos_id=codec.eos_id,
                                       temperature=config.temperature, top_p=config.top_p,
                                       seeds=seeds if config.temperature > 0 else None)
                for row, i in enumerate(chunk):
                    s = state[i]
                    for k in range(size):
                        j = row * size + k
                        text = codec.decode(paths.tokens[j].tolist())
                        s.completions.append(text)
                        s.answers.append(task.parse(text))
                        s.generated_tokens += int(paths.lengths[j])
                        if s.rewards is not None:
                            s.rewards.append(task.reward(problems[i], text))
        done += size
        remaining = total - done
        if config.adaptive:
            active = [i for i in active if not _decided(task, state[i], remaining, config.selection)]
    for i, s in enumerate(state):
        s.answer, s.chosen = _select(task, problems[i], s.completions, s.answers, s.rewards, config.selection)
        s.completion = s.completions[s.chosen]
    return state


def _decided(task: Task, s: Solution, remaining: int, selection: Selection) -> bool:
    if selection == "best_of_n":
        # Only a verified path settles best-of-N; until one appears the rest may still verify.
        return bool(s.rewards) and max(s.rewards) >= task.max_reward
    return vote_decided([None if a is None else task.vote_key(a) for a in s.answers], remaining)


def multipath_generate(inner: Any, model: torch.nn.Module, tokenizer: Any, task: Task, paths: int,
                       temperature: float, top_p: float, selection: Selection = "majority"):
    """A generate function (the signature of TorchBackend.plain_generate) that answers each row with
    `paths` sampled paths and returns the path the selection rule picks.

    The sampling settings are the plugin's: a caller's temperature/top_k are replaced, since one path
    per row is exactly what this wrapper exists to avoid. When `inner` is the plain torch loop the
    paths share one prefill and have per-path seeds; otherwise (another plugin changed generation)
    each row is repeated `paths` times through `inner`, so that plugin's generation still runs.
    """
    from ryzen_core import TorchBackend

    codec = TaskCodec(tokenizer)
    plain = getattr(inner, "__func__", None) is TorchBackend.plain_generate
    if selection == "best_of_n" and not task.verifiable_at_inference:
        raise ValueError(f"task {task.name!r} cannot be verified at inference time; use majority selection")

    def choose(prompt_ids: torch.Tensor, new_tokens: torch.Tensor) -> int:
        texts = [codec.decode(t.tolist()) for t in new_tokens]
        answers = [task.parse(t) for t in texts]
        if selection == "best_of_n":
            # Without the Problem object only the prompt is known; tasks verifiable at inference need no more.
            prompt = tokenizer.decode([t for t in prompt_ids.tolist() if t != codec.eos_id])
            problem = task.problem_from_prompt(prompt)
            if problem is not None:
                rewards = [task.reward(problem, t) for t in texts]
                if max(rewards) > 0:
                    return best_of_n(rewards)
        keys = [None if a is None else task.vote_key(a) for a in answers]
        winner, _ = majority_vote(keys)
        return 0 if winner is None else keys.index(winner)

    def generate(input_ids: torch.Tensor, max_new_tokens: int, *, eos_token_id: int | None = None,
                 generator: torch.Generator | None = None, on_token: Any = None, **caller_sampling) -> torch.Tensor:
        batch = input_ids.shape[0]
        if plain:
            base = int(torch.randint(0, 2**62, (1,), generator=generator))
            seeds = [[path_seed(base, row, k) for k in range(paths)] for row in range(batch)]
            result = generate_paths(model, input_ids.tolist(), paths, max_new_tokens, eos_id=eos_token_id,
                                    temperature=temperature, top_p=top_p, seeds=seeds, on_token=on_token)
            new_tokens = result.tokens
        else:
            repeated = input_ids.repeat_interleave(paths, dim=0)
            out = inner(repeated, max_new_tokens, temperature=temperature, top_p=top_p, eos_token_id=eos_token_id,
                        generator=generator, on_token=on_token)
            new_tokens = out[:, input_ids.shape[1]:]
        picked = []
        for row in range(batch):
            rows = new_tokens[row * paths: (row + 1) * paths]
            picked.append(rows[choose(input_ids[row], rows)])
        return torch.cat([input_ids, torch.stack(picked).to(input_ids.dtype)], dim=1)

    return generate
