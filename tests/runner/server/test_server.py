"""`python -m runner serve` against real clients: the server runs in a subprocess on
127.0.0.1, driven by the official `openai` client (sync and async) and by httpx for what
that client cannot send (malformed bodies, a client that goes away mid-stream).

Greedy results through the server equal `runner.LLM.generate` on the same settings, token
for token (token ids come back through vLLM's `return_tokens_as_token_ids`). Every wait is
bounded in time and every loop in count.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

# The serve extra and the clients are test dependencies; an image without them (the GPU
# image has no FastAPI) skips this module instead of failing to collect it.
for _module in ("fastapi", "uvicorn", "prometheus_client"):
    pytest.importorskip(_module)
httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")

from runner import LLM, SamplingParams  # noqa: E402 - after the skips
from runner.demo import builtin_folder  # noqa: E402
from runner.formats.tokenizer import Tokenizer  # noqa: E402

ROOT = Path(__file__).resolve().parents[3]
SETTINGS = dict(max_model_len=128, num_kv_blocks=64, max_num_seqs=8)
FLAGS = ["--max-model-len", "128", "--num-kv-blocks", "64", "--max-num-seqs", "8"]
PROMPTS = ["def add(a, b):", "class Stack:", "import os\n", "for i in range(10):", "x = [", "# sort a list\n",
           "while True:", "return "]
TOKEN_PROMPTS = [[5, 6, 7, 8], [9, 10]]
MESSAGES = [{"role": "system", "content": "You write Python."}, {"role": "user", "content": "sort a list"}]
# Seeded sampling is reproducible: every sampling setting is checked against generate's.
SAMPLED = dict(temperature=0.8, top_p=0.9, seed=7, presence_penalty=0.5, frequency_penalty=0.3)
SAMPLED_EXTRA = dict(top_k=20, min_p=0.05, repetition_penalty=1.1)
START_TIMEOUT = 120.0
REFERENCE_TIMEOUT = 400.0
EXTRA = {"ignore_eos": True, "return_tokens_as_token_ids": True}

# The load test's clients, drawn once: kind, prompt, max_tokens, events before leaving
# (0: leave after a delay, maybe before the response starts), that delay, a malformed body.
LOAD_CLIENTS = 64
LOAD_MAX_TOKENS = (6, 12, 20)
MALFORMED = [(b'{"prompt": ', 400), (b'{"prompt": "x", "temperature": -1}', 400), (b'{"prompt": [99999]}', 400),
             (b'{"prompt": "x", "model": "gpt-4"}', 404), (b'{"prompt": "x", "n": 0}', 400),
             (b'{"prompt": "x", "max_tokens": "many", "stream": true}', 400)]
_rng = random.Random(27)
LOAD_PLAN = [(_rng.choices(["complete", "leave", "malformed"], weights=[6, 3, 1])[0], _rng.choice(PROMPTS),
              _rng.choice(LOAD_MAX_TOKENS), _rng.randint(0, 3), _rng.uniform(0.05, 1.0), _rng.choice(MALFORMED))
             for _ in range(LOAD_CLIENTS)]


def greedy(max_tokens: int) -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True, logprobs=0)


def _reference_requests(tokenizer: Tokenizer) -> dict[Any, tuple[Any, SamplingParams]]:
    """Every offline result the tests compare with, by key: (prompt, settings)."""
    chat_ids = tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True)
    requests: dict[Any, tuple[Any, SamplingParams]] = {
        ("chat", 16): ({"prompt_token_ids": chat_ids}, greedy(16)),  # what LLM.chat submits
        ("sampled",): (PROMPTS[3], SamplingParams(n=2, max_tokens=10, logprobs=2, ignore_eos=True,
                                                  logit_bias={14: 5.0}, **SAMPLED, **SAMPLED_EXTRA)),
        (PROMPTS[2], 20): (PROMPTS[2], greedy(20)),
    }
    for prompt in [PROMPTS[0], PROMPTS[1], *TOKEN_PROMPTS]:
        requests[(str(prompt), 12)] = (prompt, greedy(12))
    for kind, prompt, max_tokens, *_ in LOAD_PLAN:
        if kind == "complete":
            requests[(prompt, max_tokens)] = (prompt, greedy(max_tokens))
    return requests


def _offline_references() -> dict[Any, Any]:
    """`LLM.generate` on the server's settings, in one call (one set of compiled shapes)."""
    llm = LLM(**SETTINGS)
    requests = _reference_requests(llm.get_tokenizer())
    outputs = llm.generate([p for p, _ in requests.values()], [s for _, s in requests.values()], use_tqdm=False)
    return dict(zip(requests, outputs))


