"""`speculative.draft_run`: a `ryzen train` run directory checked before any work (exit-2 config errors for a
missing one, one with several models, a link out of it, drafter 'model' without it), its tokenizer checked
against the target's when it is loaded, and the plugin drafting with it, in a hook call and in a tiny
`ryzen run`."""
from __future__ import annotations

import json
import shutil

import pytest
import torch

from ryzen_core import ConfigError, generate, load_trained_model
from ryzen_core.testing import RecordedEvents, installed_host, make_config, make_host, train_run_tiny
from ryzen_plugin_speculative import SpeculativeSettings
from ryzen_plugin_speculative.draft_run import check_run_directory, load_draft_model
from ryzen_plugin_speculative.plugin import SpeculativePlugin


def plain(input_ids, max_new_tokens, **sampling):
    raise AssertionError("speculative generation must not call the plain loop")


@pytest.fixture(scope="module")
def draft_run(ryzen_cache_dir, tmp_path_factory):
    """A tiny `ryzen train` run, on the tokenizer every tiny config trains (the same data and vocab size)."""
    config = make_config(ryzen_cache_dir, out_dir=tmp_path_factory.mktemp("draft") / "run")
    return train_run_tiny(make_host({}, config), config)


def config_error(tiny_config, tiny_host, *overrides) -> str:
    config = tiny_config(*overrides, plugins=["speculative"])
    with pytest.raises(ConfigError) as caught:
        tiny_host(config, speculative=SpeculativePlugin)
    message = str(caught.value)
    assert "\n" not in message
    return message


def test_bad_draft_runs_are_config_errors(tiny_config, tiny_host, draft_run, tmp_path):
    assert "needs speculative.draft_run" in config_error(tiny_config, tiny_host, "speculative.drafter=model")
    assert "not a directory" in config_error(tiny_config, tiny_host, f"speculative.draft_run={tmp_path / 'none'}")
    assert "would not use it" in config_error(tiny_config, tiny_host, "speculative.drafter=lookup",
                                              f"speculative.draft_run={draft_run}")
    two = tmp_path / "two"  # a `ryzen run` layout: a model per variant
    for variant in ("baseline", "optimized"):
        shutil.copytree(draft_run, two / variant)
    assert "holds 2 models; name one" in config_error(tiny_config, tiny_host, f"speculative.draft_run={two}")
    assert check_run_directory(two / "baseline") == (two / "baseline").resolve()


def test_a_link_out_of_the_run_directory_is_refused(draft_run, tmp_path):
    linked = tmp_path / "linked"
    shutil.copytree(draft_run, linked)
    shutil.move(linked / "tokenizer", tmp_path / "elsewhere")
    (linked / "tokenizer").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(ValueError, match="leads outside"):
        check_run_directory(linked)
    (linked / "tokenizer").unlink()
    with pytest.raises(ValueError, match="has no tokenizer"):
        check_run_directory(linked)


@pytest.fixture(scope="module")
def other_tokenizer_run(draft_run, tmp_path_factory):
    """The draft run with two ids of its tokenizer swapped: the same tokens, another tokenizer."""
    other = tmp_path_factory.mktemp("other") / "run"
    shutil.copytree(draft_run, other)
    saved = json.loads((other / "tokenizer" / "tokenizer.json").read_text())
    vocab = saved["model"]["vocab"]
    first, second = list(vocab)[:2]
    vocab[first], vocab[second] = vocab[second], vocab[first]
    (other / "tokenizer" / "tokenizer.json").write_text(json.dumps(saved))
    return other


def test_another_tokenizer_is_refused_when_loading(draft_run, other_tokenizer_run):
    target, tokenizer, _ = load_trained_model(draft_run)
    other = other_tokenizer_run
    with pytest.raises(ConfigError, match="another tokenizer"):
        load_draft_model(other, target, tokenizer)
    with pytest.raises(ConfigError, match="tokenizer is unknown"):
        load_draft_model(draft_run, target, None)
    assert load_draft_model(draft_run, target, tokenizer) is not None


