"""Shared parts of the benchmark scripts: command line, machine description, timing, memory,
the machine's matmul peak, tables and JSON reports.

The scripts import this module by name; they are run as ``python benchmarks/<name>.py``
from the repository root with the package installed (``pip install -e .``), which puts
this folder first on ``sys.path``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import shlex
import statistics
import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from vit.memory import keep_freed_memory
from vit.model import ViTConfig
from vit.presets import PRESETS

BENCH_DIR = Path(__file__).resolve().parent


# ----------------------------------------------------------------------- command line


def base_parser(name: str, description: str) -> argparse.ArgumentParser:
    """The options every benchmark takes: --quick, --device, --out."""
    parser = argparse.ArgumentParser(
        prog=f"benchmarks/{name}.py",
        description=description,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "--quick", action="store_true", help="tiny sizes, to check that the script works"
    )
    parser.add_argument("--device", choices=("cpu", "cuda", "auto"), default="auto")
    parser.add_argument(
        "--threads", type=int, default=None, help="torch CPU threads (unset: torch's own choice)"
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=BENCH_DIR / "results" / f"{name}.json",
        help="where the JSON report goes",
    )
    return parser


def command_line(name: str, argv: Sequence[str]) -> str:
    """The shell command that reproduces a run, from the repository root."""
    return shlex.join(["python", f"benchmarks/{name}.py", *argv])


MALLOC_KEEPS_FREED: bool | None = None  # set by setup()


def setup(args: argparse.Namespace) -> torch.device:
    """Apply the common options (threads, device), set malloc up as the ``vit`` commands
    do (vit.memory), and seed torch; return the device."""
    global MALLOC_KEEPS_FREED
    MALLOC_KEEPS_FREED = keep_freed_memory()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    return pick_device(args.device)


def pick_device(choice: str) -> torch.device:
    """``auto`` is CUDA when there is one, else the CPU; asking for a missing GPU is an error."""
    if choice == "auto":
        choice = "cuda" if torch.cuda.is_available() else "cpu"
    if choice == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available (torch.cuda.is_available())")
    return torch.device(choice)


# ---------------------------------------------------------------------------- machine


def cpu_model() -> str:
    """The CPU's marketing name from /proc/cpuinfo (Linux), else what Python knows."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info(device: torch.device) -> dict:
    """What the figures depend on: CPU, cores, threads, library versions, device, load."""
    import timm

    try:
        usable_cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        usable_cores = os.cpu_count()
    cpu = cpu_model()
    info = {
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "usable_cores": usable_cores,
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "timm": timm.__version__,
        "platform": platform.platform(),
        "device": device.type,
        "device_name": cpu,
        "malloc_keeps_freed_memory": MALLOC_KEEPS_FREED,
    }
    if hasattr(os, "getloadavg"):
        # other work on the machine slows every figure; the load (this run included) says
        # how busy it was
        info["load_average_1m"] = round(os.getloadavg()[0], 2)
    if device.type == "cuda":
        info["device_name"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
    return info


# ----------------------------------------------------------------------------- timing


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_call(fn: Callable[[], object], device: torch.device, calls: int = 1) -> float:
    """Seconds per call of ``fn``, averaged over ``calls`` back-to-back calls."""
    synchronize(device)
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    synchronize(device)
    return (time.perf_counter() - start) / calls


def calls_for(seconds_per_call: float, min_seconds: float) -> int:
    """Calls per timing sample so that a sample lasts at least ``min_seconds``."""
    return max(1, math.ceil(min_seconds / max(seconds_per_call, 1e-9)))


def alternate(
    fns: dict[str, Callable[[], object]],
    device: torch.device,
    rounds: int,
    warmup: int = 1,
    min_seconds: float = 0.0,
) -> dict[str, list[float]]:
    """Seconds per call of each function, timed in alternation over ``rounds`` rounds.

    Interleaving the contenders exposes them to the same background load and clock state;
    the order flips every round so neither always runs right after the other.

    Args:
        warmup: calls of each before the first round (allocator, kernels, compiling); the
            last one sizes the samples. There is always at least that one.
        min_seconds: each sample repeats the call until it lasts about this long.
    """
    calls = {}
    for name, fn in fns.items():
        for _ in range(max(warmup - 1, 0)):
            fn()
        calls[name] = calls_for(time_call(fn, device), min_seconds)
    times: dict[str, list[float]] = {name: [] for name in fns}
    names = list(fns)
    for r in range(rounds):
        for name in names if r % 2 == 0 else names[::-1]:
            times[name].append(time_call(fns[name], device, calls[name]))
    return times


def spread(values: Sequence[float]) -> dict[str, float]:
    """Median, quartiles and extremes of a sample."""
    values = sorted(values)
    if len(values) >= 2:
        q1, _, q3 = statistics.quantiles(values, n=4, method="inclusive")
    else:
        q1 = q3 = values[0]
    return {
        "median": statistics.median(values),
        "q1": q1,
        "q3": q3,
        "min": values[0],
        "max": values[-1],
    }


def rates(seconds: Sequence[float], items: float) -> dict[str, float]:
    """Items per second for each timing, summarised by :func:`spread`."""
    return spread([items / s for s in seconds])


def paired_ratio(a: Sequence[float], b: Sequence[float]) -> dict[str, float]:
    """Spread of the per-round ratio ``b[r] / a[r]`` of two alternated timings.

    With times in seconds this is the throughput ratio of ``a`` over ``b``; pairing the
    rounds cancels slow drifts of the machine that an unpaired ratio of medians would keep.
    """
    return spread([tb / ta for ta, tb in zip(a, b)])


# ----------------------------------------------------------------------------- memory


def peak_memory(fn: Callable[[], object], device: torch.device) -> int:
    """Peak bytes of tensor memory allocated while ``fn`` runs, above what was held before.

    CUDA: the caching allocator's own high-water mark. CPU: PyTorch keeps no CPU allocator
    statistics, but its profiler with ``profile_memory=True`` records every allocation and
    free made through PyTorch's CPU allocator; the running sum of those sizes is the tensor
    memory in use, and its maximum is the peak. It counts tensor storage only, not Python
    objects or allocator slack, and it is the same quantity as the CUDA figure.
    """
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - base
    # kineto prints a line at every profiler start and stop, and a spurious GPU error on a
    # machine without one; its levels end at 5, so 6 silences it (read at the first start)
    os.environ.setdefault("KINETO_LOG_LEVEL", "6")
    activities = [torch.profiler.ProfilerActivity.CPU]
    with torch.profiler.profile(activities=activities, profile_memory=True) as prof:
        fn()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    in_use = peak = 0
    for event in sorted(events, key=lambda e: e.start_ns()):
        in_use += event.nbytes()  # negative for a free
        peak = max(peak, in_use)
    return peak


# --------------------------------------------------------------------- machine's limit


def matmul_peak(
    device: torch.device, dtype: torch.dtype, sizes: Sequence[int], rounds: int = 3
) -> dict:
    """The best FLOP rate of square ``n x n`` matrix products of the device, over ``sizes``.

    A product of two n x n matrices is ``2 n^3`` FLOPs (a multiply and an add per term).
    """
    per_size = {n: 2 * n**3 / _matmul_seconds(n, device, dtype, rounds) for n in sizes}
    best = max(per_size, key=per_size.get)
    return {
        "dtype": str(dtype).removeprefix("torch."),
        "best_flops_per_s": per_size[best],
        "best_size": best,
        "flops_per_s_by_size": {str(n): r for n, r in per_size.items()},
    }


def _matmul_seconds(n: int, device: torch.device, dtype: torch.dtype, rounds: int) -> float:
    """Best seconds per ``n x n`` product over ``rounds`` samples."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    return min(alternate({"mm": lambda: a @ b}, device, rounds, min_seconds=0.05)["mm"])


# ------------------------------------------------------------------------ model steps


def build_size(preset: str, quick_size: int | None) -> int | None:
    """The image size to build ``preset`` at: its own (None), or ``quick_size`` under --quick
    for the presets whose own size is larger (the 224 ones; the small-image presets keep
    theirs, which their patch size divides)."""
    own = PRESETS[preset].get("img_size", ViTConfig.img_size)
    if quick_size is None or own <= quick_size:
        return None
    return quick_size


def autocast(device: torch.device, amp_dtype: torch.dtype | None):
    """Mixed-precision context for ``amp_dtype`` (None: full precision)."""
    if amp_dtype is None:
        return nullcontext()
    return torch.autocast(device.type, dtype=amp_dtype)


def inference_fn(
    model: nn.Module, images: torch.Tensor, amp_dtype: torch.dtype | None = None
) -> Callable[[], torch.Tensor]:
    """A call that runs one forward pass without autograd."""

    def run() -> torch.Tensor:
        with torch.inference_mode(), autocast(images.device, amp_dtype):
            return model(images)

    return run


def train_step_fn(
    model: nn.Module,
    images: torch.Tensor,
    targets: torch.Tensor,
    amp_dtype: torch.dtype | None = None,
) -> Callable[[], None]:
    """A call that runs one training step: forward, cross-entropy, backward, AdamW step."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.05)

    def run() -> None:
        return train_step(model, optimizer, images, targets, amp_dtype)

    return run


def train_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    images: torch.Tensor,
    targets: torch.Tensor,
    amp_dtype: torch.dtype | None = None,
) -> None:
    """One optimiser step on one batch."""
    with autocast(images.device, amp_dtype):
        loss = F.cross_entropy(model(images), targets)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()


