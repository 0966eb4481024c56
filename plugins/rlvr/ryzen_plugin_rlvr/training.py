"""Training on a verifiable task through the core Trainer: the forward that `transform_forward` returns.

The forward feeds itself: each call draws fresh training problems from the task generator and
returns the loss of the current phase, ignoring the batch the trainer read from `data.source`
(add it back with `lm_weight` > 0). Everything else is the core trainer's: optimizer, schedule,
clipping, checkpoints, metrics and resume.

- SFT (supervised warm-up): cross-entropy on the reference completions of `sft_batch` problems.
- GRPO: `group_prompts` problems, `group_size` completions each sampled from the current policy in
  one batch, rewarded by the task's verifier; clipped policy gradient with group-normalized
  advantages and an optional KL penalty to the warm-up model.

Phase `sft+grpo` switches at `sft_fraction` of train.max_steps, counted by the optimizer's own step
counter so that a resumed run picks up in the right phase. Problems and sampling seeds come from
torch's global RNG, which the trainer checkpoints, so a resumed run sees the problems it would have;
the counters, group statistics and a batch still being reused go through `state()` / `load_state()`
into the plugin's state_dict, so a resumed run ends with the weights and figures of an uninterrupted one.
"""
from __future__ import annotations

import copy
import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from ryzen_core import ForwardOutput, latest_checkpoint, lm_logits, load_weights

from .grpo import completion_logprobs, completion_mask, group_advantages, grpo_loss, sft_batch, sft_loss
from .multipath import SolveConfig, solve
from .sampling import TaskCodec, bucket_by_length, generate_paths, path_seed
from .tasks import Problem, Task

log = logging.getLogger(__name__)
WARMUP_FILE = "rlvr_warmup.safetensors"
HELD_OUT_GUARD = 2000  # held-out problems per split kept out of training


def load_initial_weights(model: torch.nn.Module, path: Path, record: Callable[..., None]) -> None:
    """Weights from a checkpoint directory, a .safetensors file or a run directory (its latest checkpoint)."""
    path = Path(path)
    if path.is_dir() and not (path / "model.safetensors").is_file():
        found = latest_checkpoint(path)
        if found is None:
            raise FileNotFoundError(f"rlvr.init_from {path} holds no checkpoint")
        path = found
    load_weights(model, path)
    record("init_from", path=str(path))


def optimizer_steps(optimizer: torch.optim.Optimizer | None) -> int:
    """Updates the optimizer has applied (Adam keeps a per-parameter step count; it is checkpointed)."""
    if optimizer is None:
        return 0
    for state in optimizer.state.values():
        if "step" in state:
            return int(state["step"])
    return 0


@dataclass
class GroupStats:
    """What the GRPO steps since the last evaluation saw; on_epoch_end adapts from it."""

    groups: int = 0
    all_right: int = 0
    all_wrong: int = 0
    reward_sum: float = 0.0
    completions: int = 0
    clip_fraction_sum: float = 0.0
    kl_sum: float = 0.0
    steps: int = 0

    def as_dict(self) -> dict[str, float]:
        g, c, s = max(self.groups, 1), max(self.completions, 1), max(self.steps, 1)
        return {"groups": self.groups, "mean_reward": self.reward_sum / c, "all_right_fraction": self.all_right / g,
                "all_wrong_fraction": self.all_wrong / g,
                "mixed_fraction": (self.groups - self.all_right - self.all_wrong) / g,
                "clip_fraction": self.clip_fraction_sum / s, "kl": self.kl_sum / s}


@dataclass
class Compute:
    """Work done by the task forward, for the report (the trainer's token counts describe its own batches)."""

    sft_steps: int = 0
    sft_tokens: int = 0
    grpo_steps: int = 0
    sampled_completions: int = 0
    generated_tokens: int = 0
    policy_tokens: int = 0
    """Tokens run through forward + backward in GRPO updates (prompt + completion)."""

    def as_dict(self) -> dict[str, int]:
        return dict(self.__dict__)


