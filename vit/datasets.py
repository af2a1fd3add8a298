"""Published data sets in their own on-disk formats, read into numpy arrays.

Fashion-MNIST ships as IDX files (MNIST's format); CIFAR-10 and CIFAR-100 as python
pickles, read here by an unpickler that builds nothing but containers and arrays, since a
pickle can otherwise run code. Both can be fetched with torchvision when absent. Wrapping
the arrays as image sources is ``vit.data``'s job.

Fashion-MNIST: Xiao, Rasul and Vollgraf (2017). CIFAR: Krizhevsky (2009).
"""

from __future__ import annotations

import gzip
import pickle
from collections.abc import Sequence
from pathlib import Path

import numpy as np

FASHION_MNIST_ROOT = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)


# ----------------------------------------------------------------------------- IDX files

_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: str | Path) -> np.ndarray:
    """Read an IDX file (MNIST's format), gzipped or not, into a numpy array."""
    path = Path(path)
    with open(path, "rb") as f:
        gzipped = f.read(2) == b"\x1f\x8b"
    opener = gzip.open if gzipped else open
    with opener(path, "rb") as f:
        header = f.read(4)
        if len(header) < 4 or header[:2] != b"\x00\x00":
            raise ValueError(f"{path}: not an IDX file (bad magic {header.hex()})")
        if header[2] not in _IDX_DTYPES:
            raise ValueError(f"{path}: unknown IDX data type code 0x{header[2]:02x}")
        dtype = np.dtype(_IDX_DTYPES[header[2]])
        ndim = header[3]
        dims_raw = f.read(4 * ndim)
        if len(dims_raw) < 4 * ndim:
            raise ValueError(f"{path}: header ends before its {ndim} dimension sizes")
        shape = tuple(int(d) for d in np.frombuffer(dims_raw, dtype=">u4"))
        expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        data = _read_at_most(f, expected + 1)  # one byte more detects trailing data
    if len(data) != expected:
        raise ValueError(
            f"{path}: header says shape {shape} ({expected} bytes of data) but the file "
            f"holds {'more than ' if len(data) > expected else ''}"
            f"{min(len(data), expected)} bytes"
        )
    return np.frombuffer(data, dtype=dtype).reshape(shape).astype(dtype.newbyteorder("="))


def _read_at_most(f, n: int, chunk: int = 1 << 24) -> bytes:
    """Read up to n bytes in chunks, so a header claiming a huge size cannot make us
    allocate it before the data is seen."""
    parts, total = [], 0
    while total < n:
        part = f.read(min(chunk, n - total))
        if not part:
            break
        parts.append(part)
        total += len(part)
    return b"".join(parts)


def read_fashion_mnist(
    root: str | Path | None = None, split: str = "train", download: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """Fashion-MNIST images uint8 [N, 28, 28, 1] and int64 labels [N].

    Looks for ``train-images-idx3-ubyte[.gz]`` etc. (``t10k-`` for the test split) in
    ``root`` (default ``FASHION_MNIST_ROOT``) and in torchvision's ``root/FashionMNIST/raw``.
    """
    if split not in ("train", "test"):
        raise ValueError(f"Fashion-MNIST split must be 'train' or 'test', got {split!r}")
    root = Path(root or FASHION_MNIST_ROOT)
    prefix = "train" if split == "train" else "t10k"
    names = (f"{prefix}-images-idx3-ubyte", f"{prefix}-labels-idx1-ubyte")
    found = _find_fashion_files(root, names)
    if found is None and download:
        import torchvision  # heavy import, only for the download

        torchvision.datasets.FashionMNIST(str(root), train=split == "train", download=True)
        found = _find_fashion_files(root, names)
    if found is None:
        raise FileNotFoundError(
            f"Fashion-MNIST {split} files ({names[0]}[.gz], {names[1]}[.gz]) not found in "
            f"{root}. Install them with `apt-get install dataset-fashion-mnist` (they go to "
            f"{FASHION_MNIST_ROOT}) or set data.download=true to fetch them with torchvision."
        )
    images, labels = read_idx(found[0]), read_idx(found[1])
    if images.dtype != np.uint8 or images.shape[1:] != (28, 28):
        raise ValueError(
            f"{found[0]}: expected uint8 [N, 28, 28], got {images.dtype} {images.shape}"
        )
    if labels.shape != (len(images),):
        raise ValueError(f"{found[1]}: {labels.shape} labels for {len(images)} images")
    labels = labels.astype(np.int64)
    check_labels(labels, len(FASHION_MNIST_CLASSES), found[1])
    return images[..., None], labels  # N, 28, 28, 1


def check_labels(labels: np.ndarray, num_classes: int, path: Path) -> None:
    """Raise ValueError naming ``path`` when a label is outside ``[0, num_classes)``."""
    bad = np.flatnonzero((labels < 0) | (labels >= num_classes))
    if bad.size:
        i = int(bad[0])
        raise ValueError(
            f"{path}: label {int(labels[i])} of image {i} is out of range for {num_classes} "
            f"classes ({bad.size} such labels)"
        )


def _find_fashion_files(root: Path, names: Sequence[str]) -> tuple[Path, Path] | None:
    for folder in (root, root / "FashionMNIST" / "raw"):
        paths = [_first_existing(folder / n, folder / f"{n}.gz") for n in names]
        if all(paths):
            return paths[0], paths[1]
    return None


def _first_existing(*paths: Path) -> Path | None:
    return next((p for p in paths if p.is_file()), None)


# ------------------------------------------------------------------------- CIFAR pickles

_CIFAR = {
    # name: (folder, train files, test files, meta file, names key, labels key)
    "cifar10": (
        "cifar-10-batches-py",
        [f"data_batch_{k}" for k in range(1, 6)],
        ["test_batch"],
        "batches.meta",
        b"label_names",
        b"labels",
    ),
    "cifar100": (
        "cifar-100-python",
        ["train"],
        ["test"],
        "meta",
        b"fine_label_names",
        b"fine_labels",
    ),
}

# numpy's own array rebuilder, whatever module it lives in for this numpy version
_np_reconstruct = np.array(0).__reduce__()[0]
_np_frombuffer = np.array(0).__reduce_ex__(5)[0]
# the only globals a CIFAR pickle may name: array and dtype reconstruction. Everything
# else (containers, bytes, numbers) is built by pickle opcodes without a global lookup.
_SAFE_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"): _np_reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _np_reconstruct,
    ("numpy.core.numeric", "_frombuffer"): _np_frombuffer,
    ("numpy._core.numeric", "_frombuffer"): _np_frombuffer,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
}


