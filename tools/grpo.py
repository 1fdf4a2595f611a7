"""GRPO on the built-in model: rollouts from the runner, a policy-gradient step in Flax
NNX, the new weights streamed back to the runner after every step.

    python -m tools.grpo                         # the synchronous loop, then the asynchronous one
    python -m tools.grpo --steps 40 --mode sync --output grpo.json

Group Relative Policy Optimisation (Shao et al., 2024) samples G completions of each prompt,
scores them with a reward a program can check, and pushes up the log-probability of each
completion's tokens in proportion to its advantage: its reward minus its group's mean,
over the group's standard deviation. The group is the baseline, so no value model is
needed. The step is PPO's clipped surrogate on the ratio between the trainer's
log-probability of each sampled token and the runner's, returned with the sample
(`SamplingParams(logprobs=0)`): the trainer never recomputes the old policy.

The task fits the built-in model's domain (Python's standard library sources): complete a
definition header (`def fibonacci(n):`) with a body that compiles, does something with
the parameters and ends (`code_reward`). The synchronous loop releases the KV cache while
it trains (`sleep(level=2)`); the asynchronous one generates step t+1's rollouts while
step t trains and swaps the weights under the running requests
(`AsyncLLM.pause_generation(mode="keep")`).
"""

from __future__ import annotations

import argparse
import ast
import asyncio
import dataclasses
import functools
import json
import re
import sys
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from models.flax_llama import CausalLM
from runner import LLM, AsyncLLM, SamplingParams
from runner.engine.outputs import RequestOutput
from runner.formats.bridge import flax_from_params, params_from_flax
from runner.sampling_params import RequestOutputKind
from state.config import ModelConfig
from state.params import Params, leaf_paths

# Headers of definitions the standard library is full of. Each ends at the colon, not at a
# newline: the tokenizer merges a newline with the indentation after it ("\n   "), so a
# prompt ending in a bare "\n" token tells the model the next line is at column 0.
PROMPTS: tuple[str, ...] = (
    "def fibonacci(n):", "class Stack:", "def parse_args(argv):", "def read_file(path):",
    "class Error(Exception):", "def main():", "def is_prime(n):", "def flatten(items):",
    "class Node:", "def merge(a, b):", "def quote(s):", "def get_logger(name):",
    "class Counter(dict):", "def copy_file(src, dst):", "def reverse(seq):", "def walk(top):",
)


@dataclass(frozen=True)
class GRPOConfig:
    prompts: tuple[str, ...] = PROMPTS
    samples: int = 8  # G: completions per prompt, the group its advantages are relative to
    max_tokens: int = 48
    max_prompt_tokens: int = 16  # room for each prompt in the context and the batch (PROMPTS: 9 at most)
    steps: int = 30
    learning_rate: float = 1e-3
    clip_eps: float = 0.2  # PPO's clip on the ratio new / old probability
    seed: int = 0

    def __post_init__(self) -> None:
        if not self.prompts:
            raise ValueError("prompts: expected at least one prompt")
        if self.samples < 2:
            raise ValueError(f"samples: a group needs at least 2 completions to compare, got {self.samples}")
        for name in ("max_tokens", "max_prompt_tokens", "steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: expected a positive int, got {getattr(self, name)}")
        if not (self.learning_rate > 0 and 0 < self.clip_eps < 1):
            raise ValueError(f"learning_rate must be positive and clip_eps in (0, 1), got {self.learning_rate} "
                             f"and {self.clip_eps}")


# -- reward ------------------------------------------------------------------------------


def definition_name(prompt: str) -> str:
    """The name a header defines: `fibonacci` for "def fibonacci(n):"."""
    m = re.match(r"\s*(?:async\s+)?(?:def|class)\s+(\w+)", prompt)
    if m is None:
        raise ValueError(f"prompt {prompt!r} is not a def or class header")
    return m.group(1)


def cut_completion(completion: str, finish_reason: str | None) -> tuple[str, bool]:
    """(the part of a completion that belongs to the definition the prompt opened, whether
    the definition ended within the completion).

    It ends before the first non-blank line at column 0 (a new top-level statement), at two
    blank lines in a row (PEP 8's gap between top-level definitions) or at the end of the
    text when the model stopped (EOS). A completion cut short by `max_tokens` has not
    ended; it loses its last line, which may stop mid-statement.
    """
    gap = completion.find("\n\n\n")
    text = completion if gap < 0 else completion[:gap]
    lines = text.split("\n")
    for i, line in enumerate(lines[1:], 1):
        if line and not line[0].isspace():
            return "\n".join(lines[:i]), True
    if gap >= 0 or finish_reason != "length":
        return text, True
    return "\n".join(lines[:-1]), False


