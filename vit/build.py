"""Building a run's parts from its config: the model and the data sets."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

from vit.config import Config, ConfigError, ModelConfig, model_config
from vit.data import DATASET_STATS, Subset, build_source, split_indices
from vit.loader import AugmentedDataset
from vit.model import VisionTransformer
from vit.timm_compat import load_pretrained
from vit.transforms import BatchNormalize, eval_transform, normalizes_per_batch, train_transform

logger = logging.getLogger(__name__)


@dataclass
class DataBundle:
    """The training and validation sets, and what inference needs to know about them."""

    train: AugmentedDataset
    val: AugmentedDataset
    class_names: list[str]
    img_size: tuple[int, int]
    in_chans: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    skipped: list[tuple[str, str]]  # bad files dropped under data.bad_files=skip


def build_model(cfg: ModelConfig, num_classes: int) -> VisionTransformer:
    """A fresh model from the preset, or one starting from timm weights when asked."""
    vit_cfg = model_config(cfg, num_classes)
    if cfg.pretrained is None:
        return VisionTransformer(vit_cfg)
    try:
        model = load_pretrained(
            cfg.pretrained,
            preset=cfg.name,
            num_classes=num_classes,
            img_size=vit_cfg.img_size,
            drop_rate=cfg.drop_rate,
            drop_path_rate=cfg.drop_path_rate,
        )
    except ValueError as e:  # weights that do not fit the preset, or an unreadable file
        raise ConfigError(f"model.pretrained: {e}") from e
    logger.info("model weights from %s", cfg.pretrained)
    return model


def normalisation(cfg: Config, channels: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Mean and std from the config, else the data set's, matched to the channel count."""
    if cfg.aug.mean is not None:
        mean, std = tuple(cfg.aug.mean), tuple(cfg.aug.std)
    else:
        mean, std = DATASET_STATS.get(cfg.data.dataset, DATASET_STATS["imagenet"])
    if len(mean) != channels:
        if len(mean) == 1 or channels == 1:
            # gray statistics for RGB input or the reverse: use their average for every channel
            mean = (sum(mean) / len(mean),) * channels
            std = (sum(std) / len(std),) * channels
        else:
            raise ValueError(f"aug.mean has {len(mean)} values for a {channels}-channel model")
    return mean, std


def build_data(cfg: Config, img_size: tuple[int, int], channels: int) -> DataBundle:
    """Training and validation sets with their transforms; validation carved out if needed."""
    d = cfg.data
    source = build_source(
        d.dataset, d.root, d.train_split, d.download, channels, d.bad_files, d.in_memory
    )
    skipped = list(getattr(source, "skipped", []))
    if d.val_split is not None:
        val_source = build_source(
            d.dataset,
            d.root,
            d.val_split,
            d.download,
            channels,
            d.bad_files,
            d.in_memory,
            class_names=source.class_names,
        )
        skipped += list(getattr(val_source, "skipped", []))
        train_source = source
    else:
        train_idx, val_idx = split_indices(source.labels, d.val_fraction, d.split_seed)
        if len(val_idx) == 0:
            # each class rounds its share down to nothing: fail now, not after an epoch
            raise ConfigError(
                f"data.val_fraction: {d.val_fraction} of {len(source)} training images "
                f"in {len(source.class_names)} classes leaves no validation image; raise "
                "it or set data.val_split"
            )
        train_source, val_source = Subset(source, train_idx), Subset(source, val_idx)
    mean, std = normalisation(cfg, channels)
    val_tf = eval_transform(img_size, mean, std, cfg.aug.eval_crop_pct)
    return DataBundle(
        train=train_dataset(train_source, cfg, img_size, mean, std),
        val=AugmentedDataset(val_source, val_tf),
        class_names=list(source.class_names),
        img_size=img_size,
        in_chans=channels,
        mean=mean,
        std=std,
        skipped=skipped,
    )


def train_dataset(
    source, cfg: Config, img_size: tuple[int, int], mean: tuple[float, ...], std: tuple[float, ...]
) -> AugmentedDataset:
    """The augmented training set: each image augmented alone, then normalised by batch
    (unless random erasing needs normalised images; then each image alone as well)."""
    per_batch = normalizes_per_batch(cfg.aug)
    transform = train_transform(cfg.aug, img_size, mean, std, normalize=not per_batch)
    collate = BatchNormalize(mean, std) if per_batch else None
    return AugmentedDataset(source, transform, seed=cfg.train.seed, collate=collate)


def default_workers(cfg: Config, img_size: tuple[int, int]) -> int:
    """Loader workers: as asked, or 0 for small in-memory images (decoding nothing, the
    main process keeps up and a worker would only take a core from the model)."""
    if cfg.data.num_workers >= 0:
        return cfg.data.num_workers
    in_memory = cfg.data.dataset != "imagefolder" or cfg.data.in_memory
    if in_memory and max(img_size) <= 64:
        return 0
    return min(8, max(1, (os.cpu_count() or 2) - 1))
