"""Where a backend runs while it is measured: alone in a worker process (the default) or inline.

A worker process builds its backend from a recipe, a small picklable description (a model
config and a weights file, an export path and the plugins that can load it), never from the
live object. Model load then happens in the worker and counts in its memory only, and no
engine's threads share a process with another engine's. Parent and worker exchange our own
messages over a Pipe (numpy arrays and plain values); nothing read from a file is unpickled.

Both kinds of worker answer the same calls (`time_generation`, `generate`, `perplexity`,
`memory`), and both turn a backend that crashes, raises or stops answering into a
`WorkerFailed` naming the reason, so the validator can report it and go on with the others.
"""
from __future__ import annotations

import multiprocessing
import os
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch

from .backends import Backend, HFGenerateBackend, TorchBackend, backend_facts, torch_backend
from .models import is_hf_model
from .plugins import describe_error
from .generation_timing import (GenerationTiming, PeakRssSampler, current_rss_mib, perplexity, process_peak_rss_mib,
                        time_generation)

ISOLATED_ENV = "RYZEN_BACKEND_ISOLATED"
"""'1' inside a worker process: the backend runs alone, so it may keep its threads spinning between steps."""
THREADS_ENV = "RYZEN_BACKEND_THREADS"
"""Inside a worker: the intra-op thread count every backend of the validation is pinned to."""
MEMORY_METHOD = ("each backend in its own worker process (multiprocessing, {context} start): peak_rss_mib is the "
                 "worker's own peak resident set (VmHWM from /proc/self/status, read inside the worker; ru_maxrss "
                 "where /proc is absent), model load included; peak_rss_after_load_mib is the same peak read "
                 "right after the backend was built")


class WorkerFailed(RuntimeError):
    """A backend's worker died, raised or stopped answering; the message says which and when."""


@runtime_checkable
class BackendRecipe(Protocol):
    """What a worker process needs to build a backend itself; must pickle, and `build` runs in the worker."""

    name: str | None

    def build(self) -> Backend:
        ...


@dataclass(frozen=True)
class TorchRecipe:
    """A torch model rebuilt in the worker from its config and weights, with its plugins' `on_infer` chain."""

    name: str
    model: dict[str, Any]
    """ModelConfig as JSON."""
    vocab_size: int
    weights: str
    """A checkpoint directory or a .safetensors file."""
    runner: str = "torch"
    """'torch' (Ryzen's KV-cache loop, folded through on_infer) or 'hf-generate' (transformers' generate())."""
    infer_plugins: tuple[str, ...] = ()
    """Installed plugins whose on_infer wraps generation, in --plugins order."""
    plugin_settings: dict[str, Any] = field(default_factory=dict)
    run_config: dict[str, Any] | None = None
    tokenizer_dir: str | None = None
    variant: str = "baseline"
    plugin_state: dict[str, Any] = field(default_factory=dict)
    """Each class plugin's state_dict, restored on the worker's instance of it."""
    load_plugins: tuple[str, ...] = ()
    """Installed plugins whose `on_model_load` is called again before the weights load (`Plugin.reapply_on_load`)."""

    def build(self) -> Backend:
        from .checkpoint import load_weights
        from .config import ModelConfig
        from .models.build import build_model

        model = build_model(ModelConfig.model_validate(self.model), self.vocab_size)
        host, config, tokenizer = self._host() if self.load_plugins or self.infer_plugins else (None, None, None)
        if self.load_plugins:  # the model as trained: its plugins' layers, then its weights
            host.call_each("on_model_load", self.load_plugins, model=model, tokenizer=tokenizer, config=config,
                           context=host.contexts[self.variant])
        load_weights(model, Path(self.weights))
        model.eval()
        if self.runner == "hf-generate":
            return HFGenerateBackend(model, self.name)
        backend = torch_backend(model, self.name, host, self.infer_plugins, tokenizer, config)  # plain without plugins
        if host is None:
            return backend
        backend.plugin_events = [dict(e.__dict__) for e in host.events]
        backend.plugin_disabled = dict(host.disabled)
        backend.plugin_host = host  # what its plugins record while it generates is asked for at the end
        return backend

    def _host(self):
        """(host, run config, tokenizer) for this variant's plugins, their settings and state restored."""
        from .config import RunConfig
        from .context import RunContext
        from .data import Tokenizer

        names = tuple(dict.fromkeys([*self.load_plugins, *self.infer_plugins]))
        host = _installed_host(names)
        models = host.settings_models()
        host.settings = {n: models[n].model_validate(s) for n, s in self.plugin_settings.items() if n in models}
        config = RunConfig.model_validate(self.run_config or {})
        tokenizer = Tokenizer.load(self.tokenizer_dir) if self.tokenizer_dir else None
        # A worker generates only: no prepared data; the run directory is the config's.
        out = Path(config.output.dir) if config.output.dir else Path(".")
        host.begin_variant(RunContext(config, None, out, out / self.variant, self.variant, list(names),
                                      recorder=host.recorder), names)
        host.load_plugin_state(self.plugin_state)
        return host, config, tokenizer


