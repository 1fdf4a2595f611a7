"""`SamplingParams`: vLLM's mutability, the validated copy the engine submits, max_tokens=None,
greedy with n > 1, and the vLLM fields that are accepted or refused by name."""

from __future__ import annotations

import pytest

from runner.sampling_params import RequestOutputKind, SamplingParams


def test_fields_can_be_set_after_construction():
    params = SamplingParams()
    params.max_tokens = 32
    params.temperature = 0.5
    assert (params.max_tokens, params.temperature) == (32, 0.5)
    assert SamplingParams().max_tokens == 16  # vLLM's default


def test_derived_settings_follow_mutation():
    params = SamplingParams(stop="a")
    assert params.stop_strings == ("a",) and not params.is_greedy and not params.uses_penalties
    params.stop = ["x", "yz"]
    params.temperature = 0
    params.presence_penalty = 0.5
    assert params.stop_strings == ("x", "yz") and params.is_greedy and params.uses_penalties
    params.presence_penalty, params.repetition_penalty = 0.0, 1.2
    assert params.uses_penalties
    params.stop = None
    assert params.stop_strings == ()


def test_validated_copy_owns_its_containers():
    bias = {3: 1.5}
    stop = ["end"]
    ids = [7]
    params = SamplingParams(logit_bias=bias, stop=stop, stop_token_ids=ids)
    submitted = params.validated(max_model_len=64)
    bias[4] = 2.0
    stop.append("more")
    ids.append(8)
    params.max_tokens = 3
    assert submitted.logit_bias == {3: 1.5} and submitted.stop == ["end"] and submitted.stop_token_ids == [7]
    assert submitted.max_tokens == 16 and submitted.stop_strings == ("end",)
    assert submitted is not params and submitted.logit_bias is not params.logit_bias


def test_values_broken_after_construction_are_refused_at_submission():
    params = SamplingParams(logit_bias={1: 0.5})
    params.logit_bias[2] = float("nan")
    with pytest.raises(ValueError, match=r"^SamplingParams\.logit_bias: expected"):
        params.validated(64)
    params = SamplingParams(n=2, temperature=0.7)
    params.temperature = 0
    with pytest.raises(ValueError, match=r"^SamplingParams\.n: expected 1 with temperature=0"):
        params.validated(64)
    params = SamplingParams()
    params.top_p = 0
    with pytest.raises(ValueError, match=r"^SamplingParams\.top_p"):
        params.validated(64)


def test_clone_is_deep():
    params = SamplingParams(logit_bias={1: 1.0}, stop=["a"], extra_args={"k": [1]})
    twin = params.clone()
    twin.logit_bias[2] = 2.0
    twin.stop.append("b")
    twin.extra_args["k"].append(2)
    assert params.logit_bias == {1: 1.0} and params.stop == ["a"] and params.extra_args == {"k": [1]}
    assert twin == SamplingParams(logit_bias={1: 1.0, 2: 2.0}, stop=["a", "b"], extra_args={"k": [1, 2]})


def test_max_tokens_none_means_the_rest_of_the_context():
    params = SamplingParams(max_tokens=None, min_tokens=5)
    assert params.max_tokens is None
    assert params.validated(max_model_len=100, prompt_len=30).max_tokens == 70
    assert params.validated(max_model_len=100).max_tokens == 100
    assert params.max_tokens is None  # the caller's object is left as it was
    with pytest.raises(ValueError, match="needs max_model_len"):
        params.validated()
    with pytest.raises(ValueError, match="prompt has 100 tokens and max_model_len=100"):
        params.validated(max_model_len=100, prompt_len=100)
    with pytest.raises(ValueError, match=r"^SamplingParams\.min_tokens: expected an int in \[0, max_tokens=3\]"):
        params.validated(max_model_len=10, prompt_len=7)


def test_greedy_with_several_samples_is_refused():
    with pytest.raises(ValueError, match=r"^SamplingParams\.n: expected 1 with temperature=0 .*3 identical"):
        SamplingParams(n=3, temperature=0)
    assert SamplingParams(n=3, temperature=0.8).n == 3
    assert SamplingParams(n=1, temperature=0).is_greedy


@pytest.mark.parametrize("kwargs", [
    dict(best_of=2), dict(best_of=None), dict(output_kind=RequestOutputKind.FINAL_ONLY),
    dict(output_kind=RequestOutputKind.CUMULATIVE), dict(output_kind=RequestOutputKind.DELTA), dict(stream_interval=4), dict(extra_args={"x": 1}),
    dict(skip_clone=True), dict(skip_reading_prefix_cache=False), dict(detokenize=True), dict(bad_words=[]),
    dict(spaces_between_special_tokens=True), dict(flat_logprobs=False), dict(structured_outputs=None),
])
def test_vllm_fields_accepted(kwargs):
    params = SamplingParams(n=2, **kwargs)
    assert all(getattr(params, k) == v for k, v in kwargs.items())
    assert params.validated(64).n == 2


@pytest.mark.parametrize("kwargs, name, reason", [
    (dict(best_of=3), "best_of", "best-of-n ranking is not implemented"),
    (dict(output_kind=1), "output_kind", "CUMULATIVE, DELTA .* or FINAL_ONLY"),
    (dict(structured_outputs={"json": {}}), "structured_outputs", "guided"),
    (dict(guided_decoding={"regex": "a+"}), "guided_decoding", "guided"),
    (dict(allowed_token_ids=[1, 2]), "allowed_token_ids", "logit_bias"),
    (dict(bad_words=["no"]), "bad_words", "not implemented"),
    (dict(logits_processors=[print]), "logits_processors", "not implemented"),
    (dict(truncate_prompt_tokens=8), "truncate_prompt_tokens", "shorten the prompt"),
    (dict(detokenize=False), "detokenize", "always detokenized"),
    (dict(flat_logprobs=True), "flat_logprobs", "one dict per position"),
    (dict(stream_interval=0), "stream_interval", "an int >= 1"),
    (dict(extra_args=[1]), "extra_args", "a dict"),
    (dict(logprob_token_ids=[1]), "logprob_token_ids", "logprobs=k"),
])
def test_unimplemented_vllm_fields_refused_by_name(kwargs, name, reason):
    with pytest.raises(ValueError, match=rf"^SamplingParams\.{name}: expected .*{reason}"):
        SamplingParams(n=2, temperature=1.0, **kwargs)


def test_unknown_field_is_a_type_error():
    with pytest.raises(TypeError, match="tempreature"):
        SamplingParams(tempreature=0)
