"""The hooks: what each applies, the re-check and fallback in on_epoch_end, state per variant and across a
resume, the precision the trainer and the kernel agree on, and the CLI."""
import json
import math
from pathlib import Path

import pytest
import torch

from ryzen_core import ConfigError, ReportSection, RunContext, build_optimizer, compare_pairs, reference_forward
from ryzen_core.testing import make_host
from ryzen_plugin_kernel_simd import plugin, report
from ryzen_plugin_kernel_simd.plugin import KernelPlugin, KernelSettings


def begin(host, config, variant="optimized", **settings):
    """Start `variant` on `host`: its own KernelPlugin instance with these settings, as the trainer does."""
    host.settings["kernel"] = KernelSettings(**settings)
    run_dir = config.data.cache_dir.parent
    host.begin_variant(RunContext(config, None, run_dir, run_dir / variant, variant, ["kernel"], recorder=host.recorder),
                       ["kernel"])
    return host.instance("kernel")


def host_with(config, **settings):
    host = make_host({"kernel": KernelPlugin})
    begin(host, config, **settings)
    return host


def fold_forward(host, model, config):
    return host.fold("transform_forward", ["kernel"], "forward", reference_forward(model), fallback=False,
                     model=model, config=config)


def loaded(host, model, config):
    host.call_each("on_model_load", ["kernel"], fallback=False, model=model, tokenizer=None, config=config)
    forward = fold_forward(host, model, config)
    optimizer = build_optimizer(model, config.train)
    host.call_each("on_train_start", ["kernel"], fallback=False, model=model, optimizer=optimizer, config=config)
    return forward, optimizer


FIXED = dict(autotune=False, attention="math", optimizer="fused", compile="eager")


def sdpa_dtypes(forward, under_autocast: bool = False) -> set:
    seen = set()
    real = torch.nn.functional.scaled_dot_product_attention
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch.nn.functional, "scaled_dot_product_attention",
                   lambda q, *a, **k: seen.add(q.dtype) or real(q, *a, **k))
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=under_autocast):
            forward(torch.zeros(2, 8, dtype=torch.long), torch.zeros(2, 8, dtype=torch.long))
    return seen


def test_fixed_choices_are_applied_through_the_hooks(tiny_model, config):
    config.train.precision, config.train.threads = "bf16", 1
    host = host_with(config, **FIXED)
    threads = torch.get_num_threads()
    try:
        forward, optimizer = loaded(host, tiny_model, config)
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(threads)
    assert all(g["fused"] for g in optimizer.param_groups)
    assert sdpa_dtypes(forward) == {torch.bfloat16}
    events = {e.event: e.data for e in host.events}
    assert events["autotune"]["source"] == "settings"
    assert events["autotune"]["chosen"]["precision"] == "bf16" and events["autotune"]["chosen"]["threads"] == 1
    assert "cpu" in events and events["optimizer"]["step"] == "fused"


def test_reference_choice_leaves_the_forward_alone(tiny_model, config):
    config.train.precision = "fp32"
    host = host_with(config, autotune=False)
    base = reference_forward(tiny_model)
    host.call_each("on_model_load", ["kernel"], fallback=False, model=tiny_model, tokenizer=None, config=config)
    assert host.fold("transform_forward", ["kernel"], "forward", base, fallback=False, model=tiny_model,
                     config=config) is base


def test_with_precision_auto_the_kernels_choice_holds_inside_the_trainers_autocast(tiny_model, config):
    """train.precision auto: the trainer autocasts where the CPU has native bf16; the kernel chose fp32 here
    (bf16 masked), so its forward must run fp32 even inside that autocast, not both deciding."""
    host = host_with(config, autotune=False, mask_features=["avx512_bf16", "amx_bf16"])
    forward, _ = loaded(host, tiny_model, config)
    assert sdpa_dtypes(reference_forward(tiny_model), under_autocast=True) == {torch.bfloat16}
    assert sdpa_dtypes(forward, under_autocast=True) == {torch.float32}
    (recorded,) = [e.data for e in host.events if e.event == "forward"]
    assert "train.precision is auto" in recorded["note"]


def epoch_end(host, model, config, epoch, val_loss):
    return host.call_each("on_epoch_end", ["kernel"], fallback=False, epoch=epoch, model=model, config=config,
                          metrics={"val_loss": val_loss})["kernel"]


def reverts(host) -> list[dict]:
    return [e.data for e in host.events if e.event == "reverted"]


