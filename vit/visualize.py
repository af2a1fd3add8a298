"""Attention-rollout pictures and their faithfulness check.

Pictures: the patch map of :func:`vit.rollout.rollout_maps` blended over the image at the
image's own size, a titled PNG per image, a grid of all of them.

Where the map sits on the image: the model never sees the whole file. The evaluation
transform resizes the image so its shorter side is ``max(img_size) / crop_pct`` and then
centre-crops ``img_size``; the patch map covers that crop only. :func:`crop_box` maps the
crop back to the original's pixel coordinates (reading the sizes off the transform itself,
so it cannot drift from it), :func:`overlay` stretches the map over that box and dims the
pixels the model did not see. For an image of the model's aspect ratio with
``crop_pct=1`` the box is the whole image.

Faithfulness: deletion and insertion curves (:mod:`vit.faithfulness`) for plain rollout,
gradient rollout and a random patch order. A map that reflects what the model uses makes
the target probability fall faster on deletion (lower area) and rise faster on insertion
(higher area) than the random order.

Shape glossary: B batch, C channels, H/W pixels, grid_h/grid_w.
"""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import albumentations as A
import cv2
import numpy as np
import torch
import torch.nn as nn

from vit.faithfulness import area_under_curve, deletion_insertion_curves, patch_order
from vit.faithfulness import random_order as random_patch_order
from vit.rollout import rollout_maps

Box = tuple[float, float, float, float]  # top, left, height, width in original pixels

OUTSIDE_DIM = 0.35  # brightness kept by pixels outside the crop the model saw
METHODS = ("rollout", "gradient", "random")

# ---------------------------------------------------------------------------- geometry


def transform_geometry(transform: A.Compose) -> tuple[int, tuple[int, int]]:
    """(shorter side after resizing, (crop height, crop width)) of an evaluation transform."""
    resize_to, crop = None, None
    for t in transform.transforms:
        if isinstance(t, A.SmallestMaxSize) and isinstance(t.max_size, int):
            resize_to = t.max_size
        elif isinstance(t, A.CenterCrop):
            crop = (t.height, t.width)
    if resize_to is None or crop is None:
        raise ValueError(
            "cannot place the map on the image: the transform is not "
            "vit.transforms.eval_transform (SmallestMaxSize then CenterCrop)"
        )
    return resize_to, crop


