"""Tests for ryzen_core.validator and HFGenerateBackend, on tiny models built here."""
import itertools
import json
import time

import numpy as np
import pytest
import torch

from ryzen_core.backends import HFGenerateBackend, TorchBackend
from ryzen_core.config import ValidateConfig
from ryzen_core.models import Transformer, TransformerConfig, generate_no_cache, hf_model_from_config, tiny_llama_config
from ryzen_core.validator import (
    PeakRssSampler,
    compare_pairs,
    greedy_agreement,
    paired_ratios,
    perplexity,
    plot_validation,
    summarize,
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


class CallRecorder:
    """Fake measurement: logs its name on every call and returns the next value of a cycle."""

    def __init__(self, name, log, values):
        self.name, self.log, self.values = name, log, itertools.cycle(values)

    def __call__(self):
        self.log.append(self.name)
        return next(self.values)


# ----------------------------------------------------------------------------- statistics


def test_summarize_known_list():
    s = summarize(range(1, 101))  # 1..100
    assert s["n"] == 100 and s["min"] == 1 and s["max"] == 100 and s["mean"] == 50.5
    assert s["p50"] == pytest.approx(50.5)
    assert s["p90"] == pytest.approx(90.1)  # linear interpolation: 1 + 0.9 * 99
    assert s["p99"] == pytest.approx(99.01)
    assert s["std"] == pytest.approx(np.std(np.arange(1, 101), ddof=1))
    assert summarize([3.0])["std"] == 0.0
    with pytest.raises(ValueError):
        summarize([])


def test_paired_ratios_interleaves_and_discards_warmup():
    log = []
    result = paired_ratios(CallRecorder("A", log, [1.0]), CallRecorder("B", log, [1.0]), warmup=2, repeats=3,
                           higher_is_better=True)
    assert log == ["A", "B"] * 5
    assert result.n == 3 and len(result.ratios) == 3


def test_paired_ratios_median_of_pairwise_ratios_and_orientation():
    log = []
    # Tokens/s: B twice as fast in every pair, while the machine drifts between pairs.
    drift = [100.0, 80.0, 120.0, 90.0, 110.0]
    faster = paired_ratios(CallRecorder("A", log, drift), CallRecorder("B", log, [2 * d for d in drift]),
                           warmup=0, repeats=5, higher_is_better=True)
    assert faster.median_ratio == pytest.approx(2.0) and faster.spread == pytest.approx(0.0)
    assert faster.verdict == "faster"
    assert faster.values_a == drift and faster.values_b == [2 * d for d in drift]
    # Seconds: lower is better, so B taking twice as long is a ratio of 0.5.
    slower = paired_ratios(CallRecorder("A", log, [1.0]), CallRecorder("B", log, [2.0]), warmup=1, repeats=4,
                           higher_is_better=False)
    assert slower.median_ratio == pytest.approx(0.5) and slower.verdict == "slower"
    # The median is of per-pair ratios, not a ratio of medians: pairs (1,3) (10,10) (100,50) -> 3, 1, 0.5.
    mixed = compare_pairs([1.0, 10.0, 100.0], [3.0, 10.0, 50.0], higher_is_better=True)
    assert mixed.median_ratio == pytest.approx(1.0) and mixed.min == pytest.approx(0.5) and mixed.max == 3.0
    assert mixed.p25 == pytest.approx(0.75) and mixed.p75 == pytest.approx(2.0) and mixed.spread == 1.25


def test_identical_noisy_measurements_are_no_measurable_difference():
    log = []
    noise = [10.0, 12.5, 9.0, 11.0, 10.2, 13.0, 8.8, 10.9]
    result = paired_ratios(CallRecorder("A", log, noise), CallRecorder("B", log, noise[3:] + noise[:3]),
                           warmup=1, repeats=8, higher_is_better=True)
    assert result.spread > 0
    assert result.verdict == "no measurable difference"
    # A small but consistent gain is measurable even though the raw values are noisy.
    consistent = compare_pairs(noise, [v * 1.05 for v in noise], higher_is_better=True)
    assert consistent.verdict == "faster" and consistent.median_ratio == pytest.approx(1.05)


# ----------------------------------------------------------------------------- timing


class SleepyBackend:
    """Wraps a backend and sleeps a known time before reporting each token."""

    def __init__(self, inner, prefill_s, step_s):
        self.inner, self.prefill_s, self.step_s, self.name = inner, prefill_s, step_s, "sleepy"

    def logits(self, input_ids):
        return self.inner.logits(input_ids)

    def generate(self, input_ids, max_new_tokens, *, on_token=None, **sampling):
        def slow_on_token(step):
            time.sleep(self.prefill_s if step == 0 else self.step_s)
            on_token(step)

        return self.inner.generate(input_ids, max_new_tokens, on_token=slow_on_token, **sampling)


def test_time_generation_separates_prefill_from_decode_and_counts_tokens():
    # Sleeps give lower bounds that hold on any machine; upper bounds use medians so that
    # one scheduling hiccup on a shared CI core cannot fail the test.
    backend = SleepyBackend(TorchBackend(tiny_model()), prefill_s=0.3, step_s=0.01)
    prompts = packed_rows(3)[:, :10]
    timing = time_generation(backend, prompts, new_tokens=6)
    assert timing.batch_size == 3 and timing.prompt_len == 10 and timing.new_tokens == 6
    assert tuple(timing.output_ids.shape) == (3, 16)
    assert timing.ttft_s >= 0.3
    assert len(timing.decode_step_s) == 5 and min(timing.decode_step_s) >= 0.01
    assert np.median(timing.decode_step_s) < 0.1  # the prefill sleep is not in the decode steps
    assert timing.decode_s == pytest.approx(sum(timing.decode_step_s))
    assert timing.decode_tokens_per_s == pytest.approx(3 * 5 / timing.decode_s)
    assert timing.decode_tokens_per_s <= 3 / 0.01
    assert timing.prefill_tokens_per_s == pytest.approx(3 * 10 / timing.ttft_s)
    assert timing.total_s >= timing.ttft_s + timing.decode_s


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
        time.sleep(0.05)
        del block  # freed before exit: only the polling thread can have seen it
    assert rss.growth_mb > 0.9 * size_mib
    assert rss.samples > 5

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
    cfg = ValidateConfig(prompt_len=8, new_tokens=6, batch_sizes=[1, 3], warmup=1, repeats=4, perplexity_batches=2)
    report = validate(backends, "torch", packed_rows(8), cfg, packed_rows(8, seed=1), perplexity_batch_size=4)

    json.dumps(report, allow_nan=False)  # becomes inference_validation_report.json
    assert report["baseline"] == "torch" and report["backends"] == ["torch", "torch-no-cache"]
    assert report["method"]["warmup"] == 1 and report["method"]["repeats"] == 4
    assert "p75 - p25" in report["method"]["spread"] and "> 1" in report["method"]["ratio"]
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
            assert r["greedy_agreement"]["tokens"] == batch["batch_size"] * cfg.new_tokens
        assert batch["backends"]["torch-no-cache"]["greedy_agreement"]["token_agreement"] == 1.0
        assert list(batch["comparisons"]) == ["torch-no-cache"]
        for metric in ("decode_tokens_per_s", "time_to_first_token"):
            cmp = batch["comparisons"]["torch-no-cache"][metric]
            assert cmp["n"] == cfg.repeats and len(cmp["ratios"]) == cfg.repeats
            assert cmp["p25"] <= cmp["median_ratio"] <= cmp["p75"] and cmp["spread"] == cmp["p75"] - cmp["p25"]
            assert cmp["verdict"] in ("faster", "slower", "no measurable difference")

    markdown = validation_markdown(report)
    for batch_size in (1, 3):
        assert f"### Batch size {batch_size}" in markdown
    assert sum(line.startswith("| torch |") for line in markdown.splitlines()) == 2
    assert sum(line.startswith("| torch-no-cache |") for line in markdown.splitlines()) == 2
    assert sum(line.startswith("| torch-no-cache vs torch |") for line in markdown.splitlines()) == 4

    plot_validation(report, tmp_path / "inference.png")
    assert (tmp_path / "inference.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_validate_rejects_unknown_baseline_and_short_prompt_source():
    cfg = ValidateConfig(prompt_len=8, new_tokens=4, batch_sizes=[4], warmup=0, repeats=1, perplexity_batches=1)
    backends = {"torch": TorchBackend(tiny_model())}
    with pytest.raises(ValueError, match="baseline"):
        validate(backends, "onnx", packed_rows(8), cfg, packed_rows(4))
    with pytest.raises(ValueError, match="rows"):
        validate(backends, "torch", packed_rows(2), cfg, packed_rows(4))
