"""What attention maps cost: a forward that returns attention probabilities, and attention
rollout on top of it, against a plain forward.

Three calls per model, all in eval mode without autograd, timed in alternation:

- ``plain``: ``model(x)``, the fused attention kernel, no N x N matrix kept;
- ``attention``: ``model(x, return_attention=True)``, the explicit float32 softmax path,
  every layer's ``[B, heads, N, N]`` probabilities kept;
- ``rollout``: ``vit.rollout.rollout_maps(model, x)``, the user-facing call: the above,
  then rollout (Abnar & Zuidema, 2020) and the cls-token maps.

Peak memory is the tensor memory allocated during the call above what was held before
(weights and inputs excluded): the CUDA allocator's high-water mark on a GPU, and on a CPU
the running total of the allocations and frees PyTorch's profiler records (see
``common.peak_memory``). The time ratio to ``plain`` is the figure the target (at most 1.5)
is judged by.

Run from the repository root: ``python benchmarks/attention_cost.py [--quick]``.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

import common
import torch

from vit import create_model
from vit.rollout import rollout_maps

NAME = "attention_cost"

# (preset, batch size)
CPU_ROWS = [
    ("vit_mini_convstem_patch7_28", 128),
    ("vit_mini_patch7_28", 128),
    ("vit_mini_patch4_28", 128),
    ("vit_tiny_patch16_224", 16),
    ("vit_small_patch16_224", 8),
]
CUDA_ROWS = [
    ("vit_mini_convstem_patch7_28", 1024),
    ("vit_mini_patch7_28", 1024),
    ("vit_tiny_patch16_224", 256),
    ("vit_small_patch16_224", 128),
    ("vit_base_patch16_224", 64),
]
QUICK_ROWS = [
    ("vit_mini_convstem_patch7_28", 8),
    ("vit_mini_patch7_28", 8),
    ("vit_tiny_patch16_224", 2),
]
QUICK_IMG_SIZE = 64  # --quick builds the 224 presets at 64x64 (a 4x4 grid)
CALLS = ("plain", "attention", "rollout")


def calls(model: torch.nn.Module, images: torch.Tensor) -> dict:
    """The three measured calls on one batch."""

    def plain() -> torch.Tensor:
        with torch.no_grad():
            return model(images)

    def attention() -> tuple:
        with torch.no_grad():
            return model(images, return_attention=True)

    def rollout() -> tuple:
        return rollout_maps(model, images)  # runs without autograd itself

    return {"plain": plain, "attention": attention, "rollout": rollout}


def attention_bytes(model, batch: int) -> int:
    """Bytes of every layer's float32 probabilities ``[B, heads, N, N]``, kept for rollout."""
    cfg = model.cfg
    N = 1 + model.grid_size[0] * model.grid_size[1]
    return cfg.depth * batch * cfg.num_heads * N * N * 4


def measure_row(preset: str, batch: int, img_size: int | None, device, settings: dict) -> dict:
    """Time and peak memory of the three calls for one preset."""
    overrides = {} if img_size is None else {"img_size": img_size}
    model = create_model(preset, **overrides).to(device).eval()
    H, W = model.img_size
    images = torch.randn(batch, model.cfg.in_chans, H, W, device=device)
    fns = calls(model, images)
    times = common.alternate(fns, device, **settings)
    memory = {name: common.peak_memory(fn, device) for name, fn in fns.items()}
    row = {
        "model": preset,
        "batch": batch,
        "img_size": [H, W],
        "tokens": 1 + model.grid_size[0] * model.grid_size[1],
        "attention_maps_bytes": attention_bytes(model, batch),
        "seconds": {name: common.spread(times[name]) for name in CALLS},
        "peak_bytes": memory,
    }
    for name in ("attention", "rollout"):
        row[f"{name}_time_ratio"] = (
            row["seconds"][name]["median"] / row["seconds"]["plain"]["median"]
        )
        # per round: how much longer than the plain forward timed next to it
        row[f"{name}_time_ratio_by_round"] = common.paired_ratio(times["plain"], times[name])
        row[f"{name}_memory_ratio"] = memory[name] / max(memory["plain"], 1)
    return row


def parse_args(argv: Sequence[str]):
    parser = common.base_parser(NAME, __doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=None, help="alternated timing rounds")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    device = common.setup(args)
    if args.quick:
        rows_plan, img_size = QUICK_ROWS, QUICK_IMG_SIZE
        settings = {"rounds": args.rounds or 2, "warmup": 1, "min_seconds": 0.0}
    else:
        rows_plan, img_size = (CUDA_ROWS if device.type == "cuda" else CPU_ROWS), None
        settings = {"rounds": args.rounds or 5, "warmup": 2, "min_seconds": 0.3}
    rows = []
    for preset, batch in rows_plan:
        size = common.build_size(preset, img_size)
        rows.append(measure_row(preset, batch, size, device, settings))
    print_rows(rows)
    results = {"settings": settings, "target_time_ratio": 1.5, "rows": rows}
    common.write_report(args.out, NAME, argv, device, results)
    return results


def print_rows(rows: list[dict]) -> None:
    table = []
    for row in rows:
        seconds, memory = row["seconds"], row["peak_bytes"]
        table.append(
            {
                **row,
                **{f"{k}_ms": 1e3 * seconds[k]["median"] for k in CALLS},
                **{f"{k}_mb": memory[k] / 2**20 for k in CALLS},
                "maps_mb": row["attention_maps_bytes"] / 2**20,
            }
        )
    common.print_table(
        table,
        [
            ("model", "model", ""),
            ("batch", "batch", "d"),
            ("plain_ms", "plain ms", ".1f"),
            ("attention_ms", "+attn ms", ".1f"),
            ("rollout_ms", "+rollout ms", ".1f"),
            ("rollout_time_ratio", "rollout/plain", ".2f"),
            ("plain_mb", "plain MiB", ".1f"),
            ("attention_mb", "+attn MiB", ".1f"),
            ("rollout_mb", "+rollout MiB", ".1f"),
            ("maps_mb", "maps MiB", ".1f"),
            ("rollout_memory_ratio", "mem ratio", ".1f"),
        ],
    )


if __name__ == "__main__":
    main()