# Expression statements that do something; a bare name or constant on a line does not (and
# is the first thing a policy rewarded for "any statement" learns to repeat).
_ACTIVE_EXPRESSIONS = (ast.Call, ast.Await, ast.Yield, ast.YieldFrom)


def _does_something(statement: ast.stmt) -> bool:
    if isinstance(statement, ast.Pass):
        return False
    return not isinstance(statement, ast.Expr) or isinstance(statement.value, _ACTIVE_EXPRESSIONS)


def definition_level(source: str, name: str) -> int:
    """How well `source` defines `name` at top level:
    0  it does not compile, or has no such definition, or its body does nothing (only
       `pass`, docstrings and other bare expressions);
    1  its body does something;
    2  and, for a function with parameters, a statement that does something uses one.
    `compile` rather than `ast.parse` alone: a `return` in a class body parses.
    """
    try:
        # Quietly: a completion such as `1(x)` or "\d" compiles with a SyntaxWarning, which
        # says nothing about the reward and would fill the output.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            tree = ast.parse(source)
            compile(tree, "<completion>", "exec")
    except (SyntaxError, ValueError):  # ValueError: a null byte in the source
        return 0
    node = next((n for n in tree.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))
                 and n.name == name), None)
    body = [] if node is None else [s for s in node.body if _does_something(s)]
    if not body:
        return 0
    if isinstance(node, ast.ClassDef):
        return 2
    params = {a.arg for a in (*node.args.posonlyargs, *node.args.args, *node.args.kwonlyargs)}
    used = {n.id for s in body for n in ast.walk(s) if isinstance(n, ast.Name)}
    return 2 if not params or params & used else 1


def code_reward(prompt: str, completion: str, finish_reason: str | None = "stop") -> float:
    """A graded reward for completing a definition header:
    1.0   prompt + cut completion compiles, defines the prompt's name with a body that
          does something, ended within the completion, and uses the function's parameters;
    0.75  the same without using them;
    0.5   the body starts well but does not end so: a run of its first lines is such a
          definition (the rest breaks it, or the token budget ran out);
    0.0   otherwise.

    The half credit gives the many groups with no complete definition a signal to learn
    from; asking for an end keeps the policy from filling the budget with statements, and
    asking for the parameters from answering every prompt with `return None`.
    """
    name = definition_name(prompt)
    body, ended = cut_completion(completion, finish_reason)
    level = definition_level(prompt + body, name) if ended else 0
    if level:
        return 0.5 + 0.25 * level
    lines = body.split("\n")
    if any(definition_level(prompt + "\n".join(lines[:k]), name) for k in range(len(lines), 0, -1)):
        return 0.5
    return 0.0


def group_advantages(rewards: np.ndarray, eps: float = 1e-4) -> np.ndarray:
    """(reward - group mean) / (group std + eps) along the last axis ([P, G] -> [P, G]).

    The population standard deviation (ddof=0), as in the GRPO paper's formula; a group
    whose rewards are all equal has advantages 0 and teaches nothing.
    """
    rewards = np.asarray(rewards, np.float64)
    mean = rewards.mean(axis=-1, keepdims=True)
    std = rewards.std(axis=-1, keepdims=True)
    return ((rewards - mean) / (std + eps)).astype(np.float32)


# -- rollouts to a training batch --------------------------------------------------------


@dataclass(frozen=True)
class Rollouts:
    """One step's samples as fixed-shape arrays (one compiled train step for every step).

    Row b is prompt + completion + padding. Position t of the [B, L-1] arrays is about
    token t+1: `mask` is 1 where it was sampled, `old_logprobs` its runner log-probability.
    """

    tokens: np.ndarray  # [B, L] int32
    old_logprobs: np.ndarray  # [B, L-1] float32
    mask: np.ndarray  # [B, L-1] float32
    advantages: np.ndarray  # [B] float32
    rewards: np.ndarray  # [P, G]
    stale_tokens: int  # sampled tokens generated by weights older than the trainer's
    mixed: int  # completions whose tokens came from two or more weight versions
    num_tokens: int


