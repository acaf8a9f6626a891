"""`llmopt serve` through the official openai client: completions, chat, streaming, stops, seeds, and
concurrent requests that give what the same requests give one at a time."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest

from .conftest import CAPACITY

PROMPTS = ["The history of", "In the beginning the", "A function returns", "Python is a language that",
           "When the file is opened", "The", "Errors should never pass silently unless",
           "Each module has its own"]


def _complete(server, prompt: str, **kw) -> openai.types.Completion:
    return server.client().completions.create(model=server.model, prompt=prompt, **kw)


def test_models_health_and_metrics(server):
    models = server.client().models.list()
    assert [m.id for m in models.data] == [server.model]
    health = httpx.get(server.url + "/health").json()
    assert health["status"] == "ok" and health["max_batch"] == server.ready["max_batch"] == 4
    assert server.ready["batching"] == "continuous" and server.ready["capacity"] == CAPACITY
    text = httpx.get(server.url + "/metrics").text
    for name in ("llmopt_requests_total", "llmopt_queue_depth", "llmopt_running_sequences",
                 "llmopt_generated_tokens_total", "llmopt_time_to_first_token_seconds_bucket",
                 "llmopt_inter_token_latency_seconds_bucket"):
        assert name in text


def _generate(cli, engine, prompt: str, *args: str) -> dict:
    return cli("generate", engine, "--prompt", prompt, "--json", *args).json()


@pytest.mark.parametrize("sampling", [dict(temperature=0), dict(temperature=1.0, top_p=0.95, seed=7)],
                         ids=["greedy", "seeded"])
def test_completion_equals_generate(server, serve_engine, cli, sampling):
    got = _complete(server, "The history of", max_tokens=24, **sampling)
    flags = [x for k, v in sampling.items() for x in (f"--{k.replace('_', '-')}", str(v))]
    want = _generate(cli, serve_engine, "The history of", "--max-new-tokens", "24", *flags)
    assert got.choices[0].text == want["text"]
    assert got.choices[0].finish_reason == want["finish_reason"]
    assert got.usage.completion_tokens == len(want["token_ids"])
    assert got.usage.prompt_tokens == want["completions"][0]["prompt_tokens"]
    assert got.usage.total_tokens == got.usage.prompt_tokens + got.usage.completion_tokens


def test_seed_reproduces_and_differs(server):
    kw = dict(max_tokens=24, temperature=1.0, top_p=0.95)
    a, b = (_complete(server, "The history of", seed=7, **kw).choices[0].text for _ in range(2))
    c = _complete(server, "The history of", seed=8, **kw).choices[0].text
    greedy = _complete(server, "The history of", max_tokens=24, temperature=0).choices[0].text
    assert a == b
    assert c != a and greedy not in (a, c)


def test_stream_equals_non_stream(server):
    kw = dict(max_tokens=20, temperature=0.8, seed=3)
    whole = _complete(server, "A function returns", **kw)
    chunks = list(server.client().completions.create(model=server.model, prompt="A function returns", stream=True,
                                                     stream_options={"include_usage": True}, **kw))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == whole.choices[0].text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 20
    assert len([c for c in chunks if c.choices]) > 5  # tokens arrive as they are made, not in one piece


def test_stop_string(server, serve_engine, cli):
    full = _complete(server, "The history of", max_tokens=32, temperature=0).choices[0].text
    stop = full[len(full) // 2:len(full) // 2 + 3]
    cut = full[:full.index(stop)]
    got = _complete(server, "The history of", max_tokens=32, temperature=0, stop=[stop, "\u2603never"])
    want = _generate(cli, serve_engine, "The history of", "--max-new-tokens", "32", "--temperature", "0", "--stop", stop)
    assert want["text"] == cut and want["finish_reason"] == "stop"
    assert got.choices[0].text == cut and got.choices[0].finish_reason == "stop"
    streamed = server.client().completions.create(model=server.model, prompt="The history of", max_tokens=32,
                                                  temperature=0, stop=stop, stream=True)
    chunks = list(streamed)
    assert "".join(c.choices[0].text for c in chunks) == cut
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_chat(server, serve_engine, cli):
    client = server.client()
    messages = [{"role": "system", "content": "You answer briefly."}, {"role": "user", "content": "What is a file?"}]
    got = client.chat.completions.create(model=server.model, messages=messages, max_tokens=16, temperature=0)
    assert got.object == "chat.completion" and got.choices[0].message.role == "assistant"
    text = got.choices[0].message.content
    assert text and got.usage.completion_tokens <= 16
    # the template is what the prompt was: the same text sent raw to /v1/completions gives the same answer
    raw = ("<|im_start|>system\nYou answer briefly.<|im_end|>\n<|im_start|>user\nWhat is a file?<|im_end|>\n"
           "<|im_start|>assistant\n")
    assert _complete(server, raw, max_tokens=16, temperature=0).choices[0].text == text
    want = _generate(cli, serve_engine, "What is a file?", "--chat", "--system", "You answer briefly.",
                     "--max-new-tokens", "16", "--temperature", "0")
    assert text == want["text"]
    chunks = list(client.chat.completions.create(model=server.model, messages=messages, max_tokens=16,
                                                 temperature=0, stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == text
    assert chunks[-1].choices[0].finish_reason in ("length", "stop")


def _run_all(server, kws: list[dict], concurrent: bool) -> list[str]:
    def one(kw: dict) -> str:
        return _complete(server, **kw).choices[0].text

    if not concurrent:
        return [one(kw) for kw in kws]
    with ThreadPoolExecutor(len(kws)) as pool:
        return list(pool.map(one, kws))


@pytest.mark.parametrize("sampling", [dict(temperature=0), dict(temperature=0.9, top_p=0.9)], ids=["greedy", "seeded"])
def test_concurrent_equals_one_at_a_time(server, sampling):
    # 8 requests on 4 slots, unequal prompt and output lengths: they queue, join and leave mid-batch
    kws = [dict(prompt=p, max_tokens=12 + 5 * i, seed=100 + i, **sampling) for i, p in enumerate(PROMPTS)]
    one_by_one = _run_all(server, kws, concurrent=False)
    before = server.metrics()
    together = _run_all(server, kws, concurrent=True)
    after = server.metrics()
    assert together == one_by_one
    steps = after["llmopt_decode_batch_size_count"] - before["llmopt_decode_batch_size_count"]
    rows = after["llmopt_decode_batch_size_sum"] - before["llmopt_decode_batch_size_sum"]
    assert rows / steps > 2.0, "the concurrent requests were not decoded together"
