"""Attention rollout against a loop-by-loop NumPy reference, known answers and the model."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from vit import create_model
from vit.rollout import (
    attention_rollout,
    attentions_and_gradients,
    cls_map,
    discard_lowest,
    fuse_heads,
    gradient_rollout,
    rollout_maps,
    select_target,
)


def reference_rollout(attns, fusion="mean", discard=0.0, prefix=1, grads=None):
    """The paper's recursion for one sample, with plain loops; attns[l] is [heads, N, N]."""
    N = attns[0].shape[-1]
    result = np.eye(N)
    for layer, a in enumerate(attns):
        if grads is not None:
            w = (a * np.maximum(grads[layer], 0.0)).mean(axis=0)
        else:
            w = {"mean": a.mean(axis=0), "max": a.max(axis=0), "min": a.min(axis=0)}[fusion]
        w = w.copy()
        # candidates: the patch-to-patch block; ties go in row-major order
        candidates = [(w[i, j], i, j) for i in range(prefix, N) for j in range(prefix, N)]
        for _, i, j in sorted(candidates)[: int(discard * len(candidates))]:
            w[i, j] = 0.0
        a_hat = w + np.eye(N)
        for i in range(N):
            a_hat[i] = a_hat[i] / a_hat[i].sum()
        result = a_hat @ result
    return result


def random_attentions(layers=3, batch=3, heads=4, tokens=10, seed=0, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(layers):
        a = torch.rand(batch, heads, tokens, tokens, generator=gen, dtype=torch.float64)
        out.append((a / a.sum(dim=-1, keepdim=True)).to(dtype))  # row-stochastic
    return out


@pytest.mark.parametrize("fusion", ["mean", "max", "min"])
@pytest.mark.parametrize("discard", [0.0, 0.5])
def test_rollout_matches_numpy_reference(fusion, discard):
    attns = random_attentions()
    got = attention_rollout(attns, head_fusion=fusion, discard_ratio=discard)
    assert got.dtype == torch.float64
    for b in range(got.shape[0]):
        want = reference_rollout([a[b].numpy() for a in attns], fusion, discard)
        np.testing.assert_allclose(got[b].numpy(), want, rtol=1e-12, atol=1e-14)


def test_rollout_reference_with_two_prefix_tokens():
    attns = random_attentions(seed=1, tokens=11)
    got = attention_rollout(attns, "max", discard_ratio=0.7, num_prefix_tokens=2)
    for b in range(got.shape[0]):
        want = reference_rollout([a[b].numpy() for a in attns], "max", 0.7, prefix=2)
        np.testing.assert_allclose(got[b].numpy(), want, rtol=1e-12, atol=1e-14)


def test_gradient_rollout_matches_numpy_reference():
    attns = random_attentions(seed=2)
    gen = torch.Generator().manual_seed(3)
    grads = [torch.randn(a.shape, generator=gen, dtype=torch.float64) for a in attns]
    for discard in (0.0, 0.5):
        got = gradient_rollout(attns, grads, discard_ratio=discard)
        for b in range(got.shape[0]):
            want = reference_rollout(
                [a[b].numpy() for a in attns],
                discard=discard,
                grads=[g[b].numpy() for g in grads],
            )
            np.testing.assert_allclose(got[b].numpy(), want, rtol=1e-12, atol=1e-14)


def test_discard_known_answer():
    # N = 3 with one cls token: the candidates are the 2x2 patch block [[.5, .1], [.3, .2]]
    fused = torch.tensor([[[0.0, 0.05, 0.01], [0.2, 0.5, 0.1], [0.4, 0.3, 0.2]]])
    want = torch.tensor([[[0.0, 0.05, 0.01], [0.2, 0.5, 0.0], [0.4, 0.3, 0.0]]])
    torch.testing.assert_close(discard_lowest(fused, 0.5), want, rtol=0, atol=0)
    # 0.6 * 4 = 2.4 rounds down to two entries as well
    torch.testing.assert_close(discard_lowest(fused, 0.6), want, rtol=0, atol=0)
    assert torch.equal(discard_lowest(fused, 0.2), fused)  # floor(0.8) = 0 entries


def test_discard_breaks_ties_in_row_major_order():
    fused = torch.ones(1, 3, 3)
    got = discard_lowest(fused, 0.5)  # two of four equal candidates: (1, 1) and (1, 2)
    want = torch.tensor([[[1.0, 1, 1], [1, 0, 0], [1, 1, 1]]])
    assert torch.equal(got, want)


def test_fuse_heads_known_answer():
    attn = torch.tensor([[[[1.0, 0.0], [0.5, 0.5]], [[0.0, 1.0], [0.25, 0.75]]]])
    torch.testing.assert_close(
        fuse_heads(attn, "mean"), torch.tensor([[[0.5, 0.5], [0.375, 0.625]]])
    )
    torch.testing.assert_close(fuse_heads(attn, "max"), torch.tensor([[[1.0, 1.0], [0.5, 0.75]]]))
    torch.testing.assert_close(fuse_heads(attn, "min"), torch.tensor([[[0.0, 0.0], [0.25, 0.5]]]))


@pytest.mark.parametrize("fusion,discard", [("mean", 0.0), ("max", 0.9), ("min", 0.5)])
def test_rollout_rows_sum_to_one(fusion, discard):
    attns = random_attentions(layers=6, tokens=17, dtype=torch.float32, seed=4)
    got = attention_rollout(attns, fusion, discard)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.sum(dim=-1), torch.ones(3, 17), rtol=0, atol=1e-5)
    assert bool((got >= 0).all())


