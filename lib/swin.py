"""Multi-modal Swin Transformer backbone (the LAVT family's `MultiModalSwinTransformer`).

Reads top-down:

    image -> PatchEmbed -> tokens -> 4 x stage -> norm_i(stage output) -> list of 4 maps

A stage (`MultiModalStage`, attribute ``layers[i]``) is ``depth`` Swin blocks, then a
model-specific language-fusion step, then (stages 0-2) PatchMerging. The fusion step is the only
thing a model changes, so every model subclasses `MultiModalStage` and implements

    fuse(x, H, W, text, feats, prefix) -> (stage_output_for_decoder, updated_trunk)

adding its own modules under the originals' attribute names (LAVT: ``fusion``/``res_gate``;
FIANet: ``fc1``/``fc2``/``context_pixel_attn``/...). ``text`` is a dict of language tensors
(``l`` (B, C_l, N), ``l_mask`` (B, N, 1), ``t``, ``t_mask``, ``p``, ``p_mask`` ...).

Numerics follow the LAVT reference implementation exactly (mmseg-style Swin): zero padding to
window multiples AFTER ``norm1`` (bottom/right), no mask in non-shifted windows (padded tokens are
ordinary keys), a -100 shift mask built for every stage even when the map is smaller than the
window, q scaled before ``q @ k^T``, stochastic depth ``linspace(0, rate, sum(depths))``. Key names equal the originals'
(``patch_embed.*``, ``layers.i.blocks.j.attn.relative_position_index``, ``layers.i.downsample.*``,
``norm{i}.*``).

Window attention has two paths with the same parameters: the plain op sequence of the reference
and a fused one through `F.scaled_dot_product_attention` with the relative-position bias (+ shift
mask) as the additive float mask (``WindowAttention.fused``, default on; the fixtures pass with it).
On CPU the fused path is used for inference only: with autograd PyTorch runs SDPA's slower
non-fused "math" fallback there, so CPU training keeps the plain sequence.
"""
from __future__ import annotations

import copy
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from lib.layers import DropPath, Mlp, init_backbone_weights, trunc_normal_

# Swin sizes by name (Liu et al., ICCV 2021, Table 1 / section 3.3).
SWIN_TYPES: dict[str, dict[str, Any]] = {
    "tiny": {"embed_dim": 96, "depths": [2, 2, 6, 2], "num_heads": [3, 6, 12, 24]},
    "small": {"embed_dim": 96, "depths": [2, 2, 18, 2], "num_heads": [3, 6, 12, 24]},
    "base": {"embed_dim": 128, "depths": [2, 2, 18, 2], "num_heads": [4, 8, 16, 32]},
    "large": {"embed_dim": 192, "depths": [2, 2, 18, 2], "num_heads": [6, 12, 24, 48]},
}


