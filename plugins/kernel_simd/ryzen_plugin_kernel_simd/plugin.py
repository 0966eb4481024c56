"""Hook implementations of the kernel plugin (entry-point name `kernel`).

on_model_load    tunes the execution strategy for this model shape (or reuses the cached decision)
                 and sets the thread count;
transform_forward runs the training forward under the chosen precision, attention kernel and
                 compilation;
on_train_start   switches AdamW to the fused step when that was chosen;
on_epoch_end     re-times the chosen forward against the plain one and watches the validation
                 loss; if the chosen path got slower or unstable it switches back (recorded);
on_train_end     adds the tuning table to report.md.
"""
from __future__ import annotations

import json
import logging
import math
import time
import weakref
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

from ryzen_core import CpuFeatures, cpu_features, hookimpl
from ryzen_core.forward import Forward
from ryzen_core.measure import busy_warning, format_ratio

from .cache import DecisionCache, cache_key, library_versions, model_shape
from .denormals import set_flush_denormal_all_threads
from .strategy import REFERENCE, Strategy, apply_optimizer, apply_threads, wrap_forward
from .tune import DECISION_RULE, Tuner, describe_trial, plan, random_batches, vocab_size_of

log = logging.getLogger(__name__)


class KernelSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    precision: Literal["auto", "bf16", "fp32"] = "auto"
    """'auto' tries bf16 autocast where the CPU has native bf16 (AVX-512 BF16 or AMX) and keeps it if faster and sound."""
    attention: Literal["auto", "default", "math"] = "auto"
    """Scaled-dot-product attention kernel: torch's default (flash) or the math path; 'auto' measures both."""
    optimizer: Literal["auto", "foreach", "fused"] = "auto"
    """AdamW step implementation; 'auto' measures both."""
    compile: Literal["auto", "inductor", "eager"] = "auto"
    """torch.compile of the training forward (falls back to eager if it fails); 'auto' measures it."""
    denormals: Literal["flush", "keep"] = "flush"
    """'flush' sets FTZ/DAZ on every torch worker thread for the optimized run (see denormals.py); not
    tuned, because subnormals appear only as the model trains, after tuning has measured."""
    threads: int | None = Field(None, gt=0)
    """Intra-op threads; default: the cores this process may use (one per physical core is also tried)."""
    autotune: bool = True
    """Measure the 'auto' choices; when false they take the reference choice, except precision,
    which then follows the CPU (bf16 where native)."""
    retune: bool = False
    """Measure again even if a decision for this CPU, model shape and library versions is cached."""
    tune_rounds: int = Field(7, ge=2)
    """Timed rounds per side in each tuning trial."""
    tune_steps: int = Field(2, ge=1)
    """Optimizer steps per round."""
    confirm_cached: bool = True
    """With a cached decision, still time the chosen path against the reference in this run."""
    loss_tolerance: float = Field(0.02, gt=0)
    """A candidate is sound when its loss is within this fraction of the fp32 eager reference's."""
    recheck: bool = True
    """At each evaluation, re-time the chosen forward against the plain one; switch back if it is
    slower at `recheck_patience` evaluations in a row (one busy moment on a shared machine is not enough)."""
    recheck_rounds: int = Field(5, ge=2)
    recheck_patience: int = Field(2, ge=1)
    instability_tolerance: float = Field(0.1, gt=0)
    """Switch back to the reference path if validation loss exceeds its best so far by this fraction."""
    mask_features: list[str] = Field(default_factory=list)
    """Features to treat as absent (to exercise the fallback paths)."""
    inference: Literal["auto", "fp32", "int8", "bf16"] = "auto"
    """torch inference path for validation; 'auto' times int8 dynamic quantization (and bf16 on native
    hardware) against fp32 decoding and keeps the fastest sound one."""
    infer_rounds: int = Field(5, ge=2)
    infer_prompt_tokens: int = Field(32, ge=1)
    infer_new_tokens: int = Field(16, ge=2)
    infer_logits_tolerance: float = Field(0.05, gt=0)
    """Relative L2 error of the logits against fp32 that an inference path may have."""


@dataclass
class KernelState:
    """What the plugin chose for one model, and what it is running now."""

    decision: dict[str, Any]
    source: str
    chosen: Strategy
    active: Strategy
    batch: tuple[torch.Tensor, torch.Tensor]
    inner: Forward | None = None
    forward: Forward | None = None
    optimizer: torch.optim.Optimizer | None = None
    best_val: float = math.inf
    rechecks: list[dict[str, Any]] = field(default_factory=list)
    slower_in_row: int = 0
    reverted: str | None = None


