"""Benchmark: workload W1 on this runner and, in the same run, on Hugging Face transformers.

W1 is fixed so results compare over time: a Qwen3-architecture model (vocab 32000, hidden
512, intermediate 1536, 8 layers, 8 query heads, 4 KV heads, head_dim 64, tied embeddings,
float32, seeded random weights); per batch size, prompts of 128 seeded random token ids,
64 new tokens, greedy, EOS ignored; one warm-up, then the median of `repeats` timed calls.

The figure to track is the ratio ours / reference per batch size; absolute times on a
shared machine are noise. The decode step is (time(max_tokens=49) - time(max_tokens=1)) / 48
(fewer steps when max_tokens is smaller). Model bandwidth utilisation (MBU) divides the
weight bytes read per decode step by the step time and by the read bandwidth measured in
the same run; the FLOP share divides the step's matmul FLOPs, at the rate a large matmul
reaches in the same run, by the step time. Both peaks are sampled before every batch size
and at the end, ten calls each, and the fastest of the whole run counts. With
`vllm_python`, vLLM runs the same workload in a subprocess of that interpreter (a
benchmark peer, never a dependency): its engine starts once, and each batch size runs there
right before it runs here, so both sides of a ratio share the host's load of the moment.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import queue
import resource
import statistics
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from runner.formats.bridge import save_pretrained
from runner.formats.tokenizer import Tokenizer
from runner.device.compilation import CompileCounter
from runner.llm import LLM
from runner.device.loader import dummy_params
from runner.sampling_params import SamplingParams
from state.batch import cdiv
from state.config import ModelConfig
from state.params import param_bytes


@dataclass(frozen=True)
class Workload:
    vocab_size: int = 32000
    hidden_size: int = 512
    intermediate_size: int = 1536
    num_layers: int = 8
    num_heads: int = 8
    num_kv_heads: int = 4
    head_dim: int = 64
    dtype: str = "float32"
    prompt_len: int = 128
    max_tokens: int = 64
    batch_sizes: tuple[int, ...] = (1, 8, 32)
    repeats: int = 3
    seed: int = 0

    def model_config(self) -> ModelConfig:
        return ModelConfig(
            architecture="Qwen3ForCausalLM", vocab_size=self.vocab_size, hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size, num_hidden_layers=self.num_layers,
            num_attention_heads=self.num_heads, num_key_value_heads=self.num_kv_heads,
            head_dim=self.head_dim, tie_word_embeddings=True, dtype=self.dtype,
            max_position_embeddings=max(512, self.prompt_len + self.max_tokens))

    def prompts(self, batch_size: int) -> list[list[int]]:
        rng = np.random.default_rng(self.seed + batch_size)
        return rng.integers(0, self.vocab_size, (batch_size, self.prompt_len)).tolist()


def w1_folder(w: Workload, folder: Path, tokenizer: Tokenizer | None = None) -> Path:
    """Write W1's model (seeded random weights) as a Hugging Face folder; returns the folder."""
    cfg = w.model_config()
    return save_pretrained(folder, dummy_params(cfg, w.seed), cfg, tokenizer)


def _times(fn: Callable[[], Any], repeats: int) -> list[float]:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def _median_time(fn: Callable[[], Any], repeats: int) -> float:
    return statistics.median(_times(fn, repeats))


def least_time(fn: Callable[[], Any], repeats: int) -> float:
    """The fastest of `repeats` calls: a peak rate is what the host reaches when nothing
    else runs (a median taken while a neighbour ran once read half the matmul rate, and
    doubled the FLOP share computed from it)."""
    return min(_times(fn, repeats))


