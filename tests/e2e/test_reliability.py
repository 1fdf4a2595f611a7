"""Every boundary fails cleanly and changes nothing: bad checkpoint files, bad requests,
lifecycle misuse, and faults injected in the middle of a generate call.

"Changes nothing" is checked the same way after every failure (`assert_unchanged`): the
runner holds the same config record object and the same parameter tree (leaf by leaf, values
included), the KV pool has every block back, and greedy outputs equal those taken before.

The engine settings are those of `test_engine.py` (block size, pool size, token budget), so
in one pytest process the two modules share their compiled programs.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import pickle
import re
import shutil
import struct
from pathlib import Path

import jax
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import runner.llm as llm_module
from runner import LLM, SamplingParams
from runner.engine import engine
from runner.formats.orbax_io import save_params
from runner.formats.param_tree import CheckpointError
from runner.formats.tokenizer import Tokenizer
from state.params import leaf_paths

BLOCK, NUM_BLOCKS, MAX_LEN, BUDGET, VOCAB = 16, 6, 64, 8, 97
LLM_ARGS = dict(num_kv_blocks=NUM_BLOCKS, block_size=BLOCK, max_model_len=MAX_LEN,
                max_num_batched_tokens=BUDGET, max_num_seqs=2)
GREEDY = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
PROMPTS = [[5, 17, 42, 8, 91, 33], [9, 9, 4], list(range(3, 23))]


def ids(prompt: list[int]) -> dict:
    return {"prompt_token_ids": prompt}


def outputs(llm: LLM) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in llm.generate([ids(p) for p in PROMPTS], GREEDY, use_tqdm=False)]


@dataclasses.dataclass
class Snapshot:
    config: object
    params: object
    values: dict[str, np.ndarray]
    outputs: list[list[int]]


def snapshot(llm: LLM) -> Snapshot:
    params = llm.runner.params
    values = {p: np.array(x) for p, x in zip(leaf_paths(params), jax.tree.leaves(params))}
    return Snapshot(llm.config, params, values, outputs(llm))


def assert_idle(llm: LLM) -> None:
    sched = llm.scheduler
    assert not sched.has_unfinished()
    assert sched.pool.num_free_blocks == llm.runner.num_blocks
    sched.pool.check_invariants([])


def assert_unchanged(llm: LLM, snap: Snapshot) -> None:
    """Same config record, same weights leaf by leaf, no block held, same outputs."""
    assert llm.config is snap.config
    assert llm.runner.params is snap.params
    leaves = jax.tree.leaves(llm.runner.params)
    assert leaf_paths(llm.runner.params) == list(snap.values)
    for (path, before), leaf in zip(snap.values.items(), leaves):
        np.testing.assert_array_equal(np.asarray(leaf), before, err_msg=path)
    assert_idle(llm)
    assert outputs(llm) == snap.outputs
    assert_idle(llm)


@pytest.fixture(scope="module")
def tied(hf_checkpoint) -> Path:
    return hf_checkpoint("qwen3_tied")[0]


@pytest.fixture(scope="module")
def llm(tied) -> LLM:
    return LLM(str(tied), tokenizer=Tokenizer.byte_level(), **LLM_ARGS)


@pytest.fixture(scope="module")
def reference(llm) -> list[list[int]]:
    return outputs(llm)


@pytest.fixture
def snap(llm, reference) -> Snapshot:
    """The runner as each test finds it (earlier tests reload, so its records are new ones),
    serving the module's reference outputs."""
    taken = snapshot(llm)
    assert taken.outputs == reference
    return taken


def _folder(src: Path, dst: Path, *, config=None, weights: bytes | None = None, mutate=None,
            extra: dict[str, bytes | str] | None = None) -> Path:
    """A copy of `src` with config.json patched (a dict merged in, or raw text/bytes), the
    weights file replaced by `weights` or edited by `mutate`, and `extra` files added."""
    shutil.copytree(src, dst)
    if isinstance(config, dict) or callable(config):
        hf = json.loads((dst / "config.json").read_text())
        hf = config(hf) if callable(config) else {**hf, **config}
        (dst / "config.json").write_text(json.dumps(hf))
    elif config is not None:
        _write(dst / "config.json", config)
    if weights is not None:
        (dst / "model.safetensors").write_bytes(weights)
    if mutate is not None:
        tensors = load_file(dst / "model.safetensors")
        mutate(tensors)
        save_file(tensors, dst / "model.safetensors")
    for name, content in (extra or {}).items():
        _write(dst / name, content)
    return dst


def _write(path: Path, content: bytes | str) -> None:
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content)


def safetensors_bytes(header: dict | bytes, data: bytes = b"", header_len: int | None = None) -> bytes:
    """A safetensors file: 8-byte little-endian header length, JSON header, data. Either
    part may lie: `header_len` overrides the true length, `header` may be raw bytes."""
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(raw) if header_len is None else header_len) + raw + data


# -- checkpoints -----------------------------------------------------------------------------

BAD_ARGUMENTS = [
    (dict(max_model_len=0), r"SchedulerConfig\.max_model_len: expected a positive int, got 0"),
    (dict(max_model_len=257), r"SchedulerConfig\.max_model_len: 257 exceeds the model's max_position_embeddings \(256\)"),
    (dict(max_num_batched_tokens=0), r"SchedulerConfig\.max_num_batched_tokens: expected a positive int, got 0"),
    (dict(max_num_seqs=4, max_num_batched_tokens=2), r"max_num_batched_tokens: 2 must be at least max_num_seqs \(4\)"),
    (dict(block_size=0), r"CacheConfig\.block_size: expected a positive int, got 0"),
    (dict(num_kv_blocks=-1), r"CacheConfig\.num_blocks: expected a positive int, got -1"),
    (dict(seed=-1), r"LoadConfig\.seed: expected an int in \[0, 2\*\*63\), got -1"),
    (dict(dtype="int8"), r"ModelConfig\.dtype: unsupported 'int8'; supported: float32, bfloat16, float16"),
    (dict(load_format="gguf"), r"LoadConfig\.load_format: unknown 'gguf'; valid: auto, safetensors, dummy, orbax"),
    (dict(kv_cache_dtype="int4"), r"CacheConfig\.kv_cache_dtype: unknown 'int4'"),
    (dict(attention_backend="cuda"), r"CacheConfig\.attention_backend: unknown 'cuda'; valid: reference, pallas"),
    (dict(tensor_parallel_size=3), r"ParallelConfig\.tensor_parallel_size: 3 must divide num_attention_heads \(4\)"),
    (dict(tokenizer=5), r"tokenizer: expected a folder path, a runner\.formats\.tokenizer\.Tokenizer or None, got int"),
    (dict(tokenizer="/nonexistent"), r"tokenizer: no tokenizer\.json in '/nonexistent'"),
]


