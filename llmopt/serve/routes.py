"""POST /v1/completions and /v1/chat/completions: JSON or server-sent events in OpenAI's chunk format."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, StreamingResponse

from llmopt.serve.app import ApiError
from llmopt.serve.engine import ServedEngine
from llmopt.serve.scheduler import Event, QueueFull, Request as GenRequest, Scheduler, ShuttingDown
from llmopt.serve.schemas import ChatRequest, CompletionRequest, _Generation

router = APIRouter()
COMPLETION_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions


class _Job:
    """One submitted sequence as the route sees it: an asyncio queue of Events."""

    def __init__(self, engine: ServedEngine, scheduler: Scheduler, prompt: list[int], body: _Generation,
                 max_tokens: int) -> None:
        loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue[Event] = asyncio.Queue()
        self.scheduler = scheduler
        self.req = GenRequest(prompt, body.sampling(engine.sampling_defaults), max_tokens, body.stops,
                              emit=lambda ev: loop.call_soon_threadsafe(self.queue.put_nowait, ev),
                              ignore_eos=body.ignore_eos)
        try:
            scheduler.submit(self.req)
        except QueueFull:
            raise ApiError(429, f"the server is at capacity ({scheduler.max_queue} requests waiting); retry later",
                           "rate_limit_error", code="queue_full") from None
        except ShuttingDown:
            raise ApiError(503, "the server is shutting down", "server_error", code="shutting_down") from None

    async def events(self) -> AsyncIterator[Event]:
        while True:
            ev = await self.queue.get()
            yield ev
            if ev.finish_reason is not None:
                return

    def cancel(self) -> None:
        self.req.cancel()
        self.scheduler.wake()


def _engine(request: Request) -> tuple[ServedEngine, Scheduler]:
    return request.app.state.engine, request.app.state.scheduler


def _check_model(engine: ServedEngine, body: _Generation) -> None:
    if body.model != engine.name:
        raise ApiError(404, f"model {body.model!r} is not served here; this server serves {engine.name!r}",
                       param="model", code="model_not_found")


def _max_tokens(engine: ServedEngine, prompt: list[int], requested: int | None, default: int | None) -> int:
    room = engine.capacity - len(prompt)
    if not prompt:
        raise ApiError(400, "the prompt is empty", param="prompt")
    if room < 1:
        raise ApiError(400, f"the prompt has {len(prompt)} tokens; this engine holds at most {engine.capacity} "
                            "tokens per sequence (prompt + completion)", param="prompt", code="context_length_exceeded")
    wanted = requested or default or room
    if wanted > room:
        raise ApiError(400, f"prompt ({len(prompt)} tokens) + max_tokens ({wanted}) exceeds this engine's "
                            f"{engine.capacity} tokens per sequence; lower max_tokens to at most {room}",
                       param="max_tokens", code="context_length_exceeded")
    return wanted


def _usage(ev: Event) -> dict:
    return {"prompt_tokens": ev.prompt_tokens, "completion_tokens": ev.completion_tokens,
            "total_tokens": ev.prompt_tokens + ev.completion_tokens}


def _sse(obj: dict | str) -> str:
    return f"data: {obj if isinstance(obj, str) else json.dumps(obj, separators=(',', ':'))}\n\n"


class ClientGone(Exception):
    """The client closed the connection before its (non-streamed) answer was ready."""


async def _collect(request: Request, job: _Job) -> tuple[str, Event]:
    """Wait for the whole completion; a client that goes away cancels its sequence at once."""
    parts: list[str] = []

    async def consume() -> Event:
        async for ev in job.events():
            parts.append(ev.text)
        return ev

    async def watch() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    consumer, watcher = asyncio.create_task(consume()), asyncio.create_task(watch())
    try:
        await asyncio.wait({consumer, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in (consumer, watcher):
            task.cancel()
        job.cancel()  # frees the slot when the client left; a no-op after a normal finish
    if not consumer.done() or consumer.cancelled():
        raise ClientGone()
    last = consumer.result()
    if last.error:
        raise ApiError(500, last.error, "server_error")
    return "".join(parts), last


def _stream(job: _Job, include_usage: bool, chunk: Callable[[Event, bool], dict], base: dict) -> StreamingResponse:
    async def body() -> AsyncIterator[str]:
        first = True
        try:
            async for ev in job.events():
                if ev.error:
                    yield _sse(error_body_for_stream(ev.error))
                    break
                # one chunk per token (its text may be empty while a stop string or UTF-8 character is pending)
                yield _sse({**base, "choices": [chunk(ev, first)], **({"usage": None} if include_usage else {})})
                first = False
                if ev.finish_reason and include_usage:
                    yield _sse({**base, "choices": [], "usage": _usage(ev)})
            yield _sse("[DONE]")
        finally:  # normal end, or the client went away (the response task is cancelled): free the slot now
            job.cancel()

    return StreamingResponse(body(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


def error_body_for_stream(message: str) -> dict:
    return {"error": {"message": message, "type": "server_error", "param": None, "code": None}}


@router.post("/v1/completions")
async def completions(body: CompletionRequest, request: Request):  # noqa: ANN201
    engine, scheduler = _engine(request)
    _check_model(engine, body)
    p = body.prompt
    if isinstance(p, list) and p and isinstance(p[0], int):
        prompt = [int(t) for t in p]
        if any(not 0 <= t < engine.vocab_size for t in prompt):
            raise ApiError(400, f"prompt token ids must be in [0, {engine.vocab_size})", param="prompt")
    else:
        text = p[0] if isinstance(p, list) else p
        prompt = await asyncio.to_thread(engine.assets.prompt, text)  # generate's tokenization, off the event loop
    max_tokens = _max_tokens(engine, prompt, body.max_tokens, COMPLETION_DEFAULT_MAX_TOKENS)
    job = _Job(engine, scheduler, prompt, body, max_tokens)
    base = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
            "model": engine.name}
    if body.stream:
        return _stream(job, body.include_usage,
                       lambda ev, first: {"index": 0, "text": ev.text, "logprobs": None,
                                          "finish_reason": ev.finish_reason}, base)
    text, last = await _collect(request, job)
    return JSONResponse({**base, "choices": [{"index": 0, "text": text, "logprobs": None,
                                               "finish_reason": last.finish_reason}], "usage": _usage(last)})


def chat_prompt(engine: ServedEngine, body: ChatRequest) -> list[int]:
    if not engine.chat_template:
        raise ApiError(400, f"{engine.name}'s tokenizer has no chat template; use /v1/completions",
                       param="messages", code="no_chat_template")
    messages = [{"role": m.role, "content": m.text()} for m in body.messages]
    try:
        text = engine.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    except Exception as exc:  # noqa: BLE001 - a template may reject a conversation (e.g. roles out of order)
        raise ApiError(400, f"the chat template rejected these messages: {exc}", param="messages") from None
    return engine.tokenizer(text, add_special_tokens=False)["input_ids"]


@router.post("/v1/chat/completions")
async def chat_completions(body: ChatRequest, request: Request):  # noqa: ANN201
    engine, scheduler = _engine(request)
    _check_model(engine, body)
    prompt = await asyncio.to_thread(chat_prompt, engine, body)
    max_tokens = _max_tokens(engine, prompt, body.limit, None)
    job = _Job(engine, scheduler, prompt, body, max_tokens)
    base = {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion.chunk", "created": int(time.time()),
            "model": engine.name}
    if body.stream:
        def chunk(ev: Event, first: bool) -> dict:
            if first:
                delta = {"role": "assistant", "content": ev.text}
            else:
                delta = {"content": ev.text} if ev.text or not ev.finish_reason else {}
            return {"index": 0, "delta": delta, "logprobs": None, "finish_reason": ev.finish_reason}

        return _stream(job, body.include_usage, chunk, base)
    text, last = await _collect(request, job)
    return JSONResponse({**base, "object": "chat.completion",
                         "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                                      "logprobs": None, "finish_reason": last.finish_reason}],
                         "usage": _usage(last)})
