"""Typed, layered run configuration: dataclasses <- YAML file <- dotted command-line overrides.

``load_config("configs/cifar10.yaml", ["optim.lr=5e-4", "train.epochs=10"])`` builds the
defaults, applies the file, then the overrides. Unknown keys and values of the wrong type
are rejected with the dotted key's name; the resolved config can be written back as YAML.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from vit.model import ViTConfig, check_config
from vit.presets import preset_config


class ConfigError(ValueError):
    """A configuration key or value that cannot be used; the message names the key."""


@dataclass
class ModelConfig:
    name: str = "vit_mini_patch7_28"  # a preset of vit.presets
    pretrained: str | None = None  # a timm pretrained name or a timm weight file
    img_size: int | None = None  # None: the preset's size
    drop_rate: float = 0.0
    drop_path_rate: float = 0.0
    options: dict[str, Any] = field(default_factory=dict)  # other ViTConfig fields


@dataclass
class DataConfig:
    dataset: str = "fashion_mnist"  # fashion_mnist | cifar10 | cifar100 | imagefolder
    root: str | None = None  # None: the data set's default location
    download: bool = False  # fetch through torchvision when the files are missing
    train_split: str = "train"
    val_split: str | None = None  # None: carve val_fraction out of the training split
    test_split: str | None = "test"  # what eval.py uses by default
    val_fraction: float = 0.1
    split_seed: int = 0
    batch_size: int = 128  # per process
    eval_batch_size: int = 256
    num_workers: int = -1  # -1: chosen from the CPU count and the data set
    in_memory: bool = True  # decode image folders once and keep uint8 arrays
    bad_files: str = "error"  # error | skip: what a corrupt image in a folder does


@dataclass
class AugConfig:
    crop: str = "pad_crop"  # pad_crop | random_resized | none
    pad: int = 4
    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (0.75, 1.3333333333333333)
    hflip: float = 0.5
    color_jitter: float = 0.0  # strength; 0 turns it off
    randaugment_ops: int = 0  # RandAugment-style: how many ops per image; 0 turns it off
    randaugment_magnitude: int = 9  # 0 to 10
    random_erasing: float = 0.0  # probability
    mixup: float = 0.0  # Beta(alpha, alpha); 0 turns it off
    cutmix: float = 0.0
    mix_prob: float = 1.0
    mix_switch_prob: float = 0.5
    label_smoothing: float = 0.0
    eval_crop_pct: float = 1.0  # resize to size / crop_pct, then centre-crop (0.875 for ImageNet)
    mean: tuple[float, ...] | None = None  # None: the data set's statistics
    std: tuple[float, ...] | None = None


@dataclass
class OptimConfig:
    lr: float = 1e-3  # peak learning rate
    min_lr: float = 1e-5
    warmup_lr: float = 1e-6
    warmup_epochs: float = 1.0
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    layer_decay: float | None = None  # layer-wise learning-rate decay, e.g. 0.65 for fine-tuning
    clip_grad: float | None = 1.0  # max gradient norm; None turns clipping off


@dataclass
class TrainConfig:
    epochs: int = 10
    max_steps: int | None = None  # stop after this many optimiser steps (for quick runs)
    grad_accum_steps: int = 1
    mixed_precision: str = "no"  # no | bf16 | fp16
    ema: bool = False
    ema_decay: float = 0.9998
    compile: bool = False
    seed: int = 0
    eval_every: int = 1  # epochs
    checkpoint_every_steps: int = 0  # 0: only at epoch ends
    keep_last: int = 2  # step checkpoints kept for resuming
    stop_on_nonfinite: bool = True


@dataclass
class LogConfig:
    output_dir: str = "runs"
    name: str | None = None  # None: the config file's stem
    log_every: int = 50  # optimiser steps between scalar logs
    tensorboard: bool = True
    rollout_images: int = 8  # first validation images pictured at each evaluation; 0: none


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    aug: AugConfig = field(default_factory=AugConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    log: LogConfig = field(default_factory=LogConfig)

    def to_dict(self) -> dict:
        return _to_plain(dataclasses.asdict(self))


FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


class _Loader(yaml.SafeLoader):
    """The safe loader with YAML 1.2 booleans (true/false only).

    YAML 1.1 also reads yes/no/on/off as booleans, which would turn
    ``train.mixed_precision=no`` into False.
    """


_BOOL = "tag:yaml.org,2002:bool"
_Loader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != _BOOL]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver(
    _BOOL, re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF")
)


def _read_yaml(text: str | typing.TextIO) -> Any:
    return yaml.load(text, Loader=_Loader)  # a SafeLoader: builds plain data only


CHOICES = {
    "data.dataset": ("fashion_mnist", "cifar10", "cifar100", "imagefolder"),
    "data.bad_files": ("error", "skip"),
    "aug.crop": ("pad_crop", "random_resized", "none"),
    "train.mixed_precision": ("no", "bf16", "fp16"),
}


def _to_plain(value: Any) -> Any:
    """Tuples to lists, recursively, so the dict dumps as plain YAML."""
    if isinstance(value, dict):
        return {k: _to_plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_to_plain(v) for v in value]
    return value


def _coerce(key: str, value: Any, hint: Any) -> Any:
    """Check ``value`` against the type hint ``hint``; convert where lossless (int to float)."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(hint)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(key, value, arg)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{key}: {value!r} fits no type")
    if hint is Any:
        return value
    if origin is tuple:
        args = typing.get_args(hint)
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(f"{key}[{i}]", v, args[0]) for i, v in enumerate(value))
        if len(value) != len(args):
            raise ConfigError(f"{key}: expected {len(args)} values, got {len(value)}")
        return tuple(_coerce(f"{key}[{i}]", v, a) for i, (v, a) in enumerate(zip(value, args)))
    if origin is list:
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        (arg,) = typing.get_args(hint)
        return [_coerce(f"{key}[{i}]", v, arg) for i, v in enumerate(value)]
    if origin is dict or hint is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return dict(value)
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is float and isinstance(value, str) and FLOAT.fullmatch(value.strip()):
        return float(value)  # YAML 1.1 reads 5e-4 (no dot) as a string
    if hint in (int, float, str, bool):
        if type(value) is not hint:
            raise ConfigError(
                f"{key}: expected {hint.__name__}, got {type(value).__name__} {value!r}"
            )
        return value
    raise ConfigError(f"{key}: unsupported type {hint}")


