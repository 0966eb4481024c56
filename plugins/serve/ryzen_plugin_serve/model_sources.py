"""What a server serves, as the validator would run it:

- `--backend torch` (the default): the run's trained model in torch, continuously batched.
- `--backend NAME` (or a directory): an export the run holds (`RUN_DIR/export/*`, e.g. the onnx plugin's
  `onnxruntime-fp32`), loaded by the first installed plugin whose `load_backend` recognises it.
- `--plugins A,B`: the torch model's generation folded through those plugins' `on_infer`, in that order,
  with the settings the run was trained with (its config.json), as `ryzen run` validates a variant.

The last two generate a whole request per call (a backend's `generate` is the unit the plugin API
offers), so they are served one request after another: see `WholeRequestRunner`.
"""
from __future__ import annotations

from pathlib import Path

from ryzen_core import ConfigError, PluginError


def export_backend(run_dir: Path, name: str):
    """(backend, the directory it came from) for `name`: a directory, or a backend name among the run's exports."""
    from ryzen_core import load_plugins

    host = load_plugins()
    loaders = [n for n in host.loaded_names() if host.implements("load_backend", n)]
    if not loaders:
        raise PluginError("no installed plugin implements load_backend, so only --backend torch can be served")
    given = Path(name)
    candidates = [given] if given.is_dir() else [d for d in sorted((run_dir / "export").glob("*")) if d.is_dir()]
    found = []
    for directory in candidates:
        backend = host.first("load_backend", loaders, path=directory)
        if backend is None:
            continue
        if given.is_dir() or backend.name == name:
            return backend, directory
        found.append(backend.name)
    if given.is_dir():
        raise ConfigError(f"none of the installed plugins ({', '.join(loaders)}) can load {given}")
    raise ConfigError(f"{run_dir} has no export named {name!r} under {run_dir / 'export'} "
                      f"(found: {', '.join(found) or 'none'}); give --backend torch or an export's name or directory")


def run_config_file(run_dir: Path) -> Path:
    found = next((d / "config.json" for d in (run_dir, run_dir.parent) if (d / "config.json").is_file()), None)
    if found is None:
        raise ConfigError(f"{run_dir} has no config.json to read its plugins' settings from")
    return found


def folded_backend(model, tokenizer, run_dir: Path, plugins: list[str], plugin_state: dict | None = None):
    """A TorchBackend whose generate is the plain KV-cache loop folded through `plugins`' on_infer, and the
    plugin host (what the plugins recorded is on `host.events`); `plugin_state`: the state_dicts the
    checkpoint saved, restored on the plugin instances as `--resume` and the validator's workers do."""
    from ryzen_core import RunContext, TorchBackend, load_config, load_plugins

    host = load_plugins(plugins, autoload=False)
    host.require(plugins)
    missing = [n for n in plugins if not host.implements("on_infer", n)]
    if missing:
        raise PluginError(f"plugin {missing[0]!r} has no on_infer: it changes nothing a server could serve")
    config = load_config(run_config_file(run_dir))
    models = host.settings_models()
    sections = config.plugin_sections
    host.settings = {n: models[n].model_validate(sections.get(n) or {}) for n in plugins if n in models}
    host.begin_variant(RunContext(config, None, run_dir, run_dir, "serve", list(plugins), recorder=host.recorder),
                       plugins)
    host.load_plugin_state({n: state for n, state in (plugin_state or {}).items() if n in plugins})
    plain = TorchBackend(model)
    generate = host.fold("on_infer", plugins, "generate", plain.plain_generate, model=model, tokenizer=tokenizer,
                         config=config, context=host.contexts["serve"])
    if host.disabled:
        name, reason = next(iter(host.disabled.items()))
        raise PluginError(f"plugin {name!r} failed: {reason}")
    return TorchBackend(model, "torch+" + "+".join(plugins), generate), host
