"""Subprocess side of `test_weight_sync_reshard.py`: a trainer's tree on another mesh,
handed to tensor-parallel runners on simulated CPU devices.

Started with `XLA_FLAGS=--xla_force_host_platform_device_count=8` (JAX fixes its device count
when it starts). Usage: `python -m tests.e2e.weight_sync_worker SPEC.json OUT.json`.
Writes what it saw (tokens, log-probabilities, bytes read back to the host, errors); the
test asserts on it. Imports no torch: the checkpoint comes ready-made.
"""

from __future__ import annotations

import contextlib
import json
import sys
from collections.abc import Iterator
from typing import Any

LLM_ARGS = dict(num_kv_blocks=32, block_size=16, max_model_len=64)
PROMPTS = [{"prompt_token_ids": [5, 17, 42, 8, 91, 33]}, {"prompt_token_ids": [9, 9, 4]}]


def generate(llm: Any) -> list[list[Any]]:
    from runner import SamplingParams

    llm.reset_prefix_cache()
    outs = llm.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, logprobs=1),
                        use_tqdm=False)
    return [[o.outputs[0].token_ids, [lp[t].logprob for lp, t in zip(o.outputs[0].logprobs, o.outputs[0].token_ids)]]
            for o in outs]


def trainer_tree(host: Any, layout: str) -> Any:
    """The weights as a trainer on other devices holds them: "sharded4", split along their
    first axis over devices 4-7 where it divides; "replicated", whole on every device."""
    import jax
    from jax.sharding import NamedSharding, PartitionSpec as P

    if layout == "sharded4":
        mesh = jax.make_mesh((4,), ("fsdp",), devices=jax.devices()[4:8])
        place = lambda x: NamedSharding(mesh, P("fsdp") if x.ndim and x.shape[0] % 4 == 0 else P())  # noqa: E731
    else:
        mesh = jax.make_mesh((8,), ("data",), devices=jax.devices())
        place = lambda x: NamedSharding(mesh, P())  # noqa: E731
    return jax.tree.map(lambda x: jax.device_put(x, place(x)), host)


@contextlib.contextmanager
def host_reads(fetched: list[int]) -> Iterator[None]:
    """Count the bytes every explicit `jax.device_get` brings to the host, and refuse any
    implicit device-to-host transfer: together, every way a weight could cross to host memory."""
    import jax

    real = jax.device_get

    def counting(tree: Any) -> Any:
        out = real(tree)
        fetched.append(sum(getattr(x, "nbytes", 0) for x in jax.tree.leaves(out)))
        return out

    jax.device_get = counting
    try:
        with jax.transfer_guard_device_to_host("disallow"):
            yield
    finally:
        jax.device_get = real


def main() -> None:
    spec_path, out_path = sys.argv[1:3]
    with open(spec_path) as f:
        spec = json.load(f)
    import jax

    from runner import LLM
    from state.params import leaf_paths

    folder, record = spec["folder"], {}
    for layout, tp in (("sharded4", 2), ("replicated", 4)):
        reference = LLM(folder, tensor_parallel_size=tp, **LLM_ARGS)
        expected = generate(reference)
        host = jax.device_get(reference.runner.params)
        del reference
        tree = trainer_tree(host, layout)
        result: dict[str, Any] = {"expected": expected}

        llm = LLM(folder, tensor_parallel_size=tp, load_format="dummy", **LLM_ARGS)
        result["dummy"] = generate(llm)
        fetched: list[int] = []
        with host_reads(fetched):
            llm.reload_weights(params=tree)
        result["reload"] = generate(llm)
        result["reload_host_bytes"] = sum(fetched)
        result["caller_kept"] = not any(x.is_deleted() for x in jax.tree.leaves(tree))
        result["on_runner_shardings"] = all(
            x.sharding == s for x, s in zip(jax.tree.leaves(llm.runner.params),
                                            jax.tree.leaves(llm.param_shardings)))
        try:
            llm.reload_weights(params=tree, donate=True)
            result["donate_refusal"] = None
        except ValueError as e:
            result["donate_refusal"] = str(e)
        result["kept_after_refusal"] = not any(x.is_deleted() for x in jax.tree.leaves(tree))

        streamed = LLM(folder, tensor_parallel_size=tp, load_format="dummy", **LLM_ARGS)
        pairs = list(zip(leaf_paths(tree), jax.tree.leaves(tree)))
        fetched = []
        with host_reads(fetched):
            streamed.update_weights((pairs[i:i + 5] for i in range(0, len(pairs), 5)), is_checkpoint_format=False)
        result["streamed"] = generate(streamed)
        result["streamed_host_bytes"] = sum(fetched)
        result["weight_bytes"] = sum(x.nbytes for x in jax.tree.leaves(host))
        record[layout] = result
    with open(out_path, "w") as f:
        json.dump(record, f)


if __name__ == "__main__":
    main()