def test_gradient_rollout_rows_sum_to_one_even_when_all_gradients_negative():
    attns = random_attentions(dtype=torch.float32)
    grads = [-torch.rand_like(a) for a in attns]  # every layer fuses to zero
    got = gradient_rollout(attns, grads, discard_ratio=0.5)
    torch.testing.assert_close(got, torch.eye(10).expand(3, 10, 10))


@pytest.mark.parametrize("fusion,discard", [("mean", 0.0), ("max", 0.5)])
def test_batch_equals_samples_one_by_one(fusion, discard):
    attns = random_attentions(layers=4, batch=5, tokens=13, dtype=torch.float32, seed=5)
    batch = attention_rollout(attns, fusion, discard)
    for b in range(5):
        alone = attention_rollout([a[b : b + 1] for a in attns], fusion, discard)
        torch.testing.assert_close(batch[b : b + 1], alone, rtol=0, atol=1e-6)


def test_identity_attention_gives_identity():
    eye = torch.eye(9).expand(2, 3, 9, 9)
    for fusion in ("mean", "max", "min"):
        got = attention_rollout([eye] * 4, fusion, discard_ratio=0.5)
        torch.testing.assert_close(got, torch.eye(9).expand(2, 9, 9))


@pytest.mark.parametrize("layers", [1, 2, 5])
def test_uniform_attention_closed_form(layers):
    # U = J / N is idempotent, so ((U + I) / 2)^L = U + 2^-L (I - U)
    N = 7
    uniform = torch.full((2, 3, N, N), 1.0 / N, dtype=torch.float64)
    got = attention_rollout([uniform] * layers)
    U = torch.full((N, N), 1.0 / N, dtype=torch.float64)
    want = U + 2.0**-layers * (torch.eye(N, dtype=torch.float64) - U)
    torch.testing.assert_close(got, want.expand(2, N, N), rtol=0, atol=1e-12)


