"""Serving something other than the batched torch model: a backend that generates whole requests (an
export through its plugin's load_backend, or the torch model through plugins' on_infer) is served one
request after another, says so, and answers like the batched path."""
from __future__ import annotations

import json
import queue
import shutil

import pytest
from fastapi.testclient import TestClient

from ryzen_core import TorchBackend
from ryzen_plugin_serve.app import create_app
from ryzen_plugin_serve.cli import load_engine
from ryzen_plugin_serve.engine import Engine, Limits, Sampling
from ryzen_plugin_serve.model_sources import folded_backend
from ryzen_plugin_serve.runners import WholeRequestRunner

PROMPTS = ["def ", "import os\n", "class Parser(object):\n"]


def serve(engine: Engine):
    client = TestClient(create_app(engine, "tiny", shutdown_deadline_s=5))
    return client


def greedy_texts(client, max_tokens=6):
    return [client.post("/v1/completions", json={"model": "tiny", "prompt": p, "max_tokens": max_tokens,
                                                 "temperature": 0}).json()["choices"][0]["text"] for p in PROMPTS]


def test_a_whole_request_backend_is_served_one_at_a_time_says_so_and_matches_generate(loaded, greedy):
    model, tokenizer, context = loaded
    engine = Engine(None, tokenizer, context, Limits(), runner=WholeRequestRunner(TorchBackend(model), "plain loop"))
    with serve(engine) as client:
        assert engine.ready.wait(timeout=600)
        details = client.get("/v1/models").json()["data"][0]["ryzen"]
        assert details["batching"].startswith("none") and client.get("/health").json()["batching"].startswith("none")
        assert greedy_texts(client) == [tokenizer.decode(greedy(p, 6)) for p in PROMPTS]
        with client.stream("POST", "/v1/completions", json={"model": "tiny", "prompt": "def ", "max_tokens": 6,
                                                             "temperature": 0, "stream": True}) as response:
            lines = [line for line in response.iter_lines() if line]
        assert lines[-1] == "data: [DONE]"
        text = "".join(json.loads(line[6:])["choices"][0]["text"] for line in lines[:-1])
        assert text == tokenizer.decode(greedy("def ", 6))
        several = client.post("/v1/completions", json={"model": "tiny", "prompt": PROMPTS, "n": 2, "max_tokens": 4,
                                                       "temperature": 0}).json()
        assert [c["text"] for c in several["choices"]] == [tokenizer.decode(greedy(p, 4)) for p in PROMPTS
                                                           for _ in range(2)]
    occupancy = {s.labels.get("le"): s.value for s in engine.metrics.occupancy.collect()[0].samples
                 if s.name.endswith("_bucket")}
    assert occupancy["1.0"] == occupancy["+Inf"]  # never two sequences at once


def test_a_cancelled_request_stops_the_backend_mid_generation(loaded):
    model, tokenizer, context = loaded
    engine = Engine(None, tokenizer, context, Limits(),
                    runner=WholeRequestRunner(TorchBackend(model), "plain loop")).start()
    assert engine.ready.wait(timeout=600)
    made = []
    backend = engine.runner.backend
    original = backend.generate

    def generate_and_cancel(input_ids, max_new_tokens, on_token, **sampling):
        def count(i):
            made.append(i)
            engine.cancel(seq)
            on_token(i)
        return original(input_ids, max_new_tokens, on_token=count, **sampling)

    backend.generate = generate_and_cancel
    events = queue.Queue()
    try:
        with engine.paused():
            seq = engine.submit(tokenizer.encode("def "), Sampling(40), events.put)
        while (event := events.get(timeout=600)).kind == "text":
            pass
    finally:
        engine.shutdown(5)
    assert event.finish_reason == "cancelled" and len(made) == 1 and engine.active == []


def test_plugins_fold_on_infer_over_the_torch_model_and_the_plugin_generates(trained_run, loaded):
    pytest.importorskip("ryzen_plugin_kv_cache")
    model, tokenizer, context = loaded
    backend, host = folded_backend(model, tokenizer, trained_run, ["kvcache"])
    engine = Engine(model, tokenizer, context, Limits(), runner=WholeRequestRunner(backend, "kvcache"))
    with serve(engine) as client:
        assert engine.ready.wait(timeout=600)
        assert client.get("/health").json()["backend"] == "torch+kvcache"
        texts = greedy_texts(client, max_tokens=4)
    assert all(texts)
    assert any(e.plugin == "kvcache" and e.event == "generation" for e in host.events)


def test_an_onnx_export_is_served_through_its_plugins_load_backend(trained_run, loaded, greedy, tmp_path):
    onnx = pytest.importorskip("ryzen_plugin_onnx_export.plugin")
    model, tokenizer, _ = loaded
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    settings = onnx.OnnxSettings(int8=False, int4=False, max_positions=64)
    result = onnx.on_export(model, tokenizer, run / "export", settings, lambda *a, **k: None)
    (name,) = result.exports
    engine = load_engine(run, Limits(), None, backend=name)
    with serve(engine) as client:
        assert engine.ready.wait(timeout=600)
        assert client.get("/health").json()["backend"] == name
        assert greedy_texts(client) == [tokenizer.decode(greedy(p, 6)) for p in PROMPTS]


@pytest.mark.parametrize("args, message", [
    (["--backend", "onnxruntime-fp32"], "no export named 'onnxruntime-fp32'"),
    (["--plugins", "no-such-plugin"], "no-such-plugin"),
    (["--backend", "onnxruntime-fp32", "--plugins", "kvcache"], "--backend torch"),
])
def test_a_backend_or_plugin_that_cannot_be_served_is_one_line_and_exit_2(ryzen, trained_run, args, message):
    result = ryzen("serve", str(trained_run), *args)
    assert result.exit_code == 2 and result.stderr.count("\n") == 1, result.output
    assert message in result.stderr
