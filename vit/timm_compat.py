"""Interchange with timm: its ``VisionTransformer`` models and weight files load into ours.

Our parameter names are timm's, so conversion is reading the architecture off a timm model
and copying its state dict.
"""

from __future__ import annotations

from pathlib import Path

import torch.nn as nn

from vit.model import VisionTransformer, ViTConfig
from vit.patch_embed import STEM_GROUPS
from vit.presets import preset_config
from vit.weights import load_weights, read_state_dict

WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin")


def _unsupported(model: nn.Module) -> list[str]:
    """Features of a timm ViT that our model does not have."""
    from timm.layers import Mlp as TimmMlp
    from timm.models.vision_transformer import Block as TimmBlock

    problems = []
    if getattr(model, "num_reg_tokens", 0):
        problems.append("register tokens")
    if not getattr(model, "has_class_token", True) or model.cls_token is None:
        problems.append("no class token")
    if getattr(model, "no_embed_class", False):
        problems.append("position embedding without the class token (no_embed_class)")
    if not isinstance(model.norm_pre, nn.Identity):
        problems.append("pre-norm before the blocks (norm_pre)")
    if getattr(model, "attn_pool", None) is not None:
        problems.append("attention pooling")
    if model.global_pool not in ("token", "avg"):
        problems.append(f"global_pool={model.global_pool!r}")
    if getattr(model, "pool_include_prefix", False):
        problems.append("pooling that includes the class token (pool_include_prefix)")
    if not isinstance(getattr(model.patch_embed, "norm", nn.Identity()), nn.Identity):
        problems.append("a norm in the patch embedding")
    problems += _stem_problems(model.patch_embed)
    block = model.blocks[0]
    if type(block) is not TimmBlock:
        problems.append(f"block type {type(block).__name__}")
    elif type(block.mlp) is not TimmMlp or not isinstance(block.mlp.act, nn.GELU):
        problems.append("an MLP other than Linear-GELU-Linear")
    elif not isinstance(block.mlp.norm, nn.Identity) or not isinstance(
        block.attn.norm, nn.Identity
    ):
        problems.append("norms inside the attention or MLP (scale_norm)")
    elif block.mlp.act.approximate != "none":
        problems.append("tanh-approximated GELU")
    if not isinstance(model.head, nn.Linear | nn.Identity):
        problems.append(f"head type {type(model.head).__name__}")
    return problems


def _stem_problems(embed: nn.Module) -> list[str]:
    """What keeps a timm patch embedding from being ours: plain, or a hybrid whose backbone
    is a ``ConvStem`` of 3x3 stride-2 convolutions with GroupNorm in 8 groups and ReLU."""
    from timm.layers import PatchEmbed
    from timm.models.vision_transformer_hybrid import ConvStem, HybridEmbed

    if type(embed) is PatchEmbed:
        return []
    if type(embed) is not HybridEmbed:
        return [f"patch embedding {type(embed).__name__}"]
    if type(embed.backbone) is not ConvStem:
        return [f"a hybrid backbone {type(embed.backbone).__name__} (only timm's ConvStem)"]
    layers = list(embed.backbone)
    for i, layer in enumerate(layers):
        last, conv = i == len(layers) - 1, layer.conv
        shape = (conv.kernel_size, conv.stride, conv.padding) == ((3, 3), (2, 2), (1, 1))
        if last:  # timm's last stem layer is a bare convolution with a bias, as ours
            norm = isinstance(layer.bn, nn.Identity) or list(layer.bn.children()) == []
        else:  # timm's GroupNormAct: a GroupNorm that applies its activation
            bn, act = layer.bn, getattr(layer.bn, "act", None)
            norm = isinstance(bn, nn.GroupNorm) and isinstance(act, nn.ReLU)
            norm = norm and (bn.num_groups, bn.eps, bn.affine) == (STEM_GROUPS, 1e-5, True)
        if not (shape and norm and type(conv) is nn.Conv2d and (conv.bias is not None) == last):
            return [
                f"a stem layer other than 3x3 stride-2 conv, GroupNorm({STEM_GROUPS}), ReLU "
                f"(layer {i}: {type(layer.bn).__name__})"
            ]
    if not isinstance(embed.proj, nn.Conv2d) or embed.proj.padding != (0, 0):
        return ["a hybrid projection other than a patch convolution"]
    return []


