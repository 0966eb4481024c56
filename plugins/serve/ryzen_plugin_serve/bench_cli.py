"""`ryzen bench serve URL-or-RUN_DIR`: load-test a `ryzen serve` server.

Given a run directory it starts the servers itself on free loopback ports: one with --max-batch N and,
unless --no-baseline, one with --max-batch 1, loaded alike and interleaved round by round. Given a URL
it loads that server (loopback only), and --baseline-url names a second one to compare with. Writes
bench_serve.json, bench_serve.md and bench_serve.png into --out. Usage mistakes: one line, exit 2.
"""
from __future__ import annotations

import shlex
import sys
import time
from pathlib import Path

import click

from .cli import fail


def parse_levels(text: str, what: str) -> tuple[float, ...]:
    try:
        levels = tuple(float(part) for part in text.split(",") if part.strip())
    except ValueError:
        fail(f"{what} must be numbers separated by commas, got {text!r}")
    if not levels or any(not v > 0 or v != v or v == float("inf") for v in levels):
        fail(f"{what} must be positive finite numbers, got {text!r}")
    if what == "--concurrency" and any(v != int(v) for v in levels):
        fail(f"--concurrency levels are whole numbers of clients, got {text!r}")
    return levels


def server_args(max_batch: int, max_queue: int, threads: int | None, backend: str, plugins: str | None) -> list[str]:
    args = ["--model-name", "bench", "--max-batch", str(max_batch), "--max-queue", str(max_queue), "--backend", backend]
    return args + (["--threads", str(threads)] if threads else []) + (["--plugins", plugins] if plugins else [])


def command_line(ctx: click.Context) -> str:
    """The command as typed, from its parsed options (those left at their defaults left out)."""
    parts = ["ryzen", "bench", "serve", ctx.params["target"]]
    for param in ctx.command.params:
        value = ctx.params[param.name]
        if isinstance(param, click.Option) and value != param.default and value not in (None, False):
            parts += [param.opts[0]] if param.is_flag else [param.opts[0], str(value)]
    return shlex.join(parts)


def machine() -> dict:
    from ryzen_core import cpu_features, load_snapshot

    return {"cpu": cpu_features().model, "usable_cores": load_snapshot()["usable_cores"], "python": sys.version.split()[0]}


@click.command("serve")
@click.argument("target")
@click.option("--concurrency", default=None, help="Closed-loop levels: clients each sending its next request when "
              "the last ends. [default: 1,2,4,8,16 unless --rate]")
@click.option("--rate", default=None, help="Open-loop levels instead: requests/s with Poisson arrivals, e.g. 2,4,8.")
@click.option("--requests", type=click.IntRange(min=1), default=32, show_default=True,
              help="Requests per level, server and round.")
@click.option("--duration", "duration_s", type=click.FloatRange(min=0.1), default=120.0, show_default=True,
              help="Seconds per level, server and round after which no request starts.")
@click.option("--rounds", type=click.IntRange(min=1), default=2, show_default=True)
@click.option("--max-tokens", type=click.IntRange(min=1), default=48, show_default=True)
@click.option("--max-batch", type=click.IntRange(1, 256), default=8, show_default=True,
              help="With a run directory: the batched server's --max-batch.")
@click.option("--max-queue", type=click.IntRange(min=0), default=1000, show_default=True,
              help="With a run directory: the servers' --max-queue.")
@click.option("--no-baseline", is_flag=True, help="With a run directory: no batch-1 server, no ratio.")
@click.option("--baseline-url", default=None, help="With a URL: a second (loopback) server to compare with.")
@click.option("--threads", type=click.IntRange(min=1), default=None, help="The servers' torch threads.")
@click.option("--backend", default="torch", show_default=True, help="With a run directory: the servers' --backend.")
@click.option("--plugins", default=None, help="With a run directory: the servers' --plugins.")
@click.option("--ttft-target-ms", type=click.FloatRange(min=0, min_open=True), default=1000.0, show_default=True,
              help="Goodput counts requests with a time to first token up to this ...")
@click.option("--e2e-target-ms", type=click.FloatRange(min=0, min_open=True), default=10000.0, show_default=True,
              help="... and an end-to-end latency up to this.")
@click.option("--malformed-fraction", type=click.FloatRange(0, 1), default=0.0, show_default=True,
              help="Share of requests sent malformed (bad JSON, wrong types, huge max_tokens, non-UTF-8 ...).")