# One state per model: `ryzen run` trains several variants in one process.
STATES: "weakref.WeakKeyDictionary[torch.nn.Module, KernelState]" = weakref.WeakKeyDictionary()


def settings_or_default(settings: KernelSettings | None) -> KernelSettings:
    return settings if settings is not None else KernelSettings()


def untuned_strategy(settings: KernelSettings, cpu: CpuFeatures) -> Strategy:
    start, trials, _ = plan(settings, cpu)
    if dict(trials).get("precision") == "bf16":
        start = start.with_knob("precision", "bf16")
    return start


def decide(model: torch.nn.Module, config, settings: KernelSettings, cpu: CpuFeatures,
           log_line=log.info) -> tuple[dict[str, Any], str]:
    """The tuning decision for this model and batch shape: cached, measured now, or from settings alone."""
    start, trials, not_tried = plan(settings, cpu)
    base = {"cpu": cpu.signature(), "not_tried": not_tried}
    if not settings.autotune or not trials:
        chosen = untuned_strategy(settings, cpu) if not settings.autotune else start
        return dict(base, chosen=chosen.as_dict(), chosen_description=chosen.describe(), trials=[]), "settings"
    shape = model_shape(model, config.train.batch_size, config.data.seq_len)
    versions = library_versions()
    tuning = dict(settings.model_dump(include={"precision", "attention", "optimizer", "compile", "threads",
                                               "denormals", "tune_rounds", "tune_steps", "loss_tolerance",
                                               "mask_features"}), decision_rule=DECISION_RULE)
    key = cache_key(cpu.signature(), shape, versions, tuning)
    cache = DecisionCache(config.data.cache_dir / "kernel")
    if not settings.retune:
        cached = cache.load(key)
        try:
            chosen = Strategy(**cached["chosen"]) if cached is not None else None
        except TypeError:  # edited by hand or written by another version: measure again
            log.warning("ignoring tuning cache %s: its choice has unknown fields", cache.path(key))
            chosen = None
        if chosen is not None:
            cached["cache_file"] = str(cache.path(key))
            if settings.confirm_cached and chosen != REFERENCE.with_knob("threads", chosen.threads):
                # The trials are from the run that tuned; the speedup this run reports is measured now.
                tuner = Tuner(model, config.train, config.train.batch_size, config.data.seq_len, settings, log_line)
                cached["confirmation"] = dict(tuner.trial(REFERENCE.with_knob("threads", chosen.threads), chosen),
                                              measured="in this run")
                log_line(f"kernel tune: cached choice ({chosen.describe()}) vs reference, measured now: "
                         f"{describe_trial(cached['confirmation'])}")
            return cached, "cache"
    log_line(f"kernel tune: timing {len(trials)} choices on {shape['model_class']} "
             f"({shape['parameters']:,} parameters), batch {shape['batch_size']} x {shape['seq_len']}")
    tuner = Tuner(model, config.train, config.train.batch_size, config.data.seq_len, settings, log_line)
    decision = dict(base, shape=shape, versions=versions, **tuner.run(start, trials))
    path = cache.store(key, decision)
    return dict(decision, key=key, cache_file=str(path)), "measured"