@pytest.mark.parametrize("kwargs, error", BAD_ARGUMENTS)
def test_invalid_engine_arguments_are_named(tied, kwargs, error):
    with pytest.raises(ValueError, match=error):
        LLM(str(tied), **{**LLM_ARGS, **kwargs})


def test_missing_model_folder_is_named(tied):
    with pytest.raises(FileNotFoundError, match=r"model folder '/nonexistent/model' does not exist or is "
                                                r"not a folder: expected a Hugging Face model folder"):
        LLM("/nonexistent/model", **LLM_ARGS)
    with pytest.raises(FileNotFoundError, match=r"config\.json' does not exist or is not a folder"):
        LLM(str(tied / "config.json"), **LLM_ARGS)


BAD_CONFIGS = {
    "not json": ("{not json", r"config\.json is not valid JSON"),
    "binary": (b"\xff\xfe\x00", r"config\.json is not valid JSON: 'utf-8' codec"),
    "a list": ("[1, 2]", r"config\.json must hold a JSON object, got list"),
    "no vocab_size": (lambda hf: {k: v for k, v in hf.items() if k != "vocab_size"},
                      r"config\.json lacks the required field 'vocab_size'"),
    "vocab_size null": ({"vocab_size": None}, r"ModelConfig\.vocab_size: expected a positive int, got None"),
    "zero heads": ({"num_attention_heads": 0, "head_dim": None},
                   r"ModelConfig\.num_attention_heads: expected a positive int, got 0"),
    "hidden_size as text": ({"hidden_size": "40", "head_dim": None},
                            r"ModelConfig\.hidden_size: expected a positive int, got '40'"),
    "eps as text": ({"rms_norm_eps": "small"}, r"config\.json field 'rms_norm_eps': expected a number, got 'small'"),
    "eps nan": ({"rms_norm_eps": float("nan")}, r"ModelConfig\.rms_norm_eps: expected a positive finite float, got nan"),
    "init as text": ({"initializer_range": "x"}, r"config\.json field 'initializer_range': expected a number"),
    "rope a list": ({"rope_parameters": [1, 2]},
                    r"field 'rope_parameters'/'rope_scaling': expected an object, got \[1, 2\]"),
    "rope theta infinite": ({"rope_parameters": {"rope_theta": float("inf"), "rope_type": "default"}},
                            r"ModelConfig\.rope_theta: expected a positive finite number, got inf"),
    "llama3 rope factor text": ({"rope_parameters": {"rope_type": "llama3", "factor": "x", "low_freq_factor": 1,
                                                     "high_freq_factor": 4, "original_max_position_embeddings": 32}},
                                r"config\.json field 'rope_parameters\.factor': expected a number, got 'x'"),
    "tie as text": ({"tie_word_embeddings": "false"}, r"ModelConfig\.tie_word_embeddings: expected a bool, got 'false'"),
    "bos as list": ({"bos_token_id": [1]}, r"ModelConfig\.bos_token_id: expected None or a token id"),
    "eos negative": ({"eos_token_id": -1}, r"ModelConfig\.eos_token_ids: expected a tuple of token ids \(ints >= 0\)"),
    "layer_types not a list": ({"layer_types": 5}, r"layer_types=5 \(expected a list of 'full_attention'\)"),
    "architectures a string": ({"architectures": "Qwen3ForCausalLM"},
                               r"unsupported architectures 'Qwen3ForCausalLM'; supported: Qwen3ForCausalLM"),
    "unsupported architecture": ({"architectures": ["DeepseekV3ForCausalLM"]},
                                 r"unsupported architectures \['DeepseekV3ForCausalLM'\]; supported"),
}


@pytest.mark.parametrize("case", sorted(BAD_CONFIGS))
def test_invalid_config_json_is_refused_by_load_and_reload(llm, snap, tied, tmp_path, case):
    config, message = BAD_CONFIGS[case]
    folder = _folder(tied, tmp_path / "bad", config=config)
    with pytest.raises(ValueError, match=message):
        LLM(str(folder), **LLM_ARGS)
    # A reload reads the folder's config.json too: same message, as a CheckpointError.
    with pytest.raises(CheckpointError, match=message):
        llm.reload_weights(weights_path=str(folder))
    assert_unchanged(llm, snap)


def test_unsupported_checkpoint_dtype_is_refused(tied, tmp_path):
    folder = _folder(tied, tmp_path / "int8", config={"torch_dtype": "int8", "dtype": None})
    with pytest.raises(ValueError, match=r"ModelConfig\.dtype: unsupported 'int8'; supported: float32"):
        LLM(str(folder), **LLM_ARGS)


# Header entries for crafted files: the norm tensor is [40] float32 (160 bytes).
NORM = "model.norm.weight"
BAD_SAFETENSORS = {
    "offsets past the end": (safetensors_bytes({NORM: {"dtype": "F32", "shape": [40], "data_offsets": [0, 160]}},
                                               b"\0" * 80), "file not fully covered"),
    "overlapping tensors": (safetensors_bytes({NORM: {"dtype": "F32", "shape": [20], "data_offsets": [0, 80]},
                                               "model.embed_tokens.weight": {"dtype": "F32", "shape": [20],
                                                                             "data_offsets": [40, 120]}},
                                              b"\0" * 120), "invalid offset for tensor"),
    "reversed offsets": (safetensors_bytes({NORM: {"dtype": "F32", "shape": [40], "data_offsets": [160, 0]}},
                                           b"\0" * 160), "invalid offset for tensor"),
    "shape disagrees with offsets": (safetensors_bytes({NORM: {"dtype": "F32", "shape": [41],
                                                               "data_offsets": [0, 160]}}, b"\0" * 160),
                                     "invalid shape, data type, or offset"),
    "bytes not covered": (safetensors_bytes({NORM: {"dtype": "F32", "shape": [40], "data_offsets": [0, 160]}},
                                            b"\0" * 200), "file not fully covered"),
    "header length past the end": (safetensors_bytes({}, b"", header_len=10**6), "invalid header length"),
    "header length 2**63": (safetensors_bytes({}, b"", header_len=2**63), "header too large"),
    "header not utf-8": (safetensors_bytes(b"\xff\xfe{}"), "invalid UTF-8 in header"),
    "header a json list": (safetensors_bytes(b"[1, 2]"), "invalid JSON in header"),
    "unknown dtype": (safetensors_bytes({NORM: {"dtype": "Q9", "shape": [40], "data_offsets": [0, 160]}},
                                        b"\0" * 160), "unknown variant `Q9`"),
    "negative shape": (safetensors_bytes({NORM: {"dtype": "F32", "shape": [-40], "data_offsets": [0, 160]}},
                                         b"\0" * 160), "invalid JSON in header"),
    "shape overflows": (safetensors_bytes({NORM: {"dtype": "F32", "shape": [2**40, 2**40], "data_offsets": [0, 160]}},
                                          b"\0" * 160), "overflow computing buffer size"),
    "shorter than a header": (b"\0" * 4, "header too small"),
    "empty file": (b"", "header too small"),
    "random bytes": (np.random.default_rng(0).bytes(4096), "header too large"),
}


