"""Resizing learned absolute position embeddings to a new patch grid.

A ViT trained at one image size can run at another (Dosovitskiy et al., 2021, section 3.2)
once its patch-grid position embeddings are interpolated in 2-D to the new grid.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def infer_square_grid(num_patches: int) -> tuple[int, int]:
    """Return (grid_h, grid_w) for a square grid of ``num_patches``, or raise."""
    side = math.isqrt(num_patches)
    if side * side != num_patches:
        raise ValueError(
            f"cannot infer the patch grid of a position embedding with {num_patches} patch "
            "tokens: it is not a square; pass the old grid explicitly"
        )
    return side, side


def resize_pos_embed(
    pos_embed: torch.Tensor,
    new_grid: tuple[int, int],
    old_grid: tuple[int, int] | None = None,
    num_prefix_tokens: int = 1,
    mode: str = "bicubic",
    antialias: bool = True,
) -> torch.Tensor:
    """Resize a position embedding ``[1, prefix + grid_h * grid_w, C]`` to ``new_grid``.

    The prefix tokens (cls) pass through untouched; the patch part is interpolated in 2-D
    to exactly ``new_grid``. Resizing to the grid it already has returns the input tensor
    itself, so the result is bit-for-bit the same.

    Args:
        pos_embed: the embedding, batch dimension 1.
        new_grid: target (grid_h, grid_w) in patches.
        old_grid: the grid the embedding was made for; inferred as square when omitted.
        num_prefix_tokens: leading tokens that are not patches (1 for a cls token).
        mode: interpolation mode for ``torch.nn.functional.interpolate``.
        antialias: low-pass filter when shrinking (as timm does for bicubic).
    """
    num_patches = pos_embed.shape[1] - num_prefix_tokens
    if old_grid is None:
        old_grid = infer_square_grid(num_patches)
    if old_grid[0] * old_grid[1] != num_patches:
        raise ValueError(
            f"old grid {old_grid} does not match the {num_patches} patch tokens of the "
            "position embedding"
        )
    new_grid = (int(new_grid[0]), int(new_grid[1]))
    if tuple(old_grid) == new_grid:
        return pos_embed

    prefix, patches = pos_embed[:, :num_prefix_tokens], pos_embed[:, num_prefix_tokens:]
    C = patches.shape[-1]
    dtype = patches.dtype
    grid = patches.reshape(1, old_grid[0], old_grid[1], C).permute(0, 3, 1, 2)  # 1, C, h, w
    # interpolate in float32: bicubic in half precision loses visible accuracy
    grid = F.interpolate(
        grid.float(), size=new_grid, mode=mode, antialias=antialias, align_corners=False
    )
    patches = grid.permute(0, 2, 3, 1).reshape(1, new_grid[0] * new_grid[1], C).to(dtype)
    return torch.cat([prefix, patches], dim=1)
