"""The jobs behind `ryzen train` and `ryzen run`: config and plugins ready, data, training,
evaluation and the files a run directory holds."""
from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import Any, Sequence

from .checkpoint import atomic_write_text
from .config import RunConfig, check_model_fits_data, load_config, resolve_plugin_settings
from .context import BaselineHandle, RunContext
from .errors import writing
from .plugins import PluginHost
from .report import environment, plot_loss_curves, write_json
from .rundir import claim_run_directory, run_directory  # noqa: F401  (run_directory: plugins use it from here)

log = logging.getLogger(__name__)


def prepare(host: PluginHost, config_path: Path | None, overrides: Sequence[str], plugins: Sequence[str] | None,
            out_dir: Path | None = None) -> RunConfig:
    """Validate everything before any work: config, the selected plugins, and their settings."""
    config = load_config(config_path, overrides, plugins)
    missing = [n for n in config.plugins if n not in host.records]
    if missing:
        host.load_installed(missing)
    models = host.settings_models()  # before `require`: a selected plugin whose ryzen_settings raises fails there
    host.require(config.plugins)
    host.settings = resolve_plugin_settings(config, models)
    host.hook_timeout_s = config.train.hook_timeout_s
    check_model_fits_data(config)
    if out_dir is not None:
        config.output.dir = out_dir
    return config


def config_schema(host: PluginHost) -> dict[str, Any]:
    schema = RunConfig.model_json_schema(by_alias=True)
    for name, model in host.settings_models().items():
        schema.setdefault("properties", {})[name] = model.model_json_schema()
    return schema


def load_data(config: RunConfig):
    from .data import prepare_data

    d = config.data
    tokenizer_dir = config.model.hf_path if config.model.source == "hf" and config.model.hf_path else None
    return prepare_data(d.source, d.vocab_size, d.seq_len, d.cache_dir, text_field=d.text_field,
                        max_documents=d.max_documents, tokenizer_dir=tokenizer_dir)


def _init_distributed() -> None:
    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        _exit_with_launcher()
        dist.init_process_group("gloo")
        _log_from_rank_zero(dist.get_rank())


def _exit_with_launcher() -> None:
    """A worker of `ryzen train --nproc` ends when its launcher dies, even by SIGKILL (Linux's parent-death
    signal), instead of training on and writing into the run directory unsupervised."""
    import ctypes
    import signal

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(1, int(signal.SIGTERM), 0, 0, 0) != 0:  # 1 = PR_SET_PDEATHSIG
            return
    except (OSError, AttributeError):  # not Linux: nothing to set
        return
    if os.getppid() == 1:  # the launcher died before the signal was armed
        os._exit(1)


def _log_from_rank_zero(rank: int) -> None:
    """Every rank runs the same code, so only rank 0 logs; other ranks keep their warnings, prefixed."""
    if rank == 0:
        return
    for handler in logging.getLogger().handlers:
        handler.addFilter(lambda record: record.levelno >= logging.WARNING)
        handler.setFormatter(logging.Formatter(f"%(asctime)s [rank {rank}] %(name)s: %(message)s", "%H:%M:%S"))


def launch_distributed(nproc: int, config: RunConfig, argv: list[str]) -> int:
    """Re-run this `ryzen train` command under torchrun with `nproc` local processes."""
    from torch.distributed.run import main as torchrun

    args, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a in ("--nproc", "--out"):
            skip = True
        elif not a.startswith(("--nproc=", "--out=")):
            args.append(a)
    # Every rank must agree on one run directory, so it is fixed here rather than per process.
    run_dir = run_directory(config)
    try:
        torchrun(["--standalone", f"--nproc-per-node={nproc}", "-m", "ryzen_core.cli", *args, "--out", str(run_dir)])
    except Exception as exc:  # torchrun has already printed each worker's failure
        from .errors import TrainingError

        raise TrainingError(f"distributed training failed ({type(exc).__name__}); see the worker output above") from None
    return 0