def decide_once(model, config, settings: KernelSettings, cpu: CpuFeatures) -> tuple[dict[str, Any], str]:
    """Under DDP every rank must run the same strategy: rank 0 decides (tunes alone, so the timings
    are not disturbed by the other ranks) and sends its decision to the rest."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return decide(model, config, settings, cpu)
    box = [decide(model, config, settings, cpu) if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(box, src=0)  # between our own processes, not untrusted data
    return box[0]


@hookimpl
def ryzen_settings():
    return KernelSettings


@hookimpl
def on_model_load(model, config, settings, record):
    settings = settings_or_default(settings)
    cpu = cpu_features(mask=settings.mask_features)
    record("cpu", model=cpu.model, usable_cores=cpu.usable_cores, physical_cores=cpu.physical_cores,
           native_bf16=cpu.native_bf16, bf16_unit=cpu.bf16_unit,
           features=sorted(k for k, v in cpu.features.items() if v), masked=settings.mask_features)
    record("denormals", **set_flush_denormal_all_threads(settings.denormals == "flush"))
    state = new_state(model, config, *decide_once(model, config, settings, cpu))
    apply_threads(state.chosen)
    record("autotune", source=state.source, **{key: state.decision.get(key) for key in AUTOTUNE_RECORD})


AUTOTUNE_RECORD = ("chosen", "chosen_description", "not_tried", "trials", "confirmation", "tune_seconds",
                   "cache_file", "created")


def new_state(model, config, decision: dict[str, Any], source: str) -> KernelState:
    chosen = Strategy(**decision["chosen"])
    batch = random_batches(vocab_size_of(model), config.train.batch_size, config.data.seq_len, count=1, seed=1)[0]
    state = STATES[model] = KernelState(decision=decision, source=source, chosen=chosen, active=chosen, batch=batch)
    return state


def _state(model, settings, config) -> KernelState:
    state = STATES.get(model)
    if state is None:  # on_model_load did not run for this model (a plugin calling us directly)
        settings = settings_or_default(settings).model_copy(update={"autotune": False})
        state = new_state(model, config, *decide(model, config, settings, cpu_features(mask=settings.mask_features)))
    return state


@hookimpl
def transform_forward(forward, model, config, settings, record):
    state = _state(model, settings, config)
    state.inner = forward
    if state.chosen.forward_knobs == REFERENCE.forward_knobs:
        record("forward", strategy=state.chosen.describe(), note="reference forward kept")
        return None

    def compile_failed(reason: str) -> None:
        record("compile_fallback", reason=reason)
        state.active = state.active.with_knob("compile", "eager")

    state.forward = wrap_forward(forward, state.chosen, on_compile_failure=compile_failed)
    record("forward", strategy=state.chosen.describe())

    def kernel_forward(input_ids, targets):
        return state.forward(input_ids, targets)

    return kernel_forward


@hookimpl
def on_train_start(model, optimizer, config, settings, record):
    state = _state(model, settings, config)
    state.optimizer = optimizer
    apply_optimizer(optimizer, state.active)
    record("optimizer", step=state.active.optimizer)


def _time_forward_backward(forward: Forward, model: torch.nn.Module, batch) -> float:
    start = time.perf_counter()
    with torch.random.fork_rng():  # dropout here must not shift the training run's random stream
        forward(*batch).loss.backward()
    elapsed = time.perf_counter() - start
    for p in model.parameters():
        p.grad = None  # the trainer zeroes gradients at the start of each step anyway
    return elapsed


def revert(state: KernelState, reason: str, record, optimizer_too: bool) -> dict[str, Any]:
    state.reverted = reason
    state.forward = state.inner
    state.active = REFERENCE.with_knob("threads", state.active.threads).with_knob(
        "optimizer", REFERENCE.optimizer if optimizer_too else state.active.optimizer)
    if optimizer_too and state.optimizer is not None:
        apply_optimizer(state.optimizer, state.active)
    record("reverted", reason=reason, now=state.active.describe())
    return {"strategy": state.active.describe(), "reason": reason}


@hookimpl
def on_epoch_end(epoch, metrics, model, config, settings, record):
    settings = settings_or_default(settings)
    state = STATES.get(model)
    if state is None or state.reverted or state.active == REFERENCE.with_knob("threads", state.active.threads):
        return None
    val_loss = metrics.get("val_loss")
    if val_loss is None or not math.isfinite(val_loss) or val_loss > state.best_val * (1 + settings.instability_tolerance):
        return revert(state, f"validation loss {val_loss} after best {state.best_val:.4f}: unstable", record,
                      optimizer_too=True)
    state.best_val = min(state.best_val, val_loss)
    if not settings.recheck or state.forward is None or state.inner is None:
        return None
    from ryzen_core.measure import paired_ratios

    comparison = paired_ratios(lambda: _time_forward_backward(state.inner, model, state.batch),
                               lambda: _time_forward_backward(state.forward, model, state.batch),
                               warmup=1, repeats=settings.recheck_rounds, higher_is_better=False)
    check = {"epoch": epoch, "speedup": comparison.median_ratio, "median_ratio": comparison.median_ratio,
             "ci_low": comparison.ci_low, "ci_high": comparison.ci_high, "verdict": comparison.verdict}
    state.rechecks.append(check)
    record("recheck", **check)
    state.slower_in_row = state.slower_in_row + 1 if comparison.verdict == "slower" else 0
    if state.slower_in_row >= settings.recheck_patience:
        return revert(state, f"re-checks at {state.slower_in_row} evaluations in a row found the chosen forward slower, "
                             f"last {format_ratio(comparison)} the plain one", record, optimizer_too=False)
    return None


@hookimpl
def on_train_end(model, settings, config, record):
    if settings_or_default(settings).denormals == "flush":  # runs after this one (the next variant) start as usual
        record("denormals", **set_flush_denormal_all_threads(False))
    state = STATES.get(model)
    if state is None:
        return None
    text = decision_markdown(state.decision, state.source, state)
    confirmation = state.decision.get("confirmation") or {}
    if hasattr(model, "flops_per_token") and confirmation.get("tokens_per_s_candidate"):
        text += "\n" + utilization_line(confirmation["tokens_per_s_candidate"] * model.flops_per_token(), config,
                                        record)
    return {"report_markdown": text}


@hookimpl
def on_infer(generate, model, config, settings, record):
    from .inference import build_path, tune_inference

    settings = settings_or_default(settings)
    if settings.inference == "fp32":
        return None
    if settings.inference == "auto":
        candidates = ["int8"] + (["bf16"] if cpu_features(mask=settings.mask_features).native_bf16 else [])
        result = tune_inference(model, candidates, settings, vocab_size_of(model), log.info)
        record("inference", **result)
        chosen = result["chosen"]
    else:
        chosen = settings.inference
        record("inference", chosen=chosen, trials=[], note="set in config")
    if chosen == "fp32":
        return None
    path = build_path(chosen, model)

    # Generation runs on the chosen path's model, so a plugin that wraps generation should come after kernel.
    def kernel_generate(input_ids, max_new_tokens, **sampling):
        return path.generate(input_ids, max_new_tokens, **sampling)

    kernel_generate.logits = path.logits  # the validator's perplexity is measured on what generates
    return kernel_generate


def utilization_line(achieved: float, config, record) -> str:
    """The chosen path's FLOP/s against the matmul rates measured on this machine and the computed peaks."""
    from ryzen_core import peak_flops
    from ryzen_core.hardware_limits import GEMM_SIZE, gemm_rates, utilization

    peak, measured = peak_flops(), gemm_rates(config.data.cache_dir)
    figures = utilization(achieved, peak, measured)
    record("utilization", **figures, peak=peak, measured_gemm=measured)
    parts = [f"{figures[f'of_measured_{d}_gemm']:.1%} of the measured {d} matmul rate "
             f"({measured[d]['flops'] / 1e9:.0f} GFLOP/s, {GEMM_SIZE}x{GEMM_SIZE} on {measured['threads']} threads)"
             for d in ("fp32", "bf16") if measured.get(d)]
    parts += [f"{figures['of_computed_bf16_peak']:.1%} of the computed bf16 peak ({peak['bf16_flops'] / 1e9:.0f} "
              f"GFLOP/s, {peak['bf16_unit']})",
              f"{figures['of_computed_fp32_peak']:.1%} of the computed fp32 peak ({peak['fp32_flops'] / 1e9:.0f} GFLOP/s)"]
    return f"- model FLOPs utilization of the chosen path: {achieved / 1e9:.1f} GFLOP/s, " + ", ".join(parts)