def collect(outputs: Sequence[RequestOutput], length: int, version: int) -> Rollouts:
    """Score `outputs` (one per prompt, G completions each) and lay them out for training.

    `version` is the weight version the trainer holds: tokens whose span in
    `CompletionOutput.weight_versions` carries an older one are counted as stale.
    """
    rewards = np.array([[code_reward(o.prompt, c.text, c.finish_reason) for c in o.outputs] for o in outputs])
    advantages = group_advantages(rewards).reshape(-1)
    rows = [(o.prompt_token_ids, c) for o in outputs for c in o.outputs]
    # Padding (id 0) follows each row: causal attention never shows it to a real token.
    tokens = np.zeros((len(rows), length), np.int32)
    old = np.zeros((len(rows), length - 1), np.float32)
    mask = np.zeros((len(rows), length - 1), np.float32)
    stale = mixed = 0
    for b, (prompt_ids, c) in enumerate(rows):
        ids = [*prompt_ids, *c.token_ids]
        if len(ids) > length:
            raise ValueError(f"a rollout of {len(ids)} tokens does not fit the batch length {length}")
        tokens[b, :len(ids)] = ids
        first = len(prompt_ids) - 1  # the position whose next token is the first sampled one
        old[b, first:len(ids) - 1] = [lp[t].logprob for lp, t in zip(c.logprobs, c.token_ids)]
        mask[b, first:len(ids) - 1] = 1.0
        stale += _stale(c.weight_versions, len(c.token_ids), version)
        mixed += len(c.weight_versions) > 1
    return Rollouts(tokens, old, mask, advantages, rewards, stale, mixed, int(mask.sum()))


def _stale(spans: Sequence[tuple[int, int]], num_tokens: int, version: int) -> int:
    """Tokens of one completion sampled under a version older than `version`."""
    ends = [start for start, _ in spans[1:]] + [num_tokens]
    return sum(end - start for (start, v), end in zip(spans, ends) if v < version)


# -- the training step -------------------------------------------------------------------


def token_logprobs(model: CausalLM, tokens: jax.Array) -> jax.Array:
    """log p(tokens[:, t+1] | tokens[:, :t+1]) for every t: [B, L] -> [B, L-1] float32."""
    logits = model(tokens[:, :-1])  # [B, L-1, V]
    logp = jax.nn.log_softmax(logits, axis=-1)
    return jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1)[..., 0]


def grpo_loss(logprobs: jax.Array, old_logprobs: jax.Array, advantages: jax.Array, mask: jax.Array,
              clip_eps: float) -> jax.Array:
    """-mean over sampled tokens of min(ratio * A, clip(ratio, 1 - eps, 1 + eps) * A).

    ratio = exp(logp_new - logp_old) per token, A the completion's advantage. The mean is
    over all sampled tokens of the batch (not per completion first), so long and short
    completions weigh each of their tokens alike. No KL penalty: the clip bounds each step.
    """
    ratio = jnp.exp(logprobs - old_logprobs)
    adv = advantages[:, None]
    objective = jnp.minimum(ratio * adv, jnp.clip(ratio, 1.0 - clip_eps, 1.0 + clip_eps) * adv)
    return -(objective * mask).sum() / jnp.maximum(mask.sum(), 1.0)


def _loss_and_stats(model: CausalLM, batch: dict[str, jax.Array],
                    clip_eps: float) -> tuple[jax.Array, dict[str, jax.Array]]:
    logp = token_logprobs(model, batch["tokens"])
    loss = grpo_loss(logp, batch["old_logprobs"], batch["advantages"], batch["mask"], clip_eps)
    mask, n = batch["mask"], jnp.maximum(batch["mask"].sum(), 1.0)
    gap = jnp.abs(logp - batch["old_logprobs"])
    clipped = jnp.abs(jnp.exp(logp - batch["old_logprobs"]) - 1.0) > clip_eps
    # How far the trainer's log-probabilities are from the runner's, before this update:
    # numerics alone on fresh weights; the policy's drift on stale tokens.
    return loss, {"logprob_gap": (gap * mask).sum() / n, "clipped": (clipped * mask).sum() / n}


