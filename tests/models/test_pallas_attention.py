"""The Pallas decode backend (interpret mode on CPU) against the reference backend."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from models import attention, pallas_attention
from state.batch import Batch
from models.kv_cache import KVCache

S, P, Dh = 4, 23, 16


def _caches(K: int, rng: np.random.Generator) -> tuple[KVCache, KVCache]:
    """The same random contents in both layouts: reference [P,S,K,Dh], pallas [K,P,S,Dh]."""
    k = rng.standard_normal((P, S, K, Dh)).astype(np.float32)
    v = rng.standard_normal((P, S, K, Dh)).astype(np.float32)
    ref = KVCache(jnp.asarray(k), jnp.asarray(v))
    pal = KVCache(jnp.asarray(k.transpose(2, 0, 1, 3)), jnp.asarray(v.transpose(2, 0, 1, 3)))
    return ref, pal


@pytest.mark.parametrize("Nb", [4, 3, 6])  # 3 and 6: widths capped at a request's blocks
@pytest.mark.parametrize("H, K", [(4, 4), (6, 2), (8, 1)])
def test_decode_kernel_matches_reference(H, K, Nb):
    rng = np.random.default_rng(H * 10 + K)
    ref_cache, pal_cache = _caches(K, rng)
    # Mixed lengths up to the whole width, and an empty padding row.
    lens = np.minimum(np.array([1, 7, 13, 16, 0], np.int32), Nb * S)
    B = len(lens)
    # Block tables with holes: blocks drawn out of order from the whole pool.
    tables = np.concatenate([rng.permutation(P) for _ in range(2)])[:B * Nb].reshape(B, Nb).astype(np.int32)
    batch = Batch(token_ids=np.zeros(B, np.int32), positions=np.maximum(lens - 1, 0),
                  slot_mapping=np.full(B, -1, np.int32), logits_indices=np.arange(B, dtype=np.int32),
                  block_tables=tables, seq_lens=lens)
    q = jnp.asarray(rng.standard_normal((B, H, Dh)).astype(np.float32))
    one = jnp.float32(1.0)
    expected = attention.paged_attention(q, ref_cache, batch, one, one)
    got = pallas_attention.paged_attention(q, pal_cache, batch, one, one)
    live = lens > 0
    np.testing.assert_allclose(np.asarray(got)[live], np.asarray(expected)[live], atol=2e-5)


def test_kernel_splits_divide_every_width():
    for Nb in range(1, 300):
        k_splits, per_block = pallas_attention._splits(Nb)
        assert Nb % k_splits == 0 and (Nb // k_splits) % per_block == 0
        assert 1 <= k_splits <= pallas_attention.MAX_K_SPLITS
        assert 1 <= per_block <= pallas_attention.MAX_PAGES_PER_COMPUTE_BLOCK
        if Nb & (Nb - 1) == 0:  # powers of two split as many ways as they can
            assert k_splits == min(Nb, pallas_attention.MAX_K_SPLITS)


def test_write_kv_layouts_hold_the_same_values():
    rng = np.random.default_rng(0)
    K = 2
    ref = KVCache(jnp.zeros((P, S, K, Dh)), jnp.zeros((P, S, K, Dh)))
    pal = KVCache(jnp.zeros((K, P, S, Dh)), jnp.zeros((K, P, S, Dh)))
    k = jnp.asarray(rng.standard_normal((5, K, Dh)).astype(np.float32))
    slots = jnp.asarray([3, 17, -1, 40, 91], jnp.int32)
    one = jnp.float32(1.0)
    ref = attention.write_kv(ref, k, k, slots, one, one)
    pal = pallas_attention.write_kv(pal, k, k, slots, one, one)
    np.testing.assert_array_equal(np.asarray(ref.k), np.asarray(pal.k).transpose(1, 2, 0, 3))
    flat = np.asarray(ref.k).reshape(P * S, K, Dh)
    np.testing.assert_array_equal(flat[17], np.asarray(k[1]))
    assert np.count_nonzero(flat.any(axis=(1, 2))) == 4  # slot -1 wrote nothing


def test_generate_with_pallas_backend_matches_reference(hf_checkpoint):
    from runner import LLM, SamplingParams
    folder, _ = hf_checkpoint("qwen3_untied_gqa3")
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    prompts = [{"prompt_token_ids": [5, 6, 7, 8, 9, 10, 11]}, {"prompt_token_ids": [3, 1]}]
    outs = {}
    for backend in ("reference", "pallas"):
        llm = LLM(str(folder), num_kv_blocks=16, block_size=4, max_model_len=32,
                  attention_backend=backend)
        assert llm.config.cache_config.attention_backend == backend
        outs[backend] = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
    assert outs["pallas"] == outs["reference"]
    assert jax.devices()[0].platform == "cpu"  # i.e. the kernel ran in interpret mode
