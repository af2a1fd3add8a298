"""Attention rollout (Abnar & Zuidema, "Quantifying Attention Flow in Transformers", ACL 2020).

Rollout follows attention through the layers: each layer's head-fused attention ``W`` gets
the residual path added, ``A = normalise_rows(W + I)``, and the layers are multiplied in
order, ``R = A_L @ ... @ A_1``. Row ``i`` of ``R`` says how much each input token flows
into token ``i`` at the top; the cls row over the patch tokens is the saliency map.

For row-stochastic ``W`` this is the paper's ``0.5 W + 0.5 I``. With ``max``/``min`` head
fusion or discarding, rows of ``W`` no longer sum to one and the renormalisation makes each
``A`` row-stochastic again, so ``R`` is row-stochastic too.

The gradient variant is class-specific: each head's attention is weighted by the positive
part of the gradient of the target logit with respect to it, then the heads are averaged.
As attention is non-negative, ``mean_h(attn * relu(grad))`` equals the head fusion
``E_h[(grad * attn)^+]`` of Chefer, Gur & Wolf ("Generic Attention-model Explainability",
ICCV 2021); the layers are then combined as in rollout, not by their update rule.

Shape glossary: B batch, N tokens, heads, grid_h/grid_w.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
import torch.nn as nn

HEAD_FUSIONS = ("mean", "max", "min")
METHODS = ("rollout", "gradient")


def fuse_heads(attn: torch.Tensor, head_fusion: str = "mean") -> torch.Tensor:
    """Fuse the heads of one layer's attention ``[B, heads, N, N]`` into ``[B, N, N]``."""
    if attn.ndim != 4:
        raise ValueError(f"attention must be [B, heads, N, N], got shape {list(attn.shape)}")
    _check_head_fusion(head_fusion)
    if head_fusion == "mean":
        return attn.mean(dim=1)
    if head_fusion == "max":
        return attn.amax(dim=1)
    return attn.amin(dim=1)


def discard_lowest(
    fused: torch.Tensor, discard_ratio: float, num_prefix_tokens: int = 1
) -> torch.Tensor:
    """Zero the lowest ``discard_ratio`` fraction of each sample's patch-to-patch weights.

    The candidates are the entries ``(i, j)`` with both ``i >= num_prefix_tokens`` and
    ``j >= num_prefix_tokens``: the ``(N - P)^2`` patch-to-patch block, diagonal included.
    Entries in a prefix-token (cls) row or column are never touched. For each sample the
    ``floor(discard_ratio * (N - P)^2)`` smallest candidates are zeroed; ties are broken by
    row-major position (the earlier entry goes first). Returns a new tensor.
    """
    B, N, _ = fused.shape
    P = num_prefix_tokens
    block = fused[:, P:, P:].reshape(B, -1)  # B, (N - P)^2
    k = int(discard_ratio * block.shape[1])
    if k == 0:
        return fused
    lowest = block.argsort(dim=1, stable=True)[:, :k]  # B, k
    block = block.scatter(1, lowest, 0.0)
    out = fused.clone()
    out[:, P:, P:] = block.reshape(B, N - P, N - P)
    return out


def attention_rollout(
    attentions: Sequence[torch.Tensor],
    head_fusion: str = "mean",
    discard_ratio: float = 0.0,
    num_prefix_tokens: int = 1,
) -> torch.Tensor:
    """Rollout ``[B, N, N]`` of per-layer attention probabilities ``[B, heads, N, N]``.

    Computed in float32 (float64 when the first layer is float64); samples are independent.

    Args:
        attentions: one tensor per layer, first layer first.
        head_fusion: "mean", "max" or "min" over the heads.
        discard_ratio: fraction of the patch-to-patch weights zeroed per layer and sample,
            in [0, 1); see :func:`discard_lowest` for which entries are candidates.
        num_prefix_tokens: leading non-patch tokens (1 for the cls token).
    """
    _, N = _check_layers(attentions, "attentions")
    _check_head_fusion(head_fusion)
    _check_options(discard_ratio, num_prefix_tokens, N)
    dtype = _compute_dtype(attentions[0])
    fused = (fuse_heads(attn.to(dtype), head_fusion) for attn in attentions)
    return _rollout_fused(fused, discard_ratio, num_prefix_tokens)


