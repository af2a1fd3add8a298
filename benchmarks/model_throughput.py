"""Throughput of our ViT against timm's ``VisionTransformer``, and against the machine's limit.

For each preset both models are built with the same architecture and the same weights
(timm's model, with timm's ``ConvStem`` inside its ``HybridEmbed`` for a hybrid, then
``vit.from_timm`` of it), and timed in alternation in one process:
inference (a forward pass without autograd) and a training step (forward, cross-entropy,
backward, AdamW step). The CPU runs float32; a GPU runs bf16 autocast, eager and under
``torch.compile``. The ratio ours/timm is of images per second, so above 1 means faster.

The machine's limit is the best rate of a square matrix product measured in the same run
(float32 on the CPU, bf16 on a GPU); each model's achieved FLOP rate is reported as a
fraction of it. FLOPs are counted from the architecture by :func:`forward_flops`.

Run from the repository root: ``python benchmarks/model_throughput.py [--quick]``.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from functools import partial

import common
import timm
import torch

from vit import VisionTransformer, ViTConfig, from_timm, preset_config
from vit.patch_embed import STEM_GROUPS, stem_kernel, stem_size

NAME = "model_throughput"

# batch size per preset and device. The CPU runs the Fashion-MNIST models (the hybrid is
# the default config's) and two ImageNet sizes; a GPU runs ViT-S and ViT-B by default
# (compiling is slow: keep it short)
CPU_BATCH = {
    "vit_mini_convstem_patch7_28": 128,
    "vit_mini_patch7_28": 128,
    "vit_mini_patch4_28": 128,
    "vit_tiny_patch16_224": 32,
    "vit_small_patch16_224": 16,
}
CUDA_BATCH = {
    "vit_mini_convstem_patch7_28": 1024,
    "vit_mini_patch7_28": 1024,
    "vit_mini_patch4_28": 1024,
    "vit_tiny_patch16_224": 256,
    "vit_small_patch16_224": 256,
    "vit_base_patch16_224": 128,
}
CPU_DEFAULT = [
    "vit_mini_convstem_patch7_28",
    "vit_mini_patch7_28",
    "vit_mini_patch4_28",
    "vit_tiny_patch16_224",
    "vit_small_patch16_224",
]
CUDA_DEFAULT = ["vit_small_patch16_224", "vit_base_patch16_224"]
QUICK_IMG_SIZE = 32  # --quick builds the 224 presets at 32x32 (a 2x2 grid)


def forward_flops(
    cfg: ViTConfig, img_size: tuple[int, int], cls_only_last: bool = False
) -> dict[str, int]:
    """FLOPs of one image's forward pass by part, counting a multiply-add as 2 FLOPs.

    With P = grid_h * grid_w patches, N = P + 1 tokens, width D, MLP width M, depth L,
    in_chans C, patch p and K classes, and n queries per block (n = N):

    - patch embedding (a p x p stride-p convolution): ``2 P (C p^2) D``; in a hybrid, each
      3x3 stride-2 stem convolution from C_in to C_out channels on an h x w output adds
      ``2 h w (C_in 9) C_out``, and the projection takes k x k patches of the last one's
      C_s channels, ``2 P (C_s k^2) D``
    - per block: qkv ``2 N D (3D)``; scores ``Q K^T`` over all heads ``2 n N D``; weighted
      sum ``A V`` ``2 n N D``; output projection ``2 n D^2``; MLP ``2 (2 n D M)``
    - head on the cls token: ``2 D K``

    ``cls_only_last`` counts our plain forward, whose last block computes the cls token
    alone (n = 1 there). Norms, softmax, GELU, residual adds and biases are left out: they
    are O(N D) each and a few percent of the total. A training step is counted as 3x the
    forward (the backward computes two products for every one of the forward).
    """
    H, W = img_size
    p, D, L = cfg.patch_size, cfg.embed_dim, cfg.depth
    P = (H // p) * (W // p)
    N = P + 1
    M = int(D * cfg.mlp_ratio)

    def block(n: int) -> dict[str, int]:
        return {
            "qkv": 2 * N * D * 3 * D,
            "attn_scores": 2 * n * N * D,
            "attn_weighted_sum": 2 * n * N * D,
            "attn_proj": 2 * n * D * D,
            "mlp": 2 * 2 * n * D * M,
        }

    full, last = block(N), block(1 if cls_only_last else N)
    flops, chans, (h, w) = {}, cfg.in_chans, (H, W)
    for i, out_chans in enumerate(cfg.stem_channels):
        h, w = stem_size(h, 1), stem_size(w, 1)
        flops[f"stem_conv{i}"] = 2 * h * w * (chans * 9) * out_chans
        chans = out_chans
    kh, kw = stem_kernel((H, W), p, len(cfg.stem_channels))
    flops["patch_embed"] = 2 * P * (chans * kh * kw) * D
    flops |= {part: (L - 1) * full[part] + last[part] for part in full}
    flops["head"] = 2 * D * cfg.num_classes
    return flops


def build_pair(
    preset: str, img_size: int | None, device: torch.device
) -> tuple[VisionTransformer, torch.nn.Module]:
    """Our model and timm's with the preset's architecture and identical weights."""
    overrides = {} if img_size is None else {"img_size": img_size}
    cfg = preset_config(preset, **overrides)
    arch = dict(
        img_size=cfg.img_size,
        patch_size=cfg.patch_size,
        in_chans=cfg.in_chans,
        num_classes=cfg.num_classes,
        embed_dim=cfg.embed_dim,
        depth=cfg.depth,
        num_heads=cfg.num_heads,
        mlp_ratio=cfg.mlp_ratio,
    )
    if cfg.stem_channels:  # a hybrid: timm's ConvStem inside its HybridEmbed
        theirs = timm_hybrid(cfg, arch)
    else:
        # our small presets have no timm name: any timm ViT name with the full architecture
        # passed as keyword arguments builds the same network
        name = preset if preset in timm.list_models("vit_*") else "vit_tiny_patch16_224"
        theirs = timm.create_model(name, pretrained=False, **arch)
    return from_timm(theirs).to(device), theirs.to(device)


def timm_hybrid(cfg: ViTConfig, arch: dict) -> torch.nn.Module:
    """timm's ``VisionTransformer`` of ``arch`` on the hybrid stem ``cfg`` describes."""
    from timm.layers import GroupNormAct
    from timm.models.vision_transformer import VisionTransformer as TimmViT
    from timm.models.vision_transformer_hybrid import ConvStem, HybridEmbed

    layers = len(cfg.stem_channels)
    norm = partial(GroupNormAct, num_groups=STEM_GROUPS)
    channels = tuple(cfg.stem_channels)
    stem = ConvStem(cfg.in_chans, layers, channels, stride=(2,) * layers, norm_layer=norm)
    kernel = stem_kernel(cfg.img_size, cfg.patch_size, layers)  # patches of the feature map
    embed = partial(HybridEmbed, backbone=stem)
    return TimmViT(**{**arch, "patch_size": kernel, "embed_layer": embed})


