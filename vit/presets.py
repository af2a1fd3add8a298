"""Named architectures, ``create_model(name, **overrides)``.

The ImageNet presets match timm's models of the same name, so their weights load directly.
The small-image presets are for 32x32 RGB (CIFAR) and 28x28 grayscale (Fashion-MNIST).
"""

from __future__ import annotations

import dataclasses

from vit.model import VisionTransformer, ViTConfig

_MINI_28 = dict(
    img_size=28, in_chans=1, num_classes=10, embed_dim=96, depth=6, num_heads=4, mlp_ratio=2.0
)

PRESETS: dict[str, dict] = {
    "vit_tiny_patch16_224": dict(embed_dim=192, depth=12, num_heads=3),
    "vit_small_patch16_224": dict(embed_dim=384, depth=12, num_heads=6),
    "vit_base_patch16_224": dict(embed_dim=768, depth=12, num_heads=12),
    "vit_base_patch32_224": dict(patch_size=32, embed_dim=768, depth=12, num_heads=12),
    "vit_large_patch16_224": dict(embed_dim=1024, depth=24, num_heads=16),
    # CIFAR-sized ViTs in the spirit of Lee et al., "Vision Transformer for Small-Size
    # Datasets" (2021): patch 4 gives an 8x8 grid, narrow MLPs keep the cost down
    "vit_tiny_patch4_32": dict(
        img_size=32,
        patch_size=4,
        num_classes=10,
        embed_dim=192,
        depth=9,
        num_heads=12,
        mlp_ratio=2.0,
    ),
    "vit_small_patch4_32": dict(
        img_size=32,
        patch_size=4,
        num_classes=10,
        embed_dim=384,
        depth=7,
        num_heads=12,
        mlp_ratio=1.0,
    ),
    # Fashion-MNIST on a CPU, one input channel: a 4x4 grid of 7x7 patches trains three times
    # faster than a 7x7 grid of 4x4 ones and wins at a fixed CPU budget
    "vit_mini_patch7_28": dict(_MINI_28, patch_size=7),
    "vit_mini_patch4_28": dict(_MINI_28, patch_size=4),
    # the paper's hybrid (Sec. 3.1) at Fashion-MNIST size: three 3x3 stride-2 convolutions
    # (28 -> 14 -> 7 -> 4 pixels) instead of cutting 7x7 patches, the same 4x4 grid of tokens;
    # it learns faster per epoch than either plain model (the README gives the runs)
    "vit_mini_convstem_patch7_28": dict(_MINI_28, patch_size=7, stem_channels=(24, 48, 96)),
}


def preset_config(name: str, **overrides) -> ViTConfig:
    """The :class:`ViTConfig` of a preset, with fields replaced by ``overrides``."""
    if name not in PRESETS:
        known = ", ".join(sorted(PRESETS))
        raise ValueError(f"unknown model preset {name!r}; known presets: {known}")
    fields = {f.name for f in dataclasses.fields(ViTConfig)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise ValueError(f"unknown model option(s) {unknown} for preset {name!r}")
    cfg = ViTConfig(**{**PRESETS[name], **overrides})
    cfg.extra = {**cfg.extra, "preset": name}
    return cfg


def create_model(name: str, **overrides) -> VisionTransformer:
    """Build a preset by name, e.g. ``create_model("vit_small_patch16_224", num_classes=10)``."""
    return VisionTransformer(preset_config(name, **overrides))
