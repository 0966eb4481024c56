"""The HTTP side: a FastAPI app over an Engine, speaking OpenAI's completions protocol.

Bodies are parsed by hand (protocol.parse_request) rather than by FastAPI's signature binding, so
every kind of bad input (bytes that are not UTF-8, JSON that does not parse, a wrong type) gets the
same one-line `{"error": ...}` with a 4xx status. The engine runs in its own thread; each request
waits on an asyncio queue the scheduler feeds through `loop.call_soon_threadsafe`.
"""
from __future__ import annotations

import asyncio
import time
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from .engine import Engine, Event, Refused, Sampling
from .protocol import (ApiError, CompletionIds, CompletionRequest, error_body, parse_request, prompt_texts, sse,
                       usage)

REFUSALS = {"queue_full": (429, "rate_limit_error"), "loading": (503, "server_error"),
            "shutting_down": (503, "server_error")}
ERROR_STATUS = {"timeout": 504, "shutdown": 503, "internal_error": 500}


def create_app(engine: Engine, model_name: str, shutdown_deadline_s: float = 30.0) -> FastAPI:
    """The app serving `engine` as model `model_name`; its lifespan starts the engine and drains it."""

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        engine.start()
        yield
        await asyncio.to_thread(engine.shutdown, shutdown_deadline_s)

    app = FastAPI(title="ryzen serve", lifespan=lifespan)
    app.state.engine, app.state.model_name = engine, model_name

    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError):
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        return JSONResponse(error_body(str(exc.detail), "invalid_request_error", code), status_code=exc.status_code)

    @app.get("/health")
    async def health():
        if engine.ready.is_set() and engine.accepting:
            return {"status": "ok", **engine.describe()}
        state = "shutting down" if not engine.accepting else "loading"
        return JSONResponse({"status": state}, status_code=503)

    @app.get("/metrics")
    async def metrics():
        return Response(engine.metrics.text(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": int(time.time()),
                                            "owned_by": "ryzen", "ryzen": engine.describe()}]}

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = parse_request(await request.body())
        if body.model != model_name:
            raise ApiError(404, f"model {body.model!r} does not exist; this server serves {model_name!r}",
                           "model_not_found")
        choices = _prepare(engine, body)
        events: asyncio.Queue[tuple[int, Event]] = asyncio.Queue()
        seqs = _submit(engine, choices, events)
        ids = CompletionIds(model_name)
        if body.stream:
            return StreamingResponse(_stream(engine, seqs, events, ids), media_type="text/event-stream")
        return await _complete(engine, seqs, events, ids, request)

    return app


def _prepare(engine: Engine, body: CompletionRequest) -> list[tuple[list[int], Sampling]]:
    """(prompt tokens, sampling) of every choice: for each prompt in order, n choices. With a seed, choice i
    samples with seed + i, so the choices of one request differ and the request as a whole repeats."""
    choices = []
    for text in prompt_texts(body):
        prompt = engine.tokenizer.encode(text)
        problem = engine.check(prompt, body.max_tokens)
        if problem:
            raise ApiError(400, problem, "invalid_value")
        for _ in range(body.n):
            seed = None if body.seed is None else body.seed + len(choices)
            choices.append((prompt, Sampling(body.max_tokens, body.temperature, body.top_k, body.top_p, seed,
                                             body.stop_strings())))
    return choices


def _submit(engine: Engine, choices: list[tuple[list[int], Sampling]], events: asyncio.Queue) -> list:
    """Queue every choice's sequence; each one's events reach `events` tagged with its choice index."""
    loop = asyncio.get_running_loop()

    def sink_for(index: int):
        def sink(event: Event) -> None:
            try:
                loop.call_soon_threadsafe(events.put_nowait, (index, event))
            except RuntimeError:  # the loop closed: the client and its handler are gone
                pass
        return sink

    try:
        return engine.submit_all([(prompt, sampling, sink_for(i)) for i, (prompt, sampling) in enumerate(choices)])
    except Refused as exc:
        status, kind = REFUSALS[exc.reason]
        raise ApiError(status, str(exc), exc.reason, kind, {"Retry-After": "1"}) from None


def _usage(seqs: list) -> dict[str, int]:
    """Prompt tokens once per distinct prompt (n choices share theirs), completion tokens of every choice."""
    prompts = {id(seq.prompt): len(seq.prompt) for seq in seqs}
    return usage(sum(prompts.values()), sum(len(seq.tokens) for seq in seqs))


def _cancel_all(engine: Engine, seqs: list) -> None:
    for seq in seqs:
        engine.cancel(seq)  # a no-op for a finished sequence


async def _complete(engine: Engine, seqs: list, events: asyncio.Queue, ids: CompletionIds, request: Request):
    """Wait for every choice; a client that disconnects meanwhile frees their slots."""
    texts, finished = [[] for _ in seqs], {}
    try:
        while len(finished) < len(seqs):
            try:
                index, event = await asyncio.wait_for(events.get(), timeout=1.0)
            except asyncio.TimeoutError:
                if await request.is_disconnected():
                    _cancel_all(engine, seqs)
                    return Response(status_code=499)
                continue
            if event.kind == "text":
                texts[index].append(event.text)
            elif event.kind == "error":
                _cancel_all(engine, seqs)
                raise ApiError(ERROR_STATUS.get(event.code, 500), event.text, event.code, "server_error")
            else:
                finished[index] = event.finish_reason
    except asyncio.CancelledError:
        _cancel_all(engine, seqs)
        raise
    return ids.body([(i, "".join(texts[i]), finished[i]) for i in range(len(seqs))], _usage(seqs))


async def _stream(engine: Engine, seqs: list, events: asyncio.Queue, ids: CompletionIds):
    """SSE chunks in OpenAI's shape, one choice each (its `index` says which); a choice's last chunk has its
    finish reason, the very last one also the usage of all; then `data: [DONE]`. When the client
    disconnects the server cancels this generator, and the sequences leave the batch."""
    finished = 0
    try:
        while finished < len(seqs):
            index, event = await events.get()
            if event.kind == "text":
                yield sse(ids.body([(index, event.text, None)]))
            elif event.kind == "error":
                yield sse(error_body(event.text, "server_error", event.code))
                break
            else:
                finished += 1
                yield sse(ids.body([(index, "", event.finish_reason)], _usage(seqs) if finished == len(seqs) else None))
        yield sse("[DONE]")
    finally:
        _cancel_all(engine, seqs)