@dataclass(frozen=True)
class ExportRecipe:
    """An export on disk, loaded in the worker through the plugin host's `load_backend`."""

    path: str
    plugins: tuple[str, ...]
    """Installed plugins to ask, as the parent would (the first that recognizes the path loads it)."""
    name: str | None = None
    """None: the backend's own name."""

    def build(self) -> Backend:
        host = _installed_host(self.plugins)
        backend = host.first("load_backend", self.plugins, path=Path(self.path))
        if backend is None:
            raise ValueError(f"none of the plugins {list(self.plugins)} can load the export {self.path}")
        if self.name is not None:
            backend.name = self.name
        return backend


def _installed_host(plugins: tuple[str, ...]):
    from .plugins import load_plugins

    host = load_plugins(plugins, autoload=False)
    host.require(plugins)  # a plugin the worker cannot load must fail the worker, not be skipped quietly
    return host


# ----------------------------------------------------------------------------- inside the worker


def _timing_message(timing: GenerationTiming) -> dict[str, Any]:
    return {"batch_size": timing.batch_size, "prompt_len": timing.prompt_len, "new_tokens": timing.new_tokens,
            "ttft_s": timing.ttft_s, "decode_step_s": timing.decode_step_s, "decode_s": timing.decode_s,
            "total_s": timing.total_s, "output_ids": timing.output_ids.numpy()}


def _memory_message() -> dict[str, float]:
    return {"peak_rss_mib": process_peak_rss_mib(), "rss_mib": current_rss_mib()}


def _greedy(backend: Backend, prompts: torch.Tensor, new_tokens: int) -> torch.Tensor:
    return backend.generate(prompts, new_tokens, temperature=0.0, eos_token_id=None)


REQUESTS = {
    "time_generation": lambda b, prompts, n: _timing_message(time_generation(b, torch.from_numpy(prompts), n)),
    "generate": lambda b, prompts, n: _greedy(b, torch.from_numpy(prompts), n).numpy(),
    "perplexity": lambda b, split, batch_size, batches: perplexity(b, torch.from_numpy(split), batch_size, batches),
    "memory": lambda b: _memory_message(),
    "plugin_record": lambda b: _plugin_record(b),
}


def _plugin_record(backend) -> dict[str, Any]:
    """What the backend's plugins recorded (and who was disabled) up to now, generation included."""
    host = getattr(backend, "plugin_host", None)
    if host is None:
        return {"events": getattr(backend, "plugin_events", []), "disabled": getattr(backend, "plugin_disabled", {})}
    return {"events": [dict(e.__dict__) for e in host.events], "disabled": dict(host.disabled)}


