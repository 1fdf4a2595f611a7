"""`/metrics`: Prometheus text through prometheus_client, one registry per app (two apps in
one process, as in tests, never share counts).

The engine's metrics keep vLLM's names (`vllm:...`) so dashboards written for vLLM read
them; what vLLM has no name for is `runner:...`. `runner:kv_blocks_free` and
`runner:kv_blocks_total` are exact block counts: equal once nothing runs (a cached prefix's
blocks count as free, being evictable).
"""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from runner.async_llm import AsyncLLM
from runner.engine.outputs import RequestOutput

# vLLM's buckets for time to first token, in seconds.
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0,
                7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)


def _engine_counts(worker: Any) -> dict[str, int]:
    """Read on the engine thread, between device calls: a consistent snapshot."""
    scheduler = worker.scheduler
    return {"running": len(scheduler.running), "waiting": len(scheduler.waiting),
            "free": scheduler.pool.num_free_blocks, "total": scheduler.pool.num_blocks}


class ServerMetrics:
    def __init__(self, model_name: str) -> None:
        self.registry = CollectorRegistry()
        labels = {"model_name": model_name}
        r = self.registry

        def counter(name: str, doc: str) -> Any:
            return Counter(name, doc, list(labels), registry=r).labels(**labels)

        def gauge(name: str, doc: str) -> Any:
            return Gauge(name, doc, list(labels), registry=r).labels(**labels)

        self.prompt_tokens = counter("vllm:prompt_tokens", "Prompt tokens of admitted requests.")
        self.generation_tokens = counter("vllm:generation_tokens", "Generated tokens sent to clients.")
        self.finished = Counter("vllm:request_success", "Finished requests (one per completion), by reason.",
                                [*labels, "finished_reason"], registry=r)
        self.http = Counter("runner:http_requests", "Completion and chat requests answered, by endpoint "
                            "and status code.", ["endpoint", "status"], registry=r)
        self.running = gauge("vllm:num_requests_running", "Requests in the running batch.")
        self.waiting = gauge("vllm:num_requests_waiting", "Requests waiting to be admitted.")
        self.kv_usage = gauge("vllm:kv_cache_usage_perc", "Fraction of KV blocks in use (1 = full).")
        self.kv_free = gauge("runner:kv_blocks_free", "KV blocks free (cached prefixes count as free).")
        self.kv_total = gauge("runner:kv_blocks_total", "KV blocks in the cache.")
        self.ttft = Histogram("vllm:time_to_first_token_seconds", "Time from admission to the first token.",
                              list(labels), buckets=TTFT_BUCKETS, registry=r).labels(**labels)
        self._model_name = model_name

    def observe(self, output: RequestOutput, first: bool) -> None:
        """Count one output the server read (its first for this prompt when `first`). With
        DELTA outputs each carries only new tokens; a FINAL_ONLY output comes once."""
        if first:
            self.prompt_tokens.inc(len(output.prompt_token_ids))
        self.generation_tokens.inc(sum(len(c.token_ids) for c in output.outputs))
        metrics = output.metrics
        if first and metrics is not None and metrics.first_token_time is not None:
            self.ttft.observe(max(0.0, metrics.first_token_time - metrics.arrival_time))
        for c in output.outputs:
            if c.finish_reason is not None and output.finished:
                self.finished.labels(model_name=self._model_name, finished_reason=c.finish_reason).inc()

    def aborted(self, count: int) -> None:
        """Requests aborted by the server (a client gone mid-stream, a sibling prompt refused)."""
        self.finished.labels(model_name=self._model_name, finished_reason="abort").inc(count)

    async def render(self, llm: AsyncLLM) -> bytes:
        if llm.is_running:
            counts = (await llm.collective_rpc(_engine_counts))[0]
            self.running.set(counts["running"])
            self.waiting.set(counts["waiting"])
            self.kv_free.set(counts["free"])
            self.kv_total.set(counts["total"])
            self.kv_usage.set(1 - counts["free"] / max(1, counts["total"]))
        return generate_latest(self.registry)