@pytest.fixture(scope="module")
def references() -> Iterator[Future]:
    # Computed on a thread while the server starts and compiles in its own process: the two
    # compile on different cores.
    with ThreadPoolExecutor(1) as pool:
        yield pool.submit(_offline_references)


def reference(references: Future, key: Any) -> Any:
    return references.result(timeout=REFERENCE_TIMEOUT)[key]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(references: Future, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    port = _free_port()
    log = tmp_path_factory.mktemp("server") / "server.log"
    cmd = [sys.executable, "-m", "runner", "serve", "--port", str(port), *FLAGS,
           "--enable-control-endpoints", "--uvicorn-log-level", "warning"]
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            assert proc.poll() is None, f"the server exited:\n{log.read_text()[-3000:]}"
            assert time.monotonic() < deadline, f"no /health in {START_TIMEOUT}s:\n{log.read_text()[-3000:]}"
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


@pytest.fixture(scope="module")
def http(server: str) -> Iterator[httpx.Client]:
    # Generous timeouts: a request with a new batch shape waits for its compilation.
    with httpx.Client(base_url=server, timeout=120) as c:
        yield c


@pytest.fixture(scope="module")
def client(server: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0, timeout=120)


def token_ids(tokens: list[str]) -> list[int]:
    return [int(t.removeprefix("token_id:")) for t in tokens]


def metric(http: httpx.Client, name: str) -> float:
    """One sample's value from /metrics (the sum over its label sets)."""
    text = http.get("/metrics").text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name))


