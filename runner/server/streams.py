"""One HTTP request's prompts in the engine, read as one stream, and the server-sent-events
response that carries it.

Every way a request can end early (a client gone, a refused sibling prompt, a cancelled
handler) goes through `Requests.close`, which aborts what still runs so its KV blocks are
freed at once, whichever task notices first. (`AsyncLLM.generate` also aborts by itself when
its loop is left or cancelled; the engine takes commands in order, so an abort lands after
the admission it follows, and a second abort of the same id is a no-op.)
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import AsyncIterator, Callable, Coroutine
from typing import Any

from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from runner.async_llm import AsyncLLM
from runner.engine.outputs import RequestOutput
from runner.sampling_params import SamplingParams
from runner.server.metrics import ServerMetrics

# Tasks started from code that may be cancelled itself; held so none is collected mid-run.
_BACKGROUND: set[asyncio.Task] = set()

Item = RequestOutput | BaseException | None  # an output, the prompt's error, or its end


def spawn(coroutine: Coroutine[Any, Any, Any]) -> None:
    """Run `coroutine` to its end even if the caller is being cancelled (an anyio cancel
    scope would cancel any await made in its own cleanup)."""
    task = asyncio.ensure_future(coroutine)
    _BACKGROUND.add(task)
    task.add_done_callback(_forget)


def _forget(task: asyncio.Task) -> None:
    _BACKGROUND.discard(task)
    if not task.cancelled():
        task.exception()  # retrieved: an abort after the engine stopped is not worth a warning


class Requests:
    """The engine requests of one HTTP request (one per prompt), read as `(index, output)`."""

    def __init__(self, llm: AsyncLLM, prompts: list[Any], params: SamplingParams, base_id: str,
                 metrics: ServerMetrics) -> None:
        self._llm = llm
        self._metrics = metrics
        self.ids = [f"{base_id}-{i}" for i in range(len(prompts))]
        self._queue: asyncio.Queue[tuple[int, Item]] = asyncio.Queue()
        self._buffer: deque[tuple[int, Item]] = deque()
        self._open = set(range(len(prompts)))  # prompts whose stream has not ended
        self._seen: set[int] = set()
        self._tasks = [asyncio.ensure_future(self._pump(i, llm.generate(p, params, rid)))
                       for i, (p, rid) in enumerate(zip(prompts, self.ids))]

    async def _pump(self, index: int, outputs: AsyncIterator[RequestOutput]) -> None:
        try:
            async for out in outputs:
                self._queue.put_nowait((index, out))
        except Exception as e:  # noqa: BLE001 - handed to the reader; cancellation propagates
            self._queue.put_nowait((index, e))
            return
        self._queue.put_nowait((index, None))

    async def started(self) -> None:
        """Wait until every prompt has its first output, so a prompt the engine refuses (a
        ValueError) is raised before any response is sent. The caller closes on error."""
        waiting = set(range(len(self.ids)))
        while waiting:
            index, item = await self._queue.get()
            self._buffer.append((index, item))
            if isinstance(item, BaseException):
                raise item
            waiting.discard(index)

    async def outputs(self) -> AsyncIterator[tuple[int, RequestOutput]]:
        """Every prompt's outputs as they come; a prompt's error is raised here."""
        while self._open:
            index, item = self._buffer.popleft() if self._buffer else await self._queue.get()
            if item is None or isinstance(item, BaseException):
                self._open.discard(index)
                if item is None:
                    continue
                raise item
            self._metrics.observe(item, first=index not in self._seen)
            self._seen.add(index)
            yield index, item

    def close(self) -> None:
        """Stop reading and abort every prompt not yet finished. Synchronous, so it runs
        from any cleanup, cancelled or not; safe to call more than once."""
        for task in self._tasks:
            task.cancel()
        unfinished = [self.ids[i] for i in sorted(self._open)]
        self._open.clear()
        if unfinished and self._llm.is_running:
            self._metrics.aborted(len(unfinished))
            spawn(self._llm.abort(unfinished))


class EventStream(StreamingResponse):
    """Server-sent events whose `on_close` runs however the response ends: finished, the
    client gone (Starlette cancels the body while it waits, or before it ever started), or
    the server stopping."""

    def __init__(self, events: AsyncIterator[str], on_close: Callable[[], None]) -> None:
        super().__init__(events, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self._on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._on_close()


async def until_disconnected(receive: Receive) -> None:
    """Return when the client goes away (used while a handler runs, before any response)."""
    while (await receive())["type"] != "http.disconnect":
        pass
