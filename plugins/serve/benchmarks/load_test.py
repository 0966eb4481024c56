"""Load test of `ryzen serve`: continuous batching against the same server with batching off, in one run.

    python plugins/serve/benchmarks/load_test.py RUN_DIR [--concurrency 1,2,4,8] [--requests 32]
        [--max-tokens 48] [--max-batch 8] [--rounds 2] [--json-out FILE]

Starts two servers on free loopback ports from RUN_DIR, one with --max-batch N and one with
--max-batch 1, and drives them with a fixed number of concurrent streaming clients (closed loop:
each client sends its next request when the previous one ends). Levels and servers are interleaved
round by round, so a change in machine load hits both alike. Reports generated tokens/s, p50/p95
time to first token and end-to-end latency, and the mean batch occupancy (from the server's own
/metrics histogram), as a Markdown table (and JSON with --json-out).
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from ryzen_core import markdown_table

PROMPTS = ["def ", "import os\n", "class Parser(object):\n", "return ", "    for i in range(", "if __name__ == ",
           "with open(path) as f:\n", "try:\n    import"]
MODEL = "bench"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(run_dir: Path, max_batch: int, threads: int | None) -> tuple[subprocess.Popen, str]:
    port = free_port()
    command = [sys.executable, "-m", "ryzen_core.cli", "serve", str(run_dir), "--port", str(port), "--model-name",
               MODEL, "--max-batch", str(max_batch), "--max-queue", "1000"]
    if threads:
        command += ["--threads", str(threads)]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    while process.poll() is None:
        try:
            urllib.request.urlopen(f"{url}/health").close()
            return process, url
        except (urllib.error.URLError, ConnectionError):
            time.sleep(0.2)
    raise SystemExit(f"the server with --max-batch {max_batch} exited with {process.returncode}")


def one_request(url: str, prompt: str, max_tokens: int) -> dict:
    """Stream one completion; time to the first text chunk and to the end, and the tokens it made."""
    body = json.dumps({"model": MODEL, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
                       "stream": True}).encode()
    request = urllib.request.Request(f"{url}/v1/completions", body, {"Content-Type": "application/json"})
    start = time.perf_counter()
    first = tokens = None
    with urllib.request.urlopen(request) as response:
        for raw in response:
            line = raw.decode().strip()
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if first is None and chunk["choices"][0]["text"]:
                first = time.perf_counter() - start
            if "usage" in chunk:
                tokens = chunk["usage"]["completion_tokens"]
    return {"ttft_s": first, "e2e_s": time.perf_counter() - start, "tokens": tokens or 0}


def occupancy(url: str) -> tuple[float, float]:
    """(sum, count) of the server's batch occupancy histogram so far."""
    text = urllib.request.urlopen(f"{url}/metrics").read().decode()
    family = next(f for f in text_string_to_metric_families(text) if f.name == "ryzen_serve_batch_occupancy")
    values = {s.name: s.value for s in family.samples}
    return values["ryzen_serve_batch_occupancy_sum"], values["ryzen_serve_batch_occupancy_count"]


def load(url: str, concurrency: int, requests: int, max_tokens: int) -> dict:
    """`requests` completions from `concurrency` clients at once: throughput, latencies, occupancy."""
    before = occupancy(url)
    start = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        results = list(pool.map(lambda i: one_request(url, PROMPTS[i % len(PROMPTS)], max_tokens), range(requests)))
    wall = time.perf_counter() - start
    after = occupancy(url)
    steps = after[1] - before[1]
    return {"wall_s": wall, "tokens": sum(r["tokens"] for r in results), "results": results,
            "mean_occupancy": (after[0] - before[0]) / steps if steps else 0.0}


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def summarize(runs: list[dict]) -> dict:
    results = [r for run in runs for r in run["results"]]
    ttft = [r["ttft_s"] for r in results if r["ttft_s"] is not None]
    e2e = [r["e2e_s"] for r in results]
    return {"tokens_per_s": sum(run["tokens"] for run in runs) / sum(run["wall_s"] for run in runs),
            "ttft_p50_ms": 1000 * percentile(ttft, 0.5), "ttft_p95_ms": 1000 * percentile(ttft, 0.95),
            "e2e_p50_ms": 1000 * percentile(e2e, 0.5), "e2e_p95_ms": 1000 * percentile(e2e, 0.95),
            "mean_occupancy": statistics.fmean(run["mean_occupancy"] for run in runs), "requests": len(results)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--concurrency", default="1,2,4,8")
    parser.add_argument("--requests", type=int, default=32, help="requests per level, server and round")
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--max-batch", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None, help="torch threads of each server")
    parser.add_argument("--json-out", type=Path)
    args = parser.parse_args()
    levels = [int(c) for c in args.concurrency.split(",")]
    servers = {f"batch {args.max_batch}": start_server(args.run_dir, args.max_batch, args.threads),
               "batch 1": start_server(args.run_dir, 1, args.threads)}
    runs: dict[tuple[str, int], list[dict]] = {}
    try:
        for _ in range(args.rounds):
            for level in levels:
                for name, (_, url) in servers.items():
                    runs.setdefault((name, level), []).append(load(url, level, args.requests, args.max_tokens))
    finally:
        for process, _ in servers.values():
            process.send_signal(signal.SIGTERM)
            process.wait()
    report = {f"{name} @ {level}": summarize(r) for (name, level), r in runs.items()}
    rows = []
    for level in levels:
        for name in servers:
            s = report[f"{name} @ {level}"]
            rows.append([level, name, f"{s['tokens_per_s']:.0f}", f"{s['ttft_p50_ms']:.0f}", f"{s['ttft_p95_ms']:.0f}",
                         f"{s['e2e_p50_ms']:.0f}", f"{s['e2e_p95_ms']:.0f}", f"{s['mean_occupancy']:.2f}"])
        batched, single = report[f"batch {args.max_batch} @ {level}"], report[f"batch 1 @ {level}"]
        rows.append([level, "ratio", f"{batched['tokens_per_s'] / single['tokens_per_s']:.2f}x", "", "", "", "", ""])
    print(markdown_table(["clients", "server", "gen tokens/s", "TTFT p50 ms", "TTFT p95 ms", "e2e p50 ms",
                          "e2e p95 ms", "mean batch"], rows))
    if args.json_out:
        args.json_out.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "cpu_count":
                                             os.cpu_count(), "results": report}, indent=2))


if __name__ == "__main__":
    main()