def test_on_infer_drafts_with_the_run_and_stays_plain_greedy(draft_run):
    target, tokenizer, _ = load_trained_model(draft_run)
    target = target.to(torch.bfloat16).float()  # not the draft's exact weights: some drafts are rejected
    # The draft is the target's size here, so its measured cost would switch drafting off; 0.1 fixes it.
    settings = SpeculativeSettings(drafter="model", draft_run=draft_run, max_draft=4, draft_cost=0.1)
    plugin, record = SpeculativePlugin(settings), RecordedEvents()
    speculative = plugin.on_infer(generate=plain, model=target, tokenizer=tokenizer, record=record)
    prompt = torch.tensor([tokenizer.encode("def main():\n    return self.")])
    out = speculative(prompt, 24, temperature=0.0, top_k=0, top_p=1.0, eos_token_id=None, generator=None,
                      on_token=None)
    assert torch.equal(out, generate(target, prompt, 24))
    started = record.named("speculation")[0]
    assert started["drafting"] == "draft_model" and started["draft_parameters"] > 0
    assert started["draft_step_cost"] == 0.1 and started["draft_cost_measured"] is False
    assert record.named("generation")[0]["draft_forwards"] > 0 and plugin.totals.accepted > 0


def test_the_draft_cost_is_measured_when_not_set_and_recorded(draft_run):
    target, tokenizer, _ = load_trained_model(draft_run)
    plugin, record = SpeculativePlugin(SpeculativeSettings(draft_run=draft_run)), RecordedEvents()
    speculative = plugin.on_infer(generate=plain, model=target, tokenizer=tokenizer, record=record)
    prompt = torch.tensor([tokenizer.encode("def main():\n    return self.")])
    assert torch.equal(speculative(prompt, 16), generate(target, prompt, 16))
    started = record.named("speculation")[0]
    assert started["draft_cost_measured"] is True and started["draft_step_cost"] > 0
    assert plugin.model_schedule.draft_cost == started["draft_step_cost"]


def test_a_run_validates_the_draft_model_against_plain_decoding(tiny_config, tiny_host, tiny_run, draft_run):
    config = tiny_config("validate.isolation=inline", "validate.new_tokens=12", f"speculative.draft_run={draft_run}",
                         "speculative.drafter=model", plugins=["speculative"])
    run_dir = tiny_run(tiny_host(config, speculative=SpeculativePlugin), config)
    report = json.loads((run_dir / "inference_validation_report.json").read_text())
    optimized = report["batches"][0]["backends"]["torch-optimized"]
    assert optimized["agreement_with_baseline"]["token_agreement"] == 1.0
    events = json.loads((run_dir / "optimization_analysis.json").read_text())["events"]
    assert any(e["event"] == "speculation" and e["data"]["drafting"] == "draft_model" for e in events)


def test_a_run_with_another_tokenizer_says_why_the_plugin_stepped_aside(tiny_config, tiny_host, tiny_run,
                                                                         other_tokenizer_run):
    config = tiny_config("validate.isolation=inline", f"speculative.draft_run={other_tokenizer_run}",
                         plugins=["speculative"])
    run_dir = tiny_run(tiny_host(config, speculative=SpeculativePlugin), config)
    assert "another tokenizer" in (run_dir / "report.md").read_text()


def test_under_process_isolation_the_report_still_says_why(tiny_config, tiny_run, other_tokenizer_run):
    """The installed plugin in a worker process: the worker is dropped (generation left plain), and
    the reason its plugin gave must still reach report.md."""
    config = tiny_config(f"speculative.draft_run={other_tokenizer_run}", plugins=["speculative"])
    run_dir = tiny_run(installed_host(config, "speculative"), config)
    assert "another tokenizer" in (run_dir / "report.md").read_text()
