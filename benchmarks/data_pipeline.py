"""Images per second of each data set's training loader, against the model that eats them.

For each data set, with its run config's model, batch size and augmentations:

- the training loader alone (``vit.loader.train_loader``: per-image read or decode, then the
  albumentations pipeline, then collation) for each worker count, over one epoch in steady
  state (after the workers have started);
- the model's own rate: training steps (forward, backward, AdamW) on random tensors;
- a fixed number of training steps fed by the real loader (with the worker count a run
  would choose, ``vit.build.default_workers``) against the same steps on batches already
  in memory; the ratio says how much of the model's speed the loader leaves.

Data sets: Fashion-MNIST (IDX files, in memory), a CIFAR-10 image folder (PNG files,
decoded once and kept, and decoded per image) and an Imagenette folder (JPEG, decoded per
image). Folders are cut to ``--limit`` images (the first of each class, through a
temporary folder of links), so building a source stays quick; folders not given on the
command line are skipped with a note.

Run from the repository root, e.g.
``python benchmarks/data_pipeline.py --cifar-dir DATA/cifar10/train --imagenette-dir
DATA/imagenette/train``.
"""

from __future__ import annotations

import math
import os
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import common
import torch

from vit.build import build_model, default_workers, model_config, normalisation, train_dataset
from vit.config import Config, load_config
from vit.data import FolderSource, Subset, build_source
from vit.datasets import FASHION_MNIST_ROOT
from vit.images import is_image_path
from vit.loader import AugmentedDataset, train_loader

NAME = "data_pipeline"
CONFIG_DIR = common.BENCH_DIR.parent / "configs"

# data set -> (config file or None, overrides); folder sets get data.root from the flags
DATASETS = {
    "fashion_mnist": ("fashion_mnist.yaml", []),
    "cifar10_in_memory": (
        None,
        ["model.name=vit_tiny_patch4_32", "aug.crop=pad_crop", "data.in_memory=true"],
    ),
    "cifar10_decode": (
        None,
        ["model.name=vit_tiny_patch4_32", "aug.crop=pad_crop", "data.in_memory=false"],
    ),
    "imagenette_decode": (
        None,
        [
            "model.name=vit_tiny_patch16_224",
            "aug.crop=random_resized",
            "data.batch_size=16",  # a 224 training step is slow on a CPU: keep the run short
            "data.in_memory=false",
        ],
    ),
}


def dataset_config(name: str, root: str, quick: bool) -> Config:
    """The run config of a benchmarked data set; --quick shrinks the batch, model and image."""
    config_file, overrides = DATASETS[name]
    path = CONFIG_DIR / config_file if config_file else None
    overrides = list(overrides)
    if name != "fashion_mnist":
        overrides += ["data.dataset=imagefolder", f"data.root={root}"]
    if quick:
        # the model's speed is not what --quick checks: one block is enough
        overrides += ["data.batch_size=8", "model.options.depth=1"]
        if name.startswith("imagenette"):
            overrides.append("model.img_size=64")  # decoding stays full size
    return load_config(path, overrides)


