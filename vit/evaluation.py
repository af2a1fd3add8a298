"""Evaluating a checkpoint folder on a data set: metrics, a JSON report, a confusion matrix."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import yaml
from accelerate import Accelerator

from vit.checkpoint import load_model
from vit.data import build_source
from vit.engine import cpu_only, evaluate
from vit.loader import AugmentedDataset, eval_loader
from vit.transforms import eval_transform

logger = logging.getLogger(__name__)


def checkpoint_data_defaults(checkpoint: Path) -> dict:
    """The data section of the config saved with a checkpoint, or {} when there is none."""
    config_file = checkpoint / "config.yaml"
    if not config_file.is_file():
        return {}
    return (yaml.safe_load(config_file.read_text()) or {}).get("data", {})


def plot_confusion(confusion: list[list[int]], class_names: list[str], path: Path) -> None:
    """Save the confusion matrix (rows true class, columns predicted) as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    cm = np.asarray(confusion, dtype=float)
    rates = cm / np.maximum(cm.sum(axis=1, keepdims=True), 1)  # each true class sums to one
    k = len(class_names)
    # room for k labelled cells up to 30 classes; beyond that a fixed size, or 1000
    # ImageNet classes would ask for a picture some 50,000 pixels wide
    size = min(16.0, max(5.0, 0.45 * k + 2))
    fig, ax = plt.subplots(figsize=(size, size))
    ax.imshow(rates, cmap="Blues", vmin=0, vmax=1)
    if k <= 30:
        ax.set_xticks(range(k), class_names, rotation=90)
        ax.set_yticks(range(k), class_names)
        for i in range(k):
            for j in range(k):
                if cm[i, j]:
                    colour = "white" if rates[i, j] > 0.5 else "black"
                    ax.text(j, i, int(cm[i, j]), ha="center", va="center", fontsize=7, color=colour)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title("confusion matrix (colour: fraction of the true class)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def evaluate_checkpoint(
    checkpoint: str | Path,
    dataset: str | None = None,
    root: str | None = None,
    split: str | None = None,
    batch_size: int = 256,
    bad_files: str = "error",
    num_workers: int = 0,
    out_dir: str | Path | None = None,
) -> dict:
    """Top-1, top-5, loss, per-class accuracy, ECE and the confusion matrix of a checkpoint.

    Data options default to those saved with the checkpoint (its test split). Its class
    names are fixed: a data set with other classes is an error, never shifted labels.
    """
    checkpoint = Path(checkpoint)
    model, meta = load_model(checkpoint)
    saved = checkpoint_data_defaults(checkpoint)
    dataset = dataset or saved.get("dataset") or meta.get("dataset")
    if dataset is None:
        raise ValueError(f"{checkpoint}: no data set saved with it; pass --dataset")
    root = root if root is not None else saved.get("root")
    split = split or saved.get("test_split") or "test"
    source = build_source(
        dataset,
        root,
        split,
        download=bool(saved.get("download", False)),
        channels=meta.get("in_chans", model.cfg.in_chans),
        bad_files=bad_files,
        in_memory=False,
        class_names=meta["class_names"],
    )
    skipped = list(getattr(source, "skipped", []))
    transform = eval_transform(
        tuple(meta["img_size"]),
        tuple(meta["mean"]),
        tuple(meta["std"]),
        meta.get("crop_pct", 1.0),
    )
    acc = Accelerator(cpu=cpu_only())
    model = model.to(acc.device)
    loader = eval_loader(
        AugmentedDataset(source, transform),
        batch_size,
        acc.process_index,
        acc.num_processes,
        num_workers,
    )
    results = evaluate(
        model, loader, acc, len(meta["class_names"]), class_names=meta["class_names"]
    )
    results.update(
        checkpoint=str(checkpoint),
        dataset=dataset,
        root=root,
        split=split,
        skipped_files=len(skipped),
        skipped=[p for p, _ in skipped],
    )
    if acc.is_main_process:
        out = Path(out_dir) if out_dir is not None else checkpoint / f"eval_{dataset}_{split}"
        out.mkdir(parents=True, exist_ok=True)
        (out / "metrics.json").write_text(json.dumps(results, indent=2))
        plot_confusion(
            results["confusion_matrix"], meta["class_names"], out / "confusion_matrix.png"
        )
        results["out_dir"] = str(out)
    # every process leaves together, through an orderly shutdown of the process group: a
    # process that exits with gloo's threads still running aborts ("terminate called
    # without an active exception") and fails the whole torchrun
    acc.wait_for_everyone()
    acc.end_training()
    return results
