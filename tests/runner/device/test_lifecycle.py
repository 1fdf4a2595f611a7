"""The weight lifecycle on tiny random checkpoints: update_config, reload_weights,
sleep/wake_up, collective_rpc and orbax, with the flows of vLLM's own tests
(test_deep_sleep, test_end_to_end, test_reload_weights, test_load_model_weights_inplace,
test_update_config)."""

from __future__ import annotations

import dataclasses
import gc
import json
import shutil

import jax
import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from runner import LLM, SamplingParams
from runner.device.compilation import CompileCounter
from runner.device.loader import resolve_format
from runner.device.model_runner import program_params
from runner.formats.safetensors_io import iter_safetensors
from runner.formats.orbax_io import restore_params, save_params
from runner.formats.param_tree import CheckpointError
from state.config import RunnerConfig
from state.params import leaf_paths, param_bytes

LLM_ARGS = dict(num_kv_blocks=32, block_size=4, max_model_len=64)
GREEDY = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, logprobs=1)
PROMPTS = [{"prompt_token_ids": [5, 17, 42, 8, 91, 33]}, {"prompt_token_ids": [9, 9, 4]}]


def run(llm: LLM, prompts=PROMPTS) -> list[tuple[list[int], list[float]]]:
    """Greedy tokens and their log-probabilities, per prompt, computed from scratch: a prompt
    continued from a cached prefix runs in other chunks, which moves log-probabilities in the
    last float32 bit, and these tests compare exactly."""
    llm.reset_prefix_cache()
    outs = llm.generate(prompts, GREEDY, use_tqdm=False)
    return [(o.outputs[0].token_ids, [lp[t] for lp, t in zip(o.outputs[0].logprobs, o.outputs[0].token_ids)])
            for o in outs]


def leaves(llm: LLM) -> dict[str, np.ndarray]:
    params = llm.runner.params
    return dict(zip(leaf_paths(params), (np.asarray(x) for x in jax.tree.leaves(params))))


def live_bytes() -> int:
    gc.collect()
    return sum(a.nbytes for a in jax.live_arrays() if not a.is_deleted())


def kv_bytes(llm: LLM) -> int:
    return param_bytes(llm.runner.state.kv_cache)


# -- checkpoints ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def untied(hf_checkpoint):
    return hf_checkpoint("llama3_rope")[0]


@pytest.fixture(scope="module")
def reference(tied, other):
    """Outputs of fresh loads: the targets every reload must reproduce exactly."""
    return {"tied": run(LLM(str(tied), **LLM_ARGS)), "other": run(LLM(str(other), **LLM_ARGS))}


@pytest.fixture(scope="module")
def llm(tied):
    """One runner on `tied`, shared by the tests that leave it serving `tied` again."""
    return LLM(str(tied), **LLM_ARGS)


def _variant_folder(src, dst, mutate=None, config=None):
    shutil.copytree(src, dst)
    if mutate is not None:
        tensors = load_file(dst / "model.safetensors")
        mutate(tensors)
        save_file(tensors, dst / "model.safetensors", metadata={"format": "pt"})
    if config is not None:
        hf = json.loads((dst / "config.json").read_text())
        (dst / "config.json").write_text(json.dumps({**hf, **config}))
    return dst


# -- sleep and wake_up ---------------------------------------------------------------------

def test_deep_sleep_reload_wake_gives_identical_outputs(tied, reference):
    base = live_bytes()
    llm = LLM(str(tied), **LLM_ARGS)
    before = run(llm)
    assert before == reference["tied"]
    resident = param_bytes(llm.runner.params) + kv_bytes(llm)
    awake = live_bytes() - base
    assert awake >= resident

    llm.sleep(level=2)
    asleep = live_bytes() - base
    print(f"\nlevel 2: live device bytes awake {awake}, asleep {asleep} (weights + KV = {resident})")
    assert asleep < 0.05 * resident
    with pytest.raises(RuntimeError, match=r"asleep \(weights and kv_cache released\): call wake_up\(\)"):
        llm.generate(PROMPTS, GREEDY, use_tqdm=False)

    llm.wake_up(["weights"])
    with pytest.raises(RuntimeError, match=r"asleep \(kv_cache released\)"):
        llm.generate(PROMPTS, GREEDY, use_tqdm=False)
    assert llm.collective_rpc("reload_weights") == [None]
    llm.wake_up(["kv_cache"])
    with CompileCounter() as compiles:
        after = run(llm)
    assert after == before
    assert compiles.count == 0


