"""`ryzen bench serve`: the same load against each server, levels and servers interleaved round by round,
summarized per server and level, and the batched server compared with its batch-1 twin.

Per load run: requests/s and generated tokens/s over the run's wall time (completed well-formed requests
only), time to first token (to the first streamed text), inter-token latency (gaps between streamed text
chunks; a chunk is one token unless a multi-byte character or a possible stop string held text back),
end-to-end latency, goodput (completed requests/s that met both latency targets), errors by kind, and the
mean batch occupancy the server itself saw (its /metrics histogram). Percentiles pool every round.

The ratio per level is tokens/s of the batched server over the batch-1 server, one ratio per round
(measured next to each other), with the core's bootstrap interval of the median (`compare_pairs`).
Requests are greedy, so the two servers should write the same text for the same request: the report
counts how often they do.
"""
from __future__ import annotations

import asyncio
from collections import Counter
from dataclasses import dataclass
from typing import Callable

import numpy as np

from ryzen_core import compare_pairs, conditions, load_snapshot

from .loadgen import LoadRun, Mix, RequestResult, plan_requests, run_load
from .server_process import health, metric_values, wait_idle

OCCUPANCY = ("ryzen_serve_batch_occupancy_sum", "ryzen_serve_batch_occupancy_count")
CANCELLED = "ryzen_serve_requests_total{finish_reason=cancelled}"


@dataclass(frozen=True)
class LoadSettings:
    mode: str
    """'concurrency' (closed loop, levels are clients) or 'rate' (Poisson arrivals, levels are requests/s)."""
    levels: tuple[float, ...]
    requests: int
    """Requests per level, server and round."""
    duration_s: float
    """No request starts later than this after a level's start."""
    rounds: int
    max_tokens: int
    mix: Mix
    ttft_target_s: float
    e2e_target_s: float
    timeout_s: float = 300.0
    seed: int = 0


def latency_ms(values: list[float]) -> dict[str, float] | None:
    if not values:
        return None
    p50, p95, p99 = np.percentile(np.asarray(values) * 1000, [50, 95, 99])
    return {"p50": float(p50), "p95": float(p95), "p99": float(p99)}


def summarize(results: list[RequestResult], wall_s: float, settings: LoadSettings) -> dict:
    """The figures of one or several load runs (their results pooled, their wall times added)."""
    normal = [r for r in results if r.kind == "normal"]
    done = [r for r in normal if r.ok]
    malformed = [r for r in results if r.kind.startswith("malformed:")]
    good = [r for r in done if r.ttft_s is not None and r.ttft_s <= settings.ttft_target_s
            and r.e2e_s <= settings.e2e_target_s]
    return {
        "requests_sent": len(results), "completed": len(done), "wall_s": wall_s,
        "requests_per_s": len(done) / wall_s, "tokens_per_s": sum(r.tokens for r in done) / wall_s,
        "ttft_ms": latency_ms([r.ttft_s for r in done if r.ttft_s is not None]),
        "itl_ms": latency_ms([g for r in done for g in r.gaps_s]),
        "e2e_ms": latency_ms([r.e2e_s for r in done]),
        "goodput_rps": len(good) / wall_s, "goodput_fraction": len(good) / len(normal) if normal else None,
        "errors": dict(Counter(r.error for r in results if r.error)),
        "status_5xx": sum(1 for r in results if r.status is not None and r.status >= 500),
        "malformed": {"sent": len(malformed), "got_4xx": sum(1 for r in malformed if r.ok)},
        "disconnected": sum(1 for r in results if r.kind == "disconnect"),
        "well_formed": {"sent": len(normal), "answered": len(done)},
    }


def greedy_identity(a: list[RequestResult], b: list[RequestResult]) -> dict:
    """How many requests both servers completed wrote the same text (requests are greedy and paired by index)."""
    texts_b = {r.index: r.text for r in b if r.kind == "normal" and r.ok}
    pairs = [(r, texts_b[r.index]) for r in a if r.kind == "normal" and r.ok and r.index in texts_b]
    differing = sorted({r.prompt for r, text in pairs if r.text != text})
    return {"compared": len(pairs), "identical": sum(1 for r, text in pairs if r.text == text),
            "differing_prompts": differing}


