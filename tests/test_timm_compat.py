"""Our ViT against timm's: converted models, weight files, resized checkpoints, presets."""

from __future__ import annotations

import logging
import os
from functools import partial
from pathlib import Path

import pytest
import timm
import torch
import torch.nn as nn
from safetensors.torch import save_file
from timm.layers import resample_abs_pos_embed
from timm.models.vision_transformer import checkpoint_filter_fn

from vit import (
    PRESETS,
    UnsafeCheckpointError,
    config_from_timm,
    create_model,
    from_timm,
    load_pretrained,
    read_state_dict,
)

ATOL = 1e-5  # float32 logits
PRESET = "vit_tiny_patch16_224"  # the conftest timm models are this preset at depth 2
SMALL = dict(depth=2, img_size=64)  # the overrides that shrink the preset to match them

# the architecture options a converted model must reproduce
VARIANTS = {
    "cls_pool": {},
    "avg_pool": dict(global_pool="avg"),
    "avg_pool_no_fc_norm": dict(global_pool="avg", fc_norm=False),
    "no_qkv_bias": dict(qkv_bias=False),
    "qk_norm": dict(qk_norm=True),
    "layer_scale": dict(init_values=0.1),
}


def _logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(x)


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape
    return (a - b).abs().max().item()


def _save(state: dict[str, torch.Tensor], path: Path) -> Path:
    """Write a state dict the way timm checkpoints come: safetensors or a torch pickle."""
    if path.suffix == ".safetensors":
        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    else:
        torch.save(state, path)
    return path


# -- converting a timm model --------------------------------------------------------------


@pytest.mark.parametrize("variant", VARIANTS)
def test_from_timm_logits_match_at_built_size(timm_vit, variant):
    theirs = timm_vit(**VARIANTS[variant])
    ours = from_timm(theirs).eval()
    x = torch.randn(2, 3, 64, 64)
    assert _max_diff(_logits(ours, x), _logits(theirs, x)) <= ATOL


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("size", [(48, 80), (112, 96), (32, 32)], ids=str)
def test_from_timm_logits_match_at_other_sizes(timm_vit, variant, size):
    # timm resizes its position embedding per input only when built with dynamic_img_size
    theirs = timm_vit(dynamic_img_size=True, **VARIANTS[variant])
    ours = from_timm(theirs).eval()
    x = torch.randn(2, 3, *size)
    assert _max_diff(_logits(ours, x), _logits(theirs, x)) <= ATOL


def test_config_from_timm_reads_the_architecture(timm_vit):
    cfg = config_from_timm(timm_vit(global_pool="avg", qkv_bias=False, qk_norm=True))
    assert cfg.img_size == (64, 64)
    assert (cfg.patch_size, cfg.in_chans, cfg.num_classes) == (16, 3, 7)
    assert (cfg.embed_dim, cfg.depth, cfg.num_heads, cfg.mlp_ratio) == (192, 2, 3, 4.0)
    assert (cfg.global_pool, cfg.fc_norm, cfg.qkv_bias, cfg.qk_norm) == ("avg", True, False, True)
    assert cfg.init_values is None
    assert cfg.norm_eps == 1e-6


def test_from_timm_keeps_the_training_mode(timm_vit):
    assert from_timm(timm_vit().train()).training
    assert not from_timm(timm_vit().eval()).training


@pytest.mark.parametrize(
    "kwargs, feature",
    [
        (dict(reg_tokens=2), "register tokens"),
        (dict(class_token=False, global_pool="avg"), "no class token"),
        (dict(no_embed_class=True), "no_embed_class"),
        (dict(pre_norm=True), "norm_pre"),
        (dict(global_pool="map"), "attention pooling"),
        (dict(global_pool="max"), "global_pool='max'"),
        (dict(global_pool="avg", pool_include_prefix=True), "pool_include_prefix"),
        (dict(act_layer="relu"), "an MLP other than Linear-GELU-Linear"),
        (dict(act_layer=partial(nn.GELU, approximate="tanh")), "tanh-approximated GELU"),
        (dict(scale_mlp_norm=True), "scale_norm"),
    ],
    ids=lambda v: v if isinstance(v, str) else None,
)
def test_unsupported_timm_features_are_refused_by_name(timm_vit, kwargs, feature):
    with pytest.raises(ValueError, match="features we do not support") as err:
        from_timm(timm_vit(**kwargs))
    assert feature in str(err.value)