class TaskTraining:
    """The task forward's state for one Trainer: the plugin instance of a variant holds one.

    `settings` is read through `current_settings` at every use, never kept: the host replaces the
    plugin's settings object on resume and when it applies an Adaptation."""

    def __init__(self, model: torch.nn.Module, tokenizer: Any, task: Task, current_settings: Callable[[], Any],
                 max_steps: int | None, warmup_path: Path, record: Callable[..., None]):
        self.model, self.task, self.current_settings, self.record = model, task, current_settings, record
        self.max_steps, self.warmup_path = max_steps, warmup_path
        self.codec = TaskCodec(tokenizer)
        self.optimizer: torch.optim.Optimizer | None = None
        self.reference: torch.nn.Module | None = None
        self.stats = GroupStats()
        self.compute = Compute()
        settings = self.settings
        guard = max(HELD_OUT_GUARD, settings.eval_problems, settings.monitor_problems)
        self.held_out = {p.prompt for split in ("validation", "test")
                         for p in task.problems(guard, seed=settings.eval_seed, split=split)}
        self.announced_phase: str | None = None
        self.sample: dict[str, Any] | None = None  # the sampled GRPO batch being reused (updates_per_batch > 1)

    @property
    def settings(self):
        return self.current_settings()

    # -- phases -----------------------------------------------------------------------------
    @property
    def sft_steps(self) -> int:
        phase = self.settings.phase
        if phase == "sft":
            return 1 << 62
        if phase == "grpo":
            return 0
        if self.max_steps is None:
            raise ValueError("rlvr phase 'sft+grpo' splits train.max_steps; set it (or use phase sft / grpo)")
        return round(self.settings.sft_fraction * self.max_steps)

    def phase(self) -> str:
        return "sft" if optimizer_steps(self.optimizer) < self.sft_steps else "grpo"

    def ensure_reference(self) -> None:
        """The frozen warm-up model: the KL reference, and the 'before GRPO' model of the report."""
        if self.reference is not None:
            return
        from safetensors.torch import load_model, save_model

        reference = copy.deepcopy(self.model).eval()
        for p in reference.parameters():
            p.requires_grad_(False)
        step, path, settings = optimizer_steps(self.optimizer), self.warmup_path, self.settings
        if step == self.sft_steps:  # GRPO starts now: the current weights are the warm-up model
            if settings.phase == "sft+grpo":
                path.parent.mkdir(parents=True, exist_ok=True)
                save_model(reference, str(path))
        elif settings.phase == "grpo" and settings.init_from is not None:
            load_initial_weights(reference, settings.init_from, self.record)
        elif settings.phase == "sft+grpo" and path.is_file():
            load_model(reference, str(path))  # resumed mid-GRPO: saved at the switch
            self.record("reference_loaded", path=str(path))
        else:
            self.record("reference_missing", reason="resumed inside GRPO without the warm-up weights; "
                        "the resumed weights serve as the reference")
        self.reference = reference

    # -- the forward --------------------------------------------------------------------------
    def wrap(self, inner: Callable) -> Callable:
        def forward(input_ids: torch.Tensor, targets: torch.Tensor) -> ForwardOutput:
            phase = self.phase()
            if phase != self.announced_phase:
                self.record("phase", phase=phase, step=optimizer_steps(self.optimizer))
                log.info("rlvr: %s phase from step %d", phase, optimizer_steps(self.optimizer))
                self.announced_phase = phase
            out = self.sft_step() if phase == "sft" else self.grpo_step()
            if self.settings.lm_weight > 0:
                out = out.with_loss(out.loss + self.settings.lm_weight * inner(input_ids, targets).loss)
            return out

        return forward

    def _draw(self) -> int:
        # Torch's global RNG is in the trainer's checkpoint, so draws repeat after a resume.
        return int(torch.randint(0, 2**62, (1,)))

    def training_problems(self, n: int) -> list[Problem]:
        problems = [p for p in self.task.problems(n + n // 4 + 4, seed=self._draw(), split="train")
                    if p.prompt not in self.held_out]
        return problems[:n]

    def sft_step(self) -> ForwardOutput:
        problems = self.training_problems(self.settings.sft_batch)
        prompts = [self.codec.prompt_ids(p.prompt) for p in problems]
        completions = [self.codec.completion_ids(p.solution) for p in problems]
        inputs, targets = sft_batch(prompts, completions, self.codec.eos_id)
        logits = lm_logits(self.model, inputs)
        if torch.is_grad_enabled():
            self.compute.sft_steps += 1
            self.compute.sft_tokens += int(inputs.numel())
        return ForwardOutput(sft_loss(logits, targets), logits)

    def _sample_groups(self) -> dict[str, Any]:
        s = self.settings
        problems = self.training_problems(s.group_prompts)
        prompts = [self.codec.prompt_ids(p.prompt) for p in problems]
        base = self._draw()
        batches = []
        for members in bucket_by_length(prompts).values():
            seeds = [[path_seed(base, i, k) for k in range(s.group_size)] for i in members]
            paths = generate_paths(self.model, [prompts[i] for i in members], s.group_size,
                                   s.max_new_tokens or self.task.max_new_tokens,
                                   eos_id=self.codec.eos_id, temperature=s.group_temperature, top_p=1.0, seeds=seeds)
            texts = [self.codec.decode(row.tolist()) for row in paths.tokens]
            rewards = torch.tensor([[self.task.reward(problems[i], texts[row * s.group_size + k])
                                     for k in range(s.group_size)] for row, i in enumerate(members)],
                                   dtype=torch.float32)
            prompt_ids = torch.tensor([prompts[i] for i in members]).repeat_interleave(s.group_size, dim=0)
            mask = completion_mask(paths.lengths, paths.tokens.shape[1])
            old_logp = None  # one update per batch: the sampling policy is the current one (ratio 1)
            if s.updates_per_batch > 1:
                with torch.no_grad():
                    old_logp = completion_logprobs(self.model, prompt_ids, paths.tokens)
            batches.append(dict(prompts=prompt_ids, completions=paths.tokens, mask=mask, rewards=rewards,
                                advantages=group_advantages(rewards).reshape(-1), old_logp=old_logp,
                                generated=paths.generated_tokens))
        return dict(batches=batches, uses=0)

    def grpo_step(self) -> ForwardOutput:
        s = self.settings
        self.ensure_reference()
        training = torch.is_grad_enabled()
        # A sampled batch is reused for `updates_per_batch` updates; the ratio to the sampling policy
        # (old_logp) then moves away from 1 and the clip bounds how far each update may go.
        fresh = self.sample is None or self.sample["uses"] >= s.updates_per_batch
        if fresh:
            self.sample = self._sample_groups()
        sample = self.sample
        if training:
            sample["uses"] += 1
        rows = sum(b["completions"].shape[0] for b in sample["batches"])
        total, logits_out, clip_sum, kl_sum = 0.0, None, 0.0, 0.0
        for b in sample["batches"]:
            logp = completion_logprobs(self.model, b["prompts"], b["completions"])
            ref_logp = None
            if s.kl_coef > 0:
                with torch.no_grad():
                    ref_logp = completion_logprobs(self.reference, b["prompts"], b["completions"])
            old_logp = b["old_logp"] if b["old_logp"] is not None else logp.detach()
            terms = grpo_loss(logp, old_logp, b["advantages"], b["mask"], s.clip, ref_logp, s.kl_coef)
            weight = b["completions"].shape[0] / rows
            total = total + terms.loss * weight
            clip_sum += terms.clip_fraction * weight
            kl_sum += terms.kl * weight
            logits_out = logp
        if training:
            self._account(sample, fresh, clip_sum, kl_sum)
        return ForwardOutput(total, logits_out)

    def _account(self, sample: dict[str, Any], fresh: bool, clip_fraction: float, kl: float) -> None:
        c, st = self.compute, self.stats
        c.grpo_steps += 1
        st.steps += 1
        st.clip_fraction_sum += clip_fraction
        st.kl_sum += kl
        for b in sample["batches"]:
            c.policy_tokens += int(b["prompts"].numel() + b["completions"].numel())
            if fresh:
                r = b["rewards"]
                c.sampled_completions += r.numel()
                c.generated_tokens += b["generated"]
                st.groups += r.shape[0]
                st.completions += r.numel()
                st.reward_sum += float(r.sum())
                st.all_right += int((r.min(dim=1).values >= self.task.max_reward).sum())
                st.all_wrong += int((r.max(dim=1).values <= 0).sum())

    # -- evaluation between steps -------------------------------------------------------------
    def greedy_accuracy(self, model: torch.nn.Module, n: int, split: str = "validation") -> float:
        problems = self.task.problems(n, seed=self.settings.eval_seed, split=split)
        solutions = solve(model, self.codec, self.task, problems, SolveConfig(paths=1, temperature=0.0))
        return sum(self.task.reward(p, s.completion) >= self.task.max_reward
                   for p, s in zip(problems, solutions)) / len(problems)

    def adapt(self, epoch: int, step: int, record: Callable[..., None]) -> tuple[dict[str, Any], str]:
        """Keep GRPO groups informative: a group whose completions all got the same reward teaches nothing.

        Mostly all-right groups: raise the sampling temperature (more diverse completions).
        Mostly all-wrong groups: double the group size (more chances that one completion is right).
        Mostly mixed groups: halve the group size, not below min_group_size (the signal is there
        with fewer completions; each step gets cheaper).

        Returns the setting changes and why; the caller hands them to the host, which applies them
        (and checkpoints them with the settings). The statistics start afresh for the next evaluation.
        """
        s, st = self.settings, self.stats.as_dict()
        changes: dict[str, Any] = {}
        reason = ""
        if self.stats.groups and s.adapt:
            if st["all_right_fraction"] > 0.5 and s.group_temperature < s.max_group_temperature - 1e-9:
                changes["group_temperature"] = round(min(s.max_group_temperature, s.group_temperature + 0.1), 3)
                reason = "most groups were all right: more diverse completions"
            elif st["all_wrong_fraction"] > 0.5 and s.group_size * 2 <= s.max_group_size:
                changes["group_size"] = s.group_size * 2
                reason = "most groups were all wrong: more chances of a right completion"
            elif st["mixed_fraction"] > 0.5 and s.group_size // 2 >= s.min_group_size:
                changes["group_size"] = s.group_size // 2
                reason = "most groups were mixed: the signal holds with fewer completions"
        if self.stats.groups:
            record("grpo_groups", epoch=epoch, step=step, **st)
        self.stats = GroupStats()
        return changes, reason

    # -- what a resume needs ------------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        """Counters, group statistics and the batch being reused, as JSON values."""
        sample = None
        if self.sample is not None:
            sample = {"uses": self.sample["uses"], "batches": [
                {k: _tensor_json(v) if isinstance(v, torch.Tensor) else v for k, v in b.items()}
                for b in self.sample["batches"]]}
        return {"stats": asdict(self.stats), "compute": self.compute.as_dict(), "announced_phase": self.announced_phase,
                "sample": sample}

    def load_state(self, state: dict[str, Any]) -> None:
        self.stats = GroupStats(**state["stats"])
        self.compute = Compute(**state["compute"])
        self.announced_phase = state["announced_phase"]
        sample = state["sample"]
        self.sample = None if sample is None else {"uses": sample["uses"], "batches": [
            {k: _tensor(v) if isinstance(v, dict) else v for k, v in b.items()} for b in sample["batches"]]}


def _tensor_json(t: torch.Tensor) -> dict[str, Any]:
    # float32 values are exact as Python floats, and JSON keeps every digit: the round trip is lossless.
    return {"dtype": str(t.dtype).removeprefix("torch."), "values": t.tolist()}


def _tensor(saved: dict[str, Any]) -> torch.Tensor:
    return torch.tensor(saved["values"], dtype=getattr(torch, saved["dtype"]))
