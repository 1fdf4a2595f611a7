"""Where a decode step of W1 goes: each piece jitted alone at W1's shapes, beside the whole
multi-step decode, per batch size.

    PYTHONPATH=. python benchmarks/decode_profile.py [--batch-sizes 1 8 32] [--repeats 20]

Pieces (ms per decode step; the multi_step figure is one automatic multi-step decode,
`AUTO_DECODE_STEPS` steps in one call, divided by its steps):
    multi_step  `multi_step_decode`: forward, sampler, KV write and next input, every step in one call
    matmuls     every layer's projections and the lm_head, no attention (the floor the
                step cannot go under on this host)
    lm_head     the tied projection `[B, D] x [D, V]` alone
    attention   the multi-step decode's attention of one layer (`models.multi_step_attention`),
                times the layer count
    open        gathering one layer's context for a multi-step decode, times the layer count,
                over the steps
    paged       the per-step reader `decode_attention` of one layer, times the layer count
                (what a call over the budget, or a single step, reads with)
    kv_write    `write_kv` of one layer, times the layer count
    sampler     `sample_switched` on `[B, V]` float32 logits, greedy
The weight-read floor (weight bytes over the read bandwidth measured in the same run) and
the matmul FLOP floor (at the large-matmul rate measured in the same run) are printed too.
"""

from __future__ import annotations

import argparse
from dataclasses import replace

import jax
import jax.numpy as jnp

from models import multi_step_attention
from models.attention import decode_attention, write_kv
from benchmarks.bench import (Workload, least_time, matmul_flops_per_row, measure_matmul_flops,
                          measure_read_bandwidth)
from models.decode_loop import DecodeState, RowSettings, multi_step_decode
from runner.device.loader import dummy_params
from runner.device.model_runner import program_params
from state.config import AUTO_DECODE_STEPS
from models.sampler import sample_switched
from state.batch import Batch, cdiv
from models.kv_cache import KVCache
from state.params import param_bytes


def _time(fn, *args, repeats: int) -> float:
    """Least seconds of `fn(*args)` over `repeats` calls, after one that compiles it. On a
    shared host the least time is the figure that repeats; medians carry the neighbours."""
    jax.block_until_ready(fn(*args))
    return least_time(lambda: jax.block_until_ready(fn(*args)), repeats)


def profile(batch_sizes: tuple[int, ...], repeats: int, w: Workload = Workload()) -> list[dict[str, float]]:
    cfg = w.model_config()
    stored = dummy_params(cfg, 0)
    params = program_params(stored)  # the weights as the engine's programs read them
    S = 16
    Nb = cdiv(w.prompt_len + w.max_tokens, S)
    context = w.prompt_len + w.max_tokens // 2  # the middle of a W1 request
    L, K, Dh, V = cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.head_dim, cfg.vocab_size
    bandwidth, flops = measure_read_bandwidth(), measure_matmul_flops()
    weight_bytes = param_bytes(stored)  # what a step reads: the projection's copy stands in for the embedding
    print(f"read bandwidth {bandwidth / 1e9:.1f} GB/s, matmul {flops / 1e9:.0f} GFLOP/s, "
          f"weights {weight_bytes / 1e6:.0f} MB -> weight-read floor {1e3 * weight_bytes / bandwidth:.2f} ms")
    results = []
    for B in batch_sizes:
        P = B * Nb + 1
        cache = tuple(KVCache(k=jnp.zeros((P, S, K, Dh)), v=jnp.zeros((P, S, K, Dh))) for _ in range(L))
        rows = RowSettings.greedy(jnp.arange(B * Nb, dtype=jnp.int32).reshape(B, Nb), V, 256)
        state = DecodeState.first(jnp.zeros(B, jnp.int32), jnp.full(B, context, jnp.int32), V, 256)
        steps = AUTO_DECODE_STEPS
        decode = jax.jit(lambda p, c, r, s: multi_step_decode(p, c, r, s, jnp.int32(steps), cfg, "reference",
                                                              steps, S),
                         donate_argnums=(1,))

        def run_multi_step(p, r, s, box=[cache]):
            box[0], _, out = decode(p, box[0], r, s)
            return out

        x = jnp.ones((B, cfg.hidden_size))
        head = params.lm_head  # the [D, V] copy of the tied embedding

        def chain(p, x, head):
            for layer in p.layers:
                # q [B, H*Dh] plus k and v side by side [B, 2*K*Dh]: W1's widths match
                kv = jnp.concatenate([x @ layer.wk, x @ layer.wv], axis=1)
                x = x + ((x @ layer.wq) + kv) @ layer.wo
                x = x + (jax.nn.silu(x @ layer.w_gate) * (x @ layer.w_up)) @ layer.w_down
            return x @ head

        q = jnp.ones((B, cfg.num_attention_heads, Dh))
        batch = Batch(token_ids=jnp.zeros(B, jnp.int32), positions=jnp.full(B, context, jnp.int32),
                      slot_mapping=jnp.arange(B, dtype=jnp.int32) * Nb * S + context,
                      logits_indices=jnp.arange(B, dtype=jnp.int32), block_tables=rows.block_tables,
                      seq_lens=jnp.full(B, context + 1, jnp.int32))
        one = KVCache(k=jnp.zeros((P, S, K, Dh)), v=jnp.zeros((P, S, K, Dh)))  # the multi-step decode donates `cache`
        unit = jnp.float32(1)
        paged = jax.jit(lambda q, c, b: decode_attention(q, c, b, unit, unit))
        open_ = jax.jit(lambda c, t, s: multi_step_attention.open_multi_step(c, t, s, unit, unit))
        opened = open_(one, rows.block_tables, batch.positions)
        attend = jax.jit(lambda q, w, b: multi_step_attention.paged_attention(q, w, b, unit, unit))
        kv = jnp.ones((B, K, Dh))
        write = jax.jit(lambda c, k, s: write_kv(c, k, k, s, unit, unit), donate_argnums=(0,))
        written = KVCache(k=jnp.zeros((P, S, K, Dh)), v=jnp.zeros((P, S, K, Dh)))  # donated, step after step

        def run_write(k, s, box=[written]):
            box[0] = write(box[0], k, s)
            return box[0].k

        logits = jax.random.normal(jax.random.key(0), (B, V))
        meta = replace(rows.sampling, output_ids=state.output_ids)
        sampler = jax.jit(lambda l, m, wl: sample_switched(l, m, wl).token_ids)
        row = {"batch": B,
               "multi_step": _time(run_multi_step, params, rows, state, repeats=max(repeats // 4, 3)) / steps,
               "matmuls": _time(jax.jit(chain), params, x, head, repeats=repeats),
               "lm_head": _time(jax.jit(jnp.matmul), x, head, repeats=repeats),
               "attention": L * _time(attend, q, opened, batch, repeats=repeats),
               "open": L * _time(open_, one, rows.block_tables, batch.positions, repeats=repeats) / steps,
               "paged": L * _time(paged, q, one, batch, repeats=repeats),
               "kv_write": L * _time(run_write, kv, batch.slot_mapping, repeats=repeats),
               "sampler": _time(sampler, logits, meta, rows.num_logprobs, repeats=repeats),
               "flop_floor": B * matmul_flops_per_row(params) / flops,
               "read_floor": weight_bytes / bandwidth}
        print(f"batch {B:3d}: " + ", ".join(f"{k} {1e3 * v:6.2f}" for k, v in row.items() if k != "batch") + " ms")
        results.append(row)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    profile(tuple(args.batch_sizes), args.repeats)


if __name__ == "__main__":
    main()
