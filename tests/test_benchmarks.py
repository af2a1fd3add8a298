"""Tests for benchmarks/: each script at --quick size, the FLOP formula and the helpers.

The scripts must work and report sane figures here; whether they meet their targets is
decided by the full runs, never by a timed test.
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from vit import VisionTransformer, ViTConfig, create_model
from vit.datasets import FASHION_MNIST_ROOT

BENCH_DIR = Path(__file__).resolve().parent.parent / "benchmarks"
REPORT_KEYS = {"benchmark", "date", "command", "machine"}
MACHINE_KEYS = {"cpu", "cpu_count", "torch", "device", "device_name", "torch_threads"}


@pytest.fixture
def bench(monkeypatch):
    """Import a benchmark script by name, as ``python benchmarks/<name>.py`` would see it."""
    monkeypatch.syspath_prepend(str(BENCH_DIR))
    return importlib.import_module


def run_quick(bench, name: str, tmp_path: Path, *extra: str) -> dict:
    """Run a script's main at --quick size; check and return the JSON report it wrote."""
    out = tmp_path / f"{name}.json"
    argv = ["--quick", "--device", "cpu", "--out", str(out), *extra]
    result = bench(name).main(argv)
    report = json.loads(out.read_text())
    # the report holds what main returned, plus the run's description
    assert {k: report[k] for k in result} == json.loads(json.dumps(result))
    assert set(report) >= REPORT_KEYS
    assert set(report["machine"]) >= MACHINE_KEYS
    assert report["benchmark"] == name
    assert report["machine"]["device"] == "cpu"
    assert report["command"] == " ".join(["python", f"benchmarks/{name}.py", *argv])
    return report


def positive_spread(s: dict) -> bool:
    return 0 < s["min"] <= s["q1"] <= s["median"] <= s["q3"] <= s["max"] < float("inf")


# --------------------------------------------------------------------------- helpers


def test_build_size_shrinks_only_the_large_presets(bench):
    common = bench("common")
    assert common.build_size("vit_tiny_patch16_224", None) is None  # full runs: own size
    assert common.build_size("vit_tiny_patch16_224", 32) == 32
    # 32 is not a multiple of 7: the small presets must keep their own size
    assert common.build_size("vit_mini_patch7_28", 32) is None
    assert common.build_size("vit_tiny_patch4_32", 32) is None


def test_spread_and_paired_ratio(bench):
    common = bench("common")
    assert common.spread([5, 1, 4, 2, 3]) == {"median": 3, "q1": 2, "q3": 4, "min": 1, "max": 5}
    # seconds of a, then of b, per round: b/a per round is the throughput ratio of a over b
    assert common.paired_ratio([1.0, 2.0], [2.0, 6.0])["median"] == pytest.approx(2.5)


