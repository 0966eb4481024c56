"""The hooks: what each applies, the re-check and fallback in on_epoch_end, and the CLI."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ryzen_core.forward import reference_forward
from ryzen_core.measure import compare_pairs
from ryzen_core.plugins import PluginHost
from ryzen_core.trainer import build_optimizer
from ryzen_plugin_kernel_simd import plugin
from ryzen_plugin_kernel_simd.plugin import KernelSettings


def host_with(**settings) -> PluginHost:
    host = PluginHost()
    host.register(plugin, "kernel")
    host.settings = {"kernel": KernelSettings(**settings)}
    return host


def loaded(host, model, config):
    host.call_each("on_model_load", ["kernel"], fallback=False, model=model, tokenizer=None, config=config)
    forward = host.fold("transform_forward", ["kernel"], "forward", reference_forward(model), fallback=False,
                        model=model, config=config)
    optimizer = build_optimizer(model, config.train)
    host.call_each("on_train_start", ["kernel"], fallback=False, model=model, optimizer=optimizer, config=config)
    return forward, optimizer


FIXED = dict(autotune=False, precision="bf16", attention="math", optimizer="fused", compile="eager")


def test_fixed_choices_are_applied_through_the_hooks(tiny_model, config):
    host = host_with(**FIXED, threads=1)
    threads = torch.get_num_threads()
    try:
        forward, optimizer = loaded(host, tiny_model, config)
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(threads)
    assert all(g["fused"] for g in optimizer.param_groups)
    seen = []
    real = torch.nn.functional.scaled_dot_product_attention
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch.nn.functional, "scaled_dot_product_attention",
                   lambda q, *a, **k: seen.append(q.dtype) or real(q, *a, **k))
        forward(torch.zeros(2, 8, dtype=torch.long), torch.zeros(2, 8, dtype=torch.long))
    assert set(seen) == {torch.bfloat16}
    events = {e.event: e.data for e in host.events}
    assert events["autotune"]["source"] == "settings"
    assert events["autotune"]["chosen"]["precision"] == "bf16"
    assert "cpu" in events and events["optimizer"]["step"] == "fused"


def test_reference_choice_leaves_the_forward_alone(tiny_model, config):
    host = host_with(autotune=False, precision="fp32")
    base = reference_forward(tiny_model)
    host.call_each("on_model_load", ["kernel"], fallback=False, model=tiny_model, tokenizer=None, config=config)
    assert host.fold("transform_forward", ["kernel"], "forward", base, fallback=False, model=tiny_model,
                     config=config) is base


def epoch_end(host, model, config, epoch, val_loss):
    return host.call_each("on_epoch_end", ["kernel"], fallback=False, epoch=epoch, model=model, config=config,
                          metrics={"val_loss": val_loss})["kernel"]


def test_unstable_validation_loss_switches_everything_back(tiny_model, config):
    host = host_with(**FIXED, recheck=False)
    forward, optimizer = loaded(host, tiny_model, config)
    assert epoch_end(host, tiny_model, config, 1, 5.0) is None
    change = epoch_end(host, tiny_model, config, 2, math.nan)
    assert "unstable" in change["reason"]
    assert not any(g["fused"] for g in optimizer.param_groups)
    x = torch.randint(0, 256, (2, 8))
    torch.testing.assert_close(forward(x, x).loss, reference_forward(tiny_model)(x, x).loss)  # fp32 again
    assert [e.event for e in host.events].count("reverted") == 1
    assert epoch_end(host, tiny_model, config, 3, 4.0) is None  # stays on the reference path


def test_recheck_switches_back_only_after_repeated_slowdowns(tiny_model, config, monkeypatch):
    host = host_with(**FIXED, recheck_patience=2, recheck_rounds=2)
    forward, optimizer = loaded(host, tiny_model, config)
    verdicts = iter([[10.0, 10.0], [20.0, 20.0], [20.0, 20.0]])  # candidate seconds: faster, slower, slower

    def scripted(run_a, run_b, warmup, repeats, higher_is_better):
        run_a(), run_b()  # really times both paths once: they must run
        return compare_pairs([15.0, 15.0], next(verdicts), higher_is_better=higher_is_better)

    monkeypatch.setattr("ryzen_core.measure.paired_ratios", scripted)
    assert epoch_end(host, tiny_model, config, 1, 5.0) is None
    assert epoch_end(host, tiny_model, config, 2, 4.9) is None  # one slow evaluation is not enough
    change = epoch_end(host, tiny_model, config, 3, 4.8)
    assert "slower" in change["reason"]
    assert all(g["fused"] for g in optimizer.param_groups)  # the optimizer was not what got slower
    assert [e.data["verdict"] for e in host.events if e.event == "recheck"] == ["faster", "slower", "slower"]
    assert all(p.grad is None for p in tiny_model.parameters())  # timing left no gradients behind


def test_compile_failure_during_training_is_recorded_and_training_goes_on(tiny_model, config, break_compile):
    break_compile("inductor failed")
    host = host_with(autotune=False, precision="fp32", compile="inductor")
    forward, _ = loaded(host, tiny_model, config)
    x = torch.randint(0, 256, (2, 8))
    assert forward(x, x).loss.isfinite() and forward(x, x).loss.isfinite()
    fallbacks = [e.data for e in host.events if e.event == "compile_fallback"]
    assert len(fallbacks) == 1 and "inductor failed" in fallbacks[0]["reason"]


def test_report_section_lists_the_trials(tiny_model, config):
    host = host_with(tune_rounds=2, tune_steps=1, compile="eager", attention="default", precision="fp32")
    loaded(host, tiny_model, config)
    ended = host.call_each("on_train_end", ["kernel"], fallback=False, model=tiny_model, metrics={},
                           run_dir=None, config=config)["kernel"]
    text = ended["report_markdown"]
    assert "measured in this run" in text and "optimizer=fused" in text and "threads not tuned" in text


def cli(*args, cache):
    env = dict(os.environ, RYZEN_CACHE_DIR=str(cache), CI="1")
    return subprocess.run([sys.executable, "-m", "ryzen_core.cli", *args], capture_output=True, text=True, env=env,
                          timeout=1800)  # generous: a loaded machine is slow, not broken


def test_kernel_info_json_includes_peak_flops(tmp_path):
    out = cli("kernel", "info", "--json", cache=tmp_path)
    assert out.returncode == 0, out.stderr
    info = json.loads(out.stdout)
    assert info["peak"]["fp32_flops"] > 0 and info["peak"]["bf16_flops"] >= info["peak"]["fp32_flops"]
    assert info["measured_gemm"]["fp32"]["flops"] > 0 and info["measured_gemm"]["threads"] >= 1
    assert list((tmp_path / "hardware").glob("*.json"))  # measured once, then read from RYZEN_CACHE_DIR
    assert set(info["features"]) >= {"avx2", "avx512_bf16", "amx_bf16"}


TINY_TUNE = ["--set", "model.preset=tiny", "--set", "data.max_documents=12", "--set", "data.vocab_size=300",
             "--set", "data.seq_len=32", "--set", "train.batch_size=4", "--set", "kernel.tune_rounds=2",
             "--set", "kernel.tune_steps=1", "--set", "kernel.compile=eager"]


def test_kernel_tune_caches_and_retune_measures_again(tmp_path):
    first = cli("kernel", "tune", *TINY_TUNE, "--json", cache=tmp_path)
    assert first.returncode == 0, first.stderr
    decision = json.loads(first.stdout[first.stdout.index("{"):])
    assert decision["trials"] and decision["shape"]["seq_len"] == 32
    second = cli("kernel", "tune", *TINY_TUNE, cache=tmp_path)
    assert "reused from the cache" in second.stdout
    third = cli("kernel", "tune", *TINY_TUNE, "--retune", cache=tmp_path)
    assert "measured in this run" in third.stdout


def test_kernel_tune_rejects_bad_settings_with_one_line(tmp_path):
    out = cli("kernel", "tune", "--set", "kernel.precision=fp16", cache=tmp_path)
    assert out.returncode == 2 and "kernel.precision" in out.stderr and "Traceback" not in out.stderr


def test_ryzen_train_with_kernel_records_the_tuning_and_applies_it(tmp_path):
    sets = [*TINY_TUNE, "--set", "train.max_steps=4", "--set", "train.eval_every=2", "--set", "train.eval_batches=1",
            "--set", "kernel.precision=bf16", "--set", "kernel.recheck_rounds=2"]
    out = cli("train", "--plugins", "kernel", *sets, "--out", str(tmp_path / "run"), cache=tmp_path / "cache")
    assert out.returncode == 0, out.stderr[-2000:]
    analysis = json.loads((tmp_path / "run" / "optimization_analysis.json").read_text())
    events = {}
    for e in analysis["events"]:
        events.setdefault(e["event"], []).append(e["data"])
    (tuned,) = events["autotune"]
    assert tuned["source"] == "measured" and [t["knob"] for t in tuned["trials"]] == ["attention", "optimizer"]
    assert all(t["tokens_per_s_candidate"] > 0 for t in tuned["trials"])
    assert events["denormals"][0]["flush_denormal"] and not events["denormals"][-1]["flush_denormal"]
    assert len(events["recheck"]) == 2  # one per evaluation
    assert Path(tuned["cache_file"]).is_file()


def test_run_and_bench_infer_measure_the_int8_path_alike(tmp_path):
    sets = [*TINY_TUNE, "--set", "train.max_steps=4", "--set", "train.eval_every=2", "--set", "train.eval_batches=1",
            "--set", "kernel.inference=int8", "--set", "kernel.autotune=false", "--set", "validate.batch_sizes=[1]",
            "--set", "validate.repeats=2", "--set", "validate.max_repeats=3", "--set", "validate.warmup=1", "--set", "validate.perplexity_batches=2",
            "--set", "validate.new_tokens=4", "--set", "validate.prompt_len=8"]
    run = tmp_path / "run"
    out = cli("run", "--plugins", "kernel", *sets, "--out", str(run), cache=tmp_path / "cache")
    assert out.returncode == 0, out.stderr[-2000:]
    in_run = json.loads((run / "inference_validation_report.json").read_text())["perplexity"]
    again = cli("bench", "infer", str(run), "--json-out", str(tmp_path / "again.json"), cache=tmp_path / "cache")
    assert again.returncode == 0, again.stderr[-2000:]
    in_bench = json.loads((tmp_path / "again.json").read_text())["perplexity"]
    # The int8 copy's perplexity, not the fp32 model's: bench infer applies on_infer as the run did.
    assert in_bench["torch-optimized"] == pytest.approx(in_run["torch-optimized"], rel=1e-6)
    assert in_bench["torch"] == pytest.approx(in_run["torch"], rel=1e-6)


def test_utilization_is_stated_against_the_measured_rate_and_the_computed_peak(config):
    from ryzen_core import hardware_limits
    from ryzen_core import peak_flops

    measured = {f"{dtype}:{hardware_limits.GEMM_SIZE}": {"flops": flops, "n": hardware_limits.GEMM_SIZE}
                for dtype, flops in (("fp32", 400e9), ("bf16", 1600e9))}
    path = hardware_limits.cache_path(config.data.cache_dir)  # as if this machine had been measured already
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({"gemm": measured}))
    events = []
    line = plugin.utilization_line(100e9, config, lambda event, **data: events.append((event, data)))
    assert "25.0% of the measured fp32 matmul rate (400 GFLOP/s" in line
    fp32_peak = peak_flops()["fp32_flops"]
    assert f"{100e9 / fp32_peak:.1%} of the computed fp32 peak ({fp32_peak / 1e9:.0f} GFLOP/s)" in line
    ((event, data),) = events
    assert event == "utilization" and data["of_measured_fp32_gemm"] == 0.25
