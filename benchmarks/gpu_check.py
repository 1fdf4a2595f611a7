"""One prepared check of the GPU path: environment, parity, lifecycle and benchmark.

    PYTHONPATH=. python benchmarks/gpu_check.py OUT_DIR [--smoke]

Writes OUT_DIR/gpu_check.json (every section's status, figures, checks and error text) and
OUT_DIR/gpu_check.log. A failing section never stops the others, and each section has a
time box, so one run answers every question within about 8 minutes on one H100 or H200.
`--smoke` runs the same code on the CPU with tiny shapes, in well under a minute.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script from anywhere: the repo's packages first
    sys.path.insert(0, str(REPO))

MEMORY_ENV = ("XLA_PYTHON_CLIENT_PREALLOCATE", "XLA_PYTHON_CLIENT_MEM_FRACTION", "XLA_PYTHON_CLIENT_ALLOCATOR")


def _configure_process(smoke: bool) -> dict[str, str | None]:
    """Environment as given, then the defaults this check needs, before JAX is imported.

    Without preallocation JAX holds only what it uses, so torch fits beside it on the same
    GPU and memory freed by sleep shows in the driver's figures.
    """
    given = {name: os.environ.get(name) for name in MEMORY_ENV}
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    if smoke:
        os.environ["JAX_PLATFORMS"] = "cpu"
    return given


@dataclass(frozen=True)
class Sizes:
    """Shapes of one run: the real ones, or tiny ones for `--smoke`."""
    parity_prompts: tuple[int, ...]
    parity_new_tokens: int
    bench_model: dict[str, Any]
    batch_sizes: tuple[int, ...]
    prompt_len: int
    new_tokens: int
    max_num_batched_tokens: int
    bandwidth_bytes: int
    total_budget_s: float
    sync_repeats: int
    section_budget_s: dict[str, float] = field(default_factory=dict)


QWEN3_06B = dict(vocab_size=151936, hidden_size=1024, intermediate_size=3072, num_hidden_layers=28,
                 num_attention_heads=16, num_key_value_heads=8, head_dim=128)
TINY_QWEN3 = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=16)

FULL = Sizes(parity_prompts=(7, 23, 40), parity_new_tokens=12, bench_model=QWEN3_06B,
             batch_sizes=(1, 16, 64, 256), prompt_len=512, new_tokens=128,
             max_num_batched_tokens=4096, bandwidth_bytes=2 << 30, total_budget_s=480, sync_repeats=5,
             section_budget_s={"parity": 90, "lifecycle": 80, "weight_sync": 60, "benchmark": 250})
SMOKE = Sizes(parity_prompts=(5, 11), parity_new_tokens=4, bench_model=TINY_QWEN3,
              batch_sizes=(1, 2), prompt_len=16, new_tokens=8, max_num_batched_tokens=64,
              # The CPU smoke run checks that every section runs through: its budgets only
              # stop a hang, with room for a host that is busy with other work.
              bandwidth_bytes=16 << 20, total_budget_s=600, sync_repeats=1,
              section_budget_s={"parity": 180, "lifecycle": 180, "weight_sync": 60, "benchmark": 180})
BLOCK_SIZE = 16  # the Pallas decode kernel's Triton tiles need >= 16 slots per block


class Log:
    """Lines to the log file and to stdout, each stamped with seconds since the start."""

    def __init__(self, path: Path) -> None:
        self._file = path.open("w")
        self._start = time.perf_counter()

    def __call__(self, text: str) -> None:
        line = f"[{time.perf_counter() - self._start:7.1f}s] {text}"
        print(line, flush=True)
        self._file.write(line + "\n")
        self._file.flush()


@dataclass
class Section:
    """What one section reports: figures, named checks, and the error that stopped it."""
    figures: dict[str, Any] = field(default_factory=dict)
    checks: dict[str, bool] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)
    deadline: float = float("inf")

    def check(self, name: str, ok: bool) -> bool:
        self.checks[name] = bool(ok)
        return bool(ok)

    def out_of_time(self) -> bool:
        return time.perf_counter() > self.deadline


def run_section(name: str, fn: Callable[[Section], None], budget_s: float, deadline: float,
                log: Log) -> dict[str, Any]:
    """Run one section until its own budget or the run's deadline, whichever comes first,
    recording its figures even when it raises part-way."""
    section = Section(deadline=min(time.perf_counter() + budget_s, deadline))
    start = time.perf_counter()
    error = None
    log(f"== {name}")
    try:
        fn(section)
    except Exception:  # noqa: BLE001 - recorded; the next section still runs
        error = traceback.format_exc()
        log(error)
    passed = error is None and all(section.checks.values())
    result = {"status": "passed" if passed else "failed", "elapsed_s": time.perf_counter() - start,
              "budget_s": budget_s, "figures": section.figures, "checks": section.checks,
              "skipped": section.skipped, "error": error}
    log(f"-- {name}: {result['status']} in {result['elapsed_s']:.1f}s; checks {section.checks}")
    return result


# -- device memory --------------------------------------------------------------------------

def driver_memory_mib() -> dict[str, float] | None:
    """Used and free memory of GPU 0 as the driver reports it (MiB), if a GPU is there."""
    if shutil.which("nvidia-smi"):
        try:
            out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used,memory.free",
                                  "--format=csv,noheader,nounits"], capture_output=True, text=True,
                                 timeout=20, check=True).stdout.splitlines()[0]
            used, free = (float(x) for x in out.split(","))
            return {"used_mib": used, "free_mib": free, "source": "nvidia-smi"}
        except (OSError, subprocess.SubprocessError, ValueError, IndexError):
            pass
    try:
        import torch
        if torch.cuda.is_available():
            free, total = torch.cuda.mem_get_info()
            return {"used_mib": (total - free) / 2**20, "free_mib": free / 2**20, "source": "torch"}
    except ImportError:
        pass
    return None


def memory_figures() -> dict[str, Any]:
    """In-process (live arrays, allocator) and driver-reported memory, now."""
    import jax
    stats = jax.devices()[0].memory_stats() or {}
    return {"live_array_bytes": sum(x.nbytes for x in jax.live_arrays()),
            "bytes_in_use": stats.get("bytes_in_use"), "driver": driver_memory_mib()}


# -- a: environment -------------------------------------------------------------------------

def environment(section: Section, given_env: dict[str, str | None]) -> None:
    import importlib.metadata as md

    import jax
    versions = {}
    for package in ("jax", "jaxlib", "flax", "orbax-checkpoint", "optax", "torch", "transformers"):
        try:
            versions[package] = md.version(package)
        except md.PackageNotFoundError:
            versions[package] = None
    devices = jax.devices()
    section.figures.update(
        python=sys.version.split()[0], versions=versions, jax_version=jax.__version__,
        backend=jax.default_backend(),
        devices=[{"kind": d.device_kind, "platform": d.platform, "id": d.id} for d in devices],
        memory_stats=devices[0].memory_stats(), env_given=given_env,
        env_effective={name: os.environ.get(name) for name in MEMORY_ENV},
        driver_memory=driver_memory_mib())
    section.check("has_devices", len(devices) > 0)


# -- b: parity against transformers --------------------------------------------------------

def torch_device() -> str:
    import torch
    return "cuda" if torch.cuda.is_available() else "cpu"


def _hf_tiny(family: str, folder: Path) -> Any:
    """A tiny random HF model with head_dim 32: sizes the Pallas decode kernel can tile."""
    from tests import hf_models
    model = hf_models.build(family, seed=1, head_dim=32, num_attention_heads=4, num_key_value_heads=2,
                            tie_word_embeddings=family == "qwen3")
    model.save_pretrained(folder, safe_serialization=True)
    return model


def torch_greedy(model: Any, prompts: list[list[int]], new_tokens: int) -> tuple[list[list[int]], list[list[float]]]:
    """Greedy tokens one prompt at a time, and the log-probability of each chosen token."""
    import torch
    tokens, logprobs = [], []
    device = next(model.parameters()).device
    for prompt in prompts:
        ids = torch.tensor([prompt], device=device)
        out = []
        with torch.no_grad():
            for _ in range(new_tokens):
                lp = torch.log_softmax(model(ids).logits[0, -1].float(), dim=-1)
                token = int(lp.argmax())
                out.append((token, float(lp[token])))
                ids = torch.cat([ids, torch.tensor([[token]], device=device)], dim=1)
        tokens.append([t for t, _ in out])
        logprobs.append([lp for _, lp in out])
    return tokens, logprobs


def torch_logprobs_of(model: Any, prompts: list[list[int]], outputs: list[list[int]]) -> list[list[float]]:
    """Log-probabilities torch gives `outputs` after each prompt (teacher forcing)."""
    import torch
    device = next(model.parameters()).device
    result = []
    with torch.no_grad():
        for prompt, out in zip(prompts, outputs):
            ids = torch.tensor([prompt + out], device=device)
            lp = torch.log_softmax(model(ids).logits[0].float(), dim=-1)
            rows = lp[len(prompt) - 1:len(prompt) - 1 + len(out)]
            result.append([float(rows[i, t]) for i, t in enumerate(out)])
    return result


def ours_greedy(folder: Path, dtype: str, backend: str, prompts: list[list[int]],
                new_tokens: int) -> tuple[list[list[int]], list[list[float]]]:
    from runner import LLM, SamplingParams
    llm = LLM(str(folder), dtype=dtype, attention_backend=backend, block_size=BLOCK_SIZE,
              num_kv_blocks=64, max_model_len=128, max_num_seqs=8, enable_prefix_caching=False)
    params = SamplingParams(temperature=0, max_tokens=new_tokens, ignore_eos=True, logprobs=0)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    tokens = [o.outputs[0].token_ids for o in outs]
    logprobs = [[lp[t].logprob for lp, t in zip(o.outputs[0].logprobs, o.outputs[0].token_ids)] for o in outs]
    return tokens, logprobs


def _max_diff(a: list[list[float]], b: list[list[float]]) -> float:
    return max(abs(x - y) for ra, rb in zip(a, b) for x, y in zip(ra, rb))


def _agreement(a: list[list[int]], b: list[list[int]]) -> float:
    pairs = [(x, y) for ra, rb in zip(a, b) for x, y in zip(ra, rb)]
    return sum(x == y for x, y in pairs) / len(pairs)


def parity(section: Section, sizes: Sizes) -> None:
    import jax
    import numpy as np
    import torch
    rng = np.random.default_rng(0)
    prompts = [rng.integers(3, 97, n).tolist() for n in sizes.parity_prompts]
    device = torch_device()
    section.figures["torch_device"] = device
    with tempfile.TemporaryDirectory() as tmp:
        for family in ("qwen3", "llama"):
            if section.out_of_time():
                section.skipped.append(family)
                continue
            folder = Path(tmp) / family
            model = _hf_tiny(family, folder).to(device)
            ref_tokens, ref_lps = torch_greedy(model, prompts, sizes.parity_new_tokens)
            figures: dict[str, Any] = {}
            # float32 on both sides at full precision: TF32 matrix products (JAX's default on
            # GPUs) would be a 1e-3 effect of their own.
            by_backend = {}
            with jax.default_matmul_precision("highest"):
                for backend in ("reference", "pallas"):
                    tokens, lps = ours_greedy(folder, "float32", backend, prompts, sizes.parity_new_tokens)
                    by_backend[backend] = (tokens, lps)
                    diff = _max_diff(lps, ref_lps)
                    figures[f"float32_{backend}"] = {"greedy_identical": tokens == ref_tokens,
                                                     "max_logprob_diff": diff}
                    section.check(f"{family}_float32_{backend}_greedy", tokens == ref_tokens)
                    section.check(f"{family}_float32_{backend}_logprobs_1e-3", diff <= 1e-3)
            (ref_t, ref_l), (pal_t, pal_l) = by_backend["reference"], by_backend["pallas"]
            figures["float32_pallas_vs_reference_logprob_diff"] = _max_diff(pal_l, ref_l)
            section.check(f"{family}_float32_pallas_equals_reference", pal_t == ref_t)
            bf16 = model.to(torch.bfloat16)
            tokens, lps = ours_greedy(folder, "bfloat16", "pallas", prompts, sizes.parity_new_tokens)
            bf16_tokens, _ = torch_greedy(bf16, prompts, sizes.parity_new_tokens)
            # Compared on our tokens (teacher-forced in torch), so one early divergence does
            # not make every later position incomparable.
            figures["bfloat16_pallas"] = {
                "greedy_agreement": _agreement(tokens, bf16_tokens),
                "max_logprob_diff": _max_diff(lps, torch_logprobs_of(bf16, prompts, tokens))}
            section.figures[family] = figures
            del model, bf16


# -- c: lifecycle ---------------------------------------------------------------------------

def bench_config(sizes: Sizes, dtype: str = "bfloat16") -> Any:
    from state.config import ModelConfig
    return ModelConfig(architecture="Qwen3ForCausalLM", tie_word_embeddings=True, dtype=dtype,
                       max_position_embeddings=max(4096, sizes.prompt_len + sizes.new_tokens + 1),
                       **sizes.bench_model)


def _greedy(llm: Any, prompts: list[list[int]], new_tokens: int) -> list[list[int]]:
    from runner import SamplingParams
    params = SamplingParams(temperature=0, max_tokens=new_tokens, ignore_eos=True)
    return [o.outputs[0].token_ids for o in llm.generate([{"prompt_token_ids": p} for p in prompts],
                                                         params, use_tqdm=False)]


def reload_equals_fresh_load(section: Section, sizes: Sizes) -> None:
    """Dummy load, switch to the checkpoint, reload: the same tokens as a fresh load, and
    nothing compiled by the reload or the generation after it."""
    from runner import LLM
    from runner.device.compilation import CompileCounter
    prompts = [[5, 6, 7, 8, 9], list(range(10, 31))]
    kwargs = dict(dtype="float32", block_size=BLOCK_SIZE, num_kv_blocks=32, max_model_len=64)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "qwen3"
        _hf_tiny("qwen3", folder)
        llm = LLM(str(folder), load_format="dummy", **kwargs)
        dummy_tokens = _greedy(llm, prompts, sizes.parity_new_tokens)  # compiles the programs
        with CompileCounter() as compiles:
            llm.update_config({"load_config": {"load_format": "auto"}})
            llm.reload_weights()
            reloaded = _greedy(llm, prompts, sizes.parity_new_tokens)
        fresh = _greedy(LLM(str(folder), **kwargs), prompts, sizes.parity_new_tokens)
    section.figures["reload"] = {"compiles_after_reload": compiles.count,
                                 "dummy_differs": dummy_tokens != fresh}
    section.check("reload_equals_fresh_load", reloaded == fresh)
    section.check("no_compiles_after_reload", compiles.count == 0)


def sleep_memory_and_swap(section: Section, sizes: Sizes) -> None:
    """Memory before and after each sleep level, and the time to swap in a host tree."""
    import jax
    import numpy as np
    from runner import LLM
    from runner.device.compilation import CompileCounter
    from state.params import param_bytes
    prompts = [list(range(1, 17))]
    llm = LLM(model_config=bench_config(sizes), load_format="dummy", block_size=BLOCK_SIZE,
              num_kv_blocks=256, max_model_len=512, max_num_seqs=4, enable_prefix_caching=False)
    before = _greedy(llm, prompts, 4)
    mem: dict[str, Any] = {"weight_bytes": param_bytes(llm.runner.params), "awake": memory_figures()}
    host_tree = jax.tree.map(np.asarray, llm.runner.params)
    for level in (1, 2):
        llm.sleep(level)
        mem[f"sleep{level}"] = memory_figures()
        llm.wake_up()
        if level == 2:  # nothing came back: the weights need a reload
            start = time.perf_counter()
            llm.reload_weights(params=host_tree)
            jax.block_until_ready(llm.runner.params)
            mem["swap_s"] = time.perf_counter() - start
        mem[f"woken{level}"] = memory_figures()
    with CompileCounter() as compiles:
        start = time.perf_counter()
        llm.reload_weights(params=host_tree)
        jax.block_until_ready(llm.runner.params)
        mem["swap_awake_s"] = time.perf_counter() - start
        after = _greedy(llm, prompts, 4)
    mem["swap_gb_per_s"] = mem["weight_bytes"] / mem["swap_awake_s"] / 1e9
    mem["compiles_after_swap"] = compiles.count
    section.figures["memory"] = mem
    section.check("tokens_after_sleep_and_swap", after == before)
    section.check("no_compiles_after_swap", compiles.count == 0)
    live = {k: mem[k]["live_array_bytes"] for k in ("awake", "sleep1", "sleep2")}
    # Asleep, the weights and the KV cache are gone from the device at either level.
    section.check("sleep_releases_live_arrays", max(live["sleep1"], live["sleep2"]) < 0.05 * live["awake"])


def lifecycle(section: Section, sizes: Sizes) -> None:
    reload_equals_fresh_load(section, sizes)
    if section.out_of_time():
        section.skipped.append("sleep_memory_and_swap")
        return
    sleep_memory_and_swap(section, sizes)


# -- d: weight sync -------------------------------------------------------------------------

def weight_sync(section: Section, sizes: Sizes) -> None:
    """`python -m benchmarks.weight_sync`'s figures on the benchmark model (Qwen3-0.6B's shape,
    random weights): each against a copy in the same run, and the streamed update's peak
    from the allocator as well as from the live arrays."""
    from benchmarks.weight_sync import TARGETS, measure
    from benchmarks.weight_sync import table as sync_table
    report = measure("bench", bench_config(sizes), repeats=sizes.sync_repeats)
    section.figures["weight_sync"] = report
    section.figures["table"] = sync_table([report]).splitlines()
    peak = report["streamed peak"]
    section.check("streamed_peak_within_bound", peak["within_bound"])
    if "allocator" in peak:
        section.check("allocator_peak_within_bound", peak["allocator"]["within_bound"])
    # Recorded, not checked: ratios on a busy host are noise, and the GPU run is one sample.
    section.figures["targets_met"] = {label: report[label]["ratio"] <= limit for label, limit in TARGETS.items()}


# -- e: benchmark ---------------------------------------------------------------------------

def measure_bandwidth(nbytes: int) -> float:
    """Device bytes per second read plus written by a jitted scale-and-copy (median of 5)."""
    import jax
    import jax.numpy as jnp
    x = jax.random.normal(jax.random.key(0), (nbytes // 4,), jnp.float32)
    copy = jax.jit(lambda a: a * 1.5)
    copy(x).block_until_ready()
    times = []
    for _ in range(5):
        start = time.perf_counter()
        copy(x).block_until_ready()
        times.append(time.perf_counter() - start)
    return 2 * nbytes / statistics.median(times)


def _timed(fn: Callable[[], Any]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _bench_figures(batch: int, sizes: Sizes, t_first: float, t_full: float, step_bytes: float,
                   weight_bytes: int, bandwidth: float) -> dict[str, float]:
    steps = sizes.new_tokens
    step_s = (t_full - t_first) / steps
    return {"tokens_per_s": batch * (steps + 1) / t_full, "time_first_s": t_first, "time_full_s": t_full,
            "decode_ms_per_step": 1000 * step_s, "decode_tokens_per_s": batch / step_s,
            "mbu": step_bytes / step_s / bandwidth, "mbu_weights_only": weight_bytes / step_s / bandwidth}


def _decode_step_bytes(sizes: Sizes, batch: int, weight_bytes: int) -> float:
    """Bytes one decode step must read: every weight once, and each sequence's K and V at
    its average context length over the decode."""
    m = sizes.bench_model
    per_token = 2 * m["num_hidden_layers"] * m["num_key_value_heads"] * m["head_dim"] * 2  # bf16
    return weight_bytes + batch * (sizes.prompt_len + sizes.new_tokens / 2) * per_token


def bench_ours(llm: Any, sizes: Sizes, batch: int, prompts: list[list[int]], weight_bytes: int,
               bandwidth: float) -> dict[str, Any]:
    from runner import SamplingParams
    from runner.device.compilation import CompileCounter
    reqs = [{"prompt_token_ids": p} for p in prompts]
    first = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True)
    full = SamplingParams(temperature=0, max_tokens=sizes.new_tokens + 1, ignore_eos=True)
    with CompileCounter() as compiles:
        warm = _timed(lambda: llm.generate(reqs, full, use_tqdm=False))
        llm.generate(reqs, first, use_tqdm=False)
    with CompileCounter() as timed_compiles:
        t_first = _timed(lambda: llm.generate(reqs, first, use_tqdm=False))
        t_full = _timed(lambda: llm.generate(reqs, full, use_tqdm=False))
    return {**_bench_figures(batch, sizes, t_first, t_full, _decode_step_bytes(sizes, batch, weight_bytes),
                             weight_bytes, bandwidth),
            "warmup_s": warm, "compiles": compiles.count, "compiles_while_timed": timed_compiles.count}


def torch_bench_model(sizes: Sizes) -> Any:
    import torch
    import transformers
    m = sizes.bench_model
    config = transformers.Qwen3Config(
        vocab_size=m["vocab_size"], hidden_size=m["hidden_size"], intermediate_size=m["intermediate_size"],
        num_hidden_layers=m["num_hidden_layers"], num_attention_heads=m["num_attention_heads"],
        num_key_value_heads=m["num_key_value_heads"], head_dim=m["head_dim"], tie_word_embeddings=True,
        max_position_embeddings=4096, attn_implementation="sdpa")
    with torch.device(torch_device()):
        model = transformers.Qwen3ForCausalLM(config).to(torch.bfloat16).eval()
    model.generation_config.eos_token_id = None  # ignore EOS, as ours does
    return model


def bench_torch(model: Any, sizes: Sizes, batch: int, prompts: list[list[int]], weight_bytes: int,
                bandwidth: float) -> dict[str, Any]:
    import torch
    device = next(model.parameters()).device
    ids = torch.tensor(prompts, device=device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    cache = {"cache_implementation": "static"}

    def run(n: int) -> None:
        with torch.no_grad():
            model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=n,
                           min_new_tokens=n, pad_token_id=0, **cache)
        sync()

    try:
        run(2)
    except Exception:  # noqa: BLE001 - a static cache this version refuses: the default one
        cache = {}
        run(2)
    warm = _timed(lambda: run(sizes.new_tokens + 1))
    t_first = _timed(lambda: run(1))
    t_full = _timed(lambda: run(sizes.new_tokens + 1))
    return {**_bench_figures(batch, sizes, t_first, t_full, _decode_step_bytes(sizes, batch, weight_bytes),
                             weight_bytes, bandwidth),
            "warmup_s": warm, "cache": cache.get("cache_implementation", "dynamic")}


def benchmark(section: Section, sizes: Sizes) -> None:
    import numpy as np
    from runner import LLM
    from state.params import param_bytes
    bandwidth = measure_bandwidth(sizes.bandwidth_bytes)
    section.figures["bandwidth_gb_per_s"] = bandwidth / 1e9
    max_len = sizes.prompt_len + sizes.new_tokens + 1
    largest = max(sizes.batch_sizes)
    llm = LLM(model_config=bench_config(sizes), load_format="dummy", block_size=BLOCK_SIZE,
              num_kv_blocks=largest * -(-max_len // BLOCK_SIZE) + 1, max_model_len=max_len,
              max_num_seqs=largest, max_num_batched_tokens=sizes.max_num_batched_tokens,
              enable_prefix_caching=False)
    weight_bytes = param_bytes(llm.runner.params)
    section.figures.update(weight_bytes=weight_bytes, attention_backend=llm.config.cache_config.attention_backend)
    torch_model = None
    rows = []
    last_row_s = 0.0
    for batch in sizes.batch_sizes:
        # A larger batch takes at least as long as the last one: skip what cannot finish.
        if section.out_of_time() or time.perf_counter() + 2 * last_row_s > section.deadline:
            section.skipped.append(f"batch {batch}")
            continue
        row_start = time.perf_counter()
        prompts = np.random.default_rng(batch).integers(0, sizes.bench_model["vocab_size"],
                                                        (batch, sizes.prompt_len)).tolist()
        row: dict[str, Any] = {"batch_size": batch,
                               "ours": bench_ours(llm, sizes, batch, prompts, weight_bytes, bandwidth)}
        section.check(f"batch{batch}_no_compiles_while_timed", row["ours"]["compiles_while_timed"] == 0)
        rows.append(row)
        section.figures["results"] = rows
        if section.out_of_time():
            section.skipped.append(f"transformers batch {batch}")
            continue
        torch_model = torch_model or torch_bench_model(sizes)
        row["transformers"] = bench_torch(torch_model, sizes, batch, prompts, weight_bytes, bandwidth)
        row["ratio"] = row["ours"]["tokens_per_s"] / row["transformers"]["tokens_per_s"]
        last_row_s = time.perf_counter() - row_start


# -- the run --------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU")
    args = parser.parse_args(argv)
    given_env = _configure_process(args.smoke)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    log = Log(args.out_dir / "gpu_check.log")
    sizes = SMOKE if args.smoke else FULL
    report: dict[str, Any] = {"smoke": args.smoke, "sizes": asdict(sizes), "sections": {}}
    sections: list[tuple[str, Callable[[Section], None]]] = [
        ("environment", lambda s: environment(s, given_env)),
        ("parity", lambda s: parity(s, sizes)),
        ("lifecycle", lambda s: lifecycle(s, sizes)),
        ("weight_sync", lambda s: weight_sync(s, sizes)),
        ("benchmark", lambda s: benchmark(s, sizes)),
    ]
    start = time.perf_counter()
    deadline = start + sizes.total_budget_s
    for name, fn in sections:
        report["sections"][name] = run_section(name, fn, sizes.section_budget_s.get(name, 60), deadline, log)
        report["elapsed_s"] = time.perf_counter() - start
        # Written after every section: a run cut short still leaves what it measured.
        (args.out_dir / "gpu_check.json").write_text(json.dumps(report, indent=2, default=str))
    log(f"done in {report['elapsed_s']:.1f}s: " + ", ".join(
        f"{n} {r['status']}" for n, r in report["sections"].items()))
    _print_table(report, log)
    return 0


def _print_table(report: dict[str, Any], log: Log) -> None:
    """The benchmark's rows last, where a short output tail still shows them."""
    for row in report["sections"]["benchmark"]["figures"].get("results", []):
        o, t = row["ours"], row.get("transformers")
        text = (f"batch {row['batch_size']:4d}: ours {o['tokens_per_s']:9.1f} tok/s, decode "
                f"{o['decode_ms_per_step']:7.2f} ms/step, MBU {100 * o['mbu']:5.1f}%")
        if t:
            text += f" | transformers {t['tokens_per_s']:9.1f} tok/s ({t['cache']}) | ratio {row['ratio']:.2f}"
        log(text)


if __name__ == "__main__":
    sys.exit(main())