def measure_read_bandwidth(nbytes: int = 256 << 20, repeats: int = 10) -> float:
    """Bytes per second the device reads at best, timed on a jitted sum of a large float32 array."""
    x = jnp.ones(nbytes // 4, jnp.float32)
    total = jax.jit(jnp.sum)
    total(x).block_until_ready()
    return nbytes / least_time(lambda: total(x).block_until_ready(), repeats)


def measure_matmul_flops(n: int = 1024, dtype: str = "float32", repeats: int = 10) -> float:
    """FLOP/s of a jitted n x n x n matmul: the rate the step's matmuls could reach at best."""
    a = jnp.ones((n, n), dtype)
    mm = jax.jit(jnp.matmul)
    mm(a, a).block_until_ready()
    return 2 * n ** 3 / least_time(lambda: mm(a, a).block_until_ready(), repeats)


@dataclass(frozen=True)
class Peaks:
    """The fastest read and matmul rates of a run: MBU and the FLOP share divide by them.

    The host is shared, so a run samples them before every batch size and at the end and
    keeps the fastest: a sample taken while a neighbour ran reads low and would flatter both
    figures (on the 2-core host, samples of the read rate, each the fastest of ten calls,
    ranged from 27 to 50 GB/s over one day's runs)."""

    read_bytes_per_s: float
    matmul_flops_per_s: float

    @classmethod
    def measure(cls, dtype: str) -> Peaks:
        return cls(measure_read_bandwidth(), measure_matmul_flops(dtype=dtype))

    @classmethod
    def fastest(cls, samples: list[Peaks]) -> Peaks:
        return cls(max(p.read_bytes_per_s for p in samples), max(p.matmul_flops_per_s for p in samples))


def matmul_flops_per_row(params: Any) -> int:
    """FLOPs one decode row spends in matmuls: 2 per weight of every layer and the lm_head
    (the embedding lookup is a gather, unless tied, when it is also the lm_head)."""
    layers = sum(x.size for layer in params.layers for x in
                 (layer.wq, layer.wk, layer.wv, layer.wo, layer.w_gate, layer.w_up, layer.w_down))
    head = params.embed.size if params.lm_head is None else params.lm_head.size
    return 2 * (layers + head)


def _peak_memory_bytes() -> int:
    stats = jax.devices()[0].memory_stats() or {}
    if "peak_bytes_in_use" in stats:
        return int(stats["peak_bytes_in_use"])
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def step_tokens(w: Workload) -> int:
    """max_tokens of the run whose time, less the one-token run's, gives the decode step."""
    return min(49, w.max_tokens)


def _figures(batch_size: int, w: Workload, times: dict[str, float]) -> dict[str, float]:
    total_s, ttft_s = times["total_s"], times["ttft_s"]
    step_s = (times["step_run_s"] - ttft_s) / max(step_tokens(w) - 1, 1)
    return {
        "tokens_per_s": batch_size * w.max_tokens / total_s,
        "total_s": total_s,
        "ttft_s": ttft_s,
        "step_run_s": times["step_run_s"],
        "decode_ms_per_step": 1000 * step_s,
        "prefill_tokens_per_s": batch_size * w.prompt_len / ttft_s,
    }


def _add_utilisation(row: dict[str, Any], weight_bytes: int, row_flops: int, peaks: Peaks) -> None:
    """MBU on every side of `row` and the FLOP share on ours, against the run's peaks."""
    for side in ("ours", "reference", "vllm"):
        if side in row:
            step_s = row[side]["decode_ms_per_step"] / 1000
            row[side]["mbu"] = weight_bytes / step_s / peaks.read_bytes_per_s
    ours = row["ours"]
    ours["flop_share"] = row["batch_size"] * row_flops / peaks.matmul_flops_per_s / (ours["decode_ms_per_step"] / 1000)


def _time_runs(run: Callable[[int], Any], w: Workload) -> dict[str, float]:
    """Median times of runs of 1, `step_tokens` and max_tokens new tokens."""
    return {"ttft_s": _median_time(lambda: run(1), w.repeats),
            "step_run_s": _median_time(lambda: run(step_tokens(w)), w.repeats),
            "total_s": _median_time(lambda: run(w.max_tokens), w.repeats)}


def bench_ours(llm: LLM, w: Workload, batch_size: int) -> dict[str, float]:
    prompts = [{"prompt_token_ids": p} for p in w.prompts(batch_size)]

    def run(n: int) -> None:
        llm.generate(prompts, SamplingParams(temperature=0, max_tokens=n, ignore_eos=True), use_tqdm=False)

    with CompileCounter() as compiles:
        start = time.perf_counter()
        run(w.max_tokens)
        run(1)
        warmup_s = time.perf_counter() - start
    with CompileCounter() as after:
        times = _time_runs(run, w)
    return {**_figures(batch_size, w, times),
            "compiles": compiles.count, "compiles_after_warmup": after.count, "warmup_s": warmup_s,
            "peak_memory_bytes": _peak_memory_bytes()}


def bench_transformers(folder: Path, w: Workload, batch_size: int) -> dict[str, float]:
    import torch
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=getattr(torch, w.dtype)).eval()
    model.generation_config.eos_token_id = None  # ignore EOS, as ours does
    ids = torch.tensor(w.prompts(batch_size))
    mask = torch.ones_like(ids)

    def run(n: int) -> None:
        with torch.no_grad():
            model.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=n,
                           pad_token_id=0)

    run(w.max_tokens)
    return _figures(batch_size, w, _time_runs(run, w))