def train_and_evaluate(config: RunConfig, host: PluginHost, plugins: Sequence[str], run_dir: Path, data,
                       label: str, resume: bool = False, context: RunContext | None = None):
    """Train one model, then measure its test perplexity with the same fp32 yardstick as validation."""
    from .trainer import Trainer

    trainer = Trainer(config, host, plugins, run_dir, data, label=label, context=context)
    result = trainer.fit(resume=resume)
    batches = trainer.batch_losses(data.test, max_batches=config.validate_.perplexity_batches,
                                   desc=f"{label} test perplexity")
    test_loss = sum(loss * rows for loss, rows in batches) / sum(rows for _, rows in batches)
    summary = dict(result.summary(), test_loss=test_loss, test_perplexity=float(min(2.0 ** 64, _exp(test_loss))),
                   test_batch_losses=[loss for loss, _ in batches],
                   unigram_perplexity=data.unigram_perplexity, tokens_per_step=trainer.tokens_per_step,
                   flops_per_token=getattr(result.model, "flops_per_token", lambda: None)())
    return trainer, result, summary


def _exp(x: float) -> float:
    import math

    return math.exp(min(x, 60.0))


PEAK_RSS_UNITS = ("MiB, peak resident set. `ryzen run`: per variant, the process's high-water mark (VmHWM) reset "
                  "when that variant's training starts (peak_rss_scope 'variant'), so it includes what the process "
                  "already held (rss_at_start_mb); `ryzen train`: the process peak (getrusage)")


def _write_training_files(run_dir: Path, runs: dict[str, Any], summaries: dict[str, dict], data) -> None:
    write_json(run_dir / "training_metrics_report.json", {
        "units": {"loss": "nats/token", "tokens_per_s": "input tokens per second of wall time, whole global batch",
                  "peak_rss_mb": PEAK_RSS_UNITS, "wall_s": "seconds of training steps"},
        "data": {"split_sizes": data.split_sizes, "unigram_perplexity": data.unigram_perplexity},
        "runs": {label: {"summary": summaries[label], "evals": m.evals, "anomalies": m.anomalies,
                         "adaptations": m.adaptations} for label, m in runs.items()},
    })
    with writing(run_dir):  # a full disk: one line naming the file
        for label, m in runs.items():
            m.write_csv(run_dir / (f"metrics_{label}.csv" if len(runs) > 1 else "metrics.csv"))
        plot_loss_curves(runs, run_dir / "loss_curves.png")


def special_token_ids(tokenizer) -> dict[str, int | None]:
    """What the saved tokenizer declares (tokenizer_config.json names only its end-of-text token)."""
    return {"bos_token_id": None, "eos_token_id": tokenizer.eos_id, "pad_token_id": None}


def fit_hf_config_to_tokenizer(config: RunConfig, data, host: PluginHost, run_dir: Path) -> None:
    """Log, record and keep in the run's config every value of the user's HF config that the tokenizer
    overrides (the vocabulary size of a fresh model, the special token ids)."""
    if config.model.source != "hf":
        return
    import json

    from .checkpoint import CONFIG_FILE
    from .models.hf import hf_config, overrides_to_fit

    m = config.model
    wanted = special_token_ids(data.tokenizer)
    if m.hf_config is not None:  # a fresh model is sized for the tokenizer; a saved one keeps its size
        wanted["vocab_size"] = data.tokenizer.vocab_size
    overrides = overrides_to_fit(hf_config(m.hf_path or m.hf_config), wanted)
    for key, (given, used) in overrides.items():
        log.info("model: the HF config's %s %s is replaced by %s to fit the tokenizer", key, given, used)
        host.recorder("core", "model")("hf_config_override", key=key, given=given, used=used)
    if overrides != m.hf_overrides:
        m.hf_overrides = overrides
        atomic_write_text(run_dir / CONFIG_FILE, json.dumps(config.dump(), indent=2, default=str))


def _save_model_artifacts(model, data, out: Path) -> None:
    from .models import is_hf_model

    with writing(out):
        data.tokenizer.save(out / "tokenizer")
        if is_hf_model(model):
            from .models import save_hf_model
            from .models.hf import set_special_token_ids

            # transformers' generate() stops at the config's eos: it must be the saved tokenizer's.
            set_special_token_ids(model, special_token_ids(data.tokenizer))
            save_hf_model(model, out / "hf_model")
            data.tokenizer.save(out / "hf_model")  # self-contained: reloadable with model.hf_path