def gradient_rollout(
    attentions: Sequence[torch.Tensor],
    gradients: Sequence[torch.Tensor],
    discard_ratio: float = 0.0,
    num_prefix_tokens: int = 1,
) -> torch.Tensor:
    """Class-specific rollout ``[B, N, N]``: heads fused as ``mean(attn * relu(grad))``.

    ``gradients[l]`` is d(target logit)/d(``attentions[l]``), e.g. from
    :func:`attentions_and_gradients`; only its positive part (attention that raises the
    target logit) is kept. Discarding, the residual identity, row renormalisation and the
    product over layers are as in :func:`attention_rollout`. A layer whose weights are all
    zero becomes the identity (the residual path alone).
    """
    _, N = _check_layers(attentions, "attentions")
    _check_layers(gradients, "gradients")
    if len(gradients) != len(attentions):
        raise ValueError(
            f"got {len(attentions)} attention layers but {len(gradients)} gradient layers"
        )
    for i, (attn, grad) in enumerate(zip(attentions, gradients)):
        if attn.shape != grad.shape:
            raise ValueError(
                f"gradients[{i}] has shape {list(grad.shape)}, "
                f"attentions[{i}] has {list(attn.shape)}; they must match"
            )
    _check_options(discard_ratio, num_prefix_tokens, N)
    dtype = _compute_dtype(attentions[0])
    fused = (
        (attn.to(dtype) * grad.to(dtype).clamp(min=0)).mean(dim=1)  # B, N, N
        for attn, grad in zip(attentions, gradients)
    )
    return _rollout_fused(fused, discard_ratio, num_prefix_tokens)


def select_target(logits: torch.Tensor, target: int | torch.Tensor | None) -> torch.Tensor:
    """Target class per sample as a long tensor ``[B]``: argmax when ``target`` is None."""
    B, K = logits.shape
    if target is None:
        return logits.argmax(dim=1)
    target = torch.as_tensor(target, device=logits.device)
    if target.dtype.is_floating_point or target.dtype == torch.bool:
        raise ValueError(f"target must hold integer class indices, got dtype {target.dtype}")
    if target.ndim == 0:
        target = target.expand(B)
    if target.shape != (B,):
        raise ValueError(f"target must be an int or a [B]={B} tensor, got {list(target.shape)}")
    if bool(((target < 0) | (target >= K)).any()):
        raise ValueError(f"target {target.tolist()} out of range for {K} classes")
    return target.long()


def attentions_and_gradients(
    model: nn.Module,
    images: torch.Tensor,
    target: int | torch.Tensor | None = None,
) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
    """Logits, per-layer attentions and d(target logit)/d(attention), all detached.

    The sum of the per-sample target logits is differentiated once; since a ViT treats
    the samples of a batch independently, sample ``b``'s gradient is that of its own
    logit. Only the attention tensors are differentiated (``torch.autograd.grad``), so no
    ``.grad`` is written to the parameters and frozen parameters are fine.

    The model's train/eval mode is left to the caller: in train mode attention dropout
    makes the attentions and gradients random, so call ``model.eval()`` first.

    Args:
        model: returns ``(logits, attentions)`` for ``model(images, return_attention=True)``.
        images: ``[B, C, H, W]`` float.
        target: class per sample; None takes the predicted class, an int one class for
            all, a ``[B]`` tensor one class each.
    """
    # a leaf that requires grad gives the graph a root even when every parameter is frozen
    x = images.detach().requires_grad_(True)
    with torch.enable_grad():
        logits, attentions = model(x, return_attention=True)
        chosen = select_target(logits.detach(), target)
        score = logits.gather(1, chosen[:, None]).sum()
        grads = torch.autograd.grad(score, attentions, allow_unused=True)
    # a layer the logit does not depend on (e.g. in a pruned model) has zero gradient
    grads = [torch.zeros_like(a) if g is None else g for a, g in zip(attentions, grads)]
    return logits.detach(), [a.detach() for a in attentions], [g.detach() for g in grads]


