"""`runner.chat`: conversation normalisation and template rendering, on hand-checked values."""

from __future__ import annotations

import pytest

from runner import chat

TEMPLATE = ("{% for m in messages %}\n  <{{ m.role }}>{{ m.content }}\n{% endfor %}\n"
            "{% if add_generation_prompt %}<assistant>{% endif %}")


def test_render_trims_blocks_like_transformers():
    convo = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    # trim_blocks drops the newline after a tag, lstrip_blocks the spaces before one.
    assert chat.render(TEMPLATE, convo) == "  <user>hi\n  <assistant>yo\n"
    assert chat.render(TEMPLATE, convo, add_generation_prompt=True).endswith("yo\n<assistant>")


def test_render_variables_and_globals():
    out = chat.render("{{ bos_token }}{{ x | tojson }}{{ strftime_now('%Y') | length }}",
                      [{"role": "user", "content": ""}], variables={"bos_token": "<s>", "x": {"a": "<&>"}})
    assert out == '<s>{"a": "<&>"}4'
    with pytest.raises(ValueError, match="chat template: stop here"):
        chat.render("{{ raise_exception('stop here') }}", [{"role": "user", "content": ""}])


def test_render_is_sandboxed():
    with pytest.raises(ValueError, match="chat template"):
        chat.render("{{ messages.__class__.__mro__ }}{{ ''.__class__.__subclasses__() }}",
                    [{"role": "user", "content": ""}])
    with pytest.raises(ValueError, match="chat template"):  # the immutable sandbox: no list.append
        chat.render("{% set l = [] %}{{ l.append(1) }}", [{"role": "user", "content": ""}])


def test_generation_block_renders_its_body():
    out = chat.render("{% for m in messages %}{% generation %}[{{ m.content }}]{% endgeneration %}{% endfor %}",
                      [{"role": "assistant", "content": "a"}])
    assert out == "[a]"


def test_text_parts_join_and_none_values_drop():
    msg = chat.normalize_message({"role": "user", "content": [{"type": "text", "text": "one"},
                                                              {"type": "text", "text": "two"}],
                                  "tool_calls": None})
    assert msg == {"role": "user", "content": "one\ntwo"}


@pytest.mark.parametrize("message, error", [
    ({"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]},
     r"conversation\[0\]\.content\[0\]: 'image_url' parts are not supported"),
    ({"role": "user", "content": [{"type": "text"}]}, r"content\[0\]: expected \{'type': 'text'"),
    ({"role": "user", "content": 3}, r"content: expected a string or a list of text parts, got int"),
    ({"content": "x"}, r"conversation\[0\]\.role: expected a string"),
    ("just text", r"conversation\[0\]: expected a dict"),
])
def test_bad_messages_are_refused(message, error):
    with pytest.raises(ValueError, match=error):
        chat.normalize_conversation([message])


def test_batches_and_single_conversations():
    one = [{"role": "user", "content": "a"}]
    assert chat.normalize_conversations(one) == ([one], False)
    assert chat.normalize_conversations([one, one]) == ([one, one], True)
    with pytest.raises(ValueError, match="non-empty list of messages"):
        chat.normalize_conversations([])
    with pytest.raises(ValueError, match=r"conversation 1\[0\]\.role"):
        chat.normalize_conversations([one, [{"content": "x"}]])
