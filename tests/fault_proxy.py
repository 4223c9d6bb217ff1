"""An HTTP proxy on loopback in front of the S3 server that fails requests on purpose: 503 SlowDown,
connection resets and slow answers (past the client's read timeout), in a fixed cycle so that runs are
repeatable; or every request, for a store that is down for good. Or none, each answer late by a fixed
`latency`: a remote store's round trip for the benchmarks (a loopback server answers in a millisecond)."""

from __future__ import annotations

import asyncio
import threading
from collections import Counter

import aiohttp
from aiohttp import web

from dinat_batch.infra.processes import free_port

SLOW_DOWN = (
    b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>SlowDown</Code>'
    b"<Message>Please reduce your request rate.</Message></Error>"
)
# hop-by-hop and framing headers that the proxy's own HTTP stack sets (Content-Length travels: a HEAD
# answer's length is the object's, not that of its empty body)
_SKIP = {"transfer-encoding", "connection", "content-encoding"}


class FaultProxy:
    def __init__(
        self, upstream: str, permanent: bool = False, slow_seconds: float = 3.0, latency: float | None = None
    ):
        self.upstream = upstream.rstrip("/")
        self.permanent = permanent
        self.slow_seconds = slow_seconds
        self.latency = latency
        self.port = free_port()
        self.injected: Counter[str] = Counter()
        self.requests = 0
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _fault(self) -> str | None:
        self.requests += 1
        if self.latency is not None:
            return None
        if self.permanent:
            return "slow_down"
        return {2: "slow_down", 5: "reset", 8: "slow"}.get(self.requests % 9)

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        fault = self._fault()
        if fault:
            self.injected[fault] += 1
        if fault == "slow_down":
            return web.Response(status=503, body=SLOW_DOWN, content_type="application/xml")
        if fault == "reset":
            request.transport.abort()
            return web.Response(status=500)
        if fault == "slow":
            await asyncio.sleep(self.slow_seconds)
        elif self.latency is not None:
            await asyncio.sleep(self.latency)
        body = await request.read()
        # SigV4 signs the Host header: it travels unchanged
        headers = {k: v for k, v in request.headers.items() if k.lower() not in _SKIP | {"content-length"}}
        async with self._session.request(
            request.method, self.upstream + request.path_qs, headers=headers, data=body, allow_redirects=False
        ) as answer:
            payload = await answer.read()
            kept = {k: v for k, v in answer.headers.items() if k.lower() not in _SKIP}
            return web.Response(status=answer.status, body=payload, headers=kept)

    async def _start(self) -> None:
        self._session = aiohttp.ClientSession(auto_decompress=False)
        app = web.Application(client_max_size=1 << 30)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        # clients (Ray workers) keep connections alive: do not wait a minute for them at exit
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.5)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()

    async def _stop(self) -> None:
        await self._runner.cleanup()
        await self._session.close()

    def __enter__(self) -> FaultProxy:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(10)
        return self

    def __exit__(self, *exc) -> None:
        asyncio.run_coroutine_threadsafe(self._stop(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
