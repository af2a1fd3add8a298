"""End-to-end training on tiny files in each real format; torchrun on CPU; real Fashion-MNIST."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers_train import (
    DEFAULT_CONFIG,
    add_bad_files,
    overrides,
    read_metrics,
    subprocess_env,
    torchrun,
    train,
    train_command,
    write_cifar10,
    write_cifar100,
    write_fashion,
    write_folder,
)
from safetensors.torch import load_file

from vit.checkpoint import load_model, read_meta
from vit.cli import eval_main
from vit.config import load_config
from vit.data import FASHION_MNIST_CLASSES
from vit.images import BadImageError
from vit.trainer import fit

FASHION_ROOT = Path("/usr/share/datasets/fashion-mnist")
CIFAR_MODEL = ["model.name=vit_tiny_patch4_32"]
FOLDER_MODEL = [*CIFAR_MODEL, "model.img_size=16", "aug.crop=random_resized"]


def make_fashion(tmp: Path) -> tuple[list[str], int, list[str]]:
    root = write_fashion(tmp / "fashion", n_train=48, n_test=21)
    return [f"data.root={root}"], 21, list(FASHION_MNIST_CLASSES)


def make_cifar10(tmp: Path) -> tuple[list[str], int, list[str]]:
    root = write_cifar10(tmp / "c10", per_batch=10, n_test=9)
    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse"]
    names += ["ship", "truck"]
    return [*CIFAR_MODEL, "data.dataset=cifar10", f"data.root={root}"], 9, names


def make_cifar100(tmp: Path) -> tuple[list[str], int, list[str]]:
    root = write_cifar100(tmp / "c100", n_train=40, n_test=9)
    names = [f"c{k:03d}" for k in range(100)]
    data = ["data.dataset=cifar100", f"data.root={root}", "data.val_split=test"]
    return [*CIFAR_MODEL, *data], 9, names


def make_folder(tmp: Path, ext: str) -> tuple[list[str], int, list[str]]:
    root = tmp / f"folder{ext}"
    write_folder(root / "train", per_class=10, ext=ext)
    write_folder(root / "test", per_class=3, ext=ext, seed=1)
    data = ["data.dataset=imagefolder", f"data.root={root}", "data.val_fraction=0.2"]
    return [*FOLDER_MODEL, *data], 9, ["ant", "bee", "cow"]


KINDS = {
    "fashion_mnist": make_fashion,
    "cifar10": make_cifar10,
    "cifar100": make_cifar100,
    "imagefolder_png": lambda tmp: make_folder(tmp, ".png"),
    "imagefolder_jpeg": lambda tmp: make_folder(tmp, ".jpg"),
}


def assert_checkpoint(folder: Path, class_names: list[str], in_chans: int) -> None:
    assert (folder / "model.safetensors").is_file() and (folder / "meta.json").is_file()
    meta = read_meta(folder)
    assert meta["class_names"] == class_names and meta["in_chans"] == in_chans
    model, _ = load_model(folder)  # the folder alone rebuilds the model
    assert model.num_classes == len(class_names)
    h, w = meta["img_size"]
    logits = model(torch.zeros(2, in_chans, h, w))
    assert logits.shape == (2, len(class_names)) and torch.isfinite(logits).all()


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_a_few_steps_then_eval(kind, tmp_path, capsys):
    data, n_test, class_names = KINDS[kind](tmp_path)
    rc = train(tmp_path / "runs", "r", *data, "data.batch_size=8", "train.max_steps=3")
    assert rc == 0
    run = tmp_path / "runs" / "r"
    in_chans = 1 if kind == "fashion_mnist" else 3
    for which in ("best", "last"):
        assert_checkpoint(run / "checkpoints" / which, class_names, in_chans)
    assert (run / "checkpoints" / "last" / "training_state.pt").is_file()
    assert (run / "config.yaml").is_file()
    metrics = read_metrics(run)
    assert [m["step"] for m in metrics if "val/top1" in m] == [3]
    assert all(np.isfinite(m["train/loss"]) for m in metrics if "train/loss" in m)

    out = tmp_path / "eval"
    assert eval_main(["--checkpoint", str(run / "checkpoints" / "best"), "--out", str(out)]) == 0
    report = json.loads((out / "metrics.json").read_text())
    assert report["samples"] == n_test and report["split"] == "test"
    assert list(report["per_class_accuracy"]) == class_names
    assert np.asarray(report["confusion_matrix"]).sum() == n_test
    assert (out / "confusion_matrix.png").stat().st_size > 1000
    assert f"{n_test} images" in capsys.readouterr().out


def test_options_run_together(tmp_path):
    """Mixup and CutMix with label smoothing, EMA, gradient accumulation and layer decay."""
    data, _, _ = make_fashion(tmp_path)
    extra = [
        *data,
        "data.batch_size=4",
        "train.grad_accum_steps=2",
        "train.max_steps=4",
        "train.ema=true",
        "train.ema_decay=0.9",
        "aug.mixup=0.8",
        "aug.cutmix=1.0",
        "aug.label_smoothing=0.1",
        "aug.random_erasing=0.25",
        "optim.layer_decay=0.75",
        "model.drop_path_rate=0.1",
        "log.log_every=1",
        "log.tensorboard=true",
    ]
    assert train(tmp_path / "runs", "all", *extra) == 0
    run = tmp_path / "runs" / "all"
    metrics = read_metrics(run)
    assert [m["step"] for m in metrics if "train/loss" in m] == [1, 2, 3, 4]
    val = [m for m in metrics if "val/top1" in m][-1]
    assert "val_ema/top1" in val and val["val/samples"] == val["val_ema/samples"] == 8
    assert read_meta(run / "checkpoints" / "best")["weights"] in ("model", "ema")
    ema = torch.load(run / "checkpoints" / "last" / "training_state.pt", weights_only=True)["ema"]
    weights = load_file(run / "checkpoints" / "last" / "model.safetensors")
    assert ema.keys() == weights.keys()
    assert not all(torch.equal(ema[k], weights[k]) for k in ema)  # the EMA lags the model
    assert list(run.glob("**/events.out.tfevents.*")), "no TensorBoard event file"


def losses_of(run_dir: Path) -> list[float]:
    return [m["train/loss"] for m in read_metrics(run_dir) if "train/loss" in m]


def test_bf16_autocast_keeps_float32_weights(tmp_path):
    """bf16 runs the matmuls in bf16 (the loss moves off the float32 run's) while the
    weights and the optimiser stay float32, and the checkpoint loads as float32."""
    data, _, _ = make_fashion(tmp_path)
    common = [*data, "train.max_steps=3", "data.batch_size=8", "log.log_every=1"]
    assert train(tmp_path / "runs", "fp32", *common) == 0
    # its own process: Accelerate keeps one precision per process
    bf16_run = train_command(tmp_path / "runs", "bf16", *common, "train.mixed_precision=bf16")
    subprocess.run(bf16_run, env=subprocess_env(), check=True, capture_output=True, timeout=120)
    fp32, bf16 = losses_of(tmp_path / "runs" / "fp32"), losses_of(tmp_path / "runs" / "bf16")
    assert len(bf16) == 3 and all(np.isfinite(bf16))
    assert fp32 != bf16  # autocast really ran: bf16 rounding changes the losses...
    np.testing.assert_allclose(bf16, fp32, rtol=0.05)  # ...but not the training
    weights = load_file(tmp_path / "runs" / "bf16" / "checkpoints" / "last" / "model.safetensors")
    assert {w.dtype for w in weights.values()} == {torch.float32}


def test_compiled_model_trains_like_eager(tmp_path):
    """train.compile=true: the same losses as eager to float rounding, and a checkpoint
    whose keys are the plain model's (no ``_orig_mod.`` prefix)."""
    data, _, _ = make_fashion(tmp_path)
    common = [*data, "train.max_steps=2", "data.batch_size=8", "log.log_every=1"]
    common += ["log.rollout_images=2"]
    assert train(tmp_path / "runs", "eager", *common) == 0
    assert train(tmp_path / "runs", "compiled", *common, "train.compile=true") == 0
    eager = losses_of(tmp_path / "runs" / "eager")
    compiled = losses_of(tmp_path / "runs" / "compiled")
    np.testing.assert_allclose(compiled, eager, rtol=1e-4)
    best = tmp_path / "runs" / "compiled" / "checkpoints" / "best"
    eager_best = tmp_path / "runs" / "eager" / "checkpoints" / "best"
    keys = load_file(best / "model.safetensors").keys()
    assert keys == load_file(eager_best / "model.safetensors").keys()
    assert_checkpoint(best, list(FASHION_MNIST_CLASSES), in_chans=1)


def test_grad_accumulation_equals_the_larger_batch(tmp_path):
    """Two micro-batches of 4 take the same steps as one batch of 8 (same samples, in order)."""
    data, _, _ = make_fashion(tmp_path)
    common = [*data, "train.max_steps=3", "log.log_every=1", "aug.hflip=0", "aug.crop=none"]
    assert train(tmp_path / "runs", "big", *common, "data.batch_size=8") == 0
    extra = [*common, "data.batch_size=4", "train.grad_accum_steps=2"]
    assert train(tmp_path / "runs", "accum", *extra) == 0
    losses = {}
    for name in ("big", "accum"):
        rows = read_metrics(tmp_path / "runs" / name)
        losses[name] = [m["train/loss"] for m in rows if "train/loss" in m]
    np.testing.assert_allclose(losses["accum"], losses["big"], rtol=1e-5)
    a = load_file(tmp_path / "runs" / "big" / "checkpoints" / "last" / "model.safetensors")
    b = load_file(tmp_path / "runs" / "accum" / "checkpoints" / "last" / "model.safetensors")
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-4, atol=1e-5)