def test_deep_sleep_wake_all_before_reload_is_a_clear_error(llm, reference):
    llm.sleep(level=2)
    llm.wake_up()
    with pytest.raises(RuntimeError, match=r"woken from a level-2 sleep and hold no values: call reload_weights\(\)"):
        llm.generate(PROMPTS, GREEDY, use_tqdm=False)
    # Nothing to borrow untouched leaves from: a partial reload is refused, the runner stays stale.
    with pytest.raises(CheckpointError, match=r"lacks .* tensor\(s\) the model needs"):
        llm.reload_weights(weights_iterator=[("model.norm.weight", np.ones(40, np.float32))])
    with pytest.raises(RuntimeError, match="call reload_weights"):
        llm.generate(PROMPTS, GREEDY, use_tqdm=False)
    llm.reload_weights()
    assert run(llm) == reference["tied"]


def test_level1_sleep_keeps_weights_on_host(tied, reference):
    base = live_bytes()
    llm = LLM(str(tied), **LLM_ARGS)
    before = run(llm)
    resident = param_bytes(llm.runner.params) + kv_bytes(llm)
    awake = live_bytes() - base
    llm.sleep(level=1)
    asleep = live_bytes() - base
    print(f"\nlevel 1: live device bytes awake {awake}, asleep {asleep} (weights + KV = {resident})")
    assert asleep < 0.05 * resident
    assert llm.runner.state.host_params is not None
    with pytest.raises(RuntimeError, match="asleep"):
        llm.generate(PROMPTS, GREEDY, use_tqdm=False)
    llm.wake_up()
    with CompileCounter() as compiles:
        assert run(llm) == before == reference["tied"]
    assert compiles.count == 0


def test_sleep_and_wake_up_errors(llm, reference):
    with pytest.raises(RuntimeError, match=r"wake_up\(\) called on a runner that is awake"):
        llm.wake_up()
    with pytest.raises(RuntimeError, match=r"wake_up\('weights'\): the weights is not asleep"):
        llm.wake_up(["weights"])
    with pytest.raises(ValueError, match=r"sleep level must be 1 or 2, got 3"):
        llm.sleep(level=3)
    llm.sleep(level=1)
    with pytest.raises(RuntimeError, match=r"already asleep \(weights, kv_cache released\)"):
        llm.sleep(level=1)
    with pytest.raises(ValueError, match=r"unknown wake_up tag 'gpu'; valid tags: weights, kv_cache"):
        llm.wake_up(["gpu"])
    with pytest.raises(RuntimeError, match=r"weights are asleep: call wake_up\(\['weights'\]\) before reload"):
        llm.reload_weights()
    llm.wake_up("kv_cache")  # one tag as a plain string
    with pytest.raises(RuntimeError, match=r"wake_up\('kv_cache'\): the kv cache is not asleep"):
        llm.wake_up(["kv_cache"])
    with pytest.raises(RuntimeError, match=r"asleep \(weights released\)"):
        llm.generate(PROMPTS, GREEDY, use_tqdm=False)
    llm.wake_up(["weights"])
    assert run(llm) == reference["tied"]


