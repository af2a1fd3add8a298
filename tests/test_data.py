"""Tests for vit.data: folder, IDX and CIFAR sources, splits, and the dispatcher."""

from __future__ import annotations

import gzip
import logging
import os
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vit import data
from vit.data import (
    DATASET_STATS,
    FASHION_MNIST_CLASSES,
    ArraySource,
    FolderSource,
    Subset,
    UnsafePickleError,
    build_source,
    cifar,
    fashion_mnist,
    read_idx,
    rgb_to_luminance,
    split_indices,
)
from vit.images import BadImageError

SHARED = Path("/work/shared/data")
FASHION_ROOT = Path("/usr/share/datasets/fashion-mnist")


def solid(colour: tuple[int, int, int], h: int = 6, w: int = 4) -> np.ndarray:
    return np.broadcast_to(np.array(colour, np.uint8), (h, w, 3)).copy()


def save(path: Path, pixels: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)
    return path


def make_folder(root: Path) -> Path:
    """root/{cat,dog,empty_cls}/... with nested, hidden and non-image files."""
    save(root / "cat" / "b.png", solid((200, 0, 0)))
    save(root / "cat" / "a.png", solid((100, 0, 0)))
    save(root / "cat" / "sub" / "c.PNG", solid((50, 0, 0)))
    save(root / "dog" / "x.jpg", solid((0, 0, 255), 16, 16))
    save(root / "dog" / ".hidden.png", solid((1, 2, 3)))  # hidden file: ignored
    save(root / "dog" / ".cache" / "y.png", solid((1, 2, 3)))  # hidden folder: ignored
    save(root / ".git" / "z.png", solid((1, 2, 3)))  # hidden class folder: ignored
    (root / "dog" / "labels.txt").write_text("not an image")
    (root / "cat" / "notes.md").write_text("not an image")
    (root / "empty_cls").mkdir()
    return root


def test_folder_source_layout(tmp_path, caplog):
    root = make_folder(tmp_path / "train")
    with caplog.at_level(logging.WARNING, logger="vit.data"):
        src = FolderSource(root)
    assert src.class_names == ["cat", "dog", "empty_cls"]
    names = [os.path.relpath(src.describe(i), root) for i in range(len(src))]
    assert names == ["cat/a.png", "cat/b.png", "cat/sub/c.PNG", "dog/x.jpg"]
    assert src.labels.tolist() == [0, 0, 0, 1] and src.labels.dtype == np.int64
    assert len(src.ignored) == 2 and src.skipped == []
    assert "empty_cls" in caplog.text
    image, label = src.get(1)
    np.testing.assert_array_equal(image, solid((200, 0, 0)))
    assert label == 0
    image, label = src.get(3)
    assert image.shape == (16, 16, 3) and label == 1
    assert np.abs(image.astype(int) - (0, 0, 255)).max() <= 4  # JPEG
    with pytest.raises(IndexError, match="4"):
        src.get(4)


def test_folder_source_channels_and_in_memory(tmp_path, monkeypatch):
    root = make_folder(tmp_path / "train")
    src = FolderSource(root, channels=1, in_memory=True)

    def no_decoding(*args, **kwargs):
        raise AssertionError("get() decoded a file although in_memory=True")

    monkeypatch.setattr(data, "load_image", no_decoding)
    image, _ = src.get(0)
    assert image.shape == (6, 4, 1)
    assert not image.flags.writeable  # the cached array is shared by every get()
    assert image[0, 0, 0] == rgb_to_luminance(np.array([100, 0, 0], np.uint8))


def test_class_names_order_sets_labels(tmp_path):
    root = make_folder(tmp_path / "train")
    src = FolderSource(root, class_names=["dog", "empty_cls", "cat"])
    assert src.class_names == ["dog", "empty_cls", "cat"]
    labels = {os.path.basename(src.describe(i)): src.labels[i] for i in range(len(src))}
    assert labels == {"a.png": 2, "b.png": 2, "c.PNG": 2, "x.jpg": 0}