@pytest.mark.parametrize("case", sorted(BAD_SAFETENSORS))
def test_lying_or_corrupt_safetensors_is_a_checkpoint_error(llm, snap, tied, tmp_path, case):
    weights, detail = BAD_SAFETENSORS[case]
    folder = _folder(tied, tmp_path / "bad", weights=weights)
    pattern = rf"cannot read .*model\.safetensors: .*{detail}.*\(truncated or corrupt safetensors file\?\)"
    with pytest.raises(CheckpointError, match=pattern):
        LLM(str(folder), **LLM_ARGS)
    with pytest.raises(CheckpointError, match=pattern):
        llm.reload_weights(weights_path=str(folder))
    assert_unchanged(llm, snap)


def test_dtype_numpy_cannot_hold_is_named(llm, snap, tied, tmp_path):
    """float8 tensors make safetensors' numpy reader fail with an AttributeError: refused by
    name instead."""
    weights = safetensors_bytes({NORM: {"dtype": "F8_E4M3", "shape": [40], "data_offsets": [0, 40]}}, b"\0" * 40)
    folder = _folder(tied, tmp_path / "fp8", weights=weights)
    with pytest.raises(CheckpointError, match=r"tensor 'model\.norm\.weight' in .* has dtype F8_E4M3, which "
                                              r"cannot be read \(expected F32, F16, BF16 or F64\)"):
        llm.reload_weights(weights_path=str(folder))
    assert_unchanged(llm, snap)


def _index(weight_map) -> str:
    return json.dumps({"metadata": {}, "weight_map": weight_map})


BAD_INDEXES = {
    "missing shard": (_index({NORM: "model-00002-of-00002.safetensors"}),
                      r"names shard\(s\) that do not exist: model-00002-of-00002\.safetensors"),
    "shard outside the folder": (_index({NORM: "../other/model.safetensors"}),
                                 r"names shard '\.\./other/model\.safetensors', which is not a file name in"),
    "absolute shard path": (_index({NORM: "/etc/passwd"}), r"names shard '/etc/passwd', which is not a file name"),
    "weight_map a list": (_index(["model.safetensors"]), r"'weight_map' must map tensor names to shard file names"),
    "shard name a number": (_index({NORM: 5}), r"'weight_map' must map tensor names to shard file names"),
    "no weight_map": (json.dumps({"metadata": {}}), r"is not a valid safetensors index: 'weight_map'"),
    "not json": ("{", r"is not a valid safetensors index: Expecting property name"),
    "not utf-8": (b"\xff\xfe", r"is not a valid safetensors index: 'utf-8' codec"),
}


@pytest.mark.parametrize("case", sorted(BAD_INDEXES))
def test_bad_safetensors_index_is_a_checkpoint_error(llm, snap, tied, tmp_path, case):
    index, message = BAD_INDEXES[case]
    folder = _folder(tied, tmp_path / "indexed", extra={"model.safetensors.index.json": index})
    with pytest.raises(CheckpointError, match=message):
        llm.reload_weights(weights_path=str(folder))
    assert_unchanged(llm, snap)


def _set(name: str, value: np.ndarray):
    def mutate(tensors: dict[str, np.ndarray]) -> None:
        tensors[name] = value
    return mutate


def _pop(name: str):
    def mutate(tensors: dict[str, np.ndarray]) -> None:
        del tensors[name]
    return mutate


def _poison(name: str, value: float):
    def mutate(tensors: dict[str, np.ndarray]) -> None:
        tensors[name] = tensors[name].copy()
        tensors[name].flat[7] = value
    return mutate


BAD_TENSORS = {
    "int32 tensor": (_set(NORM, np.ones(40, np.int32)), r"tensor 'model\.norm\.weight' has dtype int32; expected a floating type"),
    "bool tensor": (_set(NORM, np.ones(40, bool)), r"tensor 'model\.norm\.weight' has dtype bool; expected a floating type"),
    "uint8 tensor": (_set(NORM, np.ones(40, np.uint8)), r"has dtype uint8; expected a floating type"),
    "wrong shape": (_set("model.layers.1.self_attn.o_proj.weight", np.zeros((40, 47), np.float32)),
                    r"tensor 'model\.layers\.1\.self_attn\.o_proj\.weight' has shape \(40, 47\); expected \(40, 48\)"),
    "transposed": (_set("model.layers.0.mlp.up_proj.weight", np.zeros((40, 72), np.float32)),
                   r"'model\.layers\.0\.mlp\.up_proj\.weight' has shape \(40, 72\); expected \(72, 40\)"),
    "missing tensor": (_pop("model.layers.0.mlp.down_proj.weight"),
                       r"checkpoint lacks 1 tensor\(s\) the model needs: layers\.0\.w_down"),
    "unexpected tensor": (_set("model.layers.0.mlp.extra.weight", np.zeros(3, np.float32)),
                          r"unexpected tensor 'model\.layers\.0\.mlp\.extra\.weight'"),
    "layer out of range": (_set("model.layers.2.mlp.up_proj.weight", np.zeros((72, 40), np.float32)),
                           r"unexpected tensor 'model\.layers\.2\.mlp\.up_proj\.weight': not a weight of a 2-layer"),
    "infinity": (_poison("model.layers.1.self_attn.q_proj.weight", np.inf),
                 r"tensor 'model\.layers\.1\.self_attn\.q_proj\.weight' holds NaN or infinite values"),
    "minus infinity": (_poison(NORM, -np.inf), r"'model\.norm\.weight' holds NaN or infinite values"),
    "float64 beyond float32": (_set(NORM, np.full(40, 1e300)),
                               r"'model\.norm\.weight' holds NaN or infinite values once converted to float32"),
}


