"""GRPO pieces: group-normalized advantages, the clipped loss, the KL term, and one step that makes a
rewarded completion more likely."""
from __future__ import annotations

import torch

from ryzen_plugin_rlvr.grpo import (IGNORE, completion_logprobs, completion_mask, group_advantages, grpo_loss,
                                    sft_batch)


def test_group_advantages_are_normalized_per_group_and_zero_without_contrast():
    rewards = torch.tensor([[1.0, 0.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0], [0.0, 0.0, 0.0, 0.0], [1.0, 0.0, 1.0, 0.0]])
    adv = group_advantages(rewards)
    assert adv[0, 0] > 0 and (adv[0, 1:] < 0).all()
    assert torch.allclose(adv[0].mean(), torch.tensor(0.0), atol=1e-6)
    assert torch.allclose(adv[0].std(unbiased=False), torch.tensor(1.0), atol=1e-4)
    assert (adv[1] == 0).all() and (adv[2] == 0).all()
    assert torch.allclose(adv[3], torch.tensor([1.0, -1.0, 1.0, -1.0]), atol=1e-4)


def test_sft_batch_targets_only_the_completion():
    inputs, targets = sft_batch([[9, 1, 2], [9, 3]], [[4, 5, 0], [6, 0]], pad_id=0)
    assert inputs.tolist() == [[9, 1, 2, 4, 5], [9, 3, 6, 0, 0]]
    assert targets.tolist() == [[IGNORE, IGNORE, 4, 5, 0], [IGNORE, 6, 0, IGNORE, IGNORE]]


def test_clipped_tokens_get_no_gradient_and_unclipped_ones_do():
    old = torch.zeros(1, 3)
    logp = torch.tensor([[0.5, 0.05, -0.5]], requires_grad=True)  # ratios e^0.5 (clipped), e^0.05, e^-0.5
    terms = grpo_loss(logp, old, torch.tensor([1.0]), torch.ones(1, 3), clip=0.2)
    terms.loss.backward()
    # Positive advantage: a ratio above 1 + clip stops pulling; below 1 - clip the min keeps the gradient.
    assert logp.grad[0, 0] == 0 and logp.grad[0, 1] < 0 and logp.grad[0, 2] < 0
    assert abs(terms.clip_fraction - 2 / 3) < 1e-6


def test_kl_penalty_is_zero_at_the_reference_and_positive_away_from_it():
    logp = torch.tensor([[-1.0, -2.0]])
    mask = torch.ones(1, 2)
    same = grpo_loss(logp, logp, torch.zeros(1), mask, ref_logp=logp.clone(), kl_coef=0.1)
    away = grpo_loss(logp, logp, torch.zeros(1), mask, ref_logp=logp - 0.5, kl_coef=0.1)
    assert same.kl == 0.0 and same.loss.item() == 0.0
    assert away.kl > 0 and away.loss.item() > 0


def test_masked_padding_does_not_count():
    logp = torch.tensor([[-1.0, -1.0, -50.0]], requires_grad=True)
    terms = grpo_loss(logp, logp.detach(), torch.tensor([1.0]), completion_mask(torch.tensor([2]), 3))
    terms.loss.backward()
    assert logp.grad[0, 2] == 0 and logp.grad[0, 0] != 0


def test_one_grpo_step_raises_the_log_probability_of_the_rewarded_completion(tiny_model):
    model = tiny_model.train()
    prompt = torch.tensor([[256, 20, 21, 22]]).repeat(4, 1)
    completions = torch.tensor([[30, 31, 256], [40, 41, 256], [50, 51, 256], [60, 61, 256]])
    rewards = torch.tensor([[0.0, 1.0, 0.0, 0.0]])  # only the second completion is right
    mask = torch.ones(4, 3)
    with torch.no_grad():
        before = (completion_logprobs(model, prompt, completions) * mask).sum(dim=1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    logp = completion_logprobs(model, prompt, completions)
    terms = grpo_loss(logp, logp.detach(), group_advantages(rewards).reshape(-1), mask)
    optimizer.zero_grad()
    terms.loss.backward()
    optimizer.step()
    with torch.no_grad():
        after = (completion_logprobs(model, prompt, completions) * mask).sum(dim=1)
    change = after - before
    assert change[1] > 0, f"rewarded completion should gain log-probability, changed by {change[1]:.4f}"
    assert (change[[0, 2, 3]] < 0).all()
    # A group where every completion is right carries no signal: the same step changes nothing.
    flat = grpo_loss(completion_logprobs(model, prompt, completions), after.new_zeros(4, 3),
                     group_advantages(torch.ones(1, 4)).reshape(-1), mask)
    assert flat.loss.item() == 0.0