def test_unstable_validation_loss_switches_everything_back(tiny_model, config):
    config.train.precision = "bf16"
    host = host_with(config, **FIXED, recheck=False)
    forward, optimizer = loaded(host, tiny_model, config)
    assert epoch_end(host, tiny_model, config, 1, 5.0) is None
    assert epoch_end(host, tiny_model, config, 2, math.nan) is None  # the switch is state, not a settings change
    (reverted,) = reverts(host)
    assert "unstable" in reverted["reason"] and not host.disabled
    assert not any(g["fused"] for g in optimizer.param_groups)
    assert sdpa_dtypes(forward) == {torch.bfloat16}  # back to plain, but train.precision bf16 still holds
    x = torch.randint(0, 256, (2, 8))
    with torch.autocast("cpu", dtype=torch.bfloat16):  # the plain path is the bf16 eager forward
        torch.testing.assert_close(forward(x, x).loss, reference_forward(tiny_model)(x, x).loss)
    assert epoch_end(host, tiny_model, config, 3, 4.0) is None and len(reverts(host)) == 1  # stays plain


def test_recheck_switches_back_only_after_repeated_slowdowns(tiny_model, config, monkeypatch):
    config.train.precision = "bf16"
    host = host_with(config, **FIXED, recheck_patience=2, recheck_rounds=2)
    forward, optimizer = loaded(host, tiny_model, config)
    verdicts = iter([[10.0, 10.0], [20.0, 20.0], [20.0, 20.0]])  # candidate seconds: faster, slower, slower

    def scripted(run_a, run_b, warmup, repeats, higher_is_better):
        run_a(), run_b()  # really times both paths once: they must run
        return compare_pairs([15.0, 15.0], next(verdicts), higher_is_better=higher_is_better)

    monkeypatch.setattr(plugin, "paired_ratios", scripted)
    assert epoch_end(host, tiny_model, config, 1, 5.0) is None
    assert epoch_end(host, tiny_model, config, 2, 4.9) is None and not reverts(host)  # one slow evaluation is not enough
    assert epoch_end(host, tiny_model, config, 3, 4.8) is None
    (reverted,) = reverts(host)
    assert "slower" in reverted["reason"]
    assert all(g["fused"] for g in optimizer.param_groups)  # the optimizer was not what got slower
    assert [e.data["verdict"] for e in host.events if e.event == "recheck"] == ["faster", "slower", "slower"]
    assert all(p.grad is None for p in tiny_model.parameters())  # timing left no gradients behind


def test_compile_failure_during_training_is_recorded_and_training_goes_on(tiny_model, config, break_compile):
    break_compile("inductor failed")
    config.train.precision = "fp32"
    host = host_with(config, autotune=False, compile="inductor")
    forward, _ = loaded(host, tiny_model, config)
    x = torch.randint(0, 256, (2, 8))
    assert forward(x, x).loss.isfinite() and forward(x, x).loss.isfinite()
    fallbacks = [e.data for e in host.events if e.event == "compile_fallback"]
    assert len(fallbacks) == 1 and "inductor failed" in fallbacks[0]["reason"]


def test_report_section_lists_the_trials(tiny_model, config):
    config.train.precision = "fp32"
    host = host_with(config, tune_rounds=2, tune_steps=1, compile="eager", attention="default")
    loaded(host, tiny_model, config)
    ended = host.call_each("on_train_end", ["kernel"], fallback=False, model=tiny_model, metrics={},
                           run_dir=None, config=config)["kernel"]
    assert isinstance(ended, ReportSection)
    assert "measured in this run" in ended.markdown and "optimizer=fused" in ended.markdown
    assert "threads not tuned" in ended.markdown and "precision not tuned: fp32 set in train.precision" in ended.markdown


def test_each_variant_has_its_own_state(tiny_model, config):
    """`ryzen run` trains the optimized variant and each only-<plugin> one in one process: a switch back in
    one must not touch the other."""
    config.train.precision = "bf16"
    host = make_host({"kernel": KernelPlugin})
    optimized = begin(host, config, "optimized", **FIXED, recheck=False)
    loaded(host, tiny_model, config)
    epoch_end(host, tiny_model, config, 1, math.nan)
    other_model = type(tiny_model)(tiny_model.config)
    ablation = begin(host, config, "only-kernel", **FIXED, recheck=False)
    _, optimizer = loaded(host, other_model, config)
    assert ablation is not optimized and ablation.state is not optimized.state
    assert optimized.state.reverted and ablation.state.reverted is None
    assert all(g["fused"] for g in optimizer.param_groups)
    host.use_variant("optimized")
    assert host.instance("kernel") is optimized


