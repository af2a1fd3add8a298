"""Command-line entry points: ``vit train``, ``vit eval``, ``vit predict``, ``vit rollout``.

``train.py`` and ``eval.py`` at the top of the repository call the same functions.
"""

from __future__ import annotations

import argparse
import logging
import sys

from vit.config import ConfigError


def _setup_process() -> None:
    """Logging, and malloc keeping freed memory for the next step (see vit.memory)."""
    from vit.memory import keep_freed_memory

    logging.basicConfig(
        format="%(asctime)s %(levelname)s %(message)s", level=logging.INFO, datefmt="%H:%M:%S"
    )
    keep_freed_memory()


def train_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    parser = parser or argparse.ArgumentParser(prog="train.py", description="Train a ViT.")
    parser.add_argument(
        "--config",
        default="configs/fashion_mnist.yaml",
        help="YAML config file (default: %(default)s)",
    )
    parser.add_argument(
        "--resume",
        action="store_true",
        help="continue the run named by the config from its latest checkpoint",
    )
    parser.add_argument(
        "--auto-resume",
        action="store_true",
        help="continue the run if its folder holds checkpoints, else start it",
    )
    parser.add_argument(
        "overrides",
        nargs="*",
        metavar="key.path=value",
        help="config overrides, e.g. optim.lr=5e-4 train.epochs=10",
    )
    return parser


def train_main(argv: list[str] | None = None) -> int:
    from vit.config import load_config
    from vit.engine import NonFiniteLossError
    from vit.images import BadImageError
    from vit.trainer import fit, has_checkpoints

    args = train_parser().parse_args(argv)
    _setup_process()
    try:
        cfg = load_config(args.config, args.overrides)
        resume = args.resume or (args.auto_resume and has_checkpoints(cfg))
        fit(cfg, resume=resume)
    except (ConfigError, FileNotFoundError, BadImageError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except NonFiniteLossError as e:  # the run stopped itself; its checkpoints are kept
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


def eval_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    parser = parser or argparse.ArgumentParser(
        prog="eval.py", description="Evaluate a checkpoint folder on a data set."
    )
    parser.add_argument("--checkpoint", required=True, help="checkpoint folder")
    parser.add_argument(
        "--dataset",
        help="fashion_mnist, cifar10, cifar100 or imagefolder (default: the checkpoint's)",
    )
    parser.add_argument("--root", help="data folder (default: the checkpoint's)")
    parser.add_argument("--split", help="split to evaluate (default: the config's test split)")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--workers", type=int, default=0)
    parser.add_argument(
        "--bad-files",
        choices=("error", "skip"),
        default="error",
        help="stop at the first unreadable image, or skip and count them",
    )
    parser.add_argument(
        "--out",
        help="folder for metrics.json and confusion_matrix.png "
        "(default: CHECKPOINT/eval_<dataset>_<split>)",
    )
    return parser


def eval_main(argv: list[str] | None = None) -> int:
    from vit.evaluation import evaluate_checkpoint

    args = eval_parser().parse_args(argv)
    _setup_process()
    try:
        r = evaluate_checkpoint(
            args.checkpoint,
            args.dataset,
            args.root,
            args.split,
            args.batch_size,
            args.bad_files,
            args.workers,
            args.out,
        )
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if "out_dir" in r:
        print(
            f"{r['dataset']} {r['split']}: {r['samples']} images, top-1 {r['top1']:.2f}%, "
            f"top-5 {r['top5']:.2f}%, loss {r['loss']:.4f}, ECE {r['ece']:.4f}, "
            f"skipped {r['skipped_files']}"
        )
        print(f"report: {r['out_dir']}/metrics.json, {r['out_dir']}/confusion_matrix.png")
    return 0


def _model_source_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "checkpoint",
        metavar="CHECKPOINT",
        help="checkpoint folder, timm weight file (with --model) or timm pretrained name",
    )
    parser.add_argument(
        "--model",
        metavar="PRESET",
        help="for a weight file: our preset, optionally with timm's tag for its preprocessing "
        "(e.g. vit_small_patch16_224.augreg_in21k_ft_in1k)",
    )
    parser.add_argument("--device", choices=("cpu", "cuda", "auto"), default="auto")