def crop_box(image_hw: tuple[int, int], transform: A.Compose) -> Box:
    """The region of an ``image_hw`` image that the evaluation ``transform`` keeps.

    Follows albumentations: the image is scaled by ``s = resize_to / min(H, W)`` to
    ``round(H s) x round(W s)``, and the crop starts at ``(size - crop) // 2``.
    """
    H, W = image_hw
    resize_to, (h, w) = transform_geometry(transform)
    scale = resize_to / min(H, W)
    new_h, new_w = max(1, round(H * scale)), max(1, round(W * scale))
    sy, sx = H / new_h, W / new_w  # original pixels per resized pixel
    return ((new_h - h) // 2 * sy, (new_w - w) // 2 * sx, h * sy, w * sx)


# ----------------------------------------------------------------------------- drawing


def _as_rgb(image: np.ndarray) -> np.ndarray:
    if image.dtype != np.uint8:
        raise ValueError(f"image must be uint8, got {image.dtype}")
    if image.ndim == 2:
        image = image[:, :, None]
    if image.ndim != 3 or image.shape[2] not in (1, 3):
        raise ValueError(f"image must be [H, W], [H, W, 1] or [H, W, 3], got {image.shape}")
    return np.repeat(image, 3, axis=2) if image.shape[2] == 1 else image


def heat_colours(heat: np.ndarray, cmap: str = "jet") -> np.ndarray:
    """A map in [0, 1] to RGB colours, float32 [..., 3] in [0, 255]."""
    import matplotlib

    rgba = np.asarray(matplotlib.colormaps[cmap](np.clip(heat, 0.0, 1.0)))
    return (rgba[..., :3] * 255).astype(np.float32)


def overlay(
    image: np.ndarray,
    heat: np.ndarray,
    alpha: float = 0.5,
    box: Box | None = None,
    cmap: str = "jet",
) -> np.ndarray:
    """The image with the map blended on top: uint8 [H, W, 3] at the image's own size.

    Args:
        image: uint8 [H, W], [H, W, 1] or [H, W, 3].
        heat: [grid_h, grid_w], scaled by its maximum to [0, 1]; stretched bilinearly
            (patch centres on patch centres) over ``box``.
        alpha: weight of the colour map inside the box: ``(1 - alpha) image + alpha colour``.
        box: (top, left, height, width) in image pixels, the region the map covers
            (:func:`crop_box`); outside it the image is dimmed to show the model did not
            see it. None covers the whole image.
    """
    rgb = _as_rgb(image).astype(np.float32)
    H, W, _ = rgb.shape
    if heat.ndim != 2 or not np.isfinite(heat).all():
        raise ValueError(f"heat must be a finite [grid_h, grid_w] map, got shape {heat.shape}")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    top, left, height, width = (0.0, 0.0, float(H), float(W)) if box is None else box
    y0, x0 = round(top), round(left)
    y1, x1 = max(y0 + 1, round(top + height)), max(x0 + 1, round(left + width))
    peak = float(heat.max())
    heat = heat.astype(np.float32) / peak if peak > 0 else heat.astype(np.float32)
    up = cv2.resize(heat, (x1 - x0, y1 - y0), interpolation=cv2.INTER_LINEAR)  # box h, w
    # the part of the box inside the image (a crop_pct above 1 would make it larger)
    iy0, ix0, iy1, ix1 = max(y0, 0), max(x0, 0), min(y1, H), min(x1, W)
    out = rgb * OUTSIDE_DIM
    inside = rgb[iy0:iy1, ix0:ix1]
    colours = heat_colours(up[iy0 - y0 : iy1 - y0, ix0 - x0 : ix1 - x0])
    out[iy0:iy1, ix0:ix1] = (1 - alpha) * inside + alpha * colours
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def upscale(image: np.ndarray, min_side: int) -> np.ndarray:
    """Repeat pixels by the smallest integer factor that makes the shorter side at least
    ``min_side`` (unchanged when it already is), so tiny images stay legible."""
    factor = max(1, math.ceil(min_side / min(image.shape[:2])))
    if factor == 1:
        return image
    return np.repeat(np.repeat(image, factor, axis=0), factor, axis=1)


def _figure(width_in: float, height_in: float):
    # a bare Figure on the Agg canvas: no pyplot state, safe in threads and without a display
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width_in, height_in))
    FigureCanvasAgg(fig)
    return fig


def save_overlay_png(path: str | Path, image: np.ndarray, title: str, min_side: int = 256) -> Path:
    """Save an overlay as a PNG of exactly its own size with ``title`` written on it.

    Images whose shorter side is below ``min_side`` are first enlarged by an integer
    factor (:func:`upscale`), so the title fits on a 28x28 one.
    """
    image = upscale(_as_rgb(image), min_side)
    H, W, _ = image.shape
    dpi = 100
    fig = _figure(W / dpi, H / dpi)
    ax = fig.add_axes((0, 0, 1, 1))
    ax.imshow(image, interpolation="nearest")
    ax.set_axis_off()
    font_px = max(10.0, min(H, W) / 22)
    max_chars = max(8, int(W / (0.62 * font_px)))
    ax.text(
        0.01,
        0.99,
        _shorten(title, max_chars),
        transform=ax.transAxes,
        va="top",
        ha="left",
        color="white",
        fontsize=font_px * 72 / dpi,
        bbox={"facecolor": "black", "alpha": 0.6, "edgecolor": "none", "pad": 2},
    )
    path = Path(path)
    fig.savefig(path, dpi=dpi)
    return path


def _shorten(text: str, max_chars: int) -> str:
    return text if len(text) <= max_chars else text[: max_chars - 1] + "\u2026"


def save_grid(
    path: str | Path,
    images: Sequence[np.ndarray],
    titles: Sequence[str],
    ncols: int | None = None,
    cell_inches: float = 2.6,
) -> Path:
    """One PNG with every image in a grid, each under its title."""
    if len(images) == 0 or len(images) != len(titles):
        raise ValueError(f"need one title per image, got {len(images)} images, {len(titles)}")
    ncols = ncols or min(len(images), max(1, math.ceil(math.sqrt(len(images)))), 8)
    nrows = math.ceil(len(images) / ncols)
    fig = _figure(ncols * cell_inches, nrows * (cell_inches + 0.3))
    for k, (image, title) in enumerate(zip(images, titles)):
        ax = fig.add_subplot(nrows, ncols, k + 1)
        ax.imshow(_as_rgb(image), interpolation="nearest")
        ax.set_title(_shorten(title, 32), fontsize=8)
        ax.set_axis_off()
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=100)
    return path