@pytest.mark.parametrize("case", sorted(BAD_TENSORS))
def test_bad_tensor_in_a_file_is_named(llm, snap, tied, tmp_path, case):
    mutate, message = BAD_TENSORS[case]
    folder = _folder(tied, tmp_path / "tensors", mutate=mutate)
    with pytest.raises(CheckpointError, match=message):
        LLM(str(folder), **LLM_ARGS)
    with pytest.raises(CheckpointError, match=message):
        llm.reload_weights(weights_path=str(folder))
    assert_unchanged(llm, snap)


def test_check_finite_opt_out_loads_non_finite_weights(llm, snap, tied, tmp_path):
    folder = _folder(tied, tmp_path / "nan", mutate=_poison(NORM, np.nan))
    with pytest.raises(CheckpointError, match=r"check_finite=False accepts them"):
        llm.reload_weights(weights_path=str(folder))
    assert_unchanged(llm, snap)
    try:
        llm.update_config({"load_config": {"check_finite": False}})
        llm.reload_weights(weights_path=str(folder))
        assert np.isnan(np.asarray(llm.runner.params.final_norm)[7])
        assert llm.config.model_config.model == str(folder)
    finally:
        llm.update_config({"load_config": {"check_finite": True}})
        llm.reload_weights(weights_path=str(tied))
    assert outputs(llm) == snap.outputs
    assert_idle(llm)


@pytest.fixture(scope="module")
def orbax_folder(llm, tmp_path_factory) -> Path:
    return save_params(tmp_path_factory.mktemp("orbax") / "ckpt", llm.runner.params, llm.config.model_config)


def _drop(name: str):
    def damage(folder: Path) -> None:
        (folder / name).unlink()
    return damage


def _garble(name: str):
    def damage(folder: Path) -> None:
        (folder / name).write_text("{garbage")
    return damage


def _drop_data(folder: Path) -> None:
    for data in (folder / "ocdbt.process_0" / "d").iterdir():
        data.unlink()