def test_torchrun_two_processes_match_one(tmp_path):
    """``torchrun --nproc_per_node 2`` on CPU (gloo): the same losses as one process with the
    same global batch, and validation counts each of an odd number of samples once."""
    root = write_fashion(tmp_path / "fashion", n_train=48, n_test=21)
    # dropout, drop path and mixup draw per process, so they are off here
    common = [
        f"data.root={root}",
        "data.val_split=test",  # 21 validation samples: 11 on rank 0, 10 on rank 1
        "data.eval_batch_size=5",  # so the ranks even run different numbers of batches
        "train.max_steps=4",
        "log.log_every=1",
        "aug.mixup=0",
        "model.drop_path_rate=0",
    ]
    out = tmp_path / "runs"
    args = overrides(out, "two", *common, "data.batch_size=4")
    done = torchrun("train.py", "--config", DEFAULT_CONFIG, *args)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "processes 2" in done.stderr + done.stdout
    assert train(out, "one", *common, "data.batch_size=8") == 0

    two, one = read_metrics(out / "two"), read_metrics(out / "one")
    assert len(two) == len(one) == 5  # main process only: one line per step, one validation
    for a, b in zip(two, one):
        assert a["step"] == b["step"]
        for key in ("train/loss", "train/lr", "train/grad_norm", "val/loss", "val/top1"):
            if key in b:
                assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-6), (a["step"], key)
    assert two[-1]["val/samples"] == one[-1]["val/samples"] == 21