def predict_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    parser = parser or argparse.ArgumentParser(
        prog="vit predict", description="Top-k labels for image files."
    )
    _model_source_args(parser)
    parser.add_argument("paths", nargs="+", metavar="PATH", help="image files, folders or globs")
    parser.add_argument("--top-k", type=int, default=5)
    parser.add_argument("--format", choices=("table", "json", "csv"), default="table")
    parser.add_argument("--batch-size", type=int, default=32)
    return parser


def predict_main(argv: list[str] | None = None) -> int:
    """Exit status 0 when every file was predicted, 1 when some failed, 2 on bad usage."""
    from vit.predict import Predictor, expand_paths, format_records, report_failures

    args = predict_parser().parse_args(argv)
    _setup_process()
    try:
        predictor = Predictor.from_source(args.checkpoint, args.model, args.device)
        paths, unmatched = expand_paths(args.paths)
        records = predictor.predict_paths(paths, args.top_k, args.batch_size, progress=True)
    except (ValueError, OSError, TypeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    sys.stdout.write(format_records(records, args.format))
    return 1 if report_failures(records, unmatched, sys.stderr) else 0


def rollout_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    parser = parser or argparse.ArgumentParser(
        prog="vit rollout",
        description="Attention-rollout pictures of images, or (--evaluate) deletion and "
        "insertion curves of the maps on a data split.",
    )
    _model_source_args(parser)
    parser.add_argument("images", nargs="*", metavar="IMAGE", help="image files, folders or globs")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--method", choices=("rollout", "gradient"), default="rollout")
    parser.add_argument("--head-fusion", choices=("mean", "max", "min"), default="mean")
    parser.add_argument("--discard-ratio", type=float, default=0.9)
    parser.add_argument(
        "--target", help="class index or name to explain (gradient only; default: predicted)"
    )
    parser.add_argument("--alpha", type=float, default=0.5, help="opacity of the heat map")
    parser.add_argument(
        "--img-size",
        type=int,
        nargs="+",
        metavar="N",
        help="input size H [W] (default: the checkpoint's)",
    )
    parser.add_argument("--batch-size", type=int, default=16)
    group = parser.add_argument_group("images of a data split (--from-split, --evaluate)")
    group.add_argument(
        "--from-split",
        action="store_true",
        help="pictures of the first --limit images of a data split instead of IMAGE paths",
    )
    group.add_argument("--evaluate", action="store_true", help="curves on a data split")
    group.add_argument("--dataset", help="default: the checkpoint's")
    group.add_argument("--root", help="data folder (default: the checkpoint's)")
    group.add_argument("--split", help="default: the checkpoint's test split")
    group.add_argument(
        "--limit", type=int, default=100, help="images (drawn at random for --evaluate)"
    )
    group.add_argument("--steps", type=int, default=50, help="curve steps (at most the patches)")
    group.add_argument("--baseline", choices=("mean", "zero"), default="mean")
    group.add_argument("--seed", type=int, default=0)
    return parser


def _rollout_usage_error(args: argparse.Namespace) -> str | None:
    if sum([args.evaluate, args.from_split, bool(args.images)]) != 1:
        return "give IMAGE paths, --from-split or --evaluate (one of them)"
    if args.evaluate and args.target is not None:
        return "--target is not for --evaluate: each curve follows the image's predicted class"
    if args.target is not None and args.method != "gradient":
        return "--target needs --method gradient: plain rollout is class-agnostic"
    if args.method == "gradient" and args.head_fusion != "mean":
        return "--head-fusion is for --method rollout; gradient rollout averages the heads"
    if not 0.0 <= args.discard_ratio < 1.0:
        return f"--discard-ratio must be in [0, 1), got {args.discard_ratio}"
    if args.img_size is not None and len(args.img_size) > 2:
        return f"--img-size takes H or H W, got {args.img_size}"
    return None


def rollout_main(argv: list[str] | None = None) -> int:
    """Exit status 0 when every image was drawn, 1 when some failed, 2 on bad usage."""
    from vit.predict import Predictor, class_index, expand_paths, report_failures
    from vit.visualize import explain_files

    parser = rollout_parser()
    args = parser.parse_args(argv)
    problem = _rollout_usage_error(args)
    if problem:
        parser.error(problem)
    _setup_process()
    try:
        predictor = Predictor.from_source(args.checkpoint, args.model, args.device)
        if args.img_size:
            h, w = args.img_size * 2 if len(args.img_size) == 1 else args.img_size
            predictor = predictor.resized((h, w))
        if args.evaluate:
            return _rollout_evaluate(args, predictor)
        target = None if args.target is None else class_index(args.target, predictor.class_names)
        if args.from_split:
            return _rollout_split_pictures(args, predictor, target)
        paths, unmatched = expand_paths(args.images)
        records = explain_files(
            predictor,
            paths,
            args.out,
            args.batch_size,
            progress=True,
            method=args.method,
            head_fusion=args.head_fusion,
            discard_ratio=args.discard_ratio,
            target=target,
            alpha=args.alpha,
        )
    except (ValueError, OSError, TypeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for r in records:
        if "overlay" in r:
            print(f"{r['path']}: {r['label']} {r['probability']:.1%} -> {r['overlay']}")
    if any("overlay" in r for r in records):
        print(f"grid: {args.out}/grid.png")
    return 1 if report_failures(records, unmatched, sys.stderr) else 0


def _split_source(args: argparse.Namespace, predictor):
    """The data split named by --dataset/--root/--split, defaulting to the checkpoint's."""
    from pathlib import Path

    from vit.checkpoint import read_meta
    from vit.data import build_source
    from vit.evaluation import checkpoint_data_defaults

    folder = Path(args.checkpoint)
    saved = checkpoint_data_defaults(folder) if folder.is_dir() else {}
    meta = read_meta(folder) if folder.is_dir() else {}
    dataset = args.dataset or saved.get("dataset") or meta.get("dataset")
    if dataset is None:
        raise ValueError(f"{args.checkpoint}: no data set saved with it; pass --dataset")
    root = args.root if args.root is not None else saved.get("root")
    split = args.split or saved.get("test_split") or "test"
    source = build_source(
        dataset,
        root,
        split,
        download=bool(saved.get("download", False)),
        channels=predictor.channels,
        bad_files="skip",
        class_names=predictor.class_names,
    )
    return source, dataset, split


def _rollout_split_pictures(args: argparse.Namespace, predictor, target: int | None) -> int:
    from vit.loader import AugmentedDataset
    from vit.visualize import explain_dataset, save_explanations

    source, dataset, split = _split_source(args, predictor)
    indices = list(range(min(args.limit, len(source))))
    explanations = explain_dataset(
        predictor.model,
        AugmentedDataset(source, predictor.transform),
        indices,
        predictor.class_names,
        method=args.method,
        head_fusion=args.head_fusion,
        discard_ratio=args.discard_ratio,
        target=target,
        alpha=args.alpha,
        batch_size=args.batch_size,
    )
    stems = [f"{dataset}_{split}_{i:05d}" for i in indices]
    grid = save_explanations(explanations, stems, args.out)
    for stem, e in zip(stems, explanations):
        print(f"{stem}: {e.title} -> {args.out}/{stem}_overlay.png")
    print(f"grid: {grid}")
    return 0


def _rollout_evaluate(args: argparse.Namespace, predictor) -> int:
    from vit.faithfulness_report import evaluate_source, format_summary, write_faithfulness

    source, dataset, split = _split_source(args, predictor)
    options = dict(
        head_fusion=args.head_fusion,
        discard_ratio=args.discard_ratio,
        steps=args.steps,
        baseline=args.baseline,
    )
    result = evaluate_source(
        predictor, source, args.limit, args.batch_size, args.seed, progress=True, **options
    )
    info = dict(checkpoint=str(args.checkpoint), dataset=dataset, split=split, **options)
    summary = write_faithfulness(result, args.out, info)
    print(format_summary(summary))
    print(f"wrote {args.out}/curves.json and {args.out}/curves.png")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="vit", description="Vision Transformer toolkit.")
    sub = parser.add_subparsers(dest="command", required=True)
    train_parser(sub.add_parser("train", help="train a model from a config"))
    eval_parser(sub.add_parser("eval", help="evaluate a checkpoint"))
    predict_parser(sub.add_parser("predict", help="top-k labels for image files"))
    rollout_parser(sub.add_parser("rollout", help="attention-rollout pictures and their check"))
    args, rest = parser.parse_known_args(argv)
    argv = sys.argv[1:] if argv is None else argv
    if args.command == "train":
        return train_main(argv[1:])
    if args.command == "eval":
        return eval_main(argv[1:])
    if args.command == "predict":
        return predict_main(argv[1:])
    if args.command == "rollout":
        return rollout_main(argv[1:])
    parser.error(f"unknown command {args.command}")
    return 2


if __name__ == "__main__":
    raise SystemExit(main())