def timm_hybrid(stride=(2, 2, 2), norm_groups=8, **kwargs) -> nn.Module:
    """timm's ViT on the feature map of its ConvStem (24 -> 12 -> 6 -> 3 pixels, 1x1 patches)."""
    from timm.layers import GroupNormAct
    from timm.models.vision_transformer import VisionTransformer as TimmViT
    from timm.models.vision_transformer_hybrid import ConvStem, HybridEmbed

    norm = partial(GroupNormAct, num_groups=norm_groups)
    stem = ConvStem(in_chans=1, depth=3, channels=(8, 16, 32), stride=stride, norm_layer=norm)
    arch = dict(img_size=24, patch_size=1, in_chans=1, num_classes=4, embed_dim=32, depth=2)
    return TimmViT(**arch, num_heads=4, embed_layer=partial(HybridEmbed, backbone=stem), **kwargs)


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
def test_from_timm_hybrid_conv_stem_gives_timm_logits(training):
    theirs = timm_hybrid().train(training)
    with torch.no_grad():  # norms away from their initial identity
        for p in theirs.patch_embed.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    ours = from_timm(theirs)
    assert (ours.cfg.patch_size, ours.cfg.in_chans, ours.cfg.stem_channels) == (8, 1, [8, 16, 32])
    assert ours.training == training
    x = torch.randn(4, 1, 24, 24)
    assert _max_diff(_logits(ours, x), _logits(theirs, x)) <= ATOL


@pytest.mark.parametrize(
    "kwargs, layer", [(dict(stride=(2, 2, 1)), 2), (dict(norm_groups=4), 0)], ids=["stride", "norm"]
)
def test_hybrid_with_another_stem_is_refused(kwargs, layer):
    with pytest.raises(ValueError, match=rf"a stem layer other than .* \(layer {layer}: "):
        from_timm(timm_hybrid(**kwargs))


def test_config_from_timm_refuses_other_models():
    with pytest.raises(TypeError, match="Linear"):
        config_from_timm(nn.Linear(2, 2))


def test_fresh_init_matches_timms_statistics():
    # same recipe: near-zero cls token, truncated normals of std 0.02, zero biases, unit norms
    kwargs = dict(depth=2, img_size=64, num_classes=7, qk_norm=True, init_values=1e-5)
    ours = create_model(PRESET, **kwargs)
    theirs = dict(timm.create_model(PRESET, pretrained=False, **kwargs).named_parameters())
    for name, p in ours.named_parameters():
        ref = theirs[name]
        ref_std = ref.std().item() if ref.numel() > 1 else 0.0
        std = p.std().item() if p.numel() > 1 else 0.0
        assert abs(std - ref_std) <= 0.2 * ref_std + 1e-12, name
        assert abs(p.mean().item() - ref.mean().item()) <= 0.3 * ref_std + 1e-9, name


# -- weight files --------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".pth", ".bin", ".safetensors"])
def test_load_pretrained_file_gives_timm_logits(timm_vit, tmp_path, suffix):
    theirs = timm_vit()
    path = _save(theirs.state_dict(), tmp_path / f"weights{suffix}")
    ours = load_pretrained(path, preset=PRESET, **SMALL).eval()
    assert ours.num_classes == 7  # read off the file's head
    x = torch.randn(2, 3, 64, 64)
    assert _max_diff(_logits(ours, x), _logits(theirs, x)) <= ATOL


def test_training_checkpoint_wrappers_are_unwrapped(timm_vit, tmp_path):
    theirs = timm_vit()
    state = {f"module.{k}": v for k, v in theirs.state_dict().items()}  # DataParallel names
    path = _save({"state_dict": state, "epoch": torch.tensor(3)}, tmp_path / "ckpt.pth")
    ours = load_pretrained(path, preset=PRESET, **SMALL).eval()
    x = torch.randn(1, 3, 64, 64)
    assert _max_diff(_logits(ours, x), _logits(theirs, x)) <= ATOL