def test_class_names_mismatch_is_an_error(tmp_path):
    root = make_folder(tmp_path / "train")
    with pytest.raises(ValueError, match=r"missing folders: \['bird'\].*not in class_names: "):
        FolderSource(root, class_names=["cat", "dog", "empty_cls", "bird"])
    with pytest.raises(ValueError, match=r"missing folders: none.*\['empty_cls'\]"):
        FolderSource(root, class_names=["cat", "dog"])


def add_bad_files(root: Path) -> list[Path]:
    """Three bad files in sorted order: zero bytes, text named .png, truncated JPEG."""
    (root / "cat" / "a0_empty.png").write_bytes(b"")
    (root / "cat" / "a1_text.png").write_text("hello")
    noise = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    full = save(root / "dog" / "full.jpg", noise).read_bytes()
    (root / "dog" / "cut.jpg").write_bytes(full[: len(full) // 2])
    return [root / "cat" / "a0_empty.png", root / "cat" / "a1_text.png", root / "dog" / "cut.jpg"]


def test_bad_files_error_names_the_first(tmp_path):
    root = make_folder(tmp_path / "train")
    bad = add_bad_files(root)
    with pytest.raises(BadImageError) as info:
        FolderSource(root)
    assert info.value.path == str(bad[0])
    assert "a0_empty.png" in str(info.value)


def test_bad_files_skip_counts_and_logs(tmp_path, caplog):
    root = make_folder(tmp_path / "train")
    bad = add_bad_files(root)
    with caplog.at_level(logging.WARNING, logger="vit.data"):
        src = FolderSource(root, bad_files="skip")
    assert [p for p, _ in src.skipped] == [str(p) for p in bad]
    assert "empty" in src.skipped[0][1] and "not a recognised" in src.skipped[1][1]
    assert len(src) == 5  # 4 good files of make_folder plus full.jpg
    assert "skipped 3 bad image file(s)" in caplog.text
    assert all(Path(src.describe(i)) not in bad for i in range(len(src)))


def test_bad_files_policy_checked(tmp_path):
    with pytest.raises(ValueError, match="bad_files"):
        FolderSource(make_folder(tmp_path / "t"), bad_files="ignore")


def test_folder_without_images_is_an_error(tmp_path):
    (tmp_path / "a").mkdir()
    with pytest.raises(ValueError, match="no readable image files"):
        FolderSource(tmp_path)
    with pytest.raises(FileNotFoundError, match="missing"):
        FolderSource(tmp_path / "missing")


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


def write_fashion(root: Path, prefix: str, n: int, gz: bool) -> np.ndarray:
    images = np.random.default_rng(1).integers(0, 256, (n, 28, 28), dtype=np.uint8)
    labels = np.arange(n, dtype=np.uint8) % 10
    for kind, array in (("images-idx3", images), ("labels-idx1", labels)):
        raw = idx_bytes(array)
        name = f"{prefix}-{kind}-ubyte" + (".gz" if gz else "")
        (root / name).write_bytes(gzip.compress(raw) if gz else raw)
    return images


def test_fashion_mnist_from_files(tmp_path):
    images = write_fashion(tmp_path, "t10k", 12, gz=True)
    src = fashion_mnist(tmp_path, "test")
    assert len(src) == 12 and src.class_names == list(FASHION_MNIST_CLASSES)
    image, label = src.get(11)
    assert image.shape == (28, 28, 1) and label == 1
    np.testing.assert_array_equal(image[:, :, 0], images[11])
    assert src.describe(3) == "fashion_mnist/test[3]"


def test_fashion_mnist_missing_says_how_to_get_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist") as e:
        fashion_mnist(tmp_path, "train")
    assert str(tmp_path) in str(e.value) and "data.download=true" in str(e.value)


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
    src = cifar(tmp_path, "cifar10", "train")
    assert len(src) == 15 and src.class_names[:2] == ["airplane", "automobile"]
    assert src.labels.tolist()[:6] == [1, 2, 0, 2, 3, 0]
    # rows are an R plane, a G plane, a B plane, each 32x32 row-major
    rows = cifar_rows(3, 2)  # what data_batch_2 holds
    image, _ = src.get(4)  # batch 2, row 1
    assert image.shape == (32, 32, 3)
    assert image[0, 0, 0] == rows[1, 0]
    assert image[1, 2, 1] == rows[1, 1024 + 32 * 1 + 2]
    assert image[31, 30, 2] == rows[1, 2048 + 32 * 31 + 30]
    test = cifar(tmp_path, "cifar10", "test")
    assert test.labels.tolist() == [9, 8] and test.describe(1) == "cifar10/test[1]"


def test_cifar100_modern_pickle(tmp_path):
    # re-saved with Python 3's default protocol: arrays come back through _frombuffer
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    meta = {b"fine_label_names": [b"apple", b"bear"], b"coarse_label_names": [b"x"]}
    (folder / "meta").write_bytes(pickle.dumps(meta))
    train = {b"data": cifar_rows(4, 0), b"fine_labels": [1, 0, 1, 1], b"coarse_labels": [0] * 4}
    (folder / "train").write_bytes(pickle.dumps(train))
    src = cifar(tmp_path, "cifar100", "train")
    assert src.class_names == ["apple", "bear"] and src.labels.tolist() == [1, 0, 1, 1]
    assert src.get(3)[0][31, 31, 2] == train[b"data"][3, 3071]


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
        cifar(tmp_path, "cifar10", "train")
    assert not marker.exists()
    # the payload is live: a plain unpickler does create the file
    pickle.loads(pickle.dumps(Malicious(tmp_path / "control"))).close()
    assert (tmp_path / "control").exists()


def test_cifar_missing(tmp_path):
    with pytest.raises(FileNotFoundError, match="cifar-10-batches-py"):
        cifar(tmp_path, "cifar10")


# ------------------------------------------------------------------- splits and subsets


def test_split_indices_properties():
    labels = np.repeat(np.arange(4), [10, 20, 3, 1])
    np.random.default_rng(0).shuffle(labels)
    train, val = split_indices(labels, 0.2, seed=7)
    assert np.intersect1d(train, val).size == 0
    np.testing.assert_array_equal(np.sort(np.concatenate([train, val])), np.arange(len(labels)))
    assert np.bincount(labels[val], minlength=4).tolist() == [2, 4, 1, 0]  # round(0.2 n)
    again = split_indices(labels, 0.2, seed=7)
    np.testing.assert_array_equal(again[1], val)
    other = split_indices(labels, 0.2, seed=8)[1]
    assert not np.array_equal(other, val)
    assert split_indices(labels, 0.0, seed=0)[1].size == 0
    with pytest.raises(ValueError, match="val_fraction"):
        split_indices(labels, 1.0, seed=0)


def test_subset_view():
    images = np.arange(5, dtype=np.uint8).reshape(5, 1, 1, 1) * np.ones((1, 2, 2, 3), np.uint8)
    src = ArraySource(images, [0, 1, 0, 1, 1], ["a", "b"], name="toy")
    sub = Subset(src, [4, 1])
    assert len(sub) == 2 and sub.class_names == ["a", "b"] and sub.labels.tolist() == [1, 1]
    assert sub.get(0)[0][0, 0, 0] == 4 and sub.describe(1) == "toy[1]"
    with pytest.raises(IndexError):
        Subset(src, [5])


def test_array_source_hands_out_read_only_views():
    images = np.zeros((3, 2, 2, 1), np.uint8)
    src = ArraySource(images, [0, 0, 0], ["a"])
    image, _ = src.get(1)
    with pytest.raises(ValueError, match="read-only"):
        image += 1  # an in-place transform must not change the data set
    assert images.flags.writeable  # the caller's own array is left alone


def test_array_source_validates():
    with pytest.raises(ValueError, match="uint8"):
        ArraySource(np.zeros((2, 2, 2, 1), np.float32), [0, 0], ["a"])
    with pytest.raises(ValueError, match="classes"):
        ArraySource(np.zeros((2, 2, 2, 1), np.uint8), [0, 2], ["a", "b"])


# ------------------------------------------------------------------------- dispatcher


def test_build_source_imagefolder(tmp_path):
    make_folder(tmp_path / "train")
    src = build_source("imagefolder", tmp_path, "train", channels=3, bad_files="error")
    assert isinstance(src, FolderSource) and len(src) == 4
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "val")):
        build_source("imagefolder", tmp_path, "val")
    with pytest.raises(ValueError, match="unknown dataset 'mnist'"):
        build_source("mnist", tmp_path, "train")


