"""Benchmark: weight sync for training loops, on W1 and on a model with ten times its weights.

Random weights, no forward pass (nothing to compile but copies). Per model, each figure
against a baseline measured in the same run, on the same device:

    device tree       reload_weights(params=tree of device arrays)   / a jitted copy of the tree
                      (with the finiteness check, and without)
    streamed device   update_weights(leaf-path buckets, device arrays) / the same jitted copy
    donated           reload_weights(params=tree, donate=True)       / the same jitted copy
                      (with the finiteness check, and without: load_config.check_finite=False)
    host tree         reload_weights(params=tree of numpy arrays)    / device_put of that tree
    streamed peak     live device bytes above the served weights during update_weights of
                      host buckets (one layer each), / the weights; and the bound's slack
    sleep 1           sleep(1) + wake_up()                            / device_put of the host tree
    wake 1            wake_up() after sleep(1)                        / device_put of the host tree
    sleep 2 + reload  sleep(2) + wake_up() + reload_weights(params=host tree) / device_put

Times are the median of `repeats` runs. Targets (from the design notes): device tree
<= 1.5x, donated < 0.05x, wake 1 <= 1.5x, streamed peak <= weights + largest bucket + 5%.

    python -m benchmarks.weight_sync [--models w1,w10] [--repeats 3] [--output report.json]
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.bench import Workload
from runner.device import weight_sync
from runner.device.loader import dummy_params
from runner.llm import LLM
from state.config import ModelConfig
from state.params import leaf_paths, param_bytes

# W1, and a model with about ten times its weights (wider, with more layers and heads).
MODELS = {"w1": Workload(),
          "w10": dataclasses.replace(Workload(), hidden_size=1024, intermediate_size=3072, num_layers=30,
                                     num_heads=16, num_kv_heads=8)}
TARGETS = {"device tree": 1.5, "donated": 0.05, "wake 1": 1.5}


def _median_time(fn: Callable[[], Any], repeats: int, setup: Callable[[], Any] | None = None) -> float:
    """Median seconds of `repeats` calls after one untimed call (which compiles what it needs)."""
    times = []
    for i in range(repeats + 1):
        arg = setup() if setup is not None else None
        start = time.perf_counter()
        fn() if arg is None else fn(arg)
        if i:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def live_bytes() -> int:
    return sum(a.nbytes for a in jax.live_arrays() if not a.is_deleted())


@jax.jit
def _copy(tree: Any) -> Any:
    return jax.tree.map(jnp.copy, tree)


def measure(name: str, cfg: ModelConfig, repeats: int, seed: int = 0) -> dict[str, Any]:
    """Every figure of the table for one model of random weights (`seed`), on the default device."""
    llm = LLM.from_params(cfg, dummy_params(cfg, seed), max_model_len=256, num_kv_blocks=4, block_size=16)
    shardings = llm.param_shardings
    weights = param_bytes(llm.runner.params)

    def block(_: Any = None) -> None:
        jax.block_until_ready(llm.runner.params)

    def trainer_tree() -> Any:
        """The weights as a JAX trainer holds them: outputs of a jitted step, on the runner's
        shardings (other values than the runner's, so nothing is shared)."""
        return jax.jit(lambda t: jax.tree.map(lambda x: x * 1, t), out_shardings=shardings)(llm.runner.params)

    device = jax.block_until_ready(trainer_tree())
    # Host arrays of their own: `device_get` on CPU returns views of the device buffers.
    host = jax.tree.map(lambda x: np.array(x, copy=True), jax.device_get(device))
    rows: dict[str, Any] = {"model": name, "weight_bytes": weights}
    copy = _median_time(lambda: jax.block_until_ready(_copy(device)), repeats)
    h2d = _median_time(lambda: jax.block_until_ready(jax.device_put(host, shardings)), repeats)
    rows["baselines_s"] = {"jitted copy": copy, "host to device": h2d}

    def timed(label: str, fn: Callable[..., Any], baseline: float, setup: Callable[[], Any] | None = None) -> None:
        def run(*args: Any) -> None:
            fn(*args)
            block()
        seconds = _median_time(run, repeats, setup)
        rows[label] = {"s": seconds, "ratio": seconds / baseline}

    timed("device tree", lambda: llm.reload_weights(params=device), copy)
    paths = leaf_paths(device)
    device_pairs = list(zip(paths, jax.tree.leaves(device)))
    timed("streamed device", lambda: llm.update_weights(_layer_buckets(device_pairs), is_checkpoint_format=False),
          copy)
    timed("donated", lambda t: llm.reload_weights(params=t, donate=True),
          copy, setup=lambda: jax.block_until_ready(trainer_tree()))
    llm.update_config({"load_config": {"check_finite": False}})
    timed("device tree, unchecked", lambda: llm.reload_weights(params=device), copy)
    timed("donated, unchecked", lambda t: llm.reload_weights(params=t, donate=True),
          copy, setup=lambda: jax.block_until_ready(trainer_tree()))
    llm.update_config({"load_config": {"check_finite": True}})
    timed("host tree", lambda: llm.reload_weights(params=host), h2d)
    rows["host tree"]["gb_per_s"] = weights / rows["host tree"]["s"] / 1e9

    rows["streamed peak"] = _streamed_peak(llm, list(zip(paths, jax.tree.leaves(host))), weights)

    def sleep_wake() -> None:
        llm.sleep(1)
        llm.wake_up()
    timed("sleep 1", sleep_wake, h2d)
    wakes = []
    for _ in range(repeats):  # timed without the sleep (warmed up above)
        llm.sleep(1)
        start = time.perf_counter()
        llm.wake_up()
        block()
        wakes.append(time.perf_counter() - start)
    rows["wake 1"] = {"s": statistics.median(wakes), "ratio": statistics.median(wakes) / h2d}

    def deep() -> None:
        llm.sleep(2)
        llm.wake_up()
        llm.reload_weights(params=host)
    timed("sleep 2 + reload", deep, h2d)
    del llm, device
    gc.collect()
    return rows


def _layer_buckets(pairs: list[tuple[str, Any]]) -> list[list[tuple[str, Any]]]:
    """One bucket per layer, and one for the leaves outside the layers (as a trainer
    gathering one layer at a time sends them)."""
    buckets: dict[str, list[tuple[str, Any]]] = {}
    for path, array in pairs:
        key = ".".join(path.split(".")[:2]) if path.startswith("layers.") else "rest"
        buckets.setdefault(key, []).append((path, array))
    return list(buckets.values())


def _streamed_peak(llm: LLM, host_pairs: list[tuple[str, Any]], weights: int) -> dict[str, Any]:
    """Live device bytes after every leaf lands (the old one is freed right after: the peak)."""
    samples: list[int] = []
    placed = weight_sync.place

    def sampling(*args: Any, **kwargs: Any) -> Any:
        out = placed(*args, **kwargs)
        samples.append(live_bytes())
        return out

    buckets = _layer_buckets(host_pairs)
    largest = max(sum(a.nbytes for _, a in b) for b in buckets)
    gc.collect()
    before = live_bytes()
    allocator_before = _allocator()
    weight_sync.place = sampling
    try:
        llm.update_weights(iter(buckets), is_checkpoint_format=False)
    finally:
        weight_sync.place = placed
    extra = max(samples) - before
    report = {"extra_bytes": extra, "largest_bucket_bytes": largest, "extra_over_weights": extra / weights,
              "largest_bucket_over_weights": largest / weights,
              "within_bound": extra <= largest + 0.05 * weights}
    allocator_after = _allocator()
    if allocator_before and allocator_after:
        # The allocator's peak since the process began: above the bytes in use before the
        # update only if the update set it (else the bound below is an upper bound).
        extra = allocator_after["peak_bytes_in_use"] - allocator_before["bytes_in_use"]
        report["allocator"] = {"extra_bytes": extra, "extra_over_weights": extra / weights,
                               "update_set_the_peak": allocator_after["peak_bytes_in_use"]
                               > allocator_before["peak_bytes_in_use"],
                               "within_bound": extra <= largest + 0.05 * weights}
    return report


def _allocator() -> dict[str, int] | None:
    """The device allocator's bytes in use and its peak, where the platform reports them (GPU)."""
    stats = jax.devices()[0].memory_stats() or {}
    if "bytes_in_use" in stats and "peak_bytes_in_use" in stats:
        return {"bytes_in_use": stats["bytes_in_use"], "peak_bytes_in_use": stats["peak_bytes_in_use"]}
    return None


def table(reports: list[dict[str, Any]]) -> str:
    lines = [f"{'model':6} {'measure':20} {'seconds':>9} {'baseline':>16} {'ratio':>7} {'target':>8}"]
    for r in reports:
        base = r["baselines_s"]
        for label, against in (("device tree", "jitted copy"), ("device tree, unchecked", "jitted copy"),
                               ("streamed device", "jitted copy"),
                               ("donated", "jitted copy"), ("donated, unchecked", "jitted copy"),
                               ("host tree", "host to device"), ("sleep 1", "host to device"),
                               ("wake 1", "host to device"), ("sleep 2 + reload", "host to device")):
            row = r[label]
            target = f"<= {TARGETS[label]}" if label in TARGETS else ""
            lines.append(f"{r['model']:6} {label:20} {row['s']:9.4f} {against:>16} {row['ratio']:7.3f} {target:>8}")
        p = r["streamed peak"]
        lines.append(f"{r['model']:6} {'streamed peak':20} extra {100 * p['extra_over_weights']:.1f}% of the weights "
                     f"({r['weight_bytes'] / 1e6:.0f} MB), largest bucket {100 * p['largest_bucket_over_weights']:.1f}%:"
                     f" {'within' if p['within_bound'] else 'OVER'} weights + largest bucket + 5%")
        if "allocator" in p:
            a = p["allocator"]
            lines.append(f"{r['model']:6} {'allocator peak':20} extra {100 * a['extra_over_weights']:.1f}% of the "
                         f"weights{'' if a['update_set_the_peak'] else ' (at most: an earlier peak was higher)'}:"
                         f" {'within' if a['within_bound'] else 'OVER'} the bound")
        lines.append(f"{r['model']:6} {'baselines':20} jitted copy {base['jitted copy']:.4f} s, host to device "
                     f"{base['host to device']:.4f} s ({r['weight_bytes'] / base['host to device'] / 1e9:.2f} GB/s), "
                     f"host tree {r['host tree']['gb_per_s']:.2f} GB/s")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="w1,w10", help="comma-separated: " + ", ".join(MODELS))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--output", default=None, help="write the figures as JSON here")
    args = parser.parse_args()
    names = args.models.split(",")
    unknown = [n for n in names if n not in MODELS]
    if unknown:
        parser.error(f"unknown model(s) {unknown}; choose from {', '.join(MODELS)}")
    reports = [measure(n, MODELS[n].model_config(), args.repeats, MODELS[n].seed) for n in names]
    print(f"device: {jax.devices()[0].device_kind} ({jax.devices()[0].platform})")
    print(table(reports))
    if args.output:
        Path(args.output).write_text(json.dumps(reports, indent=2))


if __name__ == "__main__":
    main()
