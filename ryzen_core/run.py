"""The jobs behind `ryzen train` and `ryzen run`: config and plugins ready, data, training,
evaluation and the files a run directory holds."""
from __future__ import annotations

import json
import logging
import os
import re
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Sequence

from .checkpoint import CONFIG_FILE, atomic_write_text
from .config import RunConfig, check_model_fits_data, load_config, resolve_plugin_settings
from .plugins import PluginHost
from .report import environment, markdown_table, plot_loss_curves, write_json

log = logging.getLogger(__name__)


def prepare(host: PluginHost, config_path: Path | None, overrides: Sequence[str], plugins: Sequence[str] | None,
            out_dir: Path | None = None) -> RunConfig:
    """Validate everything before any work: config, the selected plugins, and their settings."""
    config = load_config(config_path, overrides, plugins)
    missing = [n for n in config.plugins if n not in host.records]
    if missing:
        host.load_installed(missing)
    host.require(config.plugins)
    host.settings = resolve_plugin_settings(config, host.settings_models())
    check_model_fits_data(config)
    if out_dir is not None:
        config.output.dir = out_dir
    return config


def config_schema(host: PluginHost) -> dict[str, Any]:
    schema = RunConfig.model_json_schema(by_alias=True)
    for name, model in host.settings_models().items():
        schema.setdefault("properties", {})[name] = model.model_json_schema()
    return schema


def run_directory(config: RunConfig) -> Path:
    if config.output.dir is None:
        config.output.dir = Path("runs") / datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    path = Path(config.output.dir)
    path.mkdir(parents=True, exist_ok=True)
    return path


def load_data(config: RunConfig):
    from .data import prepare_data

    d = config.data
    tokenizer_dir = config.model.hf_path if config.model.source == "hf" and config.model.hf_path else None
    return prepare_data(d.source, d.vocab_size, d.seq_len, d.cache_dir, text_field=d.text_field,
                        max_documents=d.max_documents, tokenizer_dir=tokenizer_dir)


def _init_distributed() -> None:
    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        dist.init_process_group("gloo")


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
                       label: str, resume: bool = False):
    """Train one model, then measure its test perplexity with the same fp32 yardstick as validation."""
    from .trainer import Trainer

    trainer = Trainer(config, host, plugins, run_dir, data, label=label)
    result = trainer.fit(resume=resume)
    test_loss = trainer.evaluate(data.test, max_batches=config.validate_.perplexity_batches)
    summary = dict(result.summary(), test_loss=test_loss, test_perplexity=float(min(2.0 ** 64, _exp(test_loss))),
                   unigram_perplexity=data.unigram_perplexity, tokens_per_step=trainer.tokens_per_step,
                   flops_per_token=getattr(result.model, "flops_per_token", lambda: None)())
    return trainer, result, summary


def _exp(x: float) -> float:
    import math

    return math.exp(min(x, 60.0))


def _write_training_files(run_dir: Path, runs: dict[str, Any], summaries: dict[str, dict], data) -> None:
    write_json(run_dir / "training_metrics_report.json", {
        "units": {"loss": "nats/token", "tokens_per_s": "input tokens per second of wall time, whole global batch",
                  "peak_rss_mb": "MiB, process peak resident set (getrusage)", "wall_s": "seconds of training steps"},
        "data": {"split_sizes": data.split_sizes, "unigram_perplexity": data.unigram_perplexity},
        "runs": {label: {"summary": summaries[label], "evals": m.evals, "anomalies": m.anomalies,
                         "adaptations": m.adaptations} for label, m in runs.items()},
    })
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
    _init_distributed()
    run_dir = run_directory(config)
    if not resume or not (run_dir / CONFIG_FILE).exists():
        atomic_write_text(run_dir / CONFIG_FILE, json.dumps(config.dump(), indent=2, default=str))
    data = load_data(config)
    fit_hf_config_to_tokenizer(config, data, host, run_dir)
    trainer, result, summary = train_and_evaluate(config, host, config.plugins, run_dir, data, "train", resume)
    if trainer.rank == 0:
        host.call_each("on_train_end", host.active(config.plugins), model=result.model, metrics=summary,
                       run_dir=run_dir, config=config)
        _write_training_files(run_dir, {"train": result.metrics}, {"train": summary}, data)
        _save_model_artifacts(result.model, data, run_dir)
        write_json(run_dir / "optimization_analysis.json", optimization_analysis(host, config, {"train": summary}))
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
    return any(impl.plugin_name in plugins for hook in TRAINING_HOOKS
               for impl in getattr(host.pm.hook, hook).get_hookimpls())