def subset_folder(src: Path, limit: int, dst: Path) -> Path:
    """Link the first ``ceil(limit / classes)`` images of each class of ``src`` into ``dst``."""
    classes = sorted(p for p in src.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise SystemExit(f"{src}: no class folders; expected an ImageFolder split")
    per_class = math.ceil(limit / len(classes))
    for folder in classes:
        (dst / folder.name).mkdir(parents=True)
        names = (n for n in sorted(os.listdir(folder)) if is_image_path(n))
        for name, _ in zip(names, range(per_class)):
            os.symlink(folder.resolve() / name, dst / folder.name / name)
    return dst


def build_dataset(cfg: Config, name: str, limit: int, tmp: Path, channels: int, img_size):
    """The augmented training set of ``limit`` images, and seconds spent building it."""
    start = time.perf_counter()
    if name == "fashion_mnist":
        source = build_source("fashion_mnist", cfg.data.root, "train", channels=channels)
        source = Subset(source, range(min(limit, len(source))))
    else:
        # data.root holds the split folder itself here, not its parent
        folder = subset_folder(Path(cfg.data.root), limit, tmp / name)
        source = FolderSource(folder, channels=channels, in_memory=cfg.data.in_memory)
    seconds = time.perf_counter() - start
    mean, std = normalisation(cfg, channels)
    return train_dataset(source, cfg, img_size, mean, std), seconds


def endless(loader) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The loader's batches, epoch after epoch."""
    epoch = 0
    while True:
        loader.batch_sampler.set_epoch(epoch)
        yield from loader
        epoch += 1


def loader_rate(dataset: AugmentedDataset, batch_size: int, workers: int) -> dict:
    """Images per second of the training loader alone over one epoch, in steady state.

    One batch of a warm-up epoch starts the workers; the timed epoch begins once they have
    taken up its first indices, so neither their start nor a head start of prefetched
    batches is in the figure.
    """
    loader = train_loader(dataset, batch_size, seed=0, rank=0, world_size=1, num_workers=workers)
    start = time.perf_counter()
    next(iter(loader))
    startup = time.perf_counter() - start
    loader.batch_sampler.set_epoch(1)
    batches = iter(loader)  # persistent workers finish the warm-up epoch's batches here
    images, start = 0, time.perf_counter()
    for x, _ in batches:
        images += len(x)
    seconds = time.perf_counter() - start
    del batches, loader  # stops the workers
    return {"workers": workers, "images_per_s": images / seconds, "startup_s": startup}


def timed_steps(step, batches: Iterator, steps: int, device: torch.device) -> float:
    """Seconds for ``steps`` training steps, after one untimed step."""
    for k in range(steps + 1):
        if k == 1:
            common.synchronize(device)
            start = time.perf_counter()
        images, targets = next(batches)
        step(images.to(device, non_blocking=True), targets.to(device, non_blocking=True))
    common.synchronize(device)
    return time.perf_counter() - start


def epoch_comparison(
    model, dataset: AugmentedDataset, cfg: Config, workers: int, plan: dict, device
) -> dict:
    """The same training steps fed by the real loader and by batches held in memory."""
    batch_size, steps = cfg.data.batch_size, plan["steps"]
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step(images: torch.Tensor, targets: torch.Tensor) -> None:
        common.train_step(model, optimizer, images, targets)

    loader = train_loader(dataset, batch_size, seed=0, rank=0, world_size=1, num_workers=workers)
    held = train_loader(dataset, batch_size, seed=0, rank=0, world_size=1, num_workers=0)
    in_memory = [b for _, b in zip(range(steps + 1), endless(held))]
    times = {"real_loader": [], "in_memory": []}
    for r in range(plan["rounds"]):
        order = ["real_loader", "in_memory"] if r % 2 == 0 else ["in_memory", "real_loader"]
        for name in order:
            batches = endless(loader) if name == "real_loader" else iter(in_memory)
            times[name].append(timed_steps(step, batches, steps, device))
            del batches  # a half-read epoch of the real loader is abandoned here
    del loader
    images = steps * batch_size
    result = {
        "workers": workers,
        "steps": steps,
        "real_loader_images_per_s": common.rates(times["real_loader"], images),
        "in_memory_images_per_s": common.rates(times["in_memory"], images),
        "ratio_by_round": common.paired_ratio(times["in_memory"], times["real_loader"]),
    }
    result["ratio"] = (
        result["real_loader_images_per_s"]["median"] / result["in_memory_images_per_s"]["median"]
    )
    return result


def model_rate(model, cfg: Config, channels: int, img_size, plan: dict, device) -> dict:
    """Training-step images per second of the config's model on random tensors."""
    B = cfg.data.batch_size
    images = torch.randn(B, channels, *img_size, device=device)
    targets = torch.randint(0, model.num_classes, (B,), device=device)
    fn = common.train_step_fn(model, images, targets)
    times = common.alternate({"model": fn}, device, plan["rounds"], warmup=1)
    return common.rates(times["model"], B)


def run_dataset(name: str, root: str, args, plan: dict, tmp: Path, device) -> dict:
    """All the measurements of one data set."""
    cfg = dataset_config(name, root, args.quick)
    arch = model_config(cfg.model, num_classes=1)  # the input size does not need the classes
    channels = arch.in_chans
    img_size = (arch.img_size,) * 2 if isinstance(arch.img_size, int) else tuple(arch.img_size)
    dataset, build_s = build_dataset(cfg, name, plan["limit"], tmp, channels, img_size)
    num_classes = len(dataset.source.class_names)
    model = build_model(cfg.model, num_classes).to(device).train()
    B = cfg.data.batch_size
    result = {
        "dataset": name,
        "model": cfg.model.name,
        "img_size": list(img_size),
        "batch_size": B,
        "images": len(dataset),
        "in_memory": name == "fashion_mnist" or cfg.data.in_memory,
        "crop": cfg.aug.crop,
        "source_build_s": build_s,
    }
    result["model_images_per_s"] = model_rate(model, cfg, channels, img_size, plan, device)
    consumed = result["model_images_per_s"]["median"]
    result["loader"] = []
    for workers in plan["workers"]:
        rate = loader_rate(dataset, B, workers)
        rate["loader_over_model"] = rate["images_per_s"] / consumed
        result["loader"].append(rate)
    workers = default_workers(cfg, img_size)
    result["epoch"] = epoch_comparison(model, dataset, cfg, workers, plan, device)
    return result


def parse_args(argv: Sequence[str]):
    parser = common.base_parser(NAME, __doc__.splitlines()[0])
    parser.add_argument("--fashion-root", default=FASHION_MNIST_ROOT, help="Fashion-MNIST files")
    parser.add_argument("--cifar-dir", default=None, help="CIFAR-10 ImageFolder split (train/)")
    parser.add_argument("--imagenette-dir", default=None, help="Imagenette ImageFolder split")
    parser.add_argument("--datasets", nargs="+", choices=list(DATASETS), default=list(DATASETS))
    parser.add_argument("--limit", type=int, default=None, help="images per data set")
    parser.add_argument("--workers", type=int, nargs="+", default=None, help="worker counts")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per epoch run")
    return parser.parse_args(argv)


def make_plan(args) -> dict:
    quick = {"limit": 32, "workers": [0, 1], "steps": 2, "rounds": 1}
    # the training steps dominate the full run (seconds each at 224 or with 65 tokens)
    full = {"limit": 2560, "workers": [0, 1, 2], "steps": 6, "rounds": 2}
    plan = dict(quick if args.quick else full)
    for key in ("limit", "workers", "steps"):
        if getattr(args, key) is not None:
            plan[key] = getattr(args, key)
    if plan["steps"] < 1 or plan["limit"] < 1 or min(plan["workers"]) < 0:
        raise SystemExit(f"--steps and --limit must be >= 1 and --workers >= 0; got {plan}")
    return plan


def data_root(name: str, args) -> tuple[str | None, str | None]:
    """The data set's location, or None and the reason it is skipped."""
    if name == "fashion_mnist":
        root = Path(args.fashion_root)
        # where vit.datasets.read_fashion_mnist looks: the folder, and torchvision's layout in it
        if any(d.glob("train-images-idx3-ubyte*") for d in (root, root / "FashionMNIST/raw")):
            return args.fashion_root, None
        return None, f"no Fashion-MNIST files in {args.fashion_root} (--fashion-root)"
    flag = "--cifar-dir" if name.startswith("cifar") else "--imagenette-dir"
    folder = args.cifar_dir if name.startswith("cifar") else args.imagenette_dir
    if folder is None:
        return None, f"not run: give its ImageFolder split with {flag} DIR"
    if not Path(folder).is_dir():
        return None, f"{flag} {folder}: not a folder"
    return folder, None


def main(argv: Sequence[str] | None = None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    device = common.setup(args)
    plan = make_plan(args)
    rows, skipped = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.datasets:
            root, why = data_root(name, args)
            if why:
                skipped[name] = why
                print(f"{name}: skipped, {why}")
                continue
            start = time.perf_counter()
            rows.append(run_dataset(name, root, args, plan, Path(tmp), device))
            print(f"{name}: done in {time.perf_counter() - start:.0f} s")
    print_rows(rows)
    results = {"plan": plan, "datasets": rows, "skipped": skipped}
    common.write_report(args.out, NAME, argv, device, results)
    return results


def print_rows(rows: list[dict]) -> None:
    loader_table, epoch_table = [], []
    for row in rows:
        model = row["model_images_per_s"]["median"]
        for rate in row["loader"]:
            loader_table.append({**row, **rate, "model_rate": model})
        epoch = row["epoch"]
        epoch_table.append(
            {
                **row,
                "workers": epoch["workers"],
                "real": epoch["real_loader_images_per_s"]["median"],
                "held": epoch["in_memory_images_per_s"]["median"],
                "ratio": epoch["ratio"],
            }
        )
    print("\nloader alone against the model's training rate (images/s)")
    common.print_table(
        loader_table,
        [
            ("dataset", "data set", ""),
            ("workers", "workers", "d"),
            ("images_per_s", "loader", ".0f"),
            ("model_rate", "model", ".0f"),
            ("loader_over_model", "loader/model", ".2f"),
        ],
    )
    print("\ntraining steps: real loader against batches in memory (images/s)")
    common.print_table(
        epoch_table,
        [
            ("dataset", "data set", ""),
            ("workers", "workers", "d"),
            ("real", "real loader", ".0f"),
            ("held", "in memory", ".0f"),
            ("ratio", "real/memory", ".3f"),
        ],
    )


if __name__ == "__main__":
    main()