def decision_markdown(decision: dict[str, Any], source: str, state: KernelState | None = None) -> str:
    from ryzen_core.report import markdown_table

    origin = {"measured": "measured in this run",
              "cache": f"reused from the cache: the trials below were measured {decision.get('created')} "
                       "(`kernel.retune=true` measures again)",
              "settings": "taken from settings without measuring"}[source]
    lines = [f"Chosen training path: **{decision['chosen_description']}**, {origin}."]
    warning = busy_warning(decision.get("conditions"))
    lines += ["", warning] if warning else []
    rows = []
    for t in decision.get("trials") or []:
        if t.get("error"):
            rows.append([f"{t['knob']}={t['value']}", "-", "-", "-", "-", f"failed: {t['error']}"])
            continue
        s = t["speedup"]
        rows.append([f"{t['knob']}={t['value']}", t["tokens_per_s_baseline"], t["tokens_per_s_candidate"],
                     format_ratio(s), f"{t['loss_relative_difference']:.2%}",
                     ("kept" if t["accepted"] else "not kept") + f" ({s['verdict']}{'' if t['sound'] else ', not sound'})"])
    if rows:
        lines += ["", markdown_table(["candidate", "tokens/s before", "tokens/s with", "speedup [95% interval]",
                                      "loss vs fp32", "decision"], rows)]
    c = decision.get("confirmation")
    if c and not c.get("error"):
        s = c["speedup"]
        when = "this run" if source == "measured" or c.get("measured") else decision.get("created")
        lines += ["", f"Chosen vs fp32 eager reference, paired, measured {when}: **{format_ratio(s)}** "
                      f"({s['verdict']}), {c['tokens_per_s_baseline']:.0f} -> "
                      f"{c['tokens_per_s_candidate']:.0f} tokens/s over {s['n']} rounds."
                      + (f" Fell back to the reference: {c['fell_back']}." if c.get("fell_back") else "")]
    for knob, why in (decision.get("not_tried") or {}).items():
        lines.append(f"- {knob} not tuned: {why}")
    if state is not None:
        for check in state.rechecks:
            lines.append(f"- re-check at evaluation {check['epoch']}: {format_ratio(check)} {check['verdict']}")
        if state.reverted:
            lines.append(f"- **switched back to the reference path**: {state.reverted}")
    return "\n".join(lines)


