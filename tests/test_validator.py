"""Tests for ryzen_core.validator and HFGenerateBackend, on tiny models built here."""
import json
import time

import numpy as np
import pytest
import torch

from ryzen_core.backends import HFGenerateBackend, TorchBackend
from ryzen_core.config import ValidateConfig
from ryzen_core.models import Transformer, TransformerConfig, generate_no_cache, hf_model_from_config, tiny_llama_config
from ryzen_core import generation_timing, validator
from ryzen_core.measure import compare_pairs, conditions
from ryzen_core.validator import (
    PeakRssSampler,
    greedy_agreement,
    perplexity,
    plot_validation,
    time_generation,
    validate,
    validation_markdown,
)

VOCAB = 64


def tiny_model(seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(TransformerConfig.from_preset("tiny", vocab_size=VOCAB)).eval()


def packed_rows(n: int, seq_len: int = 24, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, VOCAB, (n, seq_len + 1), generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------- timing


class FakeClock:
    """Stands in for the validator's `time` module: time moves only when a backend says so."""

    def __init__(self):
        self.now = 100.0

    def perf_counter(self):
        return self.now


class ClockedBackend:
    """Wraps a backend and advances the fake clock by a known time before reporting each token."""

    def __init__(self, inner, clock, prefill_s, step_s):
        self.inner, self.clock, self.prefill_s, self.step_s, self.name = inner, clock, prefill_s, step_s, "clocked"

    def logits(self, input_ids):
        return self.inner.logits(input_ids)

    def generate(self, input_ids, max_new_tokens, *, on_token=None, **sampling):
        def timed_on_token(step):
            self.clock.now += self.prefill_s if step == 0 else self.step_s
            on_token(step)

        out = self.inner.generate(input_ids, max_new_tokens, on_token=timed_on_token, **sampling)
        self.clock.now += 0.002  # returning after the last token
        return out


def test_time_generation_separates_prefill_from_decode_and_counts_tokens(monkeypatch):
    clock = FakeClock()  # a fake clock, so the figures are exact on a machine of any speed or load
    monkeypatch.setattr(generation_timing, "time", clock)
    backend = ClockedBackend(TorchBackend(tiny_model()), clock, prefill_s=0.3, step_s=0.01)
    prompts = packed_rows(3)[:, :10]
    timing = time_generation(backend, prompts, new_tokens=6)
    assert timing.batch_size == 3 and timing.prompt_len == 10 and timing.new_tokens == 6
    assert tuple(timing.output_ids.shape) == (3, 16)
    assert timing.ttft_s == pytest.approx(0.3)  # prefill is all in the first token
    assert timing.decode_step_s == pytest.approx([0.01] * 5)  # and none of it in the decode steps
    assert timing.decode_s == pytest.approx(0.05) and timing.total_s == pytest.approx(0.352)
    assert timing.decode_tokens_per_s == pytest.approx(3 * 5 / 0.05)
    assert timing.prefill_tokens_per_s == pytest.approx(3 * 10 / 0.3)


def test_time_generation_rejects_a_backend_that_does_not_report_tokens():
    class Silent(TorchBackend):
        def generate(self, input_ids, max_new_tokens, *, on_token=None, **sampling):
            return super().generate(input_ids, max_new_tokens, **sampling)

    with pytest.raises(RuntimeError, match="on_token"):
        time_generation(Silent(tiny_model()), packed_rows(1)[:, :4], new_tokens=3)


# ----------------------------------------------------------------------------- memory


def test_peak_rss_sampler_sees_allocation_inside_the_block_only():
    size_mib = 200
    with PeakRssSampler() as rss:
        block = np.ones(size_mib * 1024 * 1024 // 8)  # every page written, so it is resident
        seen = rss.samples
        while rss.samples < seen + 2:  # however slow the machine, wait for the poller to look twice
            time.sleep(0.001)
        del block  # freed before exit: only the polling thread can have seen it
    assert rss.growth_mb > 0.9 * size_mib

    with PeakRssSampler() as quiet:
        time.sleep(0.02)
    outside = np.ones(size_mib * 1024 * 1024 // 8)
    assert quiet.growth_mb < 0.25 * size_mib
    assert quiet.peak_mb < quiet.baseline_mb + 0.25 * size_mib
    del outside


# ----------------------------------------------------------------------------- quality


class UniformBackend:
    name = "uniform"

    def logits(self, input_ids):
        return torch.zeros(*input_ids.shape, VOCAB)


def test_perplexity_of_uniform_logits_is_vocab_size():
    assert perplexity(UniformBackend(), packed_rows(10), batch_size=4, max_batches=3) == pytest.approx(VOCAB)


def test_perplexity_uses_only_the_first_batches():
    backend = TorchBackend(tiny_model())
    split = packed_rows(12)
    first_two = perplexity(backend, split, batch_size=3, max_batches=2)
    assert first_two == pytest.approx(perplexity(backend, split[:6], batch_size=6, max_batches=1), rel=1e-5)
    assert first_two != pytest.approx(perplexity(backend, split[6:], batch_size=6, max_batches=1), rel=1e-5)


def test_greedy_agreement_same_and_different_models():
    prompts = packed_rows(4)[:, :8]
    model = tiny_model(0)
    same = greedy_agreement(TorchBackend(model), TorchBackend(model, name="again"), prompts, new_tokens=10)
    assert same == {"token_agreement": 1.0, "sequence_agreement": 1.0, "tokens": 40, "sequences": 4}
    other = greedy_agreement(TorchBackend(model), TorchBackend(tiny_model(1)), prompts, new_tokens=10)
    assert other["token_agreement"] < 1.0 and other["sequence_agreement"] < 1.0


# ----------------------------------------------------------------------------- HF generate backend


@pytest.fixture(scope="module")
def tiny_llama():
    torch.manual_seed(0)
    return hf_model_from_config(tiny_llama_config(vocab_size=VOCAB)).eval()


def test_hf_generate_backend_matches_torch_backend(tiny_llama):
    prompts = packed_rows(2)[:, :8]
    torch_out = TorchBackend(tiny_llama).generate(prompts, 7, temperature=0.0)
    steps = []
    hf_out = HFGenerateBackend(tiny_llama).generate(prompts, 7, temperature=0.0, on_token=steps.append)
    assert torch.equal(hf_out, torch_out)
    assert steps == list(range(7))
    assert torch.allclose(HFGenerateBackend(tiny_llama).logits(prompts), TorchBackend(tiny_llama).logits(prompts))

    # An eos id shipped in the model's generation config must neither stop nor steer greedy decoding.
    shipped = tiny_llama.generation_config.eos_token_id
    tiny_llama.generation_config.eos_token_id = int(torch_out[0, 8])
    try:
        assert torch.equal(HFGenerateBackend(tiny_llama).generate(prompts, 7), torch_out)
    finally:
        tiny_llama.generation_config.eos_token_id = shipped
    assert tiny_llama.generation_config.eos_token_id == shipped


def test_hf_generate_backend_is_timed_like_any_backend(tiny_llama):
    timing = time_generation(HFGenerateBackend(tiny_llama), packed_rows(2)[:, :8], new_tokens=5)
    assert len(timing.decode_step_s) == 4 and timing.ttft_s > 0


# ----------------------------------------------------------------------------- validate


class OrderLog:
    """Wraps a backend and logs its name on every generate call."""

    def __init__(self, inner, name, log):
        self.inner, self.name, self.log = inner, name, log

    def logits(self, input_ids):
        return self.inner.logits(input_ids)

    def generate(self, input_ids, max_new_tokens, **sampling):
        self.log.append((self.name, input_ids.shape[0]))
        return self.inner.generate(input_ids, max_new_tokens, **sampling)


def test_validate_report_structure_markdown_and_plot(tmp_path):
    model = tiny_model()
    log = []
    no_cache = TorchBackend(model, name="torch-no-cache",
                            generate_fn=lambda ids, n, **kw: generate_no_cache(model, ids, n, **kw))
    backends = {"torch-no-cache": OrderLog(no_cache, "torch-no-cache", log),
                "torch": OrderLog(TorchBackend(model), "torch", log)}
    cfg = ValidateConfig(prompt_len=8, new_tokens=6, batch_sizes=[1, 3], warmup=1, repeats=4, max_repeats=4,
                         perplexity_batches=2)
    report = validate(backends, "torch", packed_rows(8), cfg, packed_rows(8, seed=1), perplexity_batch_size=4)

    json.dumps(report, allow_nan=False)  # becomes inference_validation_report.json
    assert report["baseline"] == "torch" and report["backends"] == ["torch", "torch-no-cache"]
    assert report["method"]["warmup"] == 1 and report["method"]["repeats"] == 4
    assert "95% percentile bootstrap" in report["method"]["interval"] and "> 1" in report["method"]["ratio"]
    assert "excludes 1" in report["method"]["verdict"]
    # Baseline first, then the candidate, alternating through warm-up and timed rounds, for each batch size.
    timed_calls = 2 * (cfg.warmup + cfg.repeats)
    per_batch = timed_calls + 2  # + one untimed memory run each
    assert log[:timed_calls] == [("torch", 1), ("torch-no-cache", 1)] * (cfg.warmup + cfg.repeats)
    assert log[per_batch:per_batch + timed_calls] == [("torch", 3), ("torch-no-cache", 3)] * (cfg.warmup + cfg.repeats)

    assert set(report["perplexity"]) == {"torch", "torch-no-cache"}
    assert report["perplexity"]["torch"] == pytest.approx(report["perplexity"]["torch-no-cache"])
    assert 1 < report["perplexity"]["torch"] < 10 * VOCAB
    assert [b["batch_size"] for b in report["batches"]] == [1, 3]
    for batch in report["batches"]:
        for name in ("torch", "torch-no-cache"):
            r = batch["backends"][name]
            for key in ("ttft_ms", "prefill_tokens_per_s", "decode_tokens_per_s", "decode_step_ms", "total_ms"):
                assert r[key]["n"] == (cfg.repeats * (cfg.new_tokens - 1) if key == "decode_step_ms" else cfg.repeats)
                assert r[key]["min"] <= r[key]["p50"] <= r[key]["max"]
            assert r["memory"]["peak_rss_mib"] >= r["memory"]["rss_at_start_mib"] > 0
            for figure in ("export_fidelity", "agreement_with_baseline"):
                assert r[figure]["reference"] == "torch"  # no fidelity reference given: the baseline
                assert r[figure]["tokens"] == batch["batch_size"] * cfg.new_tokens
                assert r[figure]["token_agreement"] == 1.0
        assert list(batch["comparisons"]) == ["torch-no-cache"]
        for metric in ("decode_tokens_per_s", "time_to_first_token"):
            cmp = batch["comparisons"]["torch-no-cache"][metric]
            assert cmp["n"] == cfg.repeats and len(cmp["ratios"]) == cfg.repeats
            assert cmp["ci_low"] <= cmp["median_ratio"] <= cmp["ci_high"] and cmp["ci_level"] == 0.95
            assert cmp["verdict"] in ("faster", "slower", "no measurable difference")
            if cmp["verdict"] != "no measurable difference":
                assert not cmp["ci_low"] <= 1.0 <= cmp["ci_high"]
        assert batch["rounds"]["rounds"] == cfg.repeats  # max_repeats = repeats: no rounds added
        assert batch["conditions"]["usable_cores"] >= 1 and isinstance(batch["conditions"]["busy"], bool)

    markdown = validation_markdown(report)
    for batch_size in (1, 3):
        assert f"### Batch size {batch_size}" in markdown
    assert sum(line.startswith("| torch |") for line in markdown.splitlines()) == 2
    assert sum(line.startswith("| torch-no-cache |") for line in markdown.splitlines()) == 2
    comparison_rows = [line for line in markdown.splitlines() if line.startswith("| torch-no-cache vs torch |")]
    assert len(comparison_rows) == 4
    first = report["batches"][0]["comparisons"]["torch-no-cache"]["decode_tokens_per_s"]
    assert f"{first['median_ratio']:.2f}x [{first['ci_low']:.2f}, {first['ci_high']:.2f}]" in comparison_rows[0]
    assert "spread" not in markdown and "excludes 1" in markdown

    plot_validation(report, tmp_path / "inference.png")
    assert (tmp_path / "inference.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_validation_markdown_warns_when_the_machine_was_busy():
    cmp = compare_pairs([10.0, 10.5, 9.5], [12.0, 12.4, 11.6], higher_is_better=True).to_dict()
    batch = {"batch_size": 1, "comparisons": {"b": {"decode_tokens_per_s": cmp}},
             "backends": {name: {"ttft_ms": {"p50": 1.0}, "decode_tokens_per_s": {"p50": 10.0},
                                 "memory": {"peak_rss_mib": 100.0},
                                 "export_fidelity": {"reference": name, "token_agreement": 1.0,
                                                     "sequence_agreement": 1.0},
                                 "agreement_with_baseline": {"token_agreement": 1.0, "sequence_agreement": 1.0}}
                          for name in ("a", "b")},
             "conditions": conditions([{"load_1m": 5.0, "usable_cores": 2}], [cmp])}
    report = {"baseline": "a", "backends": ["a", "b"], "perplexity": {"a": 2.0, "b": 2.0}, "batches": [batch],
              "method": {"repeats": 3, "warmup": 1}, "config": {"prompt_len": 4, "new_tokens": 4}}
    assert "busy" in validation_markdown(report) and "load average 5.00" in validation_markdown(report)
    batch["conditions"] = conditions([{"load_1m": 0.1, "usable_cores": 2}], [cmp])
    assert "busy" not in validation_markdown(report)


def test_validate_rejects_unknown_baseline_and_short_prompt_source():
    cfg = ValidateConfig(prompt_len=8, new_tokens=4, batch_sizes=[4], warmup=0, repeats=1, perplexity_batches=1)
    backends = {"torch": TorchBackend(tiny_model())}
    with pytest.raises(ValueError, match="baseline"):
        validate(backends, "onnx", packed_rows(8), cfg, packed_rows(4))
    with pytest.raises(ValueError, match="rows"):
        validate(backends, "torch", packed_rows(2), cfg, packed_rows(4))


def test_export_fidelity_is_measured_against_the_variants_own_model_and_agreement_against_the_baseline():
    # A variant trained differently (other weights) and an "export" of it that decodes exactly as it does
    # (the no-cache loop); its own torch fp32 model is an untimed reference.
    baseline, variant = tiny_model(0), tiny_model(1)
    export = TorchBackend(variant, name="export-of-variant",
                          generate_fn=lambda ids, n, **kw: generate_no_cache(variant, ids, n, **kw))
    cfg = ValidateConfig(prompt_len=8, new_tokens=6, batch_sizes=[2], warmup=0, repeats=2, max_repeats=2,
                         perplexity_batches=1, isolation="inline")
    report = validate({"torch": TorchBackend(baseline), "export-of-variant": export}, "torch", packed_rows(4), cfg,
                      packed_rows(4), fidelity_reference={"export-of-variant": "variant-fp32"},
                      reference_backends={"variant-fp32": TorchBackend(variant, name="variant-fp32")})

    result = report["batches"][0]["backends"]["export-of-variant"]
    assert result["export_fidelity"]["reference"] == "variant-fp32"
    assert result["export_fidelity"]["token_agreement"] == 1.0 and result["export_fidelity"]["sequence_agreement"] == 1.0
    assert result["agreement_with_baseline"]["reference"] == "torch"
    assert result["agreement_with_baseline"]["token_agreement"] < 1.0
    assert report["backends"] == ["torch", "export-of-variant"]  # the reference is not timed
    row = next(line for line in validation_markdown(report).splitlines() if line.startswith("| export-of-variant |"))
    assert "100.0% / 100.0% vs variant-fp32" in row
    header = next(line for line in validation_markdown(report).splitlines() if line.startswith("| backend |"))
    assert "export fidelity" in header and "agreement with baseline" in header


def test_process_peak_rss_is_the_kernels_high_water_mark_and_can_start_again():
    if not validator.reset_process_peak_rss():
        pytest.skip("this system cannot reset the peak resident set (/proc/self/clear_refs)")
    block = np.ones(150 * 1024 * 1024 // 8)  # every page written, so it is resident
    peak_with_block = validator.process_peak_rss_mib()
    del block
    assert peak_with_block >= validator.current_rss_mib() + 100  # freed, but the mark remembers it
    assert validator.reset_process_peak_rss()
    assert validator.process_peak_rss_mib() < peak_with_block - 100


def test_every_timed_run_waits_for_the_previous_backends_threads_to_settle(monkeypatch):
    """Spinning pools of the backend that ran last must not compete with the next one's run."""
    import ryzen_core.validator as validator_module

    pauses: list[float] = []
    monkeypatch.setattr(validator_module.time, "sleep", pauses.append)
    cfg = ValidateConfig(prompt_len=8, new_tokens=4, batch_sizes=[2], warmup=1, repeats=2, max_repeats=2,
                         perplexity_batches=1, isolation="inline", settle_ms=70)
    validate({"a": TorchBackend(tiny_model(0), name="a"), "b": TorchBackend(tiny_model(1), name="b")}, "a",
             packed_rows(4), cfg, packed_rows(4))
    assert pauses.count(0.07) == 2 * (1 + 2)  # two backends, one warm-up and two timed runs each