def test_resume_restores_the_switch_back_and_the_rechecks(tiny_model, config):
    config.train.precision = "bf16"
    host = host_with(config, **FIXED, recheck=False)
    loaded(host, tiny_model, config)
    epoch_end(host, tiny_model, config, 1, 5.0)
    epoch_end(host, tiny_model, config, 2, math.inf)
    saved = json.loads(json.dumps(host.plugin_state()))  # as the checkpoint stores it

    resumed = make_host({"kernel": KernelPlugin})  # a new process: new host, new instance, same decision
    instance = begin(resumed, config, **FIXED, recheck=False)
    _, optimizer = loaded(resumed, tiny_model, config)
    assert all(g["fused"] for g in optimizer.param_groups) and instance.state.reverted is None
    resumed.load_plugin_state(saved)
    forward = fold_forward(resumed, tiny_model, config)  # the trainer folds the forward again after loading
    assert instance.state.reverted and instance.state.best_val == 5.0
    assert not any(g["fused"] for g in optimizer.param_groups)
    # The plain path under train.precision bf16 is the trainer's own: the kernel leaves the forward alone.
    assert instance.state.active.attention == "default" and forward is not None
    assert [e.data for e in resumed.events if e.event == "forward"][-1]["note"] == "reference forward kept"
    assert epoch_end(resumed, tiny_model, config, 3, 4.0) is None and not reverts(resumed)  # no second switch
    assert "switched back to the plain path" in report.decision_markdown(instance.state.decision, "settings",
                                                                          instance.state)


def test_a_training_resumed_from_its_checkpoint_keeps_the_kernels_rechecks(tiny_config, tiny_host, tmp_path):
    from ryzen_core import Trainer, load_data

    config = tiny_config("train.precision=bf16", "train.max_steps=3", "kernel.autotune=false", "kernel.attention=math",
                         "kernel.recheck_rounds=2", plugins=["kernel"])
    first = tiny_host(kernel=KernelPlugin, config=config)
    Trainer(config, first, ["kernel"], tmp_path / "train", load_data(config)).fit()
    assert len(first.instance("kernel").state.rechecks) == 1  # the evaluation at step 3, saved in the checkpoint
    config.train.max_steps = 6
    second = tiny_host(kernel=KernelPlugin, config=config)
    trainer = Trainer(config, second, ["kernel"], tmp_path / "train", load_data(config))
    trainer.fit(resume=True)
    assert trainer.step == 6 and "kernel" not in second.disabled
    assert [c["epoch"] for c in second.instance("kernel").state.rechecks] == [1, 2]


def test_a_worker_restores_state_onto_an_instance_that_trained_nothing(config):
    instance = KernelPlugin(KernelSettings(), None)
    instance.load_state_dict({"chosen": {}, "active": {}, "reverted": "x", "best_val": None, "rechecks": [],
                              "slower_in_row": 0})
    assert instance.state is None and instance.state_dict() == {}


@pytest.mark.parametrize("key, value", [("precision", "bf16"), ("threads", "2")])
def test_precision_and_threads_moved_to_train_and_the_error_says_so(tiny_config, key, value):
    with pytest.raises(ConfigError, match=f"'{key}' moved to train.{key}"):
        make_host({"kernel": KernelPlugin}, tiny_config(f"kernel.{key}={value}"))


def test_kernel_info_json_includes_peak_flops(ryzen_cli, ryzen_cache_dir):
    out = ryzen_cli("kernel", "info", "--json")
    assert out.returncode == 0, out.stderr
    info = json.loads(out.stdout)
    assert info["peak"]["fp32_flops"] > 0 and info["peak"]["bf16_flops"] >= info["peak"]["fp32_flops"]
    assert info["measured_gemm"]["fp32"]["flops"] > 0 and info["measured_gemm"]["threads"] >= 1
    assert list((ryzen_cache_dir / "hardware").glob("*.json"))  # measured once, then read from RYZEN_CACHE_DIR
    assert set(info["features"]) >= {"avx2", "avx512_bf16", "amx_bf16"}


TINY_TUNE = ["--set", "model.preset=tiny", "--set", "data.max_documents=12", "--set", "data.vocab_size=300",
             "--set", "data.seq_len=32", "--set", "train.batch_size=4", "--set", "kernel.tune_rounds=2",
             "--set", "kernel.tune_steps=1", "--set", "kernel.compile=eager", "--set", "train.precision=fp32"]


def test_kernel_tune_caches_and_retune_measures_again(ryzen_cli):
    first = ryzen_cli("kernel", "tune", *TINY_TUNE, "--json")
    assert first.returncode == 0, first.stderr
    decision = json.loads(first.stdout[first.stdout.index("{"):])
    assert decision["trials"] and decision["shape"]["seq_len"] == 32
    assert decision["not_tried"]["precision"] == "fp32 set in train.precision"  # one owner: the train section
    second = ryzen_cli("kernel", "tune", *TINY_TUNE)
    assert "reused from the cache" in second.stdout
    third = ryzen_cli("kernel", "tune", *TINY_TUNE, "--retune")
    assert "measured in this run" in third.stdout


