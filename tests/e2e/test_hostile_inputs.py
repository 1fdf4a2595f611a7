"""Files that lie or block: FIFOs and symlink loops where config.json or weights should be,
JSON nested past any sane depth, safetensors headers claiming tensors far larger than the
file or the machine, and values peers exchange in multi-process runs.

Every case must end in the documented error (a ValueError; a CheckpointError for weights)
naming the file, within seconds; a FIFO case that blocks is released and fails.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import struct
import subprocess
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

import runner.formats.safetensors_io as safetensors_io
from runner.formats.hf_config import model_config_from_folder, model_config_from_hf
from runner.formats.param_tree import CheckpointError
from runner.formats.safetensors_io import iter_safetensors, safetensors_files

HF_CONFIG = {"architectures": ["Qwen3ForCausalLM"], "vocab_size": 97, "hidden_size": 40,
             "intermediate_size": 72, "num_hidden_layers": 2, "num_attention_heads": 4,
             "num_key_value_heads": 2, "head_dim": 12}
DEEP = "[" * 100_000 + "]" * 100_000  # far past Python's recursion limit
SECONDS = 10


def header_file(path: Path, header: dict | bytes, data_size: int = 0, header_len: int | None = None) -> Path:
    """A safetensors file whose data section is `data_size` zero bytes, written sparse."""
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw) if header_len is None else header_len) + raw)
        f.truncate(8 + len(raw) + data_size)
    return path


def raised_without_blocking(call: Callable[[], object], fifo: Path) -> BaseException | None:
    """What `call` raised (None if nothing), failing the test if it blocked on `fifo`.

    A blocked open() holds the interpreter (signals and threads wait too), so a separate
    process releases it: after SECONDS it notes that it fired and opens the FIFO's write end,
    which lets a blocked reader through to end-of-file.
    """
    fired = fifo.with_name(fifo.name + ".fired")
    watchdog = subprocess.Popen(["sh", "-c", f'sleep {SECONDS}; touch "{fired}"; : > "{fifo}"'])
    try:
        call()
        raised = None
    except BaseException as e:  # noqa: BLE001 - handed to the test
        raised = e
    finally:
        watchdog.kill()
        watchdog.wait()
    if fired.exists():
        pytest.fail(f"blocked on the FIFO {fifo} (then raised {raised!r})")
    return raised


def assert_refused(call: Callable[[], object], fifo: Path, error: type[BaseException], pattern: str) -> None:
    raised = raised_without_blocking(call, fifo)
    assert isinstance(raised, error), f"expected {error.__name__}, got {raised!r}"
    assert re.search(pattern, str(raised)), str(raised)


def entry(dtype: str, shape: list[int], start: int = 0) -> dict:
    size = int(np.prod(shape)) * {"F32": 4, "F16": 2, "U8": 1}[dtype]
    return {"dtype": dtype, "shape": shape, "data_offsets": [start, start + size]}


# -- config.json ---------------------------------------------------------------------------


def test_config_json_fifo_is_refused_without_blocking(tmp_path):
    os.mkfifo(tmp_path / "config.json")
    assert_refused(lambda: model_config_from_folder(tmp_path), tmp_path / "config.json", ValueError,
                   r"config\.json is a FIFO, not a regular file")


def test_config_json_symlink_loop_is_a_value_error(tmp_path):
    os.symlink(tmp_path / "config.json", tmp_path / "config.json")
    with pytest.raises(ValueError, match=r"cannot open .*config\.json: Too many levels of symbolic links"):
        model_config_from_folder(tmp_path)


def test_config_json_that_is_a_folder_is_a_value_error(tmp_path):
    (tmp_path / "config.json").mkdir()
    with pytest.raises(ValueError, match=r"config\.json is a directory, not a regular file"):
        model_config_from_folder(tmp_path)


def test_deeply_nested_config_json_is_a_value_error(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({**HF_CONFIG, "extra": 0})[:-1] + ', "deep": ' + DEEP + "}")
    with pytest.raises(ValueError, match=r"config\.json is not valid JSON: nested deeper than 64 levels"):
        model_config_from_folder(tmp_path)
    # Nesting a little past the bound, which json itself parses, is refused the same way.
    (tmp_path / "config.json").write_text(json.dumps({**HF_CONFIG, "deep": [[[0]]] * 2})[:-1]
                                          + ', "deeper": ' + "[" * 70 + "]" * 70 + "}")
    with pytest.raises(ValueError, match=r"nested deeper than 64 levels"):
        model_config_from_folder(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({**HF_CONFIG, "quantization_config": {"a": {"b": [[1]]}}}))
    assert model_config_from_folder(tmp_path).vocab_size == 97


# -- the safetensors index and weight files ------------------------------------------------


def test_index_fifo_is_refused_without_blocking(tmp_path):
    os.mkfifo(tmp_path / safetensors_io.INDEX_FILE)
    assert_refused(lambda: safetensors_files(tmp_path), tmp_path / safetensors_io.INDEX_FILE, CheckpointError,
                   r"model\.safetensors\.index\.json is a FIFO, not a regular file")


def test_index_symlink_loop_is_a_checkpoint_error(tmp_path):
    os.symlink(tmp_path / safetensors_io.INDEX_FILE, tmp_path / safetensors_io.INDEX_FILE)
    with pytest.raises(CheckpointError, match=r"cannot open .*index\.json: Too many levels of symbolic links"):
        safetensors_files(tmp_path)


def test_deeply_nested_index_is_a_checkpoint_error(tmp_path):
    (tmp_path / safetensors_io.INDEX_FILE).write_text('{"weight_map": ' + DEEP + "}")
    with pytest.raises(CheckpointError, match=r"index\.json is not a valid safetensors index: nested deeper"):
        safetensors_files(tmp_path)


def test_index_naming_a_fifo_shard_is_refused_without_blocking(tmp_path):
    os.mkfifo(tmp_path / "model-00001-of-00001.safetensors")
    (tmp_path / safetensors_io.INDEX_FILE).write_text(json.dumps({"weight_map": {"a": "model-00001-of-00001.safetensors"}}))
    assert_refused(lambda: list(iter_safetensors(tmp_path)), tmp_path / "model-00001-of-00001.safetensors",
                   CheckpointError, r"model-00001-of-00001\.safetensors is a FIFO")


def test_safetensors_fifo_is_refused_without_blocking(tmp_path):
    save_file({"a": np.ones(3, np.float32)}, tmp_path / "a.safetensors")
    os.mkfifo(tmp_path / "b.safetensors")
    assert_refused(lambda: list(iter_safetensors(tmp_path)), tmp_path / "b.safetensors", CheckpointError,
                   r"b\.safetensors is a FIFO, not a regular file")


def test_reads_what_safetensors_writes(tmp_path):
    tensors = {"b": np.arange(6, dtype=np.float32).reshape(2, 3), "a": np.float16([1.5, -2]),
               "c": np.zeros((0, 4), np.float32), "d": np.array(3.0, np.float64), "e": np.int32([7, 8])}
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    got = list(iter_safetensors(tmp_path))
    assert [n for n, _ in got] == sorted(tensors)
    for name, array in got:
        assert array.dtype == tensors[name].dtype and array.shape == tensors[name].shape
        np.testing.assert_array_equal(array, tensors[name])


TERABYTE = 2**40


@pytest.mark.parametrize("size", [TERABYTE, 32 * 2**30])
def test_tensor_claimed_past_the_end_is_refused_from_the_header(tmp_path, size):
    header_file(tmp_path / "model.safetensors", {"x": entry("F32", [size // 4])}, data_size=16)
    with pytest.raises(CheckpointError, match=r"cannot read .*model\.safetensors: incomplete metadata, file not "
                                              r"fully covered.*\(truncated or corrupt safetensors file\?\)"):
        list(iter_safetensors(tmp_path))


def test_consistent_terabyte_tensor_is_refused_without_allocating(tmp_path):
    """The file really holds 1 TB (sparse): more than the machine's memory, refused by size."""
    header_file(tmp_path / "model.safetensors", {"x": entry("F32", [TERABYTE // 4])}, data_size=TERABYTE)
    with pytest.raises(CheckpointError, match=r"tensor 'x' in .*model\.safetensors takes "
                                              r"1099511627776 bytes, more than this machine's"):
        list(iter_safetensors(tmp_path))


def test_unknown_names_are_refused_from_the_header_before_any_tensor_is_read(tmp_path, monkeypatch):
    """A filter refuses a 2 GiB tensor by name: no tensor of the folder is read first."""
    save_file({"a": np.ones(3, np.float32)}, tmp_path / "a.safetensors")
    header_file(tmp_path / "b.safetensors", {"huge": entry("U8", [2**31]), "small": entry("U8", [4], 2**31)},
                data_size=2**31 + 4)
    reads = []
    real_read = safetensors_io._read_tensor
    monkeypatch.setattr(safetensors_io, "_read_tensor", lambda *args: reads.append(args[1]) or real_read(*args))
    with pytest.raises(CheckpointError, match=r"unexpected tensor 'huge' in .*b\.safetensors"):
        list(iter_safetensors(tmp_path, expected=lambda name: name in ("a", "small")))
    assert reads == []
    tensors = iter_safetensors(tmp_path, expected=lambda name: name != "nothing")
    assert next(tensors)[0] == "a" and reads == ["a"]  # names it accepts are read as usual
    tensors.close()


def test_a_filter_may_refuse_with_its_own_message(tmp_path):
    save_file({"a": np.ones(3, np.float32)}, tmp_path / "a.safetensors")

    def expected(name: str) -> bool:
        raise CheckpointError(f"unexpected tensor {name!r}: not a weight of this model")
    with pytest.raises(CheckpointError, match=r"unexpected tensor 'a': not a weight of this model"):
        next(iter_safetensors(tmp_path, expected=expected))


LYING_HEADERS = {
    "header length past 100 MB": (b"{}", 100_000_001, r"header too large: 100000001 bytes"),
    "nested header": (('{"__metadata__": {"a": ' + DEEP + "}}").encode(), None,
                      r"invalid JSON in header: nested deeper than 64 levels"),
    "shape of a bool": ({"x": {"dtype": "U8", "shape": [True], "data_offsets": [0, 1]}}, None,
                        r"invalid JSON in header: tensor 'x': shape must be a list of ints"),
    "offsets of three": ({"x": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1, 2]}}, None,
                         r"invalid JSON in header: tensor 'x': data_offsets must be two ints"),
    "metadata not strings": ({"__metadata__": {"a": 1}}, None,
                             r"invalid JSON in header: __metadata__ must map strings to strings"),
    "entry not an object": ({"x": [1]}, None, r"invalid JSON in header: tensor 'x': expected an object"),
    "dtype of a number": ({"x": {"dtype": 5, "shape": [1], "data_offsets": [0, 1]}}, None,
                          r"invalid JSON in header: tensor 'x': dtype must be a string"),
    "shape too large for 64 bits": ({"x": {"dtype": "U8", "shape": [2**64], "data_offsets": [0, 1]}}, None,
                                    r"invalid JSON in header: tensor 'x': shape must be a list of ints "
                                    r"in \[0, 2\*\*64\)"),
    "sub-byte tensor ending mid-byte": ({"x": {"dtype": "F4", "shape": [3], "data_offsets": [0, 2]}}, None,
                                        r"tensor 'x' does not end at a byte boundary"),
}


@pytest.mark.parametrize("case", sorted(LYING_HEADERS))
def test_lying_headers_are_refused_before_any_tensor_is_read(tmp_path, case):
    header, header_len, detail = LYING_HEADERS[case]
    header_file(tmp_path / "model.safetensors", header, data_size=1, header_len=header_len)
    with pytest.raises(CheckpointError, match=rf"cannot read .*model\.safetensors: {detail}.*"
                                              r"\(truncated or corrupt safetensors file\?\)"):
        list(iter_safetensors(tmp_path))


def test_file_shrunk_after_its_header_was_checked_is_refused(tmp_path):
    path = tmp_path / "model.safetensors"
    save_file({"a": np.ones(3, np.float32), "b": np.ones(1000, np.float32)}, path)
    tensors = iter_safetensors(tmp_path)
    assert next(tensors)[0] == "a"
    os.truncate(path, path.stat().st_size - 100)
    with pytest.raises(CheckpointError, match=r"tensor 'b' ends past the end of the file"):
        next(tensors)


# -- values exchanged between processes ----------------------------------------------------


class PeerProcess:
    """Stands in for `multihost_utils.process_allgather` in a two-process run: this process
    is 0, and process 1 sends `sent` (default: the same bytes as process 0)."""

    def __init__(self, sent: bytes | None = None) -> None:
        self.sent = sent

    def __call__(self, x: np.ndarray) -> np.ndarray:
        if x.dtype == np.int32:  # the sizes round
            self.own = int(x[0])
            return np.stack([x, np.array([self.own if self.sent is None else len(self.sent)], np.int32)])
        peer = x[:self.own].tobytes() if self.sent is None else self.sent
        return np.stack([x, np.frombuffer(peer.ljust(x.size, b"\0"), np.uint8)])


@pytest.fixture
def two_processes(monkeypatch):
    from jax.experimental import multihost_utils

    import runner.device.distributed as distributed

    def connect(sent: bytes | None = None) -> None:
        monkeypatch.setattr(distributed, "is_multiprocess", lambda: True)
        monkeypatch.setattr(multihost_utils, "process_allgather", PeerProcess(sent))
    return connect


def _runner_config():
    from state.config import RopeScaling, RunnerConfig, SchedulerConfig

    model = model_config_from_hf({**HF_CONFIG, "eos_token_id": [2, 5]})
    model = dataclasses.replace(model, rope_scaling=RopeScaling(8.0, 1.0, 4.0, 64))
    return RunnerConfig(model_config=model, scheduler_config=SchedulerConfig(max_model_len=64))


def test_values_come_back_from_every_process_as_they_were_sent(two_processes):
    from runner.device.distributed import allgather_objects

    two_processes()
    for value in [17, None, (None, "RuntimeError('x')"), _runner_config(), {"a": [1, (2.5, True)], 3: {}}, ""]:
        gathered = allgather_objects(value)
        assert gathered == [value, value]
        assert all(type(v) is type(value) for v in gathered)


class Sideeffect:
    ran = False

    def __reduce__(self):
        return (setattr, (Sideeffect, "ran", True))


def test_a_pickle_from_a_peer_is_refused_and_never_run(two_processes):
    import pickle

    from runner.device.distributed import allgather_objects

    two_processes(pickle.dumps(Sideeffect()))
    with pytest.raises(ValueError, match=r"allgather_objects: process 1 sent bytes that are not JSON"):
        allgather_objects(5)
    assert not Sideeffect.ran


@pytest.mark.parametrize("sent, message", [
    (b'["value", {"record": ["Popen", {"args": "ls"}]}]', r"a peer sent .*Popen.*, which is not an encoded value"),
    (b'["value", {"record": ["LoadConfig", {"seed": -1}]}]', r"LoadConfig\.seed: expected an int"),
    (b'["value", {"record": ["LoadConfig", {"nope": 1}]}]', r"a peer sent a LoadConfig that does not fit it"),
    (b'{"value": 1}', r"process 1 sent \{'value': 1\}, which is not a message of this exchange"),
    (b'["refused", "allgather_objects: cannot send a Thing"]',
     r"allgather_objects: process 1 cannot send its value: allgather_objects: cannot send a Thing"),
])
def test_what_a_peer_sends_is_parsed_as_data_only(two_processes, sent, message):
    from runner.device.distributed import allgather_objects

    two_processes(sent)
    with pytest.raises(ValueError, match=message):
        allgather_objects(5)


class Thing:
    pass


@pytest.mark.parametrize("value, message", [
    (Thing(), r"cannot send a Thing; expected None, bool, int, float, str, list, tuple, dict or a state\.config"),
    ([1, {2: float("nan")}], r"nan is not a finite float"),
    ({(1, 2): 3}, r"dict key \(1, 2\) is not a str or int"),
    (os.stat_result(range(10)), r"cannot send a stat_result"),
])
def test_values_that_are_not_plain_data_are_refused(two_processes, value, message):
    """Refused with one process as with many; with many, the refusing process still takes
    part in the exchange (its peers see the refusal rather than wait)."""
    from runner.device.distributed import allgather_objects

    with pytest.raises(ValueError, match=message):
        allgather_objects(value)
    two_processes()
    with pytest.raises(ValueError, match=r"process 0 cannot send its value: .*" + message):
        allgather_objects(value)