def measure_phase(
    fns: dict[str, object],
    batch: int,
    flops_per_image: dict[str, float],
    peak: float,
    device: torch.device,
    settings: dict,
) -> dict:
    """Alternated timings of ours and timm's for one phase, as rates, ratios and FLOP use."""
    times = common.alternate(fns, device, **settings)
    result = {
        "ours_images_per_s": common.rates(times["ours"], batch),
        "timm_images_per_s": common.rates(times["timm"], batch),
    }
    ours, theirs = result["ours_images_per_s"]["median"], result["timm_images_per_s"]["median"]
    result["ratio"] = ours / theirs
    result["ratio_by_round"] = common.paired_ratio(times["ours"], times["timm"])
    for who in ("ours", "timm"):
        flops_per_s = flops_per_image[who] * result[f"{who}_images_per_s"]["median"]
        result[f"{who}_flops_per_s"] = flops_per_s
        result[f"{who}_fraction_of_peak"] = flops_per_s / peak
    return result


def measure_row(
    preset: str,
    batch: int,
    img_size: int | None,
    mode: str,
    device: torch.device,
    peak: float,
    settings: dict,
) -> list[dict]:
    """Inference and training rows for one preset in one precision mode."""
    ours, theirs = build_pair(preset, img_size, device)
    cfg = ours.cfg
    H, W = ours.img_size
    # each model's FLOP rate counts the work it does: our last block computes one token
    flops = {
        "ours": sum(forward_flops(cfg, (H, W), cls_only_last=True).values()),
        "timm": sum(forward_flops(cfg, (H, W)).values()),
    }
    images = torch.randn(batch, cfg.in_chans, H, W, device=device)
    targets = torch.randint(0, cfg.num_classes, (batch,), device=device)
    amp = torch.bfloat16 if mode.startswith("bf16") else None
    if mode.endswith("compile"):
        ours, theirs = torch.compile(ours), torch.compile(theirs)
    # compiling happens in the warm-up calls: give it several
    settings = {**settings, "warmup": settings["warmup"] + (3 if mode.endswith("compile") else 0)}
    base = {"model": preset, "mode": mode, "batch": batch, "img_size": [H, W]}
    base["gflops_per_image_forward"] = {who: f / 1e9 for who, f in flops.items()}

    ours.eval()
    theirs.eval()
    infer = {
        "ours": common.inference_fn(ours, images, amp),
        "timm": common.inference_fn(theirs, images, amp),
    }
    inference = measure_phase(infer, batch, flops, peak, device, settings)

    ours.train()
    theirs.train()
    train = {
        "ours": common.train_step_fn(ours, images, targets, amp),
        "timm": common.train_step_fn(theirs, images, targets, amp),
    }
    training = measure_phase(
        train, batch, {who: 3 * f for who, f in flops.items()}, peak, device, settings
    )
    return [
        {**base, "phase": "inference", **inference},
        {**base, "phase": "train_step", **training},
    ]


