"""Property tests at the boundaries: config overrides (`state.update_config` and
`LLM.update_config`), HF config.json fields, `SamplingParams` keyword dictionaries, and
safetensors files (crafted headers, mutated real files, index files).

The only outcomes allowed are success or the error the README documents for that boundary
(a ValueError; a CheckpointError, its subclass, for weights): any other exception type fails
the example, as does an example running past `HANG_SECONDS` (a SIGALRM interrupts it). Each
property counts its outcomes (printed under `-s`) and checks that the ones it exists to
reach happened, so none passes vacuously. After each property the runner must still serve
the outputs it served before, with every KV block back.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import shutil
import signal
import struct
from collections import Counter
from pathlib import Path

import jax
import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from runner.formats.hf_config import hf_config_dict, model_config_from_hf
from runner import LLM, SamplingParams
from runner.formats.safetensors_io import iter_safetensors
from runner.formats.param_tree import CheckpointError
from runner.formats.tokenizer import Tokenizer
from state.config import (CacheConfig, LoadConfig, ModelConfig, ParallelConfig, RopeScaling, RunnerConfig,
                          SamplerConfig, SchedulerConfig, update_config)

LLM_ARGS = dict(num_kv_blocks=6, block_size=16, max_model_len=64, max_num_batched_tokens=8, max_num_seqs=2)
GREEDY = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
PROMPTS = [[5, 17, 42, 8, 91, 33], [9, 9, 4]]
VOCAB = 97
HANG_SECONDS = 120  # one example far beyond this is a hang (a compilation takes seconds)
FUZZ = settings(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                                      HealthCheck.filter_too_much,
                                                      HealthCheck.function_scoped_fixture])


class Hang(Exception):
    """An example ran past HANG_SECONDS."""


@contextlib.contextmanager
def no_hang(seconds: float = HANG_SECONDS):
    def alarm(signum, frame):
        raise Hang(f"no outcome after {seconds}s")
    previous = signal.signal(signal.SIGALRM, alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def run_property(strategy: st.SearchStrategy, body, max_examples: int) -> Counter:
    """Run `body` on `max_examples` values of `strategy`; count the outcomes it returns."""
    outcomes: Counter = Counter()

    @settings(FUZZ, max_examples=max_examples)
    @given(strategy)
    def check(value):
        with no_hang():
            outcomes[body(value)] += 1

    check()
    return outcomes


def ids(prompt: list[int]) -> dict:
    return {"prompt_token_ids": prompt}


def outputs(llm: LLM) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in llm.generate([ids(p) for p in PROMPTS], GREEDY, use_tqdm=False)]


def assert_serving(llm: LLM, reference: list[list[int]]) -> None:
    sched = llm.scheduler
    assert not sched.has_unfinished() and sched.pool.num_free_blocks == llm.runner.num_blocks
    sched.pool.check_invariants([])
    assert outputs(llm) == reference
    assert sched.pool.num_free_blocks == llm.runner.num_blocks


@pytest.fixture(scope="module")
def tied(hf_checkpoint) -> Path:
    return hf_checkpoint("qwen3_tied")[0]


@pytest.fixture(scope="module")
def llm(tied) -> LLM:
    return LLM(str(tied), tokenizer=Tokenizer.byte_level(), **LLM_ARGS)


@pytest.fixture(scope="module")
def reference(llm) -> list[list[int]]:
    return outputs(llm)


# -- values ------------------------------------------------------------------------------------

WORDS = ["auto", "dummy", "orbax", "safetensors", "float32", "bfloat16", "float16", "fp8", "int8", "pallas",
         "reference", "Qwen3ForCausalLM", "LlamaForCausalLM", "llama3", "default", "", "/nonexistent", "."]
scalars = st.one_of(
    st.none(), st.booleans(),
    st.integers(-3, 300), st.integers(-2**80, 2**80),
    st.floats(allow_nan=True, allow_infinity=True), st.floats(1e-8, 1e4),
    st.sampled_from(WORDS), st.text(max_size=6),
)
json_values = st.recursive(scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=6), inner, max_size=3)), max_leaves=6)

RECORDS = {"model_config": ModelConfig, "load_config": LoadConfig, "cache_config": CacheConfig,
           "scheduler_config": SchedulerConfig, "parallel_config": ParallelConfig,
           "sampler_config": SamplerConfig}
ROPE_FIELDS = [f.name for f in dataclasses.fields(RopeScaling)]


def field_values(record: type) -> st.SearchStrategy:
    names = [f.name for f in dataclasses.fields(record)]
    rope = st.dictionaries(st.sampled_from(ROPE_FIELDS + ["rope_type"]), json_values, max_size=4)
    return st.dictionaries(st.sampled_from(names + ["bogus"]),
                           st.one_of(json_values, rope, st.lists(st.integers(-2, 200), max_size=3)), max_size=4)


def overrides(sections: list[str]) -> st.SearchStrategy:
    section_values = st.one_of(*[field_values(RECORDS[s]) for s in sections if s in RECORDS], json_values)
    return st.one_of(st.dictionaries(st.sampled_from(sections), section_values, max_size=3), json_values)


def base_config() -> RunnerConfig:
    model = ModelConfig(architecture="Qwen3ForCausalLM", vocab_size=97, hidden_size=40, intermediate_size=72,
                        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=12,
                        max_position_embeddings=256)
    return RunnerConfig(model_config=model, scheduler_config=SchedulerConfig(max_model_len=64))


def assert_valid(config: RunnerConfig) -> None:
    """A record `update_config` returned: fully valid (validation re-runs clean) and hashable
    (the jitted step takes the model record as a static argument)."""
    assert isinstance(config, RunnerConfig)
    rebuilt = RunnerConfig(**{f.name: dataclasses.replace(getattr(config, f.name))
                              for f in dataclasses.fields(config)})
    assert rebuilt == config
    hash(config.model_config)
    hash(config.model_config.for_compile())
    for record in (config.load_config, config.cache_config, config.scheduler_config, config.parallel_config,
                   config.sampler_config):
        hash(record)


# -- config overrides --------------------------------------------------------------------------

def test_state_update_config_fuzz():
    def body(overrides) -> str:
        base = base_config()
        try:
            new = update_config(base, overrides)
        except ValueError as e:
            assert str(e)
            assert base == base_config()  # the input record is untouched
            return "refused"
        assert_valid(new)
        assert base == base_config()
        return "applied"

    outcomes = run_property(overrides(list(RECORDS) + ["foo"]), body, 600)
    print(f"\nstate.update_config: {dict(outcomes)}")
    assert outcomes["applied"] > 0 and outcomes["refused"] > 0


HF_CHANGES = st.dictionaries(st.sampled_from(["architectures", "vocab_size", "hidden_size", "intermediate_size",
                                        "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                                        "head_dim", "tie_word_embeddings", "dtype", "torch_dtype", "rms_norm_eps",
                                        "rope_theta", "rope_parameters", "rope_scaling", "max_position_embeddings",
                                        "bos_token_id", "eos_token_id", "initializer_range", "hidden_act",
                                        "attention_bias", "layer_types", "use_sliding_window", "extra"]),
                             json_values, max_size=4)


def test_hf_config_fields_fuzz():
    hf = {"architectures": ["Qwen3ForCausalLM"], "vocab_size": 97, "hidden_size": 40, "intermediate_size": 72,
          "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 12,
          "rope_parameters": {"rope_theta": 10000.0, "rope_type": "default"}, "eos_token_id": 2}

    def body(example) -> str:
        changes, dtype = example
        try:
            cfg = model_config_from_hf({**hf, **changes}, model="/m", dtype=dtype)
        except ValueError as e:
            assert str(e)
            return "refused"
        hash(cfg)
        assert dataclasses.replace(cfg) == cfg
        assert model_config_from_hf(hf_config_dict(cfg), model="/m") == cfg  # what it read, it can write
        return "read"

    outcomes = run_property(st.tuples(HF_CHANGES, st.sampled_from(["auto", "float32", "bfloat16"])), body, 600)
    print(f"\nconfig.json fields: {dict(outcomes)}")
    assert outcomes["read"] > 0 and outcomes["refused"] > 0


def _restore(original: RunnerConfig) -> dict:
    """Overrides that set every runtime section back to `original`'s values."""
    return {s: {f.name: getattr(getattr(original, s), f.name) for f in dataclasses.fields(getattr(original, s))}
            for s in ("load_config", "model_config")}