def train_one(config: RunConfig, host: PluginHost, resume: bool = False) -> Path:
    """`ryzen train`: one model with the selected plugins."""
    import torch.distributed as dist

    _init_distributed()
    rank = dist.get_rank() if dist.is_initialized() else 0
    # Rank 0 claims the directory (lock, config check); the other ranks of a distributed run write with it.
    run_dir = claim_run_directory(config, resume) if rank == 0 else run_directory(config)
    data = load_data(config)
    fit_hf_config_to_tokenizer(config, data, host, run_dir)
    trainer, result, summary = train_and_evaluate(config, host, config.plugins, run_dir, data, "train", resume)
    if trainer.rank == 0:
        ended = host.call_each("on_train_end", host.active(config.plugins), model=result.model, metrics=summary,
                               run_dir=run_dir, config=config, context=trainer.context)
        _write_training_files(run_dir, {"train": result.metrics}, {"train": summary}, data)
        _save_model_artifacts(result.model, data, run_dir)
        write_json(run_dir / "optimization_analysis.json", optimization_analysis(host, config, {"train": summary}))
        env = environment(host)
        write_json(run_dir / "environment.json", env)
        # Plugins' sections go in as written: their image paths are relative to run_dir, where report.md is.
        report = training_report(config, {"train": summary}, host, env) + "".join(
            f"\n## {plugin}\n\n{section.markdown.strip()}\n" for plugin, section in ended.items() if section)
        atomic_write_text(run_dir / "report.md", report)
    log.info("train: test perplexity %.2f (unigram baseline %.2f)", summary["test_perplexity"], data.unigram_perplexity)
    return run_dir


def optimization_analysis(host: PluginHost, config: RunConfig, summaries: dict[str, dict]) -> dict[str, Any]:
    final = summaries.get("optimized", summaries.get("train", {}))
    current = {n: s.model_dump(mode="json") for n, s in host.settings.items() if n in config.plugins and s is not None}
    return {
        "plugins": config.plugins,
        "settings": final.get("plugin_settings") or current,
        "settings_by_variant": {label: s["plugin_settings"] for label, s in summaries.items() if "plugin_settings" in s},
        "disabled": host.disabled,
        "events": [e.__dict__ for e in host.events],
        "adaptations": {label: s.get("adaptations") for label, s in summaries.items() if s.get("adaptations")},
    }


TRAINING_HOOKS = ("on_model_load", "transform_forward", "on_train_start", "on_train_batch_end", "on_epoch_end",
                  "on_train_finalize")


def changes_training(host: PluginHost, plugins: Sequence[str]) -> bool:
    return any(host.implements(hook, name) for hook in TRAINING_HOOKS for name in plugins)


def _baseline_handle(results: dict, summaries: dict) -> BaselineHandle | None:
    from .checkpoint import latest_checkpoint

    if "baseline" not in results:
        return None
    result = results["baseline"]
    return BaselineHandle(result.model, latest_checkpoint(result.run_dir), summaries["baseline"])


class _TrainingPeak:
    """One variant's peak memory: the process's high-water mark, reset when its training starts.

    It still counts what the process holds already (data, earlier variants' models), so the RSS at
    the start is reported beside it. Where the mark cannot be reset it stays the process-wide peak.
    """

    def __init__(self):
        from .generation_timing import current_rss_mib, reset_process_peak_rss

        self.rss_at_start_mb, self.reset = current_rss_mib(), reset_process_peak_rss()

    def read(self) -> dict[str, Any]:
        from .generation_timing import process_peak_rss_mib

        if not self.reset:
            return {"rss_at_start_mb": self.rss_at_start_mb, "peak_rss_scope": "process (could not be reset)"}
        return {"peak_rss_mb": process_peak_rss_mib(), "rss_at_start_mb": self.rss_at_start_mb,
                "peak_rss_scope": "variant"}