def _pin_threads(threads: int) -> None:
    for variable in (THREADS_ENV, "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[variable] = str(threads)
    os.environ[ISOLATED_ENV] = "1"
    torch.set_num_threads(threads)


def _serve(conn, recipe: BackendRecipe, threads: int) -> None:
    """The worker process: build the backend, say so, then answer requests until told to stop."""
    try:
        _pin_threads(threads)
        start = time.perf_counter()
        backend = recipe.build()
        ready = {"name": backend.name, "pid": os.getpid(), "threads": torch.get_num_threads(),
                 "load_s": time.perf_counter() - start, "peak_rss_after_load_mib": process_peak_rss_mib(),
                 "wraps_generation": getattr(backend, "wraps_generation", None), "facts": backend_facts(backend),
                 "events": getattr(backend, "plugin_events", []), "disabled": getattr(backend, "plugin_disabled", {})}
    except BaseException as exc:
        conn.send(("error", f"building the backend raised {describe_error(exc)}"))
        return
    conn.send(("ok", ready))
    while True:
        request, *args = conn.recv()
        if request == "stop":
            return
        try:
            answer = REQUESTS[request](backend, *args)
        except BaseException as exc:
            # A backend that raised is not trusted with another run: the worker ends here.
            conn.send(("error", f"{request} raised {describe_error(exc)}"))
            return
        conn.send(("ok", answer))


# ----------------------------------------------------------------------------- the two kinds of worker


def start_context() -> multiprocessing.context.BaseContext:
    """forkserver where there is one (a worker starts in milliseconds from a server that imported torch
    once), else spawn; never plain fork, which would copy the parent's models and thread pools."""
    if "forkserver" not in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("spawn")
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["ryzen_core.workers"])
    return context


class ProcessWorker:
    """A backend alone in a worker process; the parent only sends requests and waits for answers."""

    isolation = "process"

    def __init__(self, recipe: BackendRecipe, threads: int, timeout_s: float):
        self.name = recipe.name or Path(getattr(recipe, "path", "backend")).name
        self.threads, self.timeout_s = threads, timeout_s
        self.failure: str | None = None
        self.ready: dict[str, Any] = {}
        context = start_context()
        self._conn, child_conn = context.Pipe()
        self._process = context.Process(target=_serve, args=(child_conn, recipe, threads), daemon=True,
                                        name=f"ryzen-worker-{self.name}")
        self._process.start()
        child_conn.close()  # the parent keeps only its end, so a dead worker reads as end-of-file
        try:
            self.ready = self._receive("start")
        except WorkerFailed:
            return
        self.name = recipe.name or self.ready["name"]

    def _fail(self, reason: str) -> WorkerFailed:
        self.failure = reason
        self.close()
        return WorkerFailed(f"backend {self.name!r}: {reason}")

    def _death(self, request: str) -> str:
        self._process.join(5)
        code = self._process.exitcode
        if code is not None and code < 0:
            return f"worker killed by {signal.Signals(-code).name} during {request}"
        return f"worker exited with code {code} during {request}"

    def _receive(self, request: str) -> Any:
        if not self._conn.poll(self.timeout_s):
            raise self._fail(f"no answer to {request} within {self.timeout_s:g} s; worker stopped")
        try:
            status, answer = self._conn.recv()
        except (EOFError, OSError):
            raise self._fail(self._death(request)) from None
        if status == "error":
            raise self._fail(answer)
        return answer

    def _ask(self, request: str, *args: Any) -> Any:
        if self.failure is not None:
            raise WorkerFailed(f"backend {self.name!r}: {self.failure}")
        try:
            self._conn.send((request, *args))
        except (BrokenPipeError, OSError):
            raise self._fail(self._death(request)) from None
        return self._receive(request)

    def time_generation(self, prompts: torch.Tensor, new_tokens: int) -> GenerationTiming:
        answer = self._ask("time_generation", prompts.numpy(), new_tokens)
        return GenerationTiming(**dict(answer, output_ids=torch.from_numpy(answer["output_ids"])))

    def generate(self, prompts: torch.Tensor, new_tokens: int) -> torch.Tensor:
        return torch.from_numpy(self._ask("generate", prompts.numpy(), new_tokens))

    def perplexity(self, split: torch.Tensor, batch_size: int, max_batches: int) -> float:
        return self._ask("perplexity", split.numpy(), batch_size, max_batches)

    def memory(self, prompts: torch.Tensor, new_tokens: int) -> dict[str, Any]:
        """The worker's own peak so far (the untimed prompts are not needed: nothing else shares its process)."""
        return {"isolation": self.isolation, **self._ask("memory"),
                "peak_rss_after_load_mib": self.ready["peak_rss_after_load_mib"]}

    def describe(self) -> dict[str, Any]:
        return {"isolation": self.isolation, "threads": self.ready.get("threads", self.threads),
                "load_s": self.ready.get("load_s"), "failure": self.failure, "facts": self.ready.get("facts", {})}

    def close(self) -> None:
        if self._process.is_alive() and self.failure is None:  # a failed worker gets no second chance to answer
            try:  # events its plugins recorded while it was measured, not only while it was built
                self.ready.update(self._ask("plugin_record"))
            except WorkerFailed:
                return  # _fail has closed it
            try:
                self._conn.send(("stop",))
            except (BrokenPipeError, OSError):
                pass
            self._process.join(10)
        if self._process.is_alive():
            self._process.kill()
            self._process.join()
        self._conn.close()


