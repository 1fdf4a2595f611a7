"""`runner.inputs.parse_prompt`: vLLM's prompt forms accepted, everything else refused by
prompt index and key."""

from __future__ import annotations

import numpy as np
import pytest

from runner.inputs import TextPrompt, TokensPrompt, parse_prompt


def test_accepted_forms():
    assert parse_prompt(0, "hello") == ("hello", None)
    assert parse_prompt(0, TextPrompt(prompt="hi")) == ("hi", None)
    assert parse_prompt(0, TokensPrompt(prompt_token_ids=[5, 6])) == (None, [5, 6])
    assert parse_prompt(0, {"prompt_token_ids": (1, 2), "prompt": "ab"}) == ("ab", [1, 2])
    text, ids = parse_prompt(0, {"prompt_token_ids": [np.int64(3), np.int32(4)]})
    assert ids == [3, 4] and all(type(t) is int for t in ids)
    assert parse_prompt(0, {"prompt_token_ids": np.array([7, 8])}) == (None, [7, 8])
    assert parse_prompt(0, {"prompt": "x", "multi_modal_data": None}) == ("x", None)
    assert parse_prompt(0, [1, 2]) == parse_prompt(0, (1, 2)) == parse_prompt(0, np.array([1, 2])) == (None, [1, 2])


@pytest.mark.parametrize("prompt, error", [
    ({"prompt": "x", "multi_modal_data": {"image": object()}}, r"^prompt 3: 'multi_modal_data' is not supported"),
    ({"prompt": "x", "mm_processor_kwargs": {"a": 1}}, r"^prompt 3: 'mm_processor_kwargs' is not supported"),
    ({"prompt": "x", "promt_token_ids": [1]}, r"^prompt 3: unknown key 'promt_token_ids'"),
    ({"prompt_token_ids": [1, True]}, r"^prompt 3: prompt_token_ids\[1\]: expected an int token id, got True"),
    ({"prompt_token_ids": [1, np.bool_(True)]}, r"^prompt 3: prompt_token_ids\[1\]: expected an int"),
    ({"prompt_token_ids": [1.0]}, r"^prompt 3: prompt_token_ids\[0\]: expected an int token id, got 1.0"),
    ({"prompt_token_ids": "12"}, r"^prompt 3: prompt_token_ids: expected a list of ints, got str"),
    ({"prompt": 5}, r"^prompt 3: 'prompt': expected a str, got int"),
    ({}, r"^prompt 3: expected a 'prompt' or 'prompt_token_ids' key"),
    ([[1, 2]], r"^prompt 3: expected a str, a list of int token ids, .* got list"),
    ([], r"^prompt 3: expected a str, a list of int token ids, .* got list"),
    (None, r"^prompt 3: expected a str, .* got NoneType"),
])
def test_refused_forms_name_the_prompt_and_key(prompt, error):
    with pytest.raises(ValueError, match=error):
        parse_prompt(3, prompt)
