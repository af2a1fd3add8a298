"""Image sources: raw uint8 images and integer labels, before any transform.

A source is anything with ``len``, ``get(i) -> (uint8 [H, W, C] array, label)``,
``describe(i)`` (a file path or an index, for error messages and reports), ``labels`` and
``class_names``. Here: images in memory (``ArraySource``), an image folder
(``root/<class>/**/<file>``, decoded and checked up front), a view of a source
(``Subset``), a stratified validation split (``split_indices``) and ``build_source``,
which picks one by data set name. Reading the published data sets' own file formats is
``vit.datasets``'s job.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Protocol

import numpy as np

from vit.datasets import FASHION_MNIST_CLASSES, read_cifar, read_fashion_mnist
from vit.images import BadImageError, is_image_path, load_image

logger = logging.getLogger(__name__)

# per-channel (mean, std) of the training pixels in [0, 1] units
DATASET_STATS: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "fashion_mnist": ((0.2860,), (0.3530,)),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
}


class ImageSource(Protocol):
    """What the training and evaluation code needs from a data set."""

    class_names: list[str]
    labels: np.ndarray  # N int64

    def __len__(self) -> int: ...

    def get(self, i: int) -> tuple[np.ndarray, int]:
        """Image uint8 [H, W, C] and label; the array may be read-only and shared with
        the source, so copy it before editing in place."""
        ...

    def describe(self, i: int) -> str: ...


def _check_index(i: int, n: int) -> int:
    if not 0 <= i < n:
        raise IndexError(f"index {i} out of range for a source of {n} images")
    return int(i)


class ArraySource:
    """Images held in memory as one uint8 array [N, H, W, C] with int labels."""

    def __init__(
        self,
        images: np.ndarray,
        labels: np.ndarray | Sequence[int],
        class_names: Sequence[str],
        name: str = "array",
    ):
        labels = np.asarray(labels, dtype=np.int64)
        if images.dtype != np.uint8 or images.ndim != 4:
            raise ValueError(
                f"{name}: images must be uint8 [N, H, W, C], got {images.dtype} {images.shape}"
            )
        if labels.shape != (len(images),):
            raise ValueError(f"{name}: {len(images)} images but labels of shape {labels.shape}")
        if len(labels) and (labels.min() < 0 or labels.max() >= len(class_names)):
            raise ValueError(
                f"{name}: labels span [{labels.min()}, {labels.max()}] but there are "
                f"{len(class_names)} classes"
            )
        self.images = images.view()  # N, H, W, C
        # get() hands out views into this array: an in-place edit by a transform would
        # silently change the data set, so make it an error instead
        self.images.flags.writeable = False
        self.labels = labels
        self.class_names = list(class_names)
        self.name = name

    def __len__(self) -> int:
        return len(self.images)

    def get(self, i: int) -> tuple[np.ndarray, int]:
        """The image [H, W, C] and label at ``i``."""
        i = _check_index(i, len(self))
        return self.images[i], int(self.labels[i])

    def describe(self, i: int) -> str:
        return f"{self.name}[{i}]"


class FolderSource:
    """Images in the ImageFolder layout ``root/<class>/**/<file>``.

    Every image file is decoded once at construction so that a bad file surfaces before
    training starts, with its path, rather than in a worker hours later. What a scan meets:

    - Hidden files and folders (name starting with "."), such as ``.DS_Store``, macOS
      ``._*`` AppleDouble files and ``.git``, are never looked at: not read, not counted.
    - Files without an image extension (``vit.images.IMAGE_EXTENSIONS``), such as a
      ``notes.txt``, are not read either; they are listed in ``self.ignored`` and counted
      in an info log. They are not bad files under either ``bad_files`` policy.
    - Files with an image extension that do not decode (empty, truncated, corrupt, not an
      image) are bad files, handled by ``bad_files``.
    - A class folder left with no images keeps its class, so that the other labels do not
      shift; a warning names it. A folder with no images in any class is an error.

    Args:
        root: folder whose non-hidden subfolders are the classes.
        class_names: the classes in label order (e.g. from a checkpoint). The folder must
            hold exactly these classes; by default they are the sorted subfolder names.
        channels: 3 (RGB) or 1 (luminance), passed to ``load_image``.
        bad_files: "error" raises on the first bad file; "skip" drops bad files, lists them
            in ``self.skipped`` as (path, reason) and logs a warning.
        in_memory: keep the decoded arrays so ``get`` does no decoding.
    """

    def __init__(
        self,
        root: str | Path,
        class_names: Sequence[str] | None = None,
        channels: int = 3,
        bad_files: str = "error",
        in_memory: bool = False,
    ):
        if bad_files not in ("error", "skip"):
            raise ValueError(f"bad_files must be 'error' or 'skip', got {bad_files!r}")
        self.root = Path(root)
        self.channels = channels
        self.class_names = _folder_classes(self.root, class_names)
        paths, labels, self.ignored = _scan_folder(self.root, self.class_names)
        good, self._arrays, self.skipped = _decode_all(paths, channels, bad_files, in_memory)
        self.paths = [paths[k] for k in good]
        self.labels = np.asarray([labels[k] for k in good], dtype=np.int64)
        self._log_summary()
        if len(self.paths) == 0:
            raise ValueError(
                f"{self.root}: no readable image files in any class folder "
                f"({len(self.skipped)} bad file(s) skipped, {len(self.ignored)} file(s) "
                "without an image extension ignored)"
            )

    def _log_summary(self) -> None:
        if self.skipped:
            logger.warning(
                "%s: skipped %d bad image file(s), e.g. %s (%s)",
                self.root,
                len(self.skipped),
                *self.skipped[0],
            )
        if self.ignored:
            logger.info(
                "%s: ignored %d file(s) without an image extension, e.g. %s",
                self.root,
                len(self.ignored),
                self.ignored[0],
            )
        counts = np.bincount(self.labels, minlength=len(self.class_names))
        empty = [name for name, n in zip(self.class_names, counts) if n == 0]
        if empty:
            logger.warning(
                "%s: %d class folder(s) hold no readable images: %s (their labels are kept)",
                self.root,
                len(empty),
                ", ".join(empty),
            )

    def __len__(self) -> int:
        return len(self.paths)

    def get(self, i: int) -> tuple[np.ndarray, int]:
        """The image [H, W, C] and label at ``i``."""
        i = _check_index(i, len(self))
        if self._arrays is not None:
            return self._arrays[i], int(self.labels[i])
        return load_image(self.paths[i], self.channels), int(self.labels[i])

    def describe(self, i: int) -> str:
        return self.paths[i]


def _folder_classes(root: Path, class_names: Sequence[str] | None) -> list[str]:
    """The class list: sorted non-hidden subfolders, or ``class_names`` checked against them."""
    if not root.is_dir():
        raise FileNotFoundError(f"image folder not found: {root}")
    found = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not found:
        raise ValueError(f"{root}: no class subfolders (expected root/<class>/<image>)")
    if class_names is None:
        return found
    class_names = list(class_names)
    if len(set(class_names)) != len(class_names):
        raise ValueError(f"class_names has duplicates: {class_names}")
    missing = sorted(set(class_names) - set(found))
    extra = sorted(set(found) - set(class_names))
    if missing or extra:
        # labels are positions in class_names: a silent mismatch would shift them
        raise ValueError(
            f"{root}: class folders do not match the given class_names; "
            f"missing folders: {missing or 'none'}; folders not in class_names: "
            f"{extra or 'none'}"
        )
    return class_names


def _scan_folder(root: Path, class_names: list[str]) -> tuple[list[str], list[int], list[str]]:
    """Image paths with labels (class by class, sorted within a class), and the non-image
    files ignored. Hidden files and folders (name starting with '.') are skipped."""
    paths, labels, ignored = [], [], []
    for label, name in enumerate(class_names):
        found = []
        for dirpath, dirnames, filenames in os.walk(root / name):
            dirnames[:] = [d for d in dirnames if not d.startswith(".")]
            found += [os.path.join(dirpath, f) for f in filenames if not f.startswith(".")]
        for path in sorted(found):
            if is_image_path(path):
                paths.append(path)
                labels.append(label)
            else:
                ignored.append(path)
    return paths, labels, ignored


def _decode_all(
    paths: list[str], channels: int, bad_files: str, keep: bool
) -> tuple[list[int], list[np.ndarray] | None, list[tuple[str, str]]]:
    """Decode every file; return the positions of the good ones, their arrays (read-only)
    if ``keep``, and (path, reason) for each bad one, or raise on the first bad one.

    Threads help because Pillow releases the GIL while decoding.
    """
    good: list[int] = []
    arrays: list[np.ndarray] | None = [] if keep else None
    skipped: list[tuple[str, str]] = []

    def decode(path: str) -> np.ndarray | BadImageError:
        try:
            return load_image(path, channels)
        except BadImageError as e:
            return e

    pool = ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1))
    try:
        for k, result in enumerate(pool.map(decode, paths)):  # in path order
            if isinstance(result, BadImageError):
                if bad_files == "error":
                    raise result
                skipped.append((paths[k], result.reason))
                continue
            good.append(k)
            if arrays is not None:
                result.flags.writeable = False  # shared by every get(): no in-place edits
                arrays.append(result)
    finally:
        pool.shutdown(cancel_futures=True)  # on an error, do not decode the rest
    return good, arrays, skipped


class Subset:
    """A view of ``source`` restricted to ``indices`` (in that order)."""

    def __init__(self, source: ImageSource, indices: np.ndarray | Sequence[int]):
        indices = np.asarray(indices, dtype=np.int64)
        if indices.ndim != 1:
            raise ValueError(f"indices must be 1-D, got shape {indices.shape}")
        if len(indices) and (indices.min() < 0 or indices.max() >= len(source)):
            raise IndexError(
                f"indices span [{indices.min()}, {indices.max()}] but the source has "
                f"{len(source)} images"
            )
        self.source = source
        self.indices = indices
        self.class_names = source.class_names
        self.labels = np.asarray(source.labels)[indices]

    def __len__(self) -> int:
        return len(self.indices)

    def get(self, i: int) -> tuple[np.ndarray, int]:
        return self.source.get(int(self.indices[_check_index(i, len(self))]))

    def describe(self, i: int) -> str:
        return self.source.describe(int(self.indices[i]))


def split_indices(
    labels: np.ndarray | Sequence[int], val_fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Stratified split: ``round(val_fraction * n_c)`` random images of each class c go to
    validation. Deterministic for a seed; returns sorted (train_idx, val_idx)."""
    labels = np.asarray(labels)
    if labels.ndim != 1:
        raise ValueError(f"labels must be 1-D, got shape {labels.shape}")
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    rng = np.random.default_rng(seed)
    val = []
    for c in np.unique(labels):  # sorted, so the rng draws in a fixed order
        members = np.flatnonzero(labels == c)
        n_val = int(np.floor(val_fraction * len(members) + 0.5))
        val.append(rng.permutation(members)[:n_val])
    val_idx = np.sort(np.concatenate(val)) if val else np.zeros(0, dtype=np.int64)
    train_mask = np.ones(len(labels), dtype=bool)
    train_mask[val_idx] = False
    return np.flatnonzero(train_mask), val_idx


