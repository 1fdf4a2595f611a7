"""Decode attention inside a multi-step decode (`models.multi_step_attention`) against the
per-step reader.

Several steps of writes and reads on a multi-step decode's copy must give what writing the
pages and reading them with `models.attention.decode_attention` gives at every step, and
leave the pages as those writes leave them: rows of different lengths, rows that stop
writing (slot -1) midway, sliding windows, soft-capping and an FP8 cache with scales.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from models import attention, multi_step_attention
from models.attention_spec import AttentionSpec
from state.batch import Batch
from models.kv_cache import KVCache

B, NB, S, K, G, DH = 3, 4, 4, 2, 2, 8
STEPS = 5


def _setup(dtype: jnp.dtype, seed: int = 0):
    rng = np.random.default_rng(seed)
    P = B * NB + 2
    pages = KVCache(k=jnp.asarray(rng.normal(size=(P, S, K, DH)) * 3, jnp.float32).astype(dtype),
                    v=jnp.asarray(rng.normal(size=(P, S, K, DH)) * 3, jnp.float32).astype(dtype))
    tables = jnp.asarray(rng.permutation(P)[:B * NB].reshape(B, NB), jnp.int32)
    start = jnp.asarray([3, 9, NB * S - STEPS], jnp.int32)  # the last row fills its table
    return rng, pages, tables, start


def _batch(tables, positions, live) -> Batch:
    blocks = jnp.take_along_axis(tables, (positions // S)[:, None], axis=1)[:, 0]
    slots = jnp.where(live, blocks * S + positions % S, -1)
    return Batch(token_ids=jnp.zeros(B, jnp.int32), positions=positions, slot_mapping=slots,
                 logits_indices=jnp.arange(B, dtype=jnp.int32), block_tables=tables,
                 seq_lens=jnp.where(live, positions + 1, 0))


@pytest.mark.parametrize("spec, dtype, scale", [
    (AttentionSpec(scale=DH ** -0.5), jnp.float32, 1.0),
    (AttentionSpec(scale=0.3, softcap=5.0, window=6), jnp.float32, 1.0),
    (AttentionSpec(scale=DH ** -0.5, window=3), jnp.bfloat16, 1.0),
    (AttentionSpec(scale=DH ** -0.5), jnp.float8_e4m3fn, 0.05),
], ids=["plain", "capped_window6", "bf16_window3", "fp8_scaled"])
def test_multi_step_equals_step_by_step(spec, dtype, scale):
    rng, pages, tables, start = _setup(dtype)
    k_scale = v_scale = jnp.float32(scale)
    copy = multi_step_attention.open_multi_step(pages, tables, start, k_scale, v_scale)
    for step in range(STEPS):
        positions = start + step
        live = jnp.asarray([True, step < 2, True])  # the second row stops after two steps
        batch = _batch(tables, positions, live)
        q = jnp.asarray(rng.normal(size=(B, K * G, DH)), jnp.float32)
        k = jnp.asarray(rng.normal(size=(B, K, DH)) * 3, jnp.float32)
        v = jnp.asarray(rng.normal(size=(B, K, DH)) * 3, jnp.float32)
        pages = attention.write_kv(pages, k, v, batch.slot_mapping, k_scale, v_scale)
        expected = attention.decode_attention(q, pages, batch, k_scale, v_scale, spec)
        copy = multi_step_attention.write_kv(copy, k, v, batch.slot_mapping, k_scale, v_scale)
        got = multi_step_attention.paged_attention(q, copy, batch, k_scale, v_scale, spec)
        rows = np.asarray(live)  # a stopped row's output is never read
        np.testing.assert_allclose(np.asarray(got)[rows], np.asarray(expected)[rows], rtol=1e-5, atol=1e-5)
    # The pages hold what step-by-step writes leave, bit for bit.
    for a, b in ((copy.pages.k, pages.k), (copy.pages.v, pages.v)):
        np.testing.assert_array_equal(np.asarray(a.astype(jnp.float32)), np.asarray(b.astype(jnp.float32)))


def test_budget_keeps_large_multi_step_decodes_on_the_per_step_reader(monkeypatch):
    _, pages, tables, _ = _setup(jnp.float32)
    layers = (pages,) * 3
    need = multi_step_attention.context_bytes(3, tables.shape, pages.k.shape)
    assert need == 3 * 2 * B * NB * S * K * DH * 4
    monkeypatch.setattr(multi_step_attention, "CONTEXT_BUDGET_BYTES", need)
    assert multi_step_attention.fits(layers, tables)
    monkeypatch.setattr(multi_step_attention, "CONTEXT_BUDGET_BYTES", need - 1)
    assert not multi_step_attention.fits(layers, tables)


def test_multi_step_decode_reads_the_copy_only_within_budget(monkeypatch):
    """`multi_step_decode` opens the copy on the reference backend within the budget and
    for calls of more than one step, and both readers give the same tokens."""
    from models.decode_loop import DecodeState, RowSettings, multi_step_decode
    from runner.device.loader import dummy_params
    from state.config import ModelConfig

    cfg = ModelConfig(architecture="Qwen3ForCausalLM", vocab_size=64, hidden_size=32, intermediate_size=64,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                      tie_word_embeddings=True, max_position_embeddings=512)
    params = dummy_params(cfg, 0)
    rows = RowSettings.greedy(jnp.arange(2 * NB, dtype=jnp.int32).reshape(2, NB), cfg.vocab_size, 16)
    state = DecodeState.first(jnp.asarray([3, 5], jnp.int32), jnp.asarray([2, 6], jnp.int32), cfg.vocab_size, 16)
    rng = np.random.default_rng(1)
    cache = tuple(KVCache(k=jnp.asarray(rng.normal(size=(2 * NB, S, 2, 8)), jnp.float32),
                          v=jnp.asarray(rng.normal(size=(2 * NB, S, 2, 8)), jnp.float32)) for _ in range(2))
    opened: list[bool] = []
    real_open = multi_step_attention.open_multi_step
    monkeypatch.setattr(multi_step_attention, "open_multi_step", lambda *a: opened.append(True) or real_open(*a))

    def run():
        return multi_step_decode(params, cache, rows, state, jnp.int32(6), cfg, "reference", 8, S)

    copied_cache, _, copied = run()
    assert opened
    opened.clear()
    # A one-step program reads the pages directly: the copy only pays over several steps.
    multi_step_decode(params, cache, rows, state, jnp.int32(1), cfg, "reference", 1, S)
    assert not opened
    monkeypatch.setattr(multi_step_attention, "CONTEXT_BUDGET_BYTES", 0)
    stepped_cache, _, stepped = run()
    assert not opened
    np.testing.assert_array_equal(np.asarray(copied.token_ids), np.asarray(stepped.token_ids))
    assert int(copied.num_tokens.min()) == 6
    for a, b in zip(jax.tree.leaves(copied_cache), jax.tree.leaves(stepped_cache)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5)