def _patch_and_stem(embed: nn.Module) -> tuple[int, int, list[int]]:
    """Our patch size (pixels per token), input channels and stem channels for a timm patch
    embedding."""
    from timm.models.vision_transformer_hybrid import HybridEmbed

    img, grid = tuple(embed.img_size), tuple(embed.grid_size)
    if img[0] % grid[0] or img[1] % grid[1]:
        raise ValueError(f"a {grid} token grid does not divide the {img} image into patches")
    if img[0] // grid[0] != img[1] // grid[1]:
        raise ValueError(f"non-square patches are not supported: {img} pixels, {grid} grid")
    if not isinstance(embed, HybridEmbed):
        return img[0] // grid[0], embed.proj.in_channels, []
    layers = list(embed.backbone)
    stem = [layer.conv.out_channels for layer in layers]
    return img[0] // grid[0], layers[0].conv.in_channels, stem


def config_from_timm(model: nn.Module) -> ViTConfig:
    """Read a :class:`ViTConfig` off a timm ``VisionTransformer``."""
    from timm.models.vision_transformer import VisionTransformer as TimmViT

    if not isinstance(model, TimmViT):
        raise TypeError(f"expected a timm VisionTransformer, got {type(model).__name__}")
    problems = _unsupported(model)
    if problems:
        raise ValueError(f"this timm model uses features we do not support: {problems}")
    patch, in_chans, stem_channels = _patch_and_stem(model.patch_embed)
    block = model.blocks[0]
    final_norm = model.fc_norm if isinstance(model.norm, nn.Identity) else model.norm
    return ViTConfig(
        img_size=tuple(model.patch_embed.img_size),
        patch_size=patch,
        in_chans=in_chans,
        stem_channels=stem_channels,
        num_classes=model.num_classes,
        embed_dim=model.embed_dim,
        depth=len(model.blocks),
        num_heads=block.attn.num_heads,
        mlp_ratio=block.mlp.fc1.out_features / model.embed_dim,
        qkv_bias=block.attn.qkv.bias is not None,
        qk_norm=not isinstance(block.attn.q_norm, nn.Identity),
        # the value only seeds a fresh model; loaded weights replace it
        init_values=1e-5 if hasattr(block.ls1, "gamma") else None,
        global_pool=model.global_pool,
        fc_norm=not isinstance(model.fc_norm, nn.Identity),
        norm_eps=getattr(final_norm, "eps", 1e-6),
    )


def from_timm(model: nn.Module) -> VisionTransformer:
    """Our model with the architecture and weights of a timm ``VisionTransformer``."""
    ours = VisionTransformer(config_from_timm(model))
    load_weights(ours, model.state_dict())
    return ours.train(model.training)


def load_pretrained(
    source: str | Path,
    preset: str | None = None,
    num_classes: int | None = None,
    **overrides,
) -> VisionTransformer:
    """A model from timm weights: a local weight file with a preset, or a timm model name.

    Args:
        source: a ``.safetensors``/``.pth``/``.pt``/``.bin`` state dict in timm's layout,
            or a timm pretrained name such as ``"vit_small_patch16_224.augreg_in21k_ft_in1k"``
            (downloaded by timm, so it needs a network).
        preset: our preset describing the file's architecture (needed for files: the head
            count cannot be read off the weights).
        num_classes: classes of the new model; when they differ from the weights' the head
            is re-initialised.
        overrides: other :class:`ViTConfig` fields, e.g. ``img_size=384``.
    """
    path = Path(source)
    if path.suffix in WEIGHT_SUFFIXES or path.exists():
        state = read_state_dict(path)
        if preset is None:
            raise ValueError(f"{path}: loading a weight file needs a preset name (--model)")
        if num_classes is None and "head.weight" in state:
            num_classes = state["head.weight"].shape[0]
        extra = {"num_classes": num_classes} if num_classes is not None else {}
        model = VisionTransformer(preset_config(preset, **extra, **overrides))
        load_weights(model, state)
        return model

    import timm

    kwargs = dict(overrides)
    if num_classes is not None:
        kwargs["num_classes"] = num_classes
    timm_model = timm.create_model(str(source), pretrained=True, **kwargs)
    return from_timm(timm_model.eval())
