"""Shared fixtures: a fixed seed per test, small ViTs of ours and of timm with random weights."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import timm
import torch
import torch.nn as nn

from vit import VisionTransformer, ViTConfig

# timm's vit_tiny_patch16_224 layout (192 wide, 3 heads), cut to 2 blocks at 64x64 (4x4 grid)
TIMM_TINY = dict(img_size=64, depth=2, num_classes=7)


@pytest.fixture(scope="session", autouse=True)
def _one_thread() -> None:
    # the test models are tiny: a second OpenMP thread buys nothing, and on a busy 2-core
    # machine threads spinning against each other make a small matmul ~100x slower
    torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def perturb_(model: nn.Module, scale: float = 0.1) -> nn.Module:
    """Add noise to every parameter in place.

    A fresh init has zero biases, unit norm scales and a near-zero cls token; a comparison
    made there cannot see a bias or a norm that is wired wrongly.
    """
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p), alpha=scale)
    return model


@pytest.fixture
def timm_vit() -> Callable[..., nn.Module]:
    """Factory: a small timm ViT in eval mode with perturbed random weights.

    Keyword arguments override :data:`TIMM_TINY` and go to ``timm.create_model``.
    """

    def make(**overrides) -> nn.Module:
        kwargs = {**TIMM_TINY, **overrides}
        model = timm.create_model("vit_tiny_patch16_224", pretrained=False, **kwargs)
        return perturb_(model).eval()

    return make


@pytest.fixture
def tiny_config() -> Callable[..., ViTConfig]:
    """Factory: a small config (32x32 images, 8x8 patches, 4x4 grid, 2 blocks of width 32)."""

    def make(**overrides) -> ViTConfig:
        fields = dict(img_size=32, patch_size=8, num_classes=5, embed_dim=32, depth=2, num_heads=4)
        return ViTConfig(**{**fields, **overrides})

    return make


@pytest.fixture
def tiny_vit(tiny_config) -> Callable[..., VisionTransformer]:
    """Factory: a model of :func:`tiny_config` in eval mode with perturbed weights."""

    def make(**overrides) -> VisionTransformer:
        return perturb_(VisionTransformer(tiny_config(**overrides))).eval()

    return make
