"""Checkpoint folders: weights in safetensors, everything inference needs, and training state.

A checkpoint folder holds
  ``model.safetensors``  the weights;
  ``meta.json``          the architecture, image size, mean and std, class names, epoch, step;
  ``config.yaml``        the run's resolved config (when written by training);
  ``training_state.pt``  optimiser, scheduler, scaler, EMA and RNG states (step checkpoints),
                         plain tensors and numbers only, read back with ``weights_only=True``.
  ``rollout/``           rollout overlays of the first validation images (``best`` only).
Each folder is written under a temporary name and renamed into place, so a crash while saving
never leaves a half-written folder under a real name.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from vit.model import VisionTransformer, ViTConfig
from vit.weights import load_weights

logger = logging.getLogger(__name__)

FORMAT = "vit-checkpoint/1"
WEIGHTS = "model.safetensors"
META = "meta.json"
STATE = "training_state.pt"
STEP_DIR = re.compile(r"^step_(\d{9})$")


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(
    path: str | Path,
    state_dict: dict[str, torch.Tensor],
    meta: dict,
    config_yaml: str | None = None,
    training_state: dict | None = None,
    extra: Callable[[Path], object] | None = None,
) -> Path:
    """Write a checkpoint folder atomically: to a temporary folder, then renamed to ``path``.

    An existing folder at ``path`` is replaced only once the new one is complete.

    Args:
        extra: called with the temporary folder to add more files (say, pictures) that
            should appear and be replaced together with the weights.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".tmp-{path.name}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    tensors = {k: v.detach().contiguous().cpu() for k, v in state_dict.items()}
    save_file(tensors, str(tmp / WEIGHTS))
    (tmp / META).write_text(json.dumps({"format": FORMAT, **meta}, indent=2))
    if config_yaml is not None:
        (tmp / "config.yaml").write_text(config_yaml)
    if training_state is not None:
        torch.save(training_state, tmp / STATE)
    if extra is not None:
        extra(tmp)
    for f in tmp.rglob("*"):
        if f.is_file():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
    if path.exists():
        old = path.parent / f".old-{path.name}-{os.getpid()}"
        path.rename(old)
        tmp.rename(path)
        shutil.rmtree(old)
    else:
        tmp.rename(path)
    _fsync_dir(path.parent)
    return path


def read_meta(path: str | Path) -> dict:
    """The ``meta.json`` of a checkpoint folder, checked for the fields inference needs."""
    path = Path(path)
    meta_file = path / META
    if not meta_file.is_file():
        raise FileNotFoundError(f"{path}: not a checkpoint folder (no {META})")
    try:
        meta = json.loads(meta_file.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{meta_file}: not valid JSON ({e})") from e
    missing = [k for k in ("model", "img_size", "mean", "std", "class_names") if k not in meta]
    if missing:
        raise ValueError(f"{meta_file}: missing fields {missing}")
    return meta


def load_model(path: str | Path, map_location: str = "cpu") -> tuple[VisionTransformer, dict]:
    """Rebuild the model of a checkpoint folder from its files alone; returns (model, meta)."""
    path = Path(path)
    meta = read_meta(path)
    try:
        cfg = ViTConfig(**meta["model"])
    except TypeError as e:
        raise ValueError(f"{path / META}: bad model config ({e})") from e
    model = VisionTransformer(cfg)
    weights = path / WEIGHTS
    if not weights.is_file():
        raise FileNotFoundError(f"{path}: no {WEIGHTS}")
    try:
        state = load_file(str(weights), device=map_location)
    except Exception as e:  # safetensors raises its own error types
        raise ValueError(f"{weights}: unreadable ({e})") from e
    load_weights(model, state)
    return model.eval(), meta


def load_training_state(path: str | Path) -> dict:
    """The resumable state of a step checkpoint; refuses anything but tensors and numbers."""
    file = Path(path) / STATE
    if not file.is_file():
        raise FileNotFoundError(f"{path}: no {STATE}; not a resumable checkpoint")
    return torch.load(file, map_location="cpu", weights_only=True)


def step_dir(root: str | Path, step: int) -> Path:
    return Path(root) / f"step_{step:09d}"


def step_checkpoints(root: str | Path) -> list[Path]:
    """Step checkpoint folders under ``root``, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and STEP_DIR.match(p.name)]
    return sorted(found, key=lambda p: int(STEP_DIR.match(p.name).group(1)))


def prune(root: str | Path, keep: int) -> None:
    """Delete all but the newest ``keep`` step checkpoints, and the temporary folders of
    saves that a crash interrupted (one process writes a run's checkpoints)."""
    for old in step_checkpoints(root)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    stale = [*Path(root).glob(".tmp-*"), *Path(root).glob(".old-*")]  # see save_checkpoint
    for folder in stale:
        if folder.is_dir() and not folder.name.endswith(f"-{os.getpid()}"):
            shutil.rmtree(folder, ignore_errors=True)


def point_last(root: str | Path, target: Path) -> None:
    """Make ``root/last`` a symlink to ``target``, replaced atomically."""
    root = Path(root)
    tmp = root / f".last-{os.getpid()}"
    if tmp.is_symlink() or tmp.exists():
        tmp.unlink()
    tmp.symlink_to(target.name)
    os.replace(tmp, root / "last")


def latest_resumable(root: str | Path) -> tuple[Path, dict] | None:
    """The newest step checkpoint that loads completely, with its training state.

    A corrupt or partial newest checkpoint is skipped with a warning naming it.
    """
    for path in reversed(step_checkpoints(root)):
        try:
            read_meta(path)
            load_file(str(path / WEIGHTS))
            return path, load_training_state(path)
        except Exception as e:  # any failure to read means "not usable"; say which and why
            logger.warning("checkpoint %s is unusable (%s); trying the one before it", path, e)
    return None


def rng_state() -> dict:
    """Python, NumPy and torch generator states as plain tensors and numbers, so that they
    round-trip through ``torch.load(weights_only=True)``."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": {
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": pos,
            "has_gauss": has_gauss,
            "cached": cached,
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Restore what :func:`rng_state` saved (after a save and load or not)."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))  # a loaded state may hold lists
    n = state["numpy"]
    np.random.set_state(
        ("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"])
    )
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
