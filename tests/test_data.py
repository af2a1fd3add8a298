"""Tests for vit.data: folder and array sources, splits, subsets, and the dispatcher."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from test_datasets import write_cifar10, write_fashion

from vit import data
from vit.data import (
    DATASET_STATS,
    FASHION_MNIST_CLASSES,
    ArraySource,
    FolderSource,
    Subset,
    build_source,
    cifar,
    fashion_mnist,
    rgb_to_luminance,
    split_indices,
)
from vit.images import BadImageError

SHARED = Path("/work/shared/data")


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
    (tmp_path / "a" / "notes.txt").write_text("not an image")
    (tmp_path / "a" / ".DS_Store").write_bytes(b"\x00")
    with pytest.raises(ValueError, match=r"no readable .*0 bad file\(s\) skipped, 1 file\(s\)"):
        FolderSource(tmp_path)
    (tmp_path / "a" / "broken.png").write_bytes(b"")
    with pytest.raises(ValueError, match=r"no readable .*1 bad file\(s\) skipped, 1 file\(s\)"):
        FolderSource(tmp_path, bad_files="skip")
    with pytest.raises(FileNotFoundError, match="missing"):
        FolderSource(tmp_path / "missing")


def add_hidden_files(root: Path) -> None:
    """Files that macOS and other tools leave behind in make_folder's tree. Read as images,
    the AppleDouble ones (``._*``, named like their image) would be bad files."""
    (root / "cat" / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1" + bytes(64))
    (root / "cat" / "._a.png").write_bytes(b"\x00\x05\x16\x07" + bytes(64))
    (root / "cat" / "sub" / "._c.PNG").write_bytes(b"\x00\x05\x16\x07" + bytes(64))
    (root / ".DS_Store").write_bytes(bytes(8))  # beside the class folders
    (root / "._cat").write_bytes(b"\x00\x05\x16\x07")


@pytest.mark.parametrize("bad_files", ["error", "skip"])
def test_hidden_files_are_never_read(tmp_path, monkeypatch, bad_files):
    root = make_folder(tmp_path / "train")  # also holds .hidden.png, .cache/ and .git/
    add_hidden_files(root)
    read, real_load = [], data.load_image

    def recording_load(path, channels):
        read.append(Path(path).relative_to(root))
        return real_load(path, channels)

    monkeypatch.setattr(data, "load_image", recording_load)
    src = FolderSource(root, bad_files=bad_files)
    assert len(src) == 4 and src.skipped == []  # no hidden file counted, good or bad
    assert [os.path.relpath(p, root) for p in src.ignored] == ["cat/notes.md", "dog/labels.txt"]
    assert len(read) == 4
    assert not [p for p in read if any(part.startswith(".") for part in p.parts)]


@pytest.mark.parametrize("bad_files", ["error", "skip"])
def test_files_without_image_extension_are_ignored_not_bad(tmp_path, caplog, bad_files):
    root = make_folder(tmp_path / "train")
    (root / "cat" / "notes.txt").write_text("not an image")
    # a real image under another name is not read either: the extension decides
    save(root / "dog" / "photo.png", solid((0, 9, 0))).rename(root / "dog" / "photo.dat")
    with caplog.at_level(logging.INFO, logger="vit.data"):
        src = FolderSource(root, bad_files=bad_files)
    ignored = [os.path.relpath(p, root) for p in src.ignored]
    assert ignored == ["cat/notes.md", "cat/notes.txt", "dog/labels.txt", "dog/photo.dat"]
    assert len(src) == 4 and src.skipped == []
    assert "ignored 4 file(s) without an image extension, e.g." in caplog.text


@pytest.mark.parametrize("bad_files", ["error", "skip"])
def test_empty_class_folders_keep_their_labels(tmp_path, caplog, bad_files):
    root = tmp_path / "train"
    save(root / "a" / "x.png", solid((1, 1, 1)))
    (root / "b_empty").mkdir()
    (root / "c_junk").mkdir()
    (root / "c_junk" / ".DS_Store").write_bytes(b"\x00")
    (root / "c_junk" / "README.txt").write_text("no images here")
    save(root / "d" / "y.png", solid((2, 2, 2)))
    with caplog.at_level(logging.WARNING, logger="vit.data"):
        src = FolderSource(root, bad_files=bad_files)
    assert src.class_names == ["a", "b_empty", "c_junk", "d"]
    assert src.labels.tolist() == [0, 3]  # d's label is not shifted by the empty classes
    assert "2 class folder(s) hold no readable images: b_empty, c_junk" in caplog.text


def test_class_emptied_by_skipped_files_keeps_its_label(tmp_path, caplog):
    root = tmp_path / "train"
    (root / "a").mkdir(parents=True)
    (root / "a" / "broken.png").write_bytes(b"")
    save(root / "b" / "y.png", solid((2, 2, 2)))
    with caplog.at_level(logging.WARNING, logger="vit.data"):
        src = FolderSource(root, bad_files="skip")
    assert src.class_names == ["a", "b"] and src.labels.tolist() == [1]
    assert [os.path.basename(p) for p, _ in src.skipped] == ["broken.png"]
    assert "skipped 1 bad image file(s)" in caplog.text
    assert "1 class folder(s) hold no readable images: a" in caplog.text


def test_nested_subfolders_belong_to_their_top_class(tmp_path):
    root = make_folder(tmp_path / "train")
    save(root / "cat" / "sub" / "deep" / "d.png", solid((25, 0, 0)))
    save(root / "cat" / "z.png", solid((10, 0, 0)))
    save(root / "dog" / "cat" / "w.png", solid((0, 0, 9)))  # a subfolder named like a class
    src = FolderSource(root)
    assert src.class_names == ["cat", "dog", "empty_cls"]
    names = [os.path.relpath(src.describe(i), root) for i in range(len(src))]
    assert names == [
        "cat/a.png",
        "cat/b.png",
        "cat/sub/c.PNG",
        "cat/sub/deep/d.png",
        "cat/z.png",
        "dog/cat/w.png",
        "dog/x.jpg",
    ]
    assert src.labels.tolist() == [0, 0, 0, 0, 0, 1, 1]


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


def test_published_sets_as_sources(tmp_path):
    write_fashion(tmp_path, "t10k", 12, gz=True)
    fm = fashion_mnist(tmp_path, "test")
    assert len(fm) == 12 and fm.class_names == list(FASHION_MNIST_CLASSES)
    image, label = fm.get(11)
    assert image.shape == (28, 28, 1) and label == 1
    assert fm.describe(3) == "fashion_mnist/test[3]"
    write_cifar10(tmp_path)
    c10 = cifar(tmp_path, "cifar10", "test")
    assert c10.class_names[:2] == ["airplane", "automobile"] and c10.labels.tolist() == [9, 8]
    assert c10.get(1)[0].shape == (32, 32, 3) and c10.describe(1) == "cifar10/test[1]"


def test_dataset_stats_shapes():
    for name, (mean, std) in DATASET_STATS.items():
        assert len(mean) == len(std) in (1, 3), name
        assert all(0 < v < 1 for v in (*mean, *std)), name


# --------------------------------------------------------------------------- real data


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
