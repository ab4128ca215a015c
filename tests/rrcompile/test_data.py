"""Data loading (digits, IDX, CIFAR pickles, npz), preprocessing and input fitting, all on synthetic files."""
from __future__ import annotations

import gzip
import io
import os
import pickle
import re
from pathlib import Path

import numpy as np
import pytest

from rrcompile.data import Dataset, Preprocess, batches, digits_split, fit_to_input, load_data
from rrcompile.errors import DataError

SHARED_DATA = Path(__file__).resolve().parents[2] / ".." / "shared" / "data"


def write_idx(path: Path, array: np.ndarray, magic: int) -> Path:
    payload = magic.to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in array.shape) + array.tobytes()
    path.write_bytes(gzip.compress(payload) if path.suffix == ".gz" else payload)
    return path


def write_mnist(root: Path, prefix: str, n: int, gz: bool, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 10, n, dtype=np.uint8)
    suffix = ".gz" if gz else ""
    write_idx(root / f"{prefix}-images-idx3-ubyte{suffix}", images, 2051)
    write_idx(root / f"{prefix}-labels-idx1-ubyte{suffix}", labels, 2049)
    return images, labels


def test_digits_scale_split_and_determinism():
    test = load_data("digits")
    train = load_data("digits", "train")
    assert (train.x.shape, test.x.shape) == ((1347, 1, 8, 8), (450, 1, 8, 8))
    assert test.x.dtype == np.float32 and test.y.dtype == np.int64 and test.name == "digits"
    assert test.x.min() == 0 and test.x.max() == 255  # 0..16 rescaled to the common 0..255 scale
    np.testing.assert_array_equal(load_data("digits").x, test.x)
    x_train, y_train, x_test, y_test = digits_split()
    for got, want in [(x_train, train.x), (y_train, train.y), (x_test, test.x), (y_test, test.y)]:
        np.testing.assert_array_equal(got, want)
    # pinned: other scripts rely on this exact split (stratified, random_state=0)
    assert np.bincount(y_test).tolist() == [45, 46, 44, 46, 45, 46, 45, 45, 43, 45]
    assert y_test[:8].tolist() == [2, 0, 4, 9, 4, 1, 2, 4]
    sub = test.subset(7)
    assert len(sub.x) == len(sub.y) == 7 and test.subset(None) is test and len(test.subset(10**6).y) == 450
    with pytest.raises(DataError, match="limit 0"):
        test.subset(0)


@pytest.mark.parametrize("gz", [True, False])
def test_mnist_idx_files(tmp_path, gz):
    images, labels = write_mnist(tmp_path, "t10k", 5, gz)
    write_mnist(tmp_path, "train", 8, gz, seed=1)
    data = load_data(f"mnist:{tmp_path}")
    assert data.x.shape == (5, 1, 28, 28) and data.x.dtype == np.float32 and data.y.dtype == np.int64
    np.testing.assert_array_equal(data.x[:, 0], images)
    np.testing.assert_array_equal(data.y, labels)
    assert load_data(f"fashion-mnist:{tmp_path}", "train").x.shape == (8, 1, 28, 28)


def test_mnist_prefers_gz_and_checks_files(tmp_path):
    write_mnist(tmp_path, "t10k", 3, gz=False)
    gz_images, _ = write_mnist(tmp_path, "t10k", 3, gz=True, seed=5)
    np.testing.assert_array_equal(load_data(f"mnist:{tmp_path}").x[:, 0], gz_images)

    images = tmp_path / "t10k-images-idx3-ubyte.gz"
    images.write_bytes(images.read_bytes()[:-20])
    with pytest.raises(DataError, match="t10k-images-idx3-ubyte.gz") as info:
        load_data(f"mnist:{tmp_path}")
    assert "\n" not in str(info.value)

    raw = tmp_path / "raw"
    raw.mkdir()
    write_mnist(raw, "t10k", 3, gz=False)
    path = raw / "t10k-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:-1])
    with pytest.raises(DataError, match="t10k-images-idx3-ubyte: truncated"):
        load_data(f"mnist:{raw}")
    write_idx(path, np.zeros((3, 28, 28), np.uint8), 2049)
    with pytest.raises(DataError, match="magic 2049, expected 2051"):
        load_data(f"mnist:{raw}")
    write_idx(path, np.zeros((4, 28, 28), np.uint8), 2051)
    with pytest.raises(DataError, match="4 images but .* has 3 labels"):
        load_data(f"mnist:{raw}")
    with pytest.raises(DataError, match="neither train-images-idx3-ubyte.gz nor"):
        load_data(f"mnist:{raw}", "train")