def test_llm_update_config_fuzz(llm, reference):
    original = llm.config
    params = llm.runner.params

    def body(overrides) -> str:
        before = llm.config
        try:
            new = llm.update_config(overrides)
        except ValueError as e:
            assert str(e) and llm.config is before
            return "refused"
        assert new is llm.config
        assert_valid(new)
        llm.update_config(_restore(original))
        assert llm.config == original
        return "applied"

    outcomes = run_property(overrides(["load_config", "model_config", "cache_config", "foo"]), body, 400)
    print(f"\nLLM.update_config: {dict(outcomes)}")
    assert outcomes["applied"] > 0 and outcomes["refused"] > 0
    assert llm.runner.params is params
    assert_serving(llm, reference)


# -- SamplingParams ----------------------------------------------------------------------------

# The fields that change what is generated; the vLLM-compatibility fields (accepted at
# their defaults or refused by name) have their own tests.
SAMPLING_FIELDS = ["n", "temperature", "top_p", "top_k", "min_p", "seed", "presence_penalty",
                   "frequency_penalty", "repetition_penalty", "logit_bias", "stop", "stop_token_ids",
                   "ignore_eos", "max_tokens", "min_tokens", "logprobs", "prompt_logprobs",
                   "include_stop_str_in_output", "skip_special_tokens"]
