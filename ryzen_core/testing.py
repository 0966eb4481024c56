"""Test kit for plugin authors (Plugin API v1): tiny configs, tiny runs, a recorder of hook calls.

Installed as a pytest plugin (entry point `pytest11`), so a plugin's tests get these fixtures
without reaching into Ryzen's own tests/:

- `ryzen_cache_dir`: one data cache for the session (the tiny tokenizer is trained once).
- `tiny_config`: a factory, `tiny_config(*overrides, plugins=[...])` -> a validated RunConfig.
- `tiny_host`: a factory, `tiny_host(name=plugin, ...)` -> a PluginHost with those plugins
  registered (modules, instances or Plugin classes), nothing installed needed.
- `tiny_train`: train one tiny model through the chosen plugins' hooks -> TrainResult.
- `tiny_run`: a whole `ryzen run` (baseline, optimized, validation, report) -> run directory.
- `hook_recorder`: a plugin that records every hook call it receives (name and arguments).
- `ryzen_cli`: run `ryzen ARGS` in a subprocess, as a user would -> CompletedProcess.
- `char_corpus`, `char_tokenizer` (a `CharTokenizer` over it), `one_torch_thread`: for tests of
  decoding that build their own tiny models.

Everything is small enough for CI on 2 cores: a tiny model, a dozen stdlib files, six steps.
Importing this module is cheap; torch loads when a fixture is used.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any, Sequence

import pytest

from .hookspecs import hookimpl

# A run small enough for CI: tiny model, a dozen stdlib files, a few steps.
TINY_OVERRIDES = (
    "model.preset=tiny", "data.max_documents=12", "data.vocab_size=300", "data.seq_len=32",
    "train.batch_size=4", "train.max_steps=6", "train.eval_every=3", "train.eval_batches=2",
    "train.checkpoint_every=3", "train.warmup_steps=2",
    "validate.prompt_len=8", "validate.new_tokens=4", "validate.batch_sizes=[1]", "validate.warmup=1",
    "validate.repeats=2", "validate.max_repeats=3", "validate.perplexity_batches=2",
)


def tiny_sets(*extra: str) -> list[str]:
    """`--set` arguments for a tiny run, plus `extra` overrides (later ones win)."""
    args = []
    for item in [*TINY_OVERRIDES, *extra]:
        args += ["--set", item]
    return args


def make_host(plugins: dict[str, object] | None = None, config=None):
    """A PluginHost with `plugins` (name -> module, instance or Plugin class) registered and, given a
    config, their settings resolved from it (a config error raises ConfigError, as the CLI would)."""
    from .config import resolve_plugin_settings
    from .plugins import PluginHost

    host = PluginHost()
    for name, plugin in (plugins or {}).items():
        host.register(plugin, name)
        if host.records[name].status != "loaded":
            raise AssertionError(f"plugin {name} did not register: {host.records[name].error}")
    if config is not None:
        host.settings = resolve_plugin_settings(config, host.settings_models())
        host.hook_timeout_s = config.train.hook_timeout_s
    return host


def installed_host(config, *names: str):
    """A PluginHost with the installed plugins `names` loaded from their entry points, as `ryzen run`
    loads them, so validation workers can load them too; settings resolved from `config`."""
    from .config import resolve_plugin_settings
    from .plugins import load_plugins

    host = load_plugins(list(names), autoload=False)
    for name in names:
        if name not in host.records or host.records[name].status != "loaded":
            raise AssertionError(f"plugin {name} is not installed and loaded: {host.records.get(name)}")
    host.settings = resolve_plugin_settings(config, host.settings_models())
    host.hook_timeout_s = config.train.hook_timeout_s
    return host


def make_config(cache_dir: Path, *overrides: str, plugins: Sequence[str] = (), out_dir: Path | None = None):
    """A validated tiny RunConfig with the data cache in `cache_dir`."""
    from .config import load_config

    config = load_config(None, [*TINY_OVERRIDES, f"data.cache_dir={cache_dir}", *overrides], list(plugins))
    if out_dir is not None:
        config.output.dir = Path(out_dir)
    return config


def train_tiny(host, config, run_dir: Path, plugins: Sequence[str] | None = None, label: str = "train"):
    """Train one tiny model through `plugins` (default: the config's) -> TrainResult."""
    from .run import load_data
    from .trainer import Trainer

    plugins = list(config.plugins if plugins is None else plugins)
    return Trainer(config, host, plugins, Path(run_dir), load_data(config), label=label).fit()


def run_tiny(host, config, ablate: bool = False) -> Path:
    """A whole `ryzen run` on `config` with `host`'s plugins -> the run directory."""
    from .run import run_pipeline

    return run_pipeline(config, host, ablate=ablate)


def train_run_tiny(host, config) -> Path:
    """A whole `ryzen train` on `config` -> its run directory (config.json, tokenizer/, checkpoints), as a user's."""
    from .run import train_one

    return train_one(config, host)


def briefly_trained_model(tokenizer, text: str, kind: str = "builtin", steps: int = 30, seq_len: int = 24,
                          seed: int = 0, **shape):
    """A tiny model sized to `tokenizer`, trained `steps` AdamW steps on random windows of `text`, in eval mode.

    `kind` "builtin": the "tiny" preset of the built-in Transformer (`shape` overrides its config);
    "llama": an HF Llama from `tiny_llama_config(vocab, **shape)`. Trained, its logits are peaked
    rather than near-uniform, so an export's or a quantized copy's top-1 agreement means something.
    """
    import torch

    from .models import Transformer, TransformerConfig, hf_model_from_config, lm_logits, tiny_llama_config

    torch.manual_seed(seed)
    if kind == "builtin":
        model = Transformer(TransformerConfig.from_preset("tiny", vocab_size=tokenizer.vocab_size, **shape))
    elif kind == "llama":
        model = hf_model_from_config(tiny_llama_config(tokenizer.vocab_size, **shape))
    else:
        raise ValueError(f"kind must be 'builtin' or 'llama', not {kind!r}")
    ids = torch.tensor(tokenizer.encode(text))
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(steps):
        starts = torch.randint(0, len(ids) - seq_len - 1, (8,), generator=generator)
        batch = torch.stack([ids[s:s + seq_len + 1] for s in starts])
        logits = lm_logits(model, batch[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


HOOKS = ("on_model_load", "transform_forward", "on_train_start", "on_train_batch_end", "on_epoch_end",
         "on_train_finalize", "on_train_end", "on_infer", "on_export")


class RecordedEvents:
    """A `record` callable for calling a hook by hand: `events` holds (event, data); `named(event)` the data."""

    def __init__(self):
        self.events: list[tuple[str, dict[str, Any]]] = []

    def __call__(self, event: str, **data: Any) -> None:
        self.events.append((event, data))

    def named(self, event: str) -> list[dict[str, Any]]:
        return [data for name, data in self.events if name == event]


class HookRecorder:
    """A plugin that changes nothing and writes down every call: `calls` holds (hook, arguments)."""

    def __init__(self):
        self.calls: list[tuple[str, dict[str, Any]]] = []

    def hooks(self) -> list[str]:
        return [hook for hook, _ in self.calls]

    def _note(self, hook: str, **kwargs) -> None:
        self.calls.append((hook, kwargs))

    @hookimpl
    def on_model_load(self, model, tokenizer, config, context):
        self._note("on_model_load", model=model, tokenizer=tokenizer, config=config, context=context)

    @hookimpl
    def transform_forward(self, forward, model, context):
        self._note("transform_forward", forward=forward, model=model, context=context)

    @hookimpl
    def on_train_start(self, model, optimizer, context):
        self._note("on_train_start", model=model, optimizer=optimizer, context=context)

    @hookimpl
    def on_train_batch_end(self, step, metrics, context):
        self._note("on_train_batch_end", step=step, metrics=metrics, context=context)

    @hookimpl
    def on_epoch_end(self, epoch, metrics, context):
        self._note("on_epoch_end", epoch=epoch, metrics=metrics, context=context)

    @hookimpl
    def on_train_finalize(self, model, context):
        self._note("on_train_finalize", model=model, context=context)

    @hookimpl
    def on_train_end(self, model, metrics, run_dir, context):
        self._note("on_train_end", model=model, metrics=metrics, run_dir=run_dir, context=context)

    @hookimpl
    def on_infer(self, generate, model, context):
        self._note("on_infer", generate=generate, model=model, context=context)

    @hookimpl
    def on_export(self, model, export_dir, context):
        self._note("on_export", model=model, export_dir=export_dir, context=context)


class CharTokenizer:
    """One token per distinct character of a text: a tokenizer for model tests that need no trained BPE."""

    def __init__(self, text: str):
        self.chars = sorted(set(text))
        self.index = {c: i for i, c in enumerate(self.chars)}
        self.vocab_size = len(self.chars)

    def encode(self, text: str) -> list[int]:
        return [self.index[c] for c in text]


# ----------------------------------------------------------------------------- pytest fixtures

@pytest.fixture(scope="session")
def char_corpus() -> str:
    """A fixed text with code in it: the source of the stdlib's textwrap module."""
    import inspect
    import textwrap

    return inspect.getsource(textwrap)


@pytest.fixture(scope="session")
def char_tokenizer(char_corpus) -> CharTokenizer:
    return CharTokenizer(char_corpus)


@pytest.fixture
def one_torch_thread():
    """Tiny models decode fastest on one thread; on a busy machine a second one spins and waits."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def ryzen_cache_dir(tmp_path_factory) -> Path:
    """One data cache for the whole session, so the tiny tokenizer is trained once."""
    return tmp_path_factory.mktemp("ryzen-cache")


@pytest.fixture
def tiny_config(ryzen_cache_dir, tmp_path):
    """tiny_config(*overrides, plugins=[...]) -> a tiny RunConfig writing under tmp_path/run."""

    def build(*overrides: str, plugins: Sequence[str] = ()):
        return make_config(ryzen_cache_dir, *overrides, plugins=plugins, out_dir=tmp_path / "run")

    return build


@pytest.fixture
def tiny_host():
    """tiny_host(name=plugin, ..., config=None) -> a PluginHost with those plugins registered."""

    def build(config=None, **plugins):
        return make_host(plugins, config)

    return build


@pytest.fixture
def tiny_train(tmp_path):
    """tiny_train(host, config, plugins=None) -> TrainResult of one tiny model trained through those plugins."""

    def train(host, config, plugins: Sequence[str] | None = None):
        return train_tiny(host, config, tmp_path / "train", plugins)

    return train


@pytest.fixture
def tiny_run():
    """tiny_run(host, config, ablate=False) -> the run directory of a whole tiny `ryzen run`."""
    return run_tiny


@pytest.fixture
def hook_recorder() -> HookRecorder:
    return HookRecorder()


@pytest.fixture
def ryzen_cli(ryzen_cache_dir):
    """ryzen_cli(*args, env=None, cwd=None) -> CompletedProcess of `ryzen ARGS` in a subprocess."""

    def run(*args: str, env: dict | None = None, cwd: Path | None = None, timeout: float = 1800):
        # The timeout only stops a hung command; a loaded machine is slow, not broken.
        full_env = {**os.environ, "RYZEN_CACHE_DIR": str(ryzen_cache_dir), "CI": "1", **(env or {})}
        return subprocess.run([sys.executable, "-m", "ryzen_core.cli", *args], capture_output=True, text=True,
                              env=full_env, cwd=cwd, timeout=timeout)

    return run