class UnsafePickleError(pickle.UnpicklingError):
    """A pickle that asks to build objects other than plain containers and arrays."""


class _ArrayUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        obj = _SAFE_GLOBALS.get((module, name))
        if obj is None:
            raise UnsafePickleError(f"refused global {module}.{name}")
        return obj


def read_safe_pickle(path: str | Path) -> object:
    """Unpickle a data file (``encoding='bytes'``, like CIFAR's own loader), refusing any
    object other than builtin containers, strings, numbers and numpy arrays."""
    path = Path(path)
    with open(path, "rb") as f:
        try:
            return _ArrayUnpickler(f, encoding="bytes").load()
        except UnsafePickleError as e:
            raise UnsafePickleError(
                f"{path}: refused to unpickle: {e}; a data file should hold only arrays "
                "and lists, anything else could run code"
            ) from None
        except (pickle.UnpicklingError, EOFError, ValueError, TypeError) as e:
            raise ValueError(f"{path}: not a readable pickle ({e})") from e


def read_cifar(
    root: str | Path, name: str = "cifar10", split: str = "train", download: bool = False
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """CIFAR-10 or CIFAR-100 (fine labels) from torchvision's python pickles: images
    uint8 [N, 32, 32, 3], int64 labels [N] and the class names in label order."""
    if name not in _CIFAR:
        raise ValueError(f"name must be one of {sorted(_CIFAR)}, got {name!r}")
    if split not in ("train", "test"):
        raise ValueError(f"CIFAR split must be 'train' or 'test', got {split!r}")
    folder_name, train_files, test_files, meta_file, names_key, labels_key = _CIFAR[name]
    folder = Path(root) / folder_name
    files = [folder / f for f in (train_files if split == "train" else test_files)]
    if not all(p.is_file() for p in [*files, folder / meta_file]):
        if not download:
            raise FileNotFoundError(
                f"{name} files not found in {folder}; set data.download=true to fetch them "
                "with torchvision"
            )
        import torchvision  # heavy import, only for the download

        dataset_cls = (
            torchvision.datasets.CIFAR10 if name == "cifar10" else torchvision.datasets.CIFAR100
        )
        dataset_cls(str(root), train=split == "train", download=True)
    class_names = [_decode_name(n) for n in _pickle_key(folder / meta_file, names_key)]
    images, labels = zip(*(_cifar_batch(p, labels_key, len(class_names)) for p in files))
    return np.concatenate(images), np.concatenate(labels), class_names


def _pickle_key(path: Path, key: bytes) -> object:
    obj = read_safe_pickle(path)
    if not isinstance(obj, dict) or key not in obj:
        raise ValueError(f"{path}: expected a dict with key {key!r}")
    return obj[key]


def _decode_name(name: bytes | str) -> str:
    return name.decode("utf-8") if isinstance(name, bytes) else str(name)


def _cifar_batch(path: Path, labels_key: bytes, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """One batch: rows of 3072 bytes (R plane, G plane, B plane, each 32x32 row-major)."""
    data = np.asarray(_pickle_key(path, b"data"))
    labels = np.asarray(_pickle_key(path, labels_key), dtype=np.int64)
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise ValueError(f"{path}: expected uint8 data [N, 3072], got {data.dtype} {data.shape}")
    if labels.shape != (len(data),):
        raise ValueError(f"{path}: {labels.shape} labels for {len(data)} images")
    check_labels(labels, num_classes, path)
    images = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)  # N, 32, 32, 3
    return np.ascontiguousarray(images), labels
