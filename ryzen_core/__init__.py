"""Ryzen core: the hook surface, plugin host, config, trainer and validator.

This is the public API plugins may import. Heavy modules (torch, transformers) load
on first use, so `from ryzen_core import hookimpl` stays cheap.
"""
from importlib import import_module

from .errors import CheckpointError, ConfigError, PluginError, RyzenError, TrainingError
from .hookspecs import hookimpl, hookspec

__version__ = "0.1.0"

_LAZY = {
    "RunConfig": "config", "load_config": "config",
    "PluginHost": "plugins", "load_plugins": "plugins", "create_plugin_manager": "plugins",
    "ForwardOutput": "forward", "reference_forward": "forward",
    "Transformer": "models", "TransformerConfig": "models", "PRESETS": "models",
    "generate": "models", "sample_next": "models", "lm_logits": "models", "last_hidden": "models",
    "model_outputs": "models", "is_hf_model": "models",
    "build_model": "models.build",
    "prepare_data": "data", "Tokenizer": "data", "DataError": "data",
    "Trainer": "trainer", "TrainResult": "trainer",
    "validate": "validator",
    "paired_ratios": "measure", "compare_pairs": "measure", "PairedComparison": "measure", "summarize": "measure",
    "format_ratio": "measure", "measure_until_narrow": "measure", "median_interval": "measure",
    "gemm_rates": "hardware_limits", "read_bandwidth_gbs": "hardware_limits",
    "cpu_features": "hardware", "native_bf16": "hardware", "peak_flops": "hardware", "CpuFeatures": "hardware",
    "Backend": "backends", "TorchBackend": "backends",
}
_MODULES = ("hardware",)  # public as a whole: `from ryzen_core import hardware`

__all__ = ["__version__", "hookimpl", "hookspec", "RyzenError", "ConfigError", "PluginError",
           "CheckpointError", "TrainingError", *_LAZY, *_MODULES]


def __getattr__(name):
    if name in _LAZY:
        return getattr(import_module(f".{_LAZY[name]}", __name__), name)
    if name in _MODULES:
        return import_module(f".{name}", __name__)
    raise AttributeError(f"module 'ryzen_core' has no attribute {name!r}")