@functools.partial(nnx.jit, static_argnames="clip_eps")
def train_step(model: CausalLM, optimizer: nnx.Optimizer, batch: dict[str, jax.Array],
               clip_eps: float) -> tuple[jax.Array, dict[str, jax.Array]]:
    """One optimiser step on one step's rollouts (on-policy: one update per rollout batch)."""
    (loss, stats), grads = nnx.value_and_grad(_loss_and_stats, has_aux=True)(model, batch, clip_eps)
    optimizer.update(model, grads)
    return loss, stats


def make_optimizer(model: CausalLM, learning_rate: float) -> nnx.Optimizer:
    # The global-norm clip keeps one unlucky batch (a group of long, high-advantage
    # completions) from taking a step the next rollouts cannot recover from.
    return nnx.Optimizer(model, optax.chain(optax.clip_by_global_norm(1.0),
                                            optax.adamw(learning_rate, weight_decay=0.0)), wrt=nnx.Param)


def trainer_copy(params: Params) -> Params:
    """The trainer's own copy of a runner tree, on one device with no mesh. Its own: the
    runner deletes its arrays on `sleep(level=2)` and on every streamed update. No mesh:
    with the runner's mesh on the parameters but not on optax's scalar step counts, the
    first step's outputs would carry the mesh where its inputs did not, and the train step
    would compile twice."""
    return jax.tree.map(lambda x: jnp.asarray(np.asarray(x)), params)


def policy_from_runner(llm: LLM) -> CausalLM:
    """A Flax model holding a copy of the weights the runner serves."""
    return flax_from_params(trainer_copy(llm.runner.params), llm.config.model_config)


# -- weight sync -------------------------------------------------------------------------


def layer_buckets(model: CausalLM, model_config: ModelConfig) -> Iterator[list[tuple[str, jax.Array]]]:
    """The model's weights as `update_weights` buckets of (leaf path, array): one for the
    embedding and final norm (and untied head), then one per layer. FP8 KV scales are left
    out (optional leaves; this model serves without them)."""
    params = params_from_flax(model, model_config)
    buckets: dict[str, list[tuple[str, jax.Array]]] = {}
    for path, leaf in zip(leaf_paths(params), jax.tree.leaves(params)):
        if path.endswith(("k_scale", "v_scale")):
            continue
        key = ".".join(path.split(".")[:2]) if path.startswith("layers.") else "rest"
        buckets.setdefault(key, []).append((path, leaf))
    yield from buckets.values()


# -- the loops ---------------------------------------------------------------------------


@dataclass
class StepRecord:
    step: int
    reward: float  # mean reward of the step's rollouts
    complete: float  # share of completions with reward 1.0
    loss: float
    logprob_gap: float  # mean |trainer - runner| log-probability of the sampled tokens
    clipped: float  # share of sampled tokens whose ratio left [1 - eps, 1 + eps]
    stale_tokens: int
    mixed: int
    num_tokens: int
    rollout_s: float  # generate (sync loop); waiting for the rollouts (async loop)
    reward_s: float  # scoring and batch layout
    train_s: float
    sync_s: float  # sleep + wake_up + update_weights (sync); pause + update + resume (async)
    step_s: float


