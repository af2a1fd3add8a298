"""Inference on image files: top-k labels from a checkpoint of ours or from timm weights.

A model comes from one of three sources, each with the class names and the preprocessing
it was trained with:

- a checkpoint folder of ours: ``meta.json`` gives the image size, mean, std, crop fraction,
  channels and class names;
- a local timm weight file (``.safetensors``/``.pth``/``.pt``/``.bin``) with a preset
  name, optionally with timm's pretrained tag (``vit_small_patch16_224.augreg_in21k_ft_in1k``):
  the preprocessing is timm's pretrained config for that name;
- a timm pretrained name, downloaded by timm: preprocessing from its pretrained config.

timm weights get ImageNet's class names when their class count is an ImageNet subset's
(1000 for ImageNet-1k), else ``class_<i>``. Every image goes through
:func:`vit.images.load_image` and :func:`vit.transforms.eval_transform`, the same steps as
evaluation, so a file gets here the probabilities it gets there.
"""

from __future__ import annotations

import csv
import glob
import io
import json
import logging
import os
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TextIO

import numpy as np
import torch
from tqdm import tqdm

from vit.checkpoint import load_model
from vit.data import DATASET_STATS
from vit.images import BadImageError, is_image_path, load_image
from vit.model import VisionTransformer
from vit.presets import PRESETS
from vit.timm_compat import WEIGHT_SUFFIXES, load_pretrained
from vit.transforms import eval_transform

logger = logging.getLogger(__name__)

FORMATS = ("table", "json", "csv")


