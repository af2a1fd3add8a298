"""The faithfulness check of rollout maps: curves over many images, a summary, a report.

Deletion and insertion curves (:mod:`vit.faithfulness`) for plain rollout, gradient
rollout and a random patch order. A map that reflects what the model uses makes the
target probability fall faster on deletion (lower area) and rise faster on insertion
(higher area) than the random order. ``vit rollout --evaluate`` writes the report.

Shape glossary: B batch, C channels, H/W pixels, P patches.
"""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from vit.faithfulness import area_under_curve, deletion_insertion_curves, patch_order
from vit.faithfulness import random_order as random_patch_order
from vit.rollout import rollout_maps
from vit.visualize import blank_figure

METHODS = ("rollout", "gradient", "random")


def faithfulness_curves(
    model: nn.Module,
    batches: Iterable[torch.Tensor],
    head_fusion: str = "mean",
    discard_ratio: float = 0.0,
    steps: int | None = None,
    baseline: str = "mean",
    seed: int = 0,
) -> dict:
    """Deletion and insertion curves of rollout, gradient rollout and a random order.

    Each curve follows the model's predicted class on the full image. Returns per method
    the per-image areas (``deletion_auc``, ``insertion_auc``, lists) and mean curves, and
    ``fractions`` (the share of patches changed at each step).

    Args:
        batches: model inputs [B, C, H, W] (already transformed), on the model's device.
        steps: curve steps, at most the patch count; None is one patch a step.
        seed: of the random order.
    """
    generator = torch.Generator().manual_seed(seed)
    was_training = model.training
    model.eval()
    try:
        per_method, fractions = _collect_curves(
            model, batches, generator, head_fusion, discard_ratio, steps, baseline
        )
    finally:
        model.train(was_training)
    result = {"fractions": fractions.tolist(), "methods": {}}
    for method, curves in per_method.items():
        entry = {}
        for kind in ("deletion", "insertion"):
            c = torch.cat(curves[kind])  # images, steps + 1
            entry[f"{kind}_auc"] = area_under_curve(c, fractions).tolist()
            entry[f"{kind}_curve"] = c.mean(dim=0).tolist()
        result["methods"][method] = entry
    result["images"] = len(result["methods"]["random"]["deletion_auc"])
    return result


def _collect_curves(
    model: nn.Module,
    batches: Iterable[torch.Tensor],
    generator: torch.Generator,
    head_fusion: str,
    discard_ratio: float,
    steps: int | None,
    baseline: str,
) -> tuple[dict[str, dict[str, list[torch.Tensor]]], torch.Tensor]:
    """Per method, the deletion and insertion curves of each batch; and the fractions."""
    per_method = {m: {"deletion": [], "insertion": []} for m in METHODS}
    fractions = None
    for x in batches:
        orders = {
            "rollout": patch_order(
                rollout_maps(model, x, "rollout", head_fusion, discard_ratio)[0]
            ),
            "gradient": patch_order(rollout_maps(model, x, "gradient", "mean", discard_ratio)[0]),
        }
        P = orders["rollout"].shape[1]
        orders["random"] = random_patch_order(len(x), P, generator).to(x.device)
        for method, order in orders.items():
            curves = deletion_insertion_curves(
                model, x, order, model.patch_size, min(steps or P, P), baseline, batch_size=64
            )
            fractions = curves["fractions"].cpu()
            per_method[method]["deletion"].append(curves["deletion"].cpu())
            per_method[method]["insertion"].append(curves["insertion"].cpu())
    if fractions is None:
        raise ValueError("no images to evaluate")
    return per_method, fractions


def summarise(result: dict) -> dict:
    """Mean and standard error of each method's areas, and whether each map beats random."""
    summary = {}
    for method, entry in result["methods"].items():
        s = {}
        for kind in ("deletion", "insertion"):
            auc = np.asarray(entry[f"{kind}_auc"])
            s[f"{kind}_auc_mean"] = float(auc.mean())
            s[f"{kind}_auc_sem"] = (
                float(auc.std(ddof=1) / math.sqrt(len(auc))) if len(auc) > 1 else 0.0
            )
        summary[method] = s
    rand = summary["random"]
    for method in ("rollout", "gradient"):
        s = summary[method]
        s["beats_random_deletion"] = s["deletion_auc_mean"] < rand["deletion_auc_mean"]
        s["beats_random_insertion"] = s["insertion_auc_mean"] > rand["insertion_auc_mean"]
    return summary


def format_summary(summary: dict) -> str:
    """A plain-text table of the areas per method."""
    lines = [
        f"{'method':<10} {'deletion AUC (lower better)':>28} {'insertion AUC (higher better)':>30}"
    ]
    for method, s in summary.items():
        d = f"{s['deletion_auc_mean']:.4f} ± {s['deletion_auc_sem']:.4f}"
        i = f"{s['insertion_auc_mean']:.4f} ± {s['insertion_auc_sem']:.4f}"
        lines.append(f"{method:<10} {d:>28} {i:>30}")
    verdict = {True: "better", False: "NOT better"}
    for method in ("rollout", "gradient"):
        s = summary[method]
        lines.append(
            f"{method} vs random: deletion {verdict[s['beats_random_deletion']]}, "
            f"insertion {verdict[s['beats_random_insertion']]}"
        )
    return "\n".join(lines)


def plot_curves(result: dict, summary: dict, path: str | Path) -> Path:
    """Mean deletion and insertion curves of each method, side by side, areas in the legend."""
    fig = blank_figure(10, 4)
    x = result["fractions"]
    for k, kind in enumerate(("deletion", "insertion")):
        ax = fig.add_subplot(1, 2, k + 1)
        for method, entry in result["methods"].items():
            auc = summary[method][f"{kind}_auc_mean"]
            ax.plot(x, entry[f"{kind}_curve"], label=f"{method} (AUC {auc:.3f})")
        ax.set_xlabel(f"fraction of patches {'removed' if kind == 'deletion' else 'revealed'}")
        ax.set_ylabel("probability of the predicted class")
        ax.set_title(f"{kind} ({result['images']} images)")
        ax.set_ylim(0, 1.02)
        ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    return path


def write_faithfulness(result: dict, out_dir: str | Path, info: dict | None = None) -> dict:
    """Write ``curves.json`` (settings, summary, per-image areas, mean curves) and
    ``curves.png``; returns the summary."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    summary = summarise(result)
    report = {**(info or {}), "summary": summary, **result}
    (out_dir / "curves.json").write_text(json.dumps(report, indent=2))
    plot_curves(result, summary, out_dir / "curves.png")
    return summary


def evaluate_source(
    predictor,
    source,
    limit: int | None = 100,
    batch_size: int = 16,
    seed: int = 0,
    progress: bool = False,
    **options,
) -> dict:
    """:func:`faithfulness_curves` over ``limit`` images of ``source`` drawn at random
    (seeded; all when None), each preprocessed by ``predictor``.

    ``options`` are ``head_fusion``, ``discard_ratio``, ``steps``, ``baseline``.
    """
    from tqdm import tqdm

    n = len(source)
    k = n if limit is None else min(limit, n)
    indices = np.sort(np.random.default_rng(seed).choice(n, size=k, replace=False))

    def batches():
        for start in tqdm(
            range(0, k, batch_size), unit="batch", file=sys.stderr, disable=not progress
        ):
            images = [source.get(int(i))[0] for i in indices[start : start + batch_size]]
            yield predictor.to_input(images)

    result = faithfulness_curves(predictor.model, batches(), seed=seed, **options)
    result["samples"] = [source.describe(int(i)) for i in indices]
    return result