@pytest.mark.parametrize("file_classes", [7, 0], ids=["head_7", "headless"])
def test_other_class_count_loads_backbone_and_reinitialises_head(
    timm_vit, tmp_path, caplog, file_classes
):
    theirs = timm_vit(num_classes=file_classes)
    path = _save(theirs.state_dict(), tmp_path / "weights.safetensors")
    with caplog.at_level(logging.WARNING, logger="vit"):
        ours = load_pretrained(path, preset=PRESET, num_classes=3, **SMALL).eval()
    assert "classifier head not loaded" in caplog.text
    assert f"weights have {file_classes} classes, the model 3" in caplog.text

    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        ours_features = ours.forward_head(ours.forward_features(x)[0], pre_logits=True)
        their_features = theirs.forward_head(theirs.forward_features(x), pre_logits=True)
    assert _max_diff(ours_features, their_features) <= ATOL
    # a fresh head: zero bias, small truncated-normal weights
    assert ours.head.weight.shape == (3, 192)
    assert torch.equal(ours.head.bias, torch.zeros(3))
    assert 0 < ours.head.weight.std().item() < 0.05
    assert _logits(ours, x).shape == (2, 3)


def test_same_class_count_loads_silently(timm_vit, tmp_path, caplog):
    path = _save(timm_vit().state_dict(), tmp_path / "weights.pth")
    with caplog.at_level(logging.WARNING, logger="vit"):
        load_pretrained(path, preset=PRESET, num_classes=7, **SMALL)
    assert "classifier head" not in caplog.text


def test_missing_and_unexpected_keys_are_listed(timm_vit, tmp_path):
    state = timm_vit().state_dict()
    del state["blocks.1.norm1.weight"]
    state["bogus.weight"] = torch.zeros(3)
    path = _save(state, tmp_path / "weights.pth")
    with pytest.raises(ValueError, match="do not fit") as err:
        load_pretrained(path, preset=PRESET, **SMALL)
    assert "'blocks.1.norm1.weight'" in str(err.value)
    assert "'bogus.weight'" in str(err.value)


def test_weights_of_a_deeper_model_are_an_error(timm_vit, tmp_path):
    path = _save(timm_vit(depth=3).state_dict(), tmp_path / "weights.safetensors")
    with pytest.raises(ValueError, match="unexpected keys") as err:
        load_pretrained(path, preset=PRESET, **SMALL)
    assert "blocks.2.attn.qkv.weight" in str(err.value)


def test_weights_of_another_shape_are_an_error_naming_the_keys(tmp_path):
    # a hybrid's weights for the plain preset: same keys but the projection's shape
    weights = create_model("vit_mini_convstem_patch7_28").state_dict()
    path = _save(weights, tmp_path / "weights.safetensors")
    with pytest.raises(
        ValueError, match=r"shapes differ for patch_embed.proj.weight \[96, 96, 1, 1\]"
    ):
        load_pretrained(path, preset="vit_mini_patch7_28")
    wider = _save(
        create_model("vit_mini_patch7_28", embed_dim=128).state_dict(), tmp_path / "w.pth"
    )
    with pytest.raises(ValueError, match=r"and \d+ more"):
        load_pretrained(wider, preset="vit_mini_patch7_28")


def test_weight_file_needs_a_preset(timm_vit, tmp_path):
    path = _save(timm_vit().state_dict(), tmp_path / "weights.pth")
    with pytest.raises(ValueError, match="needs a preset"):
        load_pretrained(path)


def test_missing_weight_file_names_the_path(tmp_path):
    path = tmp_path / "absent.safetensors"
    with pytest.raises(FileNotFoundError, match="absent.safetensors"):
        load_pretrained(path, preset=PRESET)


@pytest.mark.parametrize("suffix", [".pth", ".bin", ".safetensors"])
@pytest.mark.parametrize("damage", ["text", "truncated", "pickle_garbage"])
def test_unreadable_weight_file_names_the_path(tmp_path, suffix, damage):
    path = tmp_path / f"damaged{suffix}"
    if damage == "text":
        path.write_bytes(b"this is not a weight file")
    elif damage == "pickle_garbage":  # a pickle header, then bytes no unpickler can read
        path.write_bytes(b"\x80\x05garbage" + bytes(range(50)))
    else:
        _save({"w": torch.randn(64, 64)}, path)
        path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(ValueError, match=f"damaged{suffix}: not a readable"):
        read_state_dict(path)