@dataclass(frozen=True)
class Preprocessing:
    """What turns a decoded file into the model's input: the evaluation transform's settings."""

    img_size: tuple[int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    crop_pct: float = 1.0
    channels: int = 3

    def transform(self):
        """The albumentations pipeline: uint8 [H, W, C] to a normalised tensor [C, H, W]."""
        return eval_transform(self.img_size, self.mean, self.std, self.crop_pct)


def resolve_device(device: str) -> torch.device:
    """``cpu``, ``cuda`` (an error when no GPU is visible) or ``auto`` (a GPU if there is one)."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: no CUDA GPU is visible to PyTorch")
    return torch.device(device)


def imagenet_class_names(num_classes: int) -> list[str]:
    """ImageNet's class descriptions when ``num_classes`` is an ImageNet subset's, else
    ``class_<i>``."""
    from timm.data import ImageNetInfo, infer_imagenet_subset

    subset = infer_imagenet_subset({"num_classes": num_classes})
    if subset is None:
        return [f"class_{i}" for i in range(num_classes)]
    return list(ImageNetInfo(subset).label_descriptions())


def timm_preprocessing(name: str) -> Preprocessing | None:
    """The preprocessing of timm's pretrained config for ``name`` (``arch`` or ``arch.tag``),
    or None when timm has no config by that name."""
    from timm.models import get_pretrained_cfg

    try:
        cfg = get_pretrained_cfg(name)
    except RuntimeError as e:  # timm's error for an unknown pretrained tag
        raise ValueError(f"{name}: {e}") from e
    if cfg is None:
        return None
    if cfg.crop_mode not in (None, "center"):
        logger.warning(
            "%s: timm crops with mode %r; we resize and centre-crop, so inputs differ slightly",
            name,
            cfg.crop_mode,
        )
    channels, h, w = cfg.input_size
    return Preprocessing((h, w), tuple(cfg.mean), tuple(cfg.std), cfg.crop_pct or 1.0, channels)


def _looks_like_path(source: str) -> bool:
    return os.sep in source or Path(source).suffix in WEIGHT_SUFFIXES or Path(source).exists()


def load_source(
    source: str | Path, preset: str | None = None
) -> tuple[VisionTransformer, list[str], Preprocessing]:
    """The model (eval mode, CPU), class names and preprocessing of a checkpoint source.

    Args:
        source: a checkpoint folder of ours, a timm weight file, or a timm pretrained name.
        preset: for a weight file only: our preset for its architecture, optionally
            followed by timm's pretrained tag (``vit_tiny_patch16_224.augreg_in21k``) to
            pick timm's preprocessing for those weights.
    """
    source = str(source)
    path = Path(source)
    if path.is_dir():
        if preset is not None:
            raise ValueError(f"{path}: a checkpoint folder describes its model; drop --model")
        return _load_checkpoint_folder(path)
    if _looks_like_path(source):
        if not path.is_file():
            raise FileNotFoundError(f"no checkpoint folder or weight file at {path}")
        if preset is None:
            raise ValueError(f"{path}: a weight file needs --model PRESET (one of our presets)")
        return _load_weight_file(path, preset)
    if preset is not None:
        raise ValueError(f"{source}: --model is only for weight files; a timm name says it all")
    return _load_timm_name(source)


def _load_checkpoint_folder(path: Path) -> tuple[VisionTransformer, list[str], Preprocessing]:
    model, meta = load_model(path)
    pre = Preprocessing(
        img_size=tuple(meta["img_size"]),
        mean=tuple(meta["mean"]),
        std=tuple(meta["std"]),
        crop_pct=float(meta.get("crop_pct", 1.0)),
        channels=int(meta.get("in_chans", model.cfg.in_chans)),
    )
    names = list(meta["class_names"])
    if len(names) != model.num_classes:
        raise ValueError(
            f"{path}: meta.json lists {len(names)} class names for a {model.num_classes}-class head"
        )
    return model, names, pre


def _load_weight_file(
    path: Path, model_name: str
) -> tuple[VisionTransformer, list[str], Preprocessing]:
    arch = model_name.split(".", 1)[0]
    if arch not in PRESETS:
        raise ValueError(f"--model {model_name}: unknown preset {arch!r}; known: {sorted(PRESETS)}")
    pre = timm_preprocessing(model_name)
    if pre is None:
        model = load_pretrained(path, arch).eval()
        C = model.cfg.in_chans
        mean, std = DATASET_STATS["imagenet"] if C == 3 else ((0.5,) * C, (0.5,) * C)
        logger.warning(
            "timm has no pretrained config for %r; assuming mean %s, std %s and no crop",
            model_name,
            mean,
            std,
        )
        pre = Preprocessing(model.img_size, mean, std, 1.0, C)
    else:
        # build at the weights' own resolution, so the position embedding is not resampled
        model = load_pretrained(path, arch, img_size=pre.img_size).eval()
    return model, imagenet_class_names(model.num_classes), pre


def _load_timm_name(name: str) -> tuple[VisionTransformer, list[str], Preprocessing]:
    import timm

    if not timm.is_model(name):
        raise ValueError(
            f"{name!r} is not a checkpoint folder, a weight file, or a timm model name"
        )
    pre = timm_preprocessing(name)
    if pre is None:
        raise ValueError(f"timm has no pretrained weights named {name!r}")
    model = load_pretrained(name).eval()
    return model, imagenet_class_names(model.num_classes), pre


# ------------------------------------------------------------------------------ file lists


def expand_paths(patterns: Iterable[str | Path]) -> tuple[list[str], list[str]]:
    """Image files named by ``patterns``, and the patterns that matched nothing.

    A file is taken as given (whatever its extension); a folder gives its image files,
    recursively, sorted, hidden files and folders skipped; anything else is a glob
    (``**`` recursive) whose files with an image extension and folders are taken. Each
    file appears once, in the order first found.
    """
    found: dict[str, None] = {}  # an ordered set
    unmatched = []
    for pattern in map(str, patterns):
        if os.path.isfile(pattern):
            hits = [pattern]
        elif os.path.isdir(pattern):
            hits = _folder_images(pattern)
        else:
            hits = []
            for match in sorted(glob.glob(pattern, recursive=True)):
                if os.path.isdir(match):
                    hits += _folder_images(match)
                elif is_image_path(match):
                    hits.append(match)
        if not hits:
            unmatched.append(pattern)
        found.update(dict.fromkeys(hits))
    return list(found), unmatched


def _folder_images(folder: str) -> list[str]:
    paths = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        paths += [
            os.path.join(dirpath, f)
            for f in filenames
            if not f.startswith(".") and is_image_path(f)
        ]
    return sorted(paths)


# ------------------------------------------------------------------------------ prediction


class Predictor:
    """A model with its class names and preprocessing, predicting on arrays or files."""

    def __init__(
        self,
        model: VisionTransformer,
        class_names: Sequence[str],
        preprocessing: Preprocessing,
        device: str | torch.device = "cpu",
    ):
        if len(class_names) != model.num_classes:
            raise ValueError(
                f"{len(class_names)} class names for a model with {model.num_classes} classes"
            )
        self.device = torch.device(device)
        self.model = model.eval().to(self.device)
        self.class_names = list(class_names)
        self.preprocessing = preprocessing
        self.transform = preprocessing.transform()

    @classmethod
    def from_source(
        cls, source: str | Path, preset: str | None = None, device: str = "auto"
    ) -> Predictor:
        """A predictor for a checkpoint folder, weight file or timm name (:func:`load_source`)."""
        model, names, pre = load_source(source, preset)
        return cls(model, names, pre, resolve_device(device))

    @property
    def channels(self) -> int:
        return self.preprocessing.channels

    def resized(self, img_size: tuple[int, int]) -> Predictor:
        """The same model fed images of another size (the position embedding is resized)."""
        h, w = img_size
        p = self.model.patch_size
        if h <= 0 or w <= 0 or h % p or w % p:
            raise ValueError(f"image size {h}x{w} is not a positive multiple of the patch size {p}")
        pre = replace(self.preprocessing, img_size=(h, w))
        return Predictor(self.model, self.class_names, pre, self.device)

    def load(self, path: str | Path) -> np.ndarray:
        """Decode a file as the model expects it: uint8 [H, W, channels]."""
        return load_image(path, self.channels)

    def load_or_error(self, path: str | Path) -> np.ndarray | str:
        """The decoded file, or the reason it cannot be read."""
        try:
            return self.load(path)
        except BadImageError as e:
            return e.reason
        except OSError as e:  # missing, unreadable, a folder, a broken link
            return f"{type(e).__name__}: {e.strerror or e}"

    def to_input(self, images: Sequence[np.ndarray]) -> torch.Tensor:
        """Decoded images to the model's input batch [B, C, H, W] on the model's device."""
        batch = torch.stack([self.transform(image=im)["image"] for im in images])
        return batch.to(self.device)

    @torch.no_grad()
    def predict_arrays(self, images: Sequence[np.ndarray]) -> torch.Tensor:
        """Class probabilities [B, classes] (float32, CPU) for decoded uint8 images."""
        logits = self.model(self.to_input(images))
        return logits.float().softmax(dim=-1).cpu()

    def top_k(self, probs: torch.Tensor, k: int) -> list[list[dict]]:
        """For each row of ``probs``, the ``k`` likeliest classes, likeliest first."""
        values, indices = probs.topk(min(k, probs.shape[1]), dim=1)
        return [
            [
                {
                    "rank": r + 1,
                    "index": int(i),
                    "label": self.class_names[i],
                    "probability": float(p),
                }
                for r, (p, i) in enumerate(zip(vs.tolist(), ix.tolist()))
            ]
            for vs, ix in zip(values, indices)
        ]

    def predict_paths(
        self,
        paths: Sequence[str | Path],
        top_k: int = 5,
        batch_size: int = 32,
        progress: bool = False,
    ) -> list[dict]:
        """One record per path, in order: ``{"path", "predictions": [...]}`` or, for a file
        that cannot be read, ``{"path", "error"}``.

        Each prediction is ``{"rank", "index", "label", "probability"}``.
        """
        if top_k < 1 or batch_size < 1:
            raise ValueError(f"top_k and batch_size must be positive, got {top_k}, {batch_size}")
        records = []
        bar = tqdm(total=len(paths), unit="img", file=sys.stderr, disable=not progress)
        with bar:
            for start in range(0, len(paths), batch_size):
                chunk = [str(p) for p in paths[start : start + batch_size]]
                records += self._predict_chunk(chunk, top_k)
                bar.update(len(chunk))
        return records

    def _predict_chunk(self, paths: list[str], top_k: int) -> list[dict]:
        records: list[dict] = []
        good, images = [], []
        for path in paths:
            image = self.load_or_error(path)
            if isinstance(image, str):
                records.append({"path": path, "error": image})
                continue
            good.append(len(records))
            images.append(image)
            records.append({"path": path})
        if images:
            for pos, preds in zip(good, self.top_k(self.predict_arrays(images), top_k)):
                records[pos]["predictions"] = preds
        return records


# ------------------------------------------------------------------------------ formatting


def format_records(records: Sequence[dict], fmt: str) -> str:
    """The successful records as a table, JSON (a list) or CSV (one row per rank)."""
    ok = [r for r in records if "predictions" in r]
    if fmt == "json":
        return json.dumps(ok, indent=2) + "\n"
    if fmt == "csv":
        out = io.StringIO()
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(["path", "rank", "index", "label", "probability"])
        for r in ok:
            for p in r["predictions"]:
                writer.writerow(
                    [r["path"], p["rank"], p["index"], p["label"], f"{p['probability']:.6f}"]
                )
        return out.getvalue()
    if fmt == "table":
        return "".join(_table_block(r) for r in ok)
    raise ValueError(f"format must be one of {FORMATS}, got {fmt!r}")


def _table_block(record: dict) -> str:
    lines = [record["path"]]
    for p in record["predictions"]:
        lines.append(f"  {p['rank']:>2}. {p['probability']:7.2%}  {p['label']}")
    return "\n".join(lines) + "\n"


def report_failures(records: Sequence[dict], unmatched: Sequence[str], stream: TextIO) -> int:
    """Write one line per unreadable file or empty pattern to ``stream``; return the count."""
    for pattern in unmatched:
        print(f"error: {pattern}: no such file, or no image files match", file=stream)
    failed = [r for r in records if "error" in r]
    for r in failed:
        print(f"error: {r['path']}: {r['error']}", file=stream)
    return len(failed) + len(unmatched)


def class_index(value: str, class_names: Sequence[str]) -> int:
    """A class given by name (exact, first) or by index, as an index."""
    if value in class_names:
        return list(class_names).index(value)
    try:
        index = int(value)
    except ValueError:
        shown = ", ".join(class_names[:10]) + (", ..." if len(class_names) > 10 else "")
        raise ValueError(f"unknown class {value!r}; classes: {shown}") from None
    if not 0 <= index < len(class_names):
        raise ValueError(f"class index {index} out of range for {len(class_names)} classes")
    return index
