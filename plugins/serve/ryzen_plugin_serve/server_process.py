"""A `ryzen serve` process on a free loopback port, as `ryzen bench serve` (and the tests) start it, and
what a benchmark asks such a server: is it ready, what does it serve, what do its metrics say."""
from __future__ import annotations

import ipaddress
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from urllib.parse import urlsplit

from prometheus_client.parser import text_string_to_metric_families


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def loopback_problem(url: str) -> str | None:
    """Why `url` is not an http(s) URL of this machine's loopback interface, or None."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return f"{url} is not an http:// or https:// URL"
    if parts.hostname == "localhost":
        return None
    try:
        if ipaddress.ip_address(parts.hostname).is_loopback:
            return None
    except ValueError:
        pass
    return f"{url} is not a loopback address; ryzen bench serve only loads servers on this machine (127.0.0.1, ::1)"


class ServerProcess:
    """`ryzen serve RUN_DIR --port <free> ARGS`, stopped with SIGTERM (graceful) when the block ends."""

    def __init__(self, run_dir: Path, args: list[str], log_path: Path | None = None, ready_timeout_s: float = 900.0):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        command = [sys.executable, "-m", "ryzen_core.cli", "serve", str(run_dir), "--host", "127.0.0.1",
                   "--port", str(self.port), *args]
        self.log = open(log_path, "w") if log_path else subprocess.DEVNULL
        self.process = subprocess.Popen(command, stdout=self.log, stderr=subprocess.STDOUT, env=dict(os.environ))
        self.ready_timeout_s = ready_timeout_s

    def wait_ready(self) -> "ServerProcess":
        """Block until /health answers 200; raise RuntimeError if the process exits or never gets ready."""
        end = time.monotonic() + self.ready_timeout_s
        while self.process.poll() is None and time.monotonic() < end:
            if health(self.url) == 200:
                return self
            time.sleep(0.2)
        code = self.process.poll()
        self.stop()
        raise RuntimeError(f"the server exited with code {code} before it was ready" if code is not None
                           else f"the server was not ready after {self.ready_timeout_s:g} s")

    def alive(self) -> bool:
        return self.process.poll() is None

    def stop(self, deadline_s: float = 60.0) -> int | None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=deadline_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if hasattr(self.log, "close"):
            self.log.close()
        return self.process.returncode

    def __enter__(self) -> "ServerProcess":
        return self.wait_ready()

    def __exit__(self, *exc) -> None:
        self.stop()


def health(url: str) -> int | None:
    """The status /health answers, or None when nothing answers."""
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=10) as response:
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return None


def served_model(url: str) -> dict:
    """The first (only) entry of /v1/models."""
    with urllib.request.urlopen(f"{url}/v1/models", timeout=30) as response:
        return json.loads(response.read())["data"][0]


def metric_values(url: str) -> dict[str, float]:
    """Every sample of /metrics by name, a labelled one as name{label=value}."""
    with urllib.request.urlopen(f"{url}/metrics", timeout=30) as response:
        text = response.read().decode()
    values = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()) if k != "le")
            if "le" in sample.labels:
                labels = ",".join(filter(None, [labels, f"le={sample.labels['le']}"]))
            values[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
    return values


def wait_idle(url: str, timeout_s: float = 60.0) -> dict[str, float]:
    """Poll /metrics until no request runs or waits (every slot freed), up to `timeout_s`: the last values."""
    end = time.monotonic() + timeout_s
    while True:
        values = metric_values(url)
        if "ryzen_serve_requests_running" not in values:  # not a ryzen server: nothing to wait for
            return values
        idle = values.get("ryzen_serve_requests_running") == 0 and values.get("ryzen_serve_requests_waiting") == 0
        if idle or time.monotonic() > end:
            return values
        time.sleep(0.1)
