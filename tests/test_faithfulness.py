"""Deletion/insertion curves against an explicit loop, known answers and a toy model."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn as nn

from vit import create_model
from vit.faithfulness import (
    area_under_curve,
    deletion_insertion_curves,
    patch_order,
    random_order,
    reveal_counts,
)

PATCH = 2
GRID = (4, 6)  # non-square on purpose: 8 x 12 pixel images
P = GRID[0] * GRID[1]


class PatchReader(nn.Module):
    """Class 0's logit sums the pixels of a few patches; every other patch is ignored."""

    def __init__(self, patches: list[int], weights: list[float]):
        super().__init__()
        self.patches = patches
        self.register_buffer("weights", torch.tensor(weights))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B = x.shape[0]
        cells = x.sum(1).reshape(B, GRID[0], PATCH, GRID[1], PATCH).sum(dim=(2, 4))
        score = (cells.reshape(B, P)[:, self.patches] * self.weights).sum(dim=1) - 4.0
        return torch.stack([score, torch.zeros_like(score)], dim=1)  # B, 2


def toy_images(batch=4, chans=2, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return 0.5 + 0.5 * torch.rand(batch, chans, GRID[0] * PATCH, GRID[1] * PATCH, generator=gen)


def linear_model(chans=2, classes=5, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Flatten(), nn.Linear(chans * GRID[0] * PATCH * GRID[1] * PATCH, classes)
    )


def reference_curves(model, x, order, base, steps, target):
    """Build every curve image by copying patches one at a time; no batching, no masks."""
    B = x.shape[0]
    deletion, insertion = np.zeros((B, steps + 1)), np.zeros((B, steps + 1))
    for b in range(B):
        for k in range(steps + 1):
            deleted, inserted = x[b].clone(), base[b].clone()
            for i in order[b, : k * P // steps].tolist():
                r, c = divmod(i, GRID[1])
                rows, cols = slice(r * PATCH, (r + 1) * PATCH), slice(c * PATCH, (c + 1) * PATCH)
                deleted[:, rows, cols] = base[b, :, rows, cols]
                inserted[:, rows, cols] = x[b, :, rows, cols]
            with torch.no_grad():
                probs = model(torch.stack([deleted, inserted])).softmax(dim=-1)[:, target[b]]
            deletion[b, k], insertion[b, k] = probs.tolist()
    return deletion, insertion


def test_patch_order_known_answer_and_stable_ties():
    maps = torch.tensor([[[1.0, 3.0], [3.0, 0.0]], [[0.0, 0.0], [0.0, 2.0]]])
    assert patch_order(maps).tolist() == [[1, 2, 0, 3], [3, 0, 1, 2]]
    rng = np.random.default_rng(0)
    maps = torch.from_numpy(rng.integers(0, 4, size=(5, 3, 7)).astype(np.float32))
    want = np.argsort(-maps.reshape(5, -1).numpy(), axis=1, kind="stable")
    assert patch_order(maps).tolist() == want.tolist()
    with pytest.raises(ValueError, match="NaN"):
        patch_order(torch.full((1, 2, 2), float("nan")))


def test_random_order_is_a_reproducible_permutation():
    a = random_order(6, 24, torch.Generator().manual_seed(1))
    b = random_order(6, 24, torch.Generator().manual_seed(1))
    assert torch.equal(a, b)
    assert torch.equal(a.sort(dim=1).values, torch.arange(24).expand(6, 24))
    assert not torch.equal(a[0], a[1])


def test_reveal_counts():
    assert reveal_counts(24, 24).tolist() == list(range(25))
    assert reveal_counts(24, 5).tolist() == [0, 4, 9, 14, 19, 24]
    with pytest.raises(ValueError, match="steps"):
        reveal_counts(24, 25)


@pytest.mark.parametrize("baseline", ["mean", "zero", "tensor"])
def test_curves_match_explicit_loop(baseline):
    model, x = linear_model(), toy_images()
    base = {
        "mean": x.mean(dim=(2, 3), keepdim=True).expand_as(x),
        "zero": torch.zeros_like(x),
        "tensor": torch.rand(x.shape, generator=torch.Generator().manual_seed(5)),
    }[baseline]
    order = random_order(4, P, torch.Generator().manual_seed(2))
    target = torch.tensor([0, 3, 1, 4])
    got = deletion_insertion_curves(
        model,
        x,
        order,
        PATCH,
        steps=5,
        baseline=base if baseline == "tensor" else baseline,
        target=target,
        batch_size=7,
    )
    want_del, want_ins = reference_curves(model, x, order, base, 5, target)
    np.testing.assert_allclose(got["deletion"].numpy(), want_del, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got["insertion"].numpy(), want_ins, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got["fractions"].numpy(), [0, 4 / 24, 9 / 24, 14 / 24, 19 / 24, 1])


def test_curve_endpoints_are_original_and_baseline():
    model, x = linear_model(seed=1), toy_images(seed=1)
    order = random_order(4, P, torch.Generator().manual_seed(3))
    got = deletion_insertion_curves(model, x, order, PATCH, baseline="zero")
    assert got["deletion"].shape == got["insertion"].shape == (4, P + 1)
    with torch.no_grad():
        full = model(x).softmax(dim=-1)
        empty = model(torch.zeros_like(x)).softmax(dim=-1)
    target = full.argmax(dim=1)  # default target: the prediction on the full image
    assert torch.equal(got["target"], target)
    rows = torch.arange(4)
    torch.testing.assert_close(got["deletion"][:, 0], full[rows, target])
    torch.testing.assert_close(got["insertion"][:, -1], full[rows, target])
    torch.testing.assert_close(got["deletion"][:, -1], empty[rows, target])
    torch.testing.assert_close(got["insertion"][:, 0], empty[rows, target])


def test_batch_size_does_not_change_the_curves():
    model, x = linear_model(seed=2), toy_images(batch=3)
    order = random_order(3, P, torch.Generator().manual_seed(4))
    runs = [deletion_insertion_curves(model, x, order, PATCH, batch_size=n) for n in (1, 5, 1000)]
    for run in runs[1:]:
        torch.testing.assert_close(run["deletion"], runs[0]["deletion"])
        torch.testing.assert_close(run["insertion"], runs[0]["insertion"])


def test_right_order_beats_random_order():
    important, weights = [0, 7, 17, 22], [1.0, 0.8, 0.6, 0.4]
    model, x = PatchReader(important, weights), toy_images(batch=3)
    saliency = torch.zeros(3, P)
    saliency[:, important] = torch.tensor(weights)
    right = patch_order(saliency.reshape(3, *GRID))
    assert right[:, :4].tolist() == [important] * 3
    wrong = right.flip(dims=[1])  # the important patches last

    def aucs(order):
        c = deletion_insertion_curves(model, x, order, PATCH, baseline="zero", target=0)
        return area_under_curve(c["deletion"], c["fractions"]), area_under_curve(
            c["insertion"], c["fractions"]
        )

    del_right, ins_right = aucs(right)
    del_wrong, ins_wrong = aucs(wrong)
    for seed in range(3):
        del_rand, ins_rand = aucs(random_order(3, P, torch.Generator().manual_seed(seed)))
        assert bool((del_right < del_rand).all()) and bool((del_rand < del_wrong).all())
        assert bool((ins_right > ins_rand).all()) and bool((ins_rand > ins_wrong).all())


def test_curves_with_a_vit_on_a_non_square_image():
    torch.manual_seed(0)
    model = create_model("vit_mini_patch4_28", depth=1, embed_dim=16, num_heads=2).eval()
    x = torch.randn(2, 1, 28, 40, generator=torch.Generator().manual_seed(0))
    order = random_order(2, 70, torch.Generator().manual_seed(0))
    got = deletion_insertion_curves(model, x, order, 4, steps=7, target=3)
    assert got["deletion"].shape == (2, 8) and got["fractions"].shape == (8,)
    assert got["target"].tolist() == [3, 3]
    with torch.no_grad():
        full = model(x).softmax(dim=-1)[:, 3]
    torch.testing.assert_close(got["deletion"][:, 0], full)
    torch.testing.assert_close(got["insertion"][:, -1], full)


def test_curve_validation():
    model, x = linear_model(), toy_images(batch=2)
    order = random_order(2, P)
    with pytest.raises(ValueError, match="multiple of the patch size"):
        deletion_insertion_curves(model, x, order, 5)
    with pytest.raises(ValueError, match=r"\[2, 24\]"):
        deletion_insertion_curves(model, x, order[:, :10], PATCH)
    with pytest.raises(ValueError, match="permutation"):
        deletion_insertion_curves(model, x, torch.zeros(2, P, dtype=torch.long), PATCH)
    with pytest.raises(ValueError, match="integer"):
        deletion_insertion_curves(model, x, order.float(), PATCH)
    with pytest.raises(ValueError, match="steps"):
        deletion_insertion_curves(model, x, order, PATCH, steps=0)
    with pytest.raises(ValueError, match="baseline"):
        deletion_insertion_curves(model, x, order, PATCH, baseline="blur")
    with pytest.raises(ValueError, match="broadcast"):
        deletion_insertion_curves(model, x, order, PATCH, baseline=torch.zeros(3, 8, 12))
    with pytest.raises(ValueError, match="out of range"):
        deletion_insertion_curves(model, x, order, PATCH, target=9)


def test_area_under_curve_matches_numpy():
    rng = np.random.default_rng(0)
    fractions = np.sort(np.concatenate([[0.0, 1.0], rng.random(6)]))  # uneven spacing
    curves = rng.random((4, 8))
    got = area_under_curve(torch.from_numpy(curves), torch.from_numpy(fractions))
    np.testing.assert_allclose(got.numpy(), np.trapezoid(curves, fractions, axis=-1))
    one = area_under_curve(torch.from_numpy(curves[0]), torch.from_numpy(fractions))
    np.testing.assert_allclose(one.item(), np.trapezoid(curves[0], fractions))
    with pytest.raises(ValueError, match="points"):
        area_under_curve(torch.zeros(2, 5), torch.linspace(0, 1, 4))
