"""`logprobs_mode`: each of vLLM's four modes against a float64 hand computation of the
same stages (bias, penalties, temperature, min_p, top-k, top-p), row by row."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from models.sampler import SamplingMetadata, sample_switched
from state.config import LOGPROBS_MODES

V = 12
PAD = V
K = min(20, V)


def log_softmax(x: np.ndarray) -> np.ndarray:
    finite = np.isfinite(x)
    top = x[finite].max()
    return np.where(finite, x - top - np.log(np.exp(x[finite] - top).sum()), -np.inf)


def processed(row: np.ndarray, *, temperature: float, top_k: int = 0, top_p: float = 1.0,
              min_p: float = 0.0) -> np.ndarray:
    """The logits a row draws from, by definition: greedy rows as they are; random rows
    scaled by 1/T, then min_p, top-k and top-p masked."""
    if temperature == 0:
        return row
    x = row / temperature
    p = np.exp(log_softmax(x))
    x = np.where(p >= min_p * p.max(), x, -np.inf)
    order = np.argsort(-x, kind="stable")
    if top_k > 0:
        x = np.where(np.isin(np.arange(V), order[:top_k]), x, -np.inf)
    p = np.exp(log_softmax(x))
    mass_before = np.cumsum(p[order]) - p[order]
    assert top_p == 1 or np.all(np.abs(np.cumsum(p[order]) - top_p) > 1e-3), "ambiguous top_p boundary"
    return np.where(np.isin(np.arange(V), order[mass_before < top_p]) | (top_p >= 1), x, -np.inf)


# Rows: (temperature, top_k, top_p, min_p); row 0 greedy, the others each with one filter.
ROWS = [(0.0, 0, 1.0, 0.0), (0.7, 0, 1.0, 0.0), (1.3, 4, 1.0, 0.0), (0.9, 0, 0.8, 0.0),
        (1.0, 0, 1.0, 0.15), (0.5, 6, 0.9, 0.05)]
B = len(ROWS)


def batch() -> tuple[np.ndarray, dict, np.ndarray]:
    """Logits, the metadata fields, and the float64 logits after bias and penalties."""
    rng = np.random.default_rng(7)
    logits = (rng.normal(size=(B, V)) * 2.5).astype(np.float32)
    fields = dict(
        temperature=np.array([r[0] for r in ROWS], np.float32), top_k=np.array([r[1] for r in ROWS], np.int32),
        top_p=np.array([r[2] for r in ROWS], np.float32), min_p=np.array([r[3] for r in ROWS], np.float32),
        seeds=np.arange(B, dtype=np.uint32), counters=np.zeros(B, np.int32),
        bias_ids=np.tile(np.array([[3, PAD]], np.int32), (B, 1)),
        bias_values=np.tile(np.array([[1.5, 0.0]], np.float32), (B, 1)),
        prompt_ids=np.tile(np.array([[5, PAD]], np.int32), (B, 1)),
        output_ids=np.tile(np.array([[2, 2]], np.int32), (B, 1)),
        presence_penalty=np.full(B, 0.4, np.float32), frequency_penalty=np.full(B, 0.25, np.float32),
        repetition_penalty=np.full(B, 1.3, np.float32))
    x = logits.astype(np.float64).copy()
    x[:, 3] += 1.5
    for row in x:
        row[5] = row[5] / 1.3 if row[5] > 0 else row[5] * 1.3  # in the prompt
        row[2] = (row[2] / 1.3 if row[2] > 0 else row[2] * 1.3) - 0.25 * 2 - 0.4  # output twice
    return logits, fields, x


def expected(mode: str, logits: np.ndarray, x: np.ndarray) -> np.ndarray:
    rows = []
    for b, (t, k, p, m) in enumerate(ROWS):
        source = logits[b].astype(np.float64) if mode.startswith("raw") else processed(
            x[b], temperature=t, top_k=k, top_p=p, min_p=m)
        rows.append(source if mode.endswith("logits") else log_softmax(source))
    return np.array(rows)


@jax.jit
def run(logits: np.ndarray, meta: SamplingMetadata):
    return sample_switched(logits, meta, np.ones(B, bool))


def check_rows(out, want: np.ndarray, rows: list[int]) -> None:
    tokens = np.asarray(out.token_ids)
    for b in rows:
        np.testing.assert_allclose(float(out.logprobs[b]), want[b, tokens[b]], rtol=1e-5, atol=1e-5)
        order = np.argsort(-want[b], kind="stable")[:K]
        kept = np.isfinite(want[b, order])  # masked entries tie at -inf: any order
        np.testing.assert_array_equal(np.asarray(out.top_ids[b])[kept], order[kept])
        np.testing.assert_allclose(np.asarray(out.top_logprobs[b]), want[b, order], rtol=1e-5, atol=1e-5)
        assert int(out.ranks[b]) == 1 + int(np.sum(want[b] > want[b, tokens[b]] + 1e-6))


@pytest.mark.parametrize("mode", LOGPROBS_MODES)
def test_every_row_reports_its_mode(mode: str) -> None:
    logits, fields, x = batch()
    meta = SamplingMetadata(**fields, logprobs_mode=np.full(B, LOGPROBS_MODES.index(mode), np.int32))
    out = run(logits, meta)
    check_rows(out, expected(mode, logits, x), list(range(B)))
    # The mode changes what is reported, never what is drawn.
    raw = run(logits, SamplingMetadata(**fields))
    np.testing.assert_array_equal(np.asarray(out.token_ids), np.asarray(raw.token_ids))


def test_processed_logprobs_of_a_sampled_token_are_finite_and_masked_tokens_are_not() -> None:
    logits, fields, x = batch()
    meta = SamplingMetadata(**fields, logprobs_mode=np.full(B, 2, np.int32))
    out = run(logits, meta)
    assert np.all(np.isfinite(np.asarray(out.logprobs)))
    top_k_row = 2  # top_k=4: the entries past the fourth are masked
    assert np.all(np.isneginf(np.asarray(out.top_logprobs[top_k_row, 4:])))


def test_rows_of_one_batch_may_ask_for_different_modes() -> None:
    logits, fields, x = batch()
    modes = np.array([i % len(LOGPROBS_MODES) for i in range(B)], np.int32)
    out = run(logits, SamplingMetadata(**fields, logprobs_mode=modes))
    for b in range(B):
        check_rows(out, expected(LOGPROBS_MODES[modes[b]], logits, x), [b])


def test_the_engine_setting_reaches_the_rows() -> None:
    """`LLM(logprobs_mode=...)` is what the device reports: processed logits of a seeded
    request at temperature 0.5 are twice the raw ones (no filter, bias or penalty)."""
    from runner import LLM, SamplingParams

    params = SamplingParams(temperature=0.5, max_tokens=3, seed=11, logprobs=0)
    got = {}
    for mode in ("raw_logits", "processed_logits"):
        llm = LLM(logprobs_mode=mode, max_model_len=64, num_kv_blocks=16)
        out = llm.generate([[1, 2, 3]], params, use_tqdm=False)[0].outputs[0]
        got[mode] = (out.token_ids, [d[t].logprob for d, t in zip(out.logprobs, out.token_ids)])
    assert got["raw_logits"][0] == got["processed_logits"][0]
    np.testing.assert_allclose(got["processed_logits"][1], np.array(got["raw_logits"][1]) * 2, rtol=1e-5)
    with pytest.raises(ValueError, match="logprobs_mode.*valid: raw_logprobs"):
        LLM(logprobs_mode="logits", max_model_len=64, num_kv_blocks=16)
