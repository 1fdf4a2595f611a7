"""Reading files people hand us: regular files only, bounded in size, and JSON bounded
in depth. Every reader of a model folder goes through here."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path
from typing import Any, BinaryIO


MAX_JSON_BYTES = 100_000_000  # far beyond any config.json or index: bounds what one read takes
MAX_JSON_DEPTH = 64  # HF configs nest a few levels; deeper is not a config


def open_regular_file(path: Path, error: type[ValueError] = ValueError) -> BinaryIO:
    """`path` opened for binary reading, or `error` naming it unless it is a regular file.

    A FIFO or a device would block `open()` or `read()` forever, a symlink loop or a folder
    fails with an OSError. Opening never blocks (O_NONBLOCK) and the type is checked on the
    opened descriptor, so a file swapped in after a check cannot slip through.
    """
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(path, flags)
    except OSError as e:
        raise error(_not_openable(path, e)) from e
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        raise error(f"{path} is {_file_kind(mode)}, not a regular file")
    return os.fdopen(fd, "rb")


def _not_openable(path: Path, e: OSError) -> str:
    try:  # a socket fails to open (ENXIO): name what it is rather than the errno
        mode = os.stat(path).st_mode
    except OSError:
        mode = None
    if mode is not None and not stat.S_ISREG(mode):
        return f"{path} is {_file_kind(mode)}, not a regular file"
    return f"cannot open {path}: {e.strerror or e}"


def _file_kind(mode: int) -> str:
    for test, kind in ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device")):
        if test(mode):
            return kind
    return "not a file"


def read_regular_file(path: Path, max_bytes: int, error: type[ValueError] = ValueError) -> bytes:
    """The bytes of a regular file of at most `max_bytes` bytes, else `error` naming it."""
    with open_regular_file(path, error) as f:
        try:
            data = f.read(max_bytes + 1)
        except OSError as e:
            raise error(f"cannot read {path}: {e.strerror or e}") from e
    if len(data) > max_bytes:
        raise error(f"{path} is larger than {max_bytes} bytes, more than a JSON file this runner reads")
    return data


def parse_json(data: bytes | str) -> Any:
    """`json.loads` of UTF-8 text, raising only ValueError: for text that is not JSON, and for
    nesting deeper than MAX_JSON_DEPTH (which would otherwise be a RecursionError here or later)."""
    try:
        # Decoded here: json.loads would guess UTF-16 from a byte-order mark.
        value = json.loads(data.decode("utf-8") if isinstance(data, bytes) else data)
    except RecursionError:
        raise ValueError(f"nested deeper than {MAX_JSON_DEPTH} levels") from None
    stack = [(value, 1)]
    while stack:  # iterative: the check itself must not recurse
        item, depth = stack.pop()
        if isinstance(item, (dict, list)):
            if depth > MAX_JSON_DEPTH:
                raise ValueError(f"nested deeper than {MAX_JSON_DEPTH} levels")
            stack.extend((child, depth + 1) for child in (item.values() if isinstance(item, dict) else item))
    return value
