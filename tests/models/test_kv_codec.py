"""FP8 KV cache with per-layer scales from the checkpoint (vLLM's test_kv_scale_reload flow).

The checkpoint is a tiny random Llama rescaled so that its keys and values reach a few
thousand, far outside float8_e4m3fn's +-448: q_proj and o_proj are divided by the factor
k_proj and v_proj are multiplied by, so the float32 model computes exactly what it did
before, but the cache only holds its K and V faithfully when they are divided by a scale
first. The scales are `max|k| / 448` and `max|v| / 448` of a reference pass, written as
`model.layers.N.self_attn.k_scale` / `v_scale` tensors.
"""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file, save_file

from runner import LLM, SamplingParams
from tests import hf_models

FACTOR = 500.0  # |k|, |v| reach about 2,000-2,500 (std-0.2 weights give |k| up to about 5)
FP8_MAX = 448.0
LLM_ARGS = dict(num_kv_blocks=32, block_size=4, max_model_len=64)
PROMPT = [5, 17, 42, 8, 91, 33, 60, 7, 12, 77, 3]
NUM_NEW = 12
GREEDY = SamplingParams(temperature=0, max_tokens=NUM_NEW, ignore_eos=True, logprobs=1)
SCORE = SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=0)

# float8_e4m3fn keeps 3 mantissa bits: every cached K and V value carries a rounding error of
# up to 2^-4 (about 6%) of itself. Through two attention layers of a random model whose
# logits are sharp, that moves teacher-forced log-probabilities by about 0.07 nats on
# average (0.3 at most) against the float32 cache. Without the scales the clipped cache is
# off by about 1.2 nats on average (NaN-free only because values are clipped to +-448).
MEAN_TOL, MAX_TOL = 0.15, 0.6
UNSCALED_MIN_MEAN = 4 * MEAN_TOL


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """(folder with scales, folder without, the scales, the reference token sequence)."""
    root = tmp_path_factory.mktemp("fp8")
    model = hf_models.build("llama", seed=5, tie_word_embeddings=False)
    with torch.no_grad():
        for layer in model.model.layers:
            attn = layer.self_attn
            attn.q_proj.weight /= FACTOR  # q.k unchanged
            attn.k_proj.weight *= FACTOR
            attn.v_proj.weight *= FACTOR
            attn.o_proj.weight /= FACTOR  # attention output unchanged
        plain = root / "unscaled"
        model.save_pretrained(plain, safe_serialization=True)
        sequence = model.generate(torch.tensor([PROMPT]), do_sample=False, max_new_tokens=NUM_NEW,
                                  pad_token_id=0, eos_token_id=None)[0].tolist()
        scales = _calibrate(model, sequence)
    assert min(scales.values()) > 1000 / FP8_MAX  # the cache needs the scales to hold K and V

    scaled = root / "scaled"
    shutil.copytree(plain, scaled)
    tensors = load_file(scaled / "model.safetensors")
    for name, value in scales.items():
        # FP8 exporters write scalars as [] or [1]: layer 1 takes the second form.
        tensors[name] = np.array(value, np.float32).reshape((1,) if ".layers.1." in name else ())
    save_file(tensors, scaled / "model.safetensors", metadata={"format": "pt"})
    return scaled, plain, scales, sequence


def _calibrate(model: torch.nn.Module, tokens: list[int]) -> dict[str, float]:
    """Per-layer `max|k| / 448` and `max|v| / 448` over `tokens`. RoPE rotates pairs of key
    components, so the bound on a rotated component is the largest pair norm."""
    cfg = model.config
    half = cfg.head_dim // 2
    scales: dict[str, float] = {}
    hooks = []
    for i, layer in enumerate(model.model.layers):
        prefix = f"model.layers.{i}.self_attn."

        def keys(module, inputs, out, prefix=prefix):
            k = out.reshape(*out.shape[:-1], -1, cfg.head_dim)
            scales[prefix + "k_scale"] = float(torch.hypot(k[..., :half], k[..., half:]).max()) / FP8_MAX

        def values(module, inputs, out, prefix=prefix):
            scales[prefix + "v_scale"] = float(out.abs().max()) / FP8_MAX

        hooks += [layer.self_attn.k_proj.register_forward_hook(keys),
                  layer.self_attn.v_proj.register_forward_hook(values)]
    model(torch.tensor([tokens]))
    for h in hooks:
        h.remove()
    return scales


