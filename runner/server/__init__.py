"""An OpenAI-compatible HTTP server over `runner.AsyncLLM` (`python -m runner serve`).

Importing this package imports FastAPI, uvicorn and prometheus_client (the `serve` extra);
nothing else in `runner` does, so the library runs without them.
"""

from __future__ import annotations

from typing import Any

from runner.async_llm import DEFAULT_FULL_BATCH_CALL_SECONDS, DEFAULT_MAX_CALL_SECONDS, AsyncLLM
from runner.formats.generation_config import diff_sampling_params
from runner.server.app import build_app

# The model id a server of the built-in model answers to.
BUILTIN_NAME = "builtin"


def generation_defaults(llm: AsyncLLM, generation_config: str = "auto") -> dict[str, Any]:
    """The settings a request leaves out take (vLLM's `--generation-config`): "auto" reads
    the model folder's generation_config.json, "vllm" keeps vLLM's, a folder names its own."""
    if generation_config == "vllm":
        return {}
    folder = llm.config.model_config.model if generation_config == "auto" else generation_config
    return {} if folder is None else diff_sampling_params(folder)


def run_server(model: str | None = None, *, host: str = "127.0.0.1", port: int = 8000,
               served_model_names: list[str] | None = None, enable_control_endpoints: bool = False,
               max_call_seconds: float = DEFAULT_MAX_CALL_SECONDS,
               full_batch_call_seconds: float = DEFAULT_FULL_BATCH_CALL_SECONDS, log_level: str = "info",
               warmup: bool = False, **engine_args: Any) -> None:
    """Load the model, then serve until interrupted (SIGINT or SIGTERM). The port opens only
    once the model is loaded (and, with `warmup`, every serving program compiled, as vLLM
    does at startup), so a client that sees /health answer can send requests."""
    import asyncio

    import uvicorn

    llm = AsyncLLM(model, max_call_seconds=max_call_seconds, full_batch_call_seconds=full_batch_call_seconds,
                   **engine_args)
    try:
        if warmup:
            report = asyncio.run(llm.warmup())
            print(f"warmed up: {report.num_compilations} programs compiled in {report.seconds:.1f} s", flush=True)
        names = served_model_names or [model or BUILTIN_NAME]
        defaults = generation_defaults(llm, engine_args.get("generation_config", "auto"))
        app = build_app(llm, names, defaults, enable_control_endpoints)
        # A bounded graceful shutdown: an open stream would otherwise hold the exit forever.
        config = uvicorn.Config(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=5)
        uvicorn.Server(config).run()
    finally:
        llm.shutdown()


__all__ = ["BUILTIN_NAME", "build_app", "generation_defaults", "run_server"]