def run_pipeline(config: RunConfig, host: PluginHost, ablate: bool = False) -> Path:
    """`ryzen run`: baseline and optimized training on the same data, seed and budget, then the comparison."""
    run_dir = claim_run_directory(config)
    data = load_data(config)
    fit_hf_config_to_tokenizer(config, data, host, run_dir)
    variants: dict[str, list[str]] = {"baseline": []}
    if config.plugins:
        variants["optimized"] = list(config.plugins)
        if ablate and len(config.plugins) > 1:
            variants.update({f"only-{p}": [p] for p in config.plugins})
    results, summaries = {}, {}
    sections: list[tuple[str, str, str]] = []  # (plugin, variant, markdown) that plugins add to report.md
    initial_settings = dict(host.settings)
    label = "baseline"
    try:
        for label, plugins in variants.items():
            # on_epoch_end adapts settings in place; every variant starts from the configured values.
            host.settings = {n: s.model_copy(deep=True) if s is not None else None for n, s in initial_settings.items()}
            out = run_dir / label
            context = RunContext(config, data, run_dir, out, label, list(plugins), _baseline_handle(results, summaries),
                                 recorder=host.recorder)
            if plugins and not changes_training(host, plugins):
                # Same seed, data and forward as the baseline: training again would give the same weights.
                host.begin_variant(context, plugins)  # its plugins still infer and export
                host.recorder("core", "run")("training_shared", variant=label, reason="no selected plugin changes training")
                results[label], summaries[label] = results["baseline"], dict(summaries["baseline"], shared_with="baseline")
                continue
            peak = _TrainingPeak()
            _, result, summary = train_and_evaluate(config, host, plugins, out, data, label, context=context)
            summary.update(peak.read())
            summary["adaptations"] = result.metrics.adaptations
            ended = host.call_each("on_train_end", host.active(plugins), model=result.model, metrics=summary,
                                   run_dir=out, config=config, context=context)
            sections += [(plugin, label, section.markdown) for plugin, section in ended.items() if section]
            _save_model_artifacts(result.model, data, out)
            summary["plugin_settings"] = {n: s.model_dump(mode="json") for n, s in host.settings.items()
                                          if n in plugins and s is not None}
            results[label], summaries[label] = result, summary
    except KeyboardInterrupt:
        _write_what_finished(config, host, run_dir, results, summaries, data, label)
        raise
    trained = {k: r for k, r in results.items() if "shared_with" not in summaries[k]}
    _write_training_files(run_dir, {k: r.metrics for k, r in trained.items()}, summaries, data)
    validation = validate_variants(config, host, results, variants, data, run_dir)
    host.use_variant(None)
    write_json(run_dir / "optimization_analysis.json", optimization_analysis(host, config, summaries))
    env = environment(host)
    write_json(run_dir / "environment.json", env)
    atomic_write_text(run_dir / "report.md", training_report(config, summaries, host, env, validation, sections))
    return run_dir


def _write_what_finished(config: RunConfig, host: PluginHost, run_dir: Path, results: dict, summaries: dict,
                         data, interrupted: str) -> None:
    """Ctrl-C during training: the finished variants' files and a report saying what is missing."""
    trained = {k: r for k, r in results.items() if "shared_with" not in summaries[k]}
    if not trained:
        return
    _write_training_files(run_dir, {k: r.metrics for k, r in trained.items()}, summaries, data)
    write_json(run_dir / "optimization_analysis.json", optimization_analysis(host, config, summaries))
    env = environment(host)
    write_json(run_dir / "environment.json", env)
    note = (f"**Interrupted while training `{interrupted}`**: the variants below finished; `{interrupted}` has "
            "a checkpoint of its last step, and nothing was validated.\n\n")
    atomic_write_text(run_dir / "report.md", note + training_report(config, summaries, host, env))
    log.warning("run: interrupted; report.md covers the finished variants (%s)", ", ".join(trained))


