"""`ryzen serve RUN_DIR`: the run's trained model behind an OpenAI-compatible HTTP API.

Every mistake on the command line (a directory without a model, a busy port) is one line on stderr
and exit 2. SIGTERM (and Ctrl-C) shut down gracefully: the listener closes, in-flight requests get
up to --shutdown-deadline seconds to finish, the rest are cancelled, and the process exits 0.
"""
from __future__ import annotations

import signal
from pathlib import Path
from typing import NoReturn

import click


def fail(message: str) -> NoReturn:
    click.echo(f"Error: {message}", err=True)
    click.get_current_context().exit(2)


def load_engine(run_dir: Path, limits, threads: int | None, backend: str = "torch", plugins: list[str] = ()):
    """An Engine (not started) over what the run serves: its torch model batched, or (see model_sources) an
    export or the model through plugins' on_infer, one whole request at a time."""
    import torch

    from ryzen_core import Tokenizer, context_length, load_trained_model, saved_plugin_state

    from .engine import Engine
    from .model_sources import export_backend, folded_backend
    from .runners import WholeRequestRunner

    if threads:
        torch.set_num_threads(threads)
    if backend != "torch":
        if plugins:
            raise ValueError("--plugins folds on_infer into the torch model's generation; use it with --backend torch")
        served, directory = export_backend(run_dir, backend)
        tokenizer = Tokenizer.load(directory) if (directory / "tokenizer.json").is_file() else \
            load_trained_model(run_dir)[1]
        context = getattr(served, "context_length", None) or context_length(load_trained_model(run_dir)[0])
        return Engine(None, tokenizer, context, limits, runner=WholeRequestRunner(served, f"export {directory}"))
    model, tokenizer, loaded = load_trained_model(run_dir)
    if not plugins:
        return Engine(model, tokenizer, context_length(model), limits)
    served, _ = folded_backend(model, tokenizer, run_dir, list(plugins), saved_plugin_state(loaded))
    runner = WholeRequestRunner(served, f"the torch model's generation through on_infer of {', '.join(plugins)}")
    return Engine(model, tokenizer, context_length(model), limits, runner=runner)


def default_model_name(run_dir: Path) -> str:
    return Path(run_dir).resolve().name or "ryzen"


@click.command("serve")
@click.argument("run_dir", type=click.Path(path_type=Path))
@click.option("--backend", default="torch", show_default=True,
              help="torch: the trained model with continuous batching. Or an export the run holds, by backend name "
                   "(e.g. onnxruntime-fp32) or directory, loaded by its plugin's load_backend: served one request "
                   "at a time.")
@click.option("--plugins", default=None, metavar="A,B",
              help="Fold these plugins' on_infer over the torch model's generation, as `ryzen run` validates a "
                   "variant (settings from the run's config.json): served one request at a time.")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", type=click.IntRange(0, 65535), default=8000, show_default=True)
@click.option("--model-name", default=None, help="The model id clients send. [default: RUN_DIR's name]")
@click.option("--max-batch", type=click.IntRange(1, 256), default=8, show_default=True,
              help="Sequences decoded together in one step (1 turns batching off).")
@click.option("--max-queue", type=click.IntRange(0, 100_000), default=64, show_default=True,
              help="Requests waiting for a slot before new ones get HTTP 429.")
@click.option("--max-prompt-tokens", type=click.IntRange(min=1), default=None,
              help="Longest prompt accepted. [default: the model's context - 1]")
@click.option("--max-tokens", type=click.IntRange(min=1), default=None,
              help="Most new tokens per request. [default: what fits the context]")
@click.option("--timeout", "timeout_s", type=click.FloatRange(min=0.001), default=120.0, show_default=True,
              help="Seconds a request may run before it ends with a timeout error.")
@click.option("--shutdown-deadline", type=click.FloatRange(min=0.0), default=30.0, show_default=True,
              help="Seconds in-flight requests get to finish after SIGTERM.")
@click.option("--threads", type=click.IntRange(min=1), default=None, help="torch intra-op threads.")
def serve_command(run_dir, backend, plugins, host, port, model_name, max_batch, max_queue, max_prompt_tokens, max_tokens,
                  timeout_s, shutdown_deadline, threads):
    """Serve RUN_DIR's trained model: POST /v1/completions (OpenAI), /v1/models, /health, /metrics."""
    import uvicorn

    from ryzen_core import RyzenError

    from .app import create_app
    from .engine import Limits

    limits = Limits(max_batch, max_queue, max_prompt_tokens, max_tokens, timeout_s)
    names = [n.strip() for n in (plugins or "").split(",") if n.strip()]
    try:
        engine = load_engine(run_dir, limits, threads, backend, names)
    except (RyzenError, ValueError, OSError) as exc:
        fail(str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
    app = create_app(engine, model_name or default_model_name(run_dir), shutdown_deadline)
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="info",
                                           timeout_graceful_shutdown=shutdown_deadline))
    # uvicorn re-raises the signal that stopped it once it is done; a handler of our own takes it, so a
    # graceful SIGTERM ends with exit code 0 instead of death by signal.
    signal.signal(signal.SIGTERM, lambda *_: None)
    server.run()
    if not server.started:
        fail(f"could not listen on {host}:{port} (see the log above)")
