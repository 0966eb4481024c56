"""The HTTP API through FastAPI's TestClient: the OpenAI shapes, streaming, bad input, 429, /health, /metrics."""
from __future__ import annotations

import json
import queue

import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from ryzen_plugin_serve.app import create_app
from ryzen_plugin_serve.engine import Engine, Limits, Sampling

MODEL = "tiny"


def serving(loaded, **limits):
    model, tokenizer, context = loaded
    engine = Engine(model, tokenizer, context, Limits(**limits))
    return engine, create_app(engine, MODEL, shutdown_deadline_s=5)


@pytest.fixture
def client(loaded):
    engine, app = serving(loaded)
    with TestClient(app) as client:
        assert engine.ready.wait(timeout=600)
        yield client


def complete(client, prompt, **fields):
    return client.post("/v1/completions", json={"model": MODEL, "prompt": prompt, **fields})


def test_health_is_503_until_the_model_is_loaded_and_warm_then_200(loaded):
    engine, app = serving(loaded)
    assert TestClient(app).get("/health").status_code == 503  # lifespan not run: the engine never started
    with TestClient(app) as client:
        assert engine.ready.wait(timeout=600)
        health = client.get("/health").json()
        assert health["status"] == "ok" and health["batching"].startswith("continuous") and health["max_batch"] == 8


def test_models_lists_the_served_model(client):
    assert [m["id"] for m in client.get("/v1/models").json()["data"]] == [MODEL]


def test_greedy_completion_is_what_generate_makes(client, loaded, greedy):
    tokenizer = loaded[1]
    response = complete(client, "def ", max_tokens=8, temperature=0)
    assert response.status_code == 200
    body = response.json()
    expected = greedy("def ", 8)
    assert body["object"] == "text_completion" and body["model"] == MODEL
    assert body["choices"][0]["text"] == tokenizer.decode(expected)
    assert body["choices"][0]["finish_reason"] == ("length" if len(expected) == 8 else "stop")
    assert body["usage"] == {"prompt_tokens": len(tokenizer.encode("def ")), "completion_tokens": len(expected),
                             "total_tokens": len(tokenizer.encode("def ")) + len(expected)}


def test_streaming_sends_openai_chunks_that_add_up_to_the_completion_then_done(client):
    whole = complete(client, "import os\n", max_tokens=10, temperature=0).json()["choices"][0]["text"]
    with client.stream("POST", "/v1/completions", json={"model": MODEL, "prompt": "import os\n", "max_tokens": 10,
                                                         "temperature": 0, "stream": True}) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in response.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    chunks = [json.loads(line.removeprefix("data: ")) for line in lines[:-1]]
    assert all(c["object"] == "text_completion" for c in chunks)
    assert "".join(c["choices"][0]["text"] for c in chunks) == whole
    assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")


def test_the_same_seed_samples_the_same_completion(client):
    fields = dict(max_tokens=12, temperature=1.0, top_k=20, top_p=0.9, seed=7)
    first, second = (complete(client, "def ", **fields).json()["choices"][0]["text"] for _ in range(2))
    assert first == second


def test_n_choices_of_a_list_of_prompts_are_each_what_generate_makes_in_openai_order(client, loaded, greedy):
    tokenizer = loaded[1]
    prompts = ["def ", "import os\n"]
    body = complete(client, prompts, n=2, max_tokens=6, temperature=0).json()
    assert [c["index"] for c in body["choices"]] == [0, 1, 2, 3]
    expected = [greedy(p, 6) for p in prompts for _ in range(2)]  # each prompt's n choices, prompt by prompt
    assert [c["text"] for c in body["choices"]] == [tokenizer.decode(t) for t in expected]
    assert body["usage"]["prompt_tokens"] == sum(len(tokenizer.encode(p)) for p in prompts)  # once per prompt
    assert body["usage"]["completion_tokens"] == sum(len(t) for t in expected)


def test_sampled_choices_differ_and_a_seed_repeats_the_whole_request(client):
    fields = dict(n=4, max_tokens=12, temperature=1.0, seed=11)
    first, again = ([c["text"] for c in complete(client, "def ", **fields).json()["choices"]] for _ in range(2))
    assert first == again and len(set(first)) > 1


