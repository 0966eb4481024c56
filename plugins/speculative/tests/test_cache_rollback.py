"""After drafted tokens are rejected and the cache cropped, the next step sees exactly the kept sequence:
its logits equal a forward over the whole sequence without a cache."""
from __future__ import annotations

import pytest
import torch

from ryzen_core import lm_logits, model_outputs
from ryzen_plugin_speculative.kv_cache import cache_length, crop_cache


@pytest.mark.parametrize("kept", [0, 1, 3])
def test_next_step_after_a_rejection_matches_a_no_cache_forward(model, prompt_suite, kept):
    with torch.inference_mode():
        prompt = prompt_suite[2]
        _, cache = model_outputs(model, prompt[:, :-1])  # the cache holds all but the last token
        drafts = torch.tensor([[3, 1, 4, 1, 5]])
        _, cache = model_outputs(model, torch.cat([prompt[:, -1:], drafts], dim=1), cache)
        assert cache_length(cache) == prompt.shape[1] + drafts.shape[1]
        cache = crop_cache(cache, prompt.shape[1] + kept)  # drafts after the first `kept` rejected
        assert cache_length(cache) == prompt.shape[1] + kept
        corrected = torch.tensor([[7]])
        step_logits, cache = model_outputs(model, corrected, cache)
        sequence = torch.cat([prompt, drafts[:, :kept], corrected], dim=1)
        torch.testing.assert_close(step_logits[:, -1], lm_logits(model, sequence)[:, -1], rtol=1e-4, atol=1e-5)
        assert cache_length(cache) == sequence.shape[1]


def test_cropping_to_the_full_length_changes_nothing(model, prompt_suite):
    with torch.inference_mode():
        _, cache = model_outputs(model, prompt_suite[0])
        length = cache_length(cache)
        assert cache_length(crop_cache(cache, length)) == length


def test_unknown_cache_layout_is_refused():
    with pytest.raises(TypeError, match="cannot roll back"):
        crop_cache(object(), 3)
