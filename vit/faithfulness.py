"""Deletion and insertion curves (Petsiuk et al., "RISE", BMVC 2018), patch by patch.

Deletion replaces an image's patches with a baseline, most important first, and records
the target-class probability after each step: a faithful saliency map makes it fall fast
(low area under the curve). Insertion starts from the baseline and reveals the image's
patches in the same order: a faithful map makes it rise fast (high area).

Both curves use one baseline, so deletion ends on the image insertion starts from. RISE
inserts into a blurred copy of the image; pass a blurred image as the ``baseline`` tensor
to get that.

Shape glossary: B batch, C channels, H/W pixels, P patches, grid_h/grid_w.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from vit.rollout import select_target

BASELINES = ("mean", "zero")


def patch_order(maps: torch.Tensor) -> torch.Tensor:
    """Patch indices ``[B, grid_h * grid_w]``, most important first; ties keep row-major order."""
    if maps.ndim != 3:
        raise ValueError(f"maps must be [B, grid_h, grid_w], got shape {list(maps.shape)}")
    flat = maps.reshape(maps.shape[0], -1)  # B, P
    if not bool(torch.isfinite(flat).all()):
        raise ValueError("maps contain NaN or infinite values; cannot rank the patches")
    return torch.sort(flat, dim=1, descending=True, stable=True).indices


def random_order(
    num_images: int, num_patches: int, generator: torch.Generator | None = None
) -> torch.Tensor:
    """A uniformly random patch order per image, ``[num_images, num_patches]`` on the CPU."""
    return torch.rand(num_images, num_patches, generator=generator).argsort(dim=1)


def reveal_counts(num_patches: int, steps: int) -> torch.Tensor:
    """Patches deleted (or revealed) after step k = 0..steps: ``floor(k * P / steps)``."""
    if not 1 <= steps <= num_patches:
        raise ValueError(f"steps must be in [1, {num_patches}] (the patch count), got {steps}")
    return torch.arange(steps + 1) * num_patches // steps


def deletion_insertion_curves(
    model: Callable[[torch.Tensor], torch.Tensor],
    images: torch.Tensor,
    order: torch.Tensor,
    patch_size: int,
    steps: int | None = None,
    baseline: str | torch.Tensor = "mean",
    target: int | torch.Tensor | None = None,
    batch_size: int = 64,
) -> dict[str, torch.Tensor]:
    """Deletion and insertion curves of the target-class probability.

    Returns ``deletion`` and ``insertion`` ``[B, steps + 1]`` (softmax probability of the
    target class after each step; step 0 is the full image for deletion and the baseline
    for insertion), ``fractions`` ``[steps + 1]`` (share of patches changed, 0 to 1) and
    ``target`` ``[B]``. Runs under ``torch.no_grad``; the model's mode is left to the caller.

    Args:
        model: maps images ``[M, C, H, W]`` to logits ``[M, classes]``.
        images: ``[B, C, H, W]``, the model's input (already normalised).
        order: ``[B, P]`` patch indices, most important first (:func:`patch_order`),
            row-major over the ``(H / patch_size) x (W / patch_size)`` grid.
        steps: number of steps; None is one patch a step. Fewer steps move
            ``floor(k * P / steps)`` patches by step k (:func:`reveal_counts`).
        baseline: "mean" (each image's per-channel mean colour), "zero" (zeros in the
            model's input space: the dataset mean if inputs are normalised) or a tensor
            broadcastable to ``images`` (e.g. a blurred copy).
        target: class per sample; None takes the model's prediction on the full image.
        batch_size: images per model call; the ``2 * B * (steps + 1)`` curve images are
            built chunk by chunk, never all at once.
    """
    B, C, H, W = _check_images(images, patch_size)
    grid_h, grid_w = H // patch_size, W // patch_size
    P = grid_h * grid_w
    order = _check_order(order.to(images.device), (B, P))
    counts = reveal_counts(P, P if steps is None else steps).to(images.device)
    base = _make_baseline(images, baseline)
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")

    with torch.no_grad():
        # one extra call on the B full images fixes the target before the curves are built
        chosen = select_target(_call(model, images), target)
        rank = order.argsort(dim=1)  # B, P: position of each patch in the order
        S = counts.numel()
        probs = []
        pairs_per_call = max(1, batch_size // 2)  # each pair is a deleted and an inserted image
        for start in range(0, B * S, pairs_per_call):
            pair = torch.arange(start, min(start + pairs_per_call, B * S), device=images.device)
            b, k = pair // S, pair % S
            mask = rank[b] < counts[k][:, None]  # M, P: patches changed by step k
            mask = _upsample(mask.reshape(-1, 1, grid_h, grid_w), patch_size)  # M, 1, H, W
            deleted = torch.where(mask, base[b], images[b])
            inserted = torch.where(mask, images[b], base[b])
            logits = _call(model, torch.cat([deleted, inserted]))
            p = logits.float().softmax(dim=-1).gather(1, chosen[b].repeat(2)[:, None])
            probs.append(p.reshape(2, -1))  # 2, M
    probs = torch.cat(probs, dim=1).reshape(2, B, S)
    fractions = counts.float() / P
    return {"deletion": probs[0], "insertion": probs[1], "fractions": fractions, "target": chosen}


def area_under_curve(curve: torch.Tensor, fractions: torch.Tensor) -> torch.Tensor:
    """Trapezoid area under ``curve`` ``[B, S]`` (or ``[S]``) over ``fractions`` ``[S]``."""
    if fractions.ndim != 1 or fractions.numel() < 2:
        raise ValueError(f"fractions must be 1-D with 2+ points, got {list(fractions.shape)}")
    if curve.shape[-1] != fractions.numel():
        raise ValueError(
            f"curve has {curve.shape[-1]} points but fractions has {fractions.numel()}"
        )
    return torch.trapezoid(curve, fractions.to(curve), dim=-1)


def _call(model: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    logits = model(x)
    if not isinstance(logits, torch.Tensor) or logits.ndim != 2 or logits.shape[0] != len(x):
        shape = list(logits.shape) if isinstance(logits, torch.Tensor) else type(logits)
        raise ValueError(f"model must return logits [{len(x)}, classes], got {shape}")
    return logits


def _upsample(mask: torch.Tensor, patch_size: int) -> torch.Tensor:
    """Each grid cell of ``[M, 1, grid_h, grid_w]`` to a patch_size x patch_size block."""
    return mask.repeat_interleave(patch_size, dim=2).repeat_interleave(patch_size, dim=3)


def _make_baseline(images: torch.Tensor, baseline: str | torch.Tensor) -> torch.Tensor:
    if isinstance(baseline, str):
        if baseline == "mean":
            return images.mean(dim=(2, 3), keepdim=True).expand_as(images)
        if baseline == "zero":
            return torch.zeros_like(images)
        raise ValueError(f"baseline must be one of {BASELINES} or a tensor, got {baseline!r}")
    try:
        return torch.broadcast_to(baseline.to(images), images.shape)
    except RuntimeError as err:
        raise ValueError(
            f"baseline of shape {list(baseline.shape)} does not broadcast to the images "
            f"{list(images.shape)}"
        ) from err


def _check_images(images: torch.Tensor, patch_size: int) -> tuple[int, int, int, int]:
    if images.ndim != 4:
        raise ValueError(f"images must be [B, C, H, W], got shape {list(images.shape)}")
    B, C, H, W = images.shape
    if patch_size < 1 or H % patch_size or W % patch_size:
        raise ValueError(f"image size {H}x{W} is not a multiple of the patch size {patch_size}")
    return B, C, H, W


def _check_order(order: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    B, P = shape
    if order.shape != (B, P):
        raise ValueError(f"order must be [B, P] = [{B}, {P}], got {list(order.shape)}")
    if order.dtype.is_floating_point or order.dtype == torch.bool:
        raise ValueError(f"order must hold integer patch indices, got dtype {order.dtype}")
    expected = torch.arange(P, device=order.device).expand(B, P)
    if not torch.equal(order.sort(dim=1).values, expected):
        raise ValueError(f"each row of order must be a permutation of 0..{P - 1}")
    return order.long()