def test_alternate_flips_the_order_each_round(bench):
    calls = []
    fns = {"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}
    times = bench("common").alternate(fns, torch.device("cpu"), rounds=3, warmup=1)
    assert calls == ["a", "b", "a", "b", "b", "a", "a", "b"]  # one warm-up call each first
    assert {k: len(v) for k, v in times.items()} == {"a": 3, "b": 3}


def test_peak_memory_counts_live_tensors(bench):
    peak_memory = bench("common").peak_memory
    mib = 2**20 // 4  # float32 elements in one MiB

    def together() -> None:
        a = torch.empty(mib)  # noqa: F841
        b = torch.empty(2 * mib)  # noqa: F841

    def one_after_the_other() -> None:
        a = torch.empty(mib)
        del a
        b = torch.empty(2 * mib)  # noqa: F841

    held = torch.empty(4 * mib)  # allocated before: not part of the peak
    assert peak_memory(together, torch.device("cpu")) == 3 * 2**20
    assert peak_memory(one_after_the_other, torch.device("cpu")) == 2 * 2**20
    del held


def test_matmul_peak_is_a_positive_rate(bench):
    peak = bench("common").matmul_peak(torch.device("cpu"), torch.float32, [32, 64], rounds=1)
    assert peak["best_size"] in (32, 64)
    assert peak["best_flops_per_s"] == max(peak["flops_per_s_by_size"].values()) > 0


# ----------------------------------------------------------------------- FLOP formula


@pytest.mark.parametrize(
    "cfg",
    [
        ViTConfig(img_size=28, patch_size=4, in_chans=1, num_classes=10, embed_dim=96,
                  depth=2, num_heads=4, mlp_ratio=2.0),
        ViTConfig(img_size=(32, 48), patch_size=8, num_classes=7, embed_dim=48, depth=3,
                  num_heads=3, mlp_ratio=3.0),
        ViTConfig(img_size=28, patch_size=7, in_chans=1, num_classes=10, embed_dim=32,
                  depth=2, num_heads=2, stem_channels=[8, 16, 24]),
        ViTConfig(img_size=(32, 48), patch_size=8, embed_dim=32, depth=1, num_heads=2,
                  stem_channels=[8]),
    ],
)  # fmt: skip
def test_forward_flops_match_torch_flop_counter(bench, cfg):
    # every token through every block (as timm runs it); the explicit attention path runs
    # every product as a matmul torch's counter sees
    model = VisionTransformer(cfg).eval()
    H, W = model.img_size
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        tokens, _ = model.forward_features(torch.randn(2, cfg.in_chans, H, W), True)
        model.forward_head(tokens)
    flops = bench("model_throughput").forward_flops(cfg, (H, W))
    assert 2 * sum(flops.values()) == counter.get_total_flops()


def test_cls_only_flops_match_torch_flop_counter_on_the_plain_forward(bench):
    # the math backend runs scaled_dot_product_attention as matmuls the counter sees
    cfg = ViTConfig(img_size=28, patch_size=4, in_chans=1, num_classes=10, embed_dim=48,
                    depth=3, num_heads=4, mlp_ratio=2.0)  # fmt: skip
    model = VisionTransformer(cfg).eval()
    math = sdpa_kernel(SDPBackend.MATH)
    with FlopCounterMode(display=False) as counter, torch.no_grad(), math:
        model(torch.randn(2, 1, 28, 28))
    flops = bench("model_throughput").forward_flops(cfg, (28, 28), cls_only_last=True)
    assert 2 * sum(flops.values()) == counter.get_total_flops()


def test_sequence_block_flops_match_the_model_formula(bench):
    # one block of the sequence benchmark is one block of the whole-model count
    cfg = ViTConfig(img_size=32, patch_size=4, embed_dim=64, depth=1, num_heads=4)
    whole = bench("model_throughput").forward_flops(cfg, (32, 32))
    block = bench("sequence_scaling").block_flops(65, 64, 4.0)
    assert block["attention"] == whole["attn_scores"] + whole["attn_weighted_sum"]
    assert block["linear"] == whole["qkv"] + whole["attn_proj"] + whole["mlp"]


# -------------------------------------------------------------------- scripts, quick


def test_model_throughput_quick(bench, tmp_path):
    report = run_quick(bench, "model_throughput", tmp_path)
    assert report["matmul_peak"]["best_flops_per_s"] > 0
    rows = report["rows"]
    presets = ["vit_mini_convstem_patch7_28", "vit_mini_patch7_28", "vit_mini_patch4_28"]
    presets += ["vit_tiny_patch16_224", "vit_small_patch16_224"]
    assert [(r["model"], r["phase"]) for r in rows] == [
        (p, phase) for p in presets for phase in ("inference", "train_step")
    ]
    for row in rows:
        assert row["mode"] == "fp32"
        assert positive_spread(row["ours_images_per_s"])
        assert positive_spread(row["timm_images_per_s"])
        assert positive_spread(row["ratio_by_round"])
        ours, theirs = row["ours_images_per_s"]["median"], row["timm_images_per_s"]["median"]
        assert row["ratio"] == pytest.approx(ours / theirs)
        assert row["ours_fraction_of_peak"] > 0 and row["timm_fraction_of_peak"] > 0
        # our last block computes the cls token alone: less work than timm's
        assert 0 < row["gflops_per_image_forward"]["ours"] < row["gflops_per_image_forward"]["timm"]
    # a training step is counted as three forwards
    infer, train = rows[0], rows[1]
    for who in ("ours", "timm"):
        per_image = train[f"{who}_flops_per_s"] / train[f"{who}_images_per_s"]["median"]
        assert per_image == pytest.approx(3e9 * infer["gflops_per_image_forward"][who])


def write_folder(root: Path, size: tuple[int, int], suffix: str, per_class: int = 12) -> Path:
    """A two-class ImageFolder of random RGB images."""
    rng = np.random.default_rng(0)
    for name in ("cat", "dog"):
        (root / name).mkdir(parents=True)
        for k in range(per_class):
            pixels = rng.integers(0, 256, (*size, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / name / f"{k:03d}{suffix}")
    return root


def test_data_pipeline_quick(bench, tmp_path):
    cifar = write_folder(tmp_path / "cifar" / "train", (32, 32), ".png")
    imagenette = write_folder(tmp_path / "inette" / "train", (90, 120), ".JPEG")
    flags = ["--cifar-dir", str(cifar), "--imagenette-dir", str(imagenette)]
    report = run_quick(bench, "data_pipeline", tmp_path, *flags)
    expected = ["cifar10_in_memory", "cifar10_decode", "imagenette_decode"]
    fashion_found = any(Path(FASHION_MNIST_ROOT).glob("train-images-idx3-ubyte*"))
    if fashion_found:
        expected.insert(0, "fashion_mnist")
    else:
        assert "--fashion-root" in report["skipped"]["fashion_mnist"]
    rows = report["datasets"]
    assert [r["dataset"] for r in rows] == expected
    for row in rows:
        assert row["images"] >= 2 * row["batch_size"]
        assert positive_spread(row["model_images_per_s"])
        assert [rate["workers"] for rate in row["loader"]] == [0, 1]
        for rate in row["loader"]:
            assert rate["images_per_s"] > 0 and rate["loader_over_model"] > 0
        epoch = row["epoch"]
        assert positive_spread(epoch["real_loader_images_per_s"])
        assert positive_spread(epoch["in_memory_images_per_s"])
        assert epoch["ratio"] > 0 and positive_spread(epoch["ratio_by_round"])
    by_name = {r["dataset"]: r for r in rows}
    assert by_name["cifar10_in_memory"]["in_memory"] is True
    assert by_name["cifar10_decode"]["in_memory"] is False
    assert by_name["imagenette_decode"]["crop"] == "random_resized"


def test_data_pipeline_skips_folders_not_given(bench, tmp_path):
    report = run_quick(bench, "data_pipeline", tmp_path, "--datasets", "cifar10_decode")
    assert report["datasets"] == []
    assert "--cifar-dir" in report["skipped"]["cifar10_decode"]


def test_attention_cost_quick(bench, tmp_path):
    report = run_quick(bench, "attention_cost", tmp_path)
    rows = report["rows"]
    models = ["vit_mini_convstem_patch7_28", "vit_mini_patch7_28", "vit_tiny_patch16_224"]
    assert [r["model"] for r in rows] == models
    for row in rows:
        for call in ("plain", "attention", "rollout"):
            assert positive_spread(row["seconds"][call])
            assert row["peak_bytes"][call] > 0
        for call in ("attention", "rollout"):
            assert row[f"{call}_time_ratio"] > 0
            assert positive_spread(row[f"{call}_time_ratio_by_round"])
            assert row[f"{call}_memory_ratio"] > 0
        # the returned probabilities of every layer are alive at the end of the call
        assert row["peak_bytes"]["attention"] >= row["attention_maps_bytes"]


def test_attention_maps_bytes_is_the_size_of_the_returned_maps(bench):
    model = create_model("vit_mini_patch4_28").eval()
    with torch.no_grad():
        _, maps = model(torch.randn(3, 1, 28, 28), return_attention=True)
    expected = sum(m.numel() * m.element_size() for m in maps)
    assert bench("attention_cost").attention_bytes(model, 3) == expected


def test_sequence_scaling_quick(bench, tmp_path):
    report = run_quick(bench, "sequence_scaling", tmp_path)
    rows = report["rows"]
    assert [r["tokens"] for r in rows] == [64, 128, 256]
    assert rows[0]["fused_slope"] is None and rows[1]["fused_slope"] is not None
    for row in rows:
        assert positive_spread(row["seconds"]["fused"])
        assert positive_spread(row["seconds"]["explicit"])
        assert row["attention_matrix_bytes"] == 4 * 1 * 6 * row["tokens"] ** 2
        # the explicit path holds at least the [B, heads, N, N] probabilities it returns
        assert row["peak_bytes"]["explicit"] >= row["attention_matrix_bytes"]
        assert row["explicit_over_fused_time"] > 0
    # attention's FLOP share grows with N, and the fused kernel holds no N x N matrix
    shares = [r["attention_flop_fraction"] for r in rows]
    assert shares == sorted(shares)
    assert rows[-1]["peak_bytes"]["fused"] < rows[-1]["peak_bytes"]["explicit"]


def test_sequence_scaling_rejects_a_token_count_not_a_power_of_two(bench, tmp_path):
    with pytest.raises(SystemExit, match="--min-tokens 48"):
        bench("sequence_scaling").main(["--quick", "--min-tokens", "48", "--out", "x.json"])


def test_recipe_quick_trains_and_evaluates(bench, tmp_path):
    import helpers_train

    data = helpers_train.write_fashion(tmp_path / "fashion")
    report = run_quick(
        bench,
        "recipe",
        tmp_path,
        "--runs-dir",
        str(tmp_path / "runs"),
        *helpers_train.TINY,
        f"data.root={data}",
    )
    assert report["config"] == "configs/fashion_mnist.yaml"
    assert report["train_minutes"] > 0 and report["eval_minutes"] > 0
    assert report["test_split"] == "test" and report["test_samples"] == 21  # write_fashion's
    assert 0.0 <= report["test_top1"] <= report["test_top5"] <= 100.0  # percentages
    assert report["best_val_top1"] is not None