class InlineWorker:
    """A live backend run in this process (tests that need speed, or a backend that cannot move).

    Memory is the process's resident set sampled during one extra untimed generation, so it
    counts everything the process holds; `reason` says why this backend is not isolated.
    """

    isolation = "inline"

    def __init__(self, backend: Backend | None, reason: str = "validate.isolation is inline",
                 name: str | None = None, failure: str | None = None):
        self.backend, self.reason, self.failure = backend, reason, failure
        self.name = name or backend.name
        self.ready = {"events": getattr(backend, "plugin_events", []),
                      "disabled": getattr(backend, "plugin_disabled", {})}

    def _run(self, request: str, function, *args: Any) -> Any:
        if self.failure is not None:
            raise WorkerFailed(f"backend {self.name!r}: {self.failure}")
        try:
            return function(*args)
        except Exception as exc:
            self.failure = f"{request} raised {describe_error(exc)}"
            raise WorkerFailed(f"backend {self.name!r}: {self.failure}") from exc

    def time_generation(self, prompts: torch.Tensor, new_tokens: int) -> GenerationTiming:
        return self._run("time_generation", time_generation, self.backend, prompts, new_tokens)

    def generate(self, prompts: torch.Tensor, new_tokens: int) -> torch.Tensor:
        return self._run("generate", _greedy, self.backend, prompts, new_tokens)

    def perplexity(self, split: torch.Tensor, batch_size: int, max_batches: int) -> float:
        return self._run("perplexity", perplexity, self.backend, split, batch_size, max_batches)

    def memory(self, prompts: torch.Tensor, new_tokens: int) -> dict[str, Any]:
        # Sampled in its own untimed run, so the sampling thread never competes with a timed one.
        with PeakRssSampler() as rss:
            self._run("generate", _greedy, self.backend, prompts, new_tokens)
        return {"isolation": self.isolation, "rss_at_start_mib": rss.baseline_mb, "peak_rss_mib": rss.peak_mb,
                "rss_growth_mib": rss.growth_mb, "samples": rss.samples}

    def describe(self) -> dict[str, Any]:
        return {"isolation": self.isolation, "reason": self.reason, "threads": torch.get_num_threads(),
                "failure": self.failure, "facts": backend_facts(self.backend) if self.backend is not None else {}}

    def close(self) -> None:
        if self.backend is not None:
            self.ready.update(_plugin_record(self.backend))


Worker = ProcessWorker | InlineWorker


