"""Train the built-in model: a small Qwen3-architecture model on Python's own sources.

    python -m tools.train_builtin            # writes models/builtin/{config.json,model.safetensors,tokenizer.json}

Data: every `*.py` file of the running interpreter's standard library outside test
folders, plus the `pydoc_data` help topics, in sorted path order. Files whose path hashes
(crc32) to 0 mod 20 are held out for evaluation. The tokenizer is a byte-level BPE trained
with the `tokenizers` library on the training files (vocabulary 4096, `<|endoftext|>` = 0
separates documents). The model is trained with Flax NNX and optax (AdamW, warm-up then
cosine decay) on random 256-token spans, seed 0; the last lines of `TRAINING.md`, written
by this script, record the steps, time and final losses of the committed weights.

Reproducing the committed weights needs the same Python version (the corpus is its
standard library) and the same JAX/Flax/optax versions; XLA on CPU is deterministic for a
fixed thread count.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import sysconfig
import time
import zlib
from pathlib import Path

import jax
import numpy as np
import optax
from flax import nnx
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from models.flax_llama import CausalLM, next_token_loss
from runner.formats.bridge import params_from_flax, save_pretrained
from runner.formats.tokenizer import Tokenizer as RunnerTokenizer
from state.config import ModelConfig

HERE = Path(__file__).parent.parent / "models" / "builtin"
EOS = "<|endoftext|>"
SKIP_DIRS = {"test", "tests", "idle_test", "site-packages", "__pycache__"}


def model_config(vocab_size: int) -> ModelConfig:
    return ModelConfig(
        architecture="Qwen3ForCausalLM", vocab_size=vocab_size, hidden_size=256,
        intermediate_size=704, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
        head_dim=64, tie_word_embeddings=True, dtype="float32", rms_norm_eps=1e-6,
        rope_theta=10000.0, max_position_embeddings=1024, bos_token_id=None, eos_token_ids=(0,),
        initializer_range=0.02)


def corpus() -> tuple[list[str], list[str]]:
    """(training texts, held-out texts) from the standard library and pydoc topics."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    train, held_out = [], []
    for path in sorted(stdlib.rglob("*.py")):
        if SKIP_DIRS & set(path.relative_to(stdlib).parts):
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        rel = str(path.relative_to(stdlib))
        (held_out if zlib.crc32(rel.encode()) % 20 == 0 else train).append(text)
    from pydoc_data.topics import topics
    for name in sorted(topics):
        (held_out if zlib.crc32(name.encode()) % 20 == 0 else train).append(topics[name])
    return train, held_out


def train_tokenizer(texts: list[str], vocab_size: int) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def encode(tok: Tokenizer, texts: list[str]) -> np.ndarray:
    eos = tok.token_to_id(EOS)
    ids: list[int] = []
    for enc in tok.encode_batch(texts, add_special_tokens=False):
        ids.extend(enc.ids)
        ids.append(eos)
    return np.asarray(ids, np.int32)


@nnx.jit
def train_step(model: CausalLM, optimizer: nnx.Optimizer, batch: jax.Array) -> jax.Array:
    loss, grads = nnx.value_and_grad(next_token_loss)(model, batch)
    optimizer.update(model, grads)
    return loss


@nnx.jit
def eval_loss(model: CausalLM, batch: jax.Array) -> jax.Array:
    return next_token_loss(model, batch)


def random_spans(tokens: np.ndarray, rng: np.random.Generator, batch: int, length: int) -> np.ndarray:
    starts = rng.integers(0, len(tokens) - length - 1, batch)
    return np.stack([tokens[s:s + length + 1] for s in starts])


def held_out_loss(model: CausalLM, tokens: np.ndarray, length: int, batches: int = 8) -> float:
    rng = np.random.default_rng(1)
    return float(np.mean([eval_loss(model, random_spans(tokens, rng, 8, length)) for _ in range(batches)]))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--length", type=int, default=256)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--out", default=str(HERE))
    args = parser.parse_args(argv)

    start = time.perf_counter()
    train_texts, held_texts = corpus()
    tok = train_tokenizer(train_texts, args.vocab)
    train_tokens, held_tokens = encode(tok, train_texts), encode(tok, held_texts)
    print(f"corpus: {len(train_texts)} training documents ({len(train_tokens):,} tokens), "
          f"{len(held_texts)} held out ({len(held_tokens):,} tokens)", flush=True)

    cfg = model_config(tok.get_vocab_size())
    model = CausalLM(cfg, nnx.Rngs(0))
    schedule = optax.warmup_cosine_decay_schedule(0.0, args.lr, min(100, args.steps // 10), args.steps,
                                                  args.lr / 10)
    optimizer = nnx.Optimizer(model, optax.chain(optax.clip_by_global_norm(1.0),
                                                 optax.adamw(schedule, weight_decay=0.01)), wrt=nnx.Param)
    rng = np.random.default_rng(0)
    initial = held_out_loss(model, held_tokens, args.length)
    losses = []
    for step in range(1, args.steps + 1):
        losses.append(float(train_step(model, optimizer, random_spans(train_tokens, rng, args.batch, args.length))))
        if step % 100 == 0 or step == args.steps:
            print(f"step {step}: train loss {np.mean(losses[-100:]):.3f} "
                  f"({time.perf_counter() - start:.0f}s)", flush=True)
    final = held_out_loss(model, held_tokens, args.length)
    elapsed = time.perf_counter() - start

    out = Path(args.out)
    save_pretrained(out, params_from_flax(model, cfg), cfg, RunnerTokenizer(tok))
    summary = {
        "python": sys.version.split()[0], "jax": jax.__version__, "seed": 0, "steps": args.steps,
        "batch": args.batch, "length": args.length, "peak_lr": args.lr, "vocab_size": cfg.vocab_size,
        "parameters": int(sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))),
        "training_tokens_seen": args.steps * args.batch * args.length,
        "final_train_loss": round(float(np.mean(losses[-100:])), 4),
        "held_out_loss_initial": round(initial, 4), "held_out_loss_final": round(final, 4),
        "held_out_perplexity": round(math.exp(final), 2), "seconds": round(elapsed, 1),
    }
    (out / "TRAINING.md").write_text(
        "# Built-in model\n\nTrained by `python -m tools.train_builtin` (see its docstring).\n\n"
        "```json\n" + json.dumps(summary, indent=2) + "\n```\n")
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