class Bench:
    """Runs the rounds against `servers` (label -> URL; the first is the candidate, the second, if any,
    its batch-1 baseline) and builds the report."""

    def __init__(self, servers: dict[str, str], model: str, settings: LoadSettings,
                 say: Callable[[str], None] = lambda line: None):
        self.servers, self.model, self.settings, self.say = servers, model, settings, say
        self.runs: dict[tuple[str, float], list[LoadRun]] = {}
        self.occupancy: dict[tuple[str, float], list[float]] = {}
        self.freed: dict[str, list[bool]] = {label: [] for label in servers}
        self.cancelled: dict[str, float] = {label: 0.0 for label in servers}
        self.loads = [load_snapshot()]

    def one_load(self, label: str, level: float, round_index: int) -> LoadRun:
        s, url = self.settings, self.servers[label]
        # The same seed for every server in a round: they get the same requests in the same order.
        specs = plan_requests(s.requests, self.model, s.max_tokens, s.mix, seed=s.seed * 1000 + round_index)
        before = metric_values(url)
        load = {"concurrency": int(level)} if s.mode == "concurrency" else {"rate": level}
        run = asyncio.run(run_load(url, specs, duration_s=s.duration_s, timeout_s=s.timeout_s,
                                   seed=s.seed * 1000 + round_index, on_result=self.progress(label, level), **load))
        after = wait_idle(url)
        steps = after.get(OCCUPANCY[1], 0) - before.get(OCCUPANCY[1], 0)
        occupancy = (after.get(OCCUPANCY[0], 0) - before.get(OCCUPANCY[0], 0)) / steps if steps else None
        self.runs.setdefault((label, level), []).append(run)
        self.occupancy.setdefault((label, level), []).append(occupancy)
        if "ryzen_serve_requests_running" in after:  # a ryzen server: did every slot come back?
            self.freed[label].append(after["ryzen_serve_requests_running"] == 0
                                     and after["ryzen_serve_requests_waiting"] == 0)
            self.cancelled[label] += after.get(CANCELLED, 0) - before.get(CANCELLED, 0)
        summary = summarize(run.results, run.wall_s, s)
        ttft = summary["ttft_ms"] or {"p95": float("nan")}
        self.say(f"round {round_index + 1}/{s.rounds} {s.mode} {level:g} {label}: {len(run.results)} requests in "
                 f"{run.wall_s:.1f} s, {summary['tokens_per_s']:.0f} tok/s, TTFT p95 {ttft['p95']:.0f} ms, "
                 f"errors {sum(summary['errors'].values())}")
        return run

    def progress(self, label: str, level: float) -> Callable[[RequestResult], None]:
        """A line every tenth of a long load (200 requests or more), so a long run is not silent."""
        every, seen, errors = max(1, self.settings.requests // 10), [0], Counter()

        def on_result(result: RequestResult) -> None:
            seen[0] += 1
            errors.update([result.error] if result.error else [])
            if self.settings.requests >= 200 and seen[0] % every == 0:
                self.say(f"  {self.settings.mode} {level:g} {label}: {seen[0]}/{self.settings.requests} requests "
                         f"answered, errors {dict(errors) or 0}")
        return on_result

    def run(self) -> dict:
        labels = list(self.servers)
        for round_index in range(self.settings.rounds):
            for level in self.settings.levels:
                # Alternate which server goes first, so neither always runs on the warmer or quieter side.
                for label in labels if round_index % 2 == 0 else labels[::-1]:
                    self.one_load(label, level, round_index)
            self.loads.append(load_snapshot())
        return self.report()

    def report(self) -> dict:
        s, labels = self.settings, list(self.servers)
        levels, comparisons = [], []
        for level in s.levels:
            entry = {"level": level, "servers": {}}
            for label in labels:
                runs = self.runs[(label, level)]
                summary = summarize([r for run in runs for r in run.results], sum(run.wall_s for run in runs), s)
                summary["tokens_per_s_per_round"] = [summarize(run.results, run.wall_s, s)["tokens_per_s"]
                                                     for run in runs]
                known = [o for o in self.occupancy[(label, level)] if o is not None]
                summary["mean_batch"] = float(np.mean(known)) if known else None
                entry["servers"][label] = summary
            if len(labels) == 2:
                entry["ratio"], entry["greedy_identity"] = self.compare(labels, level)
                if entry["ratio"] is not None:
                    comparisons.append(entry["ratio"])
            levels.append(entry)
        return {"settings": _settings_json(s), "servers": self.servers, "model": self.model, "levels": levels,
                "robustness": {label: self.robustness(label) for label in labels},
                "conditions": conditions(self.loads, comparisons)}

    def robustness(self, label: str) -> dict:
        """What the issue's mixed-load target asks of a server, over every request sent to it."""
        results = [r for (name, _), runs in self.runs.items() if name == label for run in runs for r in run.results]
        normal = [r for r in results if r.kind == "normal"]
        malformed = [r for r in results if r.kind.startswith("malformed:")]
        return {"requests": len(results), "status_5xx": sum(1 for r in results if (r.status or 0) >= 500),
                "well_formed_sent": len(normal), "well_formed_answered": sum(1 for r in normal if r.ok),
                "malformed_sent": len(malformed), "malformed_got_4xx": sum(1 for r in malformed if r.ok),
                "malformed_not_4xx": dict(Counter(r.kind for r in malformed if not r.ok)),
                "disconnected": sum(1 for r in results if r.kind == "disconnect"),
                "cancelled_by_server": self.cancelled[label],
                "slots_freed_after_every_load": all(self.freed[label]) if self.freed[label] else None,
                "health_after": health(self.servers[label])}

    def compare(self, labels: list[str], level: float) -> tuple[dict | None, dict]:
        candidate, baseline = (self.runs[(label, level)] for label in labels)
        rates = [[summarize(run.results, run.wall_s, self.settings)["tokens_per_s"] for run in runs]
                 for runs in (baseline, candidate)]
        ratio = None
        if all(v > 0 for side in rates for v in side):
            ratio = compare_pairs(rates[0], rates[1], higher_is_better=True, better="more tokens/s",
                                  worse="fewer tokens/s").to_dict()
        identity = [greedy_identity(a.results, b.results) for a, b in zip(candidate, baseline)]
        return ratio, {"compared": sum(i["compared"] for i in identity),
                       "identical": sum(i["identical"] for i in identity),
                       "differing_prompts": sorted({p for i in identity for p in i["differing_prompts"]})}


def _settings_json(s: LoadSettings) -> dict:
    return {"mode": s.mode, "levels": list(s.levels), "requests_per_level_server_round": s.requests,
            "duration_s": s.duration_s, "rounds": s.rounds, "max_tokens": s.max_tokens,
            "malformed_fraction": s.mix.malformed, "disconnect_fraction": s.mix.disconnect,
            "ttft_target_ms": s.ttft_target_s * 1000, "e2e_target_ms": s.e2e_target_s * 1000,
            "timeout_s": s.timeout_s, "seed": s.seed, "temperature": 0}
