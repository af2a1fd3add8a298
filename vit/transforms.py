"""Augmentation pipelines (albumentations) for training and the fixed evaluation transform.

Images arrive as uint8 ``[H, W, C]`` arrays and leave as normalised float tensors
``[C, H, W]``, or, for the training loader, as uint8 arrays that :class:`BatchNormalize`
turns into a normalised batch. Every random choice comes from the generator the caller
hands in, so the augmentation of a sample can be made a pure function of (seed, epoch,
index).
"""

from __future__ import annotations

import albumentations as A
import cv2
import numpy as np
import torch
from albumentations.pytorch import ToTensorV2

from vit.config import AugConfig


def randaugment_ops(magnitude: int) -> list[A.BasicTransform]:
    """RandAugment-style operations (Cubuk et al., 2020) at a magnitude from 0 to 10."""
    m = magnitude / 10.0
    return [
        A.Affine(rotate=(-30 * m, 30 * m), fill=0, p=1.0),
        A.Affine(shear={"x": (-17 * m, 17 * m), "y": (0, 0)}, fill=0, p=1.0),
        A.Affine(shear={"x": (0, 0), "y": (-17 * m, 17 * m)}, fill=0, p=1.0),
        A.Affine(translate_percent={"x": (-0.3 * m, 0.3 * m), "y": (0, 0)}, fill=0, p=1.0),
        A.Affine(translate_percent={"x": (0, 0), "y": (-0.3 * m, 0.3 * m)}, fill=0, p=1.0),
        A.RandomBrightnessContrast(brightness_limit=0.9 * m, contrast_limit=0, p=1.0),
        A.RandomBrightnessContrast(brightness_limit=0, contrast_limit=0.9 * m, p=1.0),
        A.Posterize(num_bits=max(1, min(7, 8 - round(4 * m))), p=1.0),
        A.Solarize(threshold_range=(1.0 - m, 1.0 - m), p=1.0),
        A.Sharpen(alpha=(0.1 * m, 0.9 * m), p=1.0),
        A.AutoContrast(p=1.0),
        A.Equalize(p=1.0),
    ]


def normalizes_per_batch(aug: AugConfig) -> bool:
    """Whether the training pipeline can leave normalisation to :class:`BatchNormalize`:
    yes unless random erasing, which fills with noise in normalised units, comes after it."""
    return aug.random_erasing == 0


def train_transform(
    aug: AugConfig,
    img_size: tuple[int, int],
    mean: tuple[float, ...],
    std: tuple[float, ...],
    normalize: bool = True,
) -> A.Compose:
    """The training pipeline described by ``aug``, ending in a normalised tensor; with
    ``normalize=False``, in the augmented uint8 array (see :class:`BatchNormalize`)."""
    h, w = img_size
    if aug.crop == "random_resized":
        ops = [A.RandomResizedCrop(size=(h, w), scale=aug.scale, ratio=aug.ratio)]
    elif aug.crop == "pad_crop":
        # small images: resize once if needed, then pad and crop back (translation by up to pad)
        ops = [
            A.Resize(h, w),
            A.PadIfNeeded(h + 2 * aug.pad, w + 2 * aug.pad, border_mode=cv2.BORDER_CONSTANT),
            A.RandomCrop(h, w),
        ]
    else:
        ops = [A.Resize(h, w)]
    if aug.hflip > 0:
        ops.append(A.HorizontalFlip(p=aug.hflip))
    if aug.color_jitter > 0:
        s = aug.color_jitter
        ops.append(A.ColorJitter(brightness=s, contrast=s, saturation=s, hue=0.0, p=0.8))
    if aug.randaugment_ops > 0:
        ops.append(A.SomeOf(randaugment_ops(aug.randaugment_magnitude), n=aug.randaugment_ops))
    if not normalize:
        if not normalizes_per_batch(aug):
            raise ValueError("random erasing works on normalised images: normalize=True")
        return A.Compose(ops)
    ops.append(A.Normalize(mean=mean, std=std, max_pixel_value=255.0))
    if aug.random_erasing > 0:
        # after normalisation, so the erased patch is noise around the data's mean
        ops.append(A.Erasing(fill="random", p=aug.random_erasing))
    ops.append(ToTensorV2())
    return A.Compose(ops)


class BatchNormalize:
    """A loader's ``collate_fn``: (uint8 ``[H, W, C]`` image, label) pairs to a normalised
    float batch ``[B, C, H, W]`` and a label tensor.

    What albumentations' Normalize and ToTensorV2 do to each image, done once per batch:
    on Fashion-MNIST that is a third of the loader's time per image.
    """

    def __init__(self, mean: tuple[float, ...], std: tuple[float, ...]):
        self.mean = torch.tensor(mean, dtype=torch.float32).mul(255).view(1, -1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).mul(255).view(1, -1, 1, 1)

    def __call__(self, samples: list[tuple[np.ndarray, int]]) -> tuple[torch.Tensor, torch.Tensor]:
        images, labels = zip(*samples)
        x = torch.from_numpy(np.stack(images))
        if x.ndim == 3:  # grayscale without its channel axis
            x = x.unsqueeze(-1)
        x = x.permute(0, 3, 1, 2).float()  # B, C, H, W
        return ((x - self.mean) / self.std).contiguous(), torch.tensor(labels, dtype=torch.long)


def eval_transform(
    img_size: tuple[int, int],
    mean: tuple[float, ...],
    std: tuple[float, ...],
    crop_pct: float = 1.0,
) -> A.Compose:
    """Deterministic resize of the shorter side to ``size / crop_pct``, then a centre crop."""
    h, w = img_size
    resize_to = round(max(h, w) / crop_pct)
    return A.Compose(
        [
            A.SmallestMaxSize(max_size=resize_to, interpolation=cv2.INTER_CUBIC),
            A.CenterCrop(h, w),
            A.Normalize(mean=mean, std=std, max_pixel_value=255.0),
            ToTensorV2(),
        ]
    )
