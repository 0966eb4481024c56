"""The plugin's hooks: on_infer hands back generation through the quantized cache with the generate
contract and records KV bytes per token; steps aside when told or when another model generates; settings
are validated; a run validates it against plain decoding."""
from __future__ import annotations

import json

import pytest
import torch

from ryzen_core import ConfigError, InferencePath
from ryzen_core.testing import RecordedEvents
from ryzen_plugin_kv_cache import KVCacheSettings, QuantizedKVCache, quantized_generate
from ryzen_plugin_kv_cache.plugin import KVCachePlugin


def plain(input_ids, max_new_tokens, **sampling):
    raise AssertionError("the quantized cache's generation must not call the plain loop")


@pytest.mark.parametrize("bits", [8, 4])
def test_on_infer_generates_through_the_quantized_cache_and_records_bytes(model, text_ids, bits):
    settings = KVCacheSettings(bits=bits, group_size=16, residual=16)
    plugin, record = KVCachePlugin(settings), RecordedEvents()
    quantized = plugin.on_infer(generate=plain, model=model, record=record)
    steps: list[int] = []
    prompt = text_ids[:, :100]
    out = quantized(prompt, 20, temperature=0.0, top_k=0, top_p=1.0, eos_token_id=None, generator=None,
                    on_token=steps.append)
    assert steps == list(range(20))
    assert torch.equal(out, quantized_generate(model, prompt, 20, QuantizedKVCache(bits, 16, 16)))
    assert record.named("kv_cache")[0]["bits"] == bits
    generation = record.named("generation")[0]
    assert generation["cached_tokens"] == 119  # the last token is sampled, never fed back
    assert generation["kv_bytes_per_token_fp32"] == 2 * generation["kv_bytes_per_token_bf16"]
    assert generation["kv_bytes_per_token"] < generation["kv_bytes_per_token_fp32"] / 2
    assert generation["window_dtype"] == "float16" and generation["window_tokens"] == (23 if bits == 4 else 16)
    assert record.named("kv_cache")[0]["key_grouping"] == ("token" if bits == 8 else "channel")
    assert quantized.precision == "fp32" and plugin.generations == 1
    json.dumps(record.events)  # what it records is JSON


def test_disabled_or_another_model_leaves_generation_alone(model):
    record = RecordedEvents()
    assert KVCachePlugin(KVCacheSettings(enabled=False)).on_infer(generate=plain, model=model, record=record) is None
    other_model = InferencePath(plain, logits=lambda ids: None)
    assert KVCachePlugin().on_infer(generate=other_model, model=model, record=record) is None
    assert len(record.named("kv_cache_off")) == 2


@pytest.mark.parametrize("setting", ["kvcache.bits=3", "kvcache.group_size=1", "kvcache.residual=-1",
                                     "kvcache.key_grouping=row"])
def test_bad_settings_are_config_errors(tiny_config, tiny_host, setting):
    config = tiny_config(setting, plugins=["kvcache"])
    with pytest.raises(ConfigError):
        tiny_host(config, kvcache=KVCachePlugin)


def test_a_run_validates_it_against_plain_decoding(tiny_config, tiny_host, tiny_run):
    # No residual and groups of 2: nearly every cached token is read back quantized, even in short prompts.
    config = tiny_config("validate.isolation=inline", "validate.new_tokens=12", "kvcache.residual=0",
                         "kvcache.group_size=2", plugins=["kvcache"])
    run_dir = tiny_run(tiny_host(config, kvcache=KVCachePlugin), config)
    report = json.loads((run_dir / "inference_validation_report.json").read_text())
    optimized = report["batches"][0]["backends"]["torch-optimized"]
    assert optimized["agreement_with_baseline"]["token_agreement"] > 0.9
    assert "kv_cache" in (run_dir / "report.md").read_text()
    analysis = (run_dir / "optimization_analysis.json").read_text()
    assert "kv_bytes_per_token_bf16" in analysis


def test_the_key_group_follows_the_models_context_unless_set():
    from ryzen_plugin_kv_cache.settings import KVCacheSettings

    assert KVCacheSettings().key_group_for(128) == 16 and KVCacheSettings().key_group_for(4096) == 128
    assert KVCacheSettings().key_group_for(8) == 2
    assert KVCacheSettings(group_size=32).key_group_for(128) == 32
    assert KVCacheSettings().key_grouping_for() == "token" and KVCacheSettings(bits=4).key_grouping_for() == "channel"
    assert KVCacheSettings(key_grouping="channel").key_grouping_for() == "channel"
