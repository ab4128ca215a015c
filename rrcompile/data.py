"""Evaluation data sets, input preprocessing, and fitting a batch to a model's input shape.

Every loader returns raw pixel values on a 0..255 scale in NCHW layout, so one preprocessing rule
(``(x / scale - mean) / std``, by default ``x / 255``) serves every data set and model.
Specs: ``digits`` (scikit-learn, embedded), ``mnist:DIR``, ``fashion-mnist:DIR``, ``cifar10:DIR``, ``npz:FILE``.
"""
from __future__ import annotations

import gzip
import math
import pickle
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from rrcompile.errors import DataError

KNOWN_SPECS = ("digits", "mnist:DIR", "fashion-mnist:DIR", "cifar10:DIR", "npz:FILE")
_IDX_IMAGES, _IDX_LABELS = 2051, 2049  # magic: 0x08 (unsigned byte) << 8 | number of dims


@dataclass(frozen=True)
class Dataset:
    """Labelled samples: ``x`` float32 raw 0..255 values, [N, C, H, W] (or [N, F]); ``y`` int64 [N]."""

    name: str
    x: np.ndarray
    y: np.ndarray

    def __post_init__(self) -> None:
        if self.y.ndim != 1 or len(self.x) != len(self.y):
            raise DataError(f"data {self.name!r}: {len(self.x)} samples but labels of shape {list(self.y.shape)}")
        if not len(self.y):
            raise DataError(f"data {self.name!r}: no samples")
        finite = np.isfinite(self.x)
        if not finite.all():
            raise DataError(f"data {self.name!r}: {finite.size - np.count_nonzero(finite)} NaN or Inf pixel value(s)")

    def check_labels(self, classes: int | None) -> None:
        """Refuse labels outside ``[0, classes)`` (the model's outputs; None: unknown, only the sign is
        checked): no prediction can match them, so every accuracy would be silently too low."""
        bad = (self.y < 0) | (self.y >= classes) if classes is not None else self.y < 0
        if bad.any():
            first = int(self.y[np.argmax(bad)])
            within = f"the model's {classes} classes [0, {classes})" if classes is not None else "classes >= 0"
            raise DataError(f"data {self.name!r}: {np.count_nonzero(bad)} label(s) outside {within}, e.g. {first}")

    def subset(self, n: int | None) -> Dataset:
        """The first ``n`` samples (all of them for None, or when ``n`` exceeds the set)."""
        if n is None:
            return self
        if n < 1:
            raise DataError(f"data {self.name!r}: sample limit {n} must be >= 1")
        return Dataset(self.name, self.x[:n], self.y[:n])


