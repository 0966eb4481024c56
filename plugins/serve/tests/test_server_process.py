"""`ryzen serve` as a user runs it: a uvicorn process on a free loopback port, called by the official
`openai` client unchanged (plain and streaming), then stopped by SIGTERM mid-stream: the stream
finishes, the process exits 0."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import pytest
from openai import OpenAI


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def server(trained_run, ryzen_cache_dir):
    port = free_port()
    env = {**os.environ, "RYZEN_CACHE_DIR": str(ryzen_cache_dir)}
    process = subprocess.Popen([sys.executable, "-m", "ryzen_core.cli", "serve", str(trained_run), "--port", str(port),
                                "--model-name", "tiny", "--shutdown-deadline", "60"],
                               env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        while process.poll() is None:  # no deadline here: a loaded machine is slow, not broken
            try:
                urllib.request.urlopen(f"{url}/health").close()  # raises HTTPError (a URLError) on 503
                break
            except (urllib.error.URLError, ConnectionError):  # not listening yet, or 503 while warming up
                pass
            time.sleep(0.2)
        assert process.poll() is None, process.stdout.read()
        yield process, url
    finally:
        if process.poll() is None:
            process.kill()
        process.wait()


def test_the_openai_client_works_unchanged_then_sigterm_finishes_the_stream_and_exits_0(server, loaded, greedy):
    process, url = server
    tokenizer = loaded[1]
    client = OpenAI(base_url=f"{url}/v1", api_key="x")
    plain = client.completions.create(model="tiny", prompt="def ", max_tokens=8, temperature=0)
    assert plain.choices[0].text == tokenizer.decode(greedy("def ", 8))
    assert plain.usage.completion_tokens == len(greedy("def ", 8))
    streamed = "".join(chunk.choices[0].text for chunk in
                       client.completions.create(model="tiny", prompt="def ", max_tokens=8, temperature=0, stream=True))
    assert streamed == plain.choices[0].text

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
    assert process.wait(timeout=600) == 0, process.stdout.read()
    assert pieces[-1] is None
    assert "".join(pieces[:-1]) == tokenizer.decode(greedy("import os\n", 40))
