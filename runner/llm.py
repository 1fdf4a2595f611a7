"""`LLM`: the API users script against. Owns a `ModelRunner`, a `Scheduler` and a tokenizer.

The engine step is `schedule -> execute_model -> update`; `generate` repeats it until every
request is finished. Every input is validated before the first step, so a bad prompt or
setting fails the whole call with nothing run and nothing held.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import jax
import numpy as np
from tqdm.auto import tqdm

from runner import demo, distributed
from runner.model_runner import ModelRunner, SequenceResult
from runner.outputs import CompletionOutput, RequestOutput
from runner.sampling_params import SamplingParams
from runner.scheduler import ScheduledRequest, Scheduler, SchedulerOutput
from runner.tokenizer import Tokenizer
from runner.warmup import WarmupReport, warmup
from state.config import (CacheConfig, LoadConfig, ModelConfig, ParallelConfig, RunnerConfig,
                          SchedulerConfig)
from state.params import Params
from state.request import Request

Prompt = str | dict[str, Any]
RPC_METHODS = ("update_config", "reload_weights", "sleep", "wake_up", "reset_prefix_cache")


class LLM:
    """Generate text from a llama-like model with vLLM's offline API.

    Args:
        model: a Hugging Face folder (config.json, safetensors, tokenizer.json) or an orbax
            checkpoint folder; None serves the built-in model (`runner.demo`).
        load_format: auto | safetensors | dummy | orbax.
        dtype: auto (the checkpoint's) | float32 | bfloat16 | float16.
        seed: seeds dummy weights and the per-request seeds of unseeded requests.
        max_model_len: prompt plus output tokens per request (default: the model's maximum).
        num_kv_blocks: KV blocks to allocate (default: from the memory budget).
        attention_backend: reference | pallas (default: pallas on GPU, reference elsewhere).
        tensor_parallel_size: devices each weight and the KV cache are split over (attention
            heads, MLP width, vocabulary; see `runner.sharding`).
        data_parallel_size: the mesh's "data" axis; weights and cache are replicated over it
            (no rule splits work over it yet). `dp * tp` devices are used, of every process
            when run under `runner.distributed`.
        model_config, params: serve an in-memory tree instead of a folder (see `from_params`).
    """

    def __init__(self, model: str | None = None, *, load_format: str = "auto", dtype: str = "auto",
                 seed: int = 0, max_model_len: int | None = None, block_size: int = 16,
                 num_kv_blocks: int | None = None, kv_cache_memory_bytes: int | None = None,
                 max_num_seqs: int = 32, max_num_batched_tokens: int | None = None,
                 enable_prefix_caching: bool = True, enable_chunked_prefill: bool = True,
                 kv_cache_dtype: str = "auto", attention_backend: str | None = None,
                 tensor_parallel_size: int = 1, data_parallel_size: int = 1,
                 tokenizer: str | Tokenizer | None = None, enable_sleep_mode: bool = True,
                 model_config: ModelConfig | None = None, params: Params | None = None) -> None:
        if model_config is None:
            model = model if model is not None else demo.builtin_folder()
            model_config = ModelConfig.from_pretrained(model, dtype=_resolve_dtype(model, dtype))
        # `is None`, not `or`: an explicit 0 must reach the validation, not mean "default".
        if max_model_len is None:
            max_model_len = model_config.max_position_embeddings
        config = RunnerConfig(
            model_config=model_config,
            load_config=LoadConfig(load_format=load_format, seed=seed),
            cache_config=CacheConfig(block_size=block_size, num_blocks=num_kv_blocks,
                                     memory_budget_bytes=kv_cache_memory_bytes,
                                     kv_cache_dtype=kv_cache_dtype,
                                     enable_prefix_caching=enable_prefix_caching,
                                     attention_backend=attention_backend or _default_backend(kv_cache_dtype)),
            scheduler_config=SchedulerConfig(
                max_model_len=max_model_len, max_num_seqs=max_num_seqs,
                max_num_batched_tokens=(max(1024, max_num_seqs) if max_num_batched_tokens is None
                                        else max_num_batched_tokens),
                enable_chunked_prefill=enable_chunked_prefill),
            parallel_config=ParallelConfig(tensor_parallel_size=tensor_parallel_size,
                                           data_parallel_size=data_parallel_size),
        )
        # The tokenizer first: a bad one fails before any weight is loaded.
        if isinstance(tokenizer, str):
            folder = tokenizer
            tokenizer = Tokenizer.from_folder(folder)
            if tokenizer is None:  # named explicitly, so its absence is an error
                raise ValueError(f"tokenizer: no tokenizer.json in {folder!r}")
        elif tokenizer is None and model_config.model is not None:
            tokenizer = Tokenizer.from_folder(model_config.model)
        elif tokenizer is not None and not isinstance(tokenizer, Tokenizer):
            raise ValueError(f"tokenizer: expected a folder path, a runner.tokenizer.Tokenizer or None, "
                             f"got {type(tokenizer).__name__}")
        self.runner = ModelRunner(config, params)
        self.scheduler = Scheduler(config, self.runner.num_blocks)
        self.tokenizer: Tokenizer | None = tokenizer
        self._rng = np.random.default_rng(seed)
        self._next_id = 0

    @classmethod
    def from_params(cls, model_config: ModelConfig, params: Params, **kwargs: Any) -> LLM:
        """Serve a parameter tree held in memory (e.g. by training code): no disk round trip."""
        return cls(model_config=model_config, params=params, **kwargs)

    # -- the one config record -----------------------------------------------------------

    @property
    def config(self) -> RunnerConfig:
        return self.runner.config

    def get_tokenizer(self) -> Tokenizer | None:
        return self.tokenizer

    # -- lifecycle -----------------------------------------------------------------------

    def update_config(self, overrides: dict[str, Any]) -> RunnerConfig:
        """Merge overrides into the config (sections load_config, model_config); return it."""
        return self.runner.update_config(overrides)

    def reload_weights(self, weights_path: str | None = None, weights_iterator: Any = None,
                       params: Params | None = None, is_checkpoint_format: bool = True) -> None:
        """Swap in new weights (see `runner.lifecycle.reload_weights`); cached prefixes,
        computed with the old weights, are dropped."""
        self.runner.reload_weights(weights_path=weights_path, weights_iterator=weights_iterator,
                                   params=params, is_checkpoint_format=is_checkpoint_format)
        self.scheduler.reset_prefix_cache()

    def sleep(self, level: int = 1) -> None:
        """Release device memory: level 1 keeps the weights in host memory, level 2 nothing."""
        self.runner.sleep(level)
        self.scheduler.reset_prefix_cache()  # the KV contents are gone

    def wake_up(self, tags: list[str] | None = None) -> None:
        """Restore "weights" and/or "kv_cache" (None: whatever sleeps). After a level-2
        sleep the weights hold no values until `reload_weights()`."""
        self.runner.wake_up(tags)

    def warmup(self) -> WarmupReport:
        """Compile every program the serving loop can need (see `runner.warmup`); after it,
        generating with any prompt lengths and batch sizes compiles nothing."""
        return warmup(self.runner)

    def reset_prefix_cache(self) -> None:
        """Forget every cached prefix: later prompts are computed in full."""
        self.scheduler.reset_prefix_cache()

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
        if not distributed.is_multiprocess():
            return [getattr(self, method)(*args, **(kwargs or {}))]
        try:
            result, error = getattr(self, method)(*args, **(kwargs or {})), None
        except Exception as e:  # noqa: BLE001 - raised below, once every process has reported
            result, error = None, e
        gathered = distributed.allgather_objects((result, None if error is None else repr(error)))
        if error is not None:
            raise error
        failed = [(i, e) for i, (_, e) in enumerate(gathered) if e is not None]
        if failed:
            raise RuntimeError(f"collective_rpc({method!r}) failed in process {failed[0][0]}: {failed[0][1]}")
        return [r for r, _ in gathered]

    # -- generation ----------------------------------------------------------------------

    def generate(self, prompts: Prompt | Sequence[Prompt],
                 sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
                 use_tqdm: bool = True) -> list[RequestOutput]:
        """Complete every prompt; outputs come back in prompt order.

        A prompt is a string (needs a tokenizer) or `{"prompt_token_ids": [...]}`.
        """
        self.runner.state.check_servable()
        if isinstance(prompts, (str, dict)):
            prompts = [prompts]
        elif isinstance(prompts, Iterable) and not isinstance(prompts, (bytes, bytearray)):
            prompts = list(prompts)
        else:  # None, a number, bytes (which would iterate as ints): refused, named
            raise ValueError(f"prompts: expected a string, a {{'prompt_token_ids': [...]}} dict, or a "
                             f"list of them, got {type(prompts).__name__}")
        params_list = self._sampling_list(sampling_params, len(prompts))
        encoded = [self._encode(i, p) for i, p in enumerate(prompts)]
        # Every prompt is checked before any request exists: a bad one fails the call with
        # no request id or seed drawn.
        for i, (ids, p) in enumerate(zip(encoded, params_list)):
            self._check_request(i, ids, p)
        groups = [self._requests(ids, p) for ids, p in zip(encoded, params_list)]
        self._run([r for group in groups for r in group], use_tqdm)
        return [self._output(prompt, ids, group)
                for prompt, ids, group in zip(prompts, encoded, groups)]

    def _sampling_list(self, sampling_params: Any, n: int) -> list[SamplingParams]:
        if sampling_params is None:
            return [SamplingParams()] * n
        if isinstance(sampling_params, SamplingParams):
            return [sampling_params] * n
        if (not isinstance(sampling_params, Iterable)
                or isinstance(sampling_params, (str, bytes, Mapping))):  # e.g. a dict of settings
            raise ValueError(f"sampling_params: expected one SamplingParams or a list of {n} "
                             f"(one per prompt), got {type(sampling_params).__name__}")
        params_list = list(sampling_params)
        if len(params_list) != n or not all(isinstance(p, SamplingParams) for p in params_list):
            raise ValueError(f"sampling_params: expected one SamplingParams or a list of {n} "
                             f"(one per prompt), got {len(params_list)} items")
        return params_list

    def _encode(self, index: int, prompt: Prompt) -> list[int]:
        """Token ids of one prompt, checked against the vocabulary and max_model_len."""
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError(f"prompt {index} is text but the model has no tokenizer.json; "
                                 "pass {'prompt_token_ids': [...]} instead")
            ids = self.tokenizer.encode(prompt)
        elif isinstance(prompt, dict) and set(prompt) == {"prompt_token_ids"}:
            ids = prompt["prompt_token_ids"]
            if not isinstance(ids, (list, tuple)) or not all(
                    isinstance(t, (int, np.integer)) and not isinstance(t, bool) for t in ids):
                raise ValueError(f"prompt {index}: prompt_token_ids must be a list of ints")
            ids = [int(t) for t in ids]
        else:
            raise ValueError(f"prompt {index}: expected a string or a dict with only "
                             f"'prompt_token_ids', got {type(prompt).__name__}")
        if not ids:
            raise ValueError(f"prompt {index} is empty: at least one token is needed")
        vocab = self.config.model_config.vocab_size
        bad = [t for t in ids if not 0 <= t < vocab]
        if bad:
            raise ValueError(f"prompt {index}: token id {bad[0]} is outside the vocabulary [0, {vocab})")
        max_len = self.config.scheduler_config.max_model_len
        if len(ids) >= max_len:
            raise ValueError(f"prompt {index} has {len(ids)} tokens; max_model_len={max_len} "
                             "leaves no room for a generated token")
        return ids

    def _check_request(self, index: int, ids: list[int], params: SamplingParams) -> None:
        """What SamplingParams cannot check alone: token ids against this vocabulary, stop
        strings against the tokenizer, and the request's KV against the whole pool."""
        vocab = self.config.model_config.vocab_size
        for name, tokens in (("logit_bias", params.logit_bias or {}), ("stop_token_ids", params.stop_token_ids or ())):
            bad = [t for t in tokens if not 0 <= t < vocab]
            if bad:
                raise ValueError(f"SamplingParams.{name}: token id {bad[0]} is outside the vocabulary [0, {vocab})")
        if params.stop_strings and self.tokenizer is None:
            raise ValueError("SamplingParams.stop needs a tokenizer to detokenize the output")
        try:
            self.scheduler.check_fits(len(ids), params.max_tokens)
        except ValueError as e:
            raise ValueError(f"prompt {index}: {e}") from None

    def _requests(self, ids: list[int], params: SamplingParams) -> list[Request]:
        eos = self.config.model_config.eos_token_ids
        requests = []
        for i in range(params.n):
            seed = (params.seed + i) % 2**32 if params.seed is not None else int(self._rng.integers(2**32))
            requests.append(Request(request_id=str(self._next_id), prompt_token_ids=list(ids),
                                    sampling_params=params, seed=seed, eos_token_ids=eos))
            self._next_id += 1
        return requests

    def _run(self, requests: list[Request], use_tqdm: bool) -> None:
        """The engine loop. On any exception (a keyboard interrupt included) every request of
        the call is aborted and its blocks returned, so the engine serves the next call."""
        bar = tqdm(total=len(requests), desc="Processed prompts", disable=not use_tqdm,
                   dynamic_ncols=True)
        start, num_in, num_out = time.perf_counter(), 0, 0
        try:
            for r in requests:  # inside the try: should one be refused, none stays queued
                self.scheduler.add_request(r)
            while self.scheduler.has_unfinished():
                out = self.scheduler.schedule()
                results = self.runner.execute_model(out)
                for s in out.scheduled:
                    self._record(s, results[s.request.request_id])
                sampled = {rid: r.token_id for rid, r in results.items() if r.token_id is not None}
                finished = self.scheduler.update(out, sampled)
                finished += self._check_stop_strings(out)
                num_out += len(sampled)
                num_in += sum(len(r.prompt_token_ids) for r in finished)
                if finished:
                    elapsed = time.perf_counter() - start
                    bar.set_postfix_str(f"est. speed input: {num_in / elapsed:.1f} toks/s, "
                                        f"output: {num_out / elapsed:.1f} toks/s", refresh=False)
                    bar.update(len(finished))
        except BaseException:
            self.scheduler.abort_all()
            # A step interrupted mid-flight may have lost the cache contents: no cached
            # prefix can be trusted any more.
            self.scheduler.reset_prefix_cache()
            raise
        finally:
            bar.close()

    @staticmethod
    def _record(s: ScheduledRequest, result: SequenceResult) -> None:
        request = s.request
        if result.prompt_logprobs is not None:
            # Entry j belongs to prompt position j + 1 and is computed at position j; a
            # recomputation after preemption revisits positions already recorded.
            for pos, entry in zip(range(s.start, s.end), result.prompt_logprobs):
                if pos == len(request.prompt_logprobs) and pos + 1 < len(request.prompt_token_ids):
                    request.prompt_logprobs.append(entry)
        if result.token_id is not None:
            request.cumulative_logprob += result.logprob
            if result.top_logprobs is not None:
                request.output_logprobs.append(result.top_logprobs)

    def _check_stop_strings(self, out: SchedulerOutput) -> list[Request]:
        """Finish requests whose text now holds a stop string. A request that just reached
        its length limit is checked too: a stop string its last token completes still wins
        (finish_reason "stop", string cut from the text), as in vLLM. One stopped by EOS or
        a stop token id is not: that token's text is never part of the output."""
        finished = []
        for s in out.scheduled:
            r = s.request
            if not s.samples or not r.sampling_params.stop_strings:
                continue
            if r.is_finished and r.finish_reason != "length":
                continue
            text = self.tokenizer.decode(r.output_token_ids,
                                         skip_special_tokens=r.sampling_params.skip_special_tokens)
            hit = _first_stop(text, r.sampling_params.stop_strings)
            if hit is not None:
                if not r.is_finished:  # already counted among this step's finished otherwise
                    finished.append(r)
                self.scheduler.finish(r, "stop", hit)
        return finished

    def _output(self, prompt: Prompt, ids: list[int], group: list[Request]) -> RequestOutput:
        first = group[0]
        k = first.sampling_params.prompt_logprobs
        prompt_lps = None if k is None else [None, *first.prompt_logprobs]
        return RequestOutput(
            request_id=first.request_id, prompt=prompt if isinstance(prompt, str) else None,
            prompt_token_ids=ids, prompt_logprobs=prompt_lps,
            outputs=[self._completion(i, r) for i, r in enumerate(group)],
            finished=all(r.is_finished for r in group), num_cached_tokens=first.num_cached_tokens)

    def _completion(self, index: int, r: Request) -> CompletionOutput:
        p = r.sampling_params
        shown = r.output_token_ids
        if (r.finish_reason == "stop" and not isinstance(r.stop_reason, str)
                and not p.include_stop_str_in_output):
            shown = shown[:-1]  # the EOS or stop token id that ended it: in token_ids, not in text
        text = "" if self.tokenizer is None else self.tokenizer.decode(
            shown, skip_special_tokens=p.skip_special_tokens)
        if isinstance(r.stop_reason, str):
            cut = text.find(r.stop_reason)
            text = text[:cut + len(r.stop_reason)] if p.include_stop_str_in_output else text[:cut]
        return CompletionOutput(
            index=index, text=text, token_ids=list(r.output_token_ids),
            cumulative_logprob=r.cumulative_logprob if p.logprobs is not None else None,
            logprobs=list(r.output_logprobs) if p.logprobs is not None else None,
            finish_reason=r.finish_reason, stop_reason=r.stop_reason)


def _first_stop(text: str, stops: Iterable[str]) -> str | None:
    """The stop string occurring earliest in `text`, if any."""
    found = [(text.find(s), s) for s in stops if s in text]
    return min(found)[1] if found else None


def _on_gpu() -> bool:
    return jax.devices()[0].platform == "gpu"


def _default_backend(kv_cache_dtype: str) -> str:
    """Pallas's decode kernel on GPUs (it takes no float8 pages), the jnp reference elsewhere."""
    return "pallas" if _on_gpu() and not kv_cache_dtype.startswith("fp8") else "reference"


def _resolve_dtype(model: str, dtype: str) -> str:
    """`auto` serves the checkpoint's dtype, except float32 on a GPU, served as bfloat16
    (half the bytes per decode step; what vLLM does with float32 checkpoints too)."""
    if dtype != "auto" or not _on_gpu():
        return dtype
    hf = ModelConfig.from_pretrained(model)
    return "bfloat16" if hf.dtype == "float32" else dtype