def test_bad_specs_and_splits(tmp_path):
    with pytest.raises(DataError, match=r"data spec 'mnist:/nope': directory not found"):
        load_data("mnist:/nope")
    with pytest.raises(DataError, match=r"unknown scheme 'imagenet' \(known: digits, mnist:DIR"):
        load_data("imagenet:/x")
    with pytest.raises(DataError, match="needs a path"):
        load_data("cifar10:")
    with pytest.raises(DataError, match="file not found"):
        load_data(f"npz:{tmp_path / 'missing.npz'}")
    with pytest.raises(DataError, match="split 'val'"):
        load_data("digits", "val")


def test_cifar10_pickles(tmp_path):
    rng = np.random.default_rng(0)
    batch_dir = tmp_path / "cifar-10-batches-py"
    batch_dir.mkdir()
    written = {}
    for name, n in [*((f"data_batch_{i}", 2) for i in range(1, 6)), ("test_batch", 3)]:
        data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        labels = [int(v) for v in rng.integers(0, 10, n)]
        (batch_dir / name).write_bytes(pickle.dumps({b"data": data, b"labels": labels}))
        written[name] = (data, labels)
    test = load_data(f"cifar10:{tmp_path}")  # the parent of cifar-10-batches-py is accepted too
    assert test.x.shape == (3, 3, 32, 32) and test.y.tolist() == written["test_batch"][1]
    data = written["test_batch"][0]
    np.testing.assert_array_equal(test.x[1, 2].ravel(), data[1, 2048:])  # channel-major rows: B plane last
    assert load_data(f"cifar10:{batch_dir}", "train").x.shape == (10, 3, 32, 32)
    (batch_dir / "test_batch").write_bytes(b"not a pickle")
    with pytest.raises(DataError, match="test_batch: not a readable CIFAR-10 batch"):
        load_data(f"cifar10:{batch_dir}")


class _Py2Pickler(pickle._Pickler):
    """Writes bytes as Python 2 ``str`` opcodes, as the official CIFAR-10 batches (cPickle) hold them."""

    def save_bytes(self, obj):
        self.write((pickle.SHORT_BINSTRING + bytes([len(obj)]) if len(obj) < 256
                    else pickle.BINSTRING + len(obj).to_bytes(4, "little")) + obj)
        self.memoize(obj)

    dispatch = {**pickle._Pickler.dispatch, bytes: save_bytes}


def test_cifar10_python2_batch_as_published(tmp_path):
    data = np.random.default_rng(1).integers(0, 256, (4, 3072), dtype=np.uint8)
    batch = {b"batch_label": b"testing batch 1 of 1", b"labels": [3, 8, 8, 0], b"data": data,
             b"filenames": [b"cat_s_000019.png"] * 4}
    buffer = io.BytesIO()
    _Py2Pickler(buffer, protocol=2).dump(batch)
    raw = buffer.getvalue().replace(b"numpy._core.multiarray", b"numpy.core.multiarray")  # numpy 1's name
    assert b"cnumpy.core.multiarray\n_reconstruct" in raw and b"_codecs" not in raw
    (tmp_path / "test_batch").write_bytes(raw)
    test = load_data(f"cifar10:{tmp_path}")
    assert test.y.tolist() == [3, 8, 8, 0]
    np.testing.assert_array_equal(test.x.reshape(4, -1), data)


class _Call:
    def __init__(self, function, *args):
        self.function, self.args = function, args

    def __reduce__(self):
        return self.function, self.args


@pytest.mark.parametrize("payload, refused", [
    (_Call(os.system, "touch {marker}"), "posix.system"),
    (_Call(exec, "open({marker!r}, 'w')"), "builtins.exec"),
    (_Call(np.dtype, "O"), "an array of Python objects"),  # an admitted global, refused arguments
])
def test_cifar10_pickle_runs_no_code(tmp_path, payload, refused):
    marker = tmp_path / "pwned"
    payload.args = tuple(a.format(marker=str(marker)) for a in payload.args)
    (tmp_path / "test_batch").write_bytes(pickle.dumps({b"data": payload, b"labels": [0]}))
    with pytest.raises(DataError, match=f"test_batch: .*{re.escape(refused)}") as info:
        load_data(f"cifar10:{tmp_path}")
    assert "\n" not in str(info.value)
    assert not marker.exists()