# The peer: one vLLM engine, started once, that runs a batch size's timings for each job
# line it reads (EOF ends it). Jobs come one batch size at a time, just before ours runs the
# same batch size, so a neighbour's load on this shared host falls on both sides of a ratio.
VLLM_WORKER = """
import json, statistics, sys, time
from vllm import LLM, SamplingParams
setup = json.loads(sys.argv[1])
llm = LLM(setup["folder"], dtype=setup["dtype"], max_model_len=setup["max_model_len"], seed=0,
          skip_tokenizer_init=True, enable_prefix_caching=False, max_num_seqs=setup["max_num_seqs"])
print("VLLM_READY", flush=True)
for line in sys.stdin:
    job = json.loads(line)
    prompts = [{"prompt_token_ids": p} for p in job["prompts"]]
    def run(n):
        llm.generate(prompts, SamplingParams(temperature=0, max_tokens=n, ignore_eos=True,
                                             detokenize=False), use_tqdm=False)
    def median(n):
        times = []
        for _ in range(job["repeats"]):
            start = time.perf_counter(); run(n); times.append(time.perf_counter() - start)
        return statistics.median(times)
    run(job["max_tokens"]); run(1)
    times = {"ttft_s": median(1), "step_run_s": median(job["step_tokens"]),
             "total_s": median(job["max_tokens"])}
    print("VLLM_TIMES " + json.dumps(times), flush=True)
"""


class VllmPeer:
    """W1 on vLLM, in a subprocess of the interpreter `python` (its CPU KV cache: 2 GiB).

    The engine starts once; `times(batch_size)` runs one batch size's timed calls there and
    returns their medians. Use it as a context manager: leaving it ends the subprocess.
    """

    def __init__(self, python: str, folder: Path, w: Workload, timeout_s: float = 3600.0,
                 worker: str = VLLM_WORKER, setup: dict[str, Any] | None = None) -> None:
        """`worker` is the script the subprocess runs (W1's by default): it gets `setup`
        as JSON in argv[1], prints VLLM_READY once its engine is up, then answers each
        JSON job line of stdin with one VLLM_TIMES line (`run_job`)."""
        self._w, self._timeout_s = w, timeout_s
        setup = setup or {"folder": str(folder), "dtype": w.dtype, "max_model_len": w.prompt_len + w.max_tokens,
                          "max_num_seqs": max(w.batch_sizes)}
        env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "2")}
        env.pop("PYTHONPATH", None)  # vLLM must not import this project's packages
        self._stderr = tempfile.TemporaryFile(mode="w+")  # a file: a full pipe would stall vLLM
        self._proc = subprocess.Popen([python, "-c", worker, json.dumps(setup)], stdin=subprocess.PIPE,
                                      stdout=subprocess.PIPE, stderr=self._stderr, text=True, env=env)
        # vLLM logs to stdout too: a thread hands over the lines, so a read can time out.
        self._lines: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._pump, daemon=True).start()
        self._expect("VLLM_READY")

    def _pump(self) -> None:
        for line in self._proc.stdout:
            self._lines.put(line.rstrip("\n"))
        self._lines.put(None)  # EOF: the subprocess ended

    def _expect(self, prefix: str) -> str:
        deadline = time.monotonic() + self._timeout_s
        while True:
            try:
                line = self._lines.get(timeout=max(deadline - time.monotonic(), 0.001))
            except queue.Empty:
                line = None
            if line is None:
                self.close()
                self._stderr.seek(0)
                stderr = self._stderr.read()[-3000:]
                self._stderr.close()  # a peer that failed in __init__ never reaches __exit__
                raise RuntimeError(f"vLLM peer ({self._proc.args[0]}) gave no {prefix!r} line "
                                   f"(exit {self._proc.returncode}):\n{stderr}")
            if line.startswith(prefix):
                return line.removeprefix(prefix).strip()

    def times(self, batch_size: int) -> dict[str, float]:
        """Median seconds of W1's runs at `batch_size`: TTFT, the step run and the whole run."""
        w = self._w
        return self.run_job({"prompts": w.prompts(batch_size), "repeats": w.repeats, "max_tokens": w.max_tokens,
                             "step_tokens": step_tokens(w)})

    def run_job(self, job: dict[str, Any]) -> dict[str, Any]:
        """Send one job line; the worker's answer."""
        self._proc.stdin.write(json.dumps(job) + "\n")
        self._proc.stdin.flush()
        return json.loads(self._expect("VLLM_TIMES"))

    def close(self) -> None:
        if self._proc.poll() is None:
            self._proc.stdin.close()
            try:
                self._proc.wait(timeout=120)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()

    def __enter__(self) -> VllmPeer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
        self._stderr.close()


