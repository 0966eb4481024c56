"""Ryzen core: the stated plugin API (version `API_VERSION`).

Everything a plugin may import is importable from `ryzen_core` itself, plus `ryzen_core.testing`
for tests; the modules that define these names are internal and may change. docs/plugins.md
documents each name; tests/test_import_contract.py keeps the bundled plugins to it.

Heavy modules (torch, transformers) load on first use, so `from ryzen_core import hookimpl`
stays cheap.
"""
from importlib import import_module

from .errors import CheckpointError, ConfigError, PluginError, RyzenError, TrainingError
from .hookspecs import hookimpl, hookspec
from .progress import progress  # eager: a lazy name equal to its module's name would be shadowed by the module

__version__ = "0.1.0"
API_VERSION = "1.1"
"""The plugin API's version: the minor part grows with additions, the major part on a breaking change."""

_LAZY = {
    # writing a plugin
    "Plugin": "plugin_class", "PluginSettings": "plugin_class",
    "RunContext": "context", "BaselineHandle": "context",
    "ExportResult": "results", "ReportSection": "results", "Adaptation": "results", "InferencePath": "results",
    "DataError": "data", "WriteError": "errors", "describe_error": "plugins", "json_value": "plugins",
    # the run: config, plugins, data, training
    "RunConfig": "config", "load_config": "config", "default_cache_dir": "config",
    "PluginHost": "plugins", "load_plugins": "plugins", "create_plugin_manager": "plugins",
    "prepare_data": "data", "load_data": "run", "PreparedData": "data", "Tokenizer": "data",
    "train_tokenizer": "data", "load_documents": "data", "split_documents": "data",
    "pack": "data", "unigram_perplexity": "data",  # to build a PreparedData of one's own token streams
    "Trainer": "trainer", "TrainResult": "trainer", "build_optimizer": "trainer",
    "Forward": "forward", "ForwardOutput": "forward", "reference_forward": "forward",
    "latest_checkpoint": "checkpoint", "load_weights": "checkpoint", "saved_plugin_state": "checkpoint",
    "load_trained_model": "trained", "trained_model_dirs": "trained", "run_directory": "rundir",
    # models and generation
    "Transformer": "models", "TransformerConfig": "models", "PRESETS": "models",
    "build_model": "models.build", "context_length": "models.build",
    "is_hf_model": "models", "load_hf_model": "models", "save_hf_model": "models",
    "hf_model_from_config": "models", "tiny_llama_config": "models",
    "generate": "models", "generate_no_cache": "models", "decode_loop": "models", "sample_next": "models", "filter_logits": "models",
    "lm_logits": "models", "last_hidden": "models", "model_outputs": "models", "hf_forward_with_cache": "models",
    # inference backends
    "Backend": "backends", "TorchBackend": "backends", "OnToken": "backends", "quality_class": "runtime_table",
    "validate": "validator", "time_generation": "generation_timing",
    # measuring: the paired interleaved comparison and its verdict
    "paired_ratios": "measure", "compare_pairs": "measure", "PairedComparison": "measure", "summarize": "measure",
    "format_ratio": "measure", "measure_until_narrow": "measure", "median_interval": "measure",
    "busy_warning": "measure", "conditions": "measure", "load_snapshot": "measure",
    # the machine: detected features and measured limits
    "cpu_features": "hardware", "native_bf16": "hardware", "peak_flops": "hardware", "CpuFeatures": "hardware",
    "gemm_rates": "hardware_limits", "read_bandwidth_gbs": "hardware_limits", "GEMM_SIZE": "hardware_limits",
    "utilization": "hardware_limits",
    # reports and progress
    "markdown_table": "report", "write_json": "report", "cpu_description": "hardware", "cpu_info": "hardware",
    "package_version": "report",
    # command line
    "config_option": "cli", "set_option": "cli", "plugins_option": "cli", "out_option": "cli",
    "with_run_config": "cli",
}
_MODULES = ("hardware", "measure")  # public as a whole: `from ryzen_core import hardware`

__all__ = ["__version__", "API_VERSION", "hookimpl", "hookspec", "progress", "RyzenError", "ConfigError", "PluginError",
           "CheckpointError", "TrainingError", *_LAZY, *_MODULES]


def __getattr__(name):
    if name in _LAZY:
        return getattr(import_module(f".{_LAZY[name]}", __name__), name)
    if name in _MODULES:
        return import_module(f".{name}", __name__)
    raise AttributeError(f"module 'ryzen_core' has no attribute {name!r}")
