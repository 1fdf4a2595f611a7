"""Incremental detokenization: a request's text grows by what each new token adds.

Each step decodes only a short span of the newest tokens (from `prefix` on, compared
with the text of `prefix:read`), so a step costs the same at the first token and at the
thousandth. Bytes of an incomplete UTF-8 sequence (a token holding half a character)
decode to U+FFFD: they are held back until a later token completes them, and dropped if
the request ends first, so the text never ends in a replacement character.
"""

from __future__ import annotations

from collections.abc import Iterable

from runner.formats.tokenizer import Tokenizer

REPLACEMENT = "\ufffd"


class IncrementalDetokenizer:
    """The text of one request's output tokens, as they arrive."""

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool) -> None:
        self._tokenizer = tokenizer
        self._skip = skip_special_tokens
        self._ids: list[int] = []
        self._prefix = 0  # first token of the span each step decodes
        self._read = 0  # tokens whose text is in `text`
        self.text = ""

    def push(self, token_ids: Iterable[int]) -> int:
        """Add tokens; returns how many characters the text grew by."""
        grown = 0
        for token in token_ids:
            self._ids.append(token)
            grown += self._advance()
        return grown

    def _advance(self) -> int:
        # Decoding a span rather than one token keeps word-boundary spaces right: many
        # tokenizers drop a token's leading space when it is decoded alone.
        before = self._decode(self._ids[self._prefix:self._read])
        after = self._decode(self._ids[self._prefix:])
        if len(after) <= len(before) or after.endswith(REPLACEMENT):
            return 0  # nothing printable yet (a special token skipped, or half a character)
        new = after[len(before):]
        self.text += new
        self._prefix, self._read = self._read, len(self._ids)
        return len(new)

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=self._skip) if ids else ""

    def truncate(self, length: int) -> None:
        """Keep the first `length` characters (the text before or through a stop string)."""
        self.text = self.text[:length]


def find_stop(text: str, grown: int, stops: Iterable[str]) -> tuple[str, int] | None:
    """The first stop string (in the order given, as vLLM checks them) that overlaps the
    last `grown` characters of `text`, with where it starts; earlier text was searched
    when it arrived."""
    if grown == 0:
        return None
    for stop in stops:
        at = text.find(stop, max(0, len(text) - grown - len(stop) + 1))
        if at != -1:
            return stop, at
    return None