@pytest.mark.parametrize("setting, says", [("kernel.attention=fast", "kernel.attention"),
                                           ("kernel.precision=bf16", "moved to train.precision")])
def test_kernel_tune_rejects_bad_settings_with_one_line(ryzen_cli, setting, says):
    out = ryzen_cli("kernel", "tune", "--set", setting)
    lines = out.stderr.strip().splitlines()
    assert out.returncode == 2 and len(lines) == 1 and says in lines[0], out.stderr


def test_ryzen_train_with_kernel_records_the_tuning_and_applies_it(ryzen_cli, tmp_path):
    sets = [*TINY_TUNE, "--set", "train.max_steps=4", "--set", "train.eval_every=2", "--set", "train.eval_batches=1",
            "--set", "train.precision=bf16", "--set", "kernel.recheck_rounds=2"]
    out = ryzen_cli("train", "--plugins", "kernel", *sets, "--out", str(tmp_path / "run"))
    assert out.returncode == 0, out.stderr[-2000:]
    analysis = json.loads((tmp_path / "run" / "optimization_analysis.json").read_text())
    events = {}
    for e in analysis["events"]:
        events.setdefault(e["event"], []).append(e["data"])
    (tuned,) = events["autotune"]
    assert tuned["source"] in ("measured", "cache") and [t["knob"] for t in tuned["trials"]][:2] == ["attention", "optimizer"]
    assert tuned["chosen"]["precision"] == "bf16" and tuned["not_tried"]["precision"] == "bf16 set in train.precision"
    assert all(t["tokens_per_s_candidate"] > 0 for t in tuned["trials"])
    changed_forward = tuned["chosen"]["attention"] != "default" or tuned["chosen"]["compile"] != "eager"
    assert len(events.get("recheck", [])) == (2 if changed_forward else 0)  # one per evaluation, if there is a change
    assert events["denormals"][0]["flush_denormal"] and not events["denormals"][-1]["flush_denormal"]
    assert "kernel" not in analysis["disabled"]
    assert Path(tuned["cache_file"]).is_file()


def test_run_and_bench_infer_measure_the_int8_path_alike(ryzen_cli, tmp_path):
    sets = [*TINY_TUNE, "--set", "train.max_steps=4", "--set", "train.eval_every=2", "--set", "train.eval_batches=1",
            "--set", "kernel.inference=int8", "--set", "kernel.autotune=false", "--set", "validate.batch_sizes=[1]",
            "--set", "validate.repeats=2", "--set", "validate.max_repeats=3", "--set", "validate.warmup=1", "--set", "validate.perplexity_batches=2",
            "--set", "validate.new_tokens=4", "--set", "validate.prompt_len=8"]
    run = tmp_path / "run"
    out = ryzen_cli("run", "--plugins", "kernel", *sets, "--out", str(run))
    assert out.returncode == 0, out.stderr[-2000:]
    in_run = json.loads((run / "inference_validation_report.json").read_text())["perplexity"]
    again = ryzen_cli("bench", "infer", str(run), "--json-out", str(tmp_path / "again.json"))
    assert again.returncode == 0, again.stderr[-2000:]
    in_bench = json.loads((tmp_path / "again.json").read_text())["perplexity"]
    # The int8 copy's perplexity, not the fp32 model's: bench infer applies on_infer as the run did.
    assert in_bench["torch-optimized"] == pytest.approx(in_run["torch-optimized"], rel=1e-6)
    assert in_bench["torch"] == pytest.approx(in_run["torch"], rel=1e-6)


def test_utilization_is_stated_against_the_measured_rate_and_the_computed_peak(config, monkeypatch):
    from ryzen_core import GEMM_SIZE, peak_flops

    measured = {"fp32": {"flops": 400e9}, "bf16": {"flops": 1600e9}, "threads": 2}  # as if this machine was measured
    monkeypatch.setattr(report, "gemm_rates", lambda cache_dir: measured)
    events = []
    line = report.utilization_line(100e9, config, lambda event, **data: events.append((event, data)))
    assert f"25.0% of the measured fp32 matmul rate (400 GFLOP/s, {GEMM_SIZE}x{GEMM_SIZE} on 2 threads)" in line
    fp32_peak = peak_flops()["fp32_flops"]
    assert f"{100e9 / fp32_peak:.1%} of the computed fp32 peak ({fp32_peak / 1e9:.0f} GFLOP/s)" in line
    ((event, data),) = events
    assert event == "utilization" and data["of_measured_fp32_gemm"] == 0.25
