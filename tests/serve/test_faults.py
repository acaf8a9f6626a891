"""`llmopt serve` under bad input and load: disconnects, oversize prompts, garbage bodies, a full queue,
the API key, and SIGTERM draining in-flight requests before exiting 0."""

from __future__ import annotations

import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest

from .conftest import CAPACITY, start_server


def _post(server, path: str, body, **kw) -> httpx.Response:
    content = body if isinstance(body, (str, bytes)) else json.dumps(body)
    return httpx.post(server.url + path, content=content, headers={"content-type": "application/json"}, timeout=60, **kw)


def _wait_idle(server, timeout: float = 10) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        h = httpx.get(server.url + "/health").json()
        if h["running"] == 0 and h["waiting"] == 0:
            return h
        time.sleep(0.02)
    raise AssertionError(f"server still busy after {timeout}s: {h}")


def test_stream_disconnect_frees_slot(server):
    before = server.metrics()
    body = {"model": server.model, "prompt": "The history of", "max_tokens": CAPACITY - 16, "temperature": 0,
            "stream": True}
    with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=60) as r:
        lines = r.iter_lines()
        got = [next(lines) for _ in range(6)]  # a few events, then hang up mid-stream
    assert any(line.startswith("data: {") for line in got)
    _wait_idle(server)
    after = server.metrics()
    assert after["llmopt_cancelled_sequences_total"] == before["llmopt_cancelled_sequences_total"] + 1
    generated = after["llmopt_generated_tokens_total"] - before["llmopt_generated_tokens_total"]
    assert generated < CAPACITY - 16, "the sequence ran to max_tokens after its client left"


def test_non_stream_disconnect_frees_slot(server):
    before = server.metrics()
    body = {"model": server.model, "prompt": "The history of", "max_tokens": CAPACITY - 16, "temperature": 0}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(server.url + "/v1/completions", json=body, timeout=httpx.Timeout(60, read=0.05))
    _wait_idle(server)
    after = server.metrics()
    assert after["llmopt_cancelled_sequences_total"] == before["llmopt_cancelled_sequences_total"] + 1
    assert after["llmopt_generated_tokens_total"] - before["llmopt_generated_tokens_total"] < CAPACITY - 16


def test_oversize_prompt_and_max_tokens(server):
    client = server.client()
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=server.model, prompt="word " * (2 * CAPACITY), max_tokens=4)
    assert e.value.code == "context_length_exceeded" and f"at most {CAPACITY} tokens" in e.value.message
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=server.model, prompt="The history of", max_tokens=CAPACITY)
    assert "lower max_tokens" in e.value.message
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=server.model, prompt=[0, 1, 10 ** 6], max_tokens=4)


@pytest.mark.parametrize("body,status,words", [
    ('{"model": "x", "prompt": ', 400, "not valid JSON"),
    ("[1, 2, 3]", 422, "body"),
    ({"prompt": "hi"}, 422, "model: Field required"),
    ({"model": "M", "prompt": "hi", "max_tokens": 4, "frobnicate": 1}, 422, "frobnicate: unknown field"),
    ({"model": "M", "prompt": "hi", "temperature": 7}, 422, "temperature"),
    ({"model": "M", "prompt": "hi", "top_p": 0}, 422, "top_p"),
    ({"model": "M", "prompt": "hi", "max_tokens": 0}, 422, "max_tokens"),
    ({"model": "M", "prompt": "hi", "n": 3}, 422, "n:"),
    ({"model": "M", "prompt": "hi", "stop": ["a", "b", "c", "d", "e"]}, 422, "at most 4 stop"),
    ({"model": "M", "prompt": ["a", "b"]}, 422, "one prompt per request"),
    ({"model": "M", "prompt": ""}, 400, "prompt is empty"),
    ({"model": "other", "prompt": "hi"}, 404, "not served here"),
    ({"model": "M", "prompt": "hi", "presence_penalty": 0.5}, 422, "presence_penalty is not supported"),
])
def test_garbage_gets_a_message(server, body, status, words):
    if isinstance(body, dict) and body.get("model") == "M":
        body = {**body, "model": server.model}
    r = _post(server, "/v1/completions", body)
    assert r.status_code == status, r.text
    assert words in r.json()["error"]["message"]


