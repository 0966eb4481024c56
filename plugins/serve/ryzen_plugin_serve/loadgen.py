"""The load generator of `ryzen bench serve`: an async HTTP client (httpx2) that sends completions to a
server at a fixed concurrency (closed loop) or with Poisson arrivals at a set rate (open loop), bounded
in request count and time, and times each request from its own stream.

A mixed load also sends malformed requests (which must get a 4xx) and streaming requests whose client
disconnects after the first chunk (whose slot the server must free). Which request is which is drawn
from a seeded generator, so two servers given the same load get the same requests in the same order.
"""
from __future__ import annotations

import asyncio
import json
import random
import time
from dataclasses import dataclass, field
from typing import Callable

import httpx2

PROMPTS = ["def ", "import os\n", "class Parser(object):\n", "return ", "    for i in range(", "if __name__ == ",
           "with open(path) as f:\n", "try:\n    import"]

# Each is a request body (and the status class it must get), built for the served model's name.
MALFORMED = {
    "bad_json": lambda model: b'{"model": "' + model.encode() + b'", "prompt": "def ", ',
    "wrong_type": lambda model: _json(model=model, prompt="def ", max_tokens="8"),
    "huge_max_tokens": lambda model: _json(model=model, prompt="def ", max_tokens=10**9),
    "negative_max_tokens": lambda model: _json(model=model, prompt="def ", max_tokens=-3),
    "non_utf8": lambda model: b'{"model": "' + model.encode() + b'", "prompt": "\xff\xfe\xfd"}',
    "empty_prompt": lambda model: _json(model=model, prompt=""),
    "unknown_model": lambda model: _json(model=model + "-nope", prompt="def "),
    "not_an_object": lambda model: b"[1, 2, 3]",
    "too_many_choices": lambda model: _json(model=model, prompt="def ", n=100),
}


def _json(**fields) -> bytes:
    return json.dumps(fields).encode()


@dataclass(frozen=True)
class Mix:
    """What share of a load is malformed, and what share of clients disconnect mid-stream."""

    malformed: float = 0.0
    disconnect: float = 0.0


@dataclass(frozen=True)
class RequestSpec:
    index: int
    kind: str
    """'normal' (a streaming greedy completion), 'disconnect' (the same, abandoned after the first chunk)
    or 'malformed:<what>' (see MALFORMED)."""
    prompt: str
    body: bytes


@dataclass
class RequestResult:
    index: int
    kind: str
    prompt: str
    status: int | None = None
    error: str | None = None
    """Why the request did not end as its kind should: 'http_<status>', 'connect', 'timeout', 'error_chunk',
    'incomplete' (no [DONE]), 'not_4xx' (a malformed request that was accepted), ..."""
    ttft_s: float | None = None
    e2e_s: float | None = None
    gaps_s: list[float] = field(default_factory=list)
    tokens: int = 0
    text: str = ""
    finish_reason: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


def plan_requests(count: int, model: str, max_tokens: int, mix: Mix, seed: int) -> list[RequestSpec]:
    """`count` requests: prompt i is PROMPTS[i % len], kinds drawn from `mix` with a generator seeded by `seed`."""
    rng = random.Random(seed)
    specs = []
    for i in range(count):
        prompt = PROMPTS[i % len(PROMPTS)]
        draw = rng.random()
        if draw < mix.malformed:
            what = rng.choice(sorted(MALFORMED))
            specs.append(RequestSpec(i, f"malformed:{what}", prompt, MALFORMED[what](model)))
            continue
        kind = "disconnect" if draw < mix.malformed + mix.disconnect else "normal"
        specs.append(RequestSpec(i, kind, prompt, _json(model=model, prompt=prompt, max_tokens=max_tokens,
                                                        temperature=0, stream=True)))
    return specs