def test_build_source_arrays_channels_and_class_check(tmp_path):
    write_cifar10(tmp_path)
    rgb = build_source("cifar10", tmp_path, "test")
    gray = build_source("cifar10", tmp_path, "test", channels=1)
    assert gray.images.shape == (2, 32, 32, 1)
    pil_l = np.asarray(Image.fromarray(rgb.get(1)[0]).convert("L"))  # the reference
    np.testing.assert_array_equal(gray.get(1)[0][:, :, 0], pil_l)
    with pytest.raises(ValueError, match="differ"):
        build_source("cifar10", tmp_path, "test", class_names=["airplane"])
    write_fashion(tmp_path, "train", 3, gz=False)
    fm = build_source("fashion_mnist", tmp_path, "train", channels=3)
    assert fm.images.shape == (3, 28, 28, 3)
    np.testing.assert_array_equal(fm.images[..., 0], fm.images[..., 2])


def test_dataset_stats_shapes():
    for name, (mean, std) in DATASET_STATS.items():
        assert len(mean) == len(std) in (1, 3), name
        assert all(0 < v < 1 for v in (*mean, *std)), name


# --------------------------------------------------------------------------- real data


@pytest.mark.skipif(
    not (FASHION_ROOT / "t10k-labels-idx1-ubyte.gz").exists(),
    reason="Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)",
)
def test_real_fashion_mnist():
    train, test = fashion_mnist(split="train"), fashion_mnist(split="test")
    assert train.images.shape == (60000, 28, 28, 1) and test.images.shape == (10000, 28, 28, 1)
    assert np.bincount(train.labels).tolist() == [6000] * 10
    assert np.bincount(test.labels).tolist() == [1000] * 10
    pixels = train.images.astype(np.float32) / 255
    mean, std = DATASET_STATS["fashion_mnist"]
    assert abs(pixels.mean() - mean[0]) < 5e-4 and abs(pixels.std() - std[0]) < 5e-4


