"""Classification metrics accumulated as sums, so that processes can add theirs together.

Top-1, top-5, mean loss, per-class accuracy, the confusion matrix and expected calibration
error (Guo et al., 2017, equal-width confidence bins) all follow from per-process sums.
"""

from __future__ import annotations

import torch


class ClassificationMeter:
    """Running sums over evaluated samples; ``reduce`` adds the sums of all processes."""

    def __init__(self, num_classes: int, num_bins: int = 15, device: str | torch.device = "cpu"):
        self.num_classes = num_classes
        self.num_bins = num_bins
        k = num_classes
        self.confusion = torch.zeros(k, k, dtype=torch.float64, device=device)  # true, pred
        self.sums = torch.zeros(3, dtype=torch.float64, device=device)  # n, loss, top5
        self.bins = torch.zeros(3, num_bins, dtype=torch.float64, device=device)  # n, conf, acc

    @torch.no_grad()
    def update(self, logits: torch.Tensor, targets: torch.Tensor, losses: torch.Tensor) -> None:
        """Add a batch: ``logits [B, K]``, integer ``targets [B]``, per-sample ``losses [B]``."""
        probs = logits.float().softmax(dim=-1)
        conf, pred = probs.max(dim=-1)
        k = self.num_classes
        flat = targets * k + pred
        self.confusion += torch.bincount(flat, minlength=k * k).view(k, k).to(torch.float64)
        top5 = logits.topk(min(5, k), dim=-1).indices.eq(targets[:, None]).any(dim=-1)
        self.sums += torch.stack(
            [
                torch.tensor(float(len(targets)), device=self.sums.device),
                losses.double().sum(),
                top5.double().sum(),
            ]
        )
        # bin i holds confidences in (i/num_bins, (i+1)/num_bins]
        idx = (conf.double() * self.num_bins).ceil().long().clamp(1, self.num_bins) - 1
        correct = pred.eq(targets).double()
        for row, values in enumerate((torch.ones_like(correct), conf.double(), correct)):
            self.bins[row].index_add_(0, idx, values)

    def reduce(self, accelerator) -> None:
        """Sum the statistics of every process (each sample was seen by exactly one)."""
        if accelerator.num_processes > 1:
            self.confusion = accelerator.reduce(self.confusion, reduction="sum")
            self.sums = accelerator.reduce(self.sums, reduction="sum")
            self.bins = accelerator.reduce(self.bins, reduction="sum")

    def compute(self, class_names: list[str] | None = None) -> dict:
        """Metrics as plain numbers (accuracies in percent, ECE as a fraction)."""
        n = self.sums[0].item()
        if n == 0:
            raise ValueError("no samples were evaluated")
        correct_per_class = self.confusion.diag()
        count_per_class = self.confusion.sum(dim=1)
        names = class_names or [str(i) for i in range(self.num_classes)]
        per_class = {
            name: (100.0 * c / t).item() if t > 0 else None
            for name, c, t in zip(names, correct_per_class, count_per_class)
        }
        bin_n, bin_conf, bin_acc = self.bins
        ece = ((bin_conf - bin_acc).abs().sum() / n).item()  # sum_b n_b/N |conf_b - acc_b|
        return {
            "samples": int(n),
            "loss": self.sums[1].item() / n,
            "top1": 100.0 * correct_per_class.sum().item() / n,
            "top5": 100.0 * self.sums[2].item() / n,
            "ece": ece,
            "per_class_accuracy": per_class,
            "confusion_matrix": self.confusion.long().tolist(),
        }
