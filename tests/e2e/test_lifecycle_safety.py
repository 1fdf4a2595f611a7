"""Lifecycle calls that must never serve wrong tokens or lose the weights: prefixes cached
under other settings, weights sharing memory with a caller, calls racing a running step,
interrupts in the middle of a call, and weight sources of every kind."""

from __future__ import annotations

import shutil
import threading
import time
from pathlib import Path

import jax
import ml_dtypes
import numpy as np
import pytest
import torch

from runner import LLM, SamplingParams
from runner.device import lifecycle
from runner.formats.param_tree import CheckpointError
from runner.formats.tokenizer import Tokenizer
from state.params import leaf_paths

ARGS = dict(num_kv_blocks=24, block_size=4, max_model_len=64, max_num_batched_tokens=32, max_num_seqs=4)
GREEDY = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
PREFIX = [5, 17, 42, 8, 91, 33, 7, 60, 12, 3, 77, 21]  # three full blocks of 4


def ids(prompt: list[int]) -> dict:
    return {"prompt_token_ids": prompt}


def tokens(llm: LLM, prompts: list[list[int]]) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in llm.generate([ids(p) for p in prompts], GREEDY, use_tqdm=False)]


@pytest.fixture(scope="module")
def folder(hf_checkpoint) -> Path:
    return hf_checkpoint("qwen3_tied")[0]


def make(folder: Path, **kwargs) -> LLM:
    return LLM(str(folder), tokenizer=Tokenizer.byte_level(), **{**ARGS, **kwargs})


def host_tree(llm: LLM) -> dict[str, np.ndarray]:
    params = llm.runner.params
    return {p: np.array(x) for p, x in zip(leaf_paths(params), jax.tree.leaves(params))}


# -- prefixes computed under other maths are never reused ------------------------------------

@pytest.mark.parametrize("via_rpc", [False, True])
@pytest.mark.parametrize("change", [{"rope_theta": 500.0}, {"rms_norm_eps": 1e-2},
                                    {"rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0,
                                                      "high_freq_factor": 4.0,
                                                      "original_max_position_embeddings": 8}}])
def test_update_config_that_changes_the_maths_drops_cached_prefixes(folder, change, via_rpc):
    llm = make(folder)
    tokens(llm, [PREFIX + [1]])  # caches the prefix blocks
    assert len(llm.scheduler.pool.cached) > 0
    overrides = {"model_config": change}
    if via_rpc:
        llm.collective_rpc("update_config", args=(overrides,))
    else:
        llm.update_config(overrides)
    got = tokens(llm, [PREFIX + [2]])
    fresh = make(folder)
    fresh.update_config(overrides)
    assert got == tokens(fresh, [PREFIX + [2]])


def test_update_config_that_changes_no_maths_keeps_cached_prefixes(folder):
    llm = make(folder)
    tokens(llm, [PREFIX + [1]])
    cached = len(llm.scheduler.pool.cached)
    llm.update_config({"model_config": {"eos_token_ids": [3]}})
    assert len(llm.scheduler.pool.cached) == cached


# -- the runner's weights are its own ---------------------------------------------------------