def run_pipeline(config: RunConfig, host: PluginHost, ablate: bool = False) -> Path:
    """`ryzen run`: baseline and optimized training on the same data, seed and budget, then the comparison."""
    run_dir = run_directory(config)
    atomic_write_text(run_dir / CONFIG_FILE, json.dumps(config.dump(), indent=2, default=str))
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
    for label, plugins in variants.items():
        # on_epoch_end adapts settings in place; every variant starts from the configured values.
        host.settings = {n: s.model_copy(deep=True) if s is not None else None for n, s in initial_settings.items()}
        if plugins and not changes_training(host, plugins):
            # Same seed, data and forward as the baseline: training again would give the same weights.
            host.recorder("core", "run")("training_shared", variant=label, reason="no selected plugin changes training")
            results[label], summaries[label] = results["baseline"], dict(summaries["baseline"], shared_with="baseline")
            continue
        out = run_dir / label
        _, result, summary = train_and_evaluate(config, host, plugins, out, data, label)
        summary["adaptations"] = result.metrics.adaptations
        ended = host.call_each("on_train_end", host.active(plugins), model=result.model, metrics=summary,
                               run_dir=out, config=config)
        sections += [(plugin, label, r["report_markdown"]) for plugin, r in ended.items()
                     if isinstance(r, dict) and isinstance(r.get("report_markdown"), str)]
        _save_model_artifacts(result.model, data, out)
        summary["plugin_settings"] = {n: s.model_dump(mode="json") for n, s in host.settings.items()
                                      if n in plugins and s is not None}
        results[label], summaries[label] = result, summary
    trained = {k: r for k, r in results.items() if "shared_with" not in summaries[k]}
    _write_training_files(run_dir, {k: r.metrics for k, r in trained.items()}, summaries, data)
    validation = validate_variants(config, host, results, variants, data, run_dir)
    write_json(run_dir / "optimization_analysis.json", optimization_analysis(host, config, summaries))
    env = environment(host)
    write_json(run_dir / "environment.json", env)
    (run_dir / "report.md").write_text(training_report(config, summaries, host, env, validation, sections))
    return run_dir


def validate_variants(config: RunConfig, host: PluginHost, results: dict, variants: dict[str, list[str]], data,
                      run_dir: Path) -> dict[str, Any]:
    """Every trained variant and every export, measured in one interleaved session against torch eager."""
    from .backends import HFGenerateBackend, TorchBackend
    from .models import is_hf_model
    from .validator import plot_validation, validate

    baseline_model = results["baseline"].model
    backends: dict[str, Any] = {"torch": TorchBackend(baseline_model, "torch")}
    if is_hf_model(baseline_model):
        backends["hf-generate"] = HFGenerateBackend(baseline_model)
    for label, plugins in variants.items():
        if not plugins:
            continue
        plain = TorchBackend(results[label].model, label).plain_generate
        generate_fn = host.fold("on_infer", host.active(plugins), "generate", plain,
                                model=results[label].model, tokenizer=data.tokenizer, config=config)
        if generate_fn is not plain or results[label] is not results["baseline"]:
            backends[f"torch-{label}"] = TorchBackend(results[label].model, f"torch-{label}", generate_fn)
    final = "optimized" if "optimized" in variants else "baseline"
    exports = host.call_each("on_export", host.active(variants[final]), model=results[final].model,
                             tokenizer=data.tokenizer, export_dir=run_dir / "export", config=config)
    for plugin, result in exports.items():
        result = result or {}
        # A plugin may hand over live backends; otherwise any plugin may load the export from disk.
        live = result.pop("backends", None) or {}
        for name, path in (result.get("exports") or {}).items():
            backend = live.get(name) or host.pm.hook.load_backend(path=Path(path))
            if backend is None:
                host.disable(plugin, "load_backend", f"no plugin can load the export {path}")
            else:
                backends[name] = backend
    report = validate(backends, "torch", data.test, config.validate_, data.test,
                      perplexity_batch_size=config.train.batch_size)
    report["exports"] = exports
    write_json(run_dir / "inference_validation_report.json", report)
    plot_validation(report, run_dir / "inference_validation.png")
    return report


