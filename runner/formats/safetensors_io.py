"""Reading Hugging Face safetensors folders: the index, the shards, and each file's header.

The header of every file is parsed and checked here (names, dtypes, byte ranges against
the file's size) before any tensor byte is read, and tensors are read with plain reads:
a lying header costs no read and no memory, and a file changed underneath cannot crash
the process as a memory map would. Only regular files are opened (a FIFO would block),
and pickle-based weight files are refused without being opened.
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, BinaryIO, NamedTuple

import ml_dtypes
import numpy as np

from runner.formats.files import MAX_JSON_BYTES, open_regular_file, parse_json, read_regular_file
from runner.formats.param_tree import CheckpointError


INDEX_FILE = "model.safetensors.index.json"
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def refuse_pickle(folder: Path) -> None:
    pickled = sorted(p.name for p in folder.iterdir() if p.suffix in _PICKLE_SUFFIXES)
    if pickled:
        raise CheckpointError(
            f"{str(folder)!r} holds only pickle-based weights ({', '.join(pickled)}); loading "
            "them could run arbitrary code. Convert them to safetensors (e.g. "
            "`model.save_pretrained(path, safe_serialization=True)`) and load that folder")


def safetensors_files(folder: Path) -> list[Path]:
    """The weight files of an HF folder, from its index when it has one."""
    index = folder / INDEX_FILE
    if os.path.lexists(index):  # also a FIFO or a broken link: refused by name, not skipped
        return _index_shards(folder, index)
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        refuse_pickle(folder)
        raise CheckpointError(f"no *.safetensors files in {str(folder)!r}")
    return files


def _index_shards(folder: Path, index: Path) -> list[Path]:
    data = read_regular_file(index, MAX_JSON_BYTES, CheckpointError)
    try:
        weight_map = parse_json(data)["weight_map"]
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{index} is not a valid safetensors index: {e}") from e
    if not isinstance(weight_map, dict) or not all(isinstance(f, str) for f in weight_map.values()):
        raise CheckpointError(f"{index} is not a valid safetensors index: 'weight_map' must map "
                              f"tensor names to shard file names, got {str(weight_map)[:200]}")
    # Shards are files of this folder: a name reaching elsewhere (a path, '..') is refused
    # rather than read.
    outside = [f for f in weight_map.values() if Path(f).name != f or f in ("", ".", "..")]
    if outside:
        raise CheckpointError(f"{index} names shard {outside[0]!r}, which is not a file name in "
                              f"{str(folder)!r}; shards must lie in the checkpoint folder itself")
    files = [folder / f for f in dict.fromkeys(weight_map.values())]
    missing = [f.name for f in files if not os.path.lexists(f)]
    if missing:
        raise CheckpointError(f"{index} names shard(s) that do not exist: {', '.join(missing)}")
    return files


def iter_safetensors(folder: str | Path, expected: Callable[[str], bool] | None = None
                     ) -> Iterator[tuple[str, np.ndarray]]:
    """(checkpoint name, array) pairs of an HF folder, one tensor in memory at a time.

    Every file's header is read and checked (names, dtypes, byte ranges against the file's
    size) before any tensor is read, so a lying header costs no tensor read and no memory.

    Args:
        folder: the checkpoint folder.
        expected: when given, called with every tensor name of every header first; a name
            it returns False for is refused as unexpected before any tensor is read. It may
            raise a CheckpointError of its own instead.
    """
    with contextlib.ExitStack() as stack:
        opened = []
        for file in safetensors_files(Path(folder)):
            f = stack.enter_context(open_regular_file(file, CheckpointError))
            opened.append((file, f, _checked_header(f, file, expected)))
        for file, f, header in opened:
            for name in sorted(header):
                yield name, _read_tensor(f, name, header[name], file)


MAX_HEADER_BYTES = 100_000_000  # safetensors' own bound
# Every element type of the format, in bits, and the numpy dtype of those numpy can hold.
_DTYPE_BITS = {"BOOL": 8, "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6, "U8": 8, "I8": 8, "F8_E5M2": 8, "F8_E4M3": 8,
               "F8_E8M0": 8, "F8_E4M3FNUZ": 8, "F8_E5M2FNUZ": 8, "I16": 16, "U16": 16, "F16": 16, "BF16": 16,
               "I32": 32, "U32": 32, "F32": 32, "C64": 64, "F64": 64, "I64": 64, "U64": 64}
_NUMPY_DTYPES = {"BOOL": np.dtype(bool), "U8": np.dtype("u1"), "I8": np.dtype("i1"), "I16": np.dtype("<i2"),
                 "U16": np.dtype("<u2"), "F16": np.dtype("<f2"), "BF16": np.dtype(ml_dtypes.bfloat16),
                 "I32": np.dtype("<i4"), "U32": np.dtype("<u4"), "F32": np.dtype("<f4"), "C64": np.dtype("<c8"),
                 "F64": np.dtype("<f8"), "I64": np.dtype("<i8"), "U64": np.dtype("<u8")}


class _Entry(NamedTuple):
    """One tensor of a checked header: its dtype, shape and absolute byte range in the file."""

    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int


def _corrupt(file: Path, detail: str) -> CheckpointError:
    return CheckpointError(f"cannot read {file}: {detail} (truncated or corrupt safetensors file?)")


def _checked_header(f: BinaryIO, file: Path, expected: Callable[[str], bool] | None) -> dict[str, _Entry]:
    """The tensors of an open safetensors file, once its header is consistent with the file."""
    size = os.fstat(f.fileno()).st_size
    length = f.read(8)
    if len(length) < 8:
        raise _corrupt(file, f"header too small: the file has {size} bytes, not even the 8 of the header length")
    n = int.from_bytes(length, "little")
    if n > MAX_HEADER_BYTES:
        raise _corrupt(file, f"header too large: {n} bytes, at most {MAX_HEADER_BYTES} allowed")
    raw = f.read(n)
    if len(raw) < n:
        raise _corrupt(file, f"invalid header length: {n} bytes, but the file holds {len(raw)} after the length")
    header = _parse_header(raw, file)
    entries = {name: _entry(name, value, 8 + n, file) for name, value in header.items() if name != "__metadata__"}
    _check_layout(entries, 8 + n, size, file)
    if expected is not None:
        for name in sorted(entries):
            if not expected(name):
                raise CheckpointError(f"unexpected tensor {name!r} in {file}: the model has no weight of that name")
    for name, e in sorted(entries.items()):
        if e.dtype not in _NUMPY_DTYPES:
            raise CheckpointError(f"tensor {name!r} in {file} has dtype {e.dtype}, which cannot be read "
                                  "(expected F32, F16, BF16 or F64)")
    return entries


def _parse_header(raw: bytes, file: Path) -> dict[str, Any]:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise _corrupt(file, f"invalid UTF-8 in header: {e}") from None
    try:
        header = parse_json(text)
    except ValueError as e:
        raise _corrupt(file, f"invalid JSON in header: {e}") from None
    if not isinstance(header, dict):
        raise _corrupt(file, f"invalid JSON in header: expected an object of tensors, got {type(header).__name__}")
    metadata = header.get("__metadata__")
    if metadata is not None and not (isinstance(metadata, dict) and all(
            isinstance(k, str) and isinstance(v, str) for k, v in metadata.items())):
        raise _corrupt(file, "invalid JSON in header: __metadata__ must map strings to strings")
    return header


def _is_u64(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 2**64


def _entry(name: str, value: Any, data_start: int, file: Path) -> _Entry:
    """A header entry, checked field by field as the format defines it."""
    where = f"invalid JSON in header: tensor {name!r}"
    if not isinstance(value, dict) or not {"dtype", "shape", "data_offsets"} <= value.keys():
        raise _corrupt(file, f"{where}: expected an object with dtype, shape and data_offsets")
    dtype, shape, offsets = value["dtype"], value["shape"], value["data_offsets"]
    if not isinstance(dtype, str):
        raise _corrupt(file, f"{where}: dtype must be a string, got {dtype!r}")
    if dtype not in _DTYPE_BITS:
        raise _corrupt(file, f"tensor {name!r}: unknown variant `{dtype[:40]}`, expected one of "
                             f"{', '.join(_DTYPE_BITS)}")
    if not isinstance(shape, list) or not all(_is_u64(d) for d in shape):
        raise _corrupt(file, f"{where}: shape must be a list of ints in [0, 2**64), got {str(shape)[:80]}")
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_u64(o) for o in offsets):
        raise _corrupt(file, f"{where}: data_offsets must be two ints in [0, 2**64), got {str(offsets)[:80]}")
    return _Entry(dtype, tuple(shape), data_start + offsets[0], data_start + offsets[1])


def _check_layout(entries: dict[str, _Entry], data_start: int, size: int, file: Path) -> None:
    """Tensors tile the data section exactly, in offset order, each as long as its shape says."""
    end = data_start
    for name, e in sorted(entries.items(), key=lambda item: (item[1].start, item[1].end)):
        if e.start != end or e.end < e.start:
            raise _corrupt(file, f"invalid offset for tensor {name!r}: data_offsets "
                                 f"[{e.start - data_start}, {e.end - data_start}], expected to start at "
                                 f"{end - data_start}, where the tensor before it ends")
        bits = _tensor_bits(e)
        if bits is None:
            raise _corrupt(file, f"overflow computing buffer size for tensor {name!r} of shape {list(e.shape)[:8]}")
        if bits % 8:
            raise _corrupt(file, f"tensor {name!r} does not end at a byte boundary ({bits} bits)")
        if e.end - e.start != bits // 8:
            raise _corrupt(file, f"invalid shape, data type, or offset for tensor {name!r}: shape "
                                 f"{list(e.shape)} of {e.dtype} takes {bits // 8} bytes, its data_offsets "
                                 f"span {e.end - e.start}")
        end = e.end
    if end != size:
        raise _corrupt(file, f"incomplete metadata, file not fully covered: the tensors end at byte {end}, "
                             f"the file has {size} bytes")


def _tensor_bits(e: _Entry) -> int | None:
    """Bits the tensor takes, or None past 2**64 (the format's limit)."""
    bits = _DTYPE_BITS[e.dtype]
    for d in e.shape:
        bits *= d
        if bits >= 2**64:
            return None
    return bits


@functools.cache
def _memory_bytes() -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # not a POSIX system: no bound
        return None


def _read_tensor(f: BinaryIO, name: str, entry: _Entry, file: Path) -> np.ndarray:
    """One tensor of an open file whose header `_checked_header` accepted. A tensor larger
    than the machine's memory is refused before anything is allocated."""
    size = entry.end - entry.start
    memory = _memory_bytes()
    if memory is not None and size > memory:
        raise CheckpointError(f"tensor {name!r} in {file} takes {size} bytes, more than this machine's "
                              f"{memory} bytes of memory")
    try:
        buffer = np.empty(size, np.uint8)
    except MemoryError:
        raise CheckpointError(f"tensor {name!r} in {file} takes {size} bytes: not enough free memory") from None
    f.seek(entry.start)
    view, read = memoryview(buffer), 0
    try:
        while read < size:  # a single read returns at most about 2 GiB
            got = f.readinto(view[read:])
            if not got:
                raise _corrupt(file, f"tensor {name!r} ends past the end of the file (it changed while read)")
            read += got
    except OSError as e:
        raise _corrupt(file, f"tensor {name!r}: {e.strerror or e}") from e
    return buffer.view(_NUMPY_DTYPES[entry.dtype]).reshape(entry.shape)
