"""Where W1's time goes inside the compiled programs, from XLA's own per-operation trace.

    PYTHONPATH=. python benchmarks/trace_profile.py [--batch-size 8] [--max-tokens 64] [--keep-hlo]
    PYTHONPATH=. python benchmarks/trace_profile.py --rollout [--operations 20]

`--rollout` profiles W1-R instead (`benchmarks/rollout.py`: 16 prompts of 256 tokens, n=8,
temperature 1, 96 new tokens, the sampled token's logprob, the prefix cache on).

Runs one `generate` of W1 at the batch size under `jax.profiler` with XLA:CPU's per-thunk
trace events on, and splits each program's busy time among the operations that ran: when
two run at once (XLA's CPU executor runs independent operations side by side) each gets
half of that span, so the figures add up to the program's wall time. Operations are named
back to the model through the optimised HLO, dumped to a temporary folder (removed at exit
unless `--keep-hlo`):

    weights     the layers' projections (dots outside the scopes below)
    attention   KV writes and attention (`jax.named_scope("attention")` in `models.llama`)
    lm_head     the projection to the vocabulary (`compute_logits`)
    sampler     `sample_switched`
    open        a multi-step decode's context gather (`multi_step_attention.open_multi_step`)
    other       norms, RoPE, residuals, the loop's own bookkeeping

The multi-step decode's figures are per decode step; the general step's add up its calls. Unlike
`decode_profile.py`, which times pieces jitted alone, this measures them inside the
programs the engine runs, with their neighbours.
"""

from __future__ import annotations

import atexit
import os
import shutil
import sys
import tempfile

_DUMP = tempfile.mkdtemp(prefix="w1_hlo_")
if "--keep-hlo" not in sys.argv:  # read here: the dump folder must be known before jax starts
    atexit.register(shutil.rmtree, _DUMP, ignore_errors=True)
# Read by XLA when the backend starts: set before jax is imported.
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_cpu_enable_xprof_traceme=true"
                           f" --xla_dump_to={_DUMP} --xla_dump_hlo_as_text").strip()

import argparse  # noqa: E402
import collections  # noqa: E402
import glob  # noqa: E402
import gzip  # noqa: E402
import json  # noqa: E402
import re  # noqa: E402
from pathlib import Path  # noqa: E402

import jax  # noqa: E402

from benchmarks.bench import Workload  # noqa: E402
from benchmarks.rollout import Rollout  # noqa: E402
from runner.formats.bridge import save_pretrained  # noqa: E402
from runner.llm import LLM  # noqa: E402
from runner.device.loader import dummy_params  # noqa: E402
from runner.sampling_params import SamplingParams  # noqa: E402
from state.batch import cdiv  # noqa: E402

PROGRAMS = {"jit__multi_step": "multi-step decode", "jit__general_step": "general step"}


def hlo_instructions(module: str) -> dict[str, str]:
    """Instruction name -> its line in the module's optimised HLO, a fusion's line followed
    by its body's (every compilation of the module: the trace names the module, not which
    of its programs ran)."""
    lines: dict[str, str] = {}
    bodies: dict[str, list[str]] = {}
    for path in sorted(glob.glob(f"{_DUMP}/*.{module}.cpu_after_optimizations.txt")):
        body: list[str] | None = None
        for text in Path(path).read_text().splitlines():
            head = re.match(r"^(?:ENTRY )?%?([\w.\-]+) .*\{$", text)
            if head:
                body = bodies.setdefault(head.group(1), [])
            elif text.startswith("}"):
                body = None
            else:
                m = re.match(r"^\s*(?:ROOT )?%([\w.\-]+) = (.*)$", text)
                if m:
                    lines.setdefault(m.group(1), m.group(2))
                    if body is not None:
                        body.append(m.group(2))
    for name, line in lines.items():
        called = re.search(r"calls=%([\w.\-]+)", line)
        if called and " fusion(" in line:
            lines[name] = "\n".join([line] + bodies.get(called.group(1), []))
    return lines


def category(line: str, vocab_size: int) -> str:
    """The stage an operation belongs to, by the named scopes on its op_names (the model and
    sampler name theirs with `jax.named_scope`); dots outside them are the layers' weights.
    A fusion counts by its dot, if it holds one (XLA fuses norms into the projections)."""
    dots = [d for d in line.split("\n") if " dot(" in d]
    named = dots[0] if dots else line
    op = re.search(r'op_name="([^"]*)"', named)
    op = op.group(1) if op else ""
    for scope, name in (("open_multi_step", "open"), ("attention", "attention"), ("lm_head", "lm_head"),
                        ("sampler", "sampler")):
        if f"/{scope}/" in op:
            return name
    if dots and not op and re.match(rf"\w+\[\d+,{vocab_size}\]", named.split(" ")[0]):
        return "lm_head"  # XLA drops the metadata of some one-row dots: the shape names it
    return "weights" if dots else "other"