def test_cls_map_known_answer_non_square_grid():
    # N = 1 + 2 x 3 patches; cls row over patches = [1, 2, 3, 4, 5, 8]
    rollout = torch.zeros(2, 7, 7)
    rollout[0, 0] = torch.tensor([9.0, 1, 2, 3, 4, 5, 8])
    rollout[1, 1, 1] = 1.0  # sample 1 has an all-zero cls row over the patches
    got = cls_map(rollout, (2, 3))
    want0 = torch.tensor([[1.0, 2, 3], [4, 5, 8]]) / 8
    torch.testing.assert_close(got[0], want0)
    assert torch.equal(got[1], torch.zeros(2, 3))
    with pytest.raises(ValueError, match="N=7"):
        cls_map(rollout, (3, 3))


def test_input_validation():
    attns = random_attentions(dtype=torch.float32)
    with pytest.raises(ValueError, match="empty"):
        attention_rollout([])
    with pytest.raises(ValueError, match=r"attentions\[1\]"):
        attention_rollout([attns[0], attns[1][:, :, :5, :5]])
    with pytest.raises(ValueError, match=r"attentions\[2\]"):
        attention_rollout([attns[0], attns[1], attns[2][:2]])
    with pytest.raises(ValueError, match=r"attentions\[0\]"):
        attention_rollout([attns[0][:, :, :4]])
    with pytest.raises(ValueError, match="head_fusion"):
        attention_rollout(attns, head_fusion="median")
    for bad in (1.0, -0.1, 1.5):
        with pytest.raises(ValueError, match="discard_ratio"):
            attention_rollout(attns, discard_ratio=bad)
    with pytest.raises(ValueError, match="num_prefix_tokens"):
        attention_rollout(attns, num_prefix_tokens=10)
    with pytest.raises(ValueError, match="gradient layers"):
        gradient_rollout(attns, attns[:2])
    with pytest.raises(ValueError, match=r"gradients\[0\]"):
        gradient_rollout(attns, [a[:, :2] for a in attns])


def test_select_target():
    logits = torch.tensor([[0.0, 3.0, 1.0], [2.0, 0.0, 1.0]])
    assert select_target(logits, None).tolist() == [1, 0]
    assert select_target(logits, 2).tolist() == [2, 2]
    assert select_target(logits, torch.tensor([0, 2])).tolist() == [0, 2]
    with pytest.raises(ValueError, match="out of range"):
        select_target(logits, 3)
    with pytest.raises(ValueError, match="target"):
        select_target(logits, torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="integer"):
        select_target(logits, torch.tensor([0.0, 1.0]))


# --- with a tiny model ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    net = create_model("vit_mini_patch4_28", depth=2, embed_dim=32, num_heads=2)
    with torch.no_grad():  # sharper attention than the near-uniform initial one
        for block in net.blocks:
            block.attn.qkv.weight.mul_(10)
        net.head.weight.mul_(50)
    return net.eval()


def images(batch, height=28, width=28, seed=0):
    return torch.randn(batch, 1, height, width, generator=torch.Generator().manual_seed(seed))


