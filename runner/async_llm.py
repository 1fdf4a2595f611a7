"""`AsyncLLM`: vLLM's async engine shape over the same `Engine`.

One background thread owns the engine and is the only one to call JAX. Coroutines hand it
requests, aborts and lifecycle calls through one queue; between device calls it takes
them all, steps once, and pushes each request's new output to the stream of the
coroutine that asked (`loop.call_soon_threadsafe`). Requests from any number of callers
join the running batch between device calls: continuous batching across callers.

Streaming and multi-step decode. A decode call runs several steps on the device, so two
waits are bounded by how long one call takes:
- a request that arrives while a call runs waits for that call (then the scheduler runs
  single steps while a sequence slot is free, so its prefill is not held back);
- a stream receives tokens once per call.
The engine caps a call at `max_call_seconds` while a sequence slot is free: the decode
steps per call are the cap over the last call's time per step (at least one, at most the
configured `decode_steps`). While every slot is taken no arrival can join before a running
request finishes (the scheduler ends a call there when a prompt waits), so only the
streams' cadence bounds the call, at `full_batch_call_seconds`: the longer calls run
multi-step decodes, whose steps cost less than one-step calls (README, "Serving").

Pause and resume (vLLM's `pause_generation`), for training loops that change weights while
rollouts are in flight. While paused no request is admitted: new ones are held until
`resume_generation`. The in-flight ones are aborted ("abort"), run to their end ("wait"),
or frozen where they stand ("keep"); frozen requests continue on whatever weights serve at
the resume, with their KV from before, or recomputed from their tokens with
`clear_cache=True`. Each output's `weight_versions` says which tokens came from which weights.
"""

from __future__ import annotations

import asyncio
import dataclasses
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from runner import inputs
from runner.engine.engine import update
from runner.engine.outputs import CompletionOutput, RequestOutput, request_output
from runner.device.warmup import WarmupReport
from runner.llm import LLM
from runner.sampling_params import RequestOutputKind, SamplingParams
from state.config import RunnerConfig
from state.request import Request, RequestStatus

# A call's duration the engine aims under while streaming: a token every 50 ms reads as
# fluent text, and a new request waits at most about this long for the call it arrived in.
DEFAULT_MAX_CALL_SECONDS = 0.05
# The same while every sequence slot is taken: streams then get tokens in bursts, twice a
# second at least, and the device runs several steps per call.
DEFAULT_FULL_BATCH_CALL_SECONDS = 0.5

PAUSE_MODES = ("abort", "wait", "keep")


class EngineDeadError(RuntimeError):
    """The engine thread is gone (shut down); no request can be served."""


