"""`LLM`: the API users script against, vLLM's offline API over one `Engine`.

The facade only: settings become a config (`runner.engine_args`), prompts are checked
(`runner.inputs`), the engine steps (`runner.engine.engine`), outputs are assembled
(`runner.engine.outputs`). Calls are serialised: from several threads they run one at a time.
"""

from __future__ import annotations

import functools
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import numpy as np
from tqdm.auto import tqdm

from runner.device import compilation, distributed
from runner import demo, inputs
from runner.engine.engine import Engine
from runner.formats.chat import normalize_conversations
from runner.engine_args import EngineArgs
from runner.device.model_runner import ModelRunner
from runner.engine.outputs import RequestOutput, request_output
from runner.sampling_params import RequestOutputKind, SamplingParams, default_sampling_params
from runner.engine.scheduler import Scheduler
from runner.engine.scoring import forward_tokens
from runner.formats.tokenizer import Tokenizer
from runner.device.warmup import WarmupReport, warmup
from state.config import ModelConfig, RunnerConfig
from state.params import Params
from state.request import Request

RPC_METHODS = ("update_config", "reload_weights", "update_weights", "sleep", "wake_up", "reset_prefix_cache",
               "warmup")
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
        tokenizer: a folder with a tokenizer.json, or a `runner.formats.tokenizer.Tokenizer`
            (default: the model folder's).
        model_config, params: serve an in-memory tree instead of a folder (see `from_params`).
        **engine_args: the `runner.engine_args.EngineArgs` fields: load_format (auto |
            safetensors | dummy | orbax), dtype (auto | float32 | bfloat16 | float16), seed
            (dummy weights and unseeded requests), max_model_len, block_size, num_kv_blocks,
            kv_cache_memory_bytes, max_num_seqs, max_num_batched_tokens,
            enable_prefix_caching, enable_chunked_prefill, kv_cache_dtype, attention_backend
            (reference | pallas; default pallas on GPU), tensor_parallel_size (devices each
            weight and the KV cache are split over, see `runner.device.sharding`),
            data_parallel_size, enable_sleep_mode, logprobs_mode (what logprobs report, as
            vLLM's: raw_logprobs, raw_logits, processed_logprobs or processed_logits; the
            processed ones are the distribution the sampler drew from, after bias,
            penalties, temperature and the min_p / top-k / top-p mask).
    """

    def __init__(self, model: str | None = None, *, tokenizer: str | Tokenizer | None = None,
                 model_config: ModelConfig | None = None, params: Params | None = None,
                 **engine_args: Any) -> None:
        args = EngineArgs.from_kwargs(engine_args)
        if model_config is None and model is None:
            model = demo.builtin_folder()
        config = args.to_config(model, model_config)
        # The tokenizer and generation defaults first: bad files fail before any weight loads.
        tokenizer = None if args.skip_tokenizer_init else _resolve_tokenizer(tokenizer, config.model_config)
        self._why_no_tokenizer = ("skip_tokenizer_init=True" if args.skip_tokenizer_init
                                  else "the model folder has no tokenizer.json" if config.model_config.model
                                  else "an LLM built from a parameter tree has one only when given "
                                       "tokenizer=<folder or runner.formats.tokenizer.Tokenizer>")
        self._default_params = _default_sampling_params(args.generation_config, config.model_config)
        self._max_logprobs = args.max_logprobs
        compilation.warn_if_near_map_limit()
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
    def weight_version(self) -> int:
        """The version of the weights serving now (set by every reload and streamed update)."""
        return self.engine.runner.weight_version

    @property
    def param_shardings(self) -> Params:
        """Where the runner places each leaf (a `Params` tree of shardings): a tree already
        there, in the runner's dtype, can be donated to `reload_weights` without a copy."""
        return self.engine.runner.state.param_shardings

    @property
    def tokenizer(self) -> Tokenizer | None:
        return self.engine.tokenizer

    def get_tokenizer(self) -> Tokenizer | None:
        """The tokenizer, with the calls vLLM scripts make (`encode`, `decode`,
        `apply_chat_template`, `__call__`, ...); None with `skip_tokenizer_init=True`."""
        return self.engine.tokenizer

    def get_default_sampling_params(self) -> SamplingParams:
        """A fresh `SamplingParams` holding the folder's generation_config.json defaults
        (temperature, top_p, top_k, min_p, repetition_penalty, max_new_tokens), as vLLM's."""
        return self._default_params.clone()

    # -- lifecycle -----------------------------------------------------------------------

    @_exclusive
    def update_config(self, overrides: dict[str, Any]) -> RunnerConfig:
        """Merge overrides into the config and return it. A change of RoPE or norm settings
        drops the cached prefixes (their KV was computed under the old ones)."""
        return self.engine.update_config(overrides)

    @_exclusive
    def reload_weights(self, weights_path: str | None = None, weights_iterator: Any = None,
                       params: Params | None = None, is_checkpoint_format: bool = True,
                       assume_same_model: bool = False, *, donate: bool = False,
                       version: int | None = None) -> None:
        """Swap in a whole new tree, atomically (see `runner.device.lifecycle.reload_weights`):
        old and new weights coexist until the swap. `donate=True` adopts a `params` tree
        already on `param_shardings` and the runner's dtype without a copy; the caller's
        arrays are deleted. Sets `weight_version` to `version` (None: the next one); cached
        prefixes, computed with the old weights, are dropped."""
        self.engine.reload_weights(weights_path=weights_path, weights_iterator=weights_iterator,
                                   params=params, is_checkpoint_format=is_checkpoint_format,
                                   assume_same_model=assume_same_model, donate=donate, version=version)

    @_exclusive
    def update_weights(self, buckets: Any, *, version: int | None = None, is_checkpoint_format: bool = True,
                       donate: bool = False) -> None:
        """Stream new weights in buckets at bounded peak memory (see
        `runner.device.weight_sync`): `buckets` yields lists of (name, array) pairs,
        checkpoint names or, with `is_checkpoint_format=False`, leaf paths. Each bucket is
        checked in full before it lands; each old leaf is freed as its new one lands. Once
        every leaf has been replaced, `weight_version` becomes `version` (None: the next).
        An update that stops before that leaves the weights stale: generation refuses until
        a later call sends the rest or `reload_weights` loads a whole tree."""
        self.engine.update_weights(buckets, version=version, is_checkpoint_format=is_checkpoint_format,
                                   donate=donate)

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
        """Compile every program the serving loop can need (see `runner.device.warmup`); after it,
        generating with any prompt lengths and batch sizes compiles nothing."""
        return warmup(self.engine.runner)

    @_exclusive
    def forward_tokens(self, token_ids: Sequence[int], chunk_sizes: Sequence[int] | None = None) -> np.ndarray:
        """float32 logits [len(token_ids), vocab] of the served forward: row i is the
        next-token distribution after token_ids[:i + 1], before any sampling setting.

        `chunk_sizes` splits the tokens into consecutive forwards over the paged cache
        (default: one); a chunk of one token runs as a decode step. For scoring and for
        checking the served model against a reference (`runner.engine.scoring`).
        """
        return forward_tokens(self.engine.runner, self.engine.scheduler, token_ids, chunk_sizes)

    @_exclusive
    def reset_prefix_cache(self) -> bool:
        """Forget every cached prefix: later prompts are computed in full. True, as vLLM's
        (the cache can always be reset here: no request is running between calls)."""
        self.engine.scheduler.reset_prefix_cache()
        return True

    def collective_rpc(self, method: str | Callable[..., Any], timeout: float | None = None,
                       args: tuple | list = (), kwargs: dict[str, Any] | None = None) -> list:
        """Call a lifecycle method, or `method(worker, *args, **kwargs)` for a callable, on
        every worker; one result per worker. The worker is the `Engine` (its `runner` /
        `model_runner` holds the record, its `scheduler` the requests). `timeout` is
        accepted for vLLM's signature; calls here are synchronous.

        A single process is one worker. Under `runner.device.distributed` every process is one:
        each process makes this same call (SPMD), runs the method itself, and gets every
        process's result, in process order. A failure in any process raises in all of them.
        """
        if timeout is not None and not isinstance(timeout, (int, float)):
            raise ValueError(f"collective_rpc: timeout must be seconds or None, got {type(timeout).__name__} "
                             "(pass the method's arguments as args=(...), as in vLLM)")
        if callable(method):
            name, target = getattr(method, "__name__", "callable"), self._on_worker(method)
        elif method in RPC_METHODS:
            name, target = method, getattr(self, method)
        else:
            raise ValueError(f"collective_rpc: unknown method {method!r}; supported: {', '.join(RPC_METHODS)}, "
                             "or a callable taking the worker first")
        if not isinstance(args, (tuple, list)):
            raise ValueError(f"collective_rpc: args must be a tuple of positional arguments, got "
                             f"{type(args).__name__} (write args=(value,) for one argument)")
        if kwargs is not None and not isinstance(kwargs, dict):
            raise ValueError(f"collective_rpc: kwargs must be a dict, got {type(kwargs).__name__}")
        call = functools.partial(target, *args, **(kwargs or {}))
        return [call()] if not distributed.is_multiprocess() else distributed.call_everywhere(name, call)

    def _on_worker(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        @_exclusive
        def run(llm: LLM, *args: Any, **kwargs: Any) -> Any:
            return fn(llm.engine, *args, **kwargs)
        return functools.partial(run, self)

    # -- generation ----------------------------------------------------------------------

    @_exclusive
    def generate(self, prompts: inputs.Prompt | Sequence[inputs.Prompt],
                 sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
                 use_tqdm: bool = True, lora_request: Any = None,
                 priority: Sequence[int] | None = None) -> list[RequestOutput]:
        """Complete every prompt; outputs come back in prompt order.

        A prompt is a string (needs a tokenizer), `{"prompt": text}`, a list of token ids,
        or `{"prompt_token_ids": [...]}` (`runner.inputs.TextPrompt` / `TokensPrompt`);
        `sampling_params` defaults to `get_default_sampling_params()`. Every prompt is
        checked before any request exists: a bad one fails the call with no request id or
        seed drawn. Each request keeps its own copy of the settings it was given.
        `lora_request` and `priority` are vLLM's keywords: accepted at their defaults.
        """
        _check_vllm_only(lora_request, priority)
        self.engine.runner.state.check_servable()
        prompts = inputs.prompt_list(prompts)
        params_list = inputs.sampling_list(
            self.get_default_sampling_params() if sampling_params is None else sampling_params, len(prompts))
        for i, p in enumerate(params_list):
            if p.output_kind is RequestOutputKind.DELTA:
                raise ValueError(f"prompt {i}: SamplingParams.output_kind=DELTA streams pieces of a request; "
                                 "LLM.generate returns finished requests (stream with runner.AsyncLLM)")
        encoded = self.encode_prompts(prompts)
        params_list = self.check_requests([ids for _, ids in encoded], params_list)
        groups = [self.engine.make_requests(ids, p) for (_, ids), p in zip(encoded, params_list)]
        self._run([r for group in groups for r in group], use_tqdm)
        return [request_output(text, ids, group) for (text, ids), group in zip(encoded, groups)]

    def encode_prompts(self, prompts: list[inputs.Prompt]) -> list[tuple[str | None, list[int]]]:
        """(text, token ids) of each prompt, checked against the vocabulary and max_model_len."""
        return [inputs.encode_prompt(i, p, self.tokenizer, self.config, self._why_no_tokenizer)
                for i, p in enumerate(prompts)]

    def check_requests(self, ids: list[list[int]], params: list[SamplingParams]) -> list[SamplingParams]:
        """The engine's validated copy of each prompt's settings (`runner.inputs.check_request`)."""
        return [inputs.check_request(i, t, p, self.config, self.scheduler, self.tokenizer, self._max_logprobs)
                for i, (t, p) in enumerate(zip(ids, params))]

    def chat(self, messages: Any, sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
             use_tqdm: bool = True, chat_template: str | None = None, add_generation_prompt: bool = True,
             continue_final_message: bool = False, chat_template_kwargs: dict[str, Any] | None = None,
             tools: list[dict[str, Any]] | None = None, lora_request: Any = None) -> list[RequestOutput]:
        """Generate replies to one conversation (a list of `{"role", "content"}` messages) or
        a batch of them, rendered with the folder's chat template (or `chat_template`)
        exactly as `transformers`' `apply_chat_template` renders it."""
        _check_vllm_only(lora_request, None)
        if self.tokenizer is None:
            raise ValueError("chat needs a tokenizer: the model folder has no tokenizer.json "
                             "(or skip_tokenizer_init=True)")
        if continue_final_message:
            raise ValueError("chat: continue_final_message=True is not supported; end the conversation "
                             "with a user message and add_generation_prompt=True")
        conversations, batched = normalize_conversations(messages)
        prompts = [{"prompt": self.tokenizer.apply_chat_template(
                        c, tools=tools, chat_template=chat_template, tokenize=False,
                        add_generation_prompt=add_generation_prompt, **(chat_template_kwargs or {}))}
                   for c in conversations]
        # The template writes every special token itself: encode without adding more.
        ids = [{"prompt_token_ids": self.tokenizer.encode(p["prompt"], add_special_tokens=False),
                **p} for p in prompts]
        return self.generate(ids if batched else ids[:1], sampling_params, use_tqdm)

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


def _check_vllm_only(lora_request: Any, priority: Sequence[int] | None) -> None:
    """vLLM scripts pass these keywords at their defaults; anything else asks for a feature
    this runner does not have."""
    if lora_request is not None:
        raise ValueError("lora_request: LoRA adapters are not served; merge the adapter into the weights "
                         "(or pass lora_request=None)")
    if priority is not None and any(p != 0 for p in priority):
        raise ValueError("priority: requests are served first come, first served (no priority "
                         "scheduling); pass priority=None")


def _default_sampling_params(source: str, model_config: ModelConfig) -> SamplingParams:
    """vLLM's `generation_config`: "auto" reads the model folder's file, "vllm" keeps
    vLLM's own defaults, any other value names a folder holding generation_config.json."""
    if source == "vllm" or (source == "auto" and model_config.model is None):
        return SamplingParams()
    return default_sampling_params(model_config.model if source == "auto" else source)


def _resolve_tokenizer(tokenizer: str | Tokenizer | None, model_config: ModelConfig) -> Tokenizer | None:
    if isinstance(tokenizer, str):
        found = Tokenizer.from_folder(tokenizer)
        if found is None:  # named explicitly, so its absence is an error
            raise ValueError(f"tokenizer: no tokenizer.json in {tokenizer!r}")
        return found
    if tokenizer is None:
        return None if model_config.model is None else Tokenizer.from_folder(model_config.model)
    if not isinstance(tokenizer, Tokenizer):
        raise ValueError(f"tokenizer: expected a folder path, a runner.formats.tokenizer.Tokenizer or None, "
                         f"got {type(tokenizer).__name__}")
    return tokenizer
