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
from .protocol import ApiError, CompletionIds, CompletionRequest, error_body, parse_request, prompt_text, sse, usage

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
            return {"status": "ok"}
        state = "shutting down" if not engine.accepting else "loading"
        return JSONResponse({"status": state}, status_code=503)

    @app.get("/metrics")
    async def metrics():
        return Response(engine.metrics.text(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": int(time.time()),
                                            "owned_by": "ryzen"}]}

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = parse_request(await request.body())
        if body.model != model_name:
            raise ApiError(404, f"model {body.model!r} does not exist; this server serves {model_name!r}",
                           "model_not_found")
        prompt, sampling = _prepare(engine, body)
        events: asyncio.Queue[Event] = asyncio.Queue()
        seq = _submit(engine, prompt, sampling, events)
        ids = CompletionIds(model_name)
        if body.stream:
            return StreamingResponse(_stream(engine, seq, events, ids), media_type="text/event-stream")
        return await _complete(engine, seq, events, ids, request)

    return app


def _prepare(engine: Engine, body: CompletionRequest) -> tuple[list[int], Sampling]:
    prompt = engine.tokenizer.encode(prompt_text(body))
    problem = engine.check(prompt, body.max_tokens)
    if problem:
        raise ApiError(400, problem, "invalid_value")
    return prompt, Sampling(body.max_tokens, body.temperature, body.top_k, body.top_p, body.seed, body.stop_strings())


def _submit(engine: Engine, prompt: list[int], sampling: Sampling, events: asyncio.Queue):
    loop = asyncio.get_running_loop()

    def sink(event: Event) -> None:
        try:
            loop.call_soon_threadsafe(events.put_nowait, event)
        except RuntimeError:  # the loop closed: the client and its handler are gone
            pass

    try:
        return engine.submit(prompt, sampling, sink)
    except Refused as exc:
        status, kind = REFUSALS[exc.reason]
        raise ApiError(status, str(exc), exc.reason, kind, {"Retry-After": "1"}) from None


async def _complete(engine: Engine, seq, events: asyncio.Queue, ids: CompletionIds, request: Request):
    """Wait for the whole completion; a client that disconnects meanwhile frees its slot."""
    pieces = []
    try:
        while True:
            try:
                event = await asyncio.wait_for(events.get(), timeout=1.0)
            except asyncio.TimeoutError:
                if await request.is_disconnected():
                    engine.cancel(seq)
                    return Response(status_code=499)
                continue
            if event.kind == "text":
                pieces.append(event.text)
            elif event.kind == "error":
                raise ApiError(ERROR_STATUS.get(event.code, 500), event.text, event.code, "server_error")
            else:
                return ids.body("".join(pieces), event.finish_reason,
                                usage(event.prompt_tokens, event.completion_tokens))
    except asyncio.CancelledError:
        engine.cancel(seq)
        raise


async def _stream(engine: Engine, seq, events: asyncio.Queue, ids: CompletionIds):
    """SSE chunks in OpenAI's shape, the last with the finish reason and usage, then `data: [DONE]`.
    When the client disconnects the server cancels this generator, and the sequence leaves the batch."""
    try:
        while True:
            event = await events.get()
            if event.kind == "text":
                yield sse(ids.body(event.text, None))
            elif event.kind == "error":
                yield sse(error_body(event.text, "server_error", event.code))
                break
            else:
                yield sse(ids.body("", event.finish_reason, usage(event.prompt_tokens, event.completion_tokens)))
                break
        yield sse("[DONE]")
    finally:
        engine.cancel(seq)  # a no-op for a finished sequence