def _bench_row(llm: LLM, peer: VllmPeer | None, folder: Path, w: Workload, b: int,
               reference: bool) -> dict[str, Any]:
    """Batch size `b`'s timings on vLLM (when a peer runs), then on ours, then on transformers."""
    row: dict[str, Any] = {"batch_size": b}
    if peer is not None:
        row["vllm"] = _figures(b, w, peer.times(b))
    row["ours"] = bench_ours(llm, w, b)
    if reference:
        row["reference"] = bench_transformers(folder, w, b)
        row["ratio"] = row["ours"]["tokens_per_s"] / row["reference"]["tokens_per_s"]
    if peer is not None:
        row["ratio_vllm"] = row["ours"]["tokens_per_s"] / row["vllm"]["tokens_per_s"]
    return row


def run(w: Workload = Workload(), model: str | None = None, reference: bool = True,
        output: str | Path | None = None, log: Callable[[str], None] = print,
        vllm_python: str | None = None, decode_steps: int = 0) -> dict[str, Any]:
    """Run W1 (or `model`'s weights with W1's prompts) and return every figure as a dict."""
    samples: list[Peaks] = []
    max_len = w.prompt_len + w.max_tokens
    with tempfile.TemporaryDirectory() as tmp:
        if model is None:
            folder = w1_folder(w, Path(tmp) / "w1")
        else:
            folder = Path(model)
        blocks_per_seq = cdiv(max_len, 16)
        llm = LLM(str(folder), dtype=w.dtype, max_model_len=max_len,
                  num_kv_blocks=blocks_per_seq * max(w.batch_sizes) + 1,
                  max_num_seqs=max(w.batch_sizes), enable_prefix_caching=False,
                  decode_steps=decode_steps)
        weight_bytes = param_bytes(llm.runner.params)
        row_flops = matmul_flops_per_row(llm.runner.params)
        results = []
        with VllmPeer(vllm_python, folder, w) if vllm_python else contextlib.nullcontext() as peer:
            for b in w.batch_sizes:
                samples.append(Peaks.measure(w.dtype))
                results.append(_bench_row(llm, peer, folder, w, b, reference))
                _add_utilisation(results[-1], weight_bytes, row_flops, Peaks.fastest(samples))  # so far
                log(_row_text(results[-1]))
        samples.append(Peaks.measure(w.dtype))
    peaks = Peaks.fastest(samples)
    for row in results:  # the figures against the run's final peaks
        _add_utilisation(row, weight_bytes, row_flops, peaks)
    log(f"peaks over the run (fastest of {len(samples)} samples): read {peaks.read_bytes_per_s / 1e9:.1f} GB/s"
        f" (samples {', '.join(f'{p.read_bytes_per_s / 1e9:.1f}' for p in samples)}), matmul "
        f"{peaks.matmul_flops_per_s / 1e9:.0f} GFLOP/s; MBU / FLOP share against them: "
        + ", ".join(f"batch {r['batch_size']} {100 * r['ours']['mbu']:.1f}% / "
                    f"{100 * r['ours']['flop_share']:.1f}%" for r in results))
    report = {
        "workload": dataclasses.asdict(w),
        "device": str(jax.devices()[0].device_kind),
        "platform": jax.devices()[0].platform,
        "read_bandwidth_gb_per_s": peaks.read_bytes_per_s / 1e9,
        "matmul_gflop_per_s": peaks.matmul_flops_per_s / 1e9,
        # Every sample, before each batch size and at the end: the host's rates move.
        "read_bandwidth_samples_gb_per_s": [p.read_bytes_per_s / 1e9 for p in samples],
        "matmul_gflop_samples_per_s": [p.matmul_flops_per_s / 1e9 for p in samples],
        "matmul_flops_per_row": row_flops,
        "weight_bytes": weight_bytes,
        "results": results,
    }
    if output is not None:
        Path(output).write_text(json.dumps(report, indent=2))
    return report


def _row_text(row: dict[str, Any]) -> str:
    o = row["ours"]
    text = (f"batch {row['batch_size']:3d}: ours {o['tokens_per_s']:8.1f} tok/s, "
            f"TTFT {1000 * o['ttft_s']:7.1f} ms, decode {o['decode_ms_per_step']:6.2f} ms/step, "
            f"MBU {100 * o['mbu']:5.1f}%, FLOP share {100 * o['flop_share']:5.1f}%, "
            f"compiles {o['compiles']} (+{o['compiles_after_warmup']})")
    if "reference" in row:
        r = row["reference"]
        text += (f" | transformers {r['tokens_per_s']:8.1f} tok/s, decode "
                 f"{r['decode_ms_per_step']:6.2f} ms/step | ratio {row['ratio']:.2f}")
    if "vllm" in row:
        v = row["vllm"]
        text += (f" | vLLM {v['tokens_per_s']:8.1f} tok/s, decode {v['decode_ms_per_step']:6.2f} ms/step"
                 f" | ours/vLLM {row['ratio_vllm']:.2f}")
    return text
