"""`runner.engine.logprobs.position_logprobs` on hand-computed values."""

from __future__ import annotations

import math

import numpy as np
import pytest

from runner.engine.logprobs import Logprob, position_logprobs

# A distribution over 5 tokens: probabilities 0.5, 0.25, 0.125, 0.0625, 0.0625 for ids 4, 1, 3, 0, 2.
LP = {i: math.log(p) for i, p in {4: 0.5, 1: 0.25, 3: 0.125, 0: 0.0625, 2: 0.0625}.items()}
TOP_IDS = np.array([4, 1, 3, 0, 2])
TOP_LPS = np.array([LP[i] for i in TOP_IDS], dtype=np.float32)


def decode(token_id: int) -> str:
    return f"<{token_id}>"


def test_chosen_token_outside_top_k_comes_first_with_its_rank():
    out = position_logprobs(3, LP[3], 3, TOP_IDS, TOP_LPS, 2, decode)
    assert list(out) == [3, 4, 1]
    assert out[3] == Logprob(logprob=LP[3], rank=3, decoded_token="<3>")
    assert out[4].rank == 1 and out[1].rank == 2 and out[1].decoded_token == "<1>"
    assert out[4].logprob == pytest.approx(math.log(0.5)) and type(out[4].logprob) is float


def test_chosen_token_inside_top_k_appears_once():
    out = position_logprobs(1, LP[1], 2, TOP_IDS, TOP_LPS, 3, decode)
    assert list(out) == [1, 4, 3]
    assert [(t, e.rank) for t, e in out.items()] == [(1, 2), (4, 1), (3, 3)]


def test_k_zero_returns_only_the_chosen_token():
    out = position_logprobs(np.int64(2), np.float32(LP[2]), np.int32(5), TOP_IDS, TOP_LPS, 0)
    assert out == {2: Logprob(logprob=pytest.approx(math.log(0.0625)), rank=5, decoded_token=None)}
    assert all(type(t) is int for t in out)


def test_k_wider_than_the_arrays_is_refused():
    with pytest.raises(ValueError, match=r"^k: expected 0 <= k <= 5"):
        position_logprobs(1, LP[1], 2, TOP_IDS, TOP_LPS, 6)