def test_sleep_resets_the_prefix_cache(llm):
    stats = llm.scheduler.stats
    run(llm)
    cached = stats.num_cached_prompt_tokens
    llm.generate(PROMPTS, GREEDY, use_tqdm=False)
    assert stats.num_cached_prompt_tokens > cached  # the 6-token prompt reuses a full block
    cached = stats.num_cached_prompt_tokens
    llm.sleep(level=1)
    llm.wake_up()
    llm.generate(PROMPTS, GREEDY, use_tqdm=False)
    assert stats.num_cached_prompt_tokens == cached


# -- update_config -------------------------------------------------------------------------

def test_update_config_returns_a_new_record(tied):
    llm = LLM(str(tied), load_format="dummy", **LLM_ARGS)
    old = llm.config
    new = llm.update_config({"load_config": {"load_format": "auto"}})
    assert isinstance(new, RunnerConfig) and new is not old
    assert llm.config is new and llm.runner.state.config is new
    assert new.load_config.load_format == "auto"
    assert old.load_config.load_format == "dummy"  # the old record is untouched
    assert new.model_config == old.model_config and new.cache_config is old.cache_config


@pytest.mark.parametrize("overrides, error", [
    ({"scheduler_config": {"max_model_len": 32}},
     r"scheduler_config\.max_model_len cannot change on a running runner \(it changes the KV cache layout\)"),
    ({"foo": {}}, r"unknown config section 'foo'; valid sections: cache_config, load_config, model_config"),
    ({"load_config": {"load_fromat": "auto"}}, r"unknown config field load_config\.'load_fromat'"),
    ({"load_config": {"load_format": "pickle"}}, r"LoadConfig\.load_format: unknown 'pickle'"),
    ({"model_config": {"hidden_size": 48}},
     r"model_config\.hidden_size cannot change on a running runner \(it changes parameter shapes or the "
     r"device mesh\); "
     r"build a new LLM"),
    ({"model_config": {"tie_word_embeddings": False}}, r"model_config\.tie_word_embeddings cannot change"),
    ({"load_config": "auto"}, r"RunnerConfig\.load_config: expected LoadConfig, got str"),
    ("auto", r"overrides must be a dict of sections, got str"),
])
def test_update_config_refusals_leave_the_config_unchanged(tied, overrides, error):
    llm = LLM(str(tied), load_format="dummy", **LLM_ARGS)
    old = llm.config
    with pytest.raises(ValueError, match=error):
        llm.update_config(overrides)
    assert llm.config is old


def test_update_config_through_collective_rpc(tied):
    llm = LLM(str(tied), load_format="dummy", **LLM_ARGS)
    results = llm.collective_rpc("update_config", args=({"load_config": {"load_format": "auto"}},))
    assert len(results) == 1 and results[0] is llm.config
    assert llm.config.load_config.load_format == "auto"
    results = llm.collective_rpc("update_config", kwargs={"overrides": {"load_config": {"seed": 7}}})
    assert len(results) == 1 and results[0].load_config.seed == 7
    assert llm.config.load_config == dataclasses.replace(results[0].load_config)
    with pytest.raises(ValueError, match=r"collective_rpc: unknown method 'shutdown'; supported: update_config"):
        llm.collective_rpc("shutdown")
    with pytest.raises(ValueError, match=r"args must be a tuple of positional arguments, got dict"):
        llm.collective_rpc("update_config", args={"load_config": {}})


# -- dummy start, then the real weights ----------------------------------------------------

@pytest.mark.parametrize("name", ["tied", "untied"])
def test_dummy_start_then_real_weights_equals_a_fresh_load(name, request):
    folder = request.getfixturevalue(name)
    fresh = LLM(str(folder), **LLM_ARGS)
    expected = run(fresh)
    llm = LLM(str(folder), load_format="dummy", **LLM_ARGS)
    real, dummy = leaves(fresh), leaves(llm)
    assert real.keys() == dummy.keys()
    assert ("lm_head" in real) == (name == "untied")
    assert not np.array_equal(real["embed"], dummy["embed"])
    assert not np.array_equal(real["layers.1.w_down"], dummy["layers.1.w_down"])

    with pytest.raises(ValueError, match=r"cannot reload weights with load_format='dummy'.*update_config"):
        llm.reload_weights()
    llm.update_config({"load_config": {"load_format": "auto"}})
    llm.reload_weights()
    reloaded = leaves(llm)
    for path in real:
        np.testing.assert_array_equal(reloaded[path], real[path], err_msg=path)
    with CompileCounter() as compiles:
        assert run(llm) == expected  # tokens and log-probabilities, exactly
    assert compiles.count == 0  # the fresh runner compiled these shapes already