def test_chat_garbage(server):
    r = _post(server, "/v1/chat/completions", {"model": server.model, "messages": []})
    assert r.status_code == 422 and "messages" in r.json()["error"]["message"]
    r = _post(server, "/v1/chat/completions", {"model": server.model, "messages": [{"role": "wizard", "content": "x"}]})
    assert r.status_code == 422 and "role" in r.json()["error"]["message"]
    # still serving after all of it
    ok = server.client().completions.create(model=server.model, prompt="The", max_tokens=3, temperature=0,
                                            presence_penalty=0, frequency_penalty=0)  # neutral values pass
    assert ok.usage.completion_tokens == 3


@pytest.fixture(scope="module")
def guarded(serve_engine):
    """One slot, one waiting place, an API key: overload, auth and drain run against it."""
    s = start_server(serve_engine, "--max-batch", "1", "--max-queue", "1", "--api-key", "sekret")
    yield s
    s.stop()


def test_api_key(guarded):
    with pytest.raises(openai.AuthenticationError):
        guarded.client(api_key="wrong").models.list()
    r = httpx.post(guarded.url + "/v1/completions", json={"model": guarded.model, "prompt": "x"})
    assert r.status_code == 401 and "API key" in r.json()["error"]["message"]
    assert httpx.get(guarded.url + "/health").status_code == 200
    got = guarded.client(api_key="sekret").completions.create(model=guarded.model, prompt="The", max_tokens=2)
    assert got.usage.completion_tokens == 2


def test_full_queue_answers_429(guarded):
    client = guarded.client(api_key="sekret")

    def one(_: int) -> str:
        try:
            client.completions.create(model=guarded.model, prompt="The history of", max_tokens=200, temperature=0)
            return "ok"
        except openai.RateLimitError as exc:
            assert "retry later" in exc.message
            return "429"

    with ThreadPoolExecutor(5) as pool:
        results = list(pool.map(one, range(5)))
    assert results.count("ok") >= 2 and results.count("429") >= 1, results
    assert "ok" in {one(0)}  # and it serves again once the queue has room


def test_sigterm_drains_then_exits_0(guarded):
    """SIGTERM while one request streams and one waits: both finish completely, then exit code 0."""
    client = guarded.client(api_key="sekret")
    results: dict[str, object] = {}

    def streaming() -> None:
        chunks = list(client.completions.create(model=guarded.model, prompt="The history of", max_tokens=CAPACITY - 16,
                                                temperature=0, stream=True))
        results["stream"] = chunks

    def queued() -> None:
        results["queued"] = client.completions.create(model=guarded.model, prompt="In the", max_tokens=40, temperature=0)

    threads = [threading.Thread(target=streaming), threading.Thread(target=queued)]
    threads[0].start()
    time.sleep(0.05)
    threads[1].start()
    deadline = time.monotonic() + 10
    while httpx.get(guarded.url + "/health").json()["waiting"] < 1 and time.monotonic() < deadline:
        time.sleep(0.01)
    url = guarded.url
    assert guarded.stop() == 0, "".join(guarded.stderr)[-2000:]
    for t in threads:
        t.join(30)
    chunks = results["stream"]
    assert chunks[-1].choices[0].finish_reason == "length"
    assert sum(1 for c in chunks if c.choices[0].text) > 10
    assert results["queued"].usage.completion_tokens == 40
    with pytest.raises(httpx.ConnectError):
        httpx.get(url + "/health")
    assert "draining" in "".join(guarded.stderr)


def test_serve_user_errors(cli, serve_engine, tmp_path):
    import socket

    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    try:
        r = cli("serve", serve_engine, "--port", busy.getsockname()[1])
        assert r.code == 1 and "cannot listen on 127.0.0.1" in r.err and "Traceback" not in r.err
    finally:
        busy.close()
    r = cli("serve", tmp_path / "missing", "--port", "0")
    assert r.code == 1 and "no such directory" in r.err
    r = cli("serve", serve_engine.parent / "onnx", "--port", "0", "--max-batch", "2")
    assert r.code == 1 and "one sequence at a time" in r.err
