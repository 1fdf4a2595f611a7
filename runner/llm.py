"""`LLM`: the API users script against, vLLM's offline API over one `Engine`.

The facade only: settings become a config (`runner.engine_args`), prompts are checked
(`runner.inputs`), the engine steps (`runner.engine`), outputs are assembled
(`runner.outputs`). Calls are serialised: from several threads they run one at a time.
"""

from __future__ import annotations

import functools
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from tqdm.auto import tqdm

from runner import demo, distributed, inputs
from runner.engine import Engine
from runner.engine_args import EngineArgs
from runner.model_runner import ModelRunner
from runner.outputs import RequestOutput, request_output
from runner.sampling_params import SamplingParams
from runner.scheduler import Scheduler
from runner.tokenizer import Tokenizer
from runner.warmup import WarmupReport, warmup
from state.config import ModelConfig, RunnerConfig
from state.params import Params
from state.request import Request

RPC_METHODS = ("update_config", "reload_weights", "sleep", "wake_up", "reset_prefix_cache")
F = TypeVar("F", bound=Callable[..., Any])


def _exclusive(method: F) -> F:
    """One call at a time: a lifecycle call from another thread waits for a running
    `generate` to return (and the other way round), instead of racing its step."""
    @functools.wraps(method)
    def locked(self: LLM, *args: Any, **kwargs: Any) -> Any:
        with self._lock:
            return method(self, *args, **kwargs)
    return locked  # type: ignore[return-value]