# -- other sources -------------------------------------------------------------------------

def test_update_config_model_path_then_reload(llm, tied, other, reference):
    assert reference["other"] != reference["tied"]
    config = llm.update_config({"model_config": {"model": str(other)}})
    assert config.model_config.model == str(other)
    assert run(llm) == reference["tied"]  # the path alone changes nothing until the reload
    llm.reload_weights()
    assert run(llm) == reference["other"]
    llm.reload_weights(weights_path=str(tied))
    assert llm.config.model_config.model == str(tied)
    assert run(llm) == reference["tied"]


def test_reload_weights_path(tied, other, reference):
    llm = LLM(str(tied), **LLM_ARGS)
    old = llm.config
    llm.reload_weights(weights_path=str(other))
    assert llm.config.model_config.model == str(other)
    assert old.model_config.model == str(tied)
    assert run(llm) == reference["other"]


def test_programs_read_a_tied_projection_from_its_own_copy(llm):
    """On CPU the step programs read a tied model's projection as a [D, V] copy of the
    embedding (`program_params`); the record keeps its tied tree, and a tree that has its
    own lm_head is used as it is. (That the copy follows reloads and goes with a sleep is
    what the reload and sleep tests above check by their outputs and live bytes.)"""
    params = llm.runner.params
    view = program_params(params)
    assert params.lm_head is None and view.embed is params.embed and view.layers is params.layers
    np.testing.assert_array_equal(np.asarray(view.lm_head), np.asarray(params.embed).T)
    assert program_params(view) is view


def test_reload_from_an_iterator_of_checkpoint_tensors(llm, tied, other, reference):
    llm.reload_weights(weights_iterator=iter_safetensors(other))
    assert run(llm) == reference["other"]

    # A subset updates exactly those tensors.
    llm.reload_weights(weights_iterator=iter_safetensors(tied))
    before = leaves(llm)
    theirs = load_file(other / "model.safetensors")
    name = "model.layers.1.mlp.down_proj.weight"
    llm.reload_weights(weights_iterator=[(name, theirs[name])])
    after = leaves(llm)
    np.testing.assert_array_equal(after["layers.1.w_down"], theirs[name].T)
    assert not np.array_equal(after["layers.1.w_down"], before["layers.1.w_down"])
    for path in before:
        if path != "layers.1.w_down":
            np.testing.assert_array_equal(after[path], before[path], err_msg=path)
    llm.reload_weights(weights_iterator={name: load_file(tied / "model.safetensors")[name]})  # a dict works too
    assert run(llm) == reference["tied"]


def test_reload_from_a_params_tree_and_runner_layout_leaves(llm, other, reference):
    theirs = LLM(str(other), **LLM_ARGS).runner.params
    llm.reload_weights(params=theirs)
    assert run(llm) == reference["other"]
    # The runner holds its own copy: sleeping frees it, never the caller's arrays.
    assert llm.runner.params.embed is not theirs.embed
    llm.sleep(level=2)
    assert not theirs.embed.is_deleted()
    llm.wake_up()

    llm.reload_weights(weights_iterator=zip(leaf_paths(theirs), jax.tree.leaves(theirs)),
                       is_checkpoint_format=False)
    assert run(llm) == reference["other"]
    llm.reload_weights()  # back to the configured folder
    assert run(llm) == reference["tied"]


