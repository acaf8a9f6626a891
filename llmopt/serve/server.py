"""Run the app under uvicorn on a socket bound before the engine loads; SIGTERM drains and exits 0."""

from __future__ import annotations

import signal
import socket
from collections.abc import Callable

import uvicorn

from llmopt.errors import UserError
from llmopt.serve.app import create_app
from llmopt.serve.engine import ServedEngine
from llmopt.serve.metrics import Metrics
from llmopt.serve.scheduler import Scheduler


def bind(host: str, port: int) -> socket.socket:
    """A bound (not yet listening) TCP socket; port 0 picks a free one."""
    try:
        family, kind, proto, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except socket.gaierror as exc:
        raise UserError(f"--host {host!r}: {exc.strerror}", "pass an address such as 127.0.0.1") from None
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(addr)
    except OSError as exc:
        sock.close()
        raise UserError(f"cannot listen on {host}:{port}: {exc.strerror}",
                        "pick another --port (0 picks a free one)") from None
    return sock


class _Server(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, on_ready: Callable[[], None], on_drain: Callable[[], None]) -> None:
        super().__init__(config)
        self._on_ready, self._on_drain = on_ready, on_drain

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        if self.started:
            self._on_ready()

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        self._on_drain()  # new requests get 503; queued and running ones finish
        await super().shutdown(sockets)


def ready_event(eng: ServedEngine, sock: socket.socket, api_key: str | None) -> dict:
    """What `llmopt serve --json` prints once the port accepts connections."""
    host, port = sock.getsockname()[:2]
    return {"event": "ready", "url": f"http://{host}:{port}", "host": host, "port": port, "model": eng.name,
            "engine": str(eng.path), "backend": eng.backend, "batching": eng.batching,
            "max_batch": eng.slots.max_batch, "capacity": eng.capacity, "chat_template": eng.chat_template,
            "api_key": api_key is not None}


def serve(engine: ServedEngine, sock: socket.socket, *, api_key: str | None = None, max_queue: int = 64,
          drain_timeout: float = 60.0, verbose: bool = False, on_ready: Callable[[], None] = lambda: None,
          on_drain: Callable[[], None] = lambda: None) -> None:
    """Serve until SIGTERM/SIGINT; in-flight requests finish (up to ``drain_timeout`` s), then return."""
    metrics = Metrics()
    scheduler = Scheduler(engine.slots, engine.tokenizer, engine.eos_ids, metrics, max_queue=max_queue)
    app = create_app(engine, scheduler, metrics, api_key=api_key)
    config = uvicorn.Config(app, log_level="info" if verbose else "warning", access_log=verbose, lifespan="on",
                            timeout_graceful_shutdown=drain_timeout, loop="asyncio", http="h11")

    def drain() -> None:
        scheduler.stop_accepting()
        on_drain()

    server = _Server(config, on_ready, drain)
    # uvicorn re-raises the signal it handled once it has shut down; these handlers absorb it, so a
    # drained server exits 0 instead of dying by SIGTERM.
    previous = {sig: signal.signal(sig, lambda *_: None) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        server.run(sockets=[sock])
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        sock.close()
