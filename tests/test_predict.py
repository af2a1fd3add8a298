"""``vit predict`` and :class:`vit.predict.Predictor` on real photos and awkward files."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from predict_fixtures import (
    CLASS_NAMES,
    IMG_SIZE,
    make_checkpoint,
    reference_input,
    save_photos,
    truncate,
)
from safetensors.torch import save_file

import vit.predict
from vit import VisionTransformer, ViTConfig
from vit.cli import main
from vit.predict import Predictor, class_index, expand_paths, resolve_device


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("predict")
    paths = save_photos(root / "photos")
    paths["checkpoint"], _ = make_checkpoint(root / "ckpt")
    return paths


@pytest.fixture(scope="module")
def model(files):
    """The checkpoint's model, as saved (rebuilt from the fixture's seed)."""
    from predict_fixtures import tiny_model

    return tiny_model()


PHOTOS = ("chelsea", "astronaut", "coffee", "grace_hopper")


def probabilities(records: list[dict], num_classes: int) -> np.ndarray:
    """Full probability rows from records predicted with top_k >= num_classes."""
    out = np.zeros((len(records), num_classes))
    for row, r in zip(out, records):
        for p in r["predictions"]:
            row[p["index"]] = p["probability"]
    return out


def test_predictions_match_a_direct_forward_on_the_photos(files, model):
    predictor = Predictor.from_source(files["checkpoint"], device="cpu")
    paths = [files[n] for n in PHOTOS]
    # batch size 3 over 4 files: a full batch and a partial one
    records = predictor.predict_paths(paths, top_k=3, batch_size=3)
    assert [r["path"] for r in records] == [str(p) for p in paths]
    for r, path in zip(records, paths):
        rgb = np.asarray(Image.open(path).convert("RGB"))
        with torch.no_grad():
            expected = model(reference_input(rgb)).softmax(-1)[0]
        got = torch.tensor([p["probability"] for p in r["predictions"]])
        order = expected.argsort(descending=True)
        assert [p["index"] for p in r["predictions"]] == order.tolist()
        assert [p["label"] for p in r["predictions"]] == [CLASS_NAMES[i] for i in order]
        torch.testing.assert_close(got, expected[order], atol=1e-5, rtol=0)
        assert [p["rank"] for p in r["predictions"]] == [1, 2, 3]


def _exif_rotated_jpeg(rgb: np.ndarray, tmp: Path) -> tuple[Path, Path, Path]:
    """A JPEG whose EXIF says "rotate 90 degrees clockwise to view"; the same decoded
    pixels rotated by hand as PNG; and the pixels as stored (unrotated) as PNG."""
    jpeg = tmp / "rotated.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: the viewer rotates the stored pixels 90 degrees clockwise
    Image.fromarray(rgb).save(jpeg, exif=exif, quality=95)
    with Image.open(jpeg) as im:
        stored = np.asarray(im.convert("RGB"))  # Image.open does not apply EXIF by itself
    rotated, unrotated = tmp / "rotated_by_hand.png", tmp / "stored.png"
    Image.fromarray(np.ascontiguousarray(np.rot90(stored, k=-1))).save(rotated)
    Image.fromarray(stored).save(unrotated)
    return jpeg, rotated, unrotated


def test_converted_formats_give_the_prediction_of_the_converted_image(files, tmp_path):
    rng = np.random.default_rng(0)
    photo = np.asarray(Image.open(files["chelsea"]))[::4, ::4]  # 75 x 113, non-square
    gray = np.asarray(Image.fromarray(photo).convert("L"))
    pairs = {}
    # grayscale: replicated into R, G and B
    Image.fromarray(gray).save(tmp_path / "gray.png")
    Image.fromarray(np.repeat(gray[:, :, None], 3, axis=2)).save(tmp_path / "gray_rgb.png")
    pairs["gray"] = ("gray.png", "gray_rgb.png")
    # RGBA: alpha dropped, colours kept as stored (no compositing)
    alpha = rng.integers(0, 256, gray.shape, dtype=np.uint8)
    Image.fromarray(np.dstack([photo, alpha])).save(tmp_path / "rgba.png")
    Image.fromarray(photo).save(tmp_path / "rgb.png")
    pairs["rgba"] = ("rgba.png", "rgb.png")
    # 16-bit: round(v * 255 / 65535), over the whole range (wrapping or clipping would differ)
    deep = rng.integers(0, 65536, gray.shape, dtype=np.uint16)
    Image.fromarray(deep).save(tmp_path / "deep.png")
    eight = np.rint(deep / 257.0).astype(np.uint8)
    Image.fromarray(np.repeat(eight[:, :, None], 3, axis=2)).save(tmp_path / "eight.png")
    pairs["16-bit"] = ("deep.png", "eight.png")
    jpeg, by_hand, stored = _exif_rotated_jpeg(photo, tmp_path)
    pairs["exif"] = (jpeg.name, by_hand.name)

    predictor = Predictor.from_source(files["checkpoint"], device="cpu")
    names = [n for pair in pairs.values() for n in pair] + [stored.name]
    records = predictor.predict_paths([tmp_path / n for n in names], top_k=3)
    probs = dict(zip(names, probabilities(records, 3)))
    for kind, (given, converted) in pairs.items():
        np.testing.assert_allclose(probs[given], probs[converted], atol=1e-6, err_msg=kind)
    # the check can fail: ignoring the EXIF rotation changes the prediction
    assert np.abs(probs[jpeg.name] - probs[stored.name]).max() > 1e-3
    assert Image.open(tmp_path / "deep.png").mode.startswith("I")


def test_truncated_file_is_reported_and_the_rest_predicted(files, tmp_path, capsys):
    bad = truncate(files["coffee"], tmp_path / "cut.png")
    argv = ["predict", str(files["checkpoint"]), str(files["chelsea"]), str(bad)]
    rc = main([*argv, str(files["grace_hopper"]), "--format", "json", "--device", "cpu"])
    out, err = capsys.readouterr()
    assert rc == 1
    assert str(bad) in err
    records = json.loads(out)
    assert [r["path"] for r in records] == [str(files["chelsea"]), str(files["grace_hopper"])]

    rc = main(["predict", str(files["checkpoint"]), str(files["chelsea"]), "--device", "cpu"])
    assert rc == 0


def test_json_csv_and_table_formats(files, capsys):
    paths = [str(files[n]) for n in PHOTOS]
    predictor = Predictor.from_source(files["checkpoint"], device="cpu")
    expected = predictor.predict_paths(paths, top_k=2)
    base = ["predict", str(files["checkpoint"]), *paths, "--top-k", "2", "--device", "cpu"]

    # another batch size: the same predictions, to float rounding (matrix products may be
    # blocked differently for another number of rows)
    assert main([*base, "--format", "json", "--batch-size", "2"]) == 0
    got = json.loads(capsys.readouterr().out)
    assert [r["path"] for r in got] == [r["path"] for r in expected]
    for r, want in zip(got, expected):
        assert [p["label"] for p in r["predictions"]] == [p["label"] for p in want["predictions"]]
        for p, q in zip(r["predictions"], want["predictions"]):
            assert p == {**q, "probability": pytest.approx(q["probability"], abs=1e-6)}

    assert main([*base, "--format", "csv"]) == 0
    rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert len(rows) == 2 * len(paths)
    flat = [(r, p) for r in expected for p in r["predictions"]]
    for row, (r, p) in zip(rows, flat):
        assert (row["path"], row["label"], int(row["rank"])) == (r["path"], p["label"], p["rank"])
        assert float(row["probability"]) == pytest.approx(p["probability"], abs=1e-6)

    assert main(base) == 0
    table = capsys.readouterr().out
    for r in expected:
        assert r["path"] in table
        assert f"{r['predictions'][0]['probability']:.2%}" in table


def test_folders_recurse_and_globs_expand(tmp_path):
    for rel in ["a/1.png", "a/b/2.JPG", "a/.hidden.png", "a/.cache/3.png", "a/notes.txt", "c.png"]:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"x")
    t = str(tmp_path)
    paths, unmatched = expand_paths([f"{t}/a", f"{t}/*.png", f"{t}/a/1.png", f"{t}/nothing*"])
    assert paths == [f"{t}/a/1.png", f"{t}/a/b/2.JPG", f"{t}/c.png"]  # once each, in order
    assert unmatched == [f"{t}/nothing*"]
    # a recursive glob, and a file named explicitly is taken whatever its extension
    paths, _ = expand_paths([f"{t}/**/*.png", f"{t}/a/notes.txt"])
    assert paths == [f"{t}/a/1.png", f"{t}/c.png", f"{t}/a/notes.txt"]


def test_missing_pattern_and_bad_source_fail(files, tmp_path, capsys):
    rc = main(["predict", str(files["checkpoint"]), str(tmp_path / "nope*.png"), "--device", "cpu"])
    assert rc == 1
    assert "nope*.png" in capsys.readouterr().err
    rc = main(["predict", str(tmp_path / "missing_dir/"), str(files["chelsea"])])
    assert rc == 2
    assert "missing_dir" in capsys.readouterr().err
    assert main(["predict", "not_a_timm_model_name", str(files["chelsea"])]) == 2
    assert "not_a_timm_model_name" in capsys.readouterr().err


def _timm_reference(timm_model, rgb: np.ndarray) -> torch.Tensor:
    cfg = timm.models.get_pretrained_cfg("vit_tiny_patch16_224")
    x = reference_input(rgb, 224, cfg.crop_pct, cfg.mean, cfg.std)
    with torch.no_grad():
        return timm_model(x).softmax(-1)[0]


def test_timm_weight_file_with_preset(files, tmp_path, capsys):
    torch.manual_seed(0)
    timm_model = timm.create_model("vit_tiny_patch16_224", pretrained=False).eval()
    with torch.no_grad():
        for p in timm_model.parameters():
            p.add_(torch.randn_like(p), alpha=0.02)
    weights = tmp_path / "tiny.safetensors"
    save_file({k: v.contiguous() for k, v in timm_model.state_dict().items()}, str(weights))

    predictor = Predictor.from_source(weights, "vit_tiny_patch16_224", device="cpu")
    pre = predictor.preprocessing
    # timm's pretrained config for the preset's default weights
    assert (pre.img_size, pre.mean, pre.crop_pct) == ((224, 224), (0.5, 0.5, 0.5), 0.9)
    assert len(predictor.class_names) == 1000
    assert predictor.class_names[281] == "tabby, tabby cat"

    [record] = predictor.predict_paths([files["chelsea"]], top_k=3)
    expected = _timm_reference(timm_model, np.asarray(Image.open(files["chelsea"])))
    values, indices = expected.topk(3)
    assert [p["index"] for p in record["predictions"]] == indices.tolist()
    got = torch.tensor([p["probability"] for p in record["predictions"]])
    torch.testing.assert_close(got, values, atol=1e-5, rtol=1e-4)

    argv = ["predict", str(weights), str(files["chelsea"]), "--device", "cpu"]
    options = ["--model", "vit_tiny_patch16_224", "--format", "json", "--top-k", "3"]
    assert main([*argv, *options]) == 0
    assert json.loads(capsys.readouterr().out) == [record]
    assert main(argv) == 2  # a weight file without --model
    assert "--model" in capsys.readouterr().err


def test_timm_pretrained_name_takes_timm_preprocessing(files, monkeypatch):
    name = "vit_small_patch16_224.augreg_in21k_ft_in1k"
    calls = []
    cfg = ViTConfig(
        img_size=224, patch_size=16, num_classes=1000, embed_dim=32, depth=1, num_heads=2
    )

    def fake_download(source, *args, **kwargs):  # no network in tests
        calls.append(source)
        return VisionTransformer(cfg)

    monkeypatch.setattr(vit.predict, "load_pretrained", fake_download)
    predictor = Predictor.from_source(name, device="cpu")
    assert calls == [name]
    pre = predictor.preprocessing
    assert (pre.img_size, pre.mean, pre.std, pre.crop_pct) == (
        (224, 224),
        (0.5, 0.5, 0.5),
        (0.5, 0.5, 0.5),
        0.9,
    )
    assert predictor.class_names[0] == "tench, Tinca tinca"
    assert len(predictor.predict_paths([files["coffee"]])[0]["predictions"]) == 5
    with pytest.raises(ValueError, match="only for weight files"):
        Predictor.from_source(name, preset="vit_small_patch16_224")


def test_class_index_and_device():
    assert class_index("cup", CLASS_NAMES) == 2
    assert class_index("1", CLASS_NAMES) == 1
    with pytest.raises(ValueError, match="unknown class 'dog'"):
        class_index("dog", CLASS_NAMES)
    with pytest.raises(ValueError, match="out of range"):
        class_index("3", CLASS_NAMES)
    assert resolve_device("cpu") == torch.device("cpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA"):
            resolve_device("cuda")
        assert resolve_device("auto") == torch.device("cpu")


def test_resized_predictor_runs_at_another_size(files):
    predictor = Predictor.from_source(files["checkpoint"], device="cpu").resized((32, 48))
    x = predictor.to_input([np.asarray(Image.open(files["chelsea"]))])
    assert x.shape == (1, 3, 32, 48)
    with pytest.raises(ValueError, match="multiple of the patch size"):
        predictor.resized((IMG_SIZE, 30))
