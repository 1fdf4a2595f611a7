"""Command line: `python -m runner generate "prompt"` (and `bench`, see runner/bench.py)."""

from __future__ import annotations

import argparse
import sys
import time


def _generate(args: argparse.Namespace) -> int:
    if args.compilation_cache:
        from runner.compilation import enable_persistent_cache
        enable_persistent_cache(args.compilation_cache)
    from runner import LLM, SamplingParams

    start = time.perf_counter()
    llm = LLM(args.model, load_format=args.load_format, dtype=args.dtype, seed=args.seed,
              max_model_len=args.max_model_len, num_kv_blocks=args.num_kv_blocks)
    params = SamplingParams(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                            seed=args.seed, max_tokens=args.max_tokens)
    prompts = args.prompts or ["def fibonacci(n):"]
    outputs = llm.generate(prompts, params, use_tqdm=False)
    for prompt, out in zip(prompts, outputs):
        print(f"{prompt}{out.outputs[0].text}")
        print("-" * 40)
    print(f"[{sum(len(o.outputs[0].token_ids) for o in outputs)} tokens in "
          f"{time.perf_counter() - start:.1f}s including load and compilation]", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m runner", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    gen = commands.add_parser("generate", help="complete prompts with a model (default: the built-in one)")
    gen.add_argument("prompts", nargs="*", help="prompt texts (default: a Python snippet)")
    gen.add_argument("--model", default=None, help="Hugging Face or orbax folder; default: built-in model")
    gen.add_argument("--load-format", default="auto", choices=["auto", "safetensors", "dummy", "orbax"])
    gen.add_argument("--dtype", default="auto")
    gen.add_argument("--max-tokens", type=int, default=64)
    gen.add_argument("--temperature", type=float, default=0.0, help="0 is greedy")
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--top-k", type=int, default=0)
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--max-model-len", type=int, default=None)
    gen.add_argument("--num-kv-blocks", type=int, default=None)
    gen.add_argument("--compilation-cache", default=None, metavar="DIR",
                     help="persistent compilation cache directory (a second run starts faster)")
    gen.set_defaults(func=_generate)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