def test_streamed_choices_carry_their_index_and_add_up_to_the_plain_response(client):
    fields = {"model": MODEL, "prompt": "def ", "n": 3, "max_tokens": 8, "temperature": 1.0, "seed": 5}
    plain = [c["text"] for c in client.post("/v1/completions", json=fields).json()["choices"]]
    with client.stream("POST", "/v1/completions", json={**fields, "stream": True}) as response:
        lines = [line for line in response.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    chunks = [json.loads(line.removeprefix("data: ")) for line in lines[:-1]]
    streamed = ["".join(c["choices"][0]["text"] for c in chunks if c["choices"][0]["index"] == i) for i in range(3)]
    assert streamed == plain
    assert sum(1 for c in chunks if c["choices"][0]["finish_reason"]) == 3 and "usage" in chunks[-1]


BAD_INPUTS = [
    (b"{not json", 400, "invalid_json"),
    (b"[1, 2]", 400, "invalid_json"),
    (b'{"model": "tiny", "prompt": "\xff\xfe"}', 400, "invalid_encoding"),
    (b'{"prompt": "def"}', 400, "invalid_value"),
    (b'{"model": "tiny", "prompt": 5}', 400, "invalid_value"),
    (b'{"model": "tiny", "prompt": "def", "max_tokens": "8"}', 400, "invalid_value"),
    (b'{"model": "tiny", "prompt": "def", "max_tokens": -1}', 400, "invalid_value"),
    (b'{"model": "tiny", "prompt": "def", "max_tokens": 1000000000}', 400, "invalid_value"),
    (b'{"model": "tiny", "prompt": "def", "temperature": -0.5}', 400, "invalid_value"),
    (b'{"model": "tiny", "prompt": "def", "top_p": 0}', 400, "invalid_value"),
    (b'{"model": "tiny", "prompt": "def", "stream": "yes"}', 400, "invalid_value"),
    (b'{"model": "tiny", "prompt": ""}', 400, "invalid_value"),
    (json.dumps({"model": "tiny", "prompt": "word " * 500}).encode(), 400, "invalid_value"),
    (b'{"model": "tiny", "prompt": []}', 400, "invalid_value"),
    (json.dumps({"model": "tiny", "prompt": ["def"] * 9}).encode(), 400, "invalid_value"),
    (b'{"model": "tiny", "prompt": "def", "n": 9}', 400, "invalid_value"),
    (b'{"model": "tiny", "prompt": "def", "n": 0}', 400, "invalid_value"),
    (b'{"model": "tiny", "prompt": ["def", "class", "return"], "n": 6}', 400, "invalid_value"),
    (b'{"model": "tiny", "prompt": ["def", ""]}', 400, "invalid_value"),
    (b'{"model": "gpt-4", "prompt": "def"}', 404, "model_not_found"),
]


@pytest.mark.parametrize("body, status, code", BAD_INPUTS)
def test_bad_input_is_a_4xx_with_one_line_json_error(client, body, status, code):
    response = client.post("/v1/completions", content=body, headers={"content-type": "application/json"})
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["code"] == code and set(error) == {"message", "type", "code"}
    assert error["message"] and "\n" not in error["message"]
    assert client.get("/health").status_code == 200  # the worker survived


def test_unknown_paths_and_methods_use_the_same_error_shape(client):
    assert client.get("/v1/nothing").json()["error"]["code"] == "not_found"
    assert client.get("/v1/completions").json()["error"]["code"] == "method_not_allowed"


def test_a_full_queue_answers_429_with_retry_after(loaded):
    engine, app = serving(loaded, max_queue=1)
    tokenizer = loaded[1]
    with TestClient(app) as client:
        assert engine.ready.wait(timeout=600)
        queued = queue.Queue()
        with engine.paused():
            engine.submit(tokenizer.encode("def "), Sampling(2), queued.put)
            response = complete(client, "def ", max_tokens=2)
        assert response.status_code == 429 and response.headers["retry-after"] == "1"
        assert response.json()["error"]["code"] == "queue_full"
        while queued.get(timeout=600).kind == "text":  # the queued request runs once the scheduler goes on
            pass
        assert complete(client, "def ", max_tokens=2).status_code == 200


def test_a_request_past_its_timeout_ends_with_504(loaded, greedy):
    engine, app = serving(loaded, timeout_s=1e-6)
    prompt = next(p for p in ("def ", "import os\n", "return", "class ") if len(greedy(p, 3)) == 3)
    with TestClient(app) as client:
        assert engine.ready.wait(timeout=600)
        response = complete(client, prompt, max_tokens=3, temperature=0)
    assert response.status_code == 504 and response.json()["error"]["code"] == "timeout"


def test_metrics_parse_as_prometheus_text_and_count_the_work(client):
    complete(client, "def ", max_tokens=4, temperature=0)
    families = {f.name: f for f in text_string_to_metric_families(client.get("/metrics").text)}
    for name in ("ryzen_serve_requests_running", "ryzen_serve_requests_waiting", "ryzen_serve_time_to_first_token_seconds",
                 "ryzen_serve_inter_token_latency_seconds", "ryzen_serve_e2e_request_latency_seconds",
                 "ryzen_serve_batch_occupancy"):
        assert name in families, name
    value = {s.name: s.value for f in families.values() for s in f.samples}
    assert value["ryzen_serve_prompt_tokens_total"] >= 1
    assert value["ryzen_serve_generation_tokens_total"] >= 1
    assert value["ryzen_serve_time_to_first_token_seconds_count"] == 1
