"""Tests for vit.datasets: IDX files, Fashion-MNIST and CIFAR's pickles, read safely.

The writers here make tiny files in the real formats; other test modules import them.
"""

from __future__ import annotations

import gzip
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest

from vit.data import DATASET_STATS
from vit.datasets import (
    FASHION_MNIST_ROOT,
    UnsafePickleError,
    read_cifar,
    read_fashion_mnist,
    read_idx,
    read_safe_pickle,
)

# ------------------------------------------------------------------------------- IDX


def idx_bytes(array: np.ndarray) -> bytes:
    """The IDX format: 0, 0, dtype code 0x08 (ubyte), ndim, big-endian dims, data."""
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim)
    return header + struct.pack(f">{array.ndim}I", *array.shape) + array.tobytes()


@pytest.mark.parametrize("gzipped", [False, True])
def test_read_idx_roundtrip(tmp_path, gzipped):
    array = np.random.default_rng(0).integers(0, 256, (5, 3, 2), dtype=np.uint8)
    raw = idx_bytes(array)
    path = tmp_path / "x-idx3-ubyte"
    path.write_bytes(gzip.compress(raw) if gzipped else raw)
    np.testing.assert_array_equal(read_idx(path), array)


def test_read_idx_wider_dtype(tmp_path):
    values = np.array([[-2, 70000]], dtype=">i4")
    head = struct.pack(">BBBBII", 0, 0, 0x0C, 2, 1, 2)
    (tmp_path / "i").write_bytes(head + values.tobytes())
    np.testing.assert_array_equal(read_idx(tmp_path / "i"), [[-2, 70000]])


@pytest.mark.parametrize("delta", [-1, 1])
def test_read_idx_wrong_size(tmp_path, delta):
    raw = idx_bytes(np.zeros((4, 3), np.uint8))
    raw = raw[:delta] if delta < 0 else raw + b"\x00"
    (tmp_path / "bad-idx").write_bytes(raw)
    with pytest.raises(ValueError, match=r"bad-idx: header says shape \(4, 3\) \(12 bytes"):
        read_idx(tmp_path / "bad-idx")


def test_read_idx_bad_magic(tmp_path):
    (tmp_path / "m").write_bytes(b"\x01\x02\x08\x01\x00\x00\x00\x01\x00")
    with pytest.raises(ValueError, match="m: not an IDX file"):
        read_idx(tmp_path / "m")


# ----------------------------------------------------------------------- Fashion-MNIST


def write_fashion(root: Path, prefix: str, n: int, gz: bool) -> np.ndarray:
    root.mkdir(parents=True, exist_ok=True)
    images = np.random.default_rng(1).integers(0, 256, (n, 28, 28), dtype=np.uint8)
    labels = np.arange(n, dtype=np.uint8) % 10
    for kind, array in (("images-idx3", images), ("labels-idx1", labels)):
        raw = idx_bytes(array)
        name = f"{prefix}-{kind}-ubyte" + (".gz" if gz else "")
        (root / name).write_bytes(gzip.compress(raw) if gz else raw)
    return images


def test_fashion_mnist_from_files(tmp_path):
    written = write_fashion(tmp_path, "t10k", 12, gz=True)
    images, labels = read_fashion_mnist(tmp_path, "test")
    assert images.shape == (12, 28, 28, 1) and images.dtype == np.uint8
    assert labels.dtype == np.int64 and labels.tolist() == [k % 10 for k in range(12)]
    np.testing.assert_array_equal(images[..., 0], written)


def test_fashion_mnist_label_out_of_range_names_the_file(tmp_path):
    write_fashion(tmp_path, "t10k", 12, gz=False)
    labels = np.arange(12, dtype=np.uint8) % 10
    labels[7] = 10  # Fashion-MNIST has classes 0 to 9
    (tmp_path / "t10k-labels-idx1-ubyte").write_bytes(idx_bytes(labels))
    with pytest.raises(ValueError, match="label 10 of image 7 is out of range for 10") as e:
        read_fashion_mnist(tmp_path, "test")
    assert "t10k-labels-idx1-ubyte" in str(e.value)


def test_fashion_mnist_in_torchvision_layout(tmp_path):
    written = write_fashion(tmp_path / "FashionMNIST" / "raw", "train", 3, gz=False)
    images, _ = read_fashion_mnist(tmp_path, "train")
    np.testing.assert_array_equal(images[..., 0], written)


def test_fashion_mnist_missing_says_how_to_get_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist") as e:
        read_fashion_mnist(tmp_path, "train")
    assert str(tmp_path) in str(e.value) and "data.download=true" in str(e.value)
    with pytest.raises(ValueError, match="'val'"):
        read_fashion_mnist(tmp_path, "val")


# ----------------------------------------------------------------------------- CIFAR


def _py2_str(b: bytes) -> bytes:
    """A Python 2 ``str`` pickle opcode, which CIFAR's files use for keys and pixel data."""
    return b"U" + bytes([len(b)]) if len(b) < 256 else b"T" + struct.pack("<I", len(b))


def py2_pickle(obj: dict) -> bytes:
    """Pickle like CIFAR's own files (Python 2 cPickle, protocol 2): a dict of str keys,
    numpy arrays rebuilt by numpy.core.multiarray._reconstruct, and lists of ints/strs."""

    def dump(x) -> bytes:
        if isinstance(x, bytes):
            return _py2_str(x) + x
        if isinstance(x, int):
            return b"J" + struct.pack("<i", x)
        if isinstance(x, list):
            return b"(" + b"".join(dump(v) for v in x) + b"l"
        if isinstance(x, np.ndarray):
            assert x.dtype == np.uint8
            dtype = b"cnumpy\ndtype\n" + dump(b"u1") + b"K\x00K\x01\x87R"
            dtype += b"(K\x03" + dump(b"|") + b"NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00tb"
            shape = b"(" + b"".join(dump(d) for d in x.shape) + b"t"
            head = b"cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\nK\x00\x85"
            head += dump(b"b") + b"\x87R"
            return head + b"(K\x01" + shape + dtype + b"\x89" + dump(x.tobytes()) + b"tb"
        raise TypeError(type(x))

    items = b"".join(dump(k) + dump(v) for k, v in obj.items())
    return b"\x80\x02}(" + items + b"u."