def link_sample(src_root: Path, dst_root: Path, classes: list[str], per_class: int) -> None:
    """A small ImageFolder of symlinks to the first files of each class."""
    for name in classes:
        (dst_root / name).mkdir(parents=True)
        for f in sorted((src_root / name).iterdir())[:per_class]:
            (dst_root / name / f.name).symlink_to(f)


IMAGENETTE = SHARED / "imagenette" / "val"


@pytest.mark.skipif(not IMAGENETTE.is_dir(), reason=f"{IMAGENETTE} absent")
def test_real_imagenette_folder(tmp_path):
    classes = sorted(p.name for p in IMAGENETTE.iterdir() if p.is_dir())
    assert len(classes) == 10 and classes[0] == "n01440764"
    link_sample(IMAGENETTE, tmp_path / "val", classes, per_class=3)
    src = build_source("imagefolder", tmp_path, "val", class_names=classes, in_memory=True)
    assert len(src) == 30 and np.bincount(src.labels).tolist() == [3] * 10
    for i in range(0, 30, 7):
        image, label = src.get(i)
        assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3
        assert min(image.shape[:2]) == 224  # the copy's shortest side
        assert classes[label] in src.describe(i)


CIFAR_FOLDER = SHARED / "cifar10" / "train"


@pytest.mark.skipif(not CIFAR_FOLDER.is_dir(), reason=f"{CIFAR_FOLDER} absent")
def test_real_cifar10_folder(tmp_path):
    classes = sorted(p.name for p in CIFAR_FOLDER.iterdir() if p.is_dir())
    assert len(classes) == 10
    link_sample(CIFAR_FOLDER, tmp_path / "train", classes, per_class=5)
    src = build_source("imagefolder", tmp_path, "train")
    assert src.class_names == classes and len(src) == 50
    assert all(src.get(i)[0].shape == (32, 32, 3) for i in range(len(src)))