# ------------------------------------------------------------------ published data sets


def fashion_mnist(
    root: str | Path | None = None, split: str = "train", download: bool = False
) -> ArraySource:
    """Fashion-MNIST as an ArraySource of [N, 28, 28, 1] images; see
    ``vit.datasets.read_fashion_mnist`` for where the files are looked for."""
    images, labels = read_fashion_mnist(root, split, download)
    return ArraySource(images, labels, FASHION_MNIST_CLASSES, f"fashion_mnist/{split}")


def cifar(
    root: str | Path, name: str = "cifar10", split: str = "train", download: bool = False
) -> ArraySource:
    """CIFAR-10 or CIFAR-100 (fine labels) from torchvision's python pickles, as an
    ArraySource of [N, 32, 32, 3] images."""
    images, labels, class_names = read_cifar(root, name, split, download)
    return ArraySource(images, labels, class_names, f"{name}/{split}")


# ---------------------------------------------------------------------------- dispatch


def build_source(
    dataset: str,
    root: str | Path | None,
    split: str,
    download: bool = False,
    channels: int = 3,
    bad_files: str = "error",
    in_memory: bool = False,
    class_names: Sequence[str] | None = None,
) -> ImageSource:
    """Build the named source. "imagefolder" reads ``root/<split>/<class>/...``.

    Args:
        class_names: the expected classes in label order (e.g. from a checkpoint); a
            source whose classes differ is an error rather than silently shifted labels.
    """
    if dataset == "imagefolder":
        if root is None:
            raise ValueError("dataset 'imagefolder' needs a root folder")
        folder = Path(root) / split
        if not folder.is_dir():
            raise FileNotFoundError(f"image folder for split {split!r} not found: {folder}")
        return FolderSource(folder, class_names, channels, bad_files, in_memory)
    if dataset == "fashion_mnist":
        source = fashion_mnist(root, split, download)
    elif dataset in ("cifar10", "cifar100"):
        if root is None:
            raise ValueError(f"dataset {dataset!r} needs a root folder")
        source = cifar(root, dataset, split, download)
    else:
        known = ["cifar10", "cifar100", "fashion_mnist", "imagefolder"]
        raise ValueError(f"unknown dataset {dataset!r}; expected one of {known}")
    if class_names is not None and list(class_names) != source.class_names:
        raise ValueError(
            f"{dataset}: class_names {list(class_names)} differ from the data set's "
            f"{source.class_names}"
        )
    return _with_channels(source, channels)


def _with_channels(source: ArraySource, channels: int) -> ArraySource:
    """Convert an in-memory source to 1 (luminance) or 3 (replicated gray) channels."""
    C = source.images.shape[-1]
    if channels == C:
        return source
    if channels == 3 and C == 1:
        images = np.repeat(source.images, 3, axis=-1)  # N, H, W, 3
    elif channels == 1 and C == 3:
        images = rgb_to_luminance(source.images)[..., None]  # N, H, W, 1
    else:
        raise ValueError(f"{source.name}: cannot convert {C} channels to {channels}")
    return ArraySource(images, source.labels, source.class_names, source.name)


def rgb_to_luminance(rgb: np.ndarray) -> np.ndarray:
    """uint8 [..., 3] to uint8 [...] luminance, the same integers as Pillow's "L" mode."""
    rgb = rgb.astype(np.uint32)
    # ITU-R 601-2 weights in 16-bit fixed point, rounded, as Pillow computes them
    y = rgb[..., 0] * 19595 + rgb[..., 1] * 38470 + rgb[..., 2] * 7471 + 0x8000
    return (y >> 16).astype(np.uint8)