def wait_all_blocks_free(http: httpx.Client, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        free, total = metric(http, "runner:kv_blocks_free"), metric(http, "runner:kv_blocks_total")
        running = metric(http, "vllm:num_requests_running") + metric(http, "vllm:num_requests_waiting")
        if free == total > 0 and running == 0:
            return
        assert time.monotonic() < deadline, f"{total - free} KV blocks still in use, {running} requests live"
        time.sleep(0.2)


# -- errors and control endpoints --------------------------------------------------------------
# First: they need no offline result, which is still being computed on the other core.


def test_models_health_and_metrics(http: httpx.Client, client: openai.OpenAI) -> None:
    assert [m.id for m in client.models.list().data] == ["builtin"]
    assert http.get("/health").status_code == 200
    text = http.get("/metrics").text
    for name in ("vllm:prompt_tokens_total", "vllm:generation_tokens_total", "vllm:num_requests_running",
                 "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc", "vllm:time_to_first_token_seconds",
                 "runner:kv_blocks_free", "runner:kv_blocks_total"):
        assert name in text


def _error(response: httpx.Response, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["code"] == status
    return error


@pytest.mark.parametrize("value", [-1, "hot"])
def test_a_bad_value_is_a_400_naming_the_field(client: openai.OpenAI, value: Any) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        client.completions.create(model="builtin", prompt="x", max_tokens=2, temperature=value)
    assert "temperature" in str(caught.value) and caught.value.body["param"] == "temperature"


def test_malformed_bodies_and_unknown_models(http: httpx.Client, client: openai.OpenAI) -> None:
    url = "/v1/completions"
    assert "not valid JSON" in _error(http.post(url, content=b'{"prompt": "x",',
                                                 headers={"content-type": "application/json"}), 400)["message"]
    assert _error(http.post(url, json={"max_tokens": 3}), 400)["param"] == "prompt"
    assert _error(http.post(url, json=[1, 2]), 400)["type"] == "BadRequestError"
    assert "outside the vocabulary" in _error(http.post(url, json={"prompt": [99999]}), 400)["message"]
    assert _error(http.post("/v1/chat/completions", json={"messages": []}), 400)["param"] == "messages"
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="no-such-model", prompt="x", max_tokens=2)
    for create in (lambda n: client.completions.create(model="builtin", prompt="x", max_tokens=n),
                   lambda n: client.chat.completions.create(model="builtin", max_completion_tokens=n,
                                                            messages=[{"role": "user", "content": "x"}])):
        with pytest.raises(openai.BadRequestError, match="maximum context length is 128 tokens") as caught:
            create(128)
        assert caught.value.body["param"] == "max_tokens"
    with pytest.raises(openai.BadRequestError, match="echo"):
        client.completions.create(model="builtin", prompt="x", max_tokens=2, echo=True)
    assert client.completions.create(model="builtin", prompt="x", max_tokens=2).choices[0].finish_reason


def test_sleep_gives_503_until_wake_up(http: httpx.Client) -> None:
    body = {"prompt": "x", "max_tokens": 2}
    assert http.post("/sleep", params={"level": 1}).status_code == 200
    try:
        assert http.get("/is_sleeping").json() == {"is_sleeping": True}
        assert "asleep" in _error(http.post("/v1/completions", json=body), 503)["message"]
    finally:
        assert http.post("/wake_up").status_code == 200
    assert http.get("/is_sleeping").json() == {"is_sleeping": False}
    assert http.post("/v1/completions", json=body).status_code == 200
    assert http.post("/reset_prefix_cache").json() == {"success": True}
    rpc = http.post("/collective_rpc", json={"method": "reset_prefix_cache"})
    assert rpc.json() == {"results": [True]}
    _error(http.post("/collective_rpc", json={"method": "no_such_method"}), 400)


def test_pause_holds_new_requests_until_resume(http: httpx.Client) -> None:
    assert http.post("/pause", params={"mode": "keep"}).status_code == 200
    try:
        assert http.get("/is_paused").json() == {"is_paused": True}
        _error(http.post("/pause", params={"mode": "stop"}), 400)
        with ThreadPoolExecutor(1) as pool:
            held = pool.submit(http.post, "/v1/completions", json={"prompt": "x", "max_tokens": 3})
            time.sleep(0.5)
            assert not held.done()  # held while paused
            assert http.post("/resume").status_code == 200
            assert len(held.result(timeout=60).json()["choices"][0]["text"]) > 0
    finally:
        http.post("/resume")
    assert http.get("/is_paused").json() == {"is_paused": False}


def test_responses_say_which_weights_made_them(http: httpx.Client, client: openai.OpenAI) -> None:
    # A reload from the model's own folder under a version the caller names: same weights,
    # a new version, which every choice then carries as [first_token_index, version] spans.
    rpc = http.post("/collective_rpc", json={"method": "reload_weights", "kwargs": {"version": 5}})
    assert rpc.status_code == 200, rpc.text
    done = client.completions.create(model="builtin", prompt=[PROMPTS[0], PROMPTS[1]], n=2, max_tokens=3,
                                     extra_body=EXTRA)
    assert [c.model_extra["weight_versions"] for c in done.choices] == [[[0, 5]]] * 4
    chat = client.chat.completions.create(model="builtin", messages=MESSAGES, max_tokens=3, extra_body=EXTRA)
    assert chat.choices[0].model_extra["weight_versions"] == [[0, 5]]
    stream = client.completions.create(model="builtin", prompt=PROMPTS[2], max_tokens=3, stream=True,
                                       extra_body=EXTRA)
    chunks = [c for c in stream if c.choices]
    assert chunks[-1].choices[0].finish_reason == "length"
    assert chunks[-1].choices[0].model_extra["weight_versions"] == [[0, 5]]
    assert all("weight_versions" not in c.choices[0].model_extra for c in chunks[:-1])  # spans come last
    chat_stream = client.chat.completions.create(model="builtin", messages=MESSAGES, max_tokens=3, stream=True,
                                                 extra_body=EXTRA)
    last = [c for c in chat_stream if c.choices][-1]
    assert last.choices[0].model_extra["weight_versions"] == [[0, 5]]


def test_control_endpoints_are_absent_without_the_flag() -> None:
    from runner.server import build_app

    stub = SimpleNamespace(is_running=True)  # the routes under test never reach an engine
    app = build_app(stub, ["builtin"])  # type: ignore[arg-type]

    async def main() -> list[int]:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as c:
            codes = [(await c.post(path)).status_code
                     for path in ("/sleep", "/wake_up", "/pause", "/resume", "/reset_prefix_cache",
                                  "/collective_rpc")]
            return [*codes, (await c.get("/is_sleeping")).status_code, (await c.get("/is_paused")).status_code,
                    (await c.get("/health")).status_code]

    assert asyncio.run(main()) == [404] * 8 + [200]


def test_leaving_a_stream_aborts_its_request(http: httpx.Client) -> None:
    aborted = metric(http, 'vllm:request_success_total{finished_reason="abort"')
    body = {"prompt": PROMPTS[4], "max_tokens": 120, "temperature": 0, "ignore_eos": True, "stream": True}
    with http.stream("POST", "/v1/completions", json=body) as response:
        first = next(line for line in response.iter_lines() if line.startswith("data: "))
    assert json.loads(first[6:])["choices"][0]["finish_reason"] is None
    wait_all_blocks_free(http)
    assert metric(http, 'vllm:request_success_total{finished_reason="abort"') == aborted + 1


def test_generate_runs_without_the_server_packages() -> None:
    blocked = "import sys\nfor m in ('fastapi', 'uvicorn', 'starlette', 'prometheus_client'): sys.modules[m] = None\n"
    code = blocked + ("import runner, runner.__main__\n"
                      "sys.exit(runner.__main__.main(['serve', '--port', '1']))")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1 and "serve extra" in done.stderr, done.stderr


# -- the official client ---------------------------------------------------------------------


def test_greedy_completions_equal_generate(client: openai.OpenAI, references: Future) -> None:
    # Several prompts in one request, as strings or as token ids: choices come in prompt order.
    for prompts in ([PROMPTS[0], PROMPTS[1]], TOKEN_PROMPTS):
        done = client.completions.create(model="builtin", prompt=prompts, temperature=0, max_tokens=12,
                                         logprobs=0, extra_body=EXTRA)
        expected = [reference(references, (str(p), 12)) for p in prompts]
        assert [c.index for c in done.choices] == [0, 1]
        for choice, ref in zip(done.choices, expected):
            assert choice.text == ref.outputs[0].text
            assert token_ids(choice.logprobs.tokens) == ref.outputs[0].token_ids
            assert choice.finish_reason == "length"
        assert done.usage.completion_tokens == 24
        assert done.usage.prompt_tokens == sum(len(r.prompt_token_ids) for r in expected)


def test_streamed_completion_adds_up_to_generate(client: openai.OpenAI, references: Future) -> None:
    stream = client.completions.create(model="builtin", prompt=PROMPTS[2], temperature=0, max_tokens=20,
                                       logprobs=0, stream=True, stream_options={"include_usage": True},
                                       extra_body=EXTRA)
    chunks = list(stream)
    ref = reference(references, (PROMPTS[2], 20)).outputs[0]
    pieces = [c for c in chunks if c.choices]
    assert "".join(c.choices[0].text for c in pieces) == ref.text
    assert sum((token_ids(c.choices[0].logprobs.tokens) for c in pieces), []) == ref.token_ids
    assert [c.choices[0].finish_reason for c in pieces][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 20


def test_async_client_chat_streaming_and_not(server: str, references: Future) -> None:
    async def main() -> tuple[Any, list[Any]]:
        async with openai.AsyncOpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0, timeout=120) as c:
            whole = await c.chat.completions.create(model="builtin", messages=MESSAGES, temperature=0,
                                                    max_completion_tokens=16, logprobs=True, top_logprobs=3,
                                                    extra_body=EXTRA)
            stream = await c.chat.completions.create(model="builtin", messages=MESSAGES, temperature=0,
                                                     max_tokens=16, stream=True, extra_body={"ignore_eos": True},
                                                     stream_options={"include_usage": True})
            return whole, [chunk async for chunk in stream]

    whole, chunks = asyncio.run(main())
    ref = reference(references, ("chat", 16)).outputs[0]
    choice = whole.choices[0]
    assert choice.message.role == "assistant" and choice.message.content == ref.text
    assert token_ids([t.token for t in choice.logprobs.content]) == ref.token_ids
    assert all(len(t.top_logprobs) == 3 for t in choice.logprobs.content)
    assert whole.usage.completion_tokens == 16
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == ref.text
    assert chunks[-1].usage.total_tokens == whole.usage.total_tokens


def test_sampling_settings_reach_the_engine(client: openai.OpenAI, references: Future) -> None:
    extra = {**SAMPLED_EXTRA, **EXTRA}
    done = client.completions.create(model="builtin", prompt=PROMPTS[3], n=2, max_tokens=10, logprobs=2,
                                     logit_bias={"14": 5.0}, extra_body=extra, **SAMPLED)
    ref = reference(references, ("sampled",))
    assert [token_ids(c.logprobs.tokens) for c in done.choices] == [c.token_ids for c in ref.outputs]
    assert all(1 <= len(top) <= 3 for c in done.choices for top in c.logprobs.top_logprobs)
    stop = ref.outputs[0].text[3:6]
    stopped = client.completions.create(model="builtin", prompt=PROMPTS[3], max_tokens=10, stop=[stop],
                                        extra_body=extra, **SAMPLED)
    assert stopped.choices[0].finish_reason == "stop" and stop not in stopped.choices[0].text


def test_tokenize_and_detokenize(http: httpx.Client) -> None:
    tokenizer = Tokenizer.from_folder(builtin_folder())
    ids = http.post("/tokenize", json={"prompt": PROMPTS[0]}).json()
    assert ids["tokens"] == tokenizer.encode(PROMPTS[0]) and ids["count"] == len(ids["tokens"])
    assert ids["max_model_len"] == 128
    chat = http.post("/tokenize", json={"messages": MESSAGES}).json()
    assert chat["tokens"] == tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True)
    text = http.post("/detokenize", json={"tokens": ids["tokens"]}).json()
    assert text == {"prompt": PROMPTS[0]}
    assert http.post("/detokenize", json={"tokens": [10**6]}).status_code == 400


