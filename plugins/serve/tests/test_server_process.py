"""`ryzen serve` as a user runs it: a uvicorn process on a free loopback port, called by the official
`openai` client unchanged (plain and streaming), then stopped by SIGTERM mid-stream: the stream
finishes, the process exits 0."""
from __future__ import annotations

import json
import signal
import threading

import pytest
from openai import OpenAI

from ryzen_plugin_serve.server_process import ServerProcess


@pytest.fixture
def server(trained_run, tmp_path):
    log = tmp_path / "server.log"
    with ServerProcess(trained_run, ["--model-name", "tiny", "--shutdown-deadline", "60", "--threads", "1"], log) as server:
        yield server.process, server.url, log


def test_the_openai_client_works_unchanged_then_sigterm_finishes_the_stream_and_exits_0(server, loaded, greedy):
    process, url, log = server
    tokenizer = loaded[1]
    client = OpenAI(base_url=f"{url}/v1", api_key="x")
    plain = client.completions.create(model="tiny", prompt="def ", max_tokens=8, temperature=0)
    assert plain.choices[0].text == tokenizer.decode(greedy("def ", 8))
    assert plain.usage.completion_tokens == len(greedy("def ", 8))
    streamed = "".join(chunk.choices[0].text for chunk in
                       client.completions.create(model="tiny", prompt="def ", max_tokens=8, temperature=0, stream=True))
    assert streamed == plain.choices[0].text
    several = client.completions.create(model="tiny", prompt=["def ", "import os\n"], n=2, max_tokens=4, seed=1)
    assert [c.index for c in several.choices] == [0, 1, 2, 3]

    first_chunk, pieces = threading.Event(), []

    def read_stream():
        for chunk in client.completions.create(model="tiny", prompt="import os\n", max_tokens=40, temperature=0,
                                               stream=True):
            pieces.append(chunk.choices[0].text)
            first_chunk.set()
        pieces.append(None)  # the stream ended with [DONE]

    reader = threading.Thread(target=read_stream)
    reader.start()
    assert first_chunk.wait(timeout=600)
    process.send_signal(signal.SIGTERM)
    reader.join(timeout=600)
    assert process.wait(timeout=600) == 0, log.read_text()
    assert pieces[-1] is None
    assert "".join(pieces[:-1]) == tokenizer.decode(greedy("import os\n", 40))


def test_bench_serve_given_the_url_of_a_running_server_loads_it_and_reports_without_a_baseline(server, ryzen, tmp_path):
    _, url, _ = server
    result = ryzen("bench", "serve", url, "--rate", "20", "--requests", "6", "--rounds", "1", "--max-tokens", "3",
                   "--out", str(tmp_path))
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "bench_serve.json").read_text())
    assert report["model"] == "tiny" and list(report["servers"]) == ["server"]
    (level,) = report["levels"]
    assert level["servers"]["server"]["completed"] == 6 and "ratio" not in level