def attribute(events: list[dict], lines: dict[str, str], vocab_size: int,
              by_operation: bool = False) -> dict[str, float]:
    """Microseconds per category, or per operation (`category: name`) with `by_operation`;
    overlapping operations share their span equally."""
    spans = []
    for e in events:
        line = lines.get(e["name"], "")
        if " while(" in line or " conditional(" in line:
            continue  # containers: their bodies' operations are events of their own
        key = category(line, vocab_size)
        spans.append((e["ts"], e["ts"] + e["dur"], f"{key}: {e['name']}" if by_operation else key))
    edges = sorted({t for a, b, _ in spans for t in (a, b)})
    spans.sort()
    share: dict[str, float] = collections.defaultdict(float)
    active: list[tuple[float, float, str]] = []
    nxt = 0
    for t0, t1 in zip(edges, edges[1:]):
        while nxt < len(spans) and spans[nxt][0] <= t0:
            active.append(spans[nxt])
            nxt += 1
        active = [s for s in active if s[1] > t0]
        for s in active:
            share[s[2]] += (t1 - t0) / len(active)
    return share


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=Workload.max_tokens)
    parser.add_argument("--keep-hlo", action="store_true", help="keep the dumped HLO and print where it is")
    parser.add_argument("--rollout", action="store_true", help="profile W1-R (benchmarks/rollout.py) instead")
    parser.add_argument("--operations", type=int, default=0, metavar="N",
                        help="also list each program's N costliest operations, with their optimised HLO")
    args = parser.parse_args()
    w = Workload(max_tokens=args.max_tokens)
    cfg = w.model_config()
    if args.rollout:
        r = Rollout()
        max_len, rows, max_tokens = r.prompt_len + r.max_tokens, r.num_prompts * r.n, r.max_tokens
        prompts = [{"prompt_token_ids": p} for p in r.prompts()]
        params = SamplingParams(n=r.n, temperature=1.0, max_tokens=max_tokens, ignore_eos=True, logprobs=0)
        title = f"W1-R: {r.num_prompts} prompts x n={r.n}, {max_tokens} new tokens"
    else:
        max_len, rows, max_tokens = w.prompt_len + w.max_tokens, args.batch_size, w.max_tokens
        prompts = [{"prompt_token_ids": p} for p in w.prompts(args.batch_size)]
        params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
        title = f"W1 at batch {args.batch_size}, {max_tokens} new tokens"
    with tempfile.TemporaryDirectory() as tmp:
        folder = save_pretrained(Path(tmp) / "w1", dummy_params(cfg, w.seed), cfg)
        llm = LLM(str(folder), dtype=w.dtype, max_model_len=max_len, enable_prefix_caching=args.rollout,
                  num_kv_blocks=cdiv(max_len, 16) * rows + 1, max_num_seqs=rows)
        llm.generate(prompts, params, use_tqdm=False)  # compiles
        llm.reset_prefix_cache()  # an RL step brings new prompts
        trace = Path(tmp) / "trace"
        jax.profiler.start_trace(str(trace), create_perfetto_trace=True)
        llm.generate(prompts, params, use_tqdm=False)
        jax.profiler.stop_trace()
        raw = json.load(gzip.open(next(trace.rglob("*.trace.json.gz"))))
    events = raw["traceEvents"] if isinstance(raw, dict) else raw
    steps = max_tokens - 1  # the first token comes from the general step
    print(title + (f" (HLO in {_DUMP})" if args.keep_hlo else ""))
    for module, title in PROGRAMS.items():
        mine = [e for e in events if e.get("ph") == "X" and (e.get("args") or {}).get("hlo_module") == module]
        if not mine:
            continue
        lines = hlo_instructions(module)
        share = attribute(mine, lines, cfg.vocab_size)
        per, unit = (steps, "per decode step") if module == "jit__multi_step" else (1, "all calls")
        total = sum(share.values()) / per / 1000
        parts = ", ".join(f"{k} {v / per / 1000:.2f}" for k, v in sorted(share.items(), key=lambda kv: -kv[1]))
        print(f"{title}: {total:.2f} ms {unit}: {parts}")
        if args.operations:
            ops = attribute(mine, lines, cfg.vocab_size, by_operation=True)
            for key, us in sorted(ops.items(), key=lambda kv: -kv[1])[:args.operations]:
                hlo = lines.get(key.split(": ", 1)[1], "").split("\n")[0]
                print(f"  {us / per / 1000:8.2f} ms  {key}  {hlo[:160]}")


if __name__ == "__main__":
    sys.exit(main())