def test_npz_round_trip(tmp_path):
    x = np.arange(2 * 5 * 6, dtype=np.uint8).reshape(2, 5, 6)
    np.savez(tmp_path / "hw.npz", x=x, y=np.array([3, 1]))
    data = load_data(f"npz:{tmp_path / 'hw.npz'}", "train")  # split is ignored for npz
    assert data.x.shape == (2, 1, 5, 6) and data.x.dtype == np.float32 and data.y.tolist() == [3, 1]
    np.savez(tmp_path / "flat.npz", x=np.ones((4, 10)), y=np.arange(4))
    assert load_data(f"npz:{tmp_path / 'flat.npz'}").x.shape == (4, 10)
    np.savez(tmp_path / "nchw.npz", x=np.ones((2, 3, 4, 4)), y=np.arange(2))
    assert load_data(f"npz:{tmp_path / 'nchw.npz'}").x.shape == (2, 3, 4, 4)
    np.savez(tmp_path / "nolabels.npz", x=np.ones((4, 10)))
    with pytest.raises(DataError, match=r"nolabels.npz: .*needs arrays 'x' and 'y'"):
        load_data(f"npz:{tmp_path / 'nolabels.npz'}")
    np.savez(tmp_path / "short.npz", x=np.ones((4, 10)), y=np.arange(3))
    with pytest.raises(DataError, match=r"short.npz: .*got x \[4, 10\] and y \[3\]"):
        load_data(f"npz:{tmp_path / 'short.npz'}")
    (tmp_path / "junk.npz").write_bytes(b"PK junk")
    with pytest.raises(DataError, match="junk.npz: not a readable .npz"):
        load_data(f"npz:{tmp_path / 'junk.npz'}")


@pytest.mark.parametrize("x, y, message", [
    (np.zeros((0, 8, 8)), np.zeros(0, int), "no samples"),
    (np.array([["a"] * 8] * 2), np.arange(2), "array 'x' must be numeric"),
    (np.ones((2, 8)), np.array(["a", "b"]), "array 'y' must be numeric"),
    (np.array([[1.0, np.nan], [np.inf, -np.inf]]), np.arange(2), "3 NaN or Inf pixel value"),
])
def test_npz_refusals(tmp_path, x, y, message):
    np.savez(tmp_path / "d.npz", x=x, y=y)
    with pytest.raises(DataError, match=message):
        load_data(f"npz:{tmp_path / 'd.npz'}")


def test_labels_must_be_classes_of_the_model():
    data = Dataset("d", np.zeros((4, 2), np.float32), np.array([0, 9, 10, -1]))
    with pytest.raises(DataError, match=r"2 label\(s\) outside the model's 10 classes \[0, 10\), e.g. 10"):
        data.check_labels(10)
    with pytest.raises(DataError, match="e.g. -1"):
        data.check_labels(None)
    Dataset("d", data.x[:2], data.y[:2]).check_labels(10)


