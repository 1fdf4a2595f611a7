"""Bounded compilation: after warm-up, a varied workload compiles nothing."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from runner import LLM, SamplingParams
from runner.device import compilation
from runner.device.compilation import CompileCounter


def test_varied_workload_compiles_nothing_after_warmup(hf_checkpoint):
    folder, _ = hf_checkpoint("qwen3_tied")
    # A small engine, as every program it can run is compiled: prompts up to 23 tokens
    # against a 16-token budget are chunked, and up to six requests share three slots.
    llm = LLM(str(folder), block_size=4, num_kv_blocks=24, max_model_len=32, max_num_seqs=3,
              max_num_batched_tokens=16)
    report = llm.warmup()
    assert report.num_compilations > 0 and report.num_forward_shapes > 0
    print(f"warm-up: {report.num_forward_shapes} forward shapes, {report.num_decode_shapes} "
          f"decode shapes, {report.num_compilations} compilations, {report.seconds:.1f}s")
    rng = np.random.default_rng(0)
    settings = [SamplingParams(temperature=0, max_tokens=9, ignore_eos=True),
                SamplingParams(temperature=0.8, seed=3, max_tokens=5, ignore_eos=True),
                SamplingParams(temperature=1.0, top_p=0.9, top_k=5, max_tokens=7, logprobs=2, ignore_eos=True),
                SamplingParams(temperature=0, repetition_penalty=1.3, presence_penalty=0.5, max_tokens=6,
                               ignore_eos=True)]
    with CompileCounter() as compiles:
        for round_ in range(4):
            n = int(rng.integers(1, 7))
            prompts = [{"prompt_token_ids": rng.integers(3, 97, int(rng.integers(1, 24))).tolist()}
                       for _ in range(n)]
            params = [settings[int(rng.integers(len(settings)))] for _ in range(n)]
            outs = llm.generate(prompts, params, use_tqdm=False)
            assert all(o.outputs[0].finish_reason == "length" for o in outs)
    assert compiles.count == 0


def test_one_sequence_runner_compiles_nothing_after_warmup(hf_checkpoint):
    """With max_num_seqs=1 multi-step decodes run at one row: those programs are warmed up too."""
    folder, _ = hf_checkpoint("qwen3_tied")
    llm = LLM(str(folder), block_size=4, num_kv_blocks=12, max_model_len=24, max_num_seqs=1,
              max_num_batched_tokens=8)
    llm.warmup()
    with CompileCounter() as compiles:
        out = llm.generate({"prompt_token_ids": [5, 6, 7]}, SamplingParams(temperature=0, max_tokens=4,
                                                                          ignore_eos=True), use_tqdm=False)
    assert len(out[0].outputs[0].token_ids) == 4
    assert compiles.count == 0


SCRIPT = textwrap.dedent("""
    import sys
    from runner.device.compilation import CompileCounter, enable_persistent_cache, persistent_cache_hits
    enable_persistent_cache(sys.argv[1])
    from runner import LLM, SamplingParams
    with CompileCounter() as c:
        llm = LLM(sys.argv[2], num_kv_blocks=16, block_size=4, max_model_len=32)
        llm.generate({"prompt_token_ids": [5, 6, 7]}, SamplingParams(temperature=0, max_tokens=3),
                     use_tqdm=False)
    print("HITS", persistent_cache_hits(), "OF", c.count)
""")


def test_persistent_cache_lets_a_second_process_skip_compilation(hf_checkpoint, tmp_path):
    folder, _ = hf_checkpoint("qwen3_tied")
    counts = []
    for _ in range(2):
        out = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path / "cache"), str(folder)],
                             capture_output=True, text=True, timeout=300,
                             env={"JAX_PLATFORMS": "cpu", "PATH": "/usr/bin:/bin"})
        assert out.returncode == 0, out.stderr[-2000:]
        hits, built = out.stdout.split("HITS")[-1].split("OF")
        counts.append((int(hits), int(built)))
    assert any((tmp_path / "cache").iterdir())
    # The first process builds every program; the second finds every one of them on disk.
    (first_hits, first_built), (second_hits, second_built) = counts
    assert first_hits == 0 and first_built > 0, counts
    assert second_hits == second_built == first_built, counts


def test_compiled_programs_map_memory_and_a_runner_warns_near_the_limit(hf_checkpoint, monkeypatch):
    """Each compiled program maps memory regions for its code, and they stay mapped; a new
    runner warns once the process is near the kernel's limit, before it compiles more."""
    before = compilation.mapped_regions()
    programs = [jax.jit(lambda x, i=i: jnp.tanh(x * i) + x.sum()) for i in range(8)]
    for i, program in enumerate(programs):
        program(jnp.ones(1000 + i)).block_until_ready()
    assert compilation.mapped_regions() > before

    folder, _ = hf_checkpoint("qwen3_tied")
    small = dict(block_size=4, num_kv_blocks=12, max_model_len=24, max_num_seqs=1, max_num_batched_tokens=8)
    with warnings.catch_warnings():
        warnings.simplefilter("error", ResourceWarning)
        LLM(str(folder), **small)  # below 80% of the limit (the suite releases from 70%): silent
    monkeypatch.setattr(compilation, "map_limit", lambda: before)
    with pytest.warns(ResourceWarning, match=r"maps \d+ memory regions of the \d+ it may .*jax\.clear_caches\(\)"):
        LLM(str(folder), **small)