def thumbnail(image: np.ndarray, max_side: int = 256) -> np.ndarray:
    """A copy no larger than ``max_side`` on its longer side (area-averaged), for grids."""
    H, W = image.shape[:2]
    scale = max_side / max(H, W)
    if scale >= 1:
        return image
    size = (max(1, round(W * scale)), max(1, round(H * scale)))
    return cv2.resize(image, size, interpolation=cv2.INTER_AREA)


# ------------------------------------------------------------------------ explanations


@dataclass
class Explanation:
    """One image's saliency map, its overlay and the prediction it explains."""

    heat: np.ndarray  # grid_h, grid_w float32, max 1
    overlay: np.ndarray  # H, W, 3 uint8 at the image's own size
    predicted: int
    probability: float
    target: int  # the class the map is for (the prediction for plain rollout)
    target_probability: float
    title: str


def _title(class_names: Sequence[str], pred: int, p: float, target: int, pt: float) -> str:
    text = f"{class_names[pred]} {p:.1%}"
    if target != pred:
        text += f" | map for {class_names[target]} {pt:.1%}"
    return text


def explain(
    model: nn.Module,
    images: torch.Tensor,
    raw_images: Sequence[np.ndarray],
    class_names: Sequence[str],
    boxes: Sequence[Box | None] | None = None,
    method: str = "rollout",
    head_fusion: str = "mean",
    discard_ratio: float = 0.0,
    target: int | None = None,
    alpha: float = 0.5,
    batch_size: int = 32,
) -> list[Explanation]:
    """Rollout maps of a batch with their overlays on the raw images.

    The model is put in eval mode for the maps (attention dropout would make them random)
    and given back in the mode it came in.

    Args:
        images: [B, C, H, W] model inputs (already transformed), moved to the model's device.
        raw_images: the B decoded uint8 images the overlays are drawn on.
        boxes: per image, where the input sits in the raw image (:func:`crop_box`).
        method, head_fusion, discard_ratio, target: as in :func:`vit.rollout.rollout_maps`.
    """
    if len(raw_images) != len(images):
        raise ValueError(f"{len(images)} model inputs but {len(raw_images)} raw images")
    boxes = [None] * len(images) if boxes is None else boxes
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        heats, probs = [], []
        for start in range(0, len(images), batch_size):
            x = images[start : start + batch_size].to(device)
            maps, logits = rollout_maps(model, x, method, head_fusion, discard_ratio, target)
            heats.append(maps.float().cpu())
            probs.append(logits.float().softmax(dim=-1).cpu())
    finally:
        model.train(was_training)
    heat, prob = torch.cat(heats).numpy(), torch.cat(probs)  # B, grid_h, grid_w; B, classes
    preds = prob.argmax(dim=1).tolist()
    targets = preds if target is None else [int(target)] * len(preds)
    out = []
    for b, (pred, tgt) in enumerate(zip(preds, targets)):
        p, pt = float(prob[b, pred]), float(prob[b, tgt])
        out.append(
            Explanation(
                heat=heat[b],
                overlay=overlay(raw_images[b], heat[b], alpha, boxes[b]),
                predicted=pred,
                probability=p,
                target=tgt,
                target_probability=pt,
                title=_title(class_names, pred, p, tgt, pt),
            )
        )
    return out


def explain_dataset(
    model: nn.Module,
    dataset,
    indices: Sequence[int],
    class_names: Sequence[str],
    **options,
) -> list[Explanation]:
    """Explanations for ``dataset[i]`` of a :class:`vit.loader.AugmentedDataset` whose
    transform is the evaluation transform; overlays are drawn on ``dataset.source.get(i)``.

    ``options`` go to :func:`explain`.
    """
    images = torch.stack([dataset[int(i)][0] for i in indices])  # B, C, H, W
    raw = [dataset.source.get(int(i))[0] for i in indices]
    boxes = [crop_box(r.shape[:2], dataset.transform) for r in raw]
    return explain(model, images, raw, class_names, boxes, **options)