@dataclass
class SwinConfig:
    """The ``swin`` entry of a model config, every default held here once (the LAVT family's
    builder: Swin-B sizes, window 7, drop-path 0.3). ``to_dict`` is the JSON layout stored in
    checkpoints; ``from_dict`` reads it back (missing keys take the defaults, unknown keys are an
    error), so older checkpoints keep loading."""

    embed_dim: int = 128
    depths: list[int] = field(default_factory=lambda: [2, 2, 18, 2])
    num_heads: list[int] = field(default_factory=lambda: [4, 8, 16, 32])
    window_size: int = 7
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    qk_scale: float | None = None
    drop_rate: float = 0.0
    attn_drop_rate: float = 0.0
    drop_path_rate: float = 0.3
    patch_size: int = 4
    in_chans: int = 3
    patch_norm: bool = True

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "SwinConfig":
        names = {f.name for f in fields(cls)}
        unknown = set(d) - names - {"ape"}  # 'ape' (absolute position embedding) is refused by the builders
        if unknown:
            raise ValueError(f"unknown Swin option(s) {', '.join(sorted(unknown))}; valid: {', '.join(sorted(names))}")
        return cls(**{k: (list(v) if isinstance(v, tuple) else v) for k, v in d.items() if k in names})

    @classmethod
    def named(cls, swin_type: str) -> "SwinConfig":
        if swin_type not in SWIN_TYPES:
            raise ValueError(f"--swin_type must be one of {', '.join(SWIN_TYPES)}, got {swin_type!r}")
        return cls(**copy.deepcopy(SWIN_TYPES[swin_type]))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def backbone_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of `MultiModalSwin` (fast-path switches excluded)."""
        return asdict(self)


# The fixed builder hyper-parameters (everything but the sizes), derived from `SwinConfig`.
SWIN_DEFAULTS: dict[str, Any] = {k: v for k, v in asdict(SwinConfig()).items()
                                 if k not in ("embed_dim", "depths", "num_heads", "window_size")}


# --------------------------------------------------------------------------------------------
# Patch embedding and merging
# --------------------------------------------------------------------------------------------
class PatchEmbed(nn.Module):
    """Image (B, 3, H, W) -> (B, C, ceil(H/p), ceil(W/p)): zero-pad right/bottom to a multiple of
    the patch size, ``proj`` = Conv2d(k = stride = p), then LayerNorm over channels."""

    def __init__(self, patch_size: int = 4, in_chans: int = 3, embed_dim: int = 96, patch_norm: bool = True):
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)
        self.norm = nn.LayerNorm(embed_dim) if patch_norm else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = self.patch_size
        h, w = x.shape[-2:]
        if w % p or h % p:
            x = F.pad(x, (0, (p - w % p) % p, 0, (p - h % p) % p))
        x = self.proj(x)
        if self.norm is not None:
            b, c, hh, ww = x.shape
            x = self.norm(x.flatten(2).transpose(1, 2)).transpose(1, 2).reshape(b, c, hh, ww)
        return x


class PatchMerging(nn.Module):
    """(B, H*W, C) -> (B, ceil(H/2)*ceil(W/2), 2C): zero-pad odd H/W at the bottom/right, concat
    the 2x2 sub-grids in the order [even/even, odd/even, even/odd, odd/odd] (row/col),
    LayerNorm(4C), Linear(4C, 2C, no bias)."""

    def __init__(self, dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(4 * dim)
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)

    def forward(self, x: torch.Tensor, H: int, W: int) -> torch.Tensor:
        b, _, c = x.shape
        x = x.view(b, H, W, c)
        if H % 2 or W % 2:
            x = F.pad(x, (0, 0, 0, W % 2, 0, H % 2))
        x = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], dim=-1)
        return self.reduction(self.norm(x.view(b, -1, 4 * c)))


# --------------------------------------------------------------------------------------------
# Windows
# --------------------------------------------------------------------------------------------
def window_partition(x: torch.Tensor, w: int) -> torch.Tensor:
    """(B, Hp, Wp, C) -> (B * nW, w*w, C); windows row-major, batch-major."""
    b, hp, wp, c = x.shape
    x = x.view(b, hp // w, w, wp // w, w, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, w * w, c)


def window_reverse(windows: torch.Tensor, w: int, hp: int, wp: int) -> torch.Tensor:
    """(B * nW, w*w, C) -> (B, Hp, Wp, C), inverse of `window_partition`."""
    c = windows.shape[-1]
    x = windows.view(-1, hp // w, wp // w, w, w, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, hp, wp, c)


def relative_position_index(w: int) -> torch.Tensor:
    """(w*w, w*w) int64 index into the ((2w-1)^2, heads) relative-position bias table."""
    coords = torch.stack(torch.meshgrid(torch.arange(w), torch.arange(w), indexing="ij")).flatten(1)  # (2, w*w)
    rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0) + (w - 1)  # (w*w, w*w, 2)
    return rel[..., 0] * (2 * w - 1) + rel[..., 1]


# Additive shift-mask value across regions: the reference's -100, and the fast paths' value. With
# -100, exp() of a masked logit lands in float32's subnormal range (e^-100 ~ 4e-44); subnormal
# operands run 2-8x slower through softmax, its backward, the attention GEMMs and the gradient
# adds of every shifted block (measured: the CPU training step spent ~25 s of 60 s on them). At
# -1e4 exp() underflows to exactly 0; the weights change by at most e^-100 relative to the
# region's own (below float32 resolution unless the logits span more than ~80).
REFERENCE_SHIFT_MASK = -100.0
FAST_SHIFT_MASK = -1e4


def shifted_window_mask(hp: int, wp: int, w: int, s: int, device: torch.device | None = None,
                        value: float = REFERENCE_SHIFT_MASK) -> torch.Tensor:
    """(nW, w*w, w*w) additive mask for shifted windows: 0 within a region, ``value`` (the
    reference's -100) across regions.

    The padded map is cut into 3 x 3 regions (rows/cols ``[0, Hp-w)``, ``[Hp-w, Hp-s)``,
    ``[Hp-s, Hp)``) that the cyclic shift brought together; tokens attend only within their region.
    """
    ids = torch.zeros(1, hp, wp, 1, device=device)
    cuts = lambda n: (slice(0, n - w), slice(n - w, n - s), slice(n - s, n))  # noqa: E731
    region = 0
    for rows in cuts(hp):
        for cols in cuts(wp):
            ids[:, rows, cols, :] = region
            region += 1
    win = window_partition(ids, w).squeeze(-1)  # (nW, w*w)
    diff = win[:, None, :] - win[:, :, None]
    return torch.zeros_like(diff).masked_fill(diff != 0, value)


class WindowAttention(nn.Module):
    """Multi-head self-attention inside each window with a relative-position bias.

    ``x (B*nW, N=w*w, C)``, optional ``mask (nW, N, N)`` -> ``(B*nW, N, C)``.
    """

    def __init__(self, dim: int, window_size: int, num_heads: int, qkv_bias: bool = True,
                 qk_scale: float | None = None, attn_drop: float = 0.0, proj_drop: float = 0.0,
                 fused: bool = True):
        super().__init__()
        self.dim, self.window_size, self.num_heads = dim, window_size, num_heads
        head_dim = dim // num_heads
        self.scale = qk_scale or head_dim ** -0.5
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * window_size - 1) ** 2, num_heads))
        self.register_buffer("relative_position_index", relative_position_index(window_size), persistent=True)
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        self.fused = fused
        trunc_normal_(self.relative_position_bias_table, std=0.02)

    def relative_bias(self) -> torch.Tensor:
        """(heads, N, N) bias gathered from the table."""
        n = self.window_size ** 2
        # index_select: same gather as table[index], but its backward is an index_add instead of
        # the much slower sort-based accumulating index_put.
        bias = self.relative_position_bias_table.index_select(0, self.relative_position_index.view(-1))
        return bias.view(n, n, -1).permute(2, 0, 1)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        bw, n, c = x.shape
        h = self.num_heads
        q, k, v = self.qkv(x).reshape(bw, n, 3, h, c // h).permute(2, 0, 3, 1, 4).unbind(0)  # (B*nW, h, N, d)
        bias = self.relative_bias()
        # On CPU, SDPA with a float mask only has a fused kernel without autograd (the backward
        # falls back to a slower "math" path), so training on CPU uses the plain sequence.
        if self.fused and (x.device.type != "cpu" or not (torch.is_grad_enabled() and x.requires_grad)):
            out = self._fused(q, k, v, bias, mask)
        else:
            out = self._plain(q, k, v, bias, mask)
        out = out.transpose(1, 2).reshape(bw, n, c)
        return self.proj_drop(self.proj(out))

    def _plain(self, q, k, v, bias, mask):
        """Reference op order: (q*scale) @ k^T + bias (+ mask), softmax, dropout, @ v.

        Bias and mask are added in the logits' dtype (a no-op in float32; under bf16 autocast it
        keeps the (windows, heads, N, N) tensors in bf16, as the SDPA path does)."""
        attn = (q * self.scale) @ k.transpose(-2, -1)
        attn = attn + bias.unsqueeze(0).to(attn.dtype)
        if mask is not None:
            nw = mask.shape[0]
            attn = attn.view(-1, nw, self.num_heads, *attn.shape[-2:]) + mask[None, :, None].to(attn.dtype)
            attn = attn.view(-1, self.num_heads, *attn.shape[-2:])
        attn = self.attn_drop(attn.softmax(dim=-1))
        return attn @ v

    def _fused(self, q, k, v, bias, mask):
        """Same computation through SDPA; bias (+ shift mask) is the additive float mask."""
        drop = self.attn_drop.p if self.training else 0.0
        if mask is None:
            return F.scaled_dot_product_attention(q, k, v, attn_mask=bias.unsqueeze(0).to(q.dtype),
                                                  dropout_p=drop, scale=self.scale)
        # Fold the windows into the head axis so one (nW*h, N, N) mask broadcasts over the batch.
        nw = mask.shape[0]
        bw, h, n, d = q.shape
        full = (bias.unsqueeze(0) + mask.unsqueeze(1)).reshape(1, nw * h, n, n).to(q.dtype)
        q, k, v = (t.reshape(bw // nw, nw * h, n, d) for t in (q, k, v))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=full, dropout_p=drop, scale=self.scale)
        return out.view(bw, h, n, d)


class SwinBlock(nn.Module):
    """One (shifted-)window transformer block on tokens ``(B, H*W, C)`` (Liu et al., Swin, ICCV 2021)."""

    def __init__(self, dim: int, num_heads: int, window_size: int = 7, shift_size: int = 0,
                 mlp_ratio: float = 4.0, qkv_bias: bool = True, qk_scale: float | None = None,
                 drop: float = 0.0, attn_drop: float = 0.0, drop_path: float = 0.0, fused_attn: bool = True):
        super().__init__()
        if not 0 <= shift_size < window_size:
            raise ValueError(f"shift_size {shift_size} must be in [0, window_size {window_size})")
        self.window_size, self.shift_size = window_size, shift_size
        self.norm1 = nn.LayerNorm(dim)
        self.attn = WindowAttention(dim, window_size, num_heads, qkv_bias, qk_scale, attn_drop, drop, fused_attn)
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop)

    def forward(self, x: torch.Tensor, H: int, W: int, shift_mask: torch.Tensor | None) -> torch.Tensor:
        b, L, c = x.shape
        w, s = self.window_size, self.shift_size
        shortcut = x
        x = self.norm1(x).view(b, H, W, c)
        pad_r, pad_b = (w - W % w) % w, (w - H % w) % w
        if pad_r or pad_b:  # zero padding AFTER the norm; padded tokens stay unmasked keys
            x = F.pad(x, (0, 0, 0, pad_r, 0, pad_b))
        hp, wp = H + pad_b, W + pad_r
        if s:
            x = torch.roll(x, shifts=(-s, -s), dims=(1, 2))
        x = self.attn(window_partition(x, w), shift_mask if s else None)
        x = window_reverse(x, w, hp, wp)
        if s:
            x = torch.roll(x, shifts=(s, s), dims=(1, 2))
        if pad_r or pad_b:
            x = x[:, :H, :W, :]
        x = shortcut + self.drop_path(x.reshape(b, L, c))
        return x + self.drop_path(self.mlp(self.norm2(x)))


# --------------------------------------------------------------------------------------------
# Stage and backbone
# --------------------------------------------------------------------------------------------
def run_swin_blocks(blocks: Sequence[SwinBlock], x: torch.Tensor, H: int, W: int, grad_ckpt: bool = False) -> torch.Tensor:
    """Run Swin blocks on ``(B, H*W, C)`` tokens with one shift mask for the stage.

    With ``grad_ckpt`` (and grad enabled) every block is activation-checkpointed; RNG state is
    preserved, so gradients are identical to the plain run.
    """
    if not len(blocks):
        return x
    w = blocks[0].window_size
    s = next((blk.shift_size for blk in blocks if blk.shift_size), 0)
    mask = None
    if s:
        hp, wp = -(-H // w) * w, -(-W // w) * w
        value = FAST_SHIFT_MASK if blocks[0].attn.fused else REFERENCE_SHIFT_MASK
        mask = shifted_window_mask(hp, wp, w, s, device=x.device, value=value)
    for blk in blocks:
        if grad_ckpt and torch.is_grad_enabled():
            x = checkpoint(blk, x, H, W, mask, use_reentrant=False)
        else:
            x = blk(x, H, W, mask)
    return x


class MultiModalStage(nn.Module):
    """Swin blocks + language fusion + optional PatchMerging (``layers[i]`` of the originals).

    Subclasses add their fusion modules in ``__init__`` and implement `fuse`. ``forward`` returns
    ``(stage_output, H, W, next_tokens, H_next, W_next)`` like the original ``MMBasicLayer``.
    """

    def __init__(self, dim: int, depth: int, num_heads: int, window_size: int = 7, mlp_ratio: float = 4.0,
                 qkv_bias: bool = True, qk_scale: float | None = None, drop: float = 0.0, attn_drop: float = 0.0,
                 drop_path: Sequence[float] = (), downsample: bool = False, fused_attn: bool = True,
                 stage_index: int = 0, last: bool = False):
        super().__init__()
        self.dim, self.stage_index, self.last = dim, stage_index, last
        self.grad_ckpt = False
        dp = list(drop_path) or [0.0] * depth
        self.blocks = nn.ModuleList(
            SwinBlock(dim, num_heads, window_size, 0 if j % 2 == 0 else window_size // 2, mlp_ratio, qkv_bias,
                      qk_scale, drop, attn_drop, dp[j], fused_attn)
            for j in range(depth)
        )
        self.downsample = PatchMerging(dim) if downsample else None

    def fuse(self, x: torch.Tensor, H: int, W: int, text: dict[str, torch.Tensor], feats: Any, prefix: str):
        """Return ``(stage_output (B, L, C), updated_trunk (B, L, C) or None)``, or a third element:
        the updated language state (a dict like ``text``) that later stages and the decoder see
        (bidirectional fusion).

        ``updated_trunk`` may be None in the last stage (no PatchMerging): the reference computes
        and discards it, we skip it unless features are being captured.
        """
        raise NotImplementedError

    def after_merge(self, x: torch.Tensor, H: int, W: int, text: dict[str, torch.Tensor], feats: Any,
                    prefix: str) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Hook after PatchMerging (stages 0-2) on the merged tokens (B, H*W, 2C) at the next
        stage's grid ``H, W``: returns ``(tokens, text)``. Default: unchanged."""
        return x, text

    def forward(self, x: torch.Tensor, H: int, W: int, text: dict[str, torch.Tensor], feats: Any = None, prefix: str = ""):
        x = run_swin_blocks(self.blocks, x, H, W, self.grad_ckpt and self.training)
        if feats is not None:
            feats[prefix + "blocks_last"] = x
        fused = self.fuse(x, H, W, text, feats, prefix)
        out, x = fused[0], fused[1]
        if len(fused) > 2:
            text = fused[2]
        if self.downsample is not None:
            x = self.downsample(x, H, W)
            hn, wn = (H + 1) // 2, (W + 1) // 2
            x, text = self.after_merge(x, hn, wn, text, feats, prefix)
        else:
            hn, wn = H, W
        if feats is not None and x is not None:
            feats[prefix + "x_next"] = x
        return out, H, W, x, hn, wn, text


