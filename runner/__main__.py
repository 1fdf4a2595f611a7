"""Command line: `python -m runner generate "prompt"`, `python -m runner serve [MODEL]` (an
OpenAI-compatible server, see runner/server) and `bench` (see benchmarks/bench.py).

A user's mistake (a wrong path, a value out of range) ends the run with one line,
`error: <message>` on stderr and exit status 1; `--debug` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import sys
import time


def _generate(args: argparse.Namespace) -> int:
    if args.compilation_cache:
        from runner.device.compilation import enable_persistent_cache
        enable_persistent_cache(args.compilation_cache)
    from runner import LLM, SamplingParams

    start = time.perf_counter()
    # Before the model loads: a bad sampling value is refused without the wait.
    params = SamplingParams(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                            seed=args.seed, max_tokens=args.max_tokens)
    llm = LLM(args.model, load_format=args.load_format, dtype=args.dtype, seed=args.seed,
              max_model_len=args.max_model_len, num_kv_blocks=args.num_kv_blocks)
    prompts = args.prompts or ["def fibonacci(n):"]
    outputs = llm.generate(prompts, params, use_tqdm=False)
    for prompt, out in zip(prompts, outputs):
        print(f"{prompt}{out.outputs[0].text}")
        print("-" * 40)
    print(f"[{sum(len(o.outputs[0].token_ids) for o in outputs)} tokens in "
          f"{time.perf_counter() - start:.1f}s including load and compilation]", file=sys.stderr)
    return 0


# Workload fields the bench command sets; unset ones keep W1's values (`benchmarks.bench.Workload`).
WORKLOAD_FLAGS = ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                  "num_kv_heads", "head_dim", "dtype", "prompt_len", "max_tokens", "batch_sizes",
                  "repeats")


def _bench(args: argparse.Namespace) -> int:
    from benchmarks import bench  # here, not at the top: `generate` never loads benchmark code

    if args.workload == "rollout":
        from benchmarks import rollout
        rollout.run(vllm_python=args.vllm_python, output=args.output)
        return 0
    given = {name: getattr(args, name) for name in WORKLOAD_FLAGS if getattr(args, name) is not None}
    if "batch_sizes" in given:
        given["batch_sizes"] = tuple(given["batch_sizes"])
    bench.run(bench.Workload(**given), model=args.model, reference=not args.no_reference,
              output=args.output, vllm_python=args.vllm_python, decode_steps=args.decode_steps)
    return 0


# Engine flags of `serve`, as `vllm serve` spells them: (flag, type, help). Unset ones keep
# the engine's defaults (`runner.engine_args.EngineArgs`).
SERVE_ENGINE_FLAGS = (
    ("--max-model-len", int, "context length (default: the model's)"),
    ("--dtype", str, "auto | float32 | bfloat16 | float16"),
    ("--max-num-seqs", int, "sequences in the running batch"),
    ("--block-size", int, "tokens per KV block"),
    ("--num-kv-blocks", int, "KV blocks in the cache (default: from the memory budget)"),
    ("--max-num-batched-tokens", int, "tokens per step"),
    ("--decode-steps", int, "decode steps per device call (0: auto)"),
    ("--kv-cache-dtype", str, "auto | fp8 | ..."),
    ("--load-format", str, "auto | safetensors | dummy | orbax"),
    ("--seed", int, "seed of the dummy weights and of unseeded requests"),
    ("--gpu-memory-utilization", float, "KV budget as a fraction of the free device memory"),
    ("--tensor-parallel-size", int, "devices each weight and the KV cache are split over"),
    ("--generation-config", str, "auto (the folder's generation_config.json) | vllm | a folder"),
    ("--logprobs-mode", str, "raw_logprobs | raw_logits | processed_logprobs | processed_logits"),
)


def _serve(args: argparse.Namespace) -> int:
    if args.compilation_cache:
        from runner.device.compilation import enable_persistent_cache
        enable_persistent_cache(args.compilation_cache)
    # Here, not at the top: FastAPI and uvicorn are the `serve` extra, absent from the GPU
    # image, where `generate` must still run.
    try:
        from runner.server import run_server
    except ImportError as e:
        raise ValueError(f"serve needs the serve extra ({e}); pip install 'jax-model-runner[serve]'") from e

    engine_args = {flag[2:].replace("-", "_"): getattr(args, flag[2:].replace("-", "_"))
                   for flag, _, _ in SERVE_ENGINE_FLAGS}
    engine_args = {name: value for name, value in engine_args.items() if value is not None}
    if args.no_enable_prefix_caching:
        engine_args["enable_prefix_caching"] = False
    for name in ("max_call_seconds", "full_batch_call_seconds"):
        if getattr(args, name) is not None:
            engine_args[name] = getattr(args, name)
    run_server(args.model, host=args.host, port=args.port, served_model_names=args.served_model_name,
               enable_control_endpoints=args.enable_control_endpoints, log_level=args.uvicorn_log_level,
               warmup=args.warmup, **engine_args)
    return 0


def _add_serve(commands: argparse._SubParsersAction, after_command: argparse.ArgumentParser) -> None:
    s = commands.add_parser("serve", parents=[after_command],
                            help="an OpenAI-compatible HTTP server (needs the serve extra)")
    s.add_argument("model", nargs="?", default=None, help="Hugging Face or orbax folder; default: built-in model")
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--served-model-name", nargs="+", default=None,
                   help="the model id(s) requests name (default: the model path, or 'builtin')")
    s.add_argument("--enable-control-endpoints", action="store_true",
                   help="add /sleep, /wake_up, /is_sleeping, /pause, /resume, /is_paused, "
                        "/reset_prefix_cache and /collective_rpc "
                        "(vLLM's development mode); anyone who reaches the port can call them")
    for flag, kind, text in SERVE_ENGINE_FLAGS:
        s.add_argument(flag, type=kind, default=None, help=text)
    s.add_argument("--no-enable-prefix-caching", action="store_true", help="turn the prefix cache off")
    s.add_argument("--warmup", action="store_true",
                   help="compile every serving program before the port opens (minutes on a CPU; "
                        "with --compilation-cache, later starts read them back)")
    s.add_argument("--max-call-seconds", type=float, default=None,
                   help="the duration a decode call aims under while a sequence slot is free "
                        "(default: runner.AsyncLLM's)")
    s.add_argument("--full-batch-call-seconds", type=float, default=None,
                   help="the same while every sequence slot is taken (default: runner.AsyncLLM's)")
    s.add_argument("--uvicorn-log-level", default="info",
                   choices=["critical", "error", "warning", "info", "debug", "trace"])
    s.add_argument("--compilation-cache", default=None, metavar="DIR",
                   help="persistent compilation cache directory (a second start compiles less)")
    s.set_defaults(func=_serve)


# What a user's own input can raise: a folder or file that is not there or not readable
# (OSError), a value the config, the loader or the sampling settings refuse (ValueError,
# CheckpointError included). Anything else is a defect and keeps its traceback.
USER_ERRORS = (ValueError, OSError)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m runner", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    debug_help = "show the full traceback of an error instead of one line"
    parser.add_argument("--debug", action="store_true", help=debug_help)
    # Accepted after the command too (`generate ... --debug`), where users put it; SUPPRESS
    # keeps a subcommand that lacks it from resetting the value given before the command.
    after_command = argparse.ArgumentParser(add_help=False)
    after_command.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=debug_help)
    commands = parser.add_subparsers(dest="command", required=True)
    gen = commands.add_parser("generate", parents=[after_command],
                              help="complete prompts with a model (default: the built-in one)")
    gen.add_argument("prompts", nargs="*", help="prompt texts (default: a Python snippet)")
    gen.add_argument("--model", default=None, help="Hugging Face or orbax folder; default: built-in model")
    gen.add_argument("--load-format", default="auto", choices=["auto", "safetensors", "dummy", "orbax"])
    gen.add_argument("--dtype", default="auto")
    gen.add_argument("--max-tokens", type=int, default=64)
    # Sampling by default: a small model's greedy output falls into loops quickly.
    gen.add_argument("--temperature", type=float, default=0.7, help="0 is greedy")
    gen.add_argument("--top-p", type=float, default=0.9)
    gen.add_argument("--top-k", type=int, default=0)
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--max-model-len", type=int, default=None)
    gen.add_argument("--num-kv-blocks", type=int, default=None)
    gen.add_argument("--compilation-cache", default=None, metavar="DIR",
                     help="persistent compilation cache directory (a second run starts faster)")
    gen.set_defaults(func=_generate)

    _add_serve(commands, after_command)

    b = commands.add_parser("bench", parents=[after_command],
                            help="workload W1 on this runner and on transformers, side by side "
                                 "(every workload flag defaults to W1's value)")
    b.add_argument("--workload", default="w1", choices=["w1", "rollout"],
                   help="w1: batch sizes 1/8/32, greedy; rollout: W1-R (16 prompts x n=8 at temperature 1, "
                        "with logprobs) and n samples sharing one prefill (benchmarks/rollout.py; "
                        "workload flags do not apply)")
    b.add_argument("--model", default=None, help="HF folder to benchmark instead of W1's random weights")
    b.add_argument("--batch-sizes", type=int, nargs="+", default=None)
    b.add_argument("--dtype", default=None, choices=["float32", "bfloat16"])
    for name in WORKLOAD_FLAGS:
        if name not in ("batch_sizes", "dtype"):
            b.add_argument("--" + name.replace("_", "-"), type=int, default=None)
    b.add_argument("--no-reference", action="store_true", help="skip transformers")
    b.add_argument("--vllm-python", default=None, metavar="PATH",
                   help="a Python with vLLM installed: run the same workload on vLLM too")
    b.add_argument("--decode-steps", type=int, default=0, help="decode steps per device call (0: auto)")
    b.add_argument("--output", default="bench.json", help="JSON report path")
    b.set_defaults(func=_bench)
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except USER_ERRORS as e:
        if args.debug:
            raise
        print(f"error: {str(e) or type(e).__name__}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
