"""Time to accuracy of a training recipe: train a config from scratch, then evaluate it.

Runs ``train.py --config CONFIG`` into a fresh run folder and ``eval.py`` on the config's
test split, each as a child process as a user would, and reports the wall-clock time of
each, the best validation top-1 and the test top-1 and top-5 of the best checkpoint (a
config without a test split reports validation only). The Fashion-MNIST target is judged
by ``test_top1`` against ``train_minutes``.

Run from the repository root, e.g. ``python benchmarks/recipe.py`` (the default
Fashion-MNIST recipe) or ``python benchmarks/recipe.py --config configs/cifar10_folder.yaml
data.root=DATA/cifar10``. Extra ``key=value`` arguments are config overrides.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import common
import torch

from vit.config import load_config

NAME = "recipe"
ROOT = common.BENCH_DIR.parent


def parse_args(argv: Sequence[str]):
    parser = common.base_parser(NAME, __doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/fashion_mnist.yaml")
    parser.add_argument(
        "--runs-dir", default=None, help="where the run folder goes (default: a temporary one)"
    )
    parser.add_argument("overrides", nargs="*", metavar="key.path=value")
    return parser.parse_args(argv)


def run_timed(command: list[str]) -> float:
    """Run ``command`` from the repository root; seconds it took. A failure stops here."""
    print("$", " ".join(command), flush=True)
    t0 = time.perf_counter()
    subprocess.run(command, cwd=ROOT, check=True)
    return time.perf_counter() - t0


def main(argv: Sequence[str] | None = None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    device = common.pick_device(args.device)
    overrides = list(args.overrides)
    if args.quick:  # a few steps, to check that the script works
        overrides += ["train.max_steps=2", "train.epochs=1", "data.batch_size=16"]
    # a config without a test split (CIFAR-10 as one folder) is judged on validation only
    test_split = load_config(args.config, overrides).data.test_split
    with tempfile.TemporaryDirectory() as tmp:
        runs = Path(args.runs_dir or tmp).resolve()
        name = f"recipe-{int(time.time())}"
        run_dir = runs / name
        train_s = run_timed(
            [
                sys.executable,
                "train.py",
                "--config",
                args.config,
                f"log.output_dir={runs}",
                f"log.name={name}",
                *overrides,
            ]
        )
        best = run_dir / "checkpoints" / "best"
        meta = json.loads((best / "meta.json").read_text())
        metrics, eval_s = {}, 0.0
        if test_split is not None:
            eval_dir = run_dir / "eval_test"
            eval_s = run_timed(
                [sys.executable, "eval.py", "--checkpoint", str(best), "--out", str(eval_dir)]
            )
            metrics = json.loads((eval_dir / "metrics.json").read_text())
    results = {
        "config": args.config,
        "overrides": overrides,
        "torch_threads": torch.get_num_threads(),
        "train_minutes": train_s / 60,
        "eval_minutes": eval_s / 60,
        "best_val_top1": meta.get("val_top1"),
        "best_weights": meta.get("weights"),
        "epoch": meta.get("epoch"),
        "test_split": test_split,
        "test_top1": metrics.get("top1"),
        "test_top5": metrics.get("top5"),
        "test_samples": metrics.get("samples"),
    }
    common.print_table(
        [results],
        [
            ("config", "config", "s"),
            ("train_minutes", "train min", ".1f"),
            ("best_val_top1", "val top-1", ".4f"),
            ("test_top1", "test top-1", ".4f"),
            ("test_top5", "test top-5", ".4f"),
        ],
    )
    common.write_report(args.out, NAME, argv, device, results)
    return results


if __name__ == "__main__":
    main()
