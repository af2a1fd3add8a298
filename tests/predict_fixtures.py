"""Helpers for the predict and rollout tests: a tiny saved checkpoint and real photos on disk."""

from __future__ import annotations

import shutil
from pathlib import Path

import cv2
import matplotlib.cbook
import numpy as np
import torch
from PIL import Image

from vit import create_model
from vit.checkpoint import save_checkpoint
from vit.model import VisionTransformer

CLASS_NAMES = ["cat", "person", "cup"]
MEAN = (0.48, 0.46, 0.41)
STD = (0.23, 0.22, 0.24)
CROP_PCT = 0.875
IMG_SIZE = 32  # the model's 4x4 patches give an 8x8 grid


def tiny_model(seed: int = 0) -> VisionTransformer:
    """A 2-block ViT for 32x32 RGB with 3 classes and perturbed random weights.

    The noise moves the weights off the initialisation (zero biases, unit norms), where
    the predictions would be nearly uniform and their order arbitrary.
    """
    torch.manual_seed(seed)
    model = create_model(
        "vit_mini_patch4_28", depth=2, in_chans=3, img_size=IMG_SIZE, num_classes=3
    )
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p), alpha=0.3)
    return model.eval()


def make_checkpoint(folder: Path, crop_pct: float = CROP_PCT) -> tuple[Path, VisionTransformer]:
    """Save :func:`tiny_model` as a checkpoint folder of ours; return (folder, model)."""
    model = tiny_model()
    meta = {
        "model": model.cfg.to_dict(),
        "img_size": [IMG_SIZE, IMG_SIZE],
        "in_chans": 3,
        "mean": list(MEAN),
        "std": list(STD),
        "crop_pct": crop_pct,
        "class_names": CLASS_NAMES,
        "dataset": "imagefolder",
    }
    return save_checkpoint(folder, model.state_dict(), meta), model


def save_photos(folder: Path) -> dict[str, Path]:
    """The cat, astronaut and coffee photos of scikit-image as PNG files, and Grace Hopper
    from matplotlib's sample data as the JPEG it ships as."""
    from skimage import data

    folder.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name in ("chelsea", "astronaut", "coffee"):
        paths[name] = folder / f"{name}.png"
        Image.fromarray(getattr(data, name)()).save(paths[name])
    paths["grace_hopper"] = folder / "grace_hopper.jpg"
    sample = matplotlib.cbook.get_sample_data("grace_hopper.jpg")
    with sample as src, open(paths["grace_hopper"], "wb") as dst:
        shutil.copyfileobj(src, dst)
    return paths


def reference_input(
    rgb: np.ndarray,
    size: int = IMG_SIZE,
    crop_pct: float = CROP_PCT,
    mean: tuple[float, ...] = MEAN,
    std: tuple[float, ...] = STD,
) -> torch.Tensor:
    """The evaluation preprocessing written out with OpenCV and NumPy: shorter side to
    ``round(size / crop_pct)`` (bicubic), centre crop, scale to [0, 1], normalise.
    Returns [1, C, size, size]."""
    H, W = rgb.shape[:2]
    short = round(size / crop_pct)
    scale = short / min(H, W)
    new_h, new_w = round(H * scale), round(W * scale)
    resized = cv2.resize(rgb, (new_w, new_h), interpolation=cv2.INTER_CUBIC)
    top, left = (new_h - size) // 2, (new_w - size) // 2
    crop = resized[top : top + size, left : left + size].astype(np.float32) / 255.0
    x = (crop - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
    return torch.from_numpy(x.transpose(2, 0, 1).copy())[None]


def truncate(src: Path, dst: Path, keep: float = 0.5) -> Path:
    """A copy of ``src`` cut to the first ``keep`` fraction of its bytes."""
    data = src.read_bytes()
    dst.write_bytes(data[: int(len(data) * keep)])
    return dst