sampling_values = st.one_of(
    json_values,
    st.floats(-3, 3), st.integers(-2, 25), st.integers(0, 2**32 + 1),
    st.dictionaries(st.integers(-5, 120), st.floats(allow_nan=True, allow_infinity=True), max_size=3),
    st.dictionaries(st.integers(-5, 120), st.floats(-100, 100), max_size=3),
    st.lists(st.integers(-5, 120), max_size=3),
    st.lists(st.text(max_size=3), max_size=3),
)

# In-range values per field, so that fuzzed dictionaries are often valid as a whole.
IN_RANGE = {
    "n": st.integers(1, 3), "temperature": st.one_of(st.just(0), st.floats(0, 2)), "top_p": st.floats(0.01, 1),
    "top_k": st.integers(-1, 120), "min_p": st.floats(0, 1), "seed": st.one_of(st.none(), st.integers(0, 2**32 - 1)),
    "presence_penalty": st.floats(-2, 2), "frequency_penalty": st.floats(-2, 2),
    "repetition_penalty": st.floats(0.1, 3),
    "logit_bias": st.dictionaries(st.integers(0, VOCAB - 1), st.floats(-100, 100), max_size=3),
    "stop": st.one_of(st.text(min_size=1, max_size=3), st.lists(st.text(min_size=1, max_size=3), max_size=2)),
    "stop_token_ids": st.lists(st.integers(0, VOCAB - 1), max_size=3), "ignore_eos": st.booleans(),
    "max_tokens": st.integers(1, 70), "min_tokens": st.integers(0, 5),
    "logprobs": st.one_of(st.none(), st.integers(0, 20)), "prompt_logprobs": st.one_of(st.none(), st.integers(0, 20)),
    "include_stop_str_in_output": st.booleans(), "skip_special_tokens": st.booleans(),
}
assert set(IN_RANGE) == set(SAMPLING_FIELDS)
sampling_kwargs = st.fixed_dictionaries({}, optional={
    name: st.one_of(IN_RANGE[name], IN_RANGE[name], IN_RANGE[name], sampling_values) for name in SAMPLING_FIELDS})


def test_sampling_params_fuzz():
    def body(kwargs) -> str:
        try:
            params = SamplingParams(**kwargs)
        except ValueError as e:
            name = str(e).split(":")[0]
            assert name.startswith("SamplingParams.") and name.split(".")[1] in SAMPLING_FIELDS, str(e)
            return "refused"
        # Accepted: every number is one float32 holds, every switch a bool.
        for name in ("temperature", "top_p", "min_p", "presence_penalty", "frequency_penalty",
                     "repetition_penalty"):
            assert math.isfinite(getattr(params, name))
        assert all(math.isfinite(v) for v in (params.logit_bias or {}).values())
        # max_tokens=None means "up to max_model_len", resolved when the request is submitted.
        assert -1 <= params.top_k < 2**31 and (params.max_tokens is None or 1 <= params.max_tokens)
        assert 0 <= params.min_tokens <= (math.inf if params.max_tokens is None else params.max_tokens)
        assert all(isinstance(s, str) and s for s in params.stop_strings)
        for name in ("ignore_eos", "include_stop_str_in_output", "skip_special_tokens"):
            assert isinstance(getattr(params, name), bool)
        return "accepted"

    outcomes = run_property(sampling_kwargs, body, 1000)
    print(f"\nSamplingParams: {dict(outcomes)}")
    assert outcomes["accepted"] > 0 and outcomes["refused"] > 0