def _apply(obj: Any, values: dict, prefix: str = "") -> None:
    """Set fields of a dataclass instance from a nested dict, checking names and types."""
    hints = typing.get_type_hints(type(obj))
    names = {f.name for f in dataclasses.fields(obj)}
    for name, value in values.items():
        key = f"{prefix}{name}"
        if name not in names:
            known = ", ".join(sorted(names))
            raise ConfigError(f"unknown config key {key!r} (known here: {known})")
        current = getattr(obj, name)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise ConfigError(f"{key}: expected a mapping of its fields, got {value!r}")
            _apply(current, value, f"{key}.")
        else:
            value = _coerce(key, value, hints[name])
            if isinstance(current, dict):
                value = {**current, **value}  # free-form mappings merge, key by key
            if key in CHOICES and value not in CHOICES[key]:
                raise ConfigError(f"{key}: {value!r} is not one of {CHOICES[key]}")
            setattr(obj, name, value)


def parse_override(text: str) -> dict:
    """``"optim.lr=5e-4"`` -> ``{"optim": {"lr": 0.0005}}``; the value is read as YAML."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} is not of the form key.path=value")
    key, raw = text.split("=", 1)
    try:
        value = _read_yaml(raw) if raw else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"override {key}: cannot parse value {raw!r} ({e})") from e
    nested: dict = value
    for part in reversed(key.strip().split(".")):
        nested = {part: nested}
    return nested


def load_config(path: str | Path | None = None, overrides: list[str] = ()) -> Config:
    """Defaults, then the YAML file at ``path``, then each ``key.path=value`` override."""
    cfg = Config()
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        with open(path) as f:
            try:
                values = _read_yaml(f) or {}
            except yaml.YAMLError as e:
                raise ConfigError(f"{path}: not valid YAML ({e})") from e
        if not isinstance(values, dict):
            raise ConfigError(f"{path}: expected a mapping at the top level")
        try:
            _apply(cfg, values)
        except ConfigError as e:
            raise ConfigError(f"{path}: {e}") from None
        if cfg.log.name is None:
            cfg.log.name = path.stem
    for text in overrides:
        _apply(cfg, parse_override(text))
    if cfg.log.name is None:
        cfg.log.name = "run"  # no file to take the name from
    validate(cfg)
    return cfg


def validate(cfg: Config) -> None:
    """Cross-field and range checks that types alone cannot express."""
    checks = [
        ("data.batch_size", cfg.data.batch_size >= 1, "must be at least 1"),
        ("data.eval_batch_size", cfg.data.eval_batch_size >= 1, "must be at least 1"),
        ("data.val_fraction", 0.0 < cfg.data.val_fraction < 1.0, "must be in (0, 1)"),
        ("train.epochs", cfg.train.epochs >= 1, "must be at least 1"),
        ("train.grad_accum_steps", cfg.train.grad_accum_steps >= 1, "must be at least 1"),
        ("train.keep_last", cfg.train.keep_last >= 1, "must be at least 1"),
        ("train.checkpoint_every_steps", cfg.train.checkpoint_every_steps >= 0, "must be >= 0"),
        ("train.eval_every", cfg.train.eval_every >= 1, "must be at least 1"),
        ("train.ema_decay", 0.0 < cfg.train.ema_decay < 1.0, "must be in (0, 1)"),
        ("log.log_every", cfg.log.log_every >= 1, "must be at least 1"),
        ("log.rollout_images", cfg.log.rollout_images >= 0, "must be >= 0"),
        ("optim.lr", cfg.optim.lr > 0, "must be positive"),
        ("optim.weight_decay", cfg.optim.weight_decay >= 0, "must be >= 0"),
        ("optim.warmup_epochs", cfg.optim.warmup_epochs >= 0, "must be >= 0"),
        ("aug.eval_crop_pct", 0.0 < cfg.aug.eval_crop_pct <= 1.0, "must be in (0, 1]"),
        ("aug.label_smoothing", 0.0 <= cfg.aug.label_smoothing < 1.0, "must be in [0, 1)"),
        ("aug.randaugment_magnitude", 0 <= cfg.aug.randaugment_magnitude <= 10, "0 to 10"),
        ("aug.randaugment_ops", cfg.aug.randaugment_ops >= 0, "must be >= 0"),
        ("aug.pad", cfg.aug.pad >= 0, "must be >= 0"),
        ("aug.mixup", cfg.aug.mixup >= 0, "must be >= 0"),
        ("aug.cutmix", cfg.aug.cutmix >= 0, "must be >= 0"),
        (
            "model.img_size",
            cfg.model.img_size is None or cfg.model.img_size > 0,
            "must be positive",
        ),
        ("model.drop_rate", 0.0 <= cfg.model.drop_rate < 1.0, "must be in [0, 1)"),
        ("model.drop_path_rate", 0.0 <= cfg.model.drop_path_rate < 1.0, "must be in [0, 1)"),
    ]
    for key in ("hflip", "random_erasing", "mix_prob", "mix_switch_prob"):
        value = getattr(cfg.aug, key)
        checks.append((f"aug.{key}", 0.0 <= value <= 1.0, "must be a probability in [0, 1]"))
    if cfg.optim.layer_decay is not None:
        checks.append(("optim.layer_decay", 0 < cfg.optim.layer_decay <= 1, "must be in (0, 1]"))
    if cfg.train.max_steps is not None:
        checks.append(("train.max_steps", cfg.train.max_steps >= 1, "must be at least 1"))
    for key, ok, why in checks:
        if not ok:
            section, name = key.split(".")
            value = getattr(getattr(cfg, section), name)
            raise ConfigError(f"{key}: {value!r} {why}")
    if cfg.data.dataset == "imagefolder" and cfg.data.root is None:
        raise ConfigError("data.root: the imagefolder data set needs a root folder")
    if (cfg.aug.mean is None) != (cfg.aug.std is None):
        raise ConfigError("aug.mean and aug.std must be given together")
    _check_architecture(cfg.model)


def model_config(cfg: ModelConfig, num_classes: int):
    """The ViTConfig a run's model section describes."""
    overrides = dict(cfg.options)
    overrides.update(
        num_classes=num_classes, drop_rate=cfg.drop_rate, drop_path_rate=cfg.drop_path_rate
    )
    if cfg.img_size is not None:
        overrides["img_size"] = cfg.img_size
    return preset_config(cfg.name, **overrides)


def _check_architecture(model: ModelConfig) -> None:
    """The preset exists, its options are ViTConfig fields of the right types and the result
    can be built."""
    hints = typing.get_type_hints(ViTConfig)
    for name, value in model.options.items():
        if name in hints:  # an unknown name is reported with the preset's fields below
            _coerce(f"model.options.{name}", value, hints[name])
    try:
        check_config(model_config(model, num_classes=1))  # the class count comes from the data
    except (ValueError, TypeError) as e:
        raise ConfigError(f"model: {e}") from e


def save_config(cfg: Config, path: str | Path) -> None:
    """Write the resolved config as YAML (it loads back to an equal Config)."""
    with open(path, "w") as f:
        yaml.safe_dump(cfg.to_dict(), f, sort_keys=False)
