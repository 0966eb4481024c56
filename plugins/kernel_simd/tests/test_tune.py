"""The tuning plan, the trials (soundness and failures) and the decision cache."""
import json

import torch

from ryzen_core import ForwardOutput, compare_pairs, cpu_features
from ryzen_plugin_kernel_simd import decision, tune
from ryzen_plugin_kernel_simd.decision import decide
from ryzen_plugin_kernel_simd.plugin import KernelSettings
from ryzen_plugin_kernel_simd.report import decision_markdown
from ryzen_plugin_kernel_simd.strategy import REFERENCE, Strategy
from ryzen_plugin_kernel_simd.tune import Tuner, plan

FAST = dict(tune_rounds=2, tune_steps=1, compile="eager")


def test_plan_tries_bf16_only_on_native_hardware(make_cpu, config):
    start, trials, not_tried = plan(KernelSettings(), make_cpu(native_bf16=True), config.train)
    assert [k for k, _ in trials] == ["precision", "attention", "optimizer", "compile"]
    assert start == REFERENCE.with_knob("threads", 2)

    start, trials, not_tried = plan(KernelSettings(), make_cpu(native_bf16=False), config.train)
    assert "precision" not in dict(trials) and start.precision == "fp32"
    assert "no native bf16" in not_tried["precision"]


def test_plan_applies_fixed_choices_and_tries_one_thread_per_physical_core(make_cpu, config):
    train = config.train.model_copy(update={"precision": "bf16"})
    start, trials, not_tried = plan(KernelSettings(compile="eager"), make_cpu(usable=4, physical=2), train)
    assert start.precision == "bf16" and start.compile == "eager" and start.threads == 4
    assert dict(trials) == {"attention": "math", "optimizer": "fused", "threads": 2}
    assert not_tried["precision"] == "bf16 set in train.precision" and not_tried["compile"] == "eager set in kernel.compile"


def test_precision_and_threads_are_read_from_the_train_section(make_cpu, config):
    """One owner: a fixed train.precision or train.threads is never tuned, whatever the CPU has."""
    train = config.train.model_copy(update={"precision": "fp32", "threads": 3})
    start, trials, not_tried = plan(KernelSettings(), make_cpu(native_bf16=True, usable=4, physical=2), train)
    assert start.precision == "fp32" and start.threads == 3
    assert "precision" not in dict(trials) and "threads" not in dict(trials)
    assert not_tried["precision"] == "fp32 set in train.precision" and not_tried["threads"] == "3 set in train.threads"


def test_masking_bf16_picks_fp32_and_says_why(tiny_model, config, make_cpu):
    masked = cpu_features(mask=["avx512_bf16", "amx_bf16"])
    decision, source = decide(tiny_model, config, KernelSettings(autotune=False, mask_features=["avx512_bf16", "amx_bf16"]),
                              masked)
    assert decision["chosen"]["precision"] == "fp32" and source == "settings"
    assert "no native bf16" in decision["not_tried"]["precision"]
    decision, _ = decide(tiny_model, config, KernelSettings(autotune=False), make_cpu(native_bf16=True))
    assert decision["chosen"]["precision"] == "bf16"
    config.train.precision = "fp32"  # fixed: not even `autotune: false` turns bf16 on
    decision, _ = decide(tiny_model, config, KernelSettings(autotune=False), make_cpu(native_bf16=True))
    assert decision["chosen"]["precision"] == "fp32"


def run_tuner(model, config, settings, trials, start=None):
    start = start or REFERENCE.with_knob("threads", torch.get_num_threads())
    return Tuner(model, config.train, config.train.batch_size, config.data.seq_len, settings).run(start, trials)


