"""The model: attention maps, gradients, other image sizes, errors, presets, stochastic depth."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from vit import PRESETS, VisionTransformer, ViTConfig, create_model, preset_config
from vit.model import DropPath

# -- attention maps -------------------------------------------------------------------------


def _layer_norm(x: np.ndarray, weight: torch.Tensor, bias: torch.Tensor, eps: float):
    mean = x.mean(-1, keepdims=True)
    var = x.var(-1, keepdims=True)  # biased, as LayerNorm uses
    return (x - mean) / np.sqrt(var + eps) * _np(weight) + _np(bias)


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().double().numpy()


def _reference_attention(block, x: torch.Tensor) -> np.ndarray:
    """softmax(q k^T / sqrt(head_dim)) of one block, in float64 numpy from its weights."""
    attn = block.attn
    B, N, C = x.shape
    heads, head_dim = attn.num_heads, C // attn.num_heads
    h = _layer_norm(_np(x), block.norm1.weight, block.norm1.bias, block.norm1.eps)
    weight = _np(attn.qkv.weight)  # 3C, C: rows are q, then k, then v
    bias = _np(attn.qkv.bias) if attn.qkv.bias is not None else np.zeros(3 * C)
    q = h @ weight[:C].T + bias[:C]  # B, N, C
    k = h @ weight[C : 2 * C].T + bias[C : 2 * C]
    q = q.reshape(B, N, heads, head_dim).transpose(0, 2, 1, 3)  # B, heads, N, head_dim
    k = k.reshape(B, N, heads, head_dim).transpose(0, 2, 1, 3)
    if isinstance(attn.q_norm, nn.LayerNorm):
        q = _layer_norm(q, attn.q_norm.weight, attn.q_norm.bias, attn.q_norm.eps)
        k = _layer_norm(k, attn.k_norm.weight, attn.k_norm.bias, attn.k_norm.eps)
    scores = q @ k.transpose(0, 1, 3, 2) / math.sqrt(head_dim)  # B, heads, N, N
    scores = np.exp(scores - scores.max(-1, keepdims=True))
    return scores / scores.sum(-1, keepdims=True)


def _block_inputs(model: VisionTransformer) -> tuple[list[torch.Tensor], list]:
    """Record the input of every block with forward pre-hooks."""
    inputs = []
    handles = [
        block.register_forward_pre_hook(lambda _, args: inputs.append(args[0].detach()))
        for block in model.blocks
    ]
    return inputs, handles


@pytest.mark.parametrize(
    "overrides",
    [{}, dict(qk_norm=True), dict(qkv_bias=False, global_pool="avg")],
    ids=["plain", "qk_norm", "no_qkv_bias"],
)
@pytest.mark.parametrize("size", [(32, 32), (24, 40)], ids=str)
def test_attention_maps_are_the_softmax_of_each_layers_scores(tiny_vit, overrides, size):
    model = tiny_vit(depth=3, **overrides)
    x = torch.randn(2, 3, *size)
    inputs, handles = _block_inputs(model)
    with torch.no_grad():
        logits, attentions = model(x, return_attention=True)
    for handle in handles:
        handle.remove()
    with torch.no_grad():
        plain_logits = model(x)

    N = 1 + (size[0] // 8) * (size[1] // 8)
    assert len(attentions) == len(model.blocks) == len(inputs)
    for block, block_input, attn in zip(model.blocks, inputs, attentions):
        assert attn.shape == (2, 4, N, N)
        assert attn.dtype == torch.float32
        torch.testing.assert_close(attn.sum(-1), torch.ones(2, 4, N), atol=1e-6, rtol=0)
        expected = torch.from_numpy(_reference_attention(block, block_input)).float()
        torch.testing.assert_close(attn, expected, atol=1e-6, rtol=1e-5)
    # the explicit attention path computes the same logits as the fused kernel
    torch.testing.assert_close(logits, plain_logits, atol=1e-6, rtol=1e-5)


def test_attention_maps_are_in_the_autograd_graph(tiny_vit):
    model = tiny_vit()
    _, attentions = model(torch.randn(1, 3, 32, 32), return_attention=True)
    # the cls token's attention to the patches (attention rows sum to one, so not all of it)
    attentions[-1][:, :, 0, 1:].square().sum().backward()
    assert model.blocks[-1].attn.qkv.weight.grad.abs().max() > 0
    assert model.patch_embed.proj.weight.grad.abs().max() > 0


# -- gradients ------------------------------------------------------------------------------

GRAD_CASES = {
    "token_pool": ({}, False),
    "avg_qk_norm_layer_scale": (dict(global_pool="avg", qk_norm=True, init_values=1e-5), False),
    "drop_path_and_dropout": (
        dict(drop_path_rate=0.5, drop_rate=0.1, attn_drop_rate=0.1, proj_drop_rate=0.1),
        False,
    ),
    "return_attention": (dict(qk_norm=True), True),
    "hybrid_stem": (dict(stem_channels=[8, 16]), False),
}


@pytest.mark.parametrize("case", GRAD_CASES)
def test_gradients_reach_every_parameter(tiny_config, case):
    overrides, return_attention = GRAD_CASES[case]
    # the real init (near-zero cls token, tiny LayerScale), not a perturbed one
    model = VisionTransformer(tiny_config(**overrides)).train()
    x = torch.randn(8, 3, 32, 32)
    out = model(x, return_attention=return_attention)
    logits = out[0] if return_attention else out
    F.cross_entropy(logits, torch.arange(8) % 5).backward()

    grads = {name: p.grad for name, p in model.named_parameters()}
    assert all(g is not None for g in grads.values()), [n for n, g in grads.items() if g is None]
    # a bias added to every key shifts each score row by a constant, which softmax ignores:
    # its gradient is zero up to rounding, so it is checked for that instead
    key_biases = [n for n in grads if n.endswith("k_norm.bias")]
    for name in key_biases:
        q_grad = grads[name.replace("k_norm", "q_norm")].abs().max()
        assert grads[name].abs().max() <= 1e-4 * q_grad
    zero = [n for n, g in grads.items() if n not in key_biases and not g.abs().max() > 0]
    assert not zero, f"no gradient reaches {zero}"


# -- the plain forward's last block ---------------------------------------------------------

CLS_ONLY_CASES = {
    "plain": {},
    "qk_norm_layer_scale": dict(qk_norm=True, init_values=0.5),
    "no_qkv_bias_fc_norm": dict(qkv_bias=False, fc_norm=True),
    "hybrid_stem": dict(stem_channels=[8, 16]),
}


@pytest.mark.parametrize("return_attention", [False, True], ids=["plain", "maps"])
@pytest.mark.parametrize("case", CLS_ONLY_CASES)
def test_forward_equals_reading_the_cls_token_of_all_tokens(tiny_vit, case, return_attention):
    # the forward's last block computes the cls token alone; its logits, maps and every
    # gradient must match running all tokens through every block and reading the cls token
    model = tiny_vit(**CLS_ONLY_CASES[case]).train()
    x = torch.randn(4, 3, 32, 32)
    if return_attention:
        fast, fast_maps = model(x, return_attention=True)
        tokens, full_maps = model.forward_features(x, return_attention=True)
        full = model.forward_head(tokens)
        for a, b in zip(fast_maps, full_maps, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    else:
        fast, fast_maps = model(x), []
        full, full_maps = model.forward_head(model.forward_features(x)[0]), []
    torch.testing.assert_close(fast, full, rtol=1e-5, atol=1e-5)
    params = list(model.parameters())
    fast_grads = torch.autograd.grad(loss_of(fast, fast_maps), params)
    full_grads = torch.autograd.grad(loss_of(full, full_maps), params)
    for (name, _), a, b in zip(model.named_parameters(), fast_grads, full_grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=lambda m, n=name: f"{n}: {m}")


def loss_of(logits: torch.Tensor, maps: list[torch.Tensor]) -> torch.Tensor:
    return logits.square().sum() + sum(m[:, :, 0].square().sum() for m in maps)


def test_cls_only_block_output_is_the_first_token_of_the_full_output(tiny_vit):
    block = tiny_vit(qk_norm=True, init_values=0.5).blocks[1]
    x = torch.randn(3, 17, 32)
    full, _ = block(x)
    cls, attn = block(x, cls_only=True)
    assert cls.shape == (3, 1, 32) and attn is None
    torch.testing.assert_close(cls, full[:, :1], rtol=1e-5, atol=1e-6)


# -- other image sizes ----------------------------------------------------------------------


@pytest.mark.parametrize("size", [(32, 32), (24, 40), (8, 8), (64, 16), (96, 104)], ids=str)
def test_model_runs_at_other_sizes(tiny_vit, size):
    model = tiny_vit()
    assert model.check_input(torch.zeros(1, 3, *size)) == (size[0] // 8, size[1] // 8)
    with torch.no_grad():
        logits = model(torch.randn(2, 3, *size))
    assert logits.shape == (2, 5)
    assert torch.isfinite(logits).all()


def test_running_at_a_size_equals_a_model_built_there(tiny_config, tiny_vit):
    # resizing at run time and resizing while loading a checkpoint are the same operation
    model = tiny_vit()
    built_there = VisionTransformer(tiny_config(img_size=(48, 40))).eval()
    built_there.load_state_dict(model.state_dict())
    assert built_there.pos_embed.shape == (1, 1 + 6 * 5, 32)
    x = torch.randn(2, 3, 48, 40)
    with torch.no_grad():
        assert torch.equal(model(x), built_there(x))


@pytest.mark.parametrize("stem", [[], [8, 16]], ids=["plain", "hybrid"])
def test_samples_do_not_affect_each_other(tiny_vit, stem):
    model = tiny_vit(stem_channels=stem)
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        together = model(x)
        alone = model(x[1:2])
    torch.testing.assert_close(together[1:2], alone, atol=1e-6, rtol=1e-5)


def test_reset_classifier_changes_the_head(tiny_vit):
    model = tiny_vit()
    model.reset_classifier(3)
    assert model.num_classes == model.cfg.num_classes == 3
    assert torch.equal(model.head.bias, torch.zeros(3))
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 3)
    model.reset_classifier(0)  # features only
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 32)


# -- errors ---------------------------------------------------------------------------------


@pytest.mark.parametrize("img_size, shown", [(30, "30x30"), ((32, 36), "32x36")])
def test_image_size_not_a_multiple_of_the_patch_is_refused(tiny_config, img_size, shown):
    with pytest.raises(
        ValueError, match=f"image size {shown} is not a multiple of the patch size 8"
    ):
        VisionTransformer(tiny_config(img_size=img_size))


def test_input_not_a_multiple_of_the_patch_is_refused(tiny_vit):
    with pytest.raises(ValueError, match="image size 33x32 is not a multiple of the patch size 8"):
        tiny_vit()(torch.randn(1, 3, 33, 32))


def test_embed_dim_not_divisible_by_heads_is_refused(tiny_config):
    with pytest.raises(ValueError, match="embed_dim 30 is not divisible by num_heads 4"):
        VisionTransformer(tiny_config(embed_dim=30))


@pytest.mark.parametrize("model_chans, input_chans", [(3, 1), (1, 3)])
def test_wrong_channel_count_is_refused(tiny_vit, model_chans, input_chans):
    model = tiny_vit(in_chans=model_chans)
    with pytest.raises(
        ValueError, match=f"expects {model_chans} input channels, got {input_chans}"
    ):
        model(torch.randn(1, input_chans, 32, 32))


def test_input_that_is_not_a_batch_of_images_is_refused(tiny_vit):
    with pytest.raises(ValueError, match=r"\[B, C, H, W\], got shape \[3, 32, 32\]"):
        tiny_vit()(torch.randn(3, 32, 32))


@pytest.mark.parametrize(
    "field, value, shown",
    [("num_heads", 0, "num_heads must be positive"), ("embed_dim", -4, "embed_dim must be"),
     ("depth", -1, "depth must be 0 or more")],
)  # fmt: skip
def test_non_positive_sizes_are_refused_by_name(tiny_config, field, value, shown):
    with pytest.raises(ValueError, match=shown):
        VisionTransformer(tiny_config(**{field: value}))


def test_unknown_global_pool_is_refused(tiny_config):
    with pytest.raises(ValueError, match="global_pool must be 'token' or 'avg', got 'max'"):
        VisionTransformer(tiny_config(global_pool="max"))


def test_unknown_preset_lists_the_known_ones():
    with pytest.raises(ValueError, match="unknown model preset 'vit_huge'") as err:
        create_model("vit_huge")
    assert all(name in str(err.value) for name in PRESETS)


def test_unknown_override_is_named():
    with pytest.raises(ValueError, match=r"\['dpeth'\] for preset 'vit_mini_patch4_28'"):
        create_model("vit_mini_patch4_28", dpeth=3)


# -- presets and config ---------------------------------------------------------------------

SMALL_PRESETS = sorted(name for name in PRESETS if not name.endswith("_224"))


@pytest.mark.parametrize("name", SMALL_PRESETS)
def test_small_presets_classify_their_images(name):
    model = create_model(name).eval()
    cfg = model.cfg
    assert cfg.extra["preset"] == name
    assert cfg.num_classes == 10
    x = torch.randn(2, cfg.in_chans, cfg.img_size, cfg.img_size)
    with torch.no_grad():
        assert model(x).shape == (2, 10)


@pytest.mark.parametrize(
    "name, patch",
    [("vit_mini_patch7_28", 7), ("vit_mini_patch4_28", 4), ("vit_mini_convstem_patch7_28", 7)],
)
def test_mini_presets_are_grayscale(name, patch):
    cfg = preset_config(name)
    assert (cfg.in_chans, cfg.img_size, cfg.patch_size) == (1, 28, patch)
    model = VisionTransformer(cfg)
    assert model.pos_embed.shape[1] == 1 + (28 // patch) ** 2


def test_preset_overrides_replace_fields():
    model = create_model("vit_mini_patch4_28", num_classes=3, depth=2)
    assert model.head.out_features == 3
    assert len(model.blocks) == 2
    assert PRESETS["vit_mini_patch4_28"]["depth"] == 6  # the table itself is not changed


def test_config_round_trips_through_a_dict():
    cfg = preset_config("vit_tiny_patch4_32", img_size=(32, 48))
    d = cfg.to_dict()
    assert d["img_size"] == [32, 48]
    rebuilt = VisionTransformer(ViTConfig(**d))
    original = VisionTransformer(cfg)
    shapes = {k: v.shape for k, v in original.state_dict().items()}
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == shapes


# -- the hybrid: a convolutional stem before the patch projection ----------------------------


@pytest.mark.parametrize("stem, kernel", [([8, 16], 2), ([8, 16, 16], 1), ([4], 4)])
def test_stem_feature_map_is_cut_into_the_patch_grid(tiny_config, stem, kernel):
    # 32x32 images, 8-pixel patches: each stride-2 layer halves the side, and the projection
    # takes the patches of the feature map that keep the 4x4 grid
    model = VisionTransformer(tiny_config(stem_channels=stem)).eval()
    proj = model.patch_embed.proj
    assert proj.in_channels == stem[-1]
    assert proj.kernel_size == proj.stride == (kernel, kernel)
    with torch.no_grad():
        assert model.patch_embed(torch.randn(2, 3, 32, 32)).shape == (2, 16, 32)
        assert model(torch.randn(2, 3, 64, 48)).shape == (2, 5)  # an 8x6 grid


def test_stem_trains_each_image_alone(tiny_vit):
    # GroupNorm, not BatchNorm: in training too an image's logits do not depend on its batch
    model = tiny_vit(stem_channels=[8, 16]).train()
    x = torch.randn(3, 3, 32, 32)
    torch.testing.assert_close(model(x)[1:2], model(x[1:2]), atol=1e-6, rtol=1e-5)
    assert isinstance(model.patch_embed.backbone[0].bn, nn.GroupNorm)
    assert isinstance(model.patch_embed.backbone[1].bn, nn.Identity)  # the last layer: conv only


def test_stem_that_does_not_fit_the_patches_is_refused():
    # 28 -> 14 -> 7 -> 4 pixels, but 4x4 patches need a grid of 7
    cfg = ViTConfig(img_size=28, patch_size=4, in_chans=1, stem_channels=[8, 8, 8])
    with pytest.raises(
        ValueError, match="turn a side of 28 pixels into 4, not a multiple of its 7"
    ):
        VisionTransformer(cfg)


def test_input_whose_stem_map_does_not_fit_is_refused():
    model = VisionTransformer(ViTConfig(img_size=28, patch_size=7, in_chans=1, embed_dim=32,
                                        depth=1, num_heads=2, stem_channels=[8, 8, 8]))  # fmt: skip
    assert model.check_input(torch.zeros(1, 1, 14, 49)) == (2, 7)
    with pytest.raises(ValueError, match="side of 56 pixels into 7, not a multiple of its 8"):
        model.check_input(torch.zeros(1, 1, 56, 28))


@pytest.mark.parametrize("stem", [[0], [8, -1], 8, [True], [12, 16]], ids=str)
def test_bad_stem_channels_are_refused_by_name(tiny_config, stem):
    with pytest.raises(ValueError, match="stem_channels"):
        VisionTransformer(tiny_config(stem_channels=stem))


# -- stochastic depth -----------------------------------------------------------------------


def test_drop_path_rates_rise_linearly_to_the_last_block(tiny_config):
    model = VisionTransformer(tiny_config(depth=5, drop_path_rate=0.2))
    expected = [0.0, 0.05, 0.1, 0.15, 0.2]
    assert [b.drop_path1.drop_prob for b in model.blocks] == pytest.approx(expected)
    assert [b.drop_path2.drop_prob for b in model.blocks] == pytest.approx(expected)


def test_drop_path_drops_whole_samples_and_keeps_the_mean():
    drop = DropPath(0.25).train()
    x = torch.ones(4000, 5, 3)
    out = drop(x)
    per_sample = out.flatten(1)
    kept = per_sample[:, 0] > 0
    # each sample is either dropped entirely or kept and scaled by 1 / keep probability
    assert torch.equal(per_sample[kept], torch.full_like(per_sample[kept], 1 / 0.75))
    assert torch.equal(per_sample[~kept], torch.zeros_like(per_sample[~kept]))
    assert abs(kept.float().mean().item() - 0.75) < 0.03  # ~4.5 standard deviations
    assert drop.eval()(x) is x