@pytest.mark.skipif(
    not (FASHION_ROOT / "t10k-images-idx3-ubyte.gz").is_file(),
    reason=f"real Fashion-MNIST not installed in {FASHION_ROOT} "
    "(apt-get install dataset-fashion-mnist)",
)
def test_real_fashion_mnist_learns(tmp_path):
    """300 steps on the real images beat 70% top-1 on the 10,000 test images.

    The preset, cut to two blocks of width 64 on 7x7 patches (a 4x4 grid) so that the run
    and the evaluation take about 15 s on one core; it reaches about 77%.
    """
    extra = [
        "model.options.depth=2",
        "model.options.embed_dim=64",
        "model.options.patch_size=7",
        "data.num_workers=0",
        "data.val_fraction=0.02",
        "data.batch_size=64",
        "aug.crop=none",  # augmentation pays off over epochs, not in 300 steps
        "aug.hflip=0",
        "aug.label_smoothing=0",
        "optim.lr=2e-3",
        "optim.warmup_epochs=0.02",
        "train.epochs=1",
        "train.max_steps=300",
        "log.tensorboard=false",
        f"log.output_dir={tmp_path}",
        "log.name=real",
    ]
    from vit.cli import train_main

    assert train_main(["--config", DEFAULT_CONFIG, *extra]) == 0
    out = tmp_path / "eval"
    best = tmp_path / "real" / "checkpoints" / "best"
    assert eval_main(["--checkpoint", str(best), "--out", str(out)]) == 0
    report = json.loads((out / "metrics.json").read_text())
    assert report["samples"] == 10_000 and report["split"] == "test"
    assert report["top1"] > 70.0, report["top1"]


def bad_folder(tmp: Path) -> tuple[Path, list[Path]]:
    root = tmp / "bad"
    write_folder(root / "train", per_class=8)
    return root, add_bad_files(root / "train")


def test_bad_files_skipped_are_counted_and_listed(tmp_path):
    root, bad = bad_folder(tmp_path)
    data = ["data.dataset=imagefolder", f"data.root={root}", "data.bad_files=skip"]
    extra = ["data.batch_size=8", "train.max_steps=2"]
    assert train(tmp_path / "runs", "skip", *FOLDER_MODEL, *data, *extra) == 0
    rows = (tmp_path / "runs" / "skip" / "skipped_files.tsv").read_text().splitlines()
    assert [row.split("\t")[0] for row in rows] == [str(p) for p in bad]
    assert all(len(row.split("\t")) == 2 and row.split("\t")[1] for row in rows)  # a reason
    meta = read_meta(tmp_path / "runs" / "skip" / "checkpoints" / "last")
    # the empty class keeps its label; hidden folders are not classes
    assert meta["class_names"] == ["ant", "bee", "cow", "zz_empty_class"]


def test_bad_files_error_names_the_first(tmp_path, capsys):
    root, bad = bad_folder(tmp_path)
    data = ["data.dataset=imagefolder", f"data.root={root}"]  # bad_files=error by default
    assert train(tmp_path / "runs", "error", *FOLDER_MODEL, *data) == 2
    assert capsys.readouterr().err == f"error: {bad[0]}: empty file (0 bytes)\n"
    assert not (tmp_path / "runs" / "error" / "checkpoints").exists()  # stopped before work
    with pytest.raises(BadImageError) as info:  # the same error, for library callers
        fit(load_config(DEFAULT_CONFIG, overrides(tmp_path / "runs", "e2", *FOLDER_MODEL, *data)))
    assert info.value.path == str(bad[0])