def test_trials_record_speed_and_soundness_and_the_choice_is_sound(tiny_model, config):
    before = [p.detach().clone() for p in tiny_model.parameters()]
    result = run_tuner(tiny_model, config, KernelSettings(**FAST), [("precision", "bf16"), ("optimizer", "fused")])
    assert [t["knob"] for t in result["trials"]] == ["precision", "optimizer"]
    for t in result["trials"]:
        assert t["error"] is None and t["sound"]
        assert 2 <= t["speedup"]["n"] <= 4 and t["tokens_per_s_candidate"] > 0  # tune_rounds, up to twice as many
        assert t["loss_relative_difference"] <= 0.02
        assert t["accepted"] == (t["speedup"]["verdict"] == "faster")  # the interval lies above 1
    chosen = Strategy(**result["chosen"])
    if (result["confirmation"] or {}).get("fell_back"):  # the timing is real: on a busy machine the final check may say slower
        assert result["chosen"] == result["start"]
    else:
        for t in result["trials"]:
            assert (getattr(chosen, t["knob"]) == t["value"]) == t["accepted"]
    losses = result["reference_loss"]
    trained = [loss for key, loss in losses.items() if key != "after_0_steps"]  # a warm-up and the timed rounds
    assert trained and all(loss < losses["after_0_steps"] for loss in trained)
    assert all(torch.equal(a, b) for a, b in zip(before, tiny_model.parameters()))  # tuning works on copies
    assert result["conditions"]["usable_cores"] >= 1 and isinstance(result["conditions"]["busy"], bool)
    assert "machine was busy" in decision_markdown(dict(result, conditions=dict(
        result["conditions"], busy=True, reasons=["load average 9.00 above the 2 usable cores"])), "measured")


def test_an_unsound_candidate_is_not_kept_however_fast(tiny_model, config, monkeypatch):
    real_wrap = tune.wrap_forward

    def skewed(forward, strategy, *a):
        wrapped = real_wrap(forward, strategy, *a)
        if strategy.precision != "bf16":
            return wrapped
        return lambda x, y: (lambda out: ForwardOutput(out.loss * 1.5, out.logits, out.hidden))(wrapped(x, y))

    monkeypatch.setattr(tune, "wrap_forward", skewed)
    monkeypatch.setattr(tune, "paired_ratios", lambda *a, **k: always_faster())
    result = run_tuner(tiny_model, config, KernelSettings(**FAST), [("precision", "bf16")])
    (trial,) = result["trials"]
    assert not trial["sound"] and not trial["accepted"] and trial["loss_relative_difference"] > 0.4
    assert result["chosen"]["precision"] == "fp32"


def always_faster():
    return compare_pairs([100.0, 100.0, 100.0], [300.0, 310.0, 290.0], higher_is_better=True)


def test_a_failing_candidate_is_recorded_and_tuning_goes_on(tiny_model, config, break_compile):
    break_compile("no C++ compiler")
    settings = KernelSettings(**dict(FAST, compile="auto"))
    result = run_tuner(tiny_model, config, settings, [("compile", "inductor"), ("optimizer", "fused")])
    failed, fused = result["trials"]
    assert "no C++ compiler" in failed["error"] and not failed["accepted"]
    assert fused["error"] is None
    assert result["chosen"]["compile"] == "eager"


def test_decision_is_cached_reused_and_invalidated(tiny_model, config, make_cpu, monkeypatch):
    settings = KernelSettings(**FAST)
    runs = []
    real_run = Tuner.run

    def counting_run(self, start, trials):
        runs.append(len(trials))
        return real_run(self, start, trials)

    monkeypatch.setattr(Tuner, "run", counting_run)
    first, source = decide(tiny_model, config, settings, make_cpu())
    assert source == "measured" and runs == [3]
    cached_file = config.data.cache_dir / "kernel" / f"{first['key']}.json"
    assert json.loads(cached_file.read_text())["chosen"] == first["chosen"]

    again, source = decide(tiny_model, config, settings, make_cpu())
    assert source == "cache" and runs == [3] and again["chosen"] == first["chosen"]

    # any part of the key changing means tuning again: the CPU, the batch shape, the library versions
    _, source = decide(tiny_model, config, settings, make_cpu(native_bf16=False))
    assert source == "measured" and runs == [3, 2]
    config.train.batch_size = 3
    assert decide(tiny_model, config, settings, make_cpu())[1] == "measured"
    monkeypatch.setattr(decision, "library_versions", lambda: {"torch": "9.9"})
    assert decide(tiny_model, config, settings, make_cpu())[1] == "measured"
    assert decide(tiny_model, config, settings, make_cpu())[1] == "cache"
    config.train.precision = "fp32"  # the train section's precision is part of the key
    assert decide(tiny_model, config, settings, make_cpu())[1] == "measured" and runs[-1] == 2
    assert decide(tiny_model, config, settings.model_copy(update={"retune": True}), make_cpu())[1] == "measured"


