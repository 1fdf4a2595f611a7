"""The tiled general-batch attention, over both backends' page layouts, against the plain
`[T, N*S]` reader."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from models import attention, flash_attention, pallas_attention
from state.batch import Batch, bucket
from models.kv_cache import KVCache
from tests.models.reference_attention import flat_attention

S, P, Dh = 4, 41, 16
ONE = jnp.float32(1.0)


def _caches(K: int, rng: np.random.Generator, dtype: jnp.dtype) -> tuple[KVCache, KVCache]:
    """The same random contents in both layouts: reference [P,S,K,Dh], pallas [K,P,S,Dh]."""
    k = jnp.asarray(rng.standard_normal((P, S, K, Dh)), dtype)
    v = jnp.asarray(rng.standard_normal((P, S, K, Dh)), dtype)
    return KVCache(k, v), KVCache(k.transpose(2, 0, 1, 3), v.transpose(2, 0, 1, 3))


def general_batch(spans: list[tuple[int, int]], rng: np.random.Generator,
                  min_tokens: int = 8, blocks: list[list[int]] | None = None) -> Batch:
    """A general batch laid out as `prepare_batch` lays it out: per sequence (start, end),
    its tokens start..end-1 and its context blocks 0..ceil(end/S)-1, drawn from the pool
    out of order unless `blocks` lists them; token and block counts padded to their buckets."""
    T = bucket(sum(e - s for s, e in spans), min_tokens)
    N = bucket(sum(-(-e // S) for _, e in spans))
    pool = iter(rng.permutation(P).tolist())
    positions, token_seq = np.zeros(T, np.int32), np.full(T, -1, np.int32)
    ids, block_seq, block_pos = np.zeros(N, np.int32), np.full(N, -2, np.int32), np.zeros(N, np.int32)
    t = n = 0
    for i, (start, end) in enumerate(spans):
        positions[t:t + end - start] = np.arange(start, end)
        token_seq[t:t + end - start] = i
        nb = -(-end // S)
        ids[n:n + nb] = blocks[i] if blocks else [next(pool) for _ in range(nb)]
        block_seq[n:n + nb] = i
        block_pos[n:n + nb] = np.arange(nb) * S
        t, n = t + end - start, n + nb
    return Batch(token_ids=np.zeros(T, np.int32), positions=positions,
                 slot_mapping=np.full(T, -1, np.int32), logits_indices=np.zeros(1, np.int32),
                 token_seq=token_seq, key_block_ids=ids, key_block_seq=block_seq,
                 key_block_pos=block_pos)


# Three prompts of different lengths, one of them a chunk whose first 9 positions are cached,
# and a single-token continuation: every kind of sequence a general step holds.
SPANS = [(0, 13), (9, 18), (0, 3), (30, 31)]


def _compare(H: int, K: int, dtype: jnp.dtype, spans: list[tuple[int, int]], seed: int,
             heads_first: bool = True, blocks: list[list[int]] | None = None,
             **tiles: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    ref_cache, pal_cache = _caches(K, rng, dtype)
    batch = general_batch(spans, rng, blocks=blocks)
    T = batch.token_seq.shape[0]
    q = jnp.asarray(rng.standard_normal((T, H, Dh)), dtype)
    expected = flat_attention(q, ref_cache, batch, ONE, ONE)
    read = jax.jit(lambda q, c, b: flash_attention.flash_attention(
        q, c, b, ONE, ONE, heads_first=heads_first, **tiles))
    got = read(q, pal_cache if heads_first else ref_cache, batch)
    live = batch.token_seq >= 0
    return (np.asarray(got.astype(jnp.float32))[live], np.asarray(expected.astype(jnp.float32))[live])


@pytest.mark.parametrize("H, K", [(4, 4), (6, 2), (8, 1)])
@pytest.mark.parametrize("tiles", [{}, {"q_tile": 8, "key_tile_keys": 8}], ids=["default", "small"])
@pytest.mark.parametrize("heads_first", [True, False], ids=["pallas-layout", "reference-layout"])
def test_float32_matches_reference(H, K, tiles, heads_first):
    got, expected = _compare(H, K, jnp.float32, SPANS, seed=H + K, heads_first=heads_first, **tiles)
    np.testing.assert_allclose(got, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("H, K", [(4, 2), (8, 8)])
def test_bfloat16_matches_reference(H, K):
    # Both compute in float32 from the same bfloat16 inputs: the outputs differ by the final
    # rounding to bfloat16 at most.
    got, expected = _compare(H, K, jnp.bfloat16, SPANS, seed=7, q_tile=8, key_tile_keys=8)
    np.testing.assert_allclose(got, expected, atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("heads_first", [True, False], ids=["pallas-layout", "reference-layout"])
def test_one_long_prompt_chunked_across_query_tiles(heads_first):
    got, expected = _compare(6, 3, jnp.float32, [(20, 64), (0, 5)], seed=3, heads_first=heads_first,
                             q_tile=8, key_tile_keys=8)
    np.testing.assert_allclose(got, expected, atol=1e-5, rtol=1e-5)


def _largest_intermediate(jaxpr: Any) -> int:
    """Elements of the largest array any equation (inner loop bodies too) produces."""
    largest = 0
    for eqn in jaxpr.eqns:
        for var in eqn.outvars:
            largest = max(largest, int(np.prod(getattr(var.aval, "shape", ()))))
        for param in eqn.params.values():
            for inner in param if isinstance(param, (tuple, list)) else (param,):
                inner = getattr(inner, "jaxpr", inner)  # closed jaxprs wrap the jaxpr
                if hasattr(inner, "eqns"):
                    largest = max(largest, _largest_intermediate(inner))
    return largest


def test_never_builds_scores_over_all_listed_keys():
    rng = np.random.default_rng(0)
    H, K = 4, 2
    _, pal_cache = _caches(K, rng, jnp.float32)
    batch = general_batch([(0, 40), (0, 24), (10, 30)], rng)
    T, N = batch.token_seq.shape[0], batch.key_block_ids.shape[0]
    q = jnp.zeros((T, H, Dh), jnp.float32)
    fn = lambda q, c, b: flash_attention.flash_attention(q, c, b, ONE, ONE, q_tile=8, key_tile_keys=8)
    closed = jax.make_jaxpr(fn)(q, pal_cache, batch)
    all_scores = H * T * N * S
    # The largest arrays are one step's scores (H * T * 8 keys) and the output (H * T * Dh):
    # a quarter of the scores over all N*S listed keys here.
    largest = _largest_intermediate(closed.jaxpr)
    assert largest <= max(H * T * 8, H * T * Dh) <= all_scores // 4


def test_query_tiles_skip_blocks_of_other_sequences():
    rng = np.random.default_rng(1)
    # Eight sequences of 8 tokens, 2 blocks each: a tile of 8 tokens reads only its own 2
    # blocks (1 key tile of 2 blocks), not all 16 listed blocks (8 key tiles).
    batch = general_batch([(0, 8)] * 8, rng)
    runs = jax.device_get(flash_attention.tile_runs(jax.tree.map(jnp.asarray, batch), tq=8, key_tile=2))
    assert int(runs.steps) == 1
    np.testing.assert_array_equal(runs.lo, np.arange(8) * 2)
    np.testing.assert_array_equal(runs.hi - runs.lo, np.full(8, 2))


def test_causal_run_stops_at_the_last_position_of_the_tile():
    rng = np.random.default_rng(2)
    batch = general_batch([(0, 32)], rng)  # 32 tokens, 8 blocks, 4 tiles of 8 tokens
    runs = jax.device_get(flash_attention.tile_runs(jax.tree.map(jnp.asarray, batch), tq=8, key_tile=2))
    np.testing.assert_array_equal(runs.hi, [2, 4, 6, 8])  # tile i sees blocks 0..2i+1
    assert int(runs.steps) == 4


def decode_batch(rng: np.random.Generator) -> tuple[Batch, np.ndarray]:
    """A decode batch of eight sequences (one of them padding) over 4 blocks each."""
    lens = np.array([1, 7, 13, 16, 0, 3, 9, 2], np.int32)
    B, Nb = len(lens), 4
    tables = rng.permutation(P)[:B * Nb].reshape(B, Nb).astype(np.int32)
    return Batch(token_ids=np.zeros(B, np.int32), positions=np.maximum(lens - 1, 0),
                 slot_mapping=np.full(B, -1, np.int32), logits_indices=np.arange(B, dtype=np.int32),
                 block_tables=tables, seq_lens=lens), lens


@pytest.mark.parametrize("H, K", [(4, 4), (6, 2)])
def test_decode_through_the_tiled_path_matches_reference(H, K):
    rng = np.random.default_rng(H * 10 + K)
    ref_cache, pal_cache = _caches(K, rng, jnp.float32)
    batch, lens = decode_batch(rng)
    B = len(lens)
    q = jnp.asarray(rng.standard_normal((B, H, Dh)).astype(np.float32))
    expected = attention.paged_attention(q, ref_cache, batch, ONE, ONE)
    general = pallas_attention.decode_as_general(jax.tree.map(jnp.asarray, batch), S)
    got = flash_attention.flash_attention(q, pal_cache, general, ONE, ONE, q_tile=8, key_tile_keys=8)
    live = lens > 0
    np.testing.assert_allclose(np.asarray(got)[live], np.asarray(expected)[live], atol=1e-5)


def test_kernel_sizes_on_gpu():
    assert pallas_attention.kernel_runs(12, 4, "cpu")
    assert pallas_attention.kernel_runs(128, 16, "gpu")
    assert not pallas_attention.kernel_runs(12, 16, "gpu")
    assert not pallas_attention.kernel_runs(128, 8, "gpu")


def tiny_model():
    """A small random Qwen3 (config, params) for end-to-end backend comparisons."""
    from runner.device.loader import dummy_params
    from state.config import ModelConfig
    cfg = ModelConfig(architecture="Qwen3ForCausalLM", vocab_size=101, hidden_size=48,
                      intermediate_size=80, num_hidden_layers=2, num_attention_heads=6,
                      num_key_value_heads=2, head_dim=8, tie_word_embeddings=True,
                      max_position_embeddings=128, initializer_range=0.3)
    return cfg, dummy_params(cfg, seed=0)


def test_llm_from_params_pallas_matches_reference_with_chunked_prefill():
    from runner import LLM, SamplingParams
    cfg, params = tiny_model()
    rng = np.random.default_rng(0)
    # A 40-token prompt does not fit a 16-token step: it is prefilled in chunks, next to
    # shorter prompts.
    prompts = [{"prompt_token_ids": rng.integers(0, 101, n).tolist()} for n in (40, 5, 11)]
    sampling = SamplingParams(temperature=0, max_tokens=5, ignore_eos=True)
    outs = {}
    for backend in ("reference", "pallas"):
        llm = LLM(model_config=cfg, params=params, attention_backend=backend, block_size=4,
                  num_kv_blocks=64, max_model_len=64, max_num_seqs=4, max_num_batched_tokens=16)
        outs[backend] = [o.outputs[0].token_ids for o in llm.generate(prompts, sampling, use_tqdm=False)]
    assert outs["pallas"] == outs["reference"]


# -- sliding windows and soft-capping ----------------------------------------------------------

def _dense_reference(q: np.ndarray, k: np.ndarray, v: np.ndarray, positions: np.ndarray,
                     spec: attention.AttentionSpec) -> np.ndarray:
    """Attention of one sequence written out densely in numpy: `q: [T, H, Dh]`, keys at
    positions 0..L-1 (`k, v: [L, K, Dh]`), a query at p sees keys p - window < j <= p."""
    H, K = q.shape[1], k.shape[1]
    kk, vv = np.repeat(k, H // K, axis=1), np.repeat(v, H // K, axis=1)  # [L, H, Dh]
    scores = np.einsum("thd,lhd->htl", q, kk) * spec.scale
    if spec.softcap is not None:
        scores = spec.softcap * np.tanh(scores / spec.softcap)
    j, p = np.arange(k.shape[0])[None, :], positions[:, None]
    visible = (j <= p) & ((j > p - spec.window) if spec.window is not None else True)
    scores = np.where(visible[None], scores, -np.inf)
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    return np.einsum("htl,lhd->thd", probs, vv)


@pytest.mark.parametrize("window, softcap", [(1, None), (5, None), (8, 3.0), (None, 3.0)])
def test_reference_window_and_cap_are_the_dense_maths(window, softcap):
    rng = np.random.default_rng(7)
    ref_cache, _ = _caches(2, rng, jnp.float32)
    batch = general_batch([(9, 20)], rng)  # positions 9..19 over cached keys 0..19
    T, live = batch.token_seq.shape[0], batch.token_seq >= 0
    q = rng.standard_normal((T, 4, Dh)).astype(np.float32)
    spec = attention.AttentionSpec(scale=0.3, softcap=softcap, window=window)
    got = np.asarray(flat_attention(jnp.asarray(q), ref_cache, batch, ONE, ONE, spec=spec))[live]
    blocks = np.asarray(ref_cache.k)[batch.key_block_ids[:5]].reshape(20, 2, Dh)
    values = np.asarray(ref_cache.v)[batch.key_block_ids[:5]].reshape(20, 2, Dh)
    expected = _dense_reference(q[live], blocks, values, batch.positions[live], spec)
    np.testing.assert_allclose(got, expected, atol=1e-5)


@pytest.mark.parametrize("window", [1, 3, 8, 13])
@pytest.mark.parametrize("tiles", [{}, {"q_tile": 8, "key_tile_keys": 8}], ids=["default", "small"])
def test_tiled_window_matches_reference(window, tiles):
    rng = np.random.default_rng(window)
    ref_cache, pal_cache = _caches(2, rng, jnp.float32)
    batch = general_batch(SPANS + [(0, 40)], rng)
    T = batch.token_seq.shape[0]
    q = jnp.asarray(rng.standard_normal((T, 6, Dh)), jnp.float32)
    spec = attention.AttentionSpec(scale=0.25, softcap=5.0, window=window)
    expected = flat_attention(q, ref_cache, batch, ONE, ONE, spec=spec)
    got = jax.jit(lambda q, c, b: flash_attention.flash_attention(q, c, b, ONE, ONE, spec=spec, **tiles))(
        q, pal_cache, batch)
    live = batch.token_seq >= 0
    np.testing.assert_allclose(np.asarray(got)[live], np.asarray(expected)[live], atol=1e-5)


def test_a_window_skips_the_blocks_behind_it():
    rng = np.random.default_rng(2)
    batch = jax.tree.map(jnp.asarray, general_batch([(0, 32)], rng))  # 8 blocks of 4, tiles of 8
    runs = jax.device_get(flash_attention.tile_runs(batch, tq=8, key_tile=2, window=8, block_size=S))
    # Tile i starts at position 8i: blocks ending at or before 8i - 8 are behind its window.
    np.testing.assert_array_equal(runs.lo, [0, 0, 2, 4])
    np.testing.assert_array_equal(runs.hi, [2, 4, 6, 8])
    assert int(runs.steps) == 2


@pytest.mark.parametrize("window", [1, 6, None])
def test_windowed_decode_on_both_backends_matches_the_general_reader(window):
    rng = np.random.default_rng(11)
    ref_cache, pal_cache = _caches(2, rng, jnp.float32)
    batch, lens = decode_batch(rng)
    B = len(lens)
    q = jnp.asarray(rng.standard_normal((B, 4, Dh)).astype(np.float32))
    spec = attention.AttentionSpec(scale=0.2, softcap=None if window is None else 4.0, window=window)
    decoded = attention.paged_attention(q, ref_cache, batch, ONE, ONE, spec)
    general = pallas_attention.decode_as_general(jax.tree.map(jnp.asarray, batch), S)
    expected = flat_attention(q, ref_cache, general, ONE, ONE, spec=spec)
    pallas = pallas_attention.paged_attention(q, pal_cache, jax.tree.map(jnp.asarray, batch), ONE, ONE, spec)
    live = lens > 0
    np.testing.assert_allclose(np.asarray(decoded)[live], np.asarray(expected)[live], atol=1e-5)
    np.testing.assert_allclose(np.asarray(pallas)[live], np.asarray(expected)[live], atol=1e-5)