def test_reload_keeps_placement_and_resets_the_prefix_cache(llm, reference):
    stats = llm.scheduler.stats
    run(llm)
    cached = stats.num_cached_prompt_tokens
    llm.generate(PROMPTS, GREEDY, use_tqdm=False)
    assert stats.num_cached_prompt_tokens > cached  # without a reload the prefix is reused
    committed = [x.committed for x in jax.tree.leaves(llm.runner.params)]
    cached = stats.num_cached_prompt_tokens
    llm.reload_weights()
    assert [x.committed for x in jax.tree.leaves(llm.runner.params)] == committed
    with CompileCounter() as compiles:
        outs = llm.generate(PROMPTS, GREEDY, use_tqdm=False)
    print(f"\ncompilations in the generate after reload_weights: {compiles.count}")
    assert compiles.count == 0
    assert stats.num_cached_prompt_tokens == cached  # KV computed by the old weights is not reused
    assert [o.outputs[0].token_ids for o in outs] == [tokens for tokens, _ in reference["tied"]]


# -- failed reloads ------------------------------------------------------------------------

def _drop_norm(t):
    del t["model.norm.weight"]


def _zero_scale(t):
    t["model.layers.0.self_attn.k_scale"] = np.zeros((), np.float32)


BAD_SOURCES = {
    "wrong shape": (dict(weights_iterator=[("model.embed_tokens.weight", np.zeros((97, 41), np.float32))]),
                    r"tensor 'model\.embed_tokens\.weight' has shape \(97, 41\); expected \(97, 40\)"),
    "unexpected name": (dict(weights_iterator=[("model.layers.0.self_attn.foo.weight", np.zeros(3, np.float32))]),
                        r"unexpected tensor 'model\.layers\.0\.self_attn\.foo\.weight'"),
    "layer out of range": (dict(weights_iterator=[("model.layers.2.mlp.up_proj.weight", np.zeros((72, 40), np.float32))]),
                           r"unexpected tensor 'model\.layers\.2\.mlp\.up_proj\.weight': not a weight of a 2-layer"),
    "integer tensor": (dict(weights_iterator=[("model.norm.weight", np.ones(40, np.int32))]),
                       r"tensor 'model\.norm\.weight' has dtype int32; expected a floating type"),
    "nan": (dict(weights_iterator=[("model.norm.weight", np.full(40, np.nan, np.float32))]),
            r"tensor 'model\.norm\.weight' holds NaN or infinite values"),
    "duplicate": (dict(weights_iterator=[("model.norm.weight", np.ones(40, np.float32))] * 2),
                  r"tensor 'model\.norm\.weight' appears twice"),
    "not a pair": (dict(weights_iterator=["model.norm.weight"]),
                   r"weights_iterator item 0 is not a \(name, array\) pair: got str"),
    "runner layout, unknown leaf": (dict(weights_iterator=[("layers.0.foo", np.ones(3, np.float32))],
                                         is_checkpoint_format=False), r"unexpected leaf 'layers\.0\.foo'"),
    "runner layout, wrong dtype": (dict(weights_iterator=[("final_norm", np.ones(40, np.float16))],
                                        is_checkpoint_format=False),
                                   r"leaf 'final_norm' has dtype float16; expected float32 \(convert explicitly"),
    "runner layout, nan": (dict(weights_iterator=[("final_norm", np.full(40, np.nan, np.float32))],
                                is_checkpoint_format=False), r"leaf 'final_norm' holds NaN or infinite values"),
    "two sources": (dict(weights_path=".", weights_iterator=[]),
                    r"at most one weight source, got weights_path, weights_iterator"),
    "no such folder": (dict(weights_path="/nonexistent/folder"), r"'/nonexistent/folder' is not a folder"),
}
BAD_FOLDERS = {
    "missing tensor": (_drop_norm, None,
                       r"checkpoint lacks 1 tensor\(s\) the model needs: final_norm \(model\.norm\.weight\)"),
    "zero kv scale": (_zero_scale, None, r"'model\.layers\.0\.self_attn\.k_scale' is 0\.0; a KV cache scale "
                                         r"must be a positive number"),
    "other rope": (None, {"rope_parameters": {"rope_theta": 20000.0, "rope_type": "default"}},
                   r"holds a different model than the runner serves \(rope_theta: checkpoint 20000\.0, "
                   r"runner 10000\.0\)"),
}


