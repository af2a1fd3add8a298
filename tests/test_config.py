"""Tests for vit.config: YAML round trip, dotted overrides, and every kind of rejection."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest
import yaml

from vit.config import (
    CHOICES,
    Config,
    ConfigError,
    load_config,
    parse_override,
    save_config,
)

REPO = Path(__file__).resolve().parents[1]
SHIPPED = sorted((REPO / "configs").glob("*.yaml"))


def write_yaml(path: Path, values: dict) -> Path:
    path.write_text(yaml.safe_dump(values))
    return path


def test_defaults_validate_and_round_trip(tmp_path):
    cfg = load_config(None, ["log.name=x"])
    assert cfg == dataclasses.replace(Config(), log=dataclasses.replace(Config().log, name="x"))
    save_config(cfg, tmp_path / "c.yaml")
    assert load_config(tmp_path / "c.yaml") == cfg


def test_round_trip_of_a_changed_config(tmp_path):
    cfg = load_config(
        REPO / "configs" / "fashion_mnist.yaml",
        [
            "optim.lr=5e-4",
            "optim.layer_decay=0.75",
            "aug.scale=[0.5, 1]",
            "aug.mean=[0.5]",
            "aug.std=[0.25]",
            "model.options.qk_norm=true",
            "train.max_steps=7",
            "data.val_split=null",
        ],
    )
    save_config(cfg, tmp_path / "resolved.yaml")
    back = load_config(tmp_path / "resolved.yaml")
    assert back == cfg
    # tuples come back as tuples (YAML has only lists), floats as floats
    assert back.aug.scale == (0.5, 1.0) and isinstance(back.aug.scale[1], float)
    assert back.optim.lr == 5e-4 and back.log.name == "fashion_mnist"


@pytest.mark.parametrize(
    "text, section, name, value",
    [
        ("optim.lr=5e-4", "optim", "lr", 5e-4),  # YAML 1.1 reads 5e-4 as a string
        ("optim.lr=1E-3", "optim", "lr", 1e-3),
        ("optim.lr=2", "optim", "lr", 2.0),  # int to float is lossless
        ("optim.clip_grad=null", "optim", "clip_grad", None),
        ("train.epochs=3", "train", "epochs", 3),
        ("train.ema=true", "train", "ema", True),
        ("data.root=/some/where", "data", "root", "/some/where"),
        ("aug.ratio=[0.5, 2.0]", "aug", "ratio", (0.5, 2.0)),
        ("aug.mean=[0.1, 0.2, 0.3]", "aug", "mean", (0.1, 0.2, 0.3)),
    ],
)
def test_dotted_overrides(text, section, name, value):
    extra = ["aug.std=[1, 1, 1]"] if name == "mean" else []
    cfg = load_config(None, ["log.name=t", text, *extra])
    got = getattr(getattr(cfg, section), name)
    assert got == value and type(got) is type(value)


def test_parse_override_nests_keys():
    assert parse_override("a.b.c=5e-4") == {"a": {"b": {"c": "5e-4"}}}
    assert parse_override("a=") == {"a": ""}
    with pytest.raises(ConfigError, match="not of the form"):
        parse_override("optim.lr")


def test_options_merge_key_by_key(tmp_path):
    path = write_yaml(
        tmp_path / "c.yaml", {"model": {"options": {"depth": 2, "embed_dim": 64, "qk_norm": True}}}
    )
    cfg = load_config(path, ["model.options.depth=1", "model.options.num_heads=2"])
    assert cfg.model.options == {"depth": 1, "embed_dim": 64, "qk_norm": True, "num_heads": 2}


@pytest.mark.parametrize(
    "override, shown",
    [
        ("model.options.mlp_ratio=abc", "model.options.mlp_ratio: expected float, got str"),
        ("model.options.depth=2.5", "model.options.depth: expected int, got float 2.5"),
        ("model.options.qkv_bias=maybe", "model.options.qkv_bias: expected bool"),
        ("model.options.extra=3", "model.options.extra: expected a mapping"),
        ("model.options.stem_channels=[16,a]", "model.options.stem_channels[1]: expected int"),
    ],
    ids=lambda v: v.split("=")[0] if "=" in v else None,
)
def test_model_options_of_the_wrong_type_name_the_key(override, shown):
    with pytest.raises(ConfigError, match=re.escape(shown)):
        load_config(None, [override])


def test_model_options_of_the_right_type_pass():
    options = ["model.options.mlp_ratio=3", "model.options.init_values=null"]
    cfg = load_config(None, [*options, "model.options.stem_channels=[16,32,48]"])
    assert cfg.model.options["stem_channels"] == [16, 32, 48]


def test_later_overrides_win():
    cfg = load_config(None, ["log.name=t", "optim.lr=1e-2", "optim.lr=3e-3"])
    assert cfg.optim.lr == 3e-3


@pytest.mark.parametrize(
    "text, words",
    [
        ("optim.lrr=1e-3", ["unknown config key", "optim.lrr", "lr"]),
        ("optimizer.lr=1e-3", ["unknown config key", "optimizer"]),
        ("train.epochs=2.5", ["train.epochs", "expected int", "2.5"]),
        ("train.epochs=ten", ["train.epochs", "expected int"]),
        ("train.epochs=true", ["train.epochs", "expected int"]),  # bool is not an int here
        ("train.ema=1", ["train.ema", "expected bool"]),
        ("train.ema=yes", ["train.ema", "expected bool"]),  # YAML 1.2: yes is a string
        ("optim.lr=fast", ["optim.lr", "expected float"]),
        ("data.root=5", ["data.root"]),
        ("aug.scale=[0.5]", ["aug.scale", "expected 2 values"]),
        ("aug.scale=0.5", ["aug.scale", "expected a list"]),
        ("aug.scale=[0.5, x]", ["aug.scale[1]", "expected float"]),
        ("model.options=3", ["model.options", "expected a mapping"]),
        ("model=3", ["model", "expected a mapping"]),
    ],
)
def test_bad_override_names_its_key(text, words):
    with pytest.raises(ConfigError) as info:
        load_config(None, ["log.name=t", text])
    for word in words:
        assert word in str(info.value)


def test_no_stays_a_string_in_files(tmp_path):
    # YAML 1.1 would read these as False and reject the string fields
    (tmp_path / "c.yaml").write_text("train:\n  mixed_precision: no\ndata:\n  root: off\n")
    cfg = load_config(tmp_path / "c.yaml")
    assert cfg.train.mixed_precision == "no" and cfg.data.root == "off"


def test_unknown_key_in_file_names_file_and_key(tmp_path):
    path = write_yaml(tmp_path / "bad.yaml", {"train": {"epochs": 2, "epoch": 3}})
    with pytest.raises(ConfigError, match=r"bad\.yaml: unknown config key 'train\.epoch'"):
        load_config(path)


def test_wrong_type_in_file(tmp_path):
    path = write_yaml(tmp_path / "bad.yaml", {"data": {"batch_size": "many"}})
    with pytest.raises(ConfigError, match=r"bad\.yaml: data\.batch_size: expected int"):
        load_config(path)


def test_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "missing.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping at the top level"):
        load_config(tmp_path / "list.yaml")
    (tmp_path / "broken.yaml").write_text("model: {name: [\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(tmp_path / "broken.yaml")


def test_yaml_is_parsed_safely(tmp_path):
    marker = tmp_path / "ran"
    evil = f"model: !!python/object/apply:os.system ['touch {marker}']\n"
    (tmp_path / "evil.yaml").write_text(evil)
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(tmp_path / "evil.yaml")
    assert not marker.exists()


@pytest.mark.parametrize(
    "text, key",
    [
        ("data.batch_size=0", "data.batch_size"),
        ("data.eval_batch_size=-1", "data.eval_batch_size"),
        ("data.val_fraction=1.0", "data.val_fraction"),
        ("data.val_fraction=0", "data.val_fraction"),
        ("train.epochs=0", "train.epochs"),
        ("train.grad_accum_steps=0", "train.grad_accum_steps"),
        ("train.keep_last=0", "train.keep_last"),
        ("train.checkpoint_every_steps=-5", "train.checkpoint_every_steps"),
        ("train.max_steps=0", "train.max_steps"),
        ("train.eval_every=0", "train.eval_every"),
        ("train.ema_decay=1.5", "train.ema_decay"),
        ("log.log_every=0", "log.log_every"),
        ("log.rollout_images=-1", "log.rollout_images"),
        ("optim.lr=0", "optim.lr"),
        ("optim.lr=-1e-3", "optim.lr"),
        ("optim.weight_decay=-0.1", "optim.weight_decay"),
        ("optim.warmup_epochs=-1", "optim.warmup_epochs"),
        ("optim.layer_decay=0", "optim.layer_decay"),
        ("aug.eval_crop_pct=1.5", "aug.eval_crop_pct"),
        ("aug.label_smoothing=1", "aug.label_smoothing"),
        ("aug.randaugment_magnitude=11", "aug.randaugment_magnitude"),
        ("aug.pad=-1", "aug.pad"),
        ("aug.random_erasing=2", "aug.random_erasing"),
        ("aug.mixup=-1", "aug.mixup"),
        ("aug.hflip=1.5", "aug.hflip"),
        ("model.img_size=0", "model.img_size"),
        ("model.drop_path_rate=1.0", "model.drop_path_rate"),
    ],
)
def test_range_errors_name_the_key_and_value(text, key):
    value = yaml.safe_load(text.split("=", 1)[1])
    value = float(value) if isinstance(value, str) else value  # "-1e-3"
    with pytest.raises(ConfigError) as info:
        load_config(None, ["log.name=t", text])
    message = str(info.value)
    assert message.startswith(key + ":"), message
    assert repr(value) in message


def test_cross_field_errors():
    with pytest.raises(ConfigError, match="data.root: the imagefolder data set needs a root"):
        load_config(None, ["log.name=t", "data.dataset=imagefolder"])
    with pytest.raises(ConfigError, match="aug.mean and aug.std must be given together"):
        load_config(None, ["log.name=t", "aug.mean=[0.5]"])


@pytest.mark.parametrize(
    "override, words",
    [
        ("model.name=vit_nonexistent", "unknown model preset 'vit_nonexistent'; known presets:"),
        ("model.options.dpeth=3", "unknown model option(s) ['dpeth']"),
        ("model.options.num_heads=5", "embed_dim 96 is not divisible by num_heads 5"),
        ("model.img_size=30", "image size 30x30 is not a multiple of the patch size 7"),
    ],
)
def test_model_that_cannot_be_built_is_a_config_error(override, words):
    with pytest.raises(ConfigError, match=r"^model: ") as info:
        load_config(None, ["log.name=t", override])
    assert words in str(info.value)


@pytest.mark.parametrize("key", sorted(CHOICES))
def test_choices_enforced(key):
    section, name = key.split(".")
    for good in CHOICES[key]:
        extra = ["data.root=/x"] if good == "imagefolder" else []
        cfg = load_config(None, ["log.name=t", f"{key}={good}", *extra])
        assert getattr(getattr(cfg, section), name) == good
    with pytest.raises(ConfigError, match=rf"{key}: 'bogus' is not one of"):
        load_config(None, ["log.name=t", f"{key}=bogus"])


def test_without_a_file_the_run_gets_a_name():
    assert load_config(None, []).log.name == "run"
    assert load_config(None, ["log.name=mine"]).log.name == "mine"


def test_shipped_configs_found():
    assert any(p.name == "fashion_mnist.yaml" for p in SHIPPED)


@pytest.mark.parametrize("path", SHIPPED, ids=[p.name for p in SHIPPED])
def test_shipped_config_loads_and_round_trips(path, tmp_path):
    cfg = load_config(path)
    assert cfg.log.name == path.stem
    save_config(cfg, tmp_path / "again.yaml")
    assert load_config(tmp_path / "again.yaml") == cfg