@dataclasses.dataclass(eq=False)
class _Stream:
    """One caller's request: its `n` engine requests and what it has been sent."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    group: list[Request]
    kind: RequestOutputKind
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue
    sent_tokens: list[int] = dataclasses.field(default_factory=list)  # per completion
    sent_text: list[int] = dataclasses.field(default_factory=list)  # characters, per completion
    sent_any: bool = False

    def __post_init__(self) -> None:
        self.sent_tokens = [0] * len(self.group)
        self.sent_text = [0] * len(self.group)

    @property
    def finished(self) -> bool:
        return all(r.is_finished for r in self.group)

    def put(self, item: RequestOutput | BaseException | None) -> None:
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)
        except RuntimeError:  # the caller's event loop is closed: nobody is listening
            pass


class AsyncLLM:
    """Serve requests from coroutines with vLLM's `AsyncLLM` calls.

    Args: as `runner.LLM` (None serves the built-in model), plus `max_call_seconds` and
    `full_batch_call_seconds`, the durations a decode call aims under while a sequence slot
    is free and while every slot is taken (see the module docstring).
    """

    def __init__(self, model: str | None = None, *, max_call_seconds: float = DEFAULT_MAX_CALL_SECONDS,
                 full_batch_call_seconds: float = DEFAULT_FULL_BATCH_CALL_SECONDS, **engine_args: Any) -> None:
        for name, value in (("max_call_seconds", max_call_seconds),
                            ("full_batch_call_seconds", full_batch_call_seconds)):
            if isinstance(value, bool) or not (isinstance(value, (int, float)) and value > 0):
                raise ValueError(f"AsyncLLM: {name} must be a positive number of seconds, got {value!r}")
        self._llm = LLM(model, **engine_args)
        self._max_call_seconds = float(max_call_seconds)
        self._full_batch_call_seconds = float(full_batch_call_seconds)
        self._inbox: queue.SimpleQueue[Callable[[], None] | None] = queue.SimpleQueue()
        self._streams: dict[str, _Stream] = {}  # owned by the engine thread, as all below
        self._held: dict[str, _Stream] = {}  # admitted while paused: not in the engine yet
        self._pause: str | None = None  # the mode while paused
        self._drained: list[Callable[[], None]] = []  # pause(mode="wait") calls to answer
        self._ids = 0
        self._id_lock = threading.Lock()
        self._thread = threading.Thread(target=self._serve, name="runner-engine", daemon=True)
        self._alive = True
        self._thread.start()

    @property
    def config(self) -> RunnerConfig:
        return self._llm.config

    def get_tokenizer(self) -> Any:
        return self._llm.get_tokenizer()

    @property
    def is_running(self) -> bool:
        return self._alive and self._thread.is_alive()

    # -- requests ---------------------------------------------------------------------

    async def generate(self, prompt: inputs.Prompt, sampling_params: SamplingParams | None = None,
                       request_id: str | None = None) -> AsyncIterator[RequestOutput]:
        """Stream one prompt's outputs: cumulative by default, only what is new with
        `output_kind=RequestOutputKind.DELTA`, only the last with `FINAL_ONLY`. A bad
        prompt or setting raises here, in this caller only. Leaving the loop early (or
        cancelling the task) aborts the request."""
        loop = asyncio.get_running_loop()
        stream_queue: asyncio.Queue = asyncio.Queue()
        request_id = self._new_id() if request_id is None else request_id
        created: asyncio.Future = loop.create_future()

        def admit() -> None:  # on the engine thread, between device calls
            try:
                stream = self._make_stream(prompt, sampling_params, request_id, loop, stream_queue)
            except BaseException as e:  # noqa: BLE001 - the caller gets it, the engine goes on
                loop.call_soon_threadsafe(_settle, created, None, e)
                return
            self._streams[request_id] = stream
            loop.call_soon_threadsafe(_settle, created, True, None)

        self._submit(admit)
        finished = False
        try:
            await created
            while True:
                item = await stream_queue.get()
                if item is None:
                    finished = True
                    return
                if isinstance(item, BaseException):
                    finished = True
                    raise item
                yield item
        finally:
            # Left early, or cancelled even before admission (a client that went away): the
            # request is dropped and its blocks freed. The abort runs after the admission.
            if not finished and self.is_running:
                self._submit(lambda: self._abort(request_id, stream_queue))

    async def abort(self, request_id: str | list[str]) -> None:
        """Abort requests by id; they end with finish_reason "abort" and their blocks are
        freed. Unknown or finished ids are ignored, as in vLLM."""
        ids = [request_id] if isinstance(request_id, str) else list(request_id)
        await self._call(lambda: [self._abort(i) for i in ids])

    def _make_stream(self, prompt: inputs.Prompt, sampling_params: SamplingParams | None, request_id: str,
                     loop: asyncio.AbstractEventLoop, stream_queue: asyncio.Queue) -> _Stream:
        if not isinstance(request_id, str) or not request_id:
            raise ValueError(f"request_id: expected a non-empty string, got {request_id!r}")
        if request_id in self._streams:
            raise ValueError(f"request_id {request_id!r} is already in flight; ids must be unique")
        params = self._llm.get_default_sampling_params() if sampling_params is None else sampling_params
        (text, ids), = self._llm.encode_prompts([prompt])
        params, = self._llm.check_requests([ids], [params])
        group = self._llm.engine.make_requests(ids, params)
        stream = _Stream(request_id, text, ids, group, params.output_kind, loop, stream_queue)
        if self._pause is None:
            self._llm.engine.add_requests(group)
        else:
            self._held[request_id] = stream
        return stream

    def _abort(self, request_id: str, owner: asyncio.Queue | None = None) -> None:
        """End a request; with `owner`, only the stream of that caller (an id may have
        been refused to a second caller while the first still runs)."""
        stream = self._streams.get(request_id)
        if stream is None or (owner is not None and stream.queue is not owner):
            return
        del self._streams[request_id]
        if self._held.pop(request_id, None) is not None:  # never reached the engine
            for r in stream.group:
                r.status, r.finish_reason = RequestStatus.FINISHED, "abort"
        for r in stream.group:
            if not r.is_finished:
                self._llm.engine.scheduler.finish(r, "abort")
                r.finished_time = time.time()
        stream.put(self._output(stream))
        stream.put(None)

    # -- pause and resume --------------------------------------------------------------------

    async def pause_generation(self, mode: str = "abort", clear_cache: bool = False) -> None:
        """Stop generating between device calls; new requests are held until
        `resume_generation`. What happens to the requests in flight:

        - "abort": they end with finish_reason "abort", keeping the tokens they have;
        - "wait": they run to their end; the call returns once they have;
        - "keep": they are frozen where they stand, with their KV, and continue at the resume.

        A weight update (`reload_weights`, `update_weights`) or a `sleep` is allowed while
        paused in every mode. `clear_cache=True` forgets every cached prefix, and frozen
        requests drop their KV too: at the resume it is recomputed from their tokens, under
        the weights serving then.
        """
        if mode not in PAUSE_MODES:
            raise ValueError(f"pause_generation: mode must be one of {', '.join(PAUSE_MODES)}, got {mode!r}")
        if not isinstance(clear_cache, bool):
            raise ValueError(f"pause_generation: clear_cache must be a bool, got {clear_cache!r}")
        loop = asyncio.get_running_loop()
        done: asyncio.Future = loop.create_future()

        def pause() -> None:
            def finish() -> None:
                if clear_cache:
                    self._llm.engine.scheduler.preempt_all()  # frozen requests: recomputed later
                    self._llm.engine.scheduler.reset_prefix_cache()
                loop.call_soon_threadsafe(_settle, done, None, None)

            self._pause = mode
            if mode == "abort":
                for request_id in [i for i in self._streams if i not in self._held]:
                    self._abort(request_id)
            if mode == "wait" and self._in_flight():
                self._drained.append(finish)
            else:
                finish()

        self._submit(pause)
        await done

    async def resume_generation(self) -> None:
        """Generate again: frozen requests continue, held ones join the batch. Resuming an
        engine that is not paused does nothing."""

        def resume() -> None:
            self._pause = None
            for stream in self._held.values():
                self._llm.engine.add_requests(stream.group)
            self._held.clear()

        await self._call(resume)

    async def is_paused(self) -> bool:
        return await self._call(lambda: self._pause is not None)

    def _in_flight(self) -> int:
        """Requests in the engine (admitted and not finished); held ones are not."""
        return len(self._streams) - len(self._held)

    # -- lifecycle: awaitable, run between device calls ----------------------------------

    async def sleep(self, level: int = 1) -> None:
        """Release device memory. While paused in keep mode the frozen requests lose their
        KV with it: they recompute it from their tokens at the resume."""
        def sleep() -> None:
            self._idle("sleep", while_paused=True)
            self._llm.engine.scheduler.preempt_all()
            self._llm.sleep(level)

        await self._call(sleep)

    async def wake_up(self, tags: list[str] | None = None) -> None:
        await self._call(lambda: self._idle("wake_up", while_paused=True) or self._llm.wake_up(tags))

    async def reload_weights(self, **source: Any) -> None:
        await self._call(lambda: self._idle("reload_weights", while_paused=True)
                         or self._llm.reload_weights(**source))

    async def update_weights(self, buckets: Any, **options: Any) -> None:
        """`LLM.update_weights` on the engine thread, between device calls; `buckets` is
        consumed there (a plain iterable or generator, not an async one)."""
        await self._call(lambda: self._idle("update_weights", while_paused=True)
                         or self._llm.update_weights(buckets, **options))

    @property
    def weight_version(self) -> int:
        return self._llm.weight_version

    async def update_config(self, overrides: dict[str, Any]) -> RunnerConfig:
        return await self._call(lambda: self._idle("update_config") or self._llm.update_config(overrides))

    async def reset_prefix_cache(self) -> bool:
        """Forget every cached prefix; False while requests are in flight (as vLLM), whose
        blocks stay in use."""
        return await self._call(lambda: not self._in_flight() and self._llm.reset_prefix_cache())

    async def collective_rpc(self, method: str | Callable[..., Any], timeout: float | None = None,
                             args: tuple = (), kwargs: dict[str, Any] | None = None) -> list:
        """As `LLM.collective_rpc`; a method that changes weights or KV waits for an idle
        engine as its own call does."""
        changes_state = isinstance(method, str) and method in ("sleep", "wake_up", "reload_weights",
                                                                "update_weights", "update_config")

        def call() -> list:
            if changes_state:
                self._idle(method, while_paused=method != "update_config")
                if method == "sleep":  # as `sleep`: frozen requests give up their KV first
                    self._llm.engine.scheduler.preempt_all()
            return self._llm.collective_rpc(method, timeout, args, kwargs)

        return await self._call(call)

    async def is_sleeping(self) -> bool:
        return await self._call(lambda: bool(self._llm.runner.state.sleeping))

    async def warmup(self) -> WarmupReport:
        """Compile every program serving can ask for (`LLM.warmup`), on the engine thread."""
        return await self._call(lambda: self._idle("warmup") or self._llm.warmup())

    def _idle(self, what: str, while_paused: bool = False) -> None:
        """Weights and KV change only with nothing in flight, or, for `while_paused` calls,
        with every request frozen (paused in keep mode): a running request would otherwise
        mix tokens of two weight versions unannounced, or read a freed cache."""
        if self._in_flight() and not (while_paused and self._pause == "keep"):
            how = "pause_generation(mode='keep') first, " if while_paused else ""
            raise RuntimeError(f"{what}: {self._in_flight()} request(s) in flight; {how}abort them, or wait "
                               "for them to finish first")

    def shutdown(self) -> None:
        """Stop the engine thread; requests in flight end with an `EngineDeadError`."""
        if self._alive:
            self._alive = False
            self._inbox.put(None)
            self._thread.join(timeout=60)

    # -- the engine thread ------------------------------------------------------------------

    def _new_id(self) -> str:
        with self._id_lock:
            self._ids += 1
            return f"req-{self._ids}"

    def _submit(self, command: Callable[[], None]) -> None:
        if not self.is_running:
            raise EngineDeadError("the engine is shut down")
        self._inbox.put(command)

    async def _call(self, fn: Callable[[], Any]) -> Any:
        """Run `fn` on the engine thread between device calls; its result or error here."""
        loop = asyncio.get_running_loop()
        done: asyncio.Future = loop.create_future()

        def run() -> None:
            try:
                result, error = fn(), None
            except BaseException as e:  # noqa: BLE001 - raised in the caller
                result, error = None, e
            loop.call_soon_threadsafe(_settle, done, result, error)

        self._submit(run)
        return await done

    def _serve(self) -> None:
        engine = self._llm.engine
        while True:
            busy = engine.has_unfinished() and self._pause in (None, "wait")
            try:
                command = self._inbox.get(block=not busy)
            except queue.Empty:
                command = ...
            while command is not ...:
                if command is None:
                    return self._fail_all(EngineDeadError("the engine was shut down"))
                try:
                    command()
                except Exception:  # noqa: BLE001 - a command reports to its caller itself
                    pass
                try:
                    command = self._inbox.get_nowait()
                except queue.Empty:
                    command = ...
            if engine.has_unfinished() and self._pause in (None, "wait"):
                self._step()
            if self._drained and not self._in_flight():
                for answer in self._drained:
                    answer()
                self._drained.clear()

    def _step(self) -> None:
        engine = self._llm.engine
        start = time.perf_counter()
        try:
            out = engine.scheduler.schedule()
            results = engine.runner.execute_model(out)
            update(engine.scheduler, out, results, engine.tokenizer)
        except Exception as e:  # noqa: BLE001 - the step's requests fail, the engine goes on
            engine.abort_all()
            return self._fail_all(e)
        steps = out.num_steps if out.is_decode else 1
        per_step = (time.perf_counter() - start) / steps
        engine.scheduler.step_cap = max(1, int(self._max_call_seconds / max(per_step, 1e-6)))
        engine.scheduler.full_step_cap = max(1, int(self._full_batch_call_seconds / max(per_step, 1e-6)))
        for request_id, stream in list(self._streams.items()):
            if stream.finished:
                del self._streams[request_id]
                stream.put(self._output(stream))
                stream.put(None)
            elif stream.kind is not RequestOutputKind.FINAL_ONLY and self._has_news(stream):
                stream.put(self._output(stream))

    def _fail_all(self, error: BaseException) -> None:
        for stream in self._streams.values():
            stream.put(error)
        self._streams.clear()
        self._held.clear()
        for answer in self._drained:  # nothing is in flight any more
            answer()
        self._drained.clear()

    def _has_news(self, stream: _Stream) -> bool:
        return any(len(r.output_token_ids) > sent for r, sent in zip(stream.group, stream.sent_tokens))

    def _output(self, stream: _Stream) -> RequestOutput:
        """The stream's next output: the whole request so far, or with DELTA only what it
        has not been sent. Text that a stop string may still cut is held back until the
        request finishes or the text grows past it."""
        out = request_output(stream.prompt, stream.prompt_token_ids, stream.group)
        out.request_id = stream.request_id
        completions = []
        for i, (r, c) in enumerate(zip(stream.group, out.outputs)):
            text = c.text if r.is_finished else c.text[:max(0, len(c.text) - _held_back(r))]
            text_from, tokens_from = stream.sent_text[i], stream.sent_tokens[i]
            stream.sent_text[i], stream.sent_tokens[i] = len(text), len(c.token_ids)
            if stream.kind is RequestOutputKind.DELTA:
                c = dataclasses.replace(c, text=text[text_from:], token_ids=c.token_ids[tokens_from:],
                                        logprobs=None if c.logprobs is None else c.logprobs[tokens_from:])
            else:
                c = dataclasses.replace(c, text=text)
            completions.append(c)
        out.outputs = completions
        if stream.kind is RequestOutputKind.DELTA and stream.sent_any:
            out.prompt_logprobs = None  # sent with the first delta
        stream.sent_any = True
        return out


def _held_back(request: Request) -> int:
    """Characters of an unfinished request's text a stop string could still claim."""
    stops = request.sampling_params.stop_strings
    return max((len(s) for s in stops), default=1) - 1


def _settle(future: asyncio.Future, result: Any, error: BaseException | None) -> None:
    if future.done():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)


__all__ = ["AsyncLLM", "CompletionOutput", "EngineDeadError", "RequestOutput"]