async def send(client: httpx2.AsyncClient, url: str, spec: RequestSpec) -> RequestResult:
    """One request as its kind says; every failure becomes an `error` kind, never an exception."""
    result = RequestResult(spec.index, spec.kind, spec.prompt)
    start = time.perf_counter()
    try:
        if spec.kind.startswith("malformed:"):
            response = await client.post(f"{url}/v1/completions", content=spec.body,
                                         headers={"Content-Type": "application/json"})
            result.status = response.status_code
            if not 400 <= response.status_code < 500:
                result.error = "not_4xx" if response.status_code < 500 else f"http_{response.status_code}"
        else:
            await _stream(client, url, spec, result, start)
    except httpx2.TimeoutException:
        result.error = "timeout"
    except httpx2.ConnectError:
        result.error = "connect"
    except httpx2.HTTPError as exc:
        result.error = type(exc).__name__
    result.e2e_s = time.perf_counter() - start
    return result


async def _stream(client: httpx2.AsyncClient, url: str, spec: RequestSpec, result: RequestResult,
                  start: float) -> None:
    async with client.stream("POST", f"{url}/v1/completions", content=spec.body,
                             headers={"Content-Type": "application/json"}) as response:
        result.status = response.status_code
        if response.status_code != 200:
            await response.aread()
            result.error = f"http_{response.status_code}"
            return
        last = None
        async for line in response.aiter_lines():
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                if result.finish_reason is None and result.error is None:
                    result.error = "no_finish_reason"
                return
            chunk = json.loads(line[6:])
            if "error" in chunk:
                result.error = f"error_chunk_{chunk['error'].get('code', '')}"
                continue
            choice = chunk["choices"][0]
            now = time.perf_counter()
            if choice["text"]:
                result.text += choice["text"]
                if last is None:
                    result.ttft_s = now - start
                else:
                    result.gaps_s.append(now - last)
                last = now
            if choice.get("finish_reason"):
                result.finish_reason = choice["finish_reason"]
                result.tokens = chunk.get("usage", {}).get("completion_tokens", 0)
            if spec.kind == "disconnect":
                return  # leaving the `async with` closes the connection mid-stream
        if spec.kind != "disconnect":
            result.error = "incomplete"


@dataclass
class LoadRun:
    results: list[RequestResult]
    wall_s: float
    stopped_by: str
    """'count' (every planned request was sent) or 'duration' (the time bound stopped sending)."""


async def run_load(url: str, specs: list[RequestSpec], *, concurrency: int | None = None, rate: float | None = None,
                   duration_s: float = float("inf"), timeout_s: float = 300.0, seed: int = 0,
                   on_result: Callable[[RequestResult], None] = lambda result: None) -> LoadRun:
    """Send `specs` at `concurrency` clients (each sends its next request when the last one ends) or at
    `rate` requests/s with exponential gaps; no request starts after `duration_s`. `on_result` sees each
    result as it comes."""
    if (concurrency is None) == (rate is None):
        raise ValueError("give a concurrency or a rate, not both")
    limits = httpx2.Limits(max_connections=concurrency or 1000, max_keepalive_connections=concurrency or 100)
    async with httpx2.AsyncClient(timeout=httpx2.Timeout(timeout_s), limits=limits) as client:
        start = time.perf_counter()
        end = start + duration_s
        if concurrency is not None:
            results = await _closed_loop(client, url, specs, concurrency, end, on_result)
        else:
            results = await _open_loop(client, url, specs, rate, end, random.Random(seed), on_result)
        wall = time.perf_counter() - start
    results.sort(key=lambda r: r.index)
    return LoadRun(results, wall, "count" if len(results) == len(specs) else "duration")


async def _sent(client, url, spec, on_result) -> RequestResult:
    result = await send(client, url, spec)
    on_result(result)
    return result


async def _closed_loop(client, url, specs, concurrency, end, on_result) -> list[RequestResult]:
    pending = iter(specs)
    results: list[RequestResult] = []

    async def client_loop():
        for spec in pending:  # the iterator is shared: each client takes the next unsent request
            if time.perf_counter() > end:
                return
            results.append(await _sent(client, url, spec, on_result))

    await asyncio.gather(*(client_loop() for _ in range(concurrency)))
    return results


async def _open_loop(client, url, specs, rate, end, rng: random.Random, on_result) -> list[RequestResult]:
    tasks = []
    for spec in specs:
        if time.perf_counter() > end:
            break
        tasks.append(asyncio.create_task(_sent(client, url, spec, on_result)))
        await asyncio.sleep(rng.expovariate(rate))
    return list(await asyncio.gather(*tasks))