class MultiModalSwin(nn.Module):
    """The multi-modal Swin backbone: ``forward(image, text) -> [4 maps (B, C_i, H_i, W_i)]``,
    map i = ``norm{i}(stage_i output)``.

    ``stage_cls`` is the model's `MultiModalStage` subclass; ``stage_kwargs[i]`` are the extra
    constructor arguments of stage i (fusion heads, dropout, language width ...).
    """

    def __init__(self, stage_cls: type[MultiModalStage], stage_kwargs: Sequence[dict[str, Any]] | None = None, *,
                 embed_dim: int = 96, depths: Sequence[int] = (2, 2, 6, 2), num_heads: Sequence[int] = (3, 6, 12, 24),
                 window_size: int = 7, mlp_ratio: float = 4.0, qkv_bias: bool = True, qk_scale: float | None = None,
                 drop_rate: float = 0.0, attn_drop_rate: float = 0.0, drop_path_rate: float = 0.3,
                 patch_size: int = 4, in_chans: int = 3, patch_norm: bool = True, fused_attn: bool = True,
                 grad_ckpt: bool = False):
        super().__init__()
        n = len(depths)
        if len(num_heads) != n:
            raise ValueError(f"depths {list(depths)} and num_heads {list(num_heads)} differ in length")
        stage_kwargs = list(stage_kwargs or [{}] * n)
        self.num_features = [embed_dim * 2 ** i for i in range(n)]
        self.patch_embed = PatchEmbed(patch_size, in_chans, embed_dim, patch_norm)
        self.pos_drop = nn.Dropout(drop_rate)
        dpr = torch.linspace(0, drop_path_rate, sum(depths), device="cpu").tolist()
        self.layers = nn.ModuleList()
        for i in range(n):
            self.layers.append(stage_cls(
                dim=self.num_features[i], depth=depths[i], num_heads=num_heads[i], window_size=window_size,
                mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, qk_scale=qk_scale, drop=drop_rate, attn_drop=attn_drop_rate,
                drop_path=dpr[sum(depths[:i]):sum(depths[:i + 1])], downsample=i < n - 1, fused_attn=fused_attn,
                stage_index=i, last=i == n - 1, **stage_kwargs[i]))
        for i in range(n):
            self.add_module(f"norm{i}", nn.LayerNorm(self.num_features[i]))
        self.fused_attn = fused_attn
        self.set_grad_ckpt(grad_ckpt)
        self.set_fast_paths(fused_attn)

    def init_weights(self) -> None:
        """Reference init rule on every sub-module (Linear trunc-normal 0.02 / LayerNorm 1, 0)."""
        init_backbone_weights(self)

    def set_grad_ckpt(self, flag: bool) -> None:
        for layer in self.layers:
            layer.grad_ckpt = bool(flag)

    def set_fast_paths(self, flag: bool) -> None:
        """Switch every fast path of the backbone (SDPA window attention, GEMM 1x1 projections in
        the fusion modules: any sub-module with a ``fused`` attribute). False = the reference op
        sequence, bit-exact with the originals."""
        for m in self.modules():
            if hasattr(m, "fused"):
                m.fused = bool(flag)

    def forward_stages(self, image: torch.Tensor, text: dict[str, torch.Tensor], feats: Any = None) -> list[torch.Tensor]:
        """Patch embedding + stages + stage norms -> list of (B, C_i, H_i, W_i) maps."""
        return self.forward_with_text(image, text, feats)[0]

    def forward_with_text(self, image: torch.Tensor, text: dict[str, torch.Tensor],
                          feats: Any = None) -> tuple[list[torch.Tensor], dict[str, torch.Tensor]]:
        """`forward_stages` and the language state after the last stage (stages may update it)."""
        x = self.patch_embed(image)
        if feats is not None:
            feats["backbone.patch_embed"] = x
        H, W = x.shape[-2:]
        x = self.pos_drop(x.flatten(2).transpose(1, 2))
        outs = []
        for i, layer in enumerate(self.layers):
            prefix = f"backbone.layers.{i}."
            out, h, w, x, H, W, text = layer(x, H, W, text, feats, prefix)
            if feats is not None:
                feats[prefix + "x_residual"] = out
            y = getattr(self, f"norm{i}")(out)
            outs.append(y.view(-1, h, w, self.num_features[i]).permute(0, 3, 1, 2).contiguous())
        return outs, text

    def forward(self, image: torch.Tensor, text: dict[str, torch.Tensor], feats: Any = None) -> list[torch.Tensor]:
        outs = self.forward_stages(image, text, feats)
        if feats is not None:
            feats["backbone.output"] = outs
        return outs