def start_worker(entry: Backend | BackendRecipe | Worker, isolation: str, threads: int, timeout_s: float) -> Worker:
    """A worker for `entry`: a recipe runs in its own process (isolation 'process') or is built here; a live
    backend object cannot move to another process and runs inline. Never raises: a backend that fails to
    start comes back as a worker whose `failure` says why."""
    if isinstance(entry, (ProcessWorker, InlineWorker)):
        return entry
    if not isinstance(entry, BackendRecipe):
        reason = "validate.isolation is inline" if isolation == "inline" else "a live backend object, not a recipe"
        return InlineWorker(entry, reason)
    if isolation == "process":
        return ProcessWorker(entry, threads, timeout_s)
    try:
        return InlineWorker(entry.build())
    except Exception as exc:
        return InlineWorker(None, name=entry.name or Path(getattr(entry, "path", "backend")).name,
                            failure=f"building the backend raised {describe_error(exc)}")


def pinned_threads(cfg) -> int:
    """The intra-op thread count of every worker: validate.threads, else this process's torch threads."""
    return cfg.threads or torch.get_num_threads()


def peak_rss_method(context_name: str | None = None) -> str:
    return MEMORY_METHOD.format(context=context_name or start_context().get_start_method())


# ----------------------------------------------------------------------------- what a run validates


@dataclass
class Variant:
    """A trained model to validate; the first of a list is the baseline."""

    label: str
    model: torch.nn.Module
    plugins: list[str]
    weights: Path | None = None
    """A checkpoint or .safetensors file holding exactly these weights; None: written to the workdir when needed."""


@dataclass
class ValidationPlan:
    """What `validate` is given: backends (recipes, workers or live backends), the fidelity reference of
    each, the untimed references, and each variant's own torch fp32 backend by label."""

    backends: dict[str, Any] = field(default_factory=dict)
    fidelity_reference: dict[str, str] = field(default_factory=dict)
    references: dict[str, Any] = field(default_factory=dict)
    own_fp32: dict[str, str] = field(default_factory=dict)
    dropped_workers: list[dict[str, Any]] = field(default_factory=list)
    """What the plugins of workers closed unmeasured (their on_infer left generation plain) recorded and
    disabled while loading: a plugin that disabled itself there must still show in the report."""


def _installed(host, plugin: str) -> bool:
    """Loaded from an installed distribution, so a worker process can load it too (a plugin registered
    in this process by code, as tests do, exists only here)."""
    record = host.records.get(plugin)
    return record is not None and record.status == "loaded" and record.distribution is not None


class _Builder:
    """Turns a variant into a recipe (isolation 'process') or a live backend built here."""

    def __init__(self, host, config, tokenizer, workdir: Path):
        self.host, self.config, self.tokenizer, self.workdir = host, config, tokenizer, Path(workdir)
        self.process = config.validate_.isolation == "process"
        self._weights: dict[str, str] = {}
        self._tokenizer_dir: str | None = None

    def _weights_file(self, variant: Variant) -> str:
        from safetensors.torch import save_model

        if variant.weights is not None:
            return str(variant.weights)
        if variant.label not in self._weights:
            path = self.workdir / f"{variant.label}.safetensors"
            save_model(variant.model, str(path))
            self._weights[variant.label] = str(path)
        return self._weights[variant.label]

    def _tokenizer(self) -> str:
        if self._tokenizer_dir is None:
            self.tokenizer.save(self.workdir / "tokenizer")
            self._tokenizer_dir = str(self.workdir / "tokenizer")
        return self._tokenizer_dir

    def reapplied(self, variant: Variant) -> list[str]:
        """The variant's plugins whose on_model_load a rebuild of its model must call again (reapply_on_load)."""
        self.host.use_variant(variant.label)
        return [p for p in self.host.active(variant.plugins) if self.host.implements("on_model_load", p)
                and getattr(self.host.instance(p), "reapply_on_load", False)]

    def build(self, variant: Variant, name: str, infer: list[str], runner: str = "torch") -> Any:
        # on_infer runs on this variant's plugin instances (reapplied() selects the variant); the live model
        # has the reapplied layers already, a rebuilt one needs them
        load = self.reapplied(variant)
        not_installed = [p for p in [*load, *infer] if not _installed(self.host, p)]
        if self.process and not not_installed:
            hosted = [*load, *infer]
            settings = {p: s.model_dump(mode="json") for p in hosted if (s := self.host.settings.get(p)) is not None}
            recipe = TorchRecipe(name, self.config.model.model_dump(mode="json"), self.tokenizer.vocab_size,
                                 self._weights_file(variant), runner, tuple(infer), settings,
                                 self.config.dump() if hosted else None, self._tokenizer() if hosted else None,
                                 variant.label, self.host.plugin_state() if hosted else {}, tuple(load))
            # Started now when plugins may wrap generation: whether they did decides what is measured.
            cfg = self.config.validate_
            return ProcessWorker(recipe, pinned_threads(cfg), cfg.worker_timeout_s) if infer else recipe
        live = (HFGenerateBackend(variant.model, name) if runner == "hf-generate" else
                torch_backend(variant.model, name, self.host, infer, self.tokenizer, self.config))
        if not self.process:
            return live
        return InlineWorker(live, f"plugin {not_installed[0]} is registered in this process, not installed, so a "
                                  f"worker process cannot load it")