def _fits_vocab(params: SamplingParams) -> bool:
    tokens = [*(params.logit_bias or {}), *(params.stop_token_ids or ())]
    return all(0 <= t < VOCAB for t in tokens)


def test_accepted_sampling_params_generate(llm, reference):
    """Settings the fuzzer finds valid run through the engine: each request finishes, with
    tokens from the vocabulary; ids outside the vocabulary are refused before anything runs."""
    accepted: list[SamplingParams] = []

    def collect(kwargs) -> str:
        try:
            params = SamplingParams(**kwargs)
        except ValueError:
            return "refused"
        assume(params.n <= 3)
        accepted.append(params)
        return "accepted"

    in_range = st.fixed_dictionaries({}, optional={name: IN_RANGE[name] for name in SAMPLING_FIELDS})
    run_property(st.one_of(in_range, sampling_kwargs), collect, 300)
    runnable = [p for p in accepted if _fits_vocab(p)]
    refused = [p for p in accepted if not _fits_vocab(p)]
    assert len(runnable) >= 30
    steps = llm.scheduler.stats.num_steps
    for p in refused[:20]:
        with no_hang(), pytest.raises(ValueError, match=r"^SamplingParams\.(logit_bias|stop_token_ids): token id"):
            llm.generate([ids(PROMPTS[0])], p, use_tqdm=False)
    assert llm.scheduler.stats.num_steps == steps
    # Short outputs keep the number of steps small; validation runs again on the copy.
    runnable = [dataclasses.replace(p, max_tokens=min(p.max_tokens or 4, 4), min_tokens=min(p.min_tokens, 4))
                for p in runnable[:40]]
    for start in range(0, len(runnable), 20):
        chunk = runnable[start:start + 20]
        with no_hang():
            outs = llm.generate([ids(PROMPTS[i % 2]) for i in range(len(chunk))], chunk, use_tqdm=False)
        for out, p in zip(outs, chunk):
            assert out.finished and len(out.outputs) == p.n
            for c in out.outputs:
                assert 1 <= len(c.token_ids) <= p.max_tokens and all(0 <= t < VOCAB for t in c.token_ids)
                assert c.finish_reason in ("stop", "length")
    assert_serving(llm, reference)


# -- safetensors -------------------------------------------------------------------------------

def safetensors_bytes(header, data: bytes = b"", header_len: int | None = None) -> bytes:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(raw) if header_len is None else header_len) + raw + data


ST_DTYPES = ["F32", "F16", "BF16", "F64", "I32", "I64", "I8", "U8", "U16", "BOOL", "F8_E4M3", "F8_E5M2", "F4",
             "C64", "Q9", ""]
NAMES = ["model.norm.weight", "model.embed_tokens.weight", "lm_head.weight",
         "model.layers.0.self_attn.q_proj.weight", "model.layers.1.mlp.up_proj.weight",
         "model.layers.0.self_attn.k_scale", "model.layers.9.mlp.up_proj.weight", "__metadata__"]
sizes = st.one_of(st.integers(-2, 200), st.integers(0, 2**64 - 1))
entries = st.one_of(
    st.fixed_dictionaries({"dtype": st.one_of(st.sampled_from(ST_DTYPES), st.text(max_size=4)),
                           "shape": st.lists(sizes, max_size=3),
                           "data_offsets": st.lists(sizes, max_size=3)}),
    json_values,
)
crafted_files = st.one_of(
    st.builds(safetensors_bytes, st.dictionaries(st.one_of(st.sampled_from(NAMES), st.text(max_size=8)), entries,
                                                 max_size=4),
              st.binary(max_size=400), st.one_of(st.none(), st.integers(0, 2**64 - 1), st.integers(0, 600))),
    st.builds(safetensors_bytes, st.binary(max_size=64), st.binary(max_size=64)),
    st.binary(max_size=300),
)


@pytest.fixture
def scratch(tied, tmp_path) -> Path:
    """A folder with the checkpoint's config.json, for one property's files."""
    folder = tmp_path / "fuzzed"
    folder.mkdir()
    shutil.copy(tied / "config.json", folder)
    return folder


def _reload_outcome(llm: LLM, folder: Path, tied: Path) -> str:
    """Reload from `folder`: either it works (then the original weights go back) or it is a
    CheckpointError and nothing changed."""
    config, params = llm.config, llm.runner.params
    with no_hang():
        try:
            llm.reload_weights(weights_path=str(folder))
        except CheckpointError as e:
            assert str(e)
            assert llm.config is config and llm.runner.params is params
            return "refused"
        llm.reload_weights(weights_path=str(tied))
    return "loaded"