def test_file_of_non_tensors_is_refused(tmp_path):
    path = _save({"weight": [1.0, 2.0]}, tmp_path / "list.pth")
    with pytest.raises(ValueError, match="dict of tensors"):
        read_state_dict(path)


class _Payload:
    """Unpickling this creates a file: stands for code hidden in a checkpoint."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return open, (str(self.marker), "w")


@pytest.mark.parametrize("fmt", ["zip", "raw_pickle"])
def test_malicious_pickle_is_refused_without_running(tmp_path, fmt):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    state = {"pos_embed": torch.zeros(1), "payload": _Payload(marker)}
    if fmt == "zip":
        torch.save(state, path)
    else:
        torch.save(state, path, _use_new_zipfile_serialization=False)

    with pytest.raises(UnsafeCheckpointError, match="evil.pth") as info:
        load_pretrained(path, preset=PRESET)
    message = str(info.value)
    assert "weights_only" not in message and "allowlist" not in message  # no unsafe advice
    assert "Unsupported global" in message  # but say what was refused
    with pytest.raises(UnsafeCheckpointError):
        read_state_dict(path)
    assert not marker.exists()

    # control: an unsafe load of the same file does run the payload
    torch.load(path, weights_only=False)
    assert marker.exists()
    os.remove(marker)


# -- checkpoints made at another image size -----------------------------------------------


def _timm_at(size: tuple[int, int], state: dict[str, torch.Tensor], how: str) -> nn.Module:
    """timm's own avg-pooling model built at ``size``, ``state`` resized by timm's own code."""
    ref = timm.create_model(
        "vit_tiny_patch16_224",
        pretrained=False,
        img_size=size,
        depth=2,
        num_classes=7,
        global_pool="avg",
    )
    if how == "checkpoint_filter_fn":
        state = checkpoint_filter_fn(state, ref)
    else:
        state = dict(state)
        grid = ref.patch_embed.grid_size
        state["pos_embed"] = resample_abs_pos_embed(state["pos_embed"], new_size=grid)
    ref.load_state_dict(state)
    return ref.eval()


@pytest.mark.parametrize("how", ["checkpoint_filter_fn", "resample_abs_pos_embed"])
@pytest.mark.parametrize("size", [(96, 96), (48, 80), (32, 32)], ids=str)
def test_checkpoint_loads_at_another_image_size(timm_vit, tmp_path, how, size):
    theirs = timm_vit(global_pool="avg")  # built at 64x64
    path = _save(theirs.state_dict(), tmp_path / "weights.safetensors")
    ours = load_pretrained(path, preset=PRESET, depth=2, img_size=size, global_pool="avg")
    ref = _timm_at(size, theirs.state_dict(), how)
    assert ours.grid_size == ref.patch_embed.grid_size
    x = torch.randn(2, 3, *size)
    assert _max_diff(_logits(ours.eval(), x), _logits(ref, x)) <= ATOL


# -- presets -------------------------------------------------------------------------------

IMAGENET_PRESETS = sorted(name for name in PRESETS if name.endswith("_224"))


def _shapes(model: nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


@pytest.mark.parametrize("name", IMAGENET_PRESETS)
def test_imagenet_presets_have_timm_parameters(name):
    # on the meta device nothing is allocated, so even the large model is instant
    with torch.device("meta"):
        ours = create_model(name)
        theirs = timm.create_model(name, pretrained=False)
    assert _shapes(ours) == _shapes(theirs)
    n_ours = sum(p.numel() for p in ours.parameters())
    assert n_ours == sum(p.numel() for p in theirs.parameters())


def test_vit_base_parameter_count_is_the_published_one():
    with torch.device("meta"):
        model = create_model("vit_base_patch16_224")
    assert sum(p.numel() for p in model.parameters()) == 86_567_656  # ViT-B/16, 1000 classes
