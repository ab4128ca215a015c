"""Loading and saving ONNX models, and atomic file output.

Every file rrcompile writes goes through :func:`atomic_write` so that an error half-way leaves no
partial output behind. A command writing several files plans them with :func:`outputs`: every path
is checked before any work, and the files replace their targets together at the end, or not at all.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterable, Iterator, Mapping

import numpy as np
import onnx
from onnx import numpy_helper

from rrcompile.errors import ModelLoadError, OutputPathError


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
    check_finite_weights(model, path)
    return model


def check_finite_weights(model: onnx.ModelProto, path: str | os.PathLike) -> None:
    """Refuse NaN or Inf in a floating-point initializer: such a model evaluates to chance accuracy
    with a perfect yield (every chip equally broken), and training on it writes NaN weights."""
    for tensor in model.graph.initializer:
        if tensor.data_type not in _FLOAT_TYPES:
            continue
        values = numpy_helper.to_array(tensor)
        if not np.all(np.isfinite(values)):
            bad = int(np.size(values) - np.count_nonzero(np.isfinite(values)))
            raise ModelLoadError(f"{path}: initializer '{tensor.name}' holds {bad} NaN or Inf value(s)")


_FLOAT_TYPES = {onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16}


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
        _give_usual_mode(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


class OutputPlan:
    """The files one command writes: checked up front, staged beside their targets, committed together.

    Each output is staged in a temporary file in its target's directory (created there when the
    plan is made, which proves the directory writable); ``plan[label]`` is the path to write it
    to. :meth:`commit` renames every staged file that was handed out onto its target, keeping the
    previous content until all are in place, so that a failure restores every target. Use it
    through :func:`outputs`.
    """

    def __init__(self, inputs: Iterable[str | os.PathLike | None], outputs: Mapping[str, str | os.PathLike | None]):
        self._targets: dict[str, Path] = {}
        self._staged: dict[str, Path] = {}
        self._handed_out: list[str] = []
        self._created_dirs: list[Path] = []
        try:
            self._plan([Path(p) for p in inputs if p is not None],
                       {label: Path(p) for label, p in outputs.items() if p is not None})
        except BaseException:
            self.discard()
            raise

    def _plan(self, inputs: list[Path], outputs: dict[str, Path]) -> None:
        for label, path in outputs.items():
            try:
                self._plan_one(label, path, inputs)
            except OSError as exc:  # e.g. a parent directory that cannot be searched
                raise OutputPathError(f"{label} {path}: cannot write there ({exc.strerror or _first_line(exc)})") from None

    def _plan_one(self, label: str, path: Path, inputs: list[Path]) -> None:
        if path.is_dir():
            raise OutputPathError(f"{label} {path}: is a directory")
        if path.exists() and not path.is_file():  # renaming onto /dev/null would replace the device
            raise OutputPathError(f"{label} {path}: exists and is not a regular file")
        for other in inputs:
            if _same_file(path, other):
                raise OutputPathError(f"{label} {path}: would overwrite the input {other}")
        for other_label, other in self._targets.items():
            if _same_file(path, other):
                raise OutputPathError(f"{label} {path}: also the path of {other_label}")
        self._targets[label] = path
        self._staged[label] = self._stage(path)

    def _stage(self, path: Path) -> Path:
        for directory in reversed([p for p in (path.parent, *path.parent.parents) if not p.exists()]):
            directory.mkdir()
            self._created_dirs.append(directory)
        fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        return Path(name)

    def __getitem__(self, label: str) -> Path:
        """Where to write the output ``label``; only outputs asked for here are committed."""
        if label not in self._handed_out:
            self._handed_out.append(label)
        return self._staged[label]

    def commit(self) -> None:
        """Put every handed-out output in place; on any failure put every target back as it was."""
        done: list[tuple[Path, Path | None]] = []  # (target, backup of its previous content)
        target = None
        try:
            for label in self._handed_out:
                target, staged = self._targets[label], self._staged[label]
                _give_usual_mode(staged)
                backup = _backup(target) if target.exists() else None
                done.append((target, backup))
                os.replace(staged, target)
        except BaseException as exc:
            for done_target, backup in reversed(done):
                if backup is not None:
                    os.replace(backup, done_target)
                else:
                    done_target.unlink(missing_ok=True)
            self.discard()
            if isinstance(exc, OSError):
                raise OutputPathError(f"{target}: cannot be written ({exc.strerror or _first_line(exc)})") from None
            raise
        for _, backup in done:
            if backup is not None:
                backup.unlink(missing_ok=True)
        self.discard()

    def discard(self) -> None:
        """Remove every staged file and every directory the plan created (if still empty)."""
        for staged in self._staged.values():
            staged.unlink(missing_ok=True)
        for directory in reversed(self._created_dirs):
            with contextlib.suppress(OSError):
                directory.rmdir()
        self._created_dirs.clear()


@contextlib.contextmanager
def outputs(inputs: Iterable[str | os.PathLike | None] = (),
            outputs: Mapping[str, str | os.PathLike | None] | None = None) -> Iterator[OutputPlan]:
    """Plan a command's outputs (label, such as ``"--json"``, to path; None: not asked for).

    Call it before any work: a directory, an unwritable place, or a path equal to an input or to
    another output is an :class:`OutputPathError` naming the label and path. Inside the block write
    each output to ``plan[label]``; the outputs replace their targets when the block ends, and an
    error (Ctrl-C included) leaves every target as it was::

        with outputs(inputs=[args.model], outputs={"-o": args.output, "--json": args.json}) as plan:
            ...  # the work
            save_model(model, plan["-o"])
            if args.json:
                write_json(report, plan["--json"])
    """
    plan = OutputPlan(inputs, outputs or {})
    try:
        yield plan
    except BaseException:
        plan.discard()
        raise
    plan.commit()


def _same_file(a: Path, b: Path) -> bool:
    if a.exists() and b.exists():
        return os.path.samefile(a, b)
    return a.resolve() == b.resolve()


def _backup(target: Path) -> Path:
    """A hidden copy of ``target``'s current content beside it (a hard link where possible)."""
    fd, name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".bak", dir=target.parent)
    os.close(fd)
    backup = Path(name)
    try:
        backup.unlink()
        os.link(target, backup)
    except OSError:
        shutil.copy2(target, backup)
    return backup


def _give_usual_mode(path: Path) -> None:
    """mkstemp makes files 0600; give the file the mode a plain open() would."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0]