def test_crafted_safetensors_fuzz(llm, reference, tied, scratch):
    def body(data: bytes) -> str:
        (scratch / "model.safetensors").write_bytes(data)
        try:
            list(iter_safetensors(scratch))
        except CheckpointError:
            pass
        return _reload_outcome(llm, scratch, tied)

    outcomes = run_property(crafted_files, body, 600)
    print(f"\ncrafted safetensors files: {dict(outcomes)}")
    assert outcomes["refused"] > 0
    assert_serving(llm, reference)


@pytest.fixture(scope="module")
def real_file(tied) -> tuple[bytes, dict, bytes]:
    data = (tied / "model.safetensors").read_bytes()
    n = struct.unpack("<Q", data[:8])[0]
    return data, json.loads(data[8:8 + n]), data[8 + n:]


def test_mutated_safetensors_fuzz(llm, reference, tied, scratch, real_file):
    """The real checkpoint, damaged: truncated, bytes overwritten (header or data), or one
    header entry's dtype, shape or offsets changed. Overwritten data bytes can still load
    (they are just other numbers); everything else is a CheckpointError."""
    data, header, payload = real_file
    names = sorted(k for k in header if k != "__metadata__")
    mutations = st.one_of(
        st.tuples(st.just("truncate"), st.integers(0, len(data) - 1)),
        st.tuples(st.just("overwrite"), st.integers(0, len(data) - 1), st.binary(min_size=1, max_size=8)),
        st.tuples(st.just("entry"), st.sampled_from(names), st.sampled_from(["dtype", "shape", "data_offsets"]),
                  st.one_of(st.sampled_from(ST_DTYPES), st.lists(sizes, max_size=3), json_values)),
    )

    def body(mutation) -> str:
        changed = header
        if mutation[0] == "truncate":
            damaged = data[:mutation[1]]
        elif mutation[0] == "overwrite":
            _, at, patch = mutation
            damaged = data[:at] + patch + data[at + len(patch):]
        else:
            _, name, key, value = mutation
            changed = json.loads(json.dumps(header))
            changed[name][key] = value
            damaged = safetensors_bytes(changed, payload)
        (scratch / "model.safetensors").write_bytes(damaged)
        outcome = _reload_outcome(llm, scratch, tied)
        if mutation[0] == "truncate" or (mutation[0] == "entry" and changed != header):
            assert outcome == "refused"
        return f"{mutation[0]} {outcome}"

    outcomes = run_property(mutations, body, 500)
    print(f"\nmutated safetensors files: {dict(outcomes)}")
    assert all(outcomes[f"{kind} refused"] > 0 for kind in ("truncate", "overwrite", "entry"))
    assert_serving(llm, reference)


INDEXES = st.one_of(json_values, st.fixed_dictionaries({"weight_map": st.one_of(
    json_values, st.dictionaries(st.sampled_from(NAMES), st.sampled_from(
        ["model.safetensors", "missing.safetensors", "../model.safetensors", "/etc/passwd", "", ".", "config.json"]),
        max_size=3))}))


def test_index_file_fuzz(llm, reference, tied, scratch):
    """An index beside a valid model.safetensors: it works only when every shard it names is
    that file (the tensors the index leaves out are still read from it)."""
    shutil.copy(tied / "model.safetensors", scratch)

    def body(index) -> str:
        (scratch / "model.safetensors.index.json").write_text(json.dumps(index))
        outcome = _reload_outcome(llm, scratch, tied)
        weight_map = index.get("weight_map") if isinstance(index, dict) else None
        if outcome == "loaded":
            assert isinstance(weight_map, dict) and set(weight_map.values()) == {"model.safetensors"}
        return outcome

    outcomes = run_property(INDEXES, body, 300)
    print(f"\nsafetensors index files: {dict(outcomes)}")
    assert outcomes["loaded"] > 0 and outcomes["refused"] > 0
    assert_serving(llm, reference)


def test_runner_serves_after_the_fuzzers(llm, reference, tied):
    llm.reload_weights(weights_path=str(tied))
    assert_serving(llm, reference)
    leaves = jax.tree.leaves(llm.runner.params)
    assert all(np.isfinite(np.asarray(x)).all() for x in leaves)
