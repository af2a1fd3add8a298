"""Rollout pictures during training: TensorBoard images at each evaluation, PNGs with the best
checkpoint, and no effect on the training itself."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers_train import read_metrics, train, write_fashion
from PIL import Image
from safetensors.torch import load_file
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

PICTURED = 3
# random draws from torch (drop path, two blocks) and NumPy (mixup): a picture that drew
# from either generator would change the weights
RECIPE = [
    "data.val_split=test",
    "data.batch_size=8",
    "train.epochs=2",
    "train.eval_every=1",
    "model.options.depth=2",
    "model.drop_path_rate=0.2",
    "aug.mixup=0.8",
    "log.log_every=1",
    "log.tensorboard=true",
]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[int, Path]:
    """The same run with PICTURED images pictured and with none."""
    tmp = tmp_path_factory.mktemp("rollout_runs")
    root = write_fashion(tmp / "fashion", n_train=40, n_test=5)
    out = {}
    for n in (PICTURED, 0):
        extra = [f"data.root={root}", *RECIPE, f"log.rollout_images={n}"]
        assert train(tmp / "runs", f"n{n}", *extra) == 0
        out[n] = tmp / "runs" / f"n{n}"
    return out


def image_events(run: Path) -> dict[str, list]:
    """Image summaries of a run's TensorBoard file, by tag."""
    # the run's own event file; the hparams summary sits in a subfolder of its own
    acc = EventAccumulator(str(run / "tensorboard"), size_guidance={"images": 0})
    acc.Reload()
    return {tag: acc.Images(tag) for tag in acc.Tags()["images"]}


def test_best_checkpoint_holds_titled_overlays_and_a_grid(runs):
    folder = runs[PICTURED] / "checkpoints" / "best" / "rollout"
    overlays = sorted(folder.glob("*_overlay.png"))
    assert [p.name for p in overlays] == [f"val_{i:03d}_overlay.png" for i in range(PICTURED)]
    assert len(list(folder.glob("*_map.npy"))) == PICTURED
    for png in [*overlays, folder / "grid.png"]:
        with Image.open(png) as im:
            im.load()
            # 28x28 images are enlarged ten times so that the title fits (save_overlay_png)
            assert png.name == "grid.png" or im.size == (280, 280)


def test_tensorboard_gets_the_overlays_at_each_evaluation(runs):
    events = image_events(runs[PICTURED])
    assert sorted(events) == [f"rollout/val_{i:03d}" for i in range(PICTURED)]
    eval_steps = [m["step"] for m in read_metrics(runs[PICTURED]) if "val/top1" in m]
    assert len(eval_steps) == 2
    for images in events.values():
        assert [e.step for e in images] == eval_steps
        assert (images[0].width, images[0].height) == (28, 28)  # the image's own size


def test_zero_images_pictures_nothing_and_trains_the_same(runs):
    assert not (runs[0] / "checkpoints" / "best" / "rollout").exists()
    assert image_events(runs[0]) == {}
    pictured, plain = (load_file(runs[n] / "checkpoints/last/model.safetensors") for n in runs)
    assert pictured.keys() == plain.keys()
    for key in pictured:
        assert pictured[key].equal(plain[key]), key