# -- load ------------------------------------------------------------------------------------


async def _complete(c: openai.AsyncOpenAI, prompt: str, max_tokens: int) -> tuple[str, list[int]]:
    stream = await c.completions.create(model="builtin", prompt=prompt, temperature=0, max_tokens=max_tokens,
                                        logprobs=0, stream=True, extra_body=EXTRA)
    text, ids = "", []
    async for chunk in stream:
        text += chunk.choices[0].text
        ids += token_ids(chunk.choices[0].logprobs.tokens)
    return text, ids


async def _leave(h: httpx.AsyncClient, prompt: str, events: int, delay: float) -> int:
    """Stream a long completion and go away after `events` events (0: after `delay` seconds,
    possibly before the response started). Returns the events read."""
    body = {"prompt": prompt, "max_tokens": 100, "temperature": 0, "ignore_eos": True, "stream": True}
    read = 0

    async def read_some() -> None:
        nonlocal read
        async with h.stream("POST", "/v1/completions", json=body) as response:
            async for line in response.aiter_lines():
                read += line.startswith("data: ")
                if events and read >= events:
                    return  # leaving the block closes the connection mid-stream

    if events:
        await read_some()
    else:
        try:
            await asyncio.wait_for(read_some(), delay)
        except asyncio.TimeoutError:
            pass
    return read