@pytest.mark.parametrize("case", sorted(BAD_SOURCES))
def test_failed_reload_changes_nothing(llm, reference, case):
    kwargs, error = BAD_SOURCES[case]
    config = llm.config
    with pytest.raises((CheckpointError, ValueError), match=error):
        llm.reload_weights(**kwargs)
    assert llm.config is config
    assert run(llm) == reference["tied"]


@pytest.mark.parametrize("case", sorted(BAD_FOLDERS))
def test_failed_reload_from_a_folder_changes_nothing(llm, tied, tmp_path, reference, case):
    mutate, config_change, error = BAD_FOLDERS[case]
    folder = _variant_folder(tied, tmp_path / "bad", mutate, config_change)
    config = llm.config
    with pytest.raises(CheckpointError, match=error):
        llm.reload_weights(weights_path=str(folder))
    assert llm.config is config and llm.config.model_config.model == str(tied)
    assert run(llm) == reference["tied"]


def test_failed_reload_of_a_truncated_file_changes_nothing(llm, tied, tmp_path, reference):
    folder = _variant_folder(tied, tmp_path / "truncated")
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[:len(data) // 2])
    with pytest.raises(CheckpointError, match=r"model\.safetensors.*truncated or corrupt safetensors file"):
        llm.reload_weights(weights_path=str(folder))
    # The same folder named through update_config: the reload fails, the weights stay.
    llm.update_config({"model_config": {"model": str(folder)}})
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        llm.reload_weights()
    llm.update_config({"model_config": {"model": str(tied)}})
    assert run(llm) == reference["tied"]


def test_failed_reload_of_another_architecture_changes_nothing(llm, untied, reference):
    with pytest.raises(CheckpointError, match=r"holds a different model than the runner serves \(architecture: "
                                              r"checkpoint 'LlamaForCausalLM', runner 'Qwen3ForCausalLM'"):
        llm.reload_weights(weights_path=str(untied))
    theirs = LLM(str(untied), load_format="dummy", **LLM_ARGS).runner.params
    with pytest.raises(CheckpointError, match=r"params tree does not match the model: missing leaves "
                                              r"\['layers\.0\.k_norm'.*unexpected leaves \['lm_head'\]"):
        llm.reload_weights(params=theirs)
    assert run(llm) == reference["tied"]


def test_failed_reload_of_a_wrongly_typed_tree_changes_nothing(llm, reference):
    mine = llm.runner.params
    as_bf16 = jax.tree.map(lambda x: x.astype(ml_dtypes.bfloat16), mine)
    with pytest.raises(CheckpointError, match=r"leaf 'embed' has dtype bfloat16; expected float32"):
        llm.reload_weights(params=as_bf16)
    with pytest.raises(CheckpointError, match=r"leaf 'final_norm' has shape \(41,\); expected \(40,\)"):
        llm.reload_weights(params=dataclasses.replace(mine, final_norm=np.ones(41, np.float32)))
    with pytest.raises(CheckpointError, match=r"leaf 'final_norm' holds NaN or infinite values"):
        llm.reload_weights(params=dataclasses.replace(mine, final_norm=np.full(40, np.inf, np.float32)))
    with pytest.raises(CheckpointError, match=r"the model's leaves in other containers"):
        llm.reload_weights(params=dataclasses.replace(mine, layers=list(mine.layers)))
    assert run(llm) == reference["tied"]


# -- orbax ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def orbax_folders(tmp_path_factory, tied, other):
    root = tmp_path_factory.mktemp("orbax")
    folders = {}
    for name, src in (("tied", tied), ("other", other)):
        params = LLM(str(src), **LLM_ARGS).runner.params
        folders[name] = save_params(root / name, params, LLM(str(src), load_format="dummy", **LLM_ARGS)
                                    .config.model_config)
    return folders


def test_orbax_round_trip_serves_the_same_outputs(orbax_folders, reference):
    folder = orbax_folders["tied"]
    assert (folder / "config.json").is_file()
    llm = LLM(str(folder), load_format="orbax", **LLM_ARGS)
    assert resolve_format(dataclasses.replace(
        llm.config, load_config=dataclasses.replace(llm.config.load_config, load_format="auto"))) == "orbax"
    assert run(llm) == reference["tied"]
    llm.reload_weights(weights_path=str(orbax_folders["other"]))
    with CompileCounter() as compiles:
        assert run(llm) == reference["other"]
    assert compiles.count == 0
    assert llm.config.model_config.model == str(orbax_folders["other"])


def test_orbax_auto_detection_and_reload_into_a_safetensors_runner(llm, orbax_folders, reference):
    llm.reload_weights(weights_path=str(orbax_folders["other"]))  # load_format "auto" finds orbax
    assert run(llm) == reference["other"]
    llm.reload_weights(weights_path=str(orbax_folders["tied"]))
    assert run(llm) == reference["tied"]


def test_orbax_mismatched_tree_is_a_checkpoint_error(llm, untied, tmp_path, reference):
    theirs = LLM(str(untied), **LLM_ARGS)
    folder = save_params(tmp_path / "llama", theirs.runner.params)  # no config.json: only the tree tells
    assert not (folder / "config.json").exists()
    with pytest.raises(CheckpointError, match=r"does not fit the model: missing leaves \['layers\.0\.q_norm', 'layers\.0\.k_norm'.*"
                                              r"unexpected leaves \['lm_head'\]"):
        restore_params(folder, llm.config.model_config)
    with pytest.raises(CheckpointError, match="has no readable config.json"):
        llm.reload_weights(weights_path=str(folder))
    with pytest.raises(CheckpointError, match="does not fit the model"):
        llm.reload_weights(weights_path=str(folder), assume_same_model=True)
    assert llm.config.model_config.model != str(folder)
    assert run(llm) == reference["tied"]

    wider = dataclasses.replace(llm.config.model_config, intermediate_size=80)
    with pytest.raises(CheckpointError, match=r"stores leaf 'layers\.0\.w_gate' with shape \(40, 72\); "
                                              r"the model expects \(40, 80\)"):
        restore_params(save_params(tmp_path / "tied", llm.runner.params), wider)
    with pytest.raises(CheckpointError, match="holds no orbax checkpoint"):
        restore_params(tmp_path, llm.config.model_config)


def test_orbax_save_refusals(llm, tmp_path):
    folder = save_params(tmp_path / "a", llm.runner.params, llm.config.model_config)
    with pytest.raises(FileExistsError, match="already exists; pass force=True"):
        save_params(folder, llm.runner.params)
    save_params(folder, llm.runner.params, force=True)
    wider = dataclasses.replace(llm.config.model_config, intermediate_size=80)
    with pytest.raises(CheckpointError, match=r"leaf 'layers\.0\.w_gate' has shape \(40, 72\); expected \(40, 80\)"):
        save_params(tmp_path / "b", llm.runner.params, wider)
    assert not (tmp_path / "b").exists()


# -- known gap -----------------------------------------------------------------------------

def test_sleep_never_frees_a_callers_params(tied):
    """A tree handed to `LLM.from_params` stays usable by its owner (e.g. training code)
    after the runner sleeps."""
    source = LLM(str(tied), **LLM_ARGS)
    params = source.runner.params
    llm = LLM.from_params(source.config.model_config, params, **LLM_ARGS)
    llm.sleep(level=2)
    assert not params.embed.is_deleted()