def _as_torch(array: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(array)


@pytest.mark.parametrize("kind", ["numpy", "torch"])
@pytest.mark.parametrize("route", ["params", "leaf iterator", "checkpoint iterator"])
def test_mutating_the_callers_arrays_after_a_reload_changes_nothing(folder, kind, route):
    llm = make(folder)
    expected = tokens(llm, [PREFIX])
    served = host_tree(llm)
    arrays = {p: (_as_torch(a.copy()) if kind == "torch" else a.copy()) for p, a in served.items()}
    if route == "params":
        tree = jax.tree.unflatten(jax.tree.structure(llm.runner.params), list(arrays.values()))
        llm.reload_weights(params=tree)
    elif route == "leaf iterator":
        llm.reload_weights(weights_iterator=list(arrays.items()), is_checkpoint_format=False)
    else:
        from models.checkpoint import checkpoint_name
        named = []
        for path, a in arrays.items():
            name, transpose = checkpoint_name(path, llm.config.model_config)
            named.append((name, a.T if transpose else a))
        llm.reload_weights(weights_iterator=named)
    for a in arrays.values():
        a[...] = 0  # in place, as an optimiser step would
    for path, leaf in zip(leaf_paths(llm.runner.params), jax.tree.leaves(llm.runner.params)):
        np.testing.assert_array_equal(np.asarray(leaf), served[path], err_msg=path)
    assert tokens(llm, [PREFIX]) == expected


def test_torch_bfloat16_and_requires_grad_tensors_are_accepted(folder):
    llm = make(folder, dtype="bfloat16")
    expected = tokens(llm, [PREFIX])
    served = host_tree(llm)
    named = [(p, torch.from_numpy(a.astype(np.float32)).to(torch.bfloat16).requires_grad_(True))
             for p, a in served.items() if a.dtype == ml_dtypes.bfloat16]
    llm.reload_weights(weights_iterator=named, is_checkpoint_format=False)
    assert tokens(llm, [PREFIX]) == expected


@pytest.mark.parametrize("value, error", [
    (jax.ShapeDtypeStruct((40,), np.float32), r"leaf 'final_norm' is an abstract array"),
    (np.zeros(40, dtype=[("a", np.float32)]), r"leaf 'final_norm' has dtype .*; expected a floating type"),
    (np.zeros(40, np.int32), r"leaf 'final_norm' has dtype int32; expected a floating type"),
])
def test_leaves_with_no_usable_values_are_checkpoint_errors(folder, value, error):
    llm = make(folder)
    before = llm.runner.params
    with pytest.raises(CheckpointError, match=error):
        llm.reload_weights(weights_iterator=[("final_norm", value)], is_checkpoint_format=False)
    assert llm.runner.params is before


@pytest.mark.parametrize("route", ["leaf iterator", "params"])
@pytest.mark.parametrize("scale", [0.0, -1.0, float("nan")])
def test_a_kv_scale_that_is_not_positive_is_refused_on_every_path(folder, route, scale):
    llm = make(folder)
    before = llm.runner.params
    value = np.float32(scale)
    with pytest.raises(CheckpointError, match=r"'layers\.0\.k_scale' is .*; a KV cache scale must be a positive"):
        if route == "leaf iterator":
            llm.reload_weights(weights_iterator=[("layers.0.k_scale", value)], is_checkpoint_format=False)
        else:
            leaves = [value if p == "layers.0.k_scale" else x
                      for p, x in zip(leaf_paths(before), jax.tree.leaves(before))]
            llm.reload_weights(params=jax.tree.unflatten(jax.tree.structure(before), leaves))
    assert llm.runner.params is before


def test_ignored_names_cannot_repeat_forever(folder):
    llm = make(folder)

    def endless():
        while True:
            yield "model.layers.0.self_attn.rotary_emb.inv_freq", np.ones(6, np.float32)

    with pytest.raises(CheckpointError, match=r"rotary_emb\.inv_freq' appears twice"):
        llm.reload_weights(weights_iterator=endless())
    with pytest.raises(CheckpointError, match=r"'lm_head\.weight' has shape \(3, 3\); expected \(97, 40\)"):
        llm.reload_weights(weights_iterator=[("lm_head.weight", np.ones((3, 3), np.float32))])
    with pytest.raises(CheckpointError, match=r"unexpected tensor 'model\.layers\.9\.self_attn\.rotary_emb"):
        llm.reload_weights(weights_iterator=[("model.layers.9.self_attn.rotary_emb.inv_freq", np.ones(6))])


# -- folders that cannot show they hold this model ------------------------------------------

@pytest.mark.parametrize("kind", ["absent", "fifo", "symlink loop"])
def test_a_folder_without_a_readable_config_json_is_refused_unless_assumed(folder, tmp_path, kind):
    llm = make(folder)
    expected = tokens(llm, [PREFIX])
    other = tmp_path / "weights"
    shutil.copytree(folder, other)
    (other / "config.json").unlink()
    if kind == "fifo":
        import os
        os.mkfifo(other / "config.json")
    elif kind == "symlink loop":
        (other / "config.json").symlink_to(other / "config.json")
    config = llm.config
    with pytest.raises(CheckpointError, match="has no readable config.json"):
        llm.reload_weights(weights_path=str(other))
    assert llm.config is config and tokens(llm, [PREFIX]) == expected
    llm.reload_weights(weights_path=str(other), assume_same_model=True)
    assert tokens(llm, [PREFIX]) == expected


# -- one call at a time -------------------------------------------------------------------

def test_two_threads_generating_at_once_both_get_their_tokens(folder):
    llm = make(folder)
    prompts = [[5 + i, 17, 42, 8 + i] for i in range(4)]
    expected = tokens(llm, prompts)
    results: dict[int, list] = {}
    errors: list[BaseException] = []

    def worker(i: int) -> None:
        try:
            results[i] = tokens(llm, prompts)
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert all(r == expected for r in results.values()) and len(results) == 3


@pytest.mark.parametrize("call", ["sleep", "reload_weights", "update_config"])
def test_a_lifecycle_call_from_another_thread_waits_for_a_running_generate(folder, call, monkeypatch):
    """The call lands between generate calls, never inside one: its effect stays, and the
    generate that was running finishes on the state it started with."""
    llm = make(folder)
    expected = tokens(llm, [PREFIX])
    started, release = threading.Event(), threading.Event()
    real_step = llm.engine.step

    def slow_step():
        started.set()
        release.wait(timeout=10)
        return real_step()

    monkeypatch.setattr(llm.engine, "step", slow_step)
    got: list = []
    runner = threading.Thread(target=lambda: got.append(tokens(llm, [PREFIX])))
    runner.start()
    started.wait(timeout=10)
    done = threading.Event()

    def lifecycle_call():
        if call == "sleep":
            llm.sleep(1)
        elif call == "reload_weights":
            llm.reload_weights()
        else:
            llm.update_config({"load_config": {"seed": 7}})
        done.set()

    other = threading.Thread(target=lifecycle_call)
    other.start()
    time.sleep(0.2)
    assert not done.is_set(), "the lifecycle call must wait for the running generate"
    release.set()
    runner.join(timeout=30)
    other.join(timeout=30)
    monkeypatch.setattr(llm.engine, "step", real_step)
    assert got == [expected]
    if call == "sleep":
        assert llm.runner.state.sleeping == ("weights", "kv_cache")
        llm.wake_up()
    elif call == "update_config":
        assert llm.config.load_config.seed == 7
    assert tokens(llm, [PREFIX]) == expected


# -- interrupts inside a call -----------------------------------------------------------------

def test_an_interrupt_while_sleep_deletes_buffers_leaves_a_sleeping_runner_that_wakes(folder, monkeypatch):
    llm = LLM.from_params(make(folder).config.model_config, make(folder).runner.params,
                          tokenizer=Tokenizer.byte_level(), **ARGS)
    expected = tokens(llm, [PREFIX])

    def interrupted(old):
        jax.tree.leaves(old.params)[0].delete()
        raise KeyboardInterrupt

    monkeypatch.setattr(lifecycle, "release", interrupted)
    with pytest.raises(KeyboardInterrupt):
        llm.sleep(1)
    assert llm.runner.state.sleeping == ("weights", "kv_cache")  # never "awake" with deleted buffers
    llm.wake_up()
    assert tokens(llm, [PREFIX]) == expected


@pytest.mark.parametrize("call", ["reload_weights", "sleep"])
def test_an_interrupt_right_after_the_runner_swap_leaves_no_stale_prefix(folder, monkeypatch, call):
    llm = make(folder)
    tokens(llm, [PREFIX + [1]])
    assert len(llm.scheduler.pool.cached) > 0
    real = getattr(llm.runner, call)

    def swapped_then_interrupted(*args, **kwargs):
        real(*args, **kwargs)
        raise KeyboardInterrupt

    monkeypatch.setattr(llm.runner, call, swapped_then_interrupted)
    with pytest.raises(KeyboardInterrupt):
        getattr(llm, call)()
    assert len(llm.scheduler.pool.cached) == 0


def test_sleep_mode_off_refuses_sleep_and_keeps_serving(folder):
    llm = make(folder, enable_sleep_mode=False)
    expected = tokens(llm, [PREFIX])
    with pytest.raises(RuntimeError, match="sleep mode is not enabled: build the LLM with enable_sleep_mode=True"):
        llm.sleep(1)
    assert llm.runner.state.sleeping == () and tokens(llm, [PREFIX]) == expected