def parse_args(argv: Sequence[str]):
    parser = common.base_parser(NAME, __doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=None, help="alternated timing rounds")
    parser.add_argument(
        "--models", nargs="+", default=None, help="presets to run (default: the device's list)"
    )
    return parser.parse_args(argv)


def plan(args, device: torch.device) -> tuple[list[tuple[str, int]], int | None, dict, list]:
    """Rows, image size override, timing settings and matmul sizes for this run."""
    cuda = device.type == "cuda"
    batches = CUDA_BATCH if cuda else CPU_BATCH
    models = args.models or (CUDA_DEFAULT if cuda else CPU_DEFAULT)
    unknown = [m for m in models if m not in batches]
    if unknown:
        raise SystemExit(
            f"--models: no {device.type} batch size for {unknown}; known: {list(batches)}"
        )
    rows = [(m, batches[m]) for m in models]
    if args.quick:
        rows = [(m, 8 if m.startswith("vit_mini") else 1) for m, _ in rows]
        settings = {"rounds": args.rounds or 2, "warmup": 1, "min_seconds": 0.0}
        sizes = [128, 256] if device.type == "cpu" else [1024, 2048]
        return rows, QUICK_IMG_SIZE, settings, sizes
    settings = {"rounds": args.rounds or 5, "warmup": 2, "min_seconds": 0.3}
    sizes = [256, 512, 1024, 2048] if device.type == "cpu" else [2048, 4096, 8192]
    return rows, None, settings, sizes


def main(argv: Sequence[str] | None = None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    device = common.setup(args)
    rows_plan, img_size, settings, sizes = plan(args, device)
    modes = ["bf16", "bf16+compile"] if device.type == "cuda" else ["fp32"]

    peak = common.matmul_peak(
        device, torch.bfloat16 if device.type == "cuda" else torch.float32, sizes
    )
    print(
        f"matmul peak: {peak['best_flops_per_s'] / 1e9:.1f} GFLOP/s "
        f"({peak['dtype']}, n={peak['best_size']})\n"
    )
    rows = []
    for preset, batch in rows_plan:
        size = common.build_size(preset, img_size)
        for mode in modes:
            rows += measure_row(
                preset, batch, size, mode, device, peak["best_flops_per_s"], settings
            )
    print_rows(rows)
    results = {"settings": settings, "matmul_peak": peak, "rows": rows}
    common.write_report(args.out, NAME, argv, device, results)
    return results


def print_rows(rows: list[dict]) -> None:
    table = []
    for row in rows:
        ours, theirs = row["ours_images_per_s"], row["timm_images_per_s"]
        table.append(
            {
                **row,
                "ours": ours["median"],
                "ours_range": f"{ours['min']:.0f}-{ours['max']:.0f}",
                "timm": theirs["median"],
                "timm_range": f"{theirs['min']:.0f}-{theirs['max']:.0f}",
                "ours_pct": 100 * row["ours_fraction_of_peak"],
                "timm_pct": 100 * row["timm_fraction_of_peak"],
            }
        )
    common.print_table(
        table,
        [
            ("model", "model", ""),
            ("mode", "mode", ""),
            ("phase", "phase", ""),
            ("batch", "batch", "d"),
            ("ours", "ours img/s", ".1f"),
            ("ours_range", "(min-max)", ">"),
            ("timm", "timm img/s", ".1f"),
            ("timm_range", "(min-max)", ">"),
            ("ratio", "ours/timm", ".3f"),
            ("ours_pct", "ours %peak", ".1f"),
            ("timm_pct", "timm %peak", ".1f"),
        ],
    )


if __name__ == "__main__":
    main()
