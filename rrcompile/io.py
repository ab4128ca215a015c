"""Loading and saving ONNX models, and atomic file output.

Every file rrcompile writes goes through :func:`atomic_write` so that an error half-way leaves no
partial output behind.
"""
from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Iterator

import onnx

from rrcompile.errors import ModelLoadError


def load_model(path: str | os.PathLike) -> onnx.ModelProto:
    """Read and check an ONNX file; any problem is a one-line :class:`ModelLoadError`."""
    path = Path(path)
    if not path.is_file():
        raise ModelLoadError(f"{path}: no such file")
    try:
        model = onnx.load(str(path))
    except Exception as exc:  # protobuf raises DecodeError, onnx raises its own; both mean "not ONNX"
        raise ModelLoadError(f"{path}: not a readable ONNX file ({_first_line(exc)})") from None
    if not model.graph.node:
        raise ModelLoadError(f"{path}: not a valid ONNX model (the graph has no nodes; truncated?)")
    try:
        onnx.checker.check_model(model)
    except onnx.checker.ValidationError as exc:
        raise ModelLoadError(f"{path}: invalid ONNX model ({_first_line(exc)})") from None
    return model


def save_model(model: onnx.ModelProto, path: str | os.PathLike) -> Path:
    """Write ``model`` to ``path`` atomically."""
    with atomic_write(path) as tmp:
        onnx.save(model, str(tmp))
    return Path(path)


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes it 0600; give the file the mode a plain open() would
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0]