def test_an_unreadable_cache_file_means_tuning_again(tiny_model, config, make_cpu):
    settings = KernelSettings(**FAST)
    decision, _ = decide(tiny_model, config, settings, make_cpu())
    path = config.data.cache_dir / "kernel" / f"{decision['key']}.json"
    path.write_text("{ truncated")
    assert decide(tiny_model, config, settings, make_cpu())[1] == "measured"
    stored = json.loads(path.read_text())
    path.write_text(json.dumps(dict(stored, chosen=dict(stored["chosen"], turbo=True))))
    assert decide(tiny_model, config, settings, make_cpu())[1] == "measured"


def test_a_model_of_another_shape_misses_the_cache(config, make_cpu):
    from ryzen_core import PRESETS, Transformer, TransformerConfig

    settings = KernelSettings(**FAST)
    small = Transformer(TransformerConfig(**dict(PRESETS["tiny"], dropout=0.0)))
    wider = Transformer(TransformerConfig(**dict(PRESETS["tiny"], d_model=48, dropout=0.0)))
    assert decide(small, config, settings, make_cpu())[1] == "measured"
    assert decide(wider, config, settings, make_cpu())[1] == "measured"
    assert decide(small, config, settings, make_cpu())[1] == "cache"


def test_the_combination_falls_back_when_the_confirmation_says_slower(tiny_model, config, monkeypatch):
    calls = []

    def scripted(run_a, run_b, **kwargs):
        calls.append(1)
        run_a(), run_b()
        faster = compare_pairs([100.0] * 3, [150.0] * 3, higher_is_better=True)
        slower = compare_pairs([100.0] * 3, [50.0] * 3, higher_is_better=True)
        return faster if len(calls) == 1 else slower

    monkeypatch.setattr(tune, "paired_ratios", scripted)
    result = run_tuner(tiny_model, config, KernelSettings(**FAST), [("optimizer", "fused")])
    assert result["trials"][0]["accepted"]
    assert result["confirmation"]["fell_back"] == "slower"
    assert result["chosen"]["optimizer"] == "foreach"


def test_a_cached_choice_is_still_compared_with_the_reference_in_this_run(tiny_model, config, make_cpu, monkeypatch):
    real = tune.paired_ratios

    def measured_then_faster(*args, **kwargs):  # really times both sides; says B won, so bf16 stays chosen
        result = real(*args, **kwargs)
        return compare_pairs(result.values_a, [3 * v for v in result.values_a], higher_is_better=True)

    monkeypatch.setattr(tune, "paired_ratios", measured_then_faster)
    settings = KernelSettings(**FAST)
    config.train.precision = "bf16"  # fixed, so the choice differs from the reference
    first, _ = decide(tiny_model, config, settings, make_cpu())
    assert 2 <= first["confirmation"]["speedup"]["n"] <= 4
    again, source = decide(tiny_model, config, settings, make_cpu())
    assert source == "cache" and again["confirmation"]["measured"] == "in this run"
    assert again["confirmation"]["speedup"]["values_a"] != first["confirmation"]["speedup"]["values_a"]
    quiet, _ = decide(tiny_model, config, settings.model_copy(update={"confirm_cached": False}), make_cpu())
    assert "measured" not in quiet["confirmation"]