def digits_split() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """scikit-learn digits as (x_train, y_train, x_test, y_test): the one split every script must share."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = (digits.data * (255.0 / 16.0)).astype(np.float32).reshape(-1, 1, 8, 8)  # 0..16 -> 0..255 like the rest
    x_train, x_test, y_train, y_test = train_test_split(
        x, digits.target.astype(np.int64), test_size=0.25, random_state=0, stratify=digits.target)
    return x_train, y_train, x_test, y_test


def load_data(spec: str, split: str = "test") -> Dataset:
    """Load the ``split`` ("train" or "test") of the data set named by ``spec``; see the module docstring."""
    if split not in ("train", "test"):
        raise DataError(f"data split {split!r}: must be 'train' or 'test'")
    scheme, has_path, where = spec.partition(":")
    if scheme == "digits":
        if has_path:
            raise DataError(f"data spec {spec!r}: digits is built in and takes no path")
        x_train, y_train, x_test, y_test = digits_split()
        return Dataset(spec, *((x_train, y_train) if split == "train" else (x_test, y_test)))
    if scheme not in ("mnist", "fashion-mnist", "cifar10", "npz"):
        raise DataError(f"data spec {spec!r}: unknown scheme {scheme!r} (known: {', '.join(KNOWN_SPECS)})")
    if not where:  # Path("") is the current directory, which would silently "exist"
        raise DataError(f"data spec {spec!r}: needs a path, e.g. {scheme}:{'FILE' if scheme == 'npz' else 'DIR'}")
    path = Path(where).expanduser()
    if scheme == "npz":
        if not path.is_file():
            raise DataError(f"data spec {spec!r}: file not found")
        return Dataset(spec, *_load_npz(path))
    if not path.is_dir():
        raise DataError(f"data spec {spec!r}: directory not found")
    loader = _load_cifar10 if scheme == "cifar10" else _load_idx_set
    return Dataset(spec, *loader(spec, path, split))


def data_files(spec: str) -> list[Path]:
    """The files a data spec may read (an npz file, or the files of a data directory)."""
    scheme, _, where = spec.partition(":")
    if scheme == "digits" or not where:
        return []
    path = Path(where).expanduser()
    if not path.is_dir():
        return [path]
    return [f for folder in (path, path / "cifar-10-batches-py") if folder.is_dir() for f in folder.iterdir() if f.is_file()]


def _load_idx_set(spec: str, root: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    prefix = "train" if split == "train" else "t10k"
    images_path = _find_idx(spec, root, f"{prefix}-images-idx3-ubyte")
    labels_path = _find_idx(spec, root, f"{prefix}-labels-idx1-ubyte")
    images = _read_idx(images_path, _IDX_IMAGES)
    labels = _read_idx(labels_path, _IDX_LABELS)
    if len(images) != len(labels):
        raise DataError(f"{images_path}: {len(images)} images but {labels_path} has {len(labels)} labels")
    return images[:, None].astype(np.float32), labels.astype(np.int64)


def _find_idx(spec: str, root: Path, name: str) -> Path:
    for candidate in (root / f"{name}.gz", root / name):  # torchvision's raw/ holds both; .gz is the original
        if candidate.is_file():
            return candidate
    raise DataError(f"data spec {spec!r}: neither {name}.gz nor {name} in {root}")


def _read_idx(path: Path, magic: int) -> np.ndarray:
    try:
        raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    except (OSError, EOFError, zlib.error) as exc:
        raise DataError(f"{path}: unreadable or corrupt ({_first_line(exc)})") from None
    found = int.from_bytes(raw[:4], "big")
    if found != magic:
        raise DataError(f"{path}: not an IDX {'image' if magic == _IDX_IMAGES else 'label'} file "
                        f"(magic {found}, expected {magic})")
    ndim = magic & 0xFF
    header = 4 + 4 * ndim
    dims = [int.from_bytes(raw[i:i + 4], "big") for i in range(4, header, 4)]
    if len(raw) != header + math.prod(dims):
        raise DataError(f"{path}: truncated or corrupt ({max(len(raw) - header, 0)} data bytes, "
                        f"header says {dims} = {math.prod(dims)})")
    return np.frombuffer(raw, np.uint8, offset=header).reshape(dims)


def _load_cifar10(spec: str, root: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    if (root / "cifar-10-batches-py").is_dir():
        root = root / "cifar-10-batches-py"
    names = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
    xs, ys = [], []
    for name in names:
        path = root / name
        if not path.is_file():
            raise DataError(f"data spec {spec!r}: no CIFAR-10 batch {name} in {root}")
        try:
            with path.open("rb") as f:
                batch = _CifarUnpickler(f, path).load()
            data, labels = np.asarray(batch[b"data"], np.uint8), np.asarray(batch[b"labels"], np.int64)
        except DataError:
            raise
        except Exception as exc:  # unpickling can fail in many ways (EOF, bad opcode, missing key); all mean "corrupt"
            raise DataError(f"{path}: not a readable CIFAR-10 batch ({_first_line(exc)})") from None
        if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or labels.shape != (len(data),):
            raise DataError(f"{path}: expected data [N, 3072] and N labels, got {list(data.shape)} "
                            f"and {list(labels.shape)}")
        xs.append(data.reshape(-1, 3, 32, 32))  # rows are stored channel-major (all R, then G, then B)
        ys.append(labels)
    return np.concatenate(xs).astype(np.float32), np.concatenate(ys)


def _plain_dtype(*args) -> np.dtype:
    dtype = np.dtype(*args)
    if dtype.hasobject:
        raise pickle.UnpicklingError("an array of Python objects")
    return dtype


# What CIFAR-10 python batches need (dicts, lists, bytes, ints are plain opcodes): numpy arrays as
# pickled by Python 2 (``numpy.core``), numpy 2 (``numpy._core``) and protocol 5 (``_frombuffer``)
_RECONSTRUCT, _FROMBUFFER = np.zeros(0).__reduce__()[0], np.zeros(1).__reduce_ex__(5)[0]
_CIFAR_GLOBALS = {
    **{(f"numpy.{core}.multiarray", "_reconstruct"): _RECONSTRUCT for core in ("core", "_core")},
    **{(f"numpy.{core}.numeric", "_frombuffer"): _FROMBUFFER for core in ("core", "_core")},
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): _plain_dtype,
}


class _CifarUnpickler(pickle.Unpickler):
    """Unpickles only what a CIFAR-10 batch holds. A pickle can call any importable function while
    it loads, and every such call goes through :meth:`find_class`: refusing there runs nothing."""

    def __init__(self, file, path: Path):
        super().__init__(file, encoding="bytes")  # the official batches are Python 2 pickles
        self.path = path

    def find_class(self, module: str, name: str):
        found = _CIFAR_GLOBALS.get((module, name))
        if found is None:
            raise DataError(f"{self.path}: refused to unpickle '{module}.{name}' (a CIFAR-10 batch holds only "
                            f"numpy arrays, lists, strings and numbers)")
        return found


def _load_npz(path: Path) -> tuple[np.ndarray, np.ndarray]:
    try:
        arrays = np.load(path, allow_pickle=False)
        if not isinstance(arrays, np.lib.npyio.NpzFile):
            raise DataError(f"{path}: holds a single array; save x and y together with np.savez")
        with arrays:
            if "x" not in arrays.files or "y" not in arrays.files:
                raise DataError(f"{path}: an npz data file needs arrays 'x' and 'y' (found {sorted(arrays.files)})")
            x, y = arrays["x"], arrays["y"]
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error) as exc:
        raise DataError(f"{path}: not a readable .npz file ({_first_line(exc)})") from None
    for label, array in (("x", x), ("y", y)):
        if not (np.issubdtype(array.dtype, np.number) or array.dtype == bool):
            raise DataError(f"{path}: array '{label}' must be numeric (dtype {array.dtype})")
    if x.ndim not in (2, 3, 4) or y.ndim != 1 or len(x) != len(y):
        raise DataError(f"{path}: expected x [N, H, W], [N, C, H, W] or [N, F] and y [N], "
                        f"got x {list(x.shape)} and y {list(y.shape)}")
    if not np.issubdtype(y.dtype, np.integer) and not np.array_equal(y, np.round(y)):
        raise DataError(f"{path}: labels y must be integers (dtype {y.dtype})")
    return (x[:, None] if x.ndim == 3 else x).astype(np.float32), y.astype(np.int64)


@dataclass(frozen=True)
class Preprocess:
    """``(x / scale - mean) / std``, with mean and std given once or per channel (axis 1)."""

    scale: float = 255.0
    mean: tuple[float, ...] = (0.0,)
    std: tuple[float, ...] = (1.0,)

    def __post_init__(self) -> None:
        object.__setattr__(self, "mean", tuple(float(v) for v in self.mean))
        object.__setattr__(self, "std", tuple(float(v) for v in self.std))
        if not (math.isfinite(self.scale) and self.scale > 0):
            raise DataError(f"preprocess scale {self.scale}: must be a finite number > 0")
        if not self.mean or not all(math.isfinite(v) for v in self.mean):
            raise DataError(f"preprocess mean {list(self.mean)}: needs one or more finite numbers")
        if not self.std or not all(math.isfinite(v) and v > 0 for v in self.std):
            raise DataError(f"preprocess std {list(self.std)}: needs one or more finite numbers > 0")

    @classmethod
    def parse(cls, scale: str | float, mean: str, std: str) -> Preprocess:
        """From CLI strings such as ``"255"`` and ``"0.4914,0.4822,0.4465"``."""
        (scale_value,) = _parse_numbers("scale", str(scale), single=True)
        return cls(scale_value, _parse_numbers("mean", mean), _parse_numbers("std", std))

    def apply(self, x: np.ndarray) -> np.ndarray:
        # a copy worked on in place: the float32 operations of ``(x / scale - mean) / std`` without
        # three temporaries as large as the data (MNIST's train set: 0.2 s instead of 0.8-1.6 s)
        x = np.array(x, np.float32)
        channels = x.shape[1] if x.ndim >= 3 else 1  # [N, F] has no channel axis
        for label, values in (("mean", self.mean), ("std", self.std)):
            if len(values) not in (1, channels):
                raise DataError(f"preprocess {label} has {len(values)} values but data of shape {list(x.shape)} "
                                f"has {channels} channel(s); give 1 value or {channels}")
        mean, std = (np.asarray(v, np.float32).reshape([len(v) if axis == 1 else 1 for axis in range(x.ndim)])
                     for v in (self.mean, self.std))
        x /= np.float32(self.scale)
        x -= mean
        x /= std
        if not np.isfinite(x).all():
            raise DataError(f"preprocess scale {self.scale:g}, mean {list(self.mean)}, std {list(self.std)}: "
                            f"the inputs overflow to Inf")
        return x


def _parse_numbers(label: str, text: str, single: bool = False) -> tuple[float, ...]:
    try:
        values = tuple(float(part) for part in text.split(","))
    except ValueError:
        values = ()
    if not values or (single and len(values) != 1):
        raise DataError(f"preprocess {label} {text!r}: expected {'a number' if single else 'a comma list of numbers'}")
    return values


def fit_to_input(x: np.ndarray, input_name: str, input_shape: Sequence[int | str | None],
                 *, data_name: str | None = None) -> np.ndarray:
    """Reshape a batch [N, ...] to the model input ``input_shape`` (batch dim first, ignored).

    Only layout-preserving changes are made: flattening for an [N, F] model, or unflattening [N, F]
    data for an [N, C, H, W] model. Symbolic (str/None) dims match any size at the same rank.
    """
    sample, wanted = tuple(x.shape[1:]), tuple(input_shape[1:])
    fixed = all(isinstance(d, int) for d in wanted)
    if len(sample) == len(wanted) and all(not isinstance(w, int) or w == s for w, s in zip(wanted, sample)):
        fitted = x
    elif fixed and len(wanted) == 1 and math.prod(sample) == wanted[0]:
        fitted = x.reshape(len(x), -1)
    elif fixed and len(wanted) == 3 and len(sample) == 1 and sample[0] == math.prod(wanted):
        fitted = x.reshape(len(x), *wanted)
    else:
        source = f"data {data_name!r} samples" if data_name else "data samples"
        shown = ", ".join(["N", *("?" if d is None else str(d) for d in wanted)])
        raise DataError(f"{source} of shape {list(sample)} do not fit model input {input_name!r} of shape [{shown}]")
    return np.ascontiguousarray(fitted, dtype=np.float32)


def batches(x: np.ndarray, y: np.ndarray, batch_size: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Consecutive (x, y) slices of ``batch_size`` in order; the last may be shorter."""
    if batch_size < 1:
        raise DataError(f"batch size {batch_size}: must be >= 1")
    for start in range(0, len(x), batch_size):
        yield x[start:start + batch_size], y[start:start + batch_size]


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0]
