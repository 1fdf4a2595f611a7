"""A bounded random walk over the lifecycle calls, with calls from other threads and
interrupts: after every step the runner serves exactly what a fresh runner holding the
same weights and settings serves."""

from __future__ import annotations

import threading
from collections import Counter

import jax
import numpy as np
import pytest

from runner import LLM, SamplingParams
from runner.formats.tokenizer import Tokenizer

ARGS = dict(num_kv_blocks=24, block_size=4, max_model_len=64, max_num_batched_tokens=16, max_num_seqs=3)
GREEDY = SamplingParams(temperature=0, max_tokens=5, ignore_eos=True)
PROMPTS = [[5, 17, 42, 8, 91, 33, 7, 60, 12], [5, 17, 42, 8, 91, 33, 7, 60, 40], [9, 9, 4]]
ROPE = {"base": 10000.0, "alt": 321.0}
STEPS = 40


def run(llm: LLM) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in
            llm.generate([{"prompt_token_ids": p} for p in PROMPTS], GREEDY, use_tqdm=False)]


@pytest.fixture(scope="module")
def world(hf_checkpoint):
    folder = hf_checkpoint("qwen3_tied")[0]
    llm = LLM(str(folder), tokenizer=Tokenizer.byte_level(), **ARGS)
    # Host copies: the runner's own buffers are deleted whenever it sleeps.
    trees = {"file": jax.device_get(llm.runner.params),
             "other": jax.device_get(jax.tree.map(lambda x: x * 0.5 if x.ndim == 2 else x, llm.runner.params))}
    expected = {}
    for weights, tree in trees.items():
        for rope, theta in ROPE.items():
            fresh = LLM.from_params(llm.config.model_config, tree, **ARGS)
            fresh.update_config({"model_config": {"rope_theta": theta}})
            expected[weights, rope] = run(fresh)
    assert expected["file", "base"] != expected["other", "base"] != expected["other", "alt"]
    return llm, trees, expected


def test_random_walk_over_lifecycle_calls_threads_and_interrupts(world, monkeypatch):
    llm, trees, expected = world
    rng = np.random.default_rng(0)
    state = {"weights": "file", "rope": "base"}
    done = Counter()

    def set_rope(rope: str) -> None:
        llm.update_config({"model_config": {"rope_theta": ROPE[rope]}})
        state["rope"] = rope

    def reload(weights: str) -> None:
        if weights == "file" and state["rope"] == "base":
            llm.reload_weights()  # from the folder: refused while the runner's RoPE differs from its config.json
        else:
            llm.reload_weights(params=trees[weights])
        state["weights"] = weights

    def interrupted_generate() -> None:
        real = llm.runner.execute_model
        calls = {"n": 0}

        def step(out):
            calls["n"] += 1
            if calls["n"] == 2:
                raise KeyboardInterrupt
            return real(out)

        monkeypatch.setattr(llm.runner, "execute_model", step)
        try:
            with pytest.raises(KeyboardInterrupt):
                run(llm)
        finally:
            monkeypatch.setattr(llm.runner, "execute_model", real)

    def sleep_and_wake() -> None:
        level = int(rng.integers(1, 3))
        llm.sleep(level)
        if level == 2:
            llm.wake_up(["weights"])
            reload(state["weights"])
            llm.wake_up(["kv_cache"])
        else:
            llm.wake_up()

    def call_from_another_thread() -> None:
        """A lifecycle call made while this thread generates: it runs before or after the
        generate, never inside it, so the generate serves one state or the other."""
        target = "other" if state["weights"] == "file" else "file"
        before = dict(state)
        thread = threading.Thread(target=reload, args=(target,))
        got: list = []
        thread.start()
        got.append(run(llm))
        thread.join()
        assert got[0] in (expected[before["weights"], before["rope"]], expected[target, before["rope"]])

    actions = {
        "generate": lambda: None,
        "rope": lambda: set_rope("alt" if state["rope"] == "base" else "base"),
        "reload": lambda: reload(str(rng.choice(list(trees)))),
        "sleep": sleep_and_wake,
        "reset": llm.reset_prefix_cache,
        "interrupt": interrupted_generate,
        "thread": call_from_another_thread,
    }
    names = list(actions)
    for _ in range(STEPS):
        name = names[int(rng.integers(len(names)))]
        actions[name]()
        done[name] += 1
        assert run(llm) == expected[state["weights"], state["rope"]], (name, state, dict(done))
        assert llm.scheduler.pool.num_free_blocks == llm.runner.num_blocks
        llm.scheduler.pool.check_invariants([])
    assert len(done) == len(actions), f"every action ran at least once: {dict(done)}"