def explicit_attentions(net, x):
    """Recompute each block's attention from its input with hooks, by the textbook formula."""
    captured = []

    def hook(module, args, output):
        t = args[0]  # B, N, C after norm1
        B, N, C = t.shape
        heads = module.num_heads
        qkv = F.linear(t, module.qkv.weight, module.qkv.bias).reshape(B, N, 3, heads, -1)
        q, k = qkv[:, :, 0].transpose(1, 2), qkv[:, :, 1].transpose(1, 2)  # B, heads, N, d
        scores = q @ k.transpose(-2, -1) / (C // heads) ** 0.5
        captured.append(scores.softmax(dim=-1))

    handles = [block.attn.register_forward_hook(hook) for block in net.blocks]
    try:
        with torch.no_grad():
            logits = net(x)  # the fused-kernel path
    finally:
        for h in handles:
            h.remove()
    return logits, captured


def test_model_maps_match_explicit_recomputation(model):
    x = images(3)
    fast_logits, attns = explicit_attentions(model, x)
    for fusion, discard in (("mean", 0.0), ("max", 0.5)):
        maps, logits = rollout_maps(model, x, head_fusion=fusion, discard_ratio=discard)
        want = cls_map(attention_rollout(attns, fusion, discard), (7, 7))
        torch.testing.assert_close(maps, want, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(logits, fast_logits, rtol=1e-4, atol=1e-4)
        assert maps.shape == (3, 7, 7)
        torch.testing.assert_close(maps.amax(dim=(1, 2)), torch.ones(3))


@pytest.mark.parametrize("method", ["rollout", "gradient"])
@pytest.mark.parametrize("size", [(28, 28), (28, 40), (36, 36)])
def test_model_batch_equals_per_sample_any_size(model, method, size):
    x = images(3, *size, seed=1)
    maps, logits = rollout_maps(model, x, method=method, discard_ratio=0.3)
    assert maps.shape == (3, size[0] // 4, size[1] // 4)
    assert logits.shape == (3, 10)
    for b in range(3):
        alone, _ = rollout_maps(model, x[b : b + 1], method=method, discard_ratio=0.3)
        torch.testing.assert_close(maps[b : b + 1], alone, rtol=1e-4, atol=1e-5)


def test_gradients_match_single_sample_autograd(model):
    x = images(3, seed=2)
    target = torch.tensor([4, 0, 9])
    logits, attns, grads = attentions_and_gradients(model, x, target)
    assert len(grads) == 2 and grads[0].shape == (3, 2, 50, 50)
    assert not logits.requires_grad and not grads[0].requires_grad
    for b in range(3):
        xb = x[b : b + 1].clone().requires_grad_(True)
        lb, ab = model(xb, return_attention=True)
        want = torch.autograd.grad(lb[0, target[b]], ab)
        for layer in range(2):
            torch.testing.assert_close(grads[layer][b : b + 1], want[layer])
            torch.testing.assert_close(attns[layer][b : b + 1], ab[layer].detach())


def test_gradient_matches_finite_differences(model):
    # perturb one layer's attention where it is used (after attn_drop, identity in eval)
    x = images(1, seed=3)
    _, _, grads = attentions_and_gradients(model, x, target=2)
    direction = torch.randn(1, 2, 50, 50, generator=torch.Generator().manual_seed(4))
    eps = 1e-2
    for layer in range(2):
        dropout = model.blocks[layer].attn.attn_drop

        def logit_with(shift, dropout=dropout):
            handle = dropout.register_forward_hook(lambda m, a, out: out + shift * direction)
            try:
                with torch.no_grad():
                    return model(x, return_attention=True)[0][0, 2].double()
            finally:
                handle.remove()

        numeric = (logit_with(eps) - logit_with(-eps)) / (2 * eps)
        analytic = (grads[layer].double() * direction).sum()
        assert abs(analytic) > 1e-2  # the check would be empty otherwise
        torch.testing.assert_close(analytic, numeric, rtol=2e-2, atol=1e-3)


def test_gradients_with_frozen_parameters_write_no_grad():
    torch.manual_seed(1)
    net = create_model("vit_mini_patch4_28", depth=2, embed_dim=32, num_heads=2).eval()
    for p in net.parameters():
        p.requires_grad_(False)
    logits, _, grads = attentions_and_gradients(net, images(2))
    assert all(g.abs().sum() > 0 for g in grads)
    assert all(p.grad is None for p in net.parameters())
    # the default target is the predicted class
    _, _, grads_argmax = attentions_and_gradients(net, images(2), logits.argmax(dim=1))
    for g, h in zip(grads, grads_argmax):
        torch.testing.assert_close(g, h)


def test_rollout_maps_validation(model):
    x = images(1)
    with pytest.raises(ValueError, match="method"):
        rollout_maps(model, x, method="lrp")
    with pytest.raises(ValueError, match="head_fusion"):
        rollout_maps(model, x, method="gradient", head_fusion="max")
    with pytest.raises(ValueError, match="target"):
        rollout_maps(model, x, target=1)
    with pytest.raises(ValueError, match="multiple of the patch size"):
        rollout_maps(model, images(1, 30, 28))
