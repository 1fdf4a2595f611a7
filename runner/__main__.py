"""Command line: `python -m runner generate "prompt"` (and `bench`, see benchmarks/bench.py).

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

    given = {name: getattr(args, name) for name in WORKLOAD_FLAGS if getattr(args, name) is not None}
    if "batch_sizes" in given:
        given["batch_sizes"] = tuple(given["batch_sizes"])
    bench.run(bench.Workload(**given), model=args.model, reference=not args.no_reference,
              output=args.output, vllm_python=args.vllm_python, decode_window=args.decode_window)
    return 0


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

    b = commands.add_parser("bench", parents=[after_command],
                            help="workload W1 on this runner and on transformers, side by side "
                                 "(every workload flag defaults to W1's value)")
    b.add_argument("--model", default=None, help="HF folder to benchmark instead of W1's random weights")
    b.add_argument("--batch-sizes", type=int, nargs="+", default=None)
    b.add_argument("--dtype", default=None, choices=["float32", "bfloat16"])
    for name in WORKLOAD_FLAGS:
        if name not in ("batch_sizes", "dtype"):
            b.add_argument("--" + name.replace("_", "-"), type=int, default=None)
    b.add_argument("--no-reference", action="store_true", help="skip transformers")
    b.add_argument("--vllm-python", default=None, metavar="PATH",
                   help="a Python with vLLM installed: run the same workload on vLLM too")
    b.add_argument("--decode-window", type=int, default=0, help="decode steps per device call (0: auto)")
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