@click.option("--disconnect-fraction", type=click.FloatRange(0, 1), default=0.0, show_default=True,
              help="Share of streaming clients that disconnect after the first chunk.")
@click.option("--timeout", "timeout_s", type=click.FloatRange(min=0.1), default=300.0, show_default=True,
              help="Client timeout per request, seconds.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--out", "out_dir", type=click.Path(path_type=Path), default=None,
              help="Where to write the report. [default: ./bench-serve-<time>]")
def bench_serve_command(target, concurrency, rate, requests, duration_s, rounds, max_tokens, max_batch, max_queue,
                        no_baseline, baseline_url, threads, backend, plugins, ttft_target_ms, e2e_target_ms,
                        malformed_fraction, disconnect_fraction, timeout_s, seed, out_dir):
    """Load-test `ryzen serve` (a loopback URL, or a run directory it serves itself): throughput, TTFT,
    inter-token and end-to-end latency percentiles, goodput, errors; batched against batch 1."""
    from .bench import LoadSettings
    from .loadgen import Mix

    if concurrency is not None and rate is not None:
        fail("give --concurrency or --rate, not both")
    if malformed_fraction + disconnect_fraction > 1:
        fail("--malformed-fraction plus --disconnect-fraction is more than 1")
    mode = "rate" if rate is not None else "concurrency"
    levels = parse_levels(rate if rate is not None else concurrency or "1,2,4,8,16", f"--{mode}")
    settings = LoadSettings(mode, levels, requests, duration_s, rounds, max_tokens,
                            Mix(malformed_fraction, disconnect_fraction), ttft_target_ms / 1000, e2e_target_ms / 1000,
                            timeout_s, seed)
    out_dir = out_dir or Path(f"bench-serve-{time.strftime('%Y%m%d-%H%M%S')}")
    if Path(target).is_dir():
        if baseline_url:
            fail("--baseline-url is for a URL target; with a run directory the batch-1 server is started here")
        report = _bench_run_dir(Path(target), settings, out_dir, max_batch, max_queue, no_baseline, threads, backend,
                                plugins)
    elif "://" in target:
        report = _bench_urls(target, baseline_url, settings)
    else:
        fail(f"{target} is neither a run directory nor an http:// URL")
    report["command"] = command_line(click.get_current_context())
    report["machine"] = machine()
    from .bench_report import markdown, write

    paths = write(report, out_dir)
    click.echo(markdown(report))
    click.echo(f"Wrote {paths['json']}, {paths['markdown']} and {paths['png']}", err=True)


def _say(line: str) -> None:
    click.echo(f"bench serve: {line}", err=True)


def _bench_urls(url: str, baseline_url: str | None, settings) -> dict:
    from .bench import Bench
    from .server_process import health, loopback_problem, served_model

    for u in filter(None, (url, baseline_url)):
        problem = loopback_problem(u) or (None if health(u.rstrip("/")) == 200 else f"{u} does not answer /health")
        if problem:
            fail(problem)
    servers = {"server": url.rstrip("/")}
    if baseline_url:
        servers["baseline"] = baseline_url.rstrip("/")
    return Bench(servers, served_model(servers["server"])["id"], settings, _say).run()


def _bench_run_dir(run_dir: Path, settings, out_dir: Path, max_batch: int, max_queue: int, no_baseline: bool,
                   threads: int | None, backend: str, plugins: str | None) -> dict:
    from .bench import Bench
    from .server_process import ServerProcess

    out_dir.mkdir(parents=True, exist_ok=True)
    batches = [max_batch] if no_baseline or max_batch == 1 else [max_batch, 1]
    started: dict[str, ServerProcess] = {}
    try:
        for batch in batches:
            _say(f"starting ryzen serve {run_dir} --max-batch {batch} (log: {out_dir / f'server-batch{batch}.log'})")
            server = ServerProcess(run_dir, server_args(batch, max_queue, threads, backend, plugins),
                                   out_dir / f"server-batch{batch}.log")
            started[f"batch {batch}"] = server.wait_ready()
        report = Bench({label: s.url for label, s in started.items()}, "bench", settings, _say).run()
        alive = {label: server.alive() for label, server in started.items()}
    except RuntimeError as exc:
        fail(f"{exc} (see {out_dir})")
    finally:
        exit_codes = {label: server.stop() for label, server in started.items()}
    for label in started:
        report["robustness"][label].update(process_alive=alive[label], exit_code=exit_codes[label])
    report["run_dir"] = str(run_dir)
    return report
