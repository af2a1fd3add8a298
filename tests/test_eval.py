"""Evaluating checkpoint folders: values against a direct computation, reports, bad data,
and class lists that differ from the checkpoint's."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers_train import add_bad_files, torchrun, train, write_cifar10, write_folder
from PIL import Image

from vit.checkpoint import load_model
from vit.cli import eval_main
from vit.evaluation import evaluate_checkpoint

CLASSES = ["ant", "bee", "cow"]
SIZE = 16  # test images are made at the model's size, so evaluation does not resize them


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """The best checkpoint of a short run on a PNG folder with train/ and test/ splits."""
    tmp = tmp_path_factory.mktemp("eval")
    root = tmp / "data"
    write_folder(root / "train", per_class=10, size=(20, 24))
    write_folder(root / "test", per_class=5, size=(SIZE, SIZE), seed=1)
    extra = [
        "model.name=vit_tiny_patch4_32",
        f"model.img_size={SIZE}",
        "aug.crop=random_resized",
        "data.dataset=imagefolder",
        f"data.root={root}",
        "data.val_fraction=0.2",
        "data.batch_size=8",
        "train.max_steps=6",
        "optim.warmup_epochs=0",
    ]
    assert train(tmp / "runs", "r", *extra) == 0
    return tmp / "runs" / "r" / "checkpoints" / "best"


def direct_metrics(checkpoint: Path, folder: Path) -> dict:
    """Top-1, loss and per-class accuracy computed straight from the files."""
    model, meta = load_model(checkpoint)
    mean, std = np.array(meta["mean"]), np.array(meta["std"])
    images, labels = [], []
    for label, name in enumerate(meta["class_names"]):
        for path in sorted((folder / name).glob("*.png")):
            pixels = np.asarray(Image.open(path).convert("RGB"), dtype=np.float64) / 255
            images.append(((pixels - mean) / std).transpose(2, 0, 1))  # C, H, W
            labels.append(label)
    x = torch.tensor(np.stack(images), dtype=torch.float32)
    y = torch.tensor(labels)
    with torch.no_grad():
        logits = model(x)
    correct = (logits.argmax(1) == y).double()
    per_class = {n: 100 * correct[y == k].mean().item() for k, n in enumerate(CLASSES)}
    loss = F.cross_entropy(logits, y).item()
    return {"samples": len(y), "top1": 100 * correct.mean().item(), "loss": loss, **per_class}


def test_report_matches_a_direct_computation(checkpoint):
    r = evaluate_checkpoint(checkpoint)  # data options from the checkpoint's config
    want = direct_metrics(checkpoint, Path(r["root"]) / "test")
    assert r["split"] == "test" and r["dataset"] == "imagefolder"
    assert r["samples"] == want["samples"] == 15 and r["skipped_files"] == 0
    assert r["top1"] == pytest.approx(want["top1"])
    assert r["loss"] == pytest.approx(want["loss"], rel=1e-5)
    for name in CLASSES:
        assert r["per_class_accuracy"][name] == pytest.approx(want[name])
    assert 0.0 <= r["ece"] <= 1.0 and r["top5"] == 100.0  # three classes
    out = checkpoint / "eval_imagefolder_test"  # the default report folder
    assert r["out_dir"] == str(out)
    assert json.loads((out / "metrics.json").read_text())["top1"] == r["top1"]
    with Image.open(out / "confusion_matrix.png") as im:
        assert im.size[0] > 300
    shutil.rmtree(out)


def copy_test_split(checkpoint: Path, tmp_path: Path) -> Path:
    """A copy of the checkpoint's data with its test split, to spoil."""
    source = checkpoint.parents[3] / "data" / "test"
    root = tmp_path / "data"
    shutil.copytree(source, root / "test")
    return root


def test_bad_files_skipped_and_counted(checkpoint, tmp_path, capsys):
    root = copy_test_split(checkpoint, tmp_path)
    bad = add_bad_files(root / "test")
    (root / "test" / "zz_empty_class").rmdir()  # the classes stay the checkpoint's
    argv = ["--checkpoint", str(checkpoint), "--root", str(root), "--out", str(tmp_path / "o")]
    assert eval_main([*argv, "--bad-files", "skip"]) == 0
    assert "skipped 4" in capsys.readouterr().out
    report = json.loads((tmp_path / "o" / "metrics.json").read_text())
    assert report["skipped_files"] == 4 and report["skipped"] == [str(p) for p in bad]
    assert report["samples"] == 15 + 1  # add_bad_files also adds one good JPEG

    assert eval_main(argv) == 2  # --bad-files error is the default
    assert str(bad[0]) in capsys.readouterr().err


@pytest.mark.parametrize(
    "change, words",
    [
        ("extra", ["folders not in class_names", "dog"]),
        ("missing", ["missing folders", "cow"]),
        ("renamed", ["missing folders: ['ant']", "['fly']"]),
    ],
)
def test_other_classes_are_an_error(change, words, checkpoint, tmp_path, capsys):
    root = copy_test_split(checkpoint, tmp_path)
    test = root / "test"
    if change == "extra":
        shutil.copytree(test / "ant", test / "dog")
    elif change == "missing":
        shutil.rmtree(test / "cow")
    else:
        (test / "ant").rename(test / "fly")
    assert eval_main(["--checkpoint", str(checkpoint), "--root", str(root)]) == 2
    err = capsys.readouterr().err
    assert all(word in err for word in words), err


def test_another_data_set_with_other_classes_is_an_error(checkpoint, tmp_path, capsys):
    write_cifar10(tmp_path)
    argv = ["--checkpoint", str(checkpoint), "--dataset", "cifar10", "--root", str(tmp_path)]
    assert eval_main(argv) == 2
    err = capsys.readouterr().err
    assert "class_names" in err and "airplane" in err


def test_not_a_checkpoint(tmp_path, capsys):
    assert eval_main(["--checkpoint", str(tmp_path)]) == 2
    assert "not a checkpoint folder" in capsys.readouterr().err


def test_torchrun_counts_each_sample_once(checkpoint, tmp_path):
    """eval.py in two processes: 15 test images (8 and 7), each counted exactly once."""
    out = tmp_path / "o"
    args = ["--checkpoint", str(checkpoint), "--out", str(out), "--batch-size", "3"]
    done = torchrun("eval.py", *args)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((out / "metrics.json").read_text())
    one = evaluate_checkpoint(checkpoint, out_dir=tmp_path / "one")
    assert report["samples"] == one["samples"] == 15
    assert report["confusion_matrix"] == one["confusion_matrix"]
    assert report["loss"] == pytest.approx(one["loss"], rel=1e-6)
    assert done.stdout.count("15 images") == 1  # printed by the main process only