def cls_map(
    rollout: torch.Tensor, grid: tuple[int, int], num_prefix_tokens: int = 1
) -> torch.Tensor:
    """The cls row of a rollout over the patch tokens, ``[B, grid_h, grid_w]``, max 1.

    Row 0 (the cls token) restricted to the patch columns is reshaped row-major to the
    grid and divided by its maximum per sample, so each map peaks at exactly 1; an
    all-zero row stays zero.
    """
    if rollout.ndim != 3 or rollout.shape[1] != rollout.shape[2]:
        raise ValueError(f"rollout must be [B, N, N], got shape {list(rollout.shape)}")
    B, N, _ = rollout.shape
    grid_h, grid_w = grid
    if num_prefix_tokens + grid_h * grid_w != N:
        raise ValueError(
            f"rollout has N={N} tokens but grid {grid_h}x{grid_w} with {num_prefix_tokens} "
            f"prefix token(s) needs {num_prefix_tokens + grid_h * grid_w}"
        )
    row = rollout[:, 0, num_prefix_tokens:]  # B, grid_h * grid_w
    peak = row.amax(dim=1, keepdim=True).clamp_min(torch.finfo(row.dtype).tiny)
    return (row / peak).reshape(B, grid_h, grid_w)


def rollout_maps(
    model: nn.Module,
    images: torch.Tensor,
    method: str = "rollout",
    head_fusion: str = "mean",
    discard_ratio: float = 0.0,
    target: int | torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Saliency maps ``[B, grid_h, grid_w]`` (max 1 each) and logits ``[B, classes]``.

    Works at any image size the model accepts, square or not (``model.check_input``).

    Args:
        method: "rollout" (class-agnostic attention rollout) or "gradient" (gradient
            rollout for ``target``; heads are always averaged, so ``head_fusion`` must be
            "mean").
        target: only for "gradient"; see :func:`attentions_and_gradients`.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    _check_head_fusion(head_fusion)
    grid = model.check_input(images)
    prefix = getattr(model, "num_prefix_tokens", 1)
    if method == "rollout":
        if target is not None:
            raise ValueError("target is for method='gradient'; plain rollout is class-agnostic")
        with torch.no_grad():
            logits, attentions = model(images, return_attention=True)
        rollout = attention_rollout(attentions, head_fusion, discard_ratio, prefix)
    else:
        if head_fusion != "mean":
            raise ValueError(
                f"method='gradient' averages the heads; head_fusion={head_fusion!r} is not used"
            )
        logits, attentions, gradients = attentions_and_gradients(model, images, target)
        rollout = gradient_rollout(attentions, gradients, discard_ratio, prefix)
    return cls_map(rollout, grid, prefix), logits


def _rollout_fused(
    fused_layers: Iterable[torch.Tensor], discard_ratio: float, num_prefix_tokens: int
) -> torch.Tensor:
    rollout = None
    for fused in fused_layers:  # each B, N, N
        if discard_ratio > 0:
            fused = discard_lowest(fused, discard_ratio, num_prefix_tokens)
        eye = torch.eye(fused.shape[-1], dtype=fused.dtype, device=fused.device)
        layer = fused + eye  # the residual path carries each token to itself
        layer = layer / layer.sum(dim=-1, keepdim=True)
        rollout = layer if rollout is None else layer @ rollout  # later layers on the left
    return rollout


def _compute_dtype(attn: torch.Tensor) -> torch.dtype:
    return torch.float64 if attn.dtype == torch.float64 else torch.float32


def _check_head_fusion(head_fusion: str) -> None:
    if head_fusion not in HEAD_FUSIONS:
        raise ValueError(f"head_fusion must be one of {HEAD_FUSIONS}, got {head_fusion!r}")


def _check_layers(layers: Sequence[torch.Tensor], name: str) -> tuple[int, int]:
    """Check per-layer ``[B, heads, N, N]`` tensors agree on B and N; return (B, N)."""
    if len(layers) == 0:
        raise ValueError(f"{name} is empty; rollout needs at least one layer")
    B, N = layers[0].shape[0], layers[0].shape[-1]
    for i, t in enumerate(layers):
        if t.ndim != 4 or t.shape[-1] != t.shape[-2]:
            raise ValueError(f"{name}[{i}] must be [B, heads, N, N], got {list(t.shape)}")
        if t.shape[0] != B or t.shape[-1] != N:
            raise ValueError(
                f"{name}[{i}] has shape {list(t.shape)} but {name}[0] has "
                f"{list(layers[0].shape)}; all layers need the same B and N"
            )
    return B, N


def _check_options(discard_ratio: float, num_prefix_tokens: int, num_tokens: int) -> None:
    if not 0.0 <= discard_ratio < 1.0:
        raise ValueError(f"discard_ratio must be in [0, 1), got {discard_ratio}")
    if not 0 <= num_prefix_tokens < num_tokens:
        raise ValueError(
            f"num_prefix_tokens must be in [0, N={num_tokens}), got {num_prefix_tokens}"
        )