def rollout_overlays(
    model: nn.Module,
    dataset,
    indices: Sequence[int],
    class_names: Sequence[str],
    **options,
) -> list[np.ndarray]:
    """Overlays uint8 [H, W, 3] for a fixed set of images, e.g. for TensorBoard at each
    evaluation; see :func:`explain_dataset`."""
    return [e.overlay for e in explain_dataset(model, dataset, indices, class_names, **options)]


def unique_stems(paths: Sequence[str | Path]) -> list[str]:
    """File stems made unique by a ``-2``, ``-3``... suffix on repeats."""
    seen: dict[str, int] = {}
    stems = []
    for p in paths:
        stem = Path(p).stem or "image"
        seen[stem] = seen.get(stem, 0) + 1
        stems.append(stem if seen[stem] == 1 else f"{stem}-{seen[stem]}")
    return stems


def save_explanation(explanation: Explanation, out_dir: Path, stem: str) -> tuple[Path, Path]:
    """Write ``<stem>_overlay.png`` (titled) and ``<stem>_map.npy`` (the raw map)."""
    png = save_overlay_png(out_dir / f"{stem}_overlay.png", explanation.overlay, explanation.title)
    npy = out_dir / f"{stem}_map.npy"
    np.save(npy, explanation.heat)
    return png, npy


def save_explanations(
    explanations: Sequence[Explanation], stems: Sequence[str], out_dir: str | Path
) -> Path:
    """Write each explanation (:func:`save_explanation`) and ``grid.png``; returns the grid."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for e, stem in zip(explanations, stems):
        save_explanation(e, out_dir, stem)
    thumbs = [thumbnail(e.overlay) for e in explanations]
    return save_grid(out_dir / "grid.png", thumbs, [e.title for e in explanations])


# -------------------------------------------------------------------------- faithfulness


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
    fig = _figure(10, 4)
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


# ----------------------------------------------------------------------------- runners


def explain_files(
    predictor,
    paths: Sequence[str],
    out_dir: str | Path,
    batch_size: int = 16,
    progress: bool = False,
    **options,
) -> list[dict]:
    """Overlay PNG and map NPY for each file, and ``grid.png`` of all, in ``out_dir``.

    Returns one record per path: ``{"path", "overlay", "map", "label", "probability",
    "target"}``, or ``{"path", "error"}`` for a file that cannot be read.

    Args:
        predictor: a :class:`vit.predict.Predictor` (model, class names, preprocessing).
        options: ``method``, ``head_fusion``, ``discard_ratio``, ``target``, ``alpha`` of
            :func:`explain`.
    """
    from tqdm import tqdm

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stems = unique_stems(paths)
    records: list[dict] = []
    thumbs, titles = [], []
    for start in tqdm(
        range(0, len(paths), batch_size), unit="batch", file=sys.stderr, disable=not progress
    ):
        chunk = range(start, min(start + batch_size, len(paths)))
        loaded = [(k, predictor.load_or_error(paths[k])) for k in chunk]
        good = [(k, im) for k, im in loaded if not isinstance(im, str)]
        records += [{"path": str(paths[k]), "error": im} for k, im in loaded if isinstance(im, str)]
        if not good:
            continue
        raw = [im for _, im in good]
        boxes = [crop_box(im.shape[:2], predictor.transform) for im in raw]
        x = predictor.to_input(raw)
        names = predictor.class_names
        for (k, _), e in zip(good, explain(predictor.model, x, raw, names, boxes, **options)):
            png, npy = save_explanation(e, out_dir, stems[k])
            records.append(
                {
                    "path": str(paths[k]),
                    "overlay": str(png),
                    "map": str(npy),
                    "label": names[e.predicted],
                    "probability": e.probability,
                    "target": names[e.target],
                }
            )
            thumbs.append(thumbnail(e.overlay))
            titles.append(e.title)
    if thumbs:
        save_grid(out_dir / "grid.png", thumbs, titles)
    order = {str(p): k for k, p in enumerate(paths)}
    return sorted(records, key=lambda r: order[r["path"]])


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