def test_preprocess_per_channel_math():
    x = np.random.default_rng(0).uniform(0, 255, (2, 3, 4, 4)).astype(np.float32)
    pre = Preprocess.parse("255", "0.4914,0.4822,0.4465", " 0.247, 0.243,0.261")
    out = pre.apply(x)
    assert out.dtype == np.float32 and pre.mean == (0.4914, 0.4822, 0.4465)
    for c, (m, s) in enumerate(zip(pre.mean, pre.std)):
        np.testing.assert_allclose(out[:, c], (x[:, c] / 255 - m) / s, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(Preprocess().apply(x), x / 255, rtol=1e-6)
    flat = np.full((3, 10), 51.0, np.float32)
    np.testing.assert_allclose(Preprocess.parse(1, "1", "2").apply(flat), np.full((3, 10), 25.0))


def test_preprocess_leaves_its_input_alone_and_equals_the_formula_bit_for_bit():
    x = np.random.default_rng(1).uniform(0, 255, (4, 3, 5, 5)).astype(np.float32)
    before = x.copy()
    pre = Preprocess.parse("255", "0.4914,0.4822,0.4465", "0.247,0.243,0.261")
    mean, std = (np.asarray(v, np.float32).reshape(1, 3, 1, 1) for v in (pre.mean, pre.std))
    assert np.array_equal(pre.apply(x), (x / np.float32(255) - mean) / std)
    assert np.array_equal(x, before)
    pixels = np.arange(256, dtype=np.uint8).reshape(1, 1, 16, 16)
    assert np.array_equal(Preprocess().apply(pixels), pixels.astype(np.float32) / np.float32(255))


def test_preprocess_rejects_bad_values():
    with pytest.raises(DataError, match="scale"):
        Preprocess.parse("0", "0", "1")
    with pytest.raises(DataError, match="std"):
        Preprocess.parse("255", "0", "1,0,1")
    with pytest.raises(DataError, match="mean '0.5,abc'"):
        Preprocess.parse("255", "0.5,abc", "1")
    with pytest.raises(DataError, match="scale '1,2'"):
        Preprocess.parse("1,2", "0", "1")
    with pytest.raises(DataError, match=r"mean has 3 values but data of shape \[2, 1, 8, 8\] has 1 channel"):
        Preprocess(mean=(0.1, 0.2, 0.3)).apply(np.zeros((2, 1, 8, 8)))
    with pytest.raises(DataError, match=r"std has 2 values but data of shape \[2, 10\]"):
        Preprocess(std=(1.0, 2.0)).apply(np.zeros((2, 10)))


def test_fit_to_input_accepts():
    x = np.arange(2 * 784, dtype=np.float64).reshape(2, 1, 28, 28)
    same = fit_to_input(x, "in", ["N", 1, 28, 28])
    assert same.dtype == np.float32 and same.flags.c_contiguous and same.shape == (2, 1, 28, 28)
    assert fit_to_input(x, "in", [None, "c", "h", 28]).shape == (2, 1, 28, 28)
    flat = fit_to_input(x, "in", [1, 784])
    np.testing.assert_array_equal(flat, x.reshape(2, -1))
    np.testing.assert_array_equal(fit_to_input(flat, "in", ["batch", 1, 28, 28]), x)
    assert fit_to_input(x[:, :, ::2, ::2], "in", [10, 1, 14, 14]).flags.c_contiguous


@pytest.mark.parametrize("x_shape, input_shape, shown", [
    ((2, 1, 28, 28), ["N", 3, 32, 32], "[1, 28, 28] do not fit model input 'input_0' of shape [N, 3, 32, 32]"),
    ((2, 1, 28, 28), [None, 100], "[1, 28, 28] do not fit model input 'input_0' of shape [N, 100]"),
    ((2, 784), ["N", 3, "h", "w"], "[784] do not fit model input 'input_0' of shape [N, 3, h, w]"),
    ((2, 1, 28, 28), ["N", 28, 28], "[1, 28, 28] do not fit model input 'input_0' of shape [N, 28, 28]"),
])
def test_fit_to_input_rejects(x_shape, input_shape, shown):
    with pytest.raises(DataError) as info:
        fit_to_input(np.zeros(x_shape), "input_0", input_shape, data_name="mnist:/d")
    assert str(info.value) == f"data 'mnist:/d' samples of shape {shown}"


def test_batches_in_order_with_short_tail():
    x, y = np.arange(10).reshape(5, 2), np.arange(5)
    got = list(batches(x, y, 2))
    assert [len(b) for b, _ in got] == [2, 2, 1] and got[2][1].tolist() == [4]
    np.testing.assert_array_equal(np.concatenate([b for b, _ in got]), x)
    with pytest.raises(DataError, match="batch size 0"):
        next(batches(x, y, 0))
    with pytest.raises(DataError, match="5 samples but labels of shape"):
        Dataset("bad", np.zeros((5, 2)), np.zeros(4, np.int64))


@pytest.mark.shared
def test_shared_mnist_and_fashion_mnist():
    if not SHARED_DATA.is_dir():
        pytest.skip(f"../shared/data not present: {SHARED_DATA.resolve()} is missing")
    mnist = load_data(f"mnist:{SHARED_DATA / 'mnist'}")
    assert mnist.x.shape == (10000, 1, 28, 28) and mnist.x.max() == 255
    assert np.bincount(mnist.y).tolist() == [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
    fashion = load_data(f"fashion-mnist:{SHARED_DATA / 'fashion-mnist'}")
    assert fashion.x.shape == (10000, 1, 28, 28) and np.bincount(fashion.y).tolist() == [1000] * 10