def engine_args(config: GRPOConfig) -> dict[str, int]:
    # Every rollout of a step in one batch (max_num_seqs), a context just long enough, and
    # a KV cache sized for it: waking from a level-2 sleep reallocates all of it.
    num_seqs = len(config.prompts) * config.samples
    return {"seed": config.seed, "max_model_len": _length(config), "max_num_seqs": num_seqs,
            "num_kv_blocks": num_seqs * (-(-_length(config) // 16)) + 8}


def make_llm(config: GRPOConfig) -> LLM:
    return LLM(**engine_args(config))


def _length(config: GRPOConfig) -> int:
    return config.max_prompt_tokens + config.max_tokens


def _sampling(config: GRPOConfig, step: int,
              output_kind: RequestOutputKind = RequestOutputKind.CUMULATIVE) -> list[SamplingParams]:
    # Seeds are per completion (seed + i for the i-th of n): spaced so that no two
    # completions of the run share one.
    per_step = len(config.prompts) * config.samples
    return [SamplingParams(n=config.samples, temperature=1.0, max_tokens=config.max_tokens, logprobs=0,
                           seed=config.seed * 1_000_003 + step * per_step + p * config.samples,
                           output_kind=output_kind)
            for p in range(len(config.prompts))]


def _train(model: CausalLM, optimizer: nnx.Optimizer, batch: Rollouts,
           clip_eps: float) -> tuple[float, dict[str, float]]:
    arrays = {"tokens": batch.tokens, "old_logprobs": batch.old_logprobs, "mask": batch.mask,
              "advantages": batch.advantages}
    loss, stats = train_step(model, optimizer, arrays, clip_eps)
    return float(loss), {k: float(v) for k, v in stats.items()}  # float(): waits for the step


def _record(step: int, batch: Rollouts, loss: float, stats: dict[str, float],
            times: dict[str, float]) -> StepRecord:
    return StepRecord(step=step, reward=float(batch.rewards.mean()), complete=float((batch.rewards == 1.0).mean()),
                      loss=loss, logprob_gap=stats["logprob_gap"], clipped=stats["clipped"],
                      stale_tokens=batch.stale_tokens, mixed=batch.mixed, num_tokens=batch.num_tokens,
                      step_s=sum(times.values()), **times)


def run_sync(config: GRPOConfig, llm: LLM | None = None,
             log: Callable[[str], None] = print) -> list[StepRecord]:
    """The synchronous loop: rollouts, then training with the KV cache released, then sync.
    `llm` (default `make_llm(config)`) serves the trained weights afterwards."""
    llm = make_llm(config) if llm is None else llm
    cfg = llm.config.model_config
    model = policy_from_runner(llm)
    optimizer = make_optimizer(model, config.learning_rate)
    records = []
    for step in range(config.steps):
        t0 = time.perf_counter()
        outputs = llm.generate(list(config.prompts), _sampling(config, step), use_tqdm=False)
        t1 = time.perf_counter()
        batch = collect(outputs, _length(config), version=step)
        t2 = time.perf_counter()
        # The KV cache is free while the trainer computes, and the weights too: the next
        # rollouts need the new ones anyway, so keeping the old ones would waste memory.
        llm.sleep(level=2)
        t3 = time.perf_counter()
        loss, stats = _train(model, optimizer, batch, config.clip_eps)
        t4 = time.perf_counter()
        llm.wake_up()
        # Streamed buckets rather than reload_weights(params=..., donate=True): donation
        # deletes the caller's arrays, and these are the Flax model's own, which the next
        # step trains on. The stream also bounds the device's extra memory to one layer,
        # the way a sharded trainer gathers and sends its weights.
        llm.update_weights(layer_buckets(model, cfg), version=step + 1, is_checkpoint_format=False)
        t5 = time.perf_counter()
        times = {"rollout_s": t1 - t0, "reward_s": t2 - t1, "train_s": t4 - t3, "sync_s": (t3 - t2) + (t5 - t4)}
        records.append(_record(step, batch, loss, stats, times))
        log(_line(records[-1]))
    return records


async def _rollout(llm: AsyncLLM, prompt: str, params: SamplingParams) -> RequestOutput:
    final = None
    async for final in llm.generate(prompt, params):  # FINAL_ONLY: one output, at the end
        pass
    assert final is not None  # generate yields at least the finished output
    return final


def _launch(llm: AsyncLLM, config: GRPOConfig, step: int) -> list[asyncio.Task]:
    params = _sampling(config, step, RequestOutputKind.FINAL_ONLY)
    return [asyncio.ensure_future(_rollout(llm, p, sp)) for p, sp in zip(config.prompts, params)]


async def run_async_loop(config: GRPOConfig, log: Callable[[str], None] = print) -> list[StepRecord]:
    """One-step off-policy GRPO: step t+1's rollouts are generated while step t trains.

    At the sync point the engine pauses in keep mode (requests in flight freeze with
    their KV), takes the new weights as version t+1 and resumes: the frozen requests go on
    under them. Step t+1 then trains on tokens of versions t and t+1; those of version t
    are stale, and their ratio to the runner's log-probabilities, clipped, is what keeps
    the step sound. The KV cache stays allocated: the rollouts in flight hold it.
    """
    # Rollouts are read once finished, not streamed: long device calls (many decode steps
    # each) serve throughput, and a pause waits for at most one of them.
    llm = AsyncLLM(max_call_seconds=1.0, **engine_args(config))
    pending: list[asyncio.Task] = []
    try:
        cfg = llm.config.model_config
        copied = await llm.collective_rpc(lambda engine: trainer_copy(engine.runner.params))
        model = flax_from_params(copied[0], cfg)
        optimizer = make_optimizer(model, config.learning_rate)
        pending = _launch(llm, config, 0)
        records = []
        for step in range(config.steps):
            t0 = time.perf_counter()
            outputs = await asyncio.gather(*pending)
            t1 = time.perf_counter()
            batch = collect(outputs, _length(config), version=step)
            t2 = time.perf_counter()
            if step + 1 < config.steps:
                pending = _launch(llm, config, step + 1)  # under the weights of version `step`
            # A worker thread: the event loop must stay free to admit the new rollouts.
            loss, stats = await asyncio.to_thread(_train, model, optimizer, batch, config.clip_eps)
            t3 = time.perf_counter()
            await llm.pause_generation(mode="keep")
            await llm.update_weights(layer_buckets(model, cfg), version=step + 1, is_checkpoint_format=False)
            await llm.resume_generation()
            t4 = time.perf_counter()
            times = {"rollout_s": t1 - t0, "reward_s": t2 - t1, "train_s": t3 - t2, "sync_s": t4 - t3}
            records.append(_record(step, batch, loss, stats, times))
            log(_line(records[-1]))
        return records
    finally:
        for task in pending:  # after an error: rollouts nobody will read
            task.cancel()
        llm.shutdown()


def run_async(config: GRPOConfig, log: Callable[[str], None] = print) -> list[StepRecord]:
    """`run_async_loop` from synchronous code (a script; a notebook awaits the loop itself)."""
    return asyncio.run(run_async_loop(config, log))


def _line(r: StepRecord) -> str:
    return (f"step {r.step:3d}: reward {r.reward:.3f} (complete {r.complete:.2f})  loss {r.loss:+.4f}  "
            f"gap {r.logprob_gap:.1e}  stale {r.stale_tokens:4d}/{r.num_tokens} (mixed {r.mixed:3d})  "
            f"rollout {r.rollout_s:.2f}s  train {r.train_s:.2f}s  sync {r.sync_s:.2f}s  step {r.step_s:.2f}s")


def summarize(records: Sequence[StepRecord], window: int = 5) -> dict[str, float]:
    """Mean rewards of the first and last `window` steps, and the median time of each phase.

    Times leave out step 0, which compiles the programs every later step reuses, and are
    medians: on a shared host a neighbour's burst makes single steps slow. `sync_share` is
    the median over steps of sync time / step time.
    """
    timed = records[1:] or records
    phases = {name: float(np.median([getattr(r, name) for r in timed]))
              for name in ("rollout_s", "reward_s", "train_s", "sync_s", "step_s")}
    return {"steps": len(records),
            "reward_first": float(np.mean([r.reward for r in records[:window]])),
            "reward_last": float(np.mean([r.reward for r in records[-window:]])),
            **phases, "sync_share": float(np.median([r.sync_s / r.step_s for r in timed])),
            "stale_share": float(sum(r.stale_tokens for r in records) / max(sum(r.num_tokens for r in records), 1))}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    defaults = GRPOConfig()
    parser.add_argument("--steps", type=int, default=defaults.steps)
    parser.add_argument("--prompts", type=int, default=len(defaults.prompts), help="the first N of PROMPTS")
    parser.add_argument("--samples", type=int, default=defaults.samples, help="completions per prompt (G)")
    parser.add_argument("--max-tokens", type=int, default=defaults.max_tokens)
    parser.add_argument("--lr", type=float, default=defaults.learning_rate)
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--mode", choices=("sync", "async", "both"), default="both")
    parser.add_argument("--output", default="grpo.json", help="JSON report: every step's record and the summary")
    args = parser.parse_args(argv)
    config = GRPOConfig(prompts=PROMPTS[:args.prompts], samples=args.samples, max_tokens=args.max_tokens,
                        steps=args.steps, learning_rate=args.lr, seed=args.seed)
    report: dict[str, object] = {"config": dataclasses.asdict(config)}
    for mode in (("sync", "async") if args.mode == "both" else (args.mode,)):
        print(f"-- {mode} loop", flush=True)
        log = functools.partial(print, flush=True)
        records = run_sync(config, log=log) if mode == "sync" else run_async(config, log=log)
        summary = summarize(records)
        report[mode] = {"records": [dataclasses.asdict(r) for r in records], "summary": summary}
        print(json.dumps(summary, indent=2), flush=True)
    with open(args.output, "w") as f:
        json.dump(report, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
