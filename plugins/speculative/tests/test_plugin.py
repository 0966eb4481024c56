"""The plugin's hooks: on_infer hands back speculative generation with the generate contract, records its
acceptance figures, steps aside when told or when another model generates; settings are validated."""
from __future__ import annotations

import json

import pytest
import torch

from ryzen_core import ConfigError, InferencePath, generate
from ryzen_core.testing import RecordedEvents
from ryzen_plugin_speculative import SpeculativeSettings
from ryzen_plugin_speculative.plugin import SpeculativePlugin


def plain(input_ids, max_new_tokens, **sampling):
    raise AssertionError("speculative generation must not call the plain loop")


def test_on_infer_generates_what_plain_greedy_does_and_records_acceptance(model, prompt_suite):
    plugin, record = SpeculativePlugin(SpeculativeSettings(max_draft=6)), RecordedEvents()
    speculative = plugin.on_infer(generate=plain, model=model, tokenizer=None, record=record)
    steps: list[int] = []
    for prompt in prompt_suite[:3]:
        out = speculative(prompt, 20, temperature=0.0, top_k=0, top_p=1.0, eos_token_id=None, generator=None,
                          on_token=steps.append)
        assert torch.equal(out, generate(model, prompt, 20))
    assert steps == list(range(20)) * 3
    assert record.named("speculation")[0]["max_draft"] == 6
    calls = record.named("generation")
    assert len(calls) == 3 and calls[-1]["totals"]["tokens"] == 60
    assert {"acceptance_rate", "mean_accepted_length", "target_forwards_per_token"} <= set(calls[0])
    assert plugin.totals.tokens == 60 and plugin.totals.target_forwards < 60
    assert speculative.precision == "fp32"
    json.dumps(record.events)  # what it records is JSON


def test_disabled_or_another_model_leaves_generation_alone(model):
    record = RecordedEvents()
    assert SpeculativePlugin(SpeculativeSettings(enabled=False)).on_infer(generate=plain, model=model,
                                                                          tokenizer=None, record=record) is None
    other_model = InferencePath(plain, logits=lambda ids: None)
    assert SpeculativePlugin().on_infer(generate=other_model, model=model, tokenizer=None, record=record) is None
    assert len(record.named("speculation_off")) == 2


def test_bad_ngram_range_is_a_config_error(tiny_config, tiny_host):
    config = tiny_config("speculative.ngram_min=4", "speculative.ngram_max=2", plugins=["speculative"])
    with pytest.raises(ConfigError, match="ngram_min"):
        tiny_host(config, speculative=SpeculativePlugin)


def test_a_run_validates_it_against_plain_decoding(tiny_config, tiny_host, tiny_run):
    config = tiny_config("validate.isolation=inline", "validate.new_tokens=12", plugins=["speculative"])
    run_dir = tiny_run(tiny_host(config, speculative=SpeculativePlugin), config)
    report = json.loads((run_dir / "inference_validation_report.json").read_text())
    optimized = report["batches"][0]["backends"]["torch-optimized"]
    assert optimized["agreement_with_baseline"]["token_agreement"] == 1.0
    assert "speculation" in (run_dir / "report.md").read_text()
