"""Tests for vit.metrics.ClassificationMeter against a plain numpy reference."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from vit.metrics import ClassificationMeter


def reference(logits: np.ndarray, targets: np.ndarray, num_bins: int = 15) -> dict:
    """The metrics computed directly, sample by sample."""
    n, k = logits.shape
    shifted = logits - logits.max(axis=1, keepdims=True)
    probs = np.exp(shifted) / np.exp(shifted).sum(axis=1, keepdims=True)
    pred = probs.argmax(axis=1)
    conf = probs.max(axis=1)
    confusion = np.zeros((k, k), dtype=np.int64)
    for t, p in zip(targets, pred):
        confusion[t, p] += 1
    ranks = (logits > logits[np.arange(n), targets][:, None]).sum(axis=1)  # classes above
    ece = 0.0
    for b in range(num_bins):
        in_bin = (conf > b / num_bins) & (conf <= (b + 1) / num_bins)
        if in_bin.any():
            gap = abs(conf[in_bin].mean() - (pred[in_bin] == targets[in_bin]).mean())
            ece += in_bin.sum() / n * gap
    per_class = {}
    for c in range(k):
        members = targets == c
        per_class[str(c)] = 100.0 * (pred[members] == c).mean() if members.any() else None
    log_probs = np.log(probs[np.arange(n), targets])
    return {
        "samples": n,
        "loss": -log_probs.mean(),
        "top1": 100.0 * (pred == targets).mean(),
        "top5": 100.0 * (ranks < 5).mean(),
        "ece": ece,
        "per_class_accuracy": per_class,
        "confusion_matrix": confusion.tolist(),
    }


def batch(n: int, k: int, seed: int, scale: float = 2.0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, k, generator=g, dtype=torch.float64) * scale
    targets = torch.randint(0, k, (n,), generator=g)
    # make a fifth of the samples confident and right, so the bins are not all alike
    sure = torch.arange(n) % 5 == 0
    logits[sure, targets[sure]] += 8.0
    return logits.float(), targets


def feed(meter: ClassificationMeter, logits: torch.Tensor, targets: torch.Tensor, step: int):
    for start in range(0, len(targets), step):
        lo, ta = logits[start : start + step], targets[start : start + step]
        meter.update(lo, ta, F.cross_entropy(lo, ta, reduction="none"))


def assert_close_metrics(got: dict, want: dict) -> None:
    assert got["samples"] == want["samples"]
    assert got["confusion_matrix"] == want["confusion_matrix"]
    for key in ("loss", "top1", "top5", "ece"):
        assert got[key] == pytest.approx(want[key], rel=1e-5, abs=1e-6), key
    assert got["per_class_accuracy"].keys() == want["per_class_accuracy"].keys()
    for name, value in want["per_class_accuracy"].items():
        if value is None:
            assert got["per_class_accuracy"][name] is None
        else:
            assert got["per_class_accuracy"][name] == pytest.approx(value, rel=1e-9)


@pytest.mark.parametrize("k", [3, 7, 12])
def test_meter_matches_reference(k):
    logits, targets = batch(301, k, seed=k)
    meter = ClassificationMeter(k)
    feed(meter, logits, targets, step=64)
    want = reference(logits.double().numpy(), targets.numpy())
    assert_close_metrics(meter.compute(), want)
    if k <= 5:
        assert meter.compute()["top5"] == 100.0  # every class is in the top five


def test_empty_class_is_none_and_names_are_used():
    logits, targets = batch(40, 4, seed=1)
    targets[targets == 2] = 0  # class 2 never occurs
    meter = ClassificationMeter(4)
    feed(meter, logits, targets, step=40)
    per_class = meter.compute(class_names=["a", "b", "c", "d"])["per_class_accuracy"]
    assert list(per_class) == ["a", "b", "c", "d"] and per_class["c"] is None
    want = reference(logits.double().numpy(), targets.numpy())["per_class_accuracy"]
    assert per_class["a"] == pytest.approx(want["0"])


def test_known_answers():
    # two samples, right with probability ~1 and wrong with probability ~1
    logits = torch.tensor([[30.0, 0.0, 0.0], [0.0, 30.0, 0.0]])
    targets = torch.tensor([0, 2])
    meter = ClassificationMeter(3)
    meter.update(logits, targets, torch.tensor([0.0, 30.0]))
    r = meter.compute()
    assert r["top1"] == 50.0 and r["loss"] == 15.0 and r["samples"] == 2
    assert r["ece"] == pytest.approx(0.5, abs=1e-6)  # one bin: confidence 1, accuracy 1/2
    assert r["confusion_matrix"] == [[1, 0, 0], [0, 0, 0], [0, 1, 0]]


def test_no_samples_is_an_error():
    with pytest.raises(ValueError, match="no samples"):
        ClassificationMeter(3).compute()


class TwoProcesses:
    """Stands in for an accelerator of two processes: ``reduce`` adds the other's sums."""

    num_processes = 2

    def __init__(self, other: ClassificationMeter):
        self.other = {
            t.shape: t for t in (other.confusion, other.sums, other.bins)
        }  # shapes differ

    def reduce(self, tensor: torch.Tensor, reduction: str) -> torch.Tensor:
        assert reduction == "sum"
        return tensor + self.other[tensor.shape]


def test_split_meters_sum_to_one_meter():
    k = 6
    logits, targets = batch(257, k, seed=3)
    whole = ClassificationMeter(k)
    feed(whole, logits, targets, step=50)
    # the evaluation shards: rank r takes samples r, r + 2, ...
    first, second = ClassificationMeter(k), ClassificationMeter(k)
    feed(first, logits[0::2], targets[0::2], step=33)
    feed(second, logits[1::2], targets[1::2], step=33)
    first.reduce(TwoProcesses(second))
    got, want = first.compute(), whole.compute()
    assert got["samples"] == 257
    assert got["confusion_matrix"] == want["confusion_matrix"]
    for key in ("loss", "top1", "top5", "ece"):
        assert got[key] == pytest.approx(want[key], rel=1e-12), key