def validate_variants(config: RunConfig, host: PluginHost, results: dict, variants: dict[str, list[str]], data,
                      run_dir: Path) -> dict[str, Any]:
    """Every trained variant and every export, measured in one interleaved session against torch eager."""
    import tempfile

    from .runtime_table import plot_runtime
    from .validator import plot_validation
    from .workers import Variant, export_entry, plan_variants

    final = "optimized" if "optimized" in variants else "baseline"
    if host.active(variants[final]):  # exports take tens of seconds: say what is going on
        log.info("export: on_export of %s into %s", ", ".join(host.active(variants[final])), run_dir / "export")
    host.use_variant(final)
    exports = host.call_each("on_export", host.active(variants[final]), model=results[final].model,
                             tokenizer=data.tokenizer, export_dir=run_dir / "export", config=config,
                             context=host.contexts.get(final))
    with tempfile.TemporaryDirectory(prefix="ryzen-validate-") as workdir:
        plan = plan_variants([Variant(label, results[label].model, plugins) for label, plugins in variants.items()],
                             host, config, data.tokenizer, Path(workdir))
        for plugin, result in exports.items():
            if result is None:
                continue
            # A plugin may hand over live backends (used inline); a worker loads the export from disk itself.
            live = result.backends
            for name, path in result.exports.items():
                entry = export_entry(host, name, Path(path), live.get(name), config.validate_.isolation)
                if entry is None:
                    host.disable(plugin, "load_backend", f"no plugin can load the export {path}")
                else:
                    plan.backends[name], plan.fidelity_reference[name] = entry, plan.own_fp32[final]
        report = _validate_plan(plan, host, config, data)
    report["exports"] = {plugin: result.report() for plugin, result in exports.items() if result is not None}
    write_json(run_dir / "inference_validation_report.json", report)
    plot_validation(report, run_dir / "inference_validation.png")
    plot_runtime(report["runtime_table"], run_dir / "runtime_tradeoff.png")
    return report


def _validate_plan(plan, host: PluginHost, config: RunConfig, data) -> dict[str, Any]:
    """Run the validation; what plugins recorded inside worker processes joins this run's events."""
    from .plugins import Event
    from .runtime_table import runtime_table
    from .validator import validate

    report = validate(plan.backends, "torch", data.test, config.validate_, data.test,
                      perplexity_batch_size=config.train.batch_size, fidelity_reference=plan.fidelity_reference,
                      reference_backends=plan.references)
    records = [(w["plugin_events"], w["plugin_disabled"]) for w in report["workers"].values()]
    for events, disabled in records + [(w["events"], w["disabled"]) for w in plan.dropped_workers]:
        host.events += [Event(**event) for event in events]
        host.disabled.update(disabled)
    report["runtime_table"] = runtime_table(report, {name: w.get("facts", {}) for name, w in report["workers"].items()})
    return report


def training_report(config: RunConfig, summaries: dict[str, dict], host: PluginHost, env: dict,
                    validation: dict[str, Any] | None = None, sections: Sequence[tuple[str, str, str]] = ()) -> str:
    from .report import events_markdown, quality_table, training_table
    from .runtime_table import runtime_markdown
    from .validator import validation_markdown

    lines = [
        f"# Ryzen run: plugins {', '.join(config.plugins) or 'none'}",
        "",
        f"Machine: {env['cpu']['model']}, {env['cpu']['usable_cores']} usable cores, torch {env['versions']['torch']}, "
        f"onnxruntime {env['versions']['onnxruntime'] or 'not installed'}. Every figure below was measured in this run.",
        "",
    ]
    if host.disabled:
        lines += ["## Plugins disabled during the run", ""]
        lines += [f"- **{name}**: {reason}" for name, reason in host.disabled.items()] + [""]
    lines += ["## Training", "", training_table(summaries), "", "![loss curves](loss_curves.png)", ""]
    quality = quality_table(summaries)
    if quality:
        lines += ["## Quality against the baseline", "",
                  "Final validation loss (nats/token) and test perplexity, each variant minus the baseline; one "
                  "evaluation per model, so no interval.", "", quality, ""]
    if validation is not None:
        lines += [validation_markdown(validation), "",
                  "![inference](inference_validation.png)", ""]
        if validation.get("runtime_table"):
            lines += [runtime_markdown(validation["runtime_table"]), "", "![speed against quality](runtime_tradeoff.png)",
                      ""]
    for plugin, variant, markdown in sections:
        # Plugins write paths relative to their variant's directory; report.md sits one level up.
        markdown = re.sub(r"(!\[[^\]]*\]\()(?![a-z]+:|/)", rf"\1{variant}/", markdown)
        lines += [f"## {plugin} ({variant})", "", markdown.strip(), ""]
    events = events_markdown([e.__dict__ for e in host.events])
    if events:
        lines += ["## What each plugin recorded", "", "Every event is in `optimization_analysis.json`.", "",
                  events, ""]
    return "\n".join(lines)


