"""Weight loading: formats, sharded checkpoints, and every error naming the tensor."""

from __future__ import annotations

import json
import shutil

import jax
import ml_dtypes
import numpy as np
import pytest
import torch
from safetensors.numpy import load_file, save_file

from runner.formats.hf_config import model_config_from_folder, model_config_from_hf
from runner.device.loader import dummy_params, load_params, params_from_checkpoint
from runner.formats.safetensors_io import iter_safetensors
from runner.formats.param_tree import CheckpointError, validate_params
from state.config import LoadConfig, RunnerConfig, SchedulerConfig
from state.params import abstract_params, leaf_paths
from tests import hf_models


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    folder, model = hf_models.save_variant("qwen3_untied_gqa3", tmp_path_factory.mktemp("ckpt"))
    return folder, model


def _copy(folder, tmp_path, mutate=None):
    dst = tmp_path / "copy"
    shutil.copytree(folder, dst)
    if mutate is not None:
        tensors = load_file(dst / "model.safetensors")
        mutate(tensors)
        save_file(tensors, dst / "model.safetensors")
    return dst


def _load(folder, **load):
    cfg = model_config_from_folder(folder)
    config = RunnerConfig(model_config=cfg, load_config=LoadConfig(**load),
                          scheduler_config=SchedulerConfig(max_model_len=64))
    return load_params(config)


def test_loaded_leaves_equal_hf_tensors_transposed(checkpoint):
    folder, model = checkpoint
    params = _load(folder)
    state = {k: v.numpy() for k, v in model.state_dict().items()}
    np.testing.assert_array_equal(params.embed, state["model.embed_tokens.weight"])
    np.testing.assert_array_equal(params.layers[1].wq, state["model.layers.1.self_attn.q_proj.weight"].T)
    np.testing.assert_array_equal(params.lm_head, state["lm_head.weight"].T)
    assert float(params.layers[0].k_scale) == 1.0  # absent from the checkpoint: unscaled


def test_sharded_checkpoint_with_index(checkpoint, tmp_path):
    folder, model = checkpoint
    model.save_pretrained(tmp_path, safe_serialization=True, max_shard_size="20KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    assert len(list(tmp_path.glob("*.safetensors"))) > 1
    a, b = _load(folder), _load(tmp_path)
    assert all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def test_bfloat16_checkpoint_loads_as_bfloat16(checkpoint, tmp_path):
    _, model = checkpoint
    model.to(torch.bfloat16).save_pretrained(tmp_path, safe_serialization=True)
    model.to(torch.float32)
    params = _load(tmp_path)
    assert params.embed.dtype == ml_dtypes.bfloat16


def test_missing_tensor_is_named(checkpoint, tmp_path):
    folder = _copy(checkpoint[0], tmp_path, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(CheckpointError, match=r"checkpoint lacks 1 tensor\(s\) the model needs: layers\.1\.w_up"):
        _load(folder)


def test_unexpected_tensor_is_named(checkpoint, tmp_path):
    def add(t):
        t["model.layers.7.mlp.up_proj.weight"] = np.zeros((72, 40), np.float32)
    with pytest.raises(CheckpointError, match=r"unexpected tensor 'model\.layers\.7\.mlp\.up_proj\.weight'"):
        _load(_copy(checkpoint[0], tmp_path, add))


def test_wrong_shape_message(checkpoint, tmp_path):
    def shrink(t):
        t["model.layers.0.self_attn.k_proj.weight"] = np.zeros((19, 40), np.float32)
    with pytest.raises(CheckpointError) as e:
        _load(_copy(checkpoint[0], tmp_path, shrink))
    assert str(e.value) == ("tensor 'model.layers.0.self_attn.k_proj.weight' has shape (19, 40); "
                            "expected (20, 40)")


def test_non_finite_values_refused_unless_opted_out(checkpoint, tmp_path):
    def poison(t):
        t["model.norm.weight"][3] = np.nan
    folder = _copy(checkpoint[0], tmp_path, poison)
    with pytest.raises(CheckpointError, match=r"'model\.norm\.weight' holds NaN or infinite values"):
        _load(folder)
    assert np.isnan(np.asarray(_load(folder, check_finite=False).final_norm)).any()


def test_index_naming_a_missing_shard(checkpoint, tmp_path):
    folder = _copy(checkpoint[0], tmp_path)
    (folder / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {"model.norm.weight": "model-00002-of-00002.safetensors"}}))
    with pytest.raises(CheckpointError, match=r"names shard\(s\) that do not exist: model-00002-of-00002"):
        _load(folder)


def test_truncated_file(checkpoint, tmp_path):
    folder = _copy(checkpoint[0], tmp_path)
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"truncated or corrupt"):
        _load(folder)


def test_pickle_checkpoint_is_refused(checkpoint, tmp_path):
    folder = tmp_path / "pickled"
    folder.mkdir()
    shutil.copy(checkpoint[0] / "config.json", folder)
    torch.save({"x": torch.zeros(1)}, folder / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match=r"pickle-based weights \(pytorch_model\.bin\).*safetensors"):
        _load(folder)


def test_dummy_weights_are_seeded_and_read_no_file():
    cfg = model_config_from_hf({"architectures": ["LlamaForCausalLM"], "vocab_size": 97,
                                    "hidden_size": 40, "intermediate_size": 72, "num_hidden_layers": 2,
                                    "num_attention_heads": 4, "num_key_value_heads": 2},
                                   model="/nonexistent")
    a, b, c = dummy_params(cfg, 0), dummy_params(cfg, 0), dummy_params(cfg, 1)
    assert all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))
    assert not np.array_equal(a.embed, c.embed)
    assert a.layers[0].q_norm is None and a.lm_head is not None  # Llama: no q/k norm, untied
    assert float(a.final_norm[0]) == 1.0


def test_validate_params_names_the_bad_leaf(checkpoint):
    cfg = model_config_from_folder(checkpoint[0])
    params = dummy_params(cfg, 0)
    validate_params(params, cfg)
    bad = jax.tree.unflatten(jax.tree.structure(params),
                             [x.astype(np.float16) if p == "layers.1.wo" else x
                              for p, x in zip(leaf_paths(params), jax.tree.leaves(params))])
    with pytest.raises(CheckpointError, match=r"leaf 'layers\.1\.wo' has dtype float16; expected float32"):
        validate_params(bad, cfg)
    with pytest.raises(CheckpointError, match=r"params tree does not match the model"):
        validate_params({"embed": params.embed}, cfg)


def test_subset_update_keeps_other_leaves(checkpoint):
    folder, _ = checkpoint
    cfg = model_config_from_folder(folder)
    base = dummy_params(cfg, 0)
    names = dict(iter_safetensors(folder))
    new = params_from_checkpoint([("model.norm.weight", names["model.norm.weight"])], cfg, base=base)
    np.testing.assert_array_equal(new.final_norm, names["model.norm.weight"])
    assert new.embed is base.embed
    assert jax.tree.structure(new) == jax.tree.structure(abstract_params(cfg))
