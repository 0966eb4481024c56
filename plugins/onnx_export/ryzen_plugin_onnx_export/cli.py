"""`ryzen generate`: text from an onnx export run by onnxruntime, or from a run's trained model in torch.

Every mistake a user can make here (a wrong directory, a broken export, a prompt or option that
cannot work) is one line on stderr and exit 2. Heavy imports (torch, onnxruntime) happen inside
the command, so registering it keeps `ryzen --help` fast.
"""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, NoReturn

import click

DEFAULT_NEW_TOKENS = 64


def fail(message: str) -> NoReturn:
    click.echo(f"Error: {message}", err=True)
    click.get_current_context().exit(2)


def not_an_export(path: Path) -> str:
    """Why `path` cannot be used with --onnx, naming the exports under it and whether --run can use it."""
    from ryzen_core import trained_model_dirs

    from .export import read_manifest

    exports = [d for pattern in ("*", "export/*", "*/export/*") for d in sorted(path.glob(pattern))
               if d.is_dir() and read_manifest(d) is not None]
    message = f"{path} is not an onnx export (no export.json written by the onnx plugin)"
    if exports:
        message += f"; exports under it: {', '.join(str(d) for d in exports)}"
    if trained_model_dirs(path):
        message += f"; or generate in torch with --run {path}"
    return message


def request_problem(onnx_dir: Path | None, run_dir: Path | None, prompt: str, temperature: float) -> str | None:
    """What is wrong with the command line before anything is loaded, or None."""
    from .export import read_manifest

    if (onnx_dir is None) == (run_dir is None):
        return "give either --onnx EXPORT_DIR or --run RUN_DIR"
    if not math.isfinite(temperature):  # click's range lets NaN through: every comparison with it is False
        return f"--temperature must be a finite number >= 0, got {temperature}"
    try:
        prompt.encode("utf-8")
    except UnicodeEncodeError as exc:  # a lone surrogate (from undecodable argv bytes) has no UTF-8 form
        return f"the prompt is not valid text: {exc.reason} at character {exc.start}"
    if onnx_dir is not None and not onnx_dir.is_dir():
        return f"onnx export directory {onnx_dir} does not exist"
    if onnx_dir is not None and read_manifest(onnx_dir) is None:
        return not_an_export(onnx_dir)
    return None


def load_generator(onnx_dir: Path | None, run_dir: Path | None, threads: int | None) -> tuple[Any, Any]:
    """(backend, tokenizer): the export in onnxruntime, or the run's trained model in torch."""
    from ryzen_core import Tokenizer, TorchBackend, load_trained_model

    from .runtime import load_export

    if run_dir is not None:
        model, tokenizer, _ = load_trained_model(run_dir)
        return TorchBackend(model), tokenizer
    return load_export(onnx_dir, threads=threads), Tokenizer.load(onnx_dir)


def new_tokens_that_fit(backend: Any, prompt_tokens: int, max_new_tokens: int | None) -> int:
    """The number asked for, or by default DEFAULT_NEW_TOKENS cut (with a note) to the backend's context."""
    if max_new_tokens is not None:
        return max_new_tokens  # an explicit number the context cannot hold is the backend's one-line error
    limit = getattr(backend, "context_length", None) if getattr(backend, "hard_context_limit", False) else None
    if limit is None or prompt_tokens + DEFAULT_NEW_TOKENS <= limit:
        return DEFAULT_NEW_TOKENS
    fitting = max(0, limit - prompt_tokens)
    click.echo(f"note: {fitting} new tokens, what fits the context of {limit} after the {prompt_tokens}-token prompt",
               err=True)
    return fitting


@click.command("generate")
@click.option("--onnx", "onnx_dir", type=click.Path(path_type=Path),
              help="Export directory written by the onnx plugin (e.g. <run>/export/onnx-int8).")
@click.option("--run", "run_dir", type=click.Path(path_type=Path),
              help="Or a run directory (a variant's, or an hf_model/): generate in torch from its trained model.")
@click.argument("prompt")
@click.option("--max-new-tokens", type=click.IntRange(min=0), default=None,
              help=f"[default: {DEFAULT_NEW_TOKENS}, cut to what fits the model's context]")
@click.option("--temperature", type=click.FloatRange(min=0.0, max=1000.0), default=0.0, show_default=True,
              help="0 is greedy.")
@click.option("--top-k", type=click.IntRange(min=0), default=0, show_default=True, help="0 is off.")
@click.option("--top-p", type=click.FloatRange(0.0, 1.0, min_open=True), default=1.0, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--threads", type=click.IntRange(min=1, max=4 * (os.cpu_count() or 1)), default=None,
              help="onnxruntime intra-op threads (at most 4 x the CPUs).")
def generate_command(onnx_dir, run_dir, prompt, max_new_tokens, temperature, top_k, top_p, seed, threads):
    """Generate text from PROMPT with an onnx export run by onnxruntime, or a run's model in torch."""
    import torch

    from ryzen_core import RyzenError

    problem = request_problem(onnx_dir, run_dir, prompt, temperature)
    if problem:
        fail(problem)
    try:
        backend, tokenizer = load_generator(onnx_dir, run_dir, threads)
        ids = tokenizer.encode(prompt)
        if not ids:
            fail("the prompt encodes to no tokens")
        output = backend.generate(torch.tensor([ids]), new_tokens_that_fit(backend, len(ids), max_new_tokens),
                                  temperature=temperature, top_k=top_k, top_p=top_p, eos_token_id=tokenizer.eos_id,
                                  generator=torch.Generator().manual_seed(seed))
    except (RyzenError, ValueError) as exc:  # UnicodeEncodeError (a lone surrogate) is a ValueError too
        fail(str(exc).splitlines()[0][:300] if str(exc) else type(exc).__name__)
    click.echo(tokenizer.decode(output[0].tolist()))