class LLM:
    """Generate text from a llama-like model with vLLM's offline API.

    Args:
        model: a Hugging Face folder (config.json, safetensors, tokenizer.json) or an orbax
            checkpoint folder; None serves the built-in model (`runner.demo`).
        tokenizer: a folder with a tokenizer.json, or a `runner.tokenizer.Tokenizer`
            (default: the model folder's).
        model_config, params: serve an in-memory tree instead of a folder (see `from_params`).
        **engine_args: the `runner.engine_args.EngineArgs` fields: load_format (auto |
            safetensors | dummy | orbax), dtype (auto | float32 | bfloat16 | float16), seed
            (dummy weights and unseeded requests), max_model_len, block_size, num_kv_blocks,
            kv_cache_memory_bytes, max_num_seqs, max_num_batched_tokens,
            enable_prefix_caching, enable_chunked_prefill, kv_cache_dtype, attention_backend
            (reference | pallas; default pallas on GPU), tensor_parallel_size (devices each
            weight and the KV cache are split over, see `runner.sharding`),
            data_parallel_size, enable_sleep_mode.
    """

    def __init__(self, model: str | None = None, *, tokenizer: str | Tokenizer | None = None,
                 model_config: ModelConfig | None = None, params: Params | None = None,
                 **engine_args: Any) -> None:
        args = EngineArgs.from_kwargs(engine_args)
        if model_config is None and model is None:
            model = demo.builtin_folder()
        config = args.to_config(model, model_config)
        # The tokenizer first: a bad one fails before any weight is loaded.
        tokenizer = _resolve_tokenizer(tokenizer, config.model_config)
        self.engine = Engine(ModelRunner(config, params), tokenizer, seed=args.seed)
        self._lock = threading.RLock()

    @classmethod
    def from_params(cls, model_config: ModelConfig, params: Params, **kwargs: Any) -> LLM:
        """Serve a parameter tree held in memory (e.g. by training code): no disk round trip."""
        return cls(model_config=model_config, params=params, **kwargs)

    @property
    def config(self) -> RunnerConfig:
        """The one config record (the runner's)."""
        return self.engine.runner.config

    @property
    def runner(self) -> ModelRunner:
        return self.engine.runner

    @property
    def scheduler(self) -> Scheduler:
        return self.engine.scheduler

    @property
    def tokenizer(self) -> Tokenizer | None:
        return self.engine.tokenizer

    def get_tokenizer(self) -> Tokenizer | None:
        return self.engine.tokenizer

    # -- lifecycle -----------------------------------------------------------------------

    @_exclusive
    def update_config(self, overrides: dict[str, Any]) -> RunnerConfig:
        """Merge overrides into the config and return it. A change of RoPE or norm settings
        drops the cached prefixes (their KV was computed under the old ones)."""
        return self.engine.update_config(overrides)

    @_exclusive
    def reload_weights(self, weights_path: str | None = None, weights_iterator: Any = None,
                       params: Params | None = None, is_checkpoint_format: bool = True) -> None:
        """Swap in new weights (see `runner.lifecycle.reload_weights`); cached prefixes,
        computed with the old weights, are dropped."""
        self.engine.reload_weights(weights_path=weights_path, weights_iterator=weights_iterator,
                                   params=params, is_checkpoint_format=is_checkpoint_format)

    @_exclusive
    def sleep(self, level: int = 1) -> None:
        """Release device memory: level 1 keeps the weights in host memory, level 2 nothing."""
        self.engine.sleep(level)

    @_exclusive
    def wake_up(self, tags: list[str] | None = None) -> None:
        """Restore "weights" and/or "kv_cache" (None: whatever sleeps). After a level-2
        sleep the weights hold no values until `reload_weights()`."""
        self.engine.wake_up(tags)

    @_exclusive
    def warmup(self) -> WarmupReport:
        """Compile every program the serving loop can need (see `runner.warmup`); after it,
        generating with any prompt lengths and batch sizes compiles nothing."""
        return warmup(self.engine.runner)

    @_exclusive
    def reset_prefix_cache(self) -> None:
        """Forget every cached prefix: later prompts are computed in full."""
        self.engine.scheduler.reset_prefix_cache()

    def collective_rpc(self, method: str, args: tuple | list = (),
                       kwargs: dict[str, Any] | None = None) -> list:
        """Call a lifecycle method on every worker; one result per worker.

        A single process is one worker. Under `runner.distributed` every process is one:
        each process makes this same call (SPMD), runs the method itself, and gets every
        process's result, in process order. A failure in any process raises in all of them.
        """
        if method not in RPC_METHODS:
            raise ValueError(f"collective_rpc: unknown method {method!r}; supported: {', '.join(RPC_METHODS)}")
        if not isinstance(args, (tuple, list)):
            raise ValueError(f"collective_rpc: args must be a tuple of positional arguments, got "
                             f"{type(args).__name__} (write args=(value,) for one argument)")
        if kwargs is not None and not isinstance(kwargs, dict):
            raise ValueError(f"collective_rpc: kwargs must be a dict, got {type(kwargs).__name__}")
        call = functools.partial(getattr(self, method), *args, **(kwargs or {}))
        return [call()] if not distributed.is_multiprocess() else distributed.call_everywhere(method, call)

    # -- generation ----------------------------------------------------------------------

    @_exclusive
    def generate(self, prompts: inputs.Prompt | Sequence[inputs.Prompt],
                 sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
                 use_tqdm: bool = True) -> list[RequestOutput]:
        """Complete every prompt; outputs come back in prompt order.

        A prompt is a string (needs a tokenizer) or `{"prompt_token_ids": [...]}`. Every
        prompt is checked before any request exists: a bad one fails the call with no
        request id or seed drawn.
        """
        self.engine.runner.state.check_servable()
        prompts = inputs.prompt_list(prompts)
        params_list = inputs.sampling_list(sampling_params, len(prompts))
        encoded = [inputs.encode_prompt(i, p, self.tokenizer, self.config) for i, p in enumerate(prompts)]
        for i, (ids, p) in enumerate(zip(encoded, params_list)):
            inputs.check_request(i, ids, p, self.config, self.scheduler, self.tokenizer)
        groups = [self.engine.make_requests(ids, p) for ids, p in zip(encoded, params_list)]
        self._run([r for group in groups for r in group], use_tqdm)
        return [request_output(prompt, ids, group, self.tokenizer)
                for prompt, ids, group in zip(prompts, encoded, groups)]

    def _run(self, requests: list[Request], use_tqdm: bool) -> None:
        """Step until every request finished. On any exception (a keyboard interrupt
        included) every request of the call is aborted and its blocks returned, so the
        engine serves the next call."""
        bar = tqdm(total=len(requests), desc="Processed prompts", disable=not use_tqdm,
                   dynamic_ncols=True)
        start, num_in, num_out = time.perf_counter(), 0, 0
        try:
            self.engine.add_requests(requests)  # inside the try: should one be refused, none stays queued
            while self.engine.has_unfinished():
                finished = self.engine.step()
                if finished:
                    num_in += sum(len(r.prompt_token_ids) for r in finished)
                    num_out += sum(len(r.output_token_ids) for r in finished)
                    elapsed = time.perf_counter() - start
                    bar.set_postfix_str(f"est. speed input: {num_in / elapsed:.1f} toks/s, "
                                        f"output: {num_out / elapsed:.1f} toks/s", refresh=False)
                    bar.update(len(finished))
        except BaseException:
            self.engine.abort_all()
            raise
        finally:
            bar.close()


def _resolve_tokenizer(tokenizer: str | Tokenizer | None, model_config: ModelConfig) -> Tokenizer | None:
    if isinstance(tokenizer, str):
        found = Tokenizer.from_folder(tokenizer)
        if found is None:  # named explicitly, so its absence is an error
            raise ValueError(f"tokenizer: no tokenizer.json in {tokenizer!r}")
        return found
    if tokenizer is None:
        return None if model_config.model is None else Tokenizer.from_folder(model_config.model)
    if not isinstance(tokenizer, Tokenizer):
        raise ValueError(f"tokenizer: expected a folder path, a runner.tokenizer.Tokenizer or None, "
                         f"got {type(tokenizer).__name__}")
    return tokenizer
