"""Attention-rollout pictures: overlays, titled PNGs and grids.

The patch map of :func:`vit.rollout.rollout_maps` blended over the image at the image's own
size, a titled PNG per image, a grid of all of them. The faithfulness check of the maps
lives in :mod:`vit.faithfulness_report`.

Where the map sits on the image: the model never sees the whole file. The evaluation
transform resizes the image so its shorter side is ``max(img_size) / crop_pct`` and then
centre-crops ``img_size``; the patch map covers that crop only. :func:`crop_box` maps the
crop back to the original's pixel coordinates (reading the sizes off the transform itself,
so it cannot drift from it), :func:`overlay` stretches the map over that box and dims the
pixels the model did not see. For an image of the model's aspect ratio with
``crop_pct=1`` the box is the whole image.

Shape glossary: B batch, C channels, H/W pixels, grid_h/grid_w.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import albumentations as A
import cv2
import numpy as np
import torch
import torch.nn as nn

from vit.rollout import rollout_maps

Box = tuple[float, float, float, float]  # top, left, height, width in original pixels

OUTSIDE_DIM = 0.35  # brightness kept by pixels outside the crop the model saw

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


def blank_figure(width_in: float, height_in: float):
    """An empty matplotlib Figure of the given size in inches, ready for ``savefig``."""
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
    fig = blank_figure(W / dpi, H / dpi)
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
    fig = blank_figure(ncols * cell_inches, nrows * (cell_inches + 0.3))
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