def _truncate_data(folder: Path) -> None:
    for data in (folder / "ocdbt.process_0" / "d").iterdir():
        data.write_bytes(data.read_bytes()[:data.stat().st_size // 2])


BAD_ORBAX = {
    "no tree metadata": (_drop("_METADATA"), r"tree metadata \(_METADATA\) is missing or unreadable"),
    "garbled tree metadata": (_garble("_METADATA"), r"tree metadata \(_METADATA\) is missing or unreadable"),
    "empty tree metadata": (lambda f: (f / "_METADATA").write_text("{}"), r"cannot read the orbax checkpoint .*KeyError"),
    "array data deleted": (_drop_data, r"cannot restore the orbax checkpoint in"),
    "array data truncated": (_truncate_data, r"cannot restore the orbax checkpoint in"),
}


# A failed orbax restore leaves some of its own coroutines unawaited: noise, not a leak of ours.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.parametrize("case", sorted(BAD_ORBAX))
def test_damaged_orbax_checkpoint_is_a_checkpoint_error(llm, snap, orbax_folder, tmp_path, case):
    damage, message = BAD_ORBAX[case]
    folder = tmp_path / "orbax"
    shutil.copytree(orbax_folder, folder)
    damage(folder)
    with pytest.raises(CheckpointError, match=message):
        llm.reload_weights(weights_path=str(folder))
    gc.collect()  # here, under the filter above, rather than in whichever test runs next
    assert_unchanged(llm, snap)


def test_format_mismatch_is_a_checkpoint_error(llm, snap, tied, orbax_folder):
    """A format that the folder does not hold, named through update_config: the reload fails,
    and setting the format back makes the runner reload fine."""
    for fmt, folder, message in (("orbax", tied, r"holds no orbax checkpoint \(no _CHECKPOINT_METADATA\)"),
                                 ("safetensors", orbax_folder, r"no \*\.safetensors files in")):
        llm.update_config({"load_config": {"load_format": fmt}})
        try:
            with pytest.raises(CheckpointError, match=message):
                llm.reload_weights(weights_path=str(folder))
        finally:
            llm.update_config({"load_config": {"load_format": "auto"}})
    llm.reload_weights(weights_path=str(orbax_folder))  # auto finds orbax
    assert outputs(llm) == snap.outputs
    llm.reload_weights(weights_path=str(tied))
    assert outputs(llm) == snap.outputs


# -- no code execution from data ------------------------------------------------------------

class _Payload:
    """Unpickling this creates the file at `path` (a stand-in for arbitrary code)."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self):
        return (Path.touch, (Path(self.path),))


def test_pickle_weights_are_refused_and_never_unpickled(llm, snap, tied, tmp_path):
    marker = tmp_path / "unpickled"
    payload = pickle.dumps({"model.norm.weight": _Payload(marker)})
    # The payload is live: unpickling it (elsewhere) does create its marker.
    probe = tmp_path / "probe"
    pickle.loads(pickle.dumps(_Payload(probe)))
    assert probe.exists()

    for name in ("pytorch_model.bin", "model.pt", "weights.ckpt", "model.pkl"):
        folder = tmp_path / name.replace(".", "_")
        folder.mkdir()
        shutil.copy(tied / "config.json", folder)
        (folder / name).write_bytes(payload)
        pattern = (rf"holds only pickle-based weights \({re.escape(name)}\); loading them could run "
                   r"arbitrary code\. Convert them to safetensors")
        with pytest.raises(CheckpointError, match=pattern):
            LLM(str(folder), **LLM_ARGS)
        with pytest.raises(CheckpointError, match=pattern):
            LLM(str(folder), load_format="safetensors", **LLM_ARGS)
        with pytest.raises(CheckpointError, match=pattern):
            llm.reload_weights(weights_path=str(folder))
        with pytest.raises(CheckpointError, match="holds no orbax checkpoint"):
            LLM(str(folder), load_format="orbax", **LLM_ARGS)
        assert not marker.exists(), f"{name} was unpickled"
    # Beside safetensors weights, a pickle file is simply not read.
    both = _folder(tied, tmp_path / "both", extra={"pytorch_model.bin": payload})
    llm.reload_weights(weights_path=str(both))
    assert not marker.exists()
    assert outputs(llm) == snap.outputs
    llm.reload_weights(weights_path=str(tied))
    assert_idle(llm)


def test_no_loader_path_unpickles(llm, snap, tied, orbax_folder, monkeypatch):
    """Loading safetensors and orbax checkpoints, by construction and by reload, never
    calls pickle."""
    def refuse(*args, **kwargs):
        raise AssertionError("pickle was called while loading weights")

    for name in ("load", "loads", "Unpickler"):
        monkeypatch.setattr(pickle, name, refuse)
    fresh = LLM(str(tied), **LLM_ARGS)
    fresh.reload_weights(weights_path=str(orbax_folder))
    LLM(str(orbax_folder), load_format="orbax", **LLM_ARGS)
    llm.reload_weights(weights_path=str(orbax_folder))
    llm.reload_weights(weights_path=str(tied))
    monkeypatch.undo()
    assert outputs(llm) == snap.outputs


def test_remote_code_is_never_imported(llm, snap, tied, tmp_path):
    """An HF `auto_map` (trust_remote_code) pointing at a modeling file is ignored: a custom
    architecture is refused, a supported one loads, and the file never runs."""
    marker = tmp_path / "imported"
    code = f"open({str(marker)!r}, 'w').close()\nclass EvilForCausalLM: pass\n"
    auto_map = {"AutoConfig": "modeling_evil.EvilConfig", "AutoModelForCausalLM": "modeling_evil.EvilForCausalLM"}
    custom = _folder(tied, tmp_path / "custom", config={"architectures": ["EvilForCausalLM"], "auto_map": auto_map},
                     extra={"modeling_evil.py": code})
    with pytest.raises(ValueError, match=r"unsupported architectures \['EvilForCausalLM'\]"):
        LLM(str(custom), **LLM_ARGS)
    with pytest.raises(CheckpointError, match=r"unsupported architectures \['EvilForCausalLM'\]"):
        llm.reload_weights(weights_path=str(custom))
    supported = _folder(tied, tmp_path / "supported", config={"auto_map": auto_map},
                        extra={"modeling_evil.py": code})
    assert outputs(LLM(str(supported), **LLM_ARGS)) == snap.outputs
    assert not marker.exists()
    assert_unchanged(llm, snap)


# -- requests --------------------------------------------------------------------------------

INVALID_SAMPLING = [
    (dict(n=0), "n"), (dict(n=1.5), "n"), (dict(n=True), "n"),
    (dict(temperature=float("nan")), "temperature"), (dict(temperature=float("inf")), "temperature"),
    (dict(temperature=-1e-9), "temperature"), (dict(temperature="0.5"), "temperature"),
    (dict(temperature=True), "temperature"),
    (dict(top_p=0), "top_p"), (dict(top_p=-0.1), "top_p"), (dict(top_p=float("nan")), "top_p"),
    (dict(top_p=None), "top_p"),
    (dict(top_k=-2), "top_k"), (dict(top_k=1.0), "top_k"), (dict(top_k=2**31), "top_k"),
    (dict(top_k=10**30), "top_k"),
    (dict(min_p=-0.1), "min_p"), (dict(min_p=1.01), "min_p"), (dict(min_p=float("nan")), "min_p"),
    (dict(seed=-1), "seed"), (dict(seed=2**32), "seed"), (dict(seed=1.0), "seed"), (dict(seed="7"), "seed"),
    (dict(presence_penalty=2.5), "presence_penalty"), (dict(presence_penalty=float("nan")), "presence_penalty"),
    (dict(frequency_penalty=-2.5), "frequency_penalty"), (dict(frequency_penalty="1"), "frequency_penalty"),
    (dict(repetition_penalty=0), "repetition_penalty"), (dict(repetition_penalty=-1.0), "repetition_penalty"),
    (dict(repetition_penalty=float("nan")), "repetition_penalty"),
    (dict(repetition_penalty=float("inf")), "repetition_penalty"),
    (dict(logit_bias=[(1, 2.0)]), "logit_bias"), (dict(logit_bias={"1": 2.0}), "logit_bias"),
    (dict(logit_bias={1: float("nan")}), "logit_bias"), (dict(logit_bias={1: float("-inf")}), "logit_bias"),
    (dict(logit_bias={1: 1e39}), "logit_bias"), (dict(logit_bias={1: "2"}), "logit_bias"),
    (dict(logit_bias={True: 1.0}), "logit_bias"),
    (dict(stop=5), "stop"), (dict(stop=b"ab"), "stop"), (dict(stop={"a"}), "stop"), (dict(stop=""), "stop"),
    (dict(stop=["a", None]), "stop"), (dict(stop=["a", 3]), "stop"), (dict(stop=[["a"]]), "stop"),
    (dict(stop={"a": 1}), "stop"),
    (dict(stop_token_ids="ab"), "stop_token_ids"), (dict(stop_token_ids=[1.0]), "stop_token_ids"),
    (dict(stop_token_ids=np.array([1, 2])), "stop_token_ids"), (dict(stop_token_ids=5), "stop_token_ids"),
    (dict(ignore_eos=1), "ignore_eos"), (dict(ignore_eos=None), "ignore_eos"),
    (dict(max_tokens=0), "max_tokens"), (dict(max_tokens=-1), "max_tokens"), (dict(max_tokens=2.0), "max_tokens"),
    (dict(min_tokens=-1), "min_tokens"), (dict(min_tokens=17), "min_tokens"), (dict(min_tokens=1.0), "min_tokens"),
    (dict(logprobs=-2), "logprobs"), (dict(logprobs=21), "logprobs"), (dict(logprobs=True), "logprobs"),
    (dict(prompt_logprobs=-2), "prompt_logprobs"), (dict(prompt_logprobs=21), "prompt_logprobs"),
    (dict(prompt_logprobs=2.0), "prompt_logprobs"),
    (dict(include_stop_str_in_output=1), "include_stop_str_in_output"),
    (dict(skip_special_tokens="no"), "skip_special_tokens"),
]


@pytest.mark.parametrize("kwargs, name", INVALID_SAMPLING, ids=[f"{n}={v!r}"[:40] for kw, n in INVALID_SAMPLING
                                                                 for v in kw.values()])
def test_every_invalid_sampling_value_names_the_field(kwargs, name):
    with pytest.raises(ValueError, match=rf"^SamplingParams\.{name}: expected "):
        SamplingParams(**kwargs)


def test_unknown_sampling_field_is_a_type_error():
    with pytest.raises(TypeError, match="tempreature"):
        SamplingParams(tempreature=0)


BAD_BATCHES = [
    # (prompts, sampling params, the error): every batch holds valid prompts around the bad one.
    ([ids([5, 6]), ids([7]), ids([])], GREEDY, r"^prompt 2 is empty"),
    (["ab", ids([5, 6]), ids([3] * MAX_LEN)], GREEDY, r"^prompt 2 has 64 tokens; max_model_len=64"),
    ([ids([5]), ids([3] * (MAX_LEN - 1))], SamplingParams(max_tokens=1), None),  # the longest that fits
    ([ids([5]), ids([6]), ids([7]), ids([8, VOCAB])], GREEDY, r"^prompt 3: token id 97 is outside the vocabulary \[0, 97\)"),
    ([ids([5]), ids([2**70])], GREEDY, r"^prompt 1: token id \d+ is outside the vocabulary"),
    ([ids([5]), ids([5.0])], GREEDY, r"^prompt 1: prompt_token_ids\[0\]: expected an int token id, got 5\.0"),
    ([ids([5]), ids(np.array([[5, 6]]))], GREEDY, r"^prompt 1: prompt_token_ids: expected a list of ints"),
    ([ids([5]), {"prompt_token_ids": [5], "extra": 1}], GREEDY, r"^prompt 1: unknown key 'extra'"),
    ([ids([5]), None], GREEDY, r"^prompt 1: expected a str, .* got NoneType"),
    ([ids([5]), b"bytes"], GREEDY, r"^prompt 1: expected a str, .* got bytes"),
    (b"bytes", GREEDY, r"^prompts: expected a string, a \{'prompt_token_ids': \[\.\.\.\]\} dict, or a list of them, got bytes"),
    (None, GREEDY, r"^prompts: .* got NoneType"),
    (5, GREEDY, r"^prompts: .* got int"),
    (5.0, GREEDY, r"^prompts: .* got float"),
    ([ids([5]), ids([6])], 7, r"^sampling_params: .* got int"),
    ([ids([5]), ids([6])], {"temperature": 0}, r"^sampling_params: expected one SamplingParams or a list of 2 .* got dict"),
    ([ids([5])], "greedy", r"^sampling_params: .* got str"),
    ([ids([5]), ids([6])], [GREEDY] * 3, r"^sampling_params: .* a list of 2 \(one per prompt\), got 3 items"),
    ([ids([5]), ids([6])], [GREEDY, SamplingParams(stop_token_ids=[VOCAB])],
     r"^SamplingParams\.stop_token_ids: token id 97 is outside the vocabulary"),
    ([ids([5]), ids([6])], [GREEDY, SamplingParams(logit_bias={-1: 1.0})], r"^SamplingParams\.logit_bias: token id -1"),
]


@pytest.mark.parametrize("prompts, params, error", BAD_BATCHES)
def test_a_bad_prompt_fails_the_whole_batch_and_runs_nothing(llm, snap, prompts, params, error):
    steps, next_id = llm.scheduler.stats.num_steps, llm.engine._next_id
    if error is None:  # the boundary itself is accepted
        outs = llm.generate(prompts, params, use_tqdm=False)
        assert [len(o.outputs[0].token_ids) for o in outs] == [1, 1]
        assert_idle(llm)
        return
    with pytest.raises(ValueError, match=error):
        llm.generate(prompts, params, use_tqdm=False)
    assert llm.scheduler.stats.num_steps == steps and llm.engine._next_id == next_id
    assert_idle(llm)
    assert outputs(llm) == snap.outputs


def test_prompts_and_params_may_come_from_any_iterable(llm, snap):
    outs = llm.generate((ids(p) for p in PROMPTS), (GREEDY for _ in PROMPTS), use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == snap.outputs
    assert_idle(llm)


def test_stop_strings_need_a_tokenizer_and_text_prompts_too(tied):
    bare = LLM(str(tied), **LLM_ARGS)  # the checkpoint has no tokenizer.json
    with pytest.raises(ValueError, match=r"^SamplingParams\.stop needs a tokenizer"):
        bare.generate([ids([5])], SamplingParams(stop=["x"]), use_tqdm=False)
    with pytest.raises(ValueError, match=r"^prompt 1 is text but there is no tokenizer \(the model folder has "
                                         r"no tokenizer\.json\)"):
        bare.generate([ids([5]), "text"], use_tqdm=False)
    assert_idle(bare)


# -- lifecycle misuse ------------------------------------------------------------------------

MISUSE_CONFIG = [
    ({"load_config": {"seed": 2**63}}, r"LoadConfig\.seed: expected an int in \[0, 2\*\*63\), got 9223372036854775808"),
    ({"load_config": {"seed": -1}}, r"LoadConfig\.seed: expected an int in \[0, 2\*\*63\)"),
    ({"load_config": {"check_finite": "no"}}, r"LoadConfig\.check_finite: expected a bool, got 'no'"),
    ({"model_config": {"initializer_range": "x"}}, r"ModelConfig\.initializer_range: expected a finite number >= 0"),
    ({"model_config": {"initializer_range": -0.02}}, r"ModelConfig\.initializer_range"),
    ({"model_config": {"bos_token_id": [1]}}, r"ModelConfig\.bos_token_id: expected None or a token id"),
    ({"model_config": {"eos_token_ids": [2, -5]}}, r"ModelConfig\.eos_token_ids: expected a tuple of token ids"),
    ({"model_config": {"eos_token_ids": {"a": 1}}}, r"ModelConfig\.eos_token_ids"),
    ({"model_config": {"model": ""}}, r"ModelConfig\.model: expected a non-empty path string or None, got ''"),
    ({"model_config": {"model": 5}}, r"ModelConfig\.model"),
    ({"model_config": {"rms_norm_eps": float("inf")}}, r"ModelConfig\.rms_norm_eps: expected a positive finite float"),
    ({"model_config": {"rms_norm_eps": 1}}, r"ModelConfig\.rms_norm_eps: expected a positive finite float, got 1"),
    ({"model_config": {"rope_theta": 10**400}}, r"ModelConfig\.rope_theta: expected a positive finite number"),
    ({"model_config": {"rope_theta": float("nan")}}, r"ModelConfig\.rope_theta"),
    ({"model_config": {"rope_scaling": {"factor": float("inf"), "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                        "original_max_position_embeddings": 32}}},
     r"RopeScaling\.factor: expected a positive finite number, got inf"),
    ({"model_config": {"rope_scaling": {"factor": 8.0}}}, r"model_config\.rope_scaling: .*missing 3 required"),
    ({"model_config": {"rope_scaling": {"bogus": 1}}}, r"model_config\.rope_scaling: .*unexpected keyword"),
    ({"model_config": {"max_position_embeddings": 32}}, r"max_model_len: 64 exceeds the model's max_position_embeddings \(32\)"),
    ({"model_config": {"num_hidden_layers": 3}}, r"model_config\.num_hidden_layers cannot change on a running runner"),
    ({"model_config": {"dtype": "bfloat16"}}, r"model_config\.dtype cannot change on a running runner"),
    ({"model_config": {"rms_norm_eps": 1e-5}, "load_config": {"load_format": "gguf"}},
     r"LoadConfig\.load_format: unknown 'gguf'"),
    ({"load_config": {"seed": 1}, "cache_config": {"block_size": 8}},
     r"cache_config\.block_size cannot change on a running runner"),
    ({"model_config": None}, r"RunnerConfig\.model_config: expected ModelConfig, got NoneType"),
    ({"model_config": {"architecture": "LlamaForCausalLM"}}, r"model_config\.architecture cannot change"),
    ([("load_config", {})], r"overrides must be a dict of sections, got list"),
]


@pytest.mark.parametrize("overrides, error", MISUSE_CONFIG)
def test_invalid_update_config_changes_nothing(llm, snap, overrides, error):
    with pytest.raises(ValueError, match=error):
        llm.update_config(overrides)
    with pytest.raises(ValueError, match=error):
        llm.collective_rpc("update_config", args=(overrides,))
    assert llm.config is snap.config


def test_misuse_in_a_row_then_everything_still_works(llm, snap, tied):
    """A chain of refused calls, each checked to change nothing, then the whole lifecycle."""
    refusals = [
        (lambda: llm.wake_up(), RuntimeError, r"wake_up\(\) called on a runner that is awake"),
        (lambda: llm.wake_up(["kv_cache"]), RuntimeError, r"the kv cache is not asleep"),
        (lambda: llm.wake_up({"weights"}), ValueError, r"wake_up tags must be a list"),
        (lambda: llm.sleep(level=0), ValueError, r"sleep level must be 1 or 2, got 0"),
        (lambda: llm.sleep(level=True), ValueError, r"sleep level must be 1 or 2, got True"),
        (lambda: llm.reload_weights(weights_path=5), ValueError, r"weights_path: expected a checkpoint folder path, got 5"),
        (lambda: llm.reload_weights(weights_path=""), ValueError, r"weights_path: expected a checkpoint folder path, got ''"),
        (lambda: llm.reload_weights(weights_path=str(tied / "config.json")), CheckpointError, r"is not a folder"),
        (lambda: llm.reload_weights(params=5), CheckpointError, r"params tree does not match the model"),
        (lambda: llm.reload_weights(weights_iterator=5), CheckpointError, r"must yield \(name, array\) pairs, got a int"),
        (lambda: llm.reload_weights(weights_iterator={NORM: "abc"}), CheckpointError, r"has dtype <U3; expected a floating"),
        (lambda: llm.collective_rpc("sleep", args=3), ValueError, r"args must be a tuple"),
        (lambda: llm.collective_rpc("generate"), ValueError, r"unknown method 'generate'"),
        (lambda: llm.collective_rpc("sleep", kwargs={"lvl": 1}), TypeError, r"unexpected keyword argument 'lvl'"),
    ]
    for call, error, message in refusals:
        with pytest.raises(error, match=message):
            call()
        assert llm.config is snap.config and llm.runner.params is snap.params
    assert_unchanged(llm, snap)

    # Asleep: generate, reload and a second sleep are refused; the sleep itself holds.
    llm.sleep(level=1)
    asleep = [
        (lambda: llm.generate([ids([5])], use_tqdm=False), r"asleep \(weights and kv_cache released\): call wake_up\(\)"),
        (lambda: llm.warmup(), r"asleep"),
        (lambda: llm.reload_weights(), r"weights are asleep: call wake_up\(\['weights'\]\) before reload"),
        (lambda: llm.sleep(level=2), r"already asleep"),
    ]
    for call, message in asleep:
        with pytest.raises(RuntimeError, match=message):
            call()
        assert llm.runner.state.sleeping == ("weights", "kv_cache")
    llm.wake_up(["kv_cache"])
    with pytest.raises(RuntimeError, match=r"asleep \(weights released\)"):
        llm.generate([ids([5])], use_tqdm=False)
    with pytest.raises(RuntimeError, match=r"wake_up\('kv_cache'\): the kv cache is not asleep"):
        llm.wake_up(["kv_cache", "weights"])  # refused whole: the weights stay asleep too
    assert llm.runner.state.sleeping == ("weights",)
    llm.wake_up()
    assert outputs(llm) == snap.outputs

    # Level 2, woken without a reload: generation is refused until the reload.
    llm.sleep(level=2)
    llm.wake_up()
    with pytest.raises(RuntimeError, match=r"woken from a level-2 sleep and hold no values: call reload_weights\(\)"):
        llm.generate([ids([5])], use_tqdm=False)
    with pytest.raises(CheckpointError, match=r"lacks .* tensor\(s\) the model needs"):
        llm.reload_weights(weights_iterator=[(NORM, np.ones(40, np.float32))])
    llm.reload_weights()
    assert outputs(llm) == snap.outputs

    # A dummy format cannot reload; switching back to auto can.
    llm.update_config({"load_config": {"load_format": "dummy"}})
    config = llm.config
    with pytest.raises(ValueError, match=r"cannot reload weights with load_format='dummy': there is no weight file"):
        llm.reload_weights()
    assert llm.config is config
    llm.update_config({"load_config": {"load_format": "auto"}})
    llm.reload_weights()
    assert outputs(llm) == snap.outputs
    assert_idle(llm)


def test_failed_reload_after_a_level2_sleep_keeps_the_runner_recoverable(llm, snap, tied, tmp_path):
    """After level 2 the weights hold nothing: a failed reload leaves them so (generation is
    still refused, with the same message), and a good reload then serves as before."""
    bad = _folder(tied, tmp_path / "bad", mutate=_pop(NORM))
    llm.sleep(level=2)
    llm.wake_up()
    for _ in range(2):
        with pytest.raises(CheckpointError, match=r"final_norm \(model\.norm\.weight\)"):
            llm.reload_weights(weights_path=str(bad))
        with pytest.raises(RuntimeError, match=r"call reload_weights\(\) before generating"):
            llm.generate([ids([5])], use_tqdm=False)
    assert llm.config.model_config.model == str(tied)
    llm.reload_weights()
    assert outputs(llm) == snap.outputs
    assert_idle(llm)


# -- faults inside generate --------------------------------------------------------------------

class _Fault:
    """Wraps a callable; its `at`-th call raises `error` (before or after the real call)."""

    def __init__(self, real, at: int, error: BaseException, after: bool = False) -> None:
        self.real, self.at, self.error, self.after, self.calls = real, at, error, after, 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        if self.calls == self.at and not self.after:
            raise self.error
        result = self.real(*args, **kwargs)
        if self.calls == self.at:
            raise self.error
        return result


def _inject(llm: LLM, monkeypatch, where: str, at: int, error: BaseException) -> _Fault:
    targets = {
        "execute_model": (llm.runner, "execute_model", False),
        "execute_model, after the step": (llm.runner, "execute_model", True),
        "multi-step decode, after it wrote the cache": (llm.runner, "run_decode", True),
        "schedule": (llm.scheduler, "schedule", False),
        "engine update, after the step": (engine, "update", True),
        "stop-string detokenizer": (llm.tokenizer, "decode", False),
    }
    obj, name, after = targets[where]
    fault = _Fault(getattr(obj, name), at, error, after)
    monkeypatch.setattr(obj, name, fault)
    return fault


FAULTS = [(where, at, error) for where, at in [
    ("execute_model", 1), ("execute_model", 4), ("execute_model, after the step", 3),
    ("multi-step decode, after it wrote the cache", 3), ("schedule", 5),
    ("engine update, after the step", 5), ("stop-string detokenizer", 2)]
    for error in (KeyboardInterrupt, RuntimeError)]


@pytest.mark.parametrize("where, at, error", FAULTS)
def test_a_fault_mid_generate_loses_nothing(llm, snap, monkeypatch, where, at, error):
    """The call fails with the fault; every request of it is aborted, every block comes back,
    and the next call (which may reuse prefixes cached before the fault) is exact."""
    batch = [ids(p) for p in PROMPTS] + [ids(PROMPTS[0][:4] + [60, 61])]
    params = [GREEDY] * 3 + [SamplingParams(temperature=0, max_tokens=6, stop=["never"])]
    fault = _inject(llm, monkeypatch, where, at, error("injected fault"))
    with pytest.raises(error, match="injected fault"):
        llm.generate(batch, params, use_tqdm=False)
    assert fault.calls == at
    monkeypatch.undo()
    assert_idle(llm)
    assert outputs(llm) == snap.outputs
    assert_idle(llm)


@pytest.mark.parametrize("at", [1, 2, 3])
def test_interrupt_from_the_progress_bar_loses_nothing(llm, snap, monkeypatch, at):
    """The bar's update runs once finished requests are retired: an interrupt there must
    still abort the requests that are running or waiting."""
    calls = []

    class Bar(llm_module.tqdm):
        def update(self, n=1):
            calls.append(n)
            if len(calls) == at:
                raise KeyboardInterrupt
            return super().update(n)

    monkeypatch.setattr(llm_module, "tqdm", Bar)
    lengths = [1, 3, 6, 9]  # the requests finish one after another
    with pytest.raises(KeyboardInterrupt):
        llm.generate([ids(PROMPTS[i % 3]) for i in range(4)],
                     [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for n in lengths], use_tqdm=False)
    assert len(calls) == at
    monkeypatch.undo()
    assert_idle(llm)
    assert outputs(llm) == snap.outputs


def test_faults_in_a_row_then_a_full_batch(llm, snap, monkeypatch):
    """Twenty interrupted calls, each at another step, then a batch needing preemption."""
    rng = np.random.default_rng(3)
    for i in range(20):
        fault = _inject(llm, monkeypatch, "execute_model", int(rng.integers(1, 12)), KeyboardInterrupt())
        prompts = [ids(rng.integers(3, 94, size=int(rng.integers(1, 30))).tolist()) for _ in range(3)]
        try:
            llm.generate(prompts, SamplingParams(temperature=0.8, seed=i, max_tokens=8), use_tqdm=False)
        except KeyboardInterrupt:
            pass
        monkeypatch.undo()
        assert fault.calls >= 1
        assert_idle(llm)
    assert outputs(llm) == snap.outputs
    assert_idle(llm)


def test_interrupt_inside_a_step_after_the_cache_was_donated(hf_checkpoint, monkeypatch):
    """A KeyboardInterrupt raised once the step has taken the donated cache leaves the
    runner with a fresh cache: the next call serves the same tokens."""
    import runner.device.model_runner as model_runner
    from runner import LLM, SamplingParams

    folder, _ = hf_checkpoint("qwen3_tied")
    llm = LLM(str(folder), num_kv_blocks=32, block_size=4, max_model_len=64)
    prompt = {"prompt_token_ids": [5, 6, 7, 8, 9]}
    greedy = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    expected = llm.generate(prompt, greedy, use_tqdm=False)[0].outputs[0].token_ids
    real = model_runner.multi_step

    def interrupted(*args, **kwargs):
        real(*args, **kwargs)  # consumes the donated cache
        raise KeyboardInterrupt

    monkeypatch.setattr(model_runner, "multi_step", interrupted)
    with pytest.raises(KeyboardInterrupt):
        llm.generate(prompt, greedy, use_tqdm=False)
    monkeypatch.setattr(model_runner, "multi_step", real)
    assert llm.generate(prompt, greedy, use_tqdm=False)[0].outputs[0].token_ids == expected
    assert llm.scheduler.pool.num_free_blocks == llm.runner.num_blocks
