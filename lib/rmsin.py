"""RMSIN: Rotated Multi-Scale Interaction Network (Liu et al., CVPR 2024). LAVT plus:

    ids, l_mask --BERT--> l (B, 768, N)
    Swin stage i -> x_i:
        v = IIM(x_i)           intra-scale interaction: x_i * sigmoid(RepBlock(mean_c(x_i)))
        r = PWAM(x_i, l)       -> stage output
        x = x_i + LG(r) * r + VG(v) * v   --PatchMerging--> stage i+1
    [norm_i(r_i)] --CIM (cross-scale interaction, no text)--> ARC decoder --> logits

* IIM: `VariousReceptive` / `RepBlock` (``layers[i].visual_residual``) and the tanh gate
  ``layers[i].visual_gate``.
* CIM (``backbone.cim``): the pyramid neck of `lib.multiscale` (pool every scale to the last
  grid, 1x1 down, blocks, BN, 1x1 up, per-scale `ScaleAwareGate`) with `CIMBlock` blocks:
  cross-scale attention, per-scale feed-forward, cross-scale attention, feed-forward.
* Decoder: LAVT's `SimpleDecoding` whose second 3x3 conv of each step is an
  `AdaptiveRotatedConv2d` (`lib.arc`).

Sizes the original hard-codes for 480 px input with Swin-B (15x15 last grid, 225 / 314
attention tokens, ``proj = Linear(314, 225)``, channels [128, 256, 512, 1024]) are derived here
from the configured image size and widths (`stage_grids`, `CrossScaleAttention`), so the
model builds at any input size; at 480 px they equal the original's. The model runs at the
image size it was built for (the token-mixing ``proj`` layer fixes the grid).

The decoder upsamples with ``scale_factor=2`` (as the original) when every decoder step exactly
doubles at the configured size, and to the skip map's size otherwise; with align_corners=True the
two give identical numbers whenever the size doubles.

Not ported: the original's ``lib/sa`` package (CuPy CUDA kernels of SAN's aggregation /
subtraction ops). Nothing in RMSIN imports it, so the model is plain PyTorch.
"""
from __future__ import annotations

import math
from collections import OrderedDict
from typing import Any, Mapping, Sequence

import torch
from torch import nn

from lib.arc import AdaptiveRotatedConv2d
from lib.decoder import SimpleDecoding
from lib.lavt import (
    SWIN_FAMILY_PRETRAINED_MISSING,
    TINY_OPTIONS,
    LAVTOne,
    LAVTStage,
    family_builder,
    family_config_from_fixture,
    fusion_stage_kwargs,
    swin_kwargs,
)
from lib.layers import tanh_gate
from lib.losses import ce_dice_loss_terms
from lib.multiscale import PyramidNeck
from lib.spec import ModelSpec, Recipe
from lib.swin import MultiModalStage, MultiModalSwin

Grid = tuple[int, int]