def outputs(llm: LLM, sequence: list[int]) -> tuple[list[int], list[float], np.ndarray]:
    """Greedy tokens and their log-probabilities after PROMPT, and the teacher-forced
    log-probability of every token of `sequence` after the first."""
    llm.reset_prefix_cache()
    out = llm.generate([{"prompt_token_ids": PROMPT}], GREEDY, use_tqdm=False)[0].outputs[0]
    logprobs = [entry[t].logprob for entry, t in zip(out.logprobs, out.token_ids)]
    scored = llm.generate([{"prompt_token_ids": sequence}], SCORE, use_tqdm=False)[0].prompt_logprobs
    forced = np.array([entry[t].logprob for entry, t in zip(scored[1:], sequence[1:])])
    return out.token_ids, logprobs, forced


def test_fp8_scales_from_a_reload_match_a_fresh_load_and_float32(checkpoints):
    scaled, plain, scales, sequence = checkpoints
    fresh = LLM(str(scaled), kv_cache_dtype="fp8", **LLM_ARGS)
    assert fresh.runner.state.kv_cache[0].k.dtype == np.dtype("float8_e4m3fn")
    expected = outputs(fresh, sequence)

    llm = LLM(str(scaled), load_format="dummy", kv_cache_dtype="fp8", **LLM_ARGS)
    assert float(llm.runner.params.layers[0].k_scale) == 1.0
    llm.update_config({"load_config": {"load_format": "auto"}})
    llm.reload_weights(weights_path=str(scaled))
    for i, layer in enumerate(llm.runner.params.layers):
        assert float(layer.k_scale) == np.float32(scales[f"model.layers.{i}.self_attn.k_scale"])
        assert float(layer.v_scale) == np.float32(scales[f"model.layers.{i}.self_attn.v_scale"])
    tokens, logprobs, forced = outputs(llm, sequence)
    assert tokens == expected[0]
    assert logprobs == expected[1]
    np.testing.assert_array_equal(forced, expected[2])

    reference = outputs(LLM(str(scaled), **LLM_ARGS), sequence)[2]  # float32 cache, scales unused
    error = np.abs(forced - reference)
    print(f"\nFP8 with scales vs float32 cache: mean |dlogprob| {error.mean():.3f}, max {error.max():.3f}")
    assert error.mean() < MEAN_TOL and error.max() < MAX_TOL


def test_fp8_without_scales_is_clearly_different(checkpoints):
    scaled, plain, scales, sequence = checkpoints
    reference_tokens, _, reference = outputs(LLM(str(scaled), **LLM_ARGS), sequence)
    llm = LLM(str(plain), kv_cache_dtype="fp8", **LLM_ARGS)
    assert all(float(layer.k_scale) == 1.0 == float(layer.v_scale) for layer in llm.runner.params.layers)
    tokens, logprobs, forced = outputs(llm, sequence)
    assert np.isfinite(forced).all() and np.isfinite(logprobs).all()  # clipped, never NaN
    error = np.abs(forced - reference)
    print(f"\nFP8 without scales vs float32 cache: mean |dlogprob| {error.mean():.3f}, max {error.max():.3f}")
    assert error.mean() > UNSCALED_MIN_MEAN
    assert tokens != reference_tokens

    # Reloading the scaled checkpoint into this runner brings the scales in as well.
    llm.reload_weights(weights_path=str(scaled))
    np.testing.assert_array_equal(outputs(llm, sequence)[2],
                                  outputs(LLM(str(scaled), kv_cache_dtype="fp8", **LLM_ARGS), sequence)[2])
