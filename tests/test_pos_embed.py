"""Position-embedding resizing: identity, exact grids, prefix tokens, known answers, timm."""

from __future__ import annotations

import pytest
import torch
from timm.layers import resample_abs_pos_embed

from vit import resize_pos_embed

C = 16  # channels of the test embeddings


def _pos_embed(grid: tuple[int, int], prefix: int = 1) -> torch.Tensor:
    return torch.randn(1, prefix + grid[0] * grid[1], C)  # 1, N, C


def _as_grid(pos_embed: torch.Tensor, grid: tuple[int, int], prefix: int = 1) -> torch.Tensor:
    return pos_embed[0, prefix:].reshape(grid[0], grid[1], -1)  # grid_h, grid_w, C


@pytest.mark.parametrize("grid", [(4, 4), (3, 5), (1, 1), (14, 14)], ids=str)
def test_same_grid_returns_the_input_itself(grid):
    pos_embed = _pos_embed(grid)
    out = resize_pos_embed(pos_embed, grid, old_grid=grid)
    assert out is pos_embed
    if grid[0] == grid[1]:  # the old grid can be inferred for a square
        assert resize_pos_embed(pos_embed, grid) is pos_embed


NEW_GRIDS = [(1, 1), (2, 3), (7, 13), (13, 7), (9, 9), (20, 20), (61, 61)]


@pytest.mark.parametrize("new_grid", NEW_GRIDS, ids=str)
@pytest.mark.parametrize("old_grid", [(4, 4), (14, 14), (3, 5)], ids=str)
def test_resize_gives_the_exact_grid_and_agrees_with_timm(old_grid, new_grid):
    pos_embed = _pos_embed(old_grid)
    out = resize_pos_embed(pos_embed, new_grid, old_grid=old_grid)
    assert out.shape == (1, 1 + new_grid[0] * new_grid[1], C)
    ref = resample_abs_pos_embed(pos_embed, new_size=new_grid, old_size=old_grid)
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=0)


@pytest.mark.parametrize("prefix", [0, 1, 4])
def test_prefix_tokens_pass_through_untouched(prefix):
    pos_embed = _pos_embed((6, 6), prefix=prefix)
    out = resize_pos_embed(pos_embed, (7, 13), num_prefix_tokens=prefix)
    assert out.shape == (1, prefix + 7 * 13, C)
    assert torch.equal(out[:, :prefix], pos_embed[:, :prefix])
    ref = resample_abs_pos_embed(pos_embed, new_size=(7, 13), num_prefix_tokens=prefix)
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=0)


def test_rows_stay_rows_and_columns_stay_columns():
    # channel 0 holds the row index, channel 1 the column index; a transposed reshape
    # anywhere would mix them on a non-square grid
    old = (3, 5)
    rows, cols = torch.meshgrid(
        torch.arange(old[0], dtype=torch.float32),
        torch.arange(old[1], dtype=torch.float32),
        indexing="ij",
    )
    grid = torch.stack([rows, cols], dim=-1)  # grid_h, grid_w, 2
    pos_embed = torch.cat([torch.zeros(1, 1, 2), grid.reshape(1, -1, 2)], dim=1)
    new = (7, 13)
    out = _as_grid(resize_pos_embed(pos_embed, new, old_grid=old), new)
    row_part, col_part = out[..., 0], out[..., 1]
    # each part is constant across the other axis and rises along its own
    torch.testing.assert_close(row_part, row_part[:, :1].expand(new), atol=1e-5, rtol=0)
    torch.testing.assert_close(col_part, col_part[:1].expand(new), atol=1e-5, rtol=0)
    assert (row_part[1:, 0] >= row_part[:-1, 0]).all() and row_part[-1, 0] > row_part[0, 0]
    assert (col_part[0, 1:] >= col_part[0, :-1]).all() and col_part[0, -1] > col_part[0, 0]


def _bilinear_ramp(n_old: int, n_new: int) -> torch.Tensor:
    """Bilinear resampling of the ramp 0, 1, ..., n_old - 1, worked out by hand.

    With half-pixel centres, new sample i sits at old coordinate (i + 0.5) * n_old / n_new
    - 0.5; on a ramp the value is that coordinate, clamped to the ends of the ramp.
    """
    i = torch.arange(n_new, dtype=torch.float64)
    return ((i + 0.5) * n_old / n_new - 0.5).clamp(0, n_old - 1)


@pytest.mark.parametrize("old, new", [((4, 6), (9, 15)), ((5, 5), (61, 61)), ((2, 3), (7, 13))])
def test_bilinear_upsampling_of_a_ramp_is_the_known_answer(old, new):
    ramp = torch.arange(old[1], dtype=torch.float32).expand(old[0], old[1])  # grid_h, grid_w
    pos_embed = torch.cat([torch.zeros(1, 1, 1), ramp.reshape(1, -1, 1)], dim=1)
    out = resize_pos_embed(pos_embed, new, old_grid=old, mode="bilinear", antialias=False)
    expected = _bilinear_ramp(old[1], new[1]).float().expand(new)
    torch.testing.assert_close(_as_grid(out, new)[..., 0], expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("new_grid", [(2, 2), (5, 9), (30, 30)], ids=str)
def test_a_constant_embedding_stays_constant(new_grid):
    # interpolation weights sum to one, with or without antialiasing
    pos_embed = torch.full((1, 1 + 8 * 8, C), 0.25)
    out = resize_pos_embed(pos_embed, new_grid)
    torch.testing.assert_close(out, torch.full_like(out, 0.25), atol=1e-6, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_keeps_its_dtype_and_matches_float32(dtype):
    pos_embed = _pos_embed((8, 8))
    out = resize_pos_embed(pos_embed.to(dtype), (11, 5))
    assert out.dtype == dtype
    ref = resize_pos_embed(pos_embed, (11, 5))
    torch.testing.assert_close(out.float(), ref, atol=0.05, rtol=0.02)


def test_gradients_flow_through_the_resize():
    pos_embed = _pos_embed((4, 4)).requires_grad_()
    resize_pos_embed(pos_embed, (7, 3)).square().sum().backward()
    assert pos_embed.grad is not None
    assert (pos_embed.grad[0].abs().sum(dim=-1) > 0).all()  # every token, cls included


def test_a_non_square_embedding_needs_its_grid():
    pos_embed = _pos_embed((3, 5))
    with pytest.raises(ValueError, match="15 patch tokens.*not a square"):
        resize_pos_embed(pos_embed, (4, 4))


def test_a_wrong_old_grid_is_named():
    pos_embed = _pos_embed((4, 4))
    with pytest.raises(ValueError, match=r"old grid \(3, 5\) does not match the 16 patch"):
        resize_pos_embed(pos_embed, (4, 4), old_grid=(3, 5))


def test_model_uses_its_own_embedding_at_the_built_grid(tiny_vit):
    model = tiny_vit()
    assert model.pos_embed_for(model.grid_size) is model.pos_embed
    resized = model.pos_embed_for((7, 13))
    assert resized.shape == (1, 1 + 7 * 13, model.cfg.embed_dim)
    assert torch.equal(resized[:, :1], model.pos_embed[:, :1])
