"""Image to patch tokens: the plain ViT's strided convolution, or the paper's hybrid.

The hybrid (Dosovitskiy et al., Sec. 3.1) forms the tokens from the feature map of a small
convolutional stem, 3x3 stride-2 convolutions; the patch projection then takes patches of
that map so that the token grid is the plain model's, image size / patch size.
"""

from __future__ import annotations

import torch
import torch.nn as nn


def stem_size(size: int, layers: int) -> int:
    """Side of the feature map that ``layers`` 3x3 stride-2 convolutions (padding 1) leave."""
    for _ in range(layers):
        size = (size + 1) // 2
    return size


def stem_kernel(img_size: int | tuple[int, int], patch_size: int, layers: int) -> tuple[int, int]:
    """Kernel of the patch projection that turns the stem's feature map into the token grid
    of ``patch_size``-pixel patches; ``patch_size`` itself without a stem."""
    kernel = []
    for side in (img_size, img_size) if isinstance(img_size, int) else img_size:
        feature, grid = stem_size(side, layers), side // patch_size
        if grid == 0 or feature % grid:
            raise ValueError(
                f"stem_channels: {layers} stride-2 convolutions turn a side of {side} pixels "
                f"into {feature}, not a multiple of its {grid} patches of {patch_size} pixels "
                f"(a stem fits every multiple of the patch size only when the patch size is "
                f"a multiple of {2**layers})"
            )
        kernel.append(feature // grid)
    return kernel[0], kernel[1]


STEM_GROUPS = 8  # GroupNorm groups in each stem layer but the last


class ConvNormAct(nn.Module):
    """Convolution, GroupNorm and ReLU: one layer of the hybrid's stem.

    GroupNorm rather than BatchNorm: each image is normalised alone, so a batch split over
    processes or accumulation steps trains as the whole batch would, and training and
    evaluation compute the same function.
    """

    def __init__(self, in_chans: int, out_chans: int, last: bool):
        super().__init__()
        # the last layer feeds the projection directly, as in timm's ConvStem: bias, no norm.
        # timm's ConvNormAct calls its norm "bn" whatever it is; the names stay timm's
        self.conv = nn.Conv2d(in_chans, out_chans, 3, stride=2, padding=1, bias=last)
        self.bn = nn.Identity() if last else nn.GroupNorm(STEM_GROUPS, out_chans)
        self.act = nn.Identity() if last else nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.bn(self.conv(x)))


class PatchEmbed(nn.Module):
    """Image to patch tokens with one strided convolution, over the pixels or, in a hybrid,
    over the feature map of a stem of 3x3 stride-2 convolutions (the layout of timm's
    ``ConvStem`` with GroupNorm inside its ``HybridEmbed``, under the same parameter names)."""

    def __init__(
        self,
        patch_size: int,
        in_chans: int,
        embed_dim: int,
        img_size: tuple[int, int],
        stem_channels: list[int] | tuple[int, ...] = (),
    ):
        super().__init__()
        self.patch_size = patch_size
        self.in_chans = in_chans
        self.stem_layers = len(stem_channels)
        chans = [in_chans, *stem_channels]
        if stem_channels:
            last = len(stem_channels) - 1
            self.backbone = nn.Sequential(
                *(ConvNormAct(chans[i], chans[i + 1], last=i == last) for i in range(last + 1))
            )
        else:
            self.backbone = nn.Identity()
        kernel = stem_kernel(img_size, patch_size, self.stem_layers)
        self.proj = nn.Conv2d(chans[-1], embed_dim, kernel_size=kernel, stride=kernel)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.proj(self.backbone(x))  # B, C, grid_h, grid_w
        return x.flatten(2).transpose(1, 2)  # B, N, C
