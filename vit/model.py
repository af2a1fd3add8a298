"""The Vision Transformer of Dosovitskiy et al., "An Image is Worth 16x16 Words" (ICLR 2021).

An image is cut into patches by a strided convolution (or, in the paper's hybrid, the
feature map of a small convolutional stem is); a learned cls token and learned position
embeddings are added; a stack of pre-norm encoder blocks (multi-head self-attention,
then an MLP, each around a residual) mixes the tokens; a linear head reads the cls token
(or the mean of the patch tokens).

Parameter names follow timm's ``VisionTransformer``, so its weights load without renaming.
Shape glossary: B batch, N tokens, C channels, H/W pixels, heads, head_dim, grid_h/grid_w.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from vit.patch_embed import STEM_GROUPS, PatchEmbed, stem_kernel
from vit.pos_embed import infer_square_grid, resize_pos_embed


def _pair(value: int | tuple[int, int] | list[int]) -> tuple[int, int]:
    if isinstance(value, int):
        return value, value
    return int(value[0]), int(value[1])


@dataclass
class ViTConfig:
    """Architecture of a Vision Transformer; everything needed to rebuild one."""

    img_size: int | tuple[int, int] = 224
    patch_size: int = 16
    in_chans: int = 3
    num_classes: int = 1000
    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    qk_norm: bool = False
    init_values: float | None = None  # LayerScale; None turns it off
    global_pool: str = "token"  # "token" reads the cls token, "avg" averages patch tokens
    fc_norm: bool | None = None  # norm after pooling; None means "only for avg pooling"
    drop_rate: float = 0.0  # before the head
    pos_drop_rate: float = 0.0
    attn_drop_rate: float = 0.0
    proj_drop_rate: float = 0.0
    drop_path_rate: float = 0.0
    norm_eps: float = 1e-6
    # hybrid (the paper's Sec. 3.1): channels of 3x3 stride-2 convolutions before the patch
    # projection, which then takes patches of their feature map; empty: the plain ViT
    stem_channels: list[int] = field(default_factory=list)
    extra: dict = field(default_factory=dict)  # free-form notes (source, preset name)

    def __post_init__(self):
        if isinstance(self.stem_channels, tuple):  # as presets write it; a list once built
            self.stem_channels = list(self.stem_channels)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["img_size"] = list(_pair(self.img_size))
        return d


class Attention(nn.Module):
    """Multi-head scaled dot-product self-attention with one fused qkv projection."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        qkv_bias: bool = True,
        qk_norm: bool = False,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        norm_eps: float = 1e-6,
    ):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.q_norm = nn.LayerNorm(self.head_dim, eps=norm_eps) if qk_norm else nn.Identity()
        self.k_norm = nn.LayerNorm(self.head_dim, eps=norm_eps) if qk_norm else nn.Identity()
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(
        self, x: torch.Tensor, return_attention: bool = False, cls_only: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Output ``[B, N, C]`` and, with ``return_attention``, the probabilities.

        ``cls_only`` returns the first (cls) token's output alone, ``[B, 1, C]``: its query
        against every key, without the other tokens' attention rows and output projections
        (with ``return_attention`` every query is still scored, for the full maps).
        """
        B, N, C = x.shape
        # one call of the qkv layer for every token, so that hooks, quantisation or adapters
        # placed on it act on both paths alike
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each B, heads, N, head_dim
        if cls_only and not return_attention:
            q = q[:, :, :1]  # the cls token's query
        q, k = self.q_norm(q), self.k_norm(k)

        if return_attention:
            # the explicit path: softmax(QK^T / sqrt(head_dim)) in float32, kept for rollout
            scores = (q.float() * self.scale) @ k.float().transpose(-2, -1)  # B, heads, N, N
            attn = scores.softmax(dim=-1)
            rows = attn[:, :, :1] if cls_only else attn
            x = (self.attn_drop(rows) @ v.float()).to(v.dtype)
        else:
            # the fused kernel never materialises the N x N matrix
            dropout_p = self.attn_drop.p if self.training else 0.0
            x = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p)
            attn = None

        x = x.transpose(1, 2).reshape(B, x.shape[2], C)  # heads concatenated
        return self.proj_drop(self.proj(x)), attn


class Mlp(nn.Module):
    """Two linear layers with a GELU between them."""

    def __init__(self, dim: int, hidden_dim: int, drop: float = 0.0):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = nn.GELU()
        self.drop1 = nn.Dropout(drop)
        self.fc2 = nn.Linear(hidden_dim, dim)
        self.drop2 = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop2(self.fc2(self.drop1(self.act(self.fc1(x)))))


class LayerScale(nn.Module):
    """Per-channel learned scale of a residual branch (Touvron et al., CaiT, 2021)."""

    def __init__(self, dim: int, init_values: float):
        super().__init__()
        self.gamma = nn.Parameter(init_values * torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


class DropPath(nn.Module):
    """Stochastic depth: drop a whole residual branch per sample while training."""

    def __init__(self, drop_prob: float = 0.0):
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.drop_prob == 0.0 or not self.training:
            return x
        keep = 1.0 - self.drop_prob
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * mask / keep  # rescaled so the expectation is unchanged


class Block(nn.Module):
    """Pre-norm encoder block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, cfg: ViTConfig, drop_path: float):
        super().__init__()
        dim = cfg.embed_dim
        self.norm1 = nn.LayerNorm(dim, eps=cfg.norm_eps)
        self.attn = Attention(
            dim,
            cfg.num_heads,
            qkv_bias=cfg.qkv_bias,
            qk_norm=cfg.qk_norm,
            attn_drop=cfg.attn_drop_rate,
            proj_drop=cfg.proj_drop_rate,
            norm_eps=cfg.norm_eps,
        )
        self.ls1 = LayerScale(dim, cfg.init_values) if cfg.init_values else nn.Identity()
        self.drop_path1 = DropPath(drop_path)
        self.norm2 = nn.LayerNorm(dim, eps=cfg.norm_eps)
        self.mlp = Mlp(dim, int(dim * cfg.mlp_ratio), drop=cfg.proj_drop_rate)
        self.ls2 = LayerScale(dim, cfg.init_values) if cfg.init_values else nn.Identity()
        self.drop_path2 = DropPath(drop_path)

    def forward(
        self, x: torch.Tensor, return_attention: bool = False, cls_only: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Output ``[B, N, C]`` and the attention probabilities if asked.

        ``cls_only`` computes the cls token's output alone, ``[B, 1, C]``: norms and the MLP
        act on each token by itself, and attention needs only the cls token's query.
        """
        y, attn = self.attn(self.norm1(x), return_attention, cls_only)
        x = (x[:, :1] if cls_only else x) + self.drop_path1(self.ls1(y))
        x = x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))
        return x, attn


class VisionTransformer(nn.Module):
    """ViT for image classification, built from a :class:`ViTConfig`."""

    num_prefix_tokens = 1  # the cls token

    def __init__(self, cfg: ViTConfig):
        super().__init__()
        check_config(cfg)
        self.cfg = cfg
        self.img_size = _pair(cfg.img_size)
        self.patch_size = cfg.patch_size
        self.grid_size = (self.img_size[0] // cfg.patch_size, self.img_size[1] // cfg.patch_size)
        self.num_classes = cfg.num_classes
        self.global_pool = cfg.global_pool
        dim = cfg.embed_dim
        use_fc_norm = cfg.global_pool == "avg" if cfg.fc_norm is None else cfg.fc_norm

        self.patch_embed = PatchEmbed(
            cfg.patch_size, cfg.in_chans, dim, self.img_size, cfg.stem_channels
        )
        num_patches = self.grid_size[0] * self.grid_size[1]
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, dim))
        self.pos_drop = nn.Dropout(cfg.pos_drop_rate)

        # stochastic depth rises linearly from 0 at the first block to the rate at the last;
        # computed on the CPU so that building under torch.device("meta") works
        rates = torch.linspace(0, cfg.drop_path_rate, cfg.depth, device="cpu").tolist()
        self.blocks = nn.ModuleList(Block(cfg, rate) for rate in rates)

        self.norm = nn.Identity() if use_fc_norm else nn.LayerNorm(dim, eps=cfg.norm_eps)
        self.fc_norm = nn.LayerNorm(dim, eps=cfg.norm_eps) if use_fc_norm else nn.Identity()
        self.head_drop = nn.Dropout(cfg.drop_rate)
        self.head = nn.Linear(dim, cfg.num_classes) if cfg.num_classes > 0 else nn.Identity()
        self.init_weights()

    def init_weights(self) -> None:
        """timm's default ViT initialisation."""
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.cls_token, std=1e-6)  # near zero, not zero: keeps symmetry broken
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

    def reset_classifier(self, num_classes: int) -> None:
        """Replace the head with a freshly initialised one for ``num_classes`` classes."""
        self.num_classes = self.cfg.num_classes = num_classes
        dim = self.cfg.embed_dim
        self.head = nn.Linear(dim, num_classes) if num_classes > 0 else nn.Identity()
        if num_classes > 0:
            nn.init.trunc_normal_(self.head.weight, std=0.02)
            nn.init.zeros_(self.head.bias)

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        return {"pos_embed", "cls_token"}

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict:
        """Parameter groups by depth, in timm's format (for layer-wise learning-rate decay)."""
        return {
            "stem": r"^cls_token|^pos_embed|^patch_embed",
            "blocks": [(r"^blocks\.(\d+)", None), (r"^norm", (99999,))],
        }

    def check_input(self, x: torch.Tensor) -> tuple[int, int]:
        """Validate an image batch and return its patch grid (grid_h, grid_w)."""
        if x.ndim != 4:
            raise ValueError(f"expected images [B, C, H, W], got shape {list(x.shape)}")
        B, C, H, W = x.shape
        if self.cfg.in_chans != C:
            raise ValueError(f"model expects {self.cfg.in_chans} input channels, got {C}")
        p = self.patch_size
        if H % p or W % p:
            raise ValueError(f"image size {H}x{W} is not a multiple of the patch size {p}")
        layers = self.patch_embed.stem_layers
        if layers and stem_kernel((H, W), p, layers) != self.patch_embed.proj.kernel_size:
            raise ValueError(
                f"image size {H}x{W}: the stem's feature map does not give a grid of "
                f"{p}-pixel patches with the {self.patch_embed.proj.kernel_size} projection "
                f"built for {self.img_size[0]}x{self.img_size[1]} images"
            )
        return H // p, W // p

    def pos_embed_for(self, grid: tuple[int, int]) -> torch.Tensor:
        """The position embedding for a patch grid, resized when it differs from the built one."""
        return resize_pos_embed(self.pos_embed, grid, self.grid_size, self.num_prefix_tokens)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Images ``[B, C, H, W]`` to the first block's input: patch tokens after the cls
        token, plus position embeddings, ``[B, N, C]``."""
        grid = self.check_input(x)
        x = self.patch_embed(x)  # B, grid_h * grid_w, C
        cls = self.cls_token.expand(x.shape[0], -1, -1)
        x = torch.cat([cls, x], dim=1) + self.pos_embed_for(grid)  # B, N, C
        return self.pos_drop(x)

    def forward_features(
        self, x: torch.Tensor, return_attention: bool = False
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Tokens after the final norm, ``[B, N, C]``, and the attention maps if asked."""
        return self._encode(self.embed(x), return_attention, cls_only_last=False)

    def _encode(
        self, x: torch.Tensor, return_attention: bool, cls_only_last: bool
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """The blocks and the final norm; ``cls_only_last``: the last block's cls token only."""
        attentions = []
        last = len(self.blocks) - 1
        for i, block in enumerate(self.blocks):
            x, attn = block(x, return_attention, cls_only=cls_only_last and i == last)
            if return_attention:
                attentions.append(attn)
        return self.norm(x), attentions

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        if self.global_pool == "avg":
            x = x[:, self.num_prefix_tokens :].mean(dim=1)
        else:
            x = x[:, 0]
        x = self.head_drop(self.fc_norm(x))
        return x if pre_logits else self.head(x)

    def forward(
        self, x: torch.Tensor, return_attention: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, list[torch.Tensor]]:
        """Logits ``[B, num_classes]``; with ``return_attention`` also a list with one
        ``[B, heads, N, N]`` float32 attention-probability tensor per block.

        The head of a cls-token classifier reads one token of the last block, so that block
        computes the cls token's output alone: the logits of
        ``forward_head(forward_features(x)[0])`` without the last block's work on the other
        tokens beyond their qkv projection (6% of a 12-block ViT's FLOPs, 10% of a 6-block
        one's). With ``return_attention`` it still scores every query, for the full maps.
        With dropout in training the two paths draw their masks over different shapes.
        """
        cls_only_last = self.global_pool == "token"
        x, attentions = self._encode(self.embed(x), return_attention, cls_only_last)
        logits = self.forward_head(x)
        return (logits, attentions) if return_attention else logits

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # a checkpoint made at another image size: resize its position embedding to ours
        key = prefix + "pos_embed"
        if key in state_dict and state_dict[key].shape != self.pos_embed.shape:
            pos = state_dict[key]
            old_grid = infer_square_grid(pos.shape[1] - self.num_prefix_tokens)
            state_dict[key] = resize_pos_embed(pos, self.grid_size, old_grid)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


def check_config(cfg: ViTConfig) -> None:
    """Raise ValueError for an architecture that cannot be built, before any work."""
    h, w = _pair(cfg.img_size)
    p = cfg.patch_size
    if p <= 0:
        raise ValueError(f"patch_size must be positive, got {p}")
    if h % p or w % p:
        raise ValueError(f"image size {h}x{w} is not a multiple of the patch size {p}")
    for name in ("embed_dim", "num_heads"):
        if getattr(cfg, name) <= 0:
            raise ValueError(f"{name} must be positive, got {getattr(cfg, name)}")
    if cfg.depth < 0:
        raise ValueError(f"depth must be 0 or more, got {cfg.depth}")
    if cfg.embed_dim % cfg.num_heads:
        raise ValueError(f"embed_dim {cfg.embed_dim} is not divisible by num_heads {cfg.num_heads}")
    if cfg.global_pool not in ("token", "avg"):
        raise ValueError(f"global_pool must be 'token' or 'avg', got {cfg.global_pool!r}")
    if cfg.in_chans <= 0:
        raise ValueError(f"in_chans must be positive, got {cfg.in_chans}")
    stem = cfg.stem_channels
    if not isinstance(stem, list | tuple) or any(type(c) is not int or c <= 0 for c in stem):
        raise ValueError(f"stem_channels must be a list of positive integers, got {stem!r}")
    if any(c % STEM_GROUPS for c in stem[:-1]):
        raise ValueError(
            f"stem_channels {list(stem)}: every layer but the last is normalised in "
            f"{STEM_GROUPS} groups, so its channels must be a multiple of {STEM_GROUPS}"
        )
    stem_kernel((h, w), p, len(cfg.stem_channels))
