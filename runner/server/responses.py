"""OpenAI response shapes (as vLLM's server writes them) from the engine's outputs."""

from __future__ import annotations

import json
import math
from typing import Any

from runner.engine.logprobs import Logprob
from runner.engine.outputs import CompletionOutput
from runner.formats.tokenizer import Tokenizer

# JSON has no -inf; vLLM clamps a log-probability to this.
MIN_LOGPROB = -9999.0


def sse(payload: dict[str, Any] | str) -> str:
    data = payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False, separators=(",", ":"))
    return f"data: {data}\n\n"


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def _finite(logprob: float) -> float:
    return MIN_LOGPROB if math.isnan(logprob) else max(MIN_LOGPROB, logprob)


def _token(token_id: int, entry: Logprob | None, as_ids: bool, tokenizer: Tokenizer | None) -> str:
    """A token as text: vLLM's `token_id:<id>` with return_tokens_as_token_ids, else its text."""
    if as_ids:
        return f"token_id:{token_id}"
    if entry is not None and entry.decoded_token is not None:
        return entry.decoded_token
    return tokenizer.decode([token_id]) if tokenizer is not None else f"token_id:{token_id}"


def _chosen(token_id: int, position: dict[int, Logprob]) -> Logprob:
    return position.get(token_id) or next(iter(position.values()))


def completion_logprobs(c: CompletionOutput, offset: int, as_ids: bool,
                        tokenizer: Tokenizer | None) -> dict[str, list[Any]] | None:
    """The legacy completions shape: tokens, their logprobs, text offsets and, per position,
    the chosen token with the top `logprobs` (so up to logprobs + 1 entries, as vLLM)."""
    if c.logprobs is None:
        return None
    out: dict[str, list[Any]] = {"text_offset": [], "token_logprobs": [], "tokens": [], "top_logprobs": []}
    for token_id, position in zip(c.token_ids, c.logprobs):
        text = _token(token_id, position.get(token_id), as_ids, tokenizer)
        out["tokens"].append(text)
        out["token_logprobs"].append(_finite(_chosen(token_id, position).logprob))
        out["top_logprobs"].append({_token(t, lp, as_ids, tokenizer): _finite(lp.logprob)
                                    for t, lp in position.items()})
        out["text_offset"].append(offset)
        offset += len(text)
    return out


def chat_logprobs(c: CompletionOutput, top_logprobs: int, as_ids: bool,
                  tokenizer: Tokenizer | None) -> dict[str, list[Any]] | None:
    """The chat shape: per token its text, logprob, UTF-8 bytes and the `top_logprobs` most
    likely tokens, most likely first."""
    if c.logprobs is None:
        return None

    def item(token_id: int, entry: Logprob) -> dict[str, Any]:
        text = _token(token_id, entry, as_ids, tokenizer)
        return {"token": text, "logprob": _finite(entry.logprob), "bytes": list(text.encode("utf-8"))}

    content = []
    for token_id, position in zip(c.token_ids, c.logprobs):
        ranked = sorted(position.items(), key=lambda kv: -kv[1].logprob)[:top_logprobs]
        content.append({**item(token_id, _chosen(token_id, position)),
                        "top_logprobs": [item(t, lp) for t, lp in ranked]})
    return {"content": content}


def weight_versions(c: CompletionOutput) -> list[list[int]]:
    """Which weights made which tokens: `[first_token_index, weight_version]` spans over the
    whole completion (one span unless the weights changed while it ran). Not an OpenAI
    field; clients read it as an extra attribute of the choice."""
    return [[first, version] for first, version in c.weight_versions]


def completion_choice(index: int, c: CompletionOutput, logprobs: dict[str, list[Any]] | None,
                      finished: bool) -> dict[str, Any]:
    choice = {"index": index, "text": c.text, "logprobs": logprobs,
              "finish_reason": c.finish_reason if finished else None,
              "stop_reason": c.stop_reason if finished else None}
    # A stream's spans are complete only at its end: they come with the last chunk.
    return {**choice, "weight_versions": weight_versions(c)} if finished else choice


def chat_choice(index: int, c: CompletionOutput, logprobs: dict[str, list[Any]] | None) -> dict[str, Any]:
    return {"index": index, "message": {"role": "assistant", "content": c.text},
            "logprobs": logprobs, "finish_reason": c.finish_reason, "stop_reason": c.stop_reason,
            "weight_versions": weight_versions(c)}


def chat_delta(index: int, delta: dict[str, Any], logprobs: dict[str, list[Any]] | None = None,
               finish_reason: str | None = None, stop_reason: int | str | None = None,
               versions: list[list[int]] | None = None) -> dict[str, Any]:
    choice = {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason,
              "stop_reason": stop_reason}
    return choice if versions is None else {**choice, "weight_versions": versions}