def _left_generation_plain(entry: Any) -> bool:
    """Whether the on_infer fold left this torch backend's generation as it was (a failed worker: unknown, no)."""
    if isinstance(entry, ProcessWorker):
        return entry.ready.get("wraps_generation") is False
    live = entry.backend if isinstance(entry, InlineWorker) else entry
    return isinstance(live, TorchBackend) and not live.wraps_generation


def plan_variants(variants: list[Variant], host, config, tokenizer, workdir: Path) -> ValidationPlan:
    """'torch' for the baseline (and 'hf-generate' for an HF model), 'torch-<label>' for each other variant
    whose weights differ or whose plugins wrap generation (on_infer); each with its fidelity reference,
    the variant's own plain torch model, untimed where it is not measured anyway."""
    builder, plan = _Builder(host, config, tokenizer, workdir), ValidationPlan()
    base = variants[0].model
    for variant in variants:
        is_baseline = variant is variants[0]
        name = "torch" if is_baseline else f"torch-{variant.label}"
        infer = [p for p in host.active(variant.plugins) if host.implements("on_infer", p)]
        same_weights = variant.model is base
        entry = builder.build(variant, name, infer) if is_baseline or infer or not same_weights else None
        plain = not infer or _left_generation_plain(entry)
        if entry is None or (not is_baseline and same_weights and plain):
            if isinstance(entry, (ProcessWorker, InlineWorker)):
                plan.dropped_workers.append({"events": entry.ready.get("events", []),
                                             "disabled": entry.ready.get("disabled", {})})
                entry.close()
            plan.own_fp32[variant.label] = "torch"  # the baseline's model, already measured
            continue
        own = "torch" if same_weights else name if plain else f"{name}-fp32"
        plan.backends[name], plan.fidelity_reference[name] = entry, own
        if own not in plan.backends:
            plan.references[own] = builder.build(variant, own, [])
        plan.own_fp32[variant.label] = own
        if is_baseline and is_hf_model(variant.model):
            plan.backends["hf-generate"] = builder.build(variant, "hf-generate", [], "hf-generate")
            plan.fidelity_reference["hf-generate"] = "torch"
    return plan


def export_entry(host, name: str | None, path: Path, live: Backend | None, isolation: str) -> Any:
    """An export as `validate` takes it: a recipe whose worker asks the installed plugins' load_backend,
    or (inline, or no installed plugin can load exports) the plugin's live backend or one loaded here."""
    loaders = tuple(p for p in host.loaded_names() if _installed(host, p) and host.implements("load_backend", p))
    if isolation == "process" and loaders:
        return ExportRecipe(str(path), loaders, name)
    backend = live or host.first("load_backend", host.loaded_names(), path=Path(path))
    if backend is None or isolation == "inline":
        return backend
    return InlineWorker(backend, "no installed plugin implements load_backend, so a worker process cannot load it")