def _plugins_by_variant(run_dir: Path) -> dict[str, list[str]]:
    """Which plugins each variant of a finished run was trained with, as its training report says."""
    import json

    try:
        runs = json.loads((run_dir / "training_metrics_report.json").read_text())["runs"]
        return {label: [str(p) for p in run["summary"]["plugins"]] for label, run in runs.items()}
    except (OSError, ValueError, KeyError, TypeError) as exc:
        log.warning("bench infer: cannot read the variants' plugins from training_metrics_report.json (%s); "
                    "measuring every variant without its plugins' on_infer", exc)
        return {}


def bench_inference(run_dir: Path, host: PluginHost, config: RunConfig) -> dict[str, Any]:
    """`ryzen bench infer`: validate the trained models and exports of an earlier run again, without training."""
    import tempfile

    from .checkpoint import latest_checkpoint, load_weights
    from .errors import CheckpointError
    from .models.build import build_model
    from .workers import ExportRecipe, Variant, export_entry, plan_variants, pinned_threads, start_worker

    data = load_data(config)
    directories = [d for d in sorted(run_dir.iterdir()) if latest_checkpoint(d) is not None] if run_dir.is_dir() else []
    if latest_checkpoint(run_dir) is not None:
        directories = [run_dir]
    if not directories:
        raise CheckpointError(f"{run_dir} holds no trained model (no training_checkpoint/LATEST)")
    variants, trained_with = [], _plugins_by_variant(run_dir)
    for directory in directories:
        model = build_model(config.model, data.tokenizer.vocab_size)
        load_weights(model, latest_checkpoint(directory))
        label = directory.name if directory != run_dir else "train"
        plugins = trained_with.get(label, [])  # apply their on_infer as the run did
        host.begin_variant(RunContext(config, data, run_dir, directory, label, plugins, recorder=host.recorder), plugins)
        variants.append(Variant(label, model, plugins, latest_checkpoint(directory)))
    if config.plugins and variants[0].label == "baseline" and all(v.label != "optimized" for v in variants):
        # Its plugins changed no training, so it shared the baseline's weights (run_pipeline): validate it so.
        host.begin_variant(RunContext(config, data, run_dir, run_dir / "optimized", "optimized", config.plugins,
                                      recorder=host.recorder), config.plugins)
        variants.append(Variant("optimized", variants[0].model, list(config.plugins), variants[0].weights))
    final = "optimized" if any(v.label == "optimized" for v in variants) else variants[0].label
    cfg = config.validate_
    with tempfile.TemporaryDirectory(prefix="ryzen-validate-") as workdir:
        plan = plan_variants(variants, host, config, data.tokenizer, Path(workdir))
        exports = sorted((run_dir / "export").iterdir()) if (run_dir / "export").is_dir() else []
        for export in (e for e in exports if e.is_dir() and not e.name.startswith(".")):  # hidden: a plugin's work
            entry = export_entry(host, None, export, None, cfg.isolation)
            if isinstance(entry, ExportRecipe):  # started now: its name is the one the loaded backend gives itself
                entry = start_worker(entry, cfg.isolation, pinned_threads(cfg), cfg.worker_timeout_s)
            if entry is not None:
                plan.backends[entry.name], plan.fidelity_reference[entry.name] = entry, plan.own_fp32[final]
        return _validate_plan(plan, host, config, data)