# --------------------------------------------------------------------------------------------
# Size arithmetic (what the original hard-codes for 480 px)
# --------------------------------------------------------------------------------------------
def stage_grids(img_size: int | Sequence[int], patch_size: int = 4, num_stages: int = 4) -> list[Grid]:
    """Token grid of every Swin stage for an input image: ``ceil(H / patch)``, then PatchMerging
    halves with rounding up. 480 px -> 120, 60, 30, 15."""
    h, w = (img_size, img_size) if isinstance(img_size, int) else (int(img_size[0]), int(img_size[1]))
    if h < 1 or w < 1:
        raise ValueError(f"img_size must be positive, got {img_size!r}")
    grid = (math.ceil(h / patch_size), math.ceil(w / patch_size))
    grids = [grid]
    for _ in range(num_stages - 1):
        grid = ((grid[0] + 1) // 2, (grid[1] + 1) // 2)
        grids.append(grid)
    return grids


def _conv_out(n: int, kernel: int, stride: int, padding: int) -> int:
    return (n + 2 * padding - kernel) // stride + 1


# --------------------------------------------------------------------------------------------
# IIM: intra-scale interaction
# --------------------------------------------------------------------------------------------
def _conv_bn(kernel: int) -> nn.Sequential:
    """1-channel ``conv`` (no bias) + ``bn``."""
    return nn.Sequential(OrderedDict(conv=nn.Conv2d(1, 1, kernel, padding=kernel // 2, bias=False),
                                     bn=nn.BatchNorm2d(1)))


def _conv1x1_bn_conv3x3_bn() -> nn.Sequential:
    """1-channel ``conv1`` 1x1 -> ``bn1`` -> ``conv2`` 3x3 -> ``bn2`` (no biases)."""
    return nn.Sequential(OrderedDict(conv1=nn.Conv2d(1, 1, 1, bias=False), bn1=nn.BatchNorm2d(1),
                                     conv2=nn.Conv2d(1, 1, 3, padding=1, bias=False), bn2=nn.BatchNorm2d(1)))


class RepBlock(nn.Module):
    """Two rounds of a 1-channel RepVGG-style block, ``(B, 1, h, w) -> (B, 1, h, w)`` in (0, 1):

        o1 = ReLU(brb_1x1(m) + brb_3x3(m) + brb_identity(m))
        out = sigmoid(brb_1x1_2(o1) + brb_3x3_2(o1) + brb_identity_2(o1))

    (The original's re-parameterisation helpers are never called and are not ported.)
    """

    def __init__(self):
        super().__init__()
        self.brb_3x3 = _conv1x1_bn_conv3x3_bn()
        self.brb_1x1 = _conv_bn(1)
        self.brb_identity = nn.BatchNorm2d(1)
        self.brb_3x3_2 = _conv1x1_bn_conv3x3_bn()
        self.brb_1x1_2 = _conv_bn(1)
        self.brb_identity_2 = nn.BatchNorm2d(1)

    def forward(self, m: torch.Tensor) -> torch.Tensor:
        o1 = torch.relu(self.brb_1x1(m) + self.brb_3x3(m) + self.brb_identity(m))
        return torch.sigmoid(self.brb_1x1_2(o1) + self.brb_3x3_2(o1) + self.brb_identity_2(o1))


class VariousReceptive(nn.Module):
    """IIM branch: re-weight every token by a spatial map computed from the channel mean.

    ``x (B, H*W, C) -> (B, H*W, C)`` = ``x * RepBlock(mean_c(x))`` (the original infers a square
    grid from L; we take H, W from the stage).
    """

    def __init__(self):
        super().__init__()
        self.repblock = RepBlock()

    def forward(self, x: torch.Tensor, H: int, W: int) -> torch.Tensor:
        b, L, c = x.shape
        maps = x.view(b, H, W, c).permute(0, 3, 1, 2)  # (B, C, H, W)
        weight = self.repblock(maps.mean(dim=1, keepdim=True))  # (B, 1, H, W)
        return (maps * weight).reshape(b, c, L).permute(0, 2, 1)


class RMSINStage(LAVTStage):
    """Swin blocks + PWAM (``fusion``) + language gate (``res_gate``) + IIM (``visual_residual``,
    ``visual_gate``): ``x <- x + res_gate(r) * r + visual_gate(v) * v``; the stage emits r."""

    dead_in_last_stage = ("res_gate", "visual_gate", "visual_residual")

    def __init__(self, **kwargs: Any):
        super().__init__(**kwargs)
        self.visual_residual = VariousReceptive()
        self.visual_gate = tanh_gate(self.dim)

    def fuse(self, x, H, W, text, feats, prefix):
        if self.last and feats is None:
            # The last stage's trunk update is discarded (no gradient reaches res_gate, visual_gate,
            # visual_residual). In training the reference still runs the IIM branch, which moves
            # its BatchNorm running statistics; do the same so checkpoints keep identical buffers.
            if self.training:
                with torch.no_grad():
                    self.visual_residual(x, H, W)
            return self.fusion(x, text["l"], text["l_mask"]), None
        v = self.visual_residual(x, H, W)
        if feats is not None:
            feats[prefix + "visual_residual"] = v
        r = self.fusion(x, text["l"], text["l_mask"])
        return r, x + self.res_gate(r) * r + self.visual_gate(v) * v


# --------------------------------------------------------------------------------------------
# CIM: cross-scale interaction
# --------------------------------------------------------------------------------------------
class Residual(nn.Module):
    """``x + m(x)`` (the ``.m.`` in the original's keys)."""

    def __init__(self, m: nn.Module):
        super().__init__()
        self.m = m

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.m(x)


class LinearBN(nn.Module):
    """``c`` = Linear (no bias) then ``bn`` = BatchNorm1d over all ``B * N`` tokens:
    ``(B, N, a) -> (B, N, b)``."""

    def __init__(self, a: int, b: int):
        super().__init__()
        self.c = nn.Linear(a, b, bias=False)
        self.bn = nn.BatchNorm1d(b)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.c(x)
        return self.bn(y.flatten(0, 1)).reshape_as(y)


class Attention(nn.Module):
    """Multi-head attention over the multi-scale token sequence, projected back to the grid tokens.

    ``x (B, N_all, dim) -> (B, N_grid, dim)``; the first ``N_grid = gh * gw`` tokens are the grid.
    Fixed head layout (as the original, whatever ``dim``): ``num_heads`` heads, key width
    ``key_dim``, value width ``attn_ratio * key_dim``. The value path adds a depth-wise 3x3 conv
    (``parallel_conv``) on the grid values, and a Linear over the TOKEN axis (``proj``,
    ``N_all -> N_grid``) maps the attention output back to the grid.
    """

    def __init__(self, dim: int, grid: Grid, num_tokens: int, key_dim: int = 32, num_heads: int = 8,
                 attn_ratio: int = 2):
        super().__init__()
        self.grid, self.num_tokens = grid, num_tokens
        self.num_heads, self.key_dim = num_heads, key_dim
        self.d = int(attn_ratio * key_dim)
        self.dh = self.d * num_heads
        self.scale = key_dim ** -0.5
        self.qkv = LinearBN(dim, self.dh + 2 * key_dim * num_heads)
        self.parallel_conv = nn.Sequential(nn.Hardswish(), nn.Conv2d(self.dh, self.dh, 3, padding=1, groups=self.dh))
        self.to_out = nn.Linear(self.dh, dim)
        self.proj = nn.Linear(num_tokens, grid[0] * grid[1])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        gh, gw = self.grid
        q, k, v = self.qkv(x).view(b, n, self.num_heads, -1).split([self.key_dim, self.key_dim, self.d], dim=3)
        q, k, v = (t.permute(0, 2, 1, 3) for t in (q, k, v))  # (B, heads, N, d)
        # (!) Row-major reinterpretation over (head, token, dim), NOT a channel permutation: the
        # original reshapes the head-major grid values straight to (B, heads*d, gh, gw).
        v_grid = v[:, :, : gh * gw].reshape(b, self.dh, gh, gw)
        v_conv = self.parallel_conv(v_grid).flatten(2)  # (B, dh, N_grid)
        attn = ((q @ k.transpose(-2, -1)) * self.scale).softmax(dim=-1)
        # (!) Same kind of reinterpretation: (B, N, heads, d) memory read as (B, dh, N).
        out = (attn @ v).transpose(1, 2).reshape(b, self.dh, n)
        out = self.proj(out) + v_conv  # token axis N_all -> N_grid
        return self.to_out(out.permute(0, 2, 1))


class CrossScaleAttention(nn.Module):
    """``g (B, C, gh, gw) -> (B, C, gh, gw)``: attention of the grid tokens over themselves plus two
    depth-wise strided down-samplings (3x3 stride 2, 5x5 stride 3), then BN, Hardswish, 1x1 conv.

    Token counts follow from ``grid`` (15x15 -> 225 grid tokens, 225 + 8*8 + 5*5 = 314 in all).
    """

    def __init__(self, dim: int, grid: Grid, key_dim: int = 32, num_heads: int = 8, attn_ratio: int = 2):
        super().__init__()
        self.grid = tuple(grid)
        gh, gw = self.grid
        down1 = _conv_out(gh, 3, 2, 1) * _conv_out(gw, 3, 2, 1)
        down2 = _conv_out(gh, 5, 3, 2) * _conv_out(gw, 5, 3, 2)
        self.bn1 = nn.BatchNorm2d(dim)
        self.DWConv1 = nn.Sequential(nn.Conv2d(dim, dim, 3, stride=2, padding=1, groups=dim), nn.BatchNorm2d(dim))
        self.DWConv2 = nn.Sequential(nn.Conv2d(dim, dim, 5, stride=3, padding=2, groups=dim), nn.BatchNorm2d(dim))
        self.attention = Attention(dim, self.grid, gh * gw + down1 + down2, key_dim, num_heads, attn_ratio)
        self.bn4 = nn.BatchNorm2d(dim)
        self.activate = nn.Hardswish()
        self.conv = nn.Conv2d(dim, dim, 1)

    def forward(self, g: torch.Tensor) -> torch.Tensor:
        b, c, h, w = g.shape
        if (h, w) != self.grid:
            raise ValueError(f"RMSIN was built for a {self.grid[0]}x{self.grid[1]} last-stage grid (set by the "
                             f"configured img_size) but got {h}x{w}: run it at the image size it was built for")
        x0 = self.bn1(g)
        x1, x2 = self.DWConv1(x0), self.DWConv2(x0)
        seq = torch.cat([x0.flatten(2), x1.flatten(2), x2.flatten(2)], dim=2).permute(0, 2, 1)  # (B, N_all, C)
        out = self.attention(seq).permute(0, 2, 1).reshape(b, c, h, w)
        return self.conv(self.activate(self.bn4(out)))


class FeedForward(nn.Module):
    """``conv3(ReLU6(conv2(bn2(conv1(bn1(x))))))``: 1x1 up to ``hidden``, 3x3 with ``groups = dim``
    (each group maps hidden/dim channels to hidden/dim channels), 1x1 back. All convs have biases."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(dim)
        self.conv1 = nn.Conv2d(dim, hidden, 1)
        self.bn2 = nn.BatchNorm2d(hidden)
        self.conv2 = nn.Conv2d(hidden, hidden, 3, padding=1, groups=dim)
        self.relu = nn.ReLU6()
        self.conv3 = nn.Conv2d(hidden, dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv3(self.relu(self.conv2(self.bn2(self.conv1(self.bn1(x))))))


class IntraFeedForward(nn.Module):
    """Per-scale feed-forward: split the channels into one group per scale (``widths``), apply
    ``Residual(FeedForward(c, mlp_ratio * c))`` to each (``ff1``, ``ff2``, ...), concatenate."""

    def __init__(self, widths: Sequence[int], mlp_ratio: int = 2):
        super().__init__()
        self.widths = [int(c) for c in widths]
        for i, c in enumerate(self.widths):
            self.add_module(f"ff{i + 1}", Residual(FeedForward(c, mlp_ratio * c)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        parts = x.split(self.widths, dim=1)
        return torch.cat([getattr(self, f"ff{i + 1}")(p) for i, p in enumerate(parts)], dim=1)


class CIMBlock(nn.Module):
    """``g <- g + csa1(g); g <- g + intra_ff(g); g <- g + csa2(g); g <- g + ff(g)`` on the pooled
    ``(B, dim, gh, gw)`` map; ``widths`` are the per-scale channel groups (stage widths / 4)."""

    def __init__(self, dim: int, widths: Sequence[int], grid: Grid, mlp_ratio: int = 2, key_dim: int = 32,
                 num_heads: int = 8, attn_ratio: int = 2):
        super().__init__()
        if sum(widths) != dim:
            raise ValueError(f"CIM channel groups {list(widths)} must add up to the hidden width {dim}")
        self.csa1 = Residual(CrossScaleAttention(dim, grid, key_dim, num_heads, attn_ratio))
        self.intra_ff = Residual(IntraFeedForward(widths, mlp_ratio))
        self.csa2 = Residual(CrossScaleAttention(dim, grid, key_dim, num_heads, attn_ratio))
        self.ff = Residual(FeedForward(dim, dim * mlp_ratio))

    def forward(self, g: torch.Tensor) -> torch.Tensor:
        return self.ff(self.csa2(self.intra_ff(self.csa1(g))))


def build_cim(channels: Sequence[int], grid: Grid, num_blocks: int = 1, mlp_ratio: int = 2, key_dim: int = 32,
              num_heads: int = 8, attn_ratio: int = 2) -> PyramidNeck:
    """The CIM: `PyramidNeck` over the stage widths ``channels`` with `CIMBlock` blocks."""
    channels = [int(c) for c in channels]
    widths = [c // 4 for c in channels]  # one group per scale; CIMBlock checks they fill the hidden width
    return PyramidNeck(channels, num_blocks,
                       lambda hidden: CIMBlock(hidden, widths, grid, mlp_ratio, key_dim, num_heads, attn_ratio))


class RMSINBackbone(MultiModalSwin):
    """Multi-modal Swin with IIM stages, followed by the CIM (``cim``) on the normalised outputs."""

    def __init__(self, *args: Any, cim: dict[str, Any], grid: Grid, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.cim = build_cim(cim["channels"], grid, cim.get("num_blocks", 1), cim.get("mlp_ratio", 2),
                             cim.get("key_dim", 32), cim.get("num_heads", 8), cim.get("attn_ratio", 2))

    def forward(self, image, text, feats=None):
        outs = self.forward_stages(image, text, feats)
        outs = self.cim(outs, feats=feats, prefix="backbone.cim.")
        if feats is not None:
            feats["backbone.output"] = outs
        return outs


# --------------------------------------------------------------------------------------------
# ARC decoder (adaptive rotated convolution)
# --------------------------------------------------------------------------------------------
def build_arc_decoder(c4_dims: int, factor: int, grids: Sequence[Grid], kernel_number: int = 1) -> SimpleDecoding:
    """`SimpleDecoding` with adaptive rotated convs as ``conv2_4``, ``conv2_3``, ``conv2_2``.

    ``grids`` are the stage grids at the configured image size: ``scale_factor=2`` upsampling (the
    original) when every deeper grid exactly doubles into the next, size-based otherwise.
    """
    doubles = all(grids[i] == (2 * grids[i + 1][0], 2 * grids[i + 1][1]) for i in range(len(grids) - 1))
    return SimpleDecoding(
        c4_dims, factor,
        conv2_factory=lambda cin, cout: AdaptiveRotatedConv2d(cin, cout, 3, padding=1, kernel_number=kernel_number),
        upsample="scale" if doubles else "size",
    )


# --------------------------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------------------------
class RMSIN(LAVTOne):
    """RMSIN (``lavt_one``: BERT inside). ``forward(image, text, l_mask) -> logits (B, 2, H, W)``.

    Config entries beyond LAVT's: ``img_size`` (int or [H, W]: fixes the CIM grid), ``cim``
    (``channels``, ``num_blocks``, ``mlp_ratio``, ``key_dim``, ``num_heads``, ``attn_ratio``),
    ``arc`` (``kernel_number``).
    """

    stage_cls: type[MultiModalStage] = RMSINStage

    @staticmethod
    def _grids(config: dict[str, Any]) -> list[Grid]:
        s = config["swin"]
        return stage_grids(config.get("img_size", 480), s.get("patch_size", 4), len(s["depths"]))

    def build_backbone(self, config: dict[str, Any]) -> MultiModalSwin:
        if "cim" not in config:
            raise ValueError("RMSIN config lacks the 'cim' entry (build it with lib.registry.model_config('rmsin'))")
        return RMSINBackbone(self.stage_cls, fusion_stage_kwargs(config), cim=config["cim"],
                             grid=self._grids(config)[-1], **swin_kwargs(config))

    def build_classifier(self, config: dict[str, Any]) -> SimpleDecoding:
        dec = config["decoder"]
        return build_arc_decoder(dec["c4_dims"], dec.get("factor", 2), self._grids(config),
                                 config.get("arc", {}).get("kernel_number", 1))

    def loss(self, outputs: torch.Tensor, batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``0.9 * weighted CE + 0.1 * Dice``, as two named terms."""
        return ce_dice_loss_terms(self.logits(outputs), batch["target"])


def _configure(cfg: dict, options: dict) -> None:
    # CIM over the stage widths; the attention head layout is fixed in the original.
    # Grid and token counts are derived from cfg["img_size"] (`stage_grids`).
    e = cfg["swin"]["embed_dim"]
    cfg["cim"] = {"channels": [e * 2 ** i for i in range(len(cfg["swin"]["depths"]))], "num_blocks": 1,
                  "mlp_ratio": 2, "key_dim": 32, "num_heads": 8, "attn_ratio": 2}
    cfg["arc"] = {"kernel_number": 1}


def _from_fixture(fx: Mapping[str, Any], cfg: dict) -> None:
    cim = fx.get("cim", {})
    if "channels" in cim:
        cfg["cim"]["channels"] = [int(c) for c in cim["channels"]]
    cfg["cim"]["num_blocks"] = int(cim.get("num_layers", cfg["cim"]["num_blocks"]))
    csa = cim.get("CrossScaleAttention", {})
    for key in ("key_dim", "num_heads", "attn_ratio"):
        if key in csa:
            cfg["cim"][key] = int(csa[key])
    size = fx.get("img_size")
    if isinstance(size, (list, tuple)) and len(size) == 2 and int(size[0]) != int(size[1]):
        cfg["img_size"] = [int(size[0]), int(size[1])]


_build = family_builder(_configure)

SPEC = ModelSpec(
    target="lib.rmsin:RMSIN", build_config=_build,
    config_from_fixture=lambda fx: family_config_from_fixture(fx, "rmsin", _build, _from_fixture),
    # 4 GPUs x batch 2 with SyncBatchNorm (the README passes no batch size: the default 2 per GPU).
    recipes={"*": Recipe(lr=3e-5, epochs=40, batch_size=2, max_tokens=20, gpus=4)},
    sync_bn=True, val_protocol="one-per-ref", pretrained_missing=SWIN_FAMILY_PRETRAINED_MISSING,
    tiny=TINY_OPTIONS)