@hookimpl
def register_commands(cli):
    import click

    from ryzen_core.cli import config_option, set_option

    @cli.group("kernel")
    def kernel_group():
        """CPU features and the kernel plugin's execution choices."""

    @kernel_group.command("info")
    @click.option("--json", "as_json", is_flag=True, help="Print JSON.")
    def info(as_json):
        """What this CPU can do, from the OS and from torch: its computed peak and measured matmul FLOP/s."""
        from ryzen_core import gemm_rates, peak_flops

        cpu, peak, measured = cpu_features(), peak_flops(), gemm_rates()
        if as_json:
            click.echo(json.dumps(dict(cpu.as_dict(), peak=peak, measured_gemm=measured), indent=2))
            return
        click.echo(f"CPU: {cpu.model}")
        click.echo(f"cores: {cpu.usable_cores} usable of {cpu.logical_cores} logical, "
                   f"{cpu.physical_cores or 'unknown'} physical")
        if cpu.caches:
            click.echo("caches: " + ", ".join(f"{k.removesuffix('_bytes')} {v // 1024} KiB" for k, v in cpu.caches.items()))
        click.echo("features: " + ", ".join(f"{k}={'yes' if v else 'no'}" for k, v in cpu.features.items()))
        click.echo(f"torch capability: {cpu.torch_capability}; oneDNN: {'yes' if cpu.mkldnn else 'no'}")
        click.echo(f"peak fp32: {peak['fp32_flops'] / 1e9:.0f} GFLOP/s; peak bf16: {peak['bf16_flops'] / 1e9:.0f} GFLOP/s "
                   f"({peak['bf16_unit']}); {peak['formula']}, {peak['fma_units_assumed']} FMA units per core assumed, "
                   f"{peak['clock_hz'] / 1e9:.2f} GHz")
        click.echo("measured matmul: " + ", ".join(f"{d} {measured[d]['flops'] / 1e9:.0f} GFLOP/s" for d in ("fp32", "bf16")
                                                   if measured.get(d)) + f" ({measured['method']})")

    @kernel_group.command("tune")
    @config_option
    @set_option
    @click.option("--retune", is_flag=True, help="Measure again even if a decision is cached.")
    @click.option("--json", "as_json", is_flag=True, help="Print the decision as JSON.")
    @click.pass_context
    def tune(ctx, config_path, overrides, retune, as_json):
        """Time the execution choices on the configured model and batch shape; cache the decision."""
        from ryzen_core.models.build import build_model
        from ryzen_core.run import load_data, prepare

        host = ctx.find_root().obj["host"]
        config = prepare(host, config_path, overrides, ["kernel"])
        settings = settings_or_default(host.settings.get("kernel"))
        if retune:
            settings = settings.model_copy(update={"retune": True})
        data = load_data(config)
        torch.manual_seed(config.train.seed)
        model = build_model(config.model, data.tokenizer.vocab_size)
        decision, source = decide(model, config, settings, cpu_features(mask=settings.mask_features), log_line=click.echo)
        click.echo(json.dumps(decision, indent=2, default=str) if as_json else decision_markdown(decision, source))
