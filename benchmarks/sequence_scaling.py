"""Time and memory of one ViT block as the token count grows: fused attention against the
explicit path that materialises the attention probabilities.

One pre-norm encoder block (``vit.model.Block``, ViT-S width by default: 384 wide, 6 heads,
MLP 4x) runs forward without autograd on ``[B, N, C]`` tokens for N = 64, 128, ... 4096:

- ``fused``: ``block(x)``, ``F.scaled_dot_product_attention``, which never holds the
  ``N x N`` matrix;
- ``explicit``: ``block(x, return_attention=True)``, float32 ``softmax(Q K^T / sqrt(d)) V``
  with the probabilities returned, as attention maps need.

Per block, the linear layers cost ``24 N C^2`` FLOPs (qkv, projection, MLP) and attention
``4 N^2 C``, so attention dominates beyond ``N = 6 C`` and the time turns quadratic; the
``slope`` column is the log-log slope of time against N between neighbouring rows (1 for
linear, 2 for quadratic). The explicit path's ``B x heads x N x N`` float32 matrix is
``4 B heads N^2`` bytes, printed beside the measured peak (``common.peak_memory``: tensor
memory allocated during the call, above what was held before).

Run from the repository root: ``python benchmarks/sequence_scaling.py [--quick]``.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Sequence

import common
import torch

from vit.model import Block, ViTConfig

NAME = "sequence_scaling"
PATHS = ("fused", "explicit")


def block_flops(tokens: int, dim: int, mlp_ratio: float) -> dict[str, int]:
    """Forward FLOPs of one block by part (a multiply-add is 2 FLOPs)."""
    N, C, M = tokens, dim, int(dim * mlp_ratio)
    return {
        "linear": 2 * N * C * 3 * C + 2 * N * C * C + 2 * 2 * N * C * M,
        "attention": 2 * 2 * N * N * C,  # Q K^T and the weighted sum of V
    }


def measure_tokens(block: Block, tokens: int, args, settings: dict, device) -> dict:
    """Time and peak memory of both paths at one token count."""
    x = torch.randn(args.batch, tokens, args.dim, device=device)  # B, N, C

    def fused() -> torch.Tensor:
        with torch.no_grad():
            return block(x)[0]

    def explicit() -> torch.Tensor:
        with torch.no_grad():
            return block(x, return_attention=True)

    fns = {"fused": fused, "explicit": explicit}
    times = common.alternate(fns, device, **settings)
    flops = block_flops(tokens, args.dim, args.mlp_ratio)
    row = {
        "tokens": tokens,
        "seconds": {name: common.spread(times[name]) for name in PATHS},
        "peak_bytes": {name: common.peak_memory(fn, device) for name, fn in fns.items()},
        "attention_matrix_bytes": 4 * args.batch * args.heads * tokens * tokens,
        "attention_flop_fraction": flops["attention"] / sum(flops.values()),
    }
    row["explicit_over_fused_time"] = (
        row["seconds"]["explicit"]["median"] / row["seconds"]["fused"]["median"]
    )
    row["explicit_over_fused_memory"] = row["peak_bytes"]["explicit"] / max(
        row["peak_bytes"]["fused"], 1
    )
    return row


def add_slopes(rows: list[dict]) -> None:
    """Log-log slope of median time against tokens, from the previous row (None for the first)."""
    for prev, row in zip([None, *rows], rows):
        for name in PATHS:
            slope = None
            if prev is not None:
                ratio = row["seconds"][name]["median"] / prev["seconds"][name]["median"]
                slope = math.log(ratio) / math.log(row["tokens"] / prev["tokens"])
            row[f"{name}_slope"] = slope


def parse_args(argv: Sequence[str]):
    parser = common.base_parser(NAME, __doc__.splitlines()[0])
    parser.add_argument("--dim", type=int, default=384, help="block width C")
    parser.add_argument("--heads", type=int, default=6)
    parser.add_argument("--mlp-ratio", type=float, default=4.0)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--min-tokens", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, default=None, help="default 4096 (256 quick)")
    parser.add_argument("--rounds", type=int, default=None, help="alternated timing rounds")
    return parser.parse_args(argv)


def token_counts(low: int, high: int) -> list[int]:
    """Powers of two from ``low`` to ``high`` inclusive."""
    if low < 1 or low & (low - 1) or high < low:
        raise SystemExit(f"--min-tokens {low} must be a power of two <= --max-tokens {high}")
    counts = [low]
    while counts[-1] * 2 <= high:
        counts.append(counts[-1] * 2)
    return counts


def main(argv: Sequence[str] | None = None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    device = common.setup(args)
    high = args.max_tokens or (256 if args.quick else 4096)
    if args.quick:
        settings = {"rounds": args.rounds or 1, "warmup": 1, "min_seconds": 0.0}
    else:
        settings = {"rounds": args.rounds or 3, "warmup": 1, "min_seconds": 0.2}
    cfg = ViTConfig(embed_dim=args.dim, num_heads=args.heads, mlp_ratio=args.mlp_ratio)
    block = Block(cfg, drop_path=0.0).to(device).eval()
    rows = [
        measure_tokens(block, n, args, settings, device)
        for n in token_counts(args.min_tokens, high)
    ]
    add_slopes(rows)
    print_rows(rows)
    block_desc = {"dim": args.dim, "heads": args.heads, "mlp_ratio": args.mlp_ratio}
    results = {"settings": settings, "block": block_desc, "batch": args.batch, "rows": rows}
    common.write_report(args.out, NAME, argv, device, results)
    return results


def print_rows(rows: list[dict]) -> None:
    table = []
    for row in rows:
        seconds, memory = row["seconds"], row["peak_bytes"]
        table.append(
            {
                **row,
                "fused_ms": 1e3 * seconds["fused"]["median"],
                "explicit_ms": 1e3 * seconds["explicit"]["median"],
                "attn_pct": 100 * row["attention_flop_fraction"],
                "fused_mb": memory["fused"] / 2**20,
                "explicit_mb": memory["explicit"] / 2**20,
                "matrix_mb": row["attention_matrix_bytes"] / 2**20,
            }
        )
    common.print_table(
        table,
        [
            ("tokens", "N", "d"),
            ("attn_pct", "attn FLOP %", ".0f"),
            ("fused_ms", "fused ms", ".2f"),
            ("fused_slope", "slope", ".2f"),
            ("explicit_ms", "explicit ms", ".2f"),
            ("explicit_slope", "slope", ".2f"),
            ("fused_mb", "fused MiB", ".1f"),
            ("explicit_mb", "explicit MiB", ".1f"),
            ("matrix_mb", "NxN MiB", ".1f"),
        ],
    )


if __name__ == "__main__":
    main()
