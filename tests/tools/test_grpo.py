"""tools.grpo: the reward on hand-written completions, group advantages and the clipped
loss against hand computations, the rollout layout, and both loops on a tiny run."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from models.flax_llama import CausalLM
from runner.device.weight_sync import required_leaves
from runner.engine.logprobs import Logprob
from runner.engine.outputs import CompletionOutput, RequestOutput
from state import ModelConfig
from tools import grpo
from tools.grpo import code_reward, cut_completion, group_advantages, grpo_loss

# -- reward ------------------------------------------------------------------------------


@pytest.mark.parametrize("prompt, name", [("def fibonacci(n):", "fibonacci"), ("class Stack:", "Stack"),
                                          ("class Error(Exception):", "Error"), ("async def run():", "run")])
def test_definition_name(prompt, name):
    assert grpo.definition_name(prompt) == name


def test_definition_name_refuses_other_prompts():
    with pytest.raises(ValueError, match=r"'x = 1' is not a def or class header"):
        grpo.definition_name("x = 1")


@pytest.mark.parametrize("completion, finish, expected", [
    ("\n    return n\nprint(f(2))\n", "length", ("\n    return n", True)),  # a top-level line ends it
    ("\n    return n\n\n\n    x = 1", "length", ("\n    return n", True)),  # two blank lines end it
    ("\n    return n\n", "stop", ("\n    return n\n", True)),  # the model stopped (EOS)
    ("\n    x = n\n    return (n", "length", ("\n    x = n", False)),  # the budget ran out mid-line
    ("\n    x = n\n\n    return n", "stop", ("\n    x = n\n\n    return n", True)),  # one blank line: inside
])
def test_cut_completion(completion, finish, expected):
    assert cut_completion(completion, finish) == expected


@pytest.mark.parametrize("prompt, completion, finish, reward", [
    ("def f(n):", "\n    return n + 1\n", "stop", 1.0),
    ("def f(n):", "\n    if n < 2:\n        return n\n    return f(n - 1)\nprint(f(3))", "length", 1.0),
    ("def f(n):", " return n\n", "stop", 1.0),  # on the header's line
    ("def main():", "\n    print('hi')\n", "stop", 1.0),  # no parameter to use
    ("class Stack:", "\n    def push(self, x):\n        self.items.append(x)\n", "stop", 1.0),
    ("class Stack:", "\n    size = 0\n", "stop", 1.0),
    ("def f(n):", "\n    return None\n", "stop", 0.75),  # does something, ignores n
    ("def f(n):", "\n    x = n\n    return )\n", "stop", 0.5),  # starts well, then breaks
    ("def f(n):", "\n    x = n\n    y = x\n    return (x", "length", 0.5),  # the budget ran out
    ("def f(n):", "\n    pass\n", "stop", 0.0),
    ("def f(n):", '\n    """Fibonacci."""\n', "stop", 0.0),  # a docstring alone does nothing
    ("def f(n):", "\n    n\n    n\n", "stop", 0.0),  # nor do bare names
    ("def f(n):", "\nx = 1\n", "stop", 0.0),  # no body at all
    ("class Stack:", "\n    return 1\n", "stop", 0.0),  # parses, but does not compile
    ("def f(n):", "\n    return n\n  x = 1\n", "stop", 0.5),  # a bad dedent after a good line
    ("def f(n):", "\x00", "stop", 0.0),  # a null byte: ast.parse raises ValueError
])
def test_code_reward(prompt, completion, finish, reward):
    assert code_reward(prompt, completion, finish) == reward


def test_code_reward_is_quiet_about_odd_code(recwarn):
    # `1(n)` compiles with a SyntaxWarning ("'int' object is not callable"), "\d" with an
    # invalid escape warning: neither may reach the output of a training run.
    assert code_reward("def f(n):", "\n    return 1(n)\n", "stop") == 1.0
    assert code_reward("def f(n):", '\n    return "\\d" + n\n', "stop") == 1.0
    assert not recwarn.list


# -- advantages and loss -----------------------------------------------------------------


def test_group_advantages_by_hand():
    # [1, 0, 0]: mean 1/3, population std sqrt(2)/3, so (2/3) / (sqrt(2)/3) = sqrt(2).
    got = group_advantages(np.array([[1.0, 0.0, 0.0], [0.0, 0.5, 1.0]]), eps=0.0)
    s = math.sqrt(2)
    np.testing.assert_allclose(got, [[s, -s / 2, -s / 2], [-math.sqrt(1.5), 0.0, math.sqrt(1.5)]], rtol=1e-6)
    # A group whose rewards are all equal teaches nothing; eps keeps it finite.
    np.testing.assert_array_equal(group_advantages(np.array([[0.5, 0.5, 0.5, 0.5]])), np.zeros((1, 4)))
    np.testing.assert_allclose(group_advantages(np.array([[1.0, 0.0]])), [[1 / 1.0002, -1 / 1.0002]], rtol=1e-6)


def test_grpo_loss_by_hand():
    # Old log-probabilities 0, so each ratio is exp(logp). Row 0 (A = +1): ratios 1.1, 1.5
    # (clipped to 1.2), 0.5 (min keeps 0.5 < 0.8). Row 1 (A = -2): 0.5 (min keeps the
    # clipped 0.8 * -2 = -1.6 < -1.0), 1.5 (-3.0 < -2.4), and a masked token.
    logp = jnp.log(jnp.array([[1.1, 1.5, 0.5], [0.5, 1.5, 1.0]]))
    old = jnp.zeros((2, 3))
    adv = jnp.array([1.0, -2.0])
    mask = jnp.array([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    loss, grad = jax.value_and_grad(grpo_loss)(logp, old, adv, mask, 0.2)
    assert float(loss) == pytest.approx(-(1.1 + 1.2 + 0.5 - 1.6 - 3.0) / 5, rel=1e-6)
    # d/dlogp of -A * ratio / n where the unclipped term is kept; zero where the clip holds.
    np.testing.assert_allclose(grad, [[-1.1 / 5, 0.0, -0.5 / 5], [0.0, 3.0 / 5, 0.0]], rtol=1e-5, atol=1e-7)


# -- rollouts to a batch -----------------------------------------------------------------


def _output(prompt: str, prompt_ids: list[int], completions: list[tuple[str, list[int], list[float], list]]):
    return RequestOutput(request_id="r", prompt=prompt, prompt_token_ids=prompt_ids, prompt_logprobs=None, outputs=[
        CompletionOutput(index=i, text=text, token_ids=ids, cumulative_logprob=sum(lps),
                         logprobs=[{t: Logprob(lp)} for t, lp in zip(ids, lps)], finish_reason="stop",
                         weight_versions=versions)
        for i, (text, ids, lps, versions) in enumerate(completions)])


def test_collect_lays_out_tokens_logprobs_and_stale_counts():
    out = _output("def f(n):", [5, 6], [
        ("\n    return n\n", [7, 8, 0], [-0.5, -1.0, -2.0], [(0, 3), (2, 4)]),  # 2 tokens of version 3
        ("\n    pass\n", [9], [-0.25], [(0, 4)]),
    ])
    batch = grpo.collect([out], length=6, version=4)
    np.testing.assert_array_equal(batch.tokens, [[5, 6, 7, 8, 0, 0], [5, 6, 9, 0, 0, 0]])
    # Position t holds token t+1: the first sampled token follows the last prompt token.
    np.testing.assert_array_equal(batch.mask, [[0, 1, 1, 1, 0], [0, 1, 0, 0, 0]])
    np.testing.assert_array_equal(batch.old_logprobs, [[0, -0.5, -1.0, -2.0, 0], [0, -0.25, 0, 0, 0]])
    np.testing.assert_array_equal(batch.rewards, [[1.0, 0.0]])
    np.testing.assert_allclose(batch.advantages, [1 / 1.0002, -1 / 1.0002], rtol=1e-6)
    assert (batch.stale_tokens, batch.mixed, batch.num_tokens) == (2, 1, 4)
    with pytest.raises(ValueError, match="a rollout of 5 tokens does not fit the batch length 4"):
        grpo.collect([out], length=4, version=4)


# -- the training step and the sync ------------------------------------------------------

TINY = ModelConfig(architecture="Qwen3ForCausalLM", vocab_size=31, hidden_size=24, intermediate_size=40,
                   num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, head_dim=12,
                   tie_word_embeddings=True, max_position_embeddings=64, initializer_range=0.2)


def test_train_step_raises_the_logprob_of_a_positive_advantage():
    model = CausalLM(TINY, nnx.Rngs(0))
    tokens = jnp.array([[1, 2, 3, 4, 5, 6], [1, 2, 7, 8, 9, 10]])
    mask = jnp.array([[0, 1, 1, 1, 1], [0, 1, 1, 1, 1]], jnp.float32)
    old = grpo.token_logprobs(model, tokens)  # on-policy: the ratio is 1 to start with
    before = (old * mask).sum(axis=1)
    optimizer = grpo.make_optimizer(model, 1e-2)
    batch = {"tokens": tokens, "old_logprobs": old, "mask": mask, "advantages": jnp.array([1.0, -1.0])}
    _, stats = grpo.train_step(model, optimizer, batch, 0.2)
    assert float(stats["logprob_gap"]) < 1e-6 and float(stats["clipped"]) == 0.0
    after = (grpo.token_logprobs(model, tokens) * mask).sum(axis=1)
    assert after[0] > before[0] and after[1] < before[1]


def test_layer_buckets_send_every_leaf_once_by_layer():
    buckets = list(grpo.layer_buckets(CausalLM(TINY, nnx.Rngs(0)), TINY))
    names = [name for bucket in buckets for name, _ in bucket]
    assert sorted(names) == sorted(required_leaves(TINY))
    assert {n for n, _ in buckets[0]} == {"embed", "final_norm"}
    assert [{n.split(".")[1] for n, _ in b} for b in buckets[1:]] == [{"0"}, {"1"}]


# -- both loops, tiny --------------------------------------------------------------------

TINY_RUN = grpo.GRPOConfig(prompts=grpo.PROMPTS[:2], samples=2, max_tokens=6, steps=2)


def test_config_refuses_bad_values_by_name():
    with pytest.raises(ValueError, match="samples: a group needs at least 2 completions"):
        grpo.GRPOConfig(samples=1)
    with pytest.raises(ValueError, match="max_prompt_tokens: expected a positive int, got 0"):
        grpo.GRPOConfig(max_prompt_tokens=0)


def test_sync_loop_trains_and_streams_every_step():
    llm = grpo.make_llm(TINY_RUN)
    records = grpo.run_sync(TINY_RUN, llm, log=lambda line: None)
    assert [r.step for r in records] == [0, 1] and llm.weight_version == 2
    # On-policy: nothing stale, and trainer and runner agree on every sampled token.
    assert all(r.stale_tokens == 0 and r.logprob_gap < 1e-4 and r.num_tokens > 0 for r in records)
    summary = grpo.summarize(records, window=1)
    assert summary["sync_share"] == pytest.approx(summary["sync_s"] / summary["step_s"])


def test_async_loop_trains_on_rollouts_of_the_previous_weights():
    records = grpo.run_async(TINY_RUN, log=lambda line: None)
    assert records[0].stale_tokens == 0
    # Step 1's rollouts began under version 0 while step 0 trained: at least their first
    # tokens are stale for a trainer holding version 1.
    assert 0 < records[1].stale_tokens <= records[1].num_tokens