def cifar_rows(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, 3072), dtype=np.uint8)


def write_cifar10(root: Path) -> Path:
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    names = [b"airplane", b"automobile", b"bird", b"cat", b"deer"] + [b"c%d" % k for k in range(5)]
    (folder / "batches.meta").write_bytes(py2_pickle({b"label_names": names}))
    for k in range(1, 6):
        batch = {b"batch_label": b"training batch", b"labels": [k, k + 1, 0]}
        batch[b"data"] = cifar_rows(3, k)
        (folder / f"data_batch_{k}").write_bytes(py2_pickle(batch))
    test = {b"labels": [9, 8], b"data": cifar_rows(2, 99)}
    (folder / "test_batch").write_bytes(py2_pickle(test))
    return folder


def test_cifar10_py2_batches(tmp_path):
    write_cifar10(tmp_path)
    images, labels, class_names = read_cifar(tmp_path, "cifar10", "train")
    assert images.shape == (15, 32, 32, 3) and class_names[:2] == ["airplane", "automobile"]
    assert labels.dtype == np.int64 and labels.tolist()[:6] == [1, 2, 0, 2, 3, 0]
    # rows are an R plane, a G plane, a B plane, each 32x32 row-major
    rows = cifar_rows(3, 2)  # what data_batch_2 holds
    image = images[4]  # batch 2, row 1
    assert image[0, 0, 0] == rows[1, 0]
    assert image[1, 2, 1] == rows[1, 1024 + 32 * 1 + 2]
    assert image[31, 30, 2] == rows[1, 2048 + 32 * 31 + 30]
    _, test_labels, _ = read_cifar(tmp_path, "cifar10", "test")
    assert test_labels.tolist() == [9, 8]


def test_cifar_label_out_of_range_names_the_file(tmp_path):
    folder = write_cifar10(tmp_path)
    test = {b"labels": [9, 10], b"data": cifar_rows(2, 99)}
    (folder / "test_batch").write_bytes(py2_pickle(test))
    with pytest.raises(ValueError, match=r"test_batch: label 10 of image 1 is out of range"):
        read_cifar(tmp_path, "cifar10", "test")
    read_cifar(tmp_path, "cifar10", "train")  # the other batches are fine


def test_cifar100_modern_pickle(tmp_path):
    # re-saved with Python 3's default protocol: arrays come back through _frombuffer
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    meta = {b"fine_label_names": [b"apple", b"bear"], b"coarse_label_names": [b"x"]}
    (folder / "meta").write_bytes(pickle.dumps(meta))
    train = {b"data": cifar_rows(4, 0), b"fine_labels": [1, 0, 1, 1], b"coarse_labels": [0] * 4}
    (folder / "train").write_bytes(pickle.dumps(train))
    images, labels, class_names = read_cifar(tmp_path, "cifar100", "train")
    assert class_names == ["apple", "bear"] and labels.tolist() == [1, 0, 1, 1]
    assert images[3, 31, 31, 2] == train[b"data"][3, 3071]


class Malicious:
    """Unpickling this creates a marker file: a stand-in for running any code."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_malicious_batch_refused(tmp_path):
    folder = write_cifar10(tmp_path)
    marker = tmp_path / "pwned"
    evil = {b"data": Malicious(marker), b"labels": [0]}
    (folder / "data_batch_3").write_bytes(pickle.dumps(evil))
    with pytest.raises(UnsafePickleError, match=r"data_batch_3: refused .*open"):
        read_cifar(tmp_path, "cifar10", "train")
    assert not marker.exists()
    # the payload is live: a plain unpickler does create the file
    pickle.loads(pickle.dumps(Malicious(tmp_path / "control"))).close()
    assert (tmp_path / "control").exists()


def test_unreadable_pickle_is_a_value_error(tmp_path):
    (tmp_path / "cut").write_bytes(pickle.dumps({b"data": [1, 2, 3]})[:-3])
    with pytest.raises(ValueError, match="cut: not a readable pickle"):
        read_safe_pickle(tmp_path / "cut")


def test_cifar_missing(tmp_path):
    with pytest.raises(FileNotFoundError, match="cifar-10-batches-py"):
        read_cifar(tmp_path, "cifar10")
    with pytest.raises(ValueError, match="cifar20"):
        read_cifar(tmp_path, "cifar20")


# --------------------------------------------------------------------------- real data


@pytest.mark.skipif(
    not (Path(FASHION_MNIST_ROOT) / "t10k-labels-idx1-ubyte.gz").exists(),
    reason="Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)",
)
def test_real_fashion_mnist():
    train_images, train_labels = read_fashion_mnist(split="train")
    test_images, test_labels = read_fashion_mnist(split="test")
    assert train_images.shape == (60000, 28, 28, 1) and test_images.shape == (10000, 28, 28, 1)
    assert np.bincount(train_labels).tolist() == [6000] * 10
    assert np.bincount(test_labels).tolist() == [1000] * 10
    # the normalisation constants vit.data uses for this data set
    pixels = train_images.astype(np.float32) / 255
    mean, std = DATASET_STATS["fashion_mnist"]
    assert abs(pixels.mean() - mean[0]) < 5e-4 and abs(pixels.std() - std[0]) < 5e-4
