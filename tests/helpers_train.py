"""Helpers for the training tests: tiny data sets in the real file formats, tiny-model runs."""

from __future__ import annotations

import gzip
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image
from test_datasets import cifar_rows, idx_bytes, py2_pickle

REPO = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = str(REPO / "configs" / "fashion_mnist.yaml")

# one block of width 32: a step takes milliseconds on one core
TINY = [
    "model.options.depth=1",
    "model.options.embed_dim=32",
    "model.options.num_heads=2",
    "model.options.mlp_ratio=1.0",
    "log.tensorboard=false",
    "data.num_workers=0",
]


def write_fashion(root: Path, n_train: int = 64, n_test: int = 21, seed: int = 0) -> Path:
    """Gzipped IDX files as Fashion-MNIST ships them; labels cycle through the 10 classes."""
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        labels = (np.arange(n) % 10).astype(np.uint8)
        images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        for kind, array in (("images-idx3", images), ("labels-idx1", labels)):
            (root / f"{prefix}-{kind}-ubyte.gz").write_bytes(gzip.compress(idx_bytes(array)))
    return root


def write_cifar10(root: Path, per_batch: int = 10, n_test: int = 9) -> Path:
    """torchvision's cifar-10-batches-py: five Python 2 pickled training batches and a test one."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    names = [b"airplane", b"automobile", b"bird", b"cat", b"deer"]
    names += [b"dog", b"frog", b"horse", b"ship", b"truck"]
    (folder / "batches.meta").write_bytes(py2_pickle({b"label_names": names}))
    for k in range(1, 6):
        labels = [(k + i) % 10 for i in range(per_batch)]
        batch = {b"batch_label": b"training batch", b"labels": labels}
        batch[b"data"] = cifar_rows(per_batch, k)
        (folder / f"data_batch_{k}").write_bytes(py2_pickle(batch))
    test = {b"labels": [i % 10 for i in range(n_test)], b"data": cifar_rows(n_test, 99)}
    (folder / "test_batch").write_bytes(py2_pickle(test))
    return root


def write_cifar100(root: Path, n_train: int = 40, n_test: int = 9, classes: int = 100) -> Path:
    """torchvision's cifar-100-python: Python 2 pickles of train, test and meta."""
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    meta = {
        b"fine_label_names": [b"c%03d" % k for k in range(classes)],
        b"coarse_label_names": [b"s%02d" % k for k in range(20)],
    }
    (folder / "meta").write_bytes(py2_pickle(meta))
    for name, n, seed in (("train", n_train, 0), ("test", n_test, 1)):
        fine = [(7 * i) % classes for i in range(n)]
        batch = {b"data": cifar_rows(n, seed), b"fine_labels": fine, b"coarse_labels": [0] * n}
        (folder / name).write_bytes(py2_pickle(batch))
    return root


def write_folder(
    root: Path,
    classes: tuple[str, ...] = ("ant", "bee", "cow"),
    per_class: int = 8,
    ext: str = ".png",
    size: tuple[int, int] = (20, 24),
    seed: int = 0,
) -> Path:
    """``root/<class>/<i><ext>``: noisy images whose mean colour depends on the class."""
    rng = np.random.default_rng(seed)
    for label, name in enumerate(classes):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            base = np.array([60 * label + 40, 120, 200 - 50 * label])
            noise = rng.integers(-30, 31, (*size, 3))
            pixels = np.clip(base + noise, 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(root / name / f"{i:03d}{ext}")
    return root


def overrides(out: Path, name: str, *extra: str) -> list[str]:
    """Tiny-model overrides writing to ``out/<name>``, then ``extra``."""
    return [*TINY, f"log.output_dir={out}", f"log.name={name}", *extra]


def train(out: Path, name: str, *extra: str, resume: bool = False) -> int:
    """Run ``train.py`` in this process (no import cost); returns its exit status."""
    from vit.cli import train_main

    argv = ["--config", DEFAULT_CONFIG, *overrides(out, name, *extra)]
    return train_main(argv + (["--resume"] if resume else []))


def read_metrics(run_dir: Path) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


def subprocess_env() -> dict[str, str]:
    """The environment for child runs: one thread (as in the tests' process), no bars."""
    env = dict(os.environ)
    env.update(TQDM_DISABLE="1", OMP_NUM_THREADS="1", PYTHONHASHSEED="0")
    env.pop("CUDA_VISIBLE_DEVICES", None)
    return env


def train_command(out: Path, name: str, *extra: str, resume: bool = False) -> list[str]:
    """The command line of ``python train.py`` for a tiny run."""
    cmd = [sys.executable, str(REPO / "train.py"), "--config", DEFAULT_CONFIG]
    return cmd + overrides(out, name, *extra) + (["--resume"] if resume else [])


def free_port() -> int:
    """A TCP port nobody listens on now, for torchrun's rendezvous."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(script: str, *args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    """``torchrun --nproc_per_node 2 SCRIPT ARGS`` (two CPU processes, gloo), output captured."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
    cmd += ["--master_port", str(free_port()), str(REPO / script), *args]
    return subprocess.run(
        cmd, cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=timeout
    )


def add_bad_files(root: Path) -> list[Path]:
    """Spoil an image folder of write_folder: returns the bad image files in the order a
    scan meets them (class by class, sorted). Also adds files that are not bad but must be
    ignored: a non-image file, hidden files and folders, and an empty class folder."""
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    first, second = root / classes[0], root / classes[1]
    full = (first / "000.png").read_bytes()
    noise = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    Image.fromarray(noise).save(second / "zz_full.jpg")
    jpeg = (second / "zz_full.jpg").read_bytes()
    bad = {
        first / "a_empty.png": b"",  # zero bytes
        first / "b_truncated.png": full[: len(full) // 2],
        second / "a_text.jpg": b"this is not an image\n",  # a non-image named like one
        second / "b_corrupt.jpg": jpeg[:200] + bytes(range(256)) * 4 + jpeg[1400:],
    }
    for path, content in bad.items():
        path.write_bytes(content)
    (first / "README.txt").write_text("not an image, and not named like one")
    (first / ".hidden.png").write_bytes(b"")  # hidden: not even looked at
    (second / ".thumbs").mkdir()
    (second / ".thumbs" / "x.png").write_bytes(b"junk")
    (root / "zz_empty_class").mkdir()
    return sorted(bad, key=lambda p: (p.parent.name, p.name))