async def _malformed(h: httpx.AsyncClient, body: bytes, status: int) -> None:
    response = await h.post("/v1/completions", content=body, headers={"content-type": "application/json"})
    assert response.status_code == status, response.text
    assert set(response.json()["error"]) == {"message", "type", "param", "code"}


def test_load_with_disconnects_and_malformed_bodies(server: str, http: httpx.Client, references: Future) -> None:
    counts = {k: sum(p[0] == k for p in LOAD_PLAN) for k in ("complete", "leave", "malformed")}
    assert min(counts.values()) > 0, counts
    aborted = metric(http, 'vllm:request_success_total{finished_reason="abort"')

    async def main() -> list[Any]:
        limits = httpx.Limits(max_connections=LOAD_CLIENTS)
        async with openai.AsyncOpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0, timeout=120) as c, \
                httpx.AsyncClient(base_url=server, timeout=120, limits=limits) as h:
            calls = [_complete(c, prompt, n) if kind == "complete" else _leave(h, prompt, events, delay)
                     if kind == "leave" else _malformed(h, *bad)
                     for kind, prompt, n, events, delay, bad in LOAD_PLAN]
            return await asyncio.wait_for(asyncio.gather(*calls), timeout=150)

    start = time.monotonic()
    results = asyncio.run(main())
    elapsed = time.monotonic() - start
    mismatched = []
    for (kind, prompt, max_tokens, *_), got in zip(LOAD_PLAN, results):
        ref = reference(references, (prompt, max_tokens)).outputs[0] if kind == "complete" else None
        if ref is not None and got != (ref.text, ref.token_ids):
            mismatched.append((prompt, max_tokens))
    assert not mismatched, mismatched
    wait_all_blocks_free(http)
    # Some of the clients that left were still generating (100 tokens each): aborted, not finished.
    assert metric(http, 'vllm:request_success_total{finished_reason="abort"') > aborted
    after = http.post("/v1/completions", json={"prompt": PROMPTS[0], "max_tokens": 3}, timeout=60)
    assert after.status_code == 200
    print(f"load: {counts} in {elapsed:.1f}s")
