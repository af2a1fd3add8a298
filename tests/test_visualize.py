"""Rollout pictures: where the map lands, the overlay's pixels, ``vit rollout`` and its check."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib
import numpy as np
import pytest
from PIL import Image
from predict_fixtures import (
    CLASS_NAMES,
    CROP_PCT,
    MEAN,
    STD,
    make_checkpoint,
    reference_input,
    save_photos,
    tiny_model,
    truncate,
)

from vit.cli import main
from vit.data import ArraySource
from vit.faithfulness_report import summarise
from vit.loader import AugmentedDataset
from vit.predict import Predictor
from vit.rollout import rollout_maps
from vit.transforms import eval_transform
from vit.visualize import (
    OUTSIDE_DIM,
    crop_box,
    explain,
    overlay,
    rollout_overlays,
    save_overlay_png,
)


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("rollout")
    paths = save_photos(root / "photos")
    paths["checkpoint"], _ = make_checkpoint(root / "ckpt")
    return paths


@pytest.mark.parametrize(
    "image_hw, img_size, crop_pct",
    [
        ((300, 451), (32, 32), 0.875),
        ((451, 300), (32, 48), 1.0),
        ((97, 64), (16, 24), 0.9),
        ((20, 30), (32, 32), 1.0),  # enlarged
    ],
)
def test_crop_box_is_where_the_transform_samples(image_hw, img_size, crop_pct):
    # an image whose pixels hold their own row and column: after the evaluation transform,
    # each output pixel holds the original coordinate it was sampled at
    H, W = image_hw
    rows, cols = np.meshgrid(np.arange(H), np.arange(W), indexing="ij")
    coords = np.dstack([rows, cols, np.zeros_like(rows)]).astype(np.float32)
    transform = eval_transform(img_size, (0, 0, 0), (1, 1, 1), crop_pct)
    sampled = transform(image=coords)["image"].numpy() * 255  # Normalize divides by 255
    top, left, height, width = crop_box(image_hw, transform)
    h, w = img_size
    # output pixel i's centre is at top + (i + 0.5) * height / h, i.e. pixel index - 0.5;
    # interior pixels only, where bicubic interpolation reproduces a linear ramp (up to
    # OpenCV's rounding, < 0.1 pixel; a crop one resized pixel off would be >= 0.6 here)
    i, j = np.arange(2, h - 2), np.arange(2, w - 2)
    np.testing.assert_allclose(sampled[0, i, w // 2], top + (i + 0.5) * height / h - 0.5, atol=0.1)
    np.testing.assert_allclose(sampled[1, h // 2, j], left + (j + 0.5) * width / w - 0.5, atol=0.1)


def test_overlay_pixels():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (40, 60, 3), dtype=np.uint8)
    heat = np.zeros((2, 3), np.float32)
    heat[0, 0] = 2.0  # scaled to 1 by the maximum
    box = (10.0, 20.0, 20.0, 30.0)  # rows 10-29, columns 20-49
    out = overlay(image, heat, alpha=0.25, box=box)
    assert out.shape == image.shape and out.dtype == np.uint8
    expected_out = np.rint(image.astype(np.float32) * np.float32(OUTSIDE_DIM))
    np.testing.assert_array_equal(out[:10], expected_out[:10])
    np.testing.assert_array_equal(out[:, :20], expected_out[:, :20])
    hot, cold = (np.asarray(matplotlib.colormaps["jet"](v)[:3]) * 255 for v in (1.0, 0.0))
    # the centre of the top-left patch (10 x 10 pixels) is fully hot, the bottom-right cold
    np.testing.assert_allclose(out[14, 24], 0.75 * image[14, 24] + 0.25 * hot, atol=0.51)
    np.testing.assert_allclose(out[25, 45], 0.75 * image[25, 45] + 0.25 * cold, atol=0.51)
    # grayscale input gives the overlay of its RGB replica
    gray = image[:, :, :1]
    np.testing.assert_array_equal(overlay(gray, heat), overlay(np.repeat(gray, 3, 2), heat))


def test_overlay_png_is_the_image_size_with_a_title(tmp_path):
    rng = np.random.default_rng(0)
    big = rng.integers(0, 256, (300, 451, 3), dtype=np.uint8)
    png = np.asarray(Image.open(save_overlay_png(tmp_path / "a.png", big, "tabby 87.0%")))
    assert png.shape[:2] == (300, 451)
    # the image itself, untouched away from the title in the top-left corner
    np.testing.assert_array_equal(png[100:, :, :3], big[100:])
    assert np.abs(png[:15, :60, :3].astype(int) - big[:15, :60]).mean() > 10
    small = rng.integers(0, 256, (28, 28, 1), dtype=np.uint8)
    png = np.asarray(Image.open(save_overlay_png(tmp_path / "b.png", small, "x")))
    assert png.shape[:2] == (280, 280)  # enlarged by 10 so the title fits


def _npy_and_png(out: Path, stem: str) -> tuple[np.ndarray, tuple[int, int]]:
    heat = np.load(out / f"{stem}_map.npy")
    return heat, Image.open(out / f"{stem}_overlay.png").size[::-1]


def test_rollout_cli_writes_overlays_maps_and_grid(files, tmp_path, capsys):
    names = ["chelsea", "astronaut", "grace_hopper"]
    out = tmp_path / "out"
    argv = ["rollout", str(files["checkpoint"]), *[str(files[n]) for n in names]]
    assert main([*argv, "--out", str(out), "--device", "cpu", "--discard-ratio", "0.5"]) == 0
    assert (out / "grid.png").is_file()
    predictor = Predictor.from_source(files["checkpoint"], device="cpu")
    for n in names:
        heat, png_hw = _npy_and_png(out, n)
        raw = np.asarray(Image.open(files[n]).convert("RGB"))
        assert png_hw == raw.shape[:2]  # the photo's own size
        # the values rollout gives on the model's input, computed here directly
        expected, _ = rollout_maps(predictor.model, reference_input(raw), discard_ratio=0.5)
        np.testing.assert_allclose(heat, expected[0].numpy(), atol=1e-5)
        assert heat.shape == (8, 8) and heat.max() == pytest.approx(1.0)
    assert f"{files['chelsea']}: " in capsys.readouterr().out

    # another, non-square input size; class-specific gradient rollout for a named class
    out2 = tmp_path / "out2"
    options = ["--img-size", "32", "48", "--method", "gradient", "--target", "cup"]
    assert main([*argv, "--out", str(out2), "--device", "cpu", *options]) == 0
    heat, png_hw = _npy_and_png(out2, "chelsea")
    assert heat.shape == (8, 12) and png_hw == (300, 451)


def test_rollout_cli_refuses_options_that_do_not_apply(files, tmp_path, capsys):
    base = ["rollout", str(files["checkpoint"]), str(files["coffee"]), "--out", str(tmp_path)]
    for extra, message in [
        (["--target", "cup"], "--target needs --method gradient"),
        (["--method", "gradient", "--head-fusion", "max"], "gradient rollout averages"),
        (["--discard-ratio", "1.0"], "--discard-ratio"),
        (["--evaluate"], "one of them"),
        (["--from-split"], "one of them"),
    ]:
        with pytest.raises(SystemExit) as exit_info:
            main([*base, *extra])
        assert exit_info.value.code == 2
        assert message in capsys.readouterr().err
    assert main([*base, "--method", "gradient", "--target", "dog"]) == 2
    assert "unknown class 'dog'" in capsys.readouterr().err


def test_rollout_cli_reports_a_truncated_file(files, tmp_path, capsys):
    bad = truncate(files["grace_hopper"], tmp_path / "cut.jpg")
    out = tmp_path / "out"
    argv = ["rollout", str(files["checkpoint"]), str(bad), str(files["coffee"]), "--out", str(out)]
    assert main(argv) == 1
    assert str(bad) in capsys.readouterr().err
    assert (out / "coffee_overlay.png").is_file() and (out / "grid.png").is_file()
    assert not (out / "cut_overlay.png").exists()


@pytest.mark.parametrize("method, fusion", [("rollout", "max"), ("gradient", "mean")])
def test_a_batch_gives_the_maps_of_its_images_one_by_one(files, method, fusion):
    predictor = Predictor.from_source(files["checkpoint"], device="cpu").resized((24, 40))
    raw = [np.asarray(Image.open(files[n]).convert("RGB")) for n in ("chelsea", "coffee")]
    raw += [raw[0][::-1].copy()]
    x = predictor.to_input(raw)
    options = dict(method=method, head_fusion=fusion, discard_ratio=0.3)
    batch = explain(predictor.model, x, raw, CLASS_NAMES, batch_size=3, **options)
    alone = explain(predictor.model, x, raw, CLASS_NAMES, batch_size=1, **options)
    for b, a in zip(batch, alone):
        assert b.heat.shape == (6, 10)
        np.testing.assert_allclose(b.heat, a.heat, atol=1e-5)
        assert (b.predicted, b.target) == (a.predicted, a.target)


def test_rollout_overlays_for_training_logs():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (4, 40, 36, 3), dtype=np.uint8)
    source = ArraySource(images, [0, 1, 2, 0], CLASS_NAMES)
    transform = eval_transform((32, 32), MEAN, STD, CROP_PCT)
    dataset = AugmentedDataset(source, transform)
    model = tiny_model().train()
    overlays = rollout_overlays(model, dataset, [3, 1], CLASS_NAMES)
    assert model.training  # given back in the mode it came in
    assert [o.shape for o in overlays] == [(40, 36, 3)] * 2
    model.eval()
    heat, _ = rollout_maps(model, dataset[3][0][None])
    box = crop_box((40, 36), transform)
    np.testing.assert_array_equal(overlays[0], overlay(images[3], heat[0].numpy(), 0.5, box))


def test_summary_compares_with_random():
    fake = {
        "methods": {
            "rollout": {"deletion_auc": [0.1, 0.3], "insertion_auc": [0.7, 0.5]},
            "gradient": {"deletion_auc": [0.5, 0.5], "insertion_auc": [0.2, 0.2]},
            "random": {"deletion_auc": [0.4, 0.4], "insertion_auc": [0.4, 0.4]},
        }
    }
    s = summarise(fake)
    assert s["rollout"]["deletion_auc_mean"] == pytest.approx(0.2)
    assert s["rollout"]["deletion_auc_sem"] == pytest.approx(0.1)  # std 0.1414 / sqrt(2)
    assert s["rollout"]["beats_random_deletion"] and s["rollout"]["beats_random_insertion"]
    assert not s["gradient"]["beats_random_deletion"]
    assert not s["gradient"]["beats_random_insertion"]


def test_rollout_evaluate_on_an_image_folder(files, tmp_path, capsys):
    rng = np.random.default_rng(0)
    photo = np.asarray(Image.open(files["astronaut"]))
    for k, name in enumerate(CLASS_NAMES):
        (tmp_path / "data" / "val" / name).mkdir(parents=True)
        for j in range(2):
            y, x = rng.integers(0, 400, 2)
            crop = photo[y : y + 100, x : x + 90]
            Image.fromarray(crop).save(tmp_path / "data" / "val" / name / f"{k}{j}.png")
    out = tmp_path / "faith"
    argv = ["rollout", str(files["checkpoint"]), "--evaluate", "--root", str(tmp_path / "data")]
    options = ["--split", "val", "--limit", "5", "--steps", "8", "--batch-size", "3"]
    assert main([*argv, *options, "--out", str(out), "--device", "cpu"]) == 0
    report = json.loads((out / "curves.json").read_text())
    assert (out / "curves.png").is_file()
    assert report["dataset"] == "imagefolder"  # from the checkpoint's meta
    assert report["images"] == 5 and len(report["samples"]) == 5
    assert report["fractions"] == [k / 8 for k in range(9)]
    for method in ("rollout", "gradient", "random"):
        entry = report["methods"][method]
        assert len(entry["deletion_auc"]) == 5 and len(entry["insertion_curve"]) == 9
        # deletion starts on the full image, insertion ends on it: the same probability
        assert entry["deletion_curve"][0] == pytest.approx(entry["insertion_curve"][-1], abs=1e-5)
        assert 0 <= report["summary"][method]["insertion_auc_mean"] <= 1
    printed = capsys.readouterr().out
    assert "deletion AUC" in printed and "rollout vs random" in printed