# ---------------------------------------------------------------------------- reports


def print_table(rows: Sequence[dict], columns: Sequence[tuple[str, str, str]]) -> None:
    """Print ``rows`` as a fixed-width table; ``columns`` are (key, header, format spec).

    Columns with a format spec hold numbers and are right-aligned; the others are text.
    """
    cells = [[header for _, header, _ in columns]]
    for row in rows:
        cells.append([_cell(row.get(key), spec) for key, _, spec in columns])
    widths = [max(len(line[i]) for line in cells) for i in range(len(columns))]
    numeric = [bool(spec) for _, _, spec in columns]
    for k, line in enumerate(cells):
        print("  ".join(c.rjust(w) if r else c.ljust(w) for c, w, r in zip(line, widths, numeric)))
        if k == 0:
            print("  ".join("-" * w for w in widths))


def _cell(value: object, spec: str) -> str:
    if value is None:
        return "-"
    if isinstance(value, int | float) and not isinstance(value, bool):
        return format(value, spec)
    return str(value)


def write_report(
    path: Path, name: str, argv: Sequence[str], device: torch.device, results: dict
) -> Path:
    """Write the JSON report: the results with the date, the machine and the command."""
    report = {
        "benchmark": name,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": command_line(name, argv),
        "machine": machine_info(device),
        **results,
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        json.dump(report, f, indent=2)
        f.write("\n")
    print(f"\nwrote {path}")
    return path
