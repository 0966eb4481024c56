"""The OpenAI completions protocol: the request model, the response and chunk shapes, the error shape.

Types are strict (a string where a number belongs is a 400, not silently converted), and every
problem becomes `{"error": {"message", "type", "code"}}` with a 4xx status: one line a client can show.
"""
from __future__ import annotations

import json
import time
import uuid
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

MAX_N = 8
"""Most choices one request may ask for (`n`); each is a sequence of its own in the batch."""
MAX_PROMPTS = 8
"""Most prompts in one request's list."""
MAX_CHOICES = 16
"""Most sequences one request may start: prompts times n."""


class CompletionRequest(BaseModel):
    """POST /v1/completions. Unknown fields are ignored, as OpenAI-compatible servers do."""

    model_config = ConfigDict(strict=True, extra="ignore")

    model: str
    prompt: str | list[str]
    max_tokens: int = Field(16, ge=0)
    temperature: float = Field(1.0, ge=0.0, le=100.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=0)
    stop: str | list[str] | None = None
    seed: int | None = None
    n: int = Field(1, ge=1)
    stream: bool = False

    def stop_strings(self) -> list[str]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        return [s for s in stops if s]


class ApiError(Exception):
    """A request the server refuses: HTTP status, OpenAI error type and code, one-line message."""

    def __init__(self, status: int, message: str, code: str, kind: str = "invalid_request_error",
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.kind, self.headers = status, message, code, kind, headers or {}

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.kind, self.code)


def error_body(message: str, kind: str, code: str) -> dict[str, Any]:
    return {"error": {"message": " ".join(message.split())[:500], "type": kind, "code": code}}


def parse_request(raw: bytes) -> CompletionRequest:
    """The request in `raw`, or an ApiError naming the first thing wrong with it."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ApiError(400, f"the request body is not UTF-8 (byte {exc.start})", "invalid_encoding") from None
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise ApiError(400, f"the request body is not valid JSON: {exc}", "invalid_json") from None
    if not isinstance(data, dict):
        raise ApiError(400, "the request body must be a JSON object", "invalid_json")
    try:
        request = CompletionRequest.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(part) for part in first["loc"]) or "body"
        raise ApiError(400, f"{where}: {first['msg']}", "invalid_value") from None
    prompts = prompt_texts(request)
    if not 1 <= len(prompts) <= MAX_PROMPTS:
        raise ApiError(400, f"prompt: send one string or a list of 1 to {MAX_PROMPTS}, got a list of {len(prompts)}",
                       "invalid_value")
    if request.n > MAX_N:
        raise ApiError(400, f"n: at most {MAX_N} choices per request, got {request.n}", "invalid_value")
    if len(prompts) * request.n > MAX_CHOICES:
        raise ApiError(400, f"{len(prompts)} prompts times n={request.n} is more than the {MAX_CHOICES} completions "
                       "one request may ask for", "invalid_value")
    return request


def prompt_texts(request: CompletionRequest) -> list[str]:
    return [request.prompt] if isinstance(request.prompt, str) else list(request.prompt)


class CompletionIds:
    """The id and creation time one completion's response and chunks share."""

    def __init__(self, model: str):
        self.id, self.created, self.model = f"cmpl-{uuid.uuid4().hex}", int(time.time()), model

    def body(self, choices: list[tuple[int, str, str | None]], usage: dict[str, int] | None = None) -> dict[str, Any]:
        """A response (every choice) or a streamed chunk (one): choices as (index, text, finish_reason)."""
        body = {"id": self.id, "object": "text_completion", "created": self.created, "model": self.model,
                "choices": [{"text": text, "index": index, "logprobs": None, "finish_reason": finish}
                            for index, text, finish in choices]}
        if usage is not None:
            body["usage"] = usage
        return body


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def sse(data: dict[str, Any] | str) -> str:
    """One server-sent event."""
    return f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n"