def training_report(config: RunConfig, summaries: dict[str, dict], host: PluginHost, env: dict,
                    validation: dict[str, Any] | None = None, sections: Sequence[tuple[str, str, str]] = ()) -> str:
    from .validator import validation_markdown

    rows = [[label, s["steps"], s["tokens"], s["median_tokens_per_s"], s["final_val_loss"], s["test_perplexity"],
             s["unigram_perplexity"], s["peak_rss_mb"], s.get("shared_with") and f"same as {s['shared_with']}"
             or s["stopped_because"]] for label, s in summaries.items()]
    lines = [
        f"# Ryzen run: plugins {', '.join(config.plugins) or 'none'}",
        "",
        f"Machine: {env['cpu']['model']}, {env['cpu']['usable_cores']} usable cores, torch {env['versions']['torch']}, "
        f"onnxruntime {env['versions']['onnxruntime']}. Every figure below was measured in this run.",
        "",
    ]
    if host.disabled:
        lines += ["## Plugins disabled during the run", ""]
        lines += [f"- **{name}**: {reason}" for name, reason in host.disabled.items()] + [""]
    lines += ["## Training", "",
              markdown_table(["run", "steps", "tokens", "median tokens/s", "val loss", "test ppl", "unigram ppl",
                              "peak RSS MiB", "stopped because"], rows),
              "", "![loss curves](loss_curves.png)", ""]
    if validation is not None:
        lines += [validation_markdown(validation), "",
                  "![inference](inference_validation.png)", ""]
    for plugin, variant, markdown in sections:
        # Plugins write paths relative to their variant's directory; report.md sits one level up.
        markdown = re.sub(r"(!\[[^\]]*\]\()(?![a-z]+:|/)", rf"\1{variant}/", markdown)
        lines += [f"## {plugin} ({variant})", "", markdown.strip(), ""]
    return "\n".join(lines)


def bench_inference(run_dir: Path, host: PluginHost, config: RunConfig) -> dict[str, Any]:
    """`ryzen bench infer`: validate the trained models and exports of an earlier run again, without training."""
    from .backends import HFGenerateBackend, TorchBackend
    from .checkpoint import latest_checkpoint, load_weights
    from .errors import CheckpointError
    from .models import is_hf_model
    from .models.build import build_model
    from .validator import validate

    data = load_data(config)
    backends: dict[str, Any] = {}
    variants = [d for d in sorted(run_dir.iterdir()) if latest_checkpoint(d) is not None] if run_dir.is_dir() else []
    if latest_checkpoint(run_dir) is not None:
        variants = [run_dir]
    if not variants:
        raise CheckpointError(f"{run_dir} holds no trained model (no training_checkpoint/LATEST)")
    for variant in variants:
        model = build_model(config.model, data.tokenizer.vocab_size)
        load_weights(model, latest_checkpoint(variant))
        name = "torch" if not backends else f"torch-{variant.name}"
        # Variants are named after their plugins (see run_pipeline): apply their on_infer as the run did.
        plugins = [] if name == "torch" else ([variant.name.removeprefix("only-")] if variant.name.startswith("only-")
                                              else config.plugins)
        plain = TorchBackend(model, name).plain_generate
        generate_fn = host.fold("on_infer", host.active(plugins), "generate", plain, model=model,
                                tokenizer=data.tokenizer, config=config)
        backends[name] = TorchBackend(model, name, generate_fn if generate_fn is not plain else None)
        if name == "torch" and is_hf_model(model):
            backends["hf-generate"] = HFGenerateBackend(model)
    for export in sorted((run_dir / "export").glob("*")) if (run_dir / "export").is_dir() else []:
        backend = host.pm.hook.load_backend(path=export)
        if backend is not None:
            backends[backend.name] = backend
    return validate(backends, "torch", data.test, config.validate_, data.test,
                    perplexity_batch_size=config.train.batch_size)
