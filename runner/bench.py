"""Benchmark: workload W1 on this runner and, in the same run, on Hugging Face transformers.

W1 is fixed so results compare over time: a Qwen3-architecture model (vocab 32000, hidden
512, intermediate 1536, 8 layers, 8 query heads, 4 KV heads, head_dim 64, tied embeddings,
float32, seeded random weights); per batch size, prompts of 128 seeded random token ids,
64 new tokens, greedy, EOS ignored; one warm-up, then the median of `repeats` timed calls.

The figure to track is the ratio ours / reference per batch size; absolute times on a
shared machine are noise. Model bandwidth utilisation (MBU) divides the weight bytes read
per decode step by the step time and by the read bandwidth measured in the same run.
"""

from __future__ import annotations

import dataclasses
import json
import resource
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from runner.bridge import save_pretrained
from runner.compilation import CompileCounter
from runner.llm import LLM
from runner.loader import dummy_params
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


def _median_time(fn: Callable[[], Any], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure_read_bandwidth(nbytes: int = 256 << 20, repeats: int = 5) -> float:
    """Bytes per second the device reads, timed on a jitted sum of a large float32 array."""
    x = jnp.ones(nbytes // 4, jnp.float32)
    total = jax.jit(jnp.sum)
    total(x).block_until_ready()
    return nbytes / _median_time(lambda: total(x).block_until_ready(), repeats)


def _peak_memory_bytes() -> int:
    stats = jax.devices()[0].memory_stats() or {}
    if "peak_bytes_in_use" in stats:
        return int(stats["peak_bytes_in_use"])
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def _figures(batch_size: int, w: Workload, total_s: float, ttft_s: float, weight_bytes: int,
             bandwidth: float) -> dict[str, float]:
    step_s = (total_s - ttft_s) / max(w.max_tokens - 1, 1)
    return {
        "tokens_per_s": batch_size * w.max_tokens / total_s,
        "total_s": total_s,
        "ttft_s": ttft_s,
        "decode_ms_per_step": 1000 * step_s,
        "prefill_tokens_per_s": batch_size * w.prompt_len / ttft_s,
        "mbu": weight_bytes / step_s / bandwidth,
    }


def bench_ours(llm: LLM, w: Workload, batch_size: int, weight_bytes: int,
               bandwidth: float) -> dict[str, float]:
    prompts = [{"prompt_token_ids": p} for p in w.prompts(batch_size)]
    full = SamplingParams(temperature=0, max_tokens=w.max_tokens, ignore_eos=True)
    first = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True)
    with CompileCounter() as compiles:
        start = time.perf_counter()
        llm.generate(prompts, full, use_tqdm=False)
        llm.generate(prompts, first, use_tqdm=False)
        warmup_s = time.perf_counter() - start
    with CompileCounter() as after:
        ttft = _median_time(lambda: llm.generate(prompts, first, use_tqdm=False), w.repeats)
        total = _median_time(lambda: llm.generate(prompts, full, use_tqdm=False), w.repeats)
    return {**_figures(batch_size, w, total, ttft, weight_bytes, bandwidth),
            "compiles": compiles.count, "compiles_after_warmup": after.count, "warmup_s": warmup_s,
            "peak_memory_bytes": _peak_memory_bytes()}


def bench_transformers(folder: Path, w: Workload, batch_size: int, weight_bytes: int,
                       bandwidth: float) -> dict[str, float]:
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
    ttft = _median_time(lambda: run(1), w.repeats)
    total = _median_time(lambda: run(w.max_tokens), w.repeats)
    return _figures(batch_size, w, total, ttft, weight_bytes, bandwidth)


def run(w: Workload = Workload(), model: str | None = None, reference: bool = True,
        output: str | Path | None = None, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run W1 (or `model`'s weights with W1's prompts) and return every figure as a dict."""
    bandwidth = measure_read_bandwidth()
    max_len = w.prompt_len + w.max_tokens
    with tempfile.TemporaryDirectory() as tmp:
        if model is None:
            cfg = w.model_config()
            params = dummy_params(cfg, w.seed)
            folder = save_pretrained(Path(tmp) / "w1", params, cfg)
        else:
            folder = Path(model)
        blocks_per_seq = cdiv(max_len, 16)
        llm = LLM(str(folder), dtype=w.dtype, max_model_len=max_len,
                  num_kv_blocks=blocks_per_seq * max(w.batch_sizes) + 1,
                  max_num_seqs=max(w.batch_sizes), enable_prefix_caching=False)
        weight_bytes = param_bytes(llm.runner.params)
        results = []
        for b in w.batch_sizes:
            row: dict[str, Any] = {"batch_size": b,
                                   "ours": bench_ours(llm, w, b, weight_bytes, bandwidth)}
            if reference:
                row["reference"] = bench_transformers(folder, w, b, weight_bytes, bandwidth)
                row["ratio"] = row["ours"]["tokens_per_s"] / row["reference"]["tokens_per_s"]
            results.append(row)
            log(_row_text(row))
    report = {
        "workload": dataclasses.asdict(w),
        "device": str(jax.devices()[0].device_kind),
        "platform": jax.devices()[0].platform,
        "read_bandwidth_gb_per_s": bandwidth / 1e9,
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
            f"MBU {100 * o['mbu']:5.1f}%, compiles {o['compiles']} (+{o['compiles_after_warmup']})")
    if "reference" in row:
        r = row["reference"]
        text += (f" | transformers {r['tokens_per_s']:8.1f} tok/s, decode "
                 f"{r['decode_ms_per_step']:6.2f} ms/step | ratio {row['ratio']:.2f}")
    return text
