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


def load_engine(run_dir: Path, limits, threads: int | None):
    """An Engine (not started) over the run's trained model, and the name it is served under."""
    import torch

    from ryzen_core import context_length, load_trained_model

    from .engine import Engine

    if threads:
        torch.set_num_threads(threads)
    model, tokenizer, _ = load_trained_model(run_dir)
    return Engine(model, tokenizer, context_length(model), limits)


def default_model_name(run_dir: Path) -> str:
    return Path(run_dir).resolve().name or "ryzen"


@click.command("serve")
@click.argument("run_dir", type=click.Path(path_type=Path))
@click.option("--backend", type=click.Choice(["torch"]), default="torch", show_default=True,
              help="What runs the model: Ryzen's torch KV-cache decoder with continuous batching.")
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
def serve_command(run_dir, backend, host, port, model_name, max_batch, max_queue, max_prompt_tokens, max_tokens,
                  timeout_s, shutdown_deadline, threads):
    """Serve RUN_DIR's trained model: POST /v1/completions (OpenAI), /v1/models, /health, /metrics."""
    import uvicorn

    from ryzen_core import RyzenError

    from .app import create_app
    from .engine import Limits

    limits = Limits(max_batch, max_queue, max_prompt_tokens, max_tokens, timeout_s)
    try:
        engine = load_engine(run_dir, limits, threads)
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
