"""Adaptive rotated convolution (ARC), the oriented-aware conv of RMSIN's decoder
(Liu et al., CVPR 2024).

For every sample b a small routing network predicts, per kernel k (``kernel_number`` of them), a
gate ``alpha[b, k]`` in (0, 1) and an angle ``theta[b, k]`` in (-40deg, 40deg). The sample's 3x3
kernel is

    W_b[o, i, p] = sum_k alpha[b, k] * sum_q R(theta[b, k])[p, q] * W[k, o, i, q]

with kernel positions flattened row-major (``p = 3 * row + col``) and ``R(theta)`` the 9x9
interpolation matrix of `rotation_matrix` (bilinear resampling of the kernel at its rotated
positions). The B kernels are then applied as ONE grouped convolution (groups = B * groups).

Everything is plain PyTorch (the reference needs no compiled op here). Key names equal the
original: ``weight`` (5-D, ``(kernel_number, C_out, C_in // groups, 3, 3)``) and the routing
module ``rounting_func`` (sic), with ``dwc``, ``norm.norm``, ``fc_alpha``, ``fc_theta``.
Only 3x3 kernels exist in the original's working code path; other sizes are rejected.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from lib.layers import trunc_normal_

__all__ = ["RountingFunction", "AdaptiveRotatedConv2d", "rotation_matrix", "rotate_kernels"]

# Non-zero entries of the 9x9 matrix R(theta), row p -> ((q, term), ...), for theta >= 0 and
# theta < 0, as the RMSIN reference implementation tabulates them. Terms use x = cos(theta),
# y = sin(theta), a = x - y, b = x * y, c = x + y. Row 4 (the kernel centre) never moves.
_ROWS_POSITIVE = (
    ((0, "a"), (1, "1-a")),
    ((1, "x-b"), (2, "b"), (4, "1-c+b"), (5, "y-b")),
    ((2, "a"), (5, "1-a")),
    ((0, "b"), (1, "y-b"), (3, "x-b"), (4, "1-c+b")),
    ((4, "1"),),
    ((4, "1-c+b"), (5, "x-b"), (7, "y-b"), (8, "b")),
    ((3, "1-a"), (6, "a")),
    ((3, "y-b"), (4, "1-c+b"), (6, "b"), (7, "x-b")),
    ((7, "1-a"), (8, "a")),
)
_ROWS_NEGATIVE = (
    ((0, "c"), (3, "1-c")),
    ((0, "-b"), (1, "x+b"), (3, "b-y"), (4, "1-a-b")),
    ((1, "1-c"), (2, "c")),
    ((3, "x+b"), (4, "1-a-b"), (6, "-b"), (7, "b-y")),
    ((4, "1"),),
    ((1, "b-y"), (2, "-b"), (4, "1-a-b"), (5, "x+b")),
    ((6, "c"), (7, "1-c")),
    ((4, "1-a-b"), (5, "b-y"), (7, "x+b"), (8, "-b")),
    ((5, "1-c"), (8, "c")),
)


def _terms(theta: torch.Tensor) -> dict[str, torch.Tensor]:
    """The scalar expressions of the table, element-wise over ``theta`` (same float op order as
    the reference: ``1 - c + b`` is ``(1 - c) + b``)."""
    x, y = torch.cos(theta), torch.sin(theta)
    a, b, c = x - y, x * y, x + y
    return {
        "1": torch.ones_like(x), "a": a, "b": b, "c": c, "-b": -b,
        "1-a": 1 - a, "1-c": 1 - c, "x-b": x - b, "y-b": y - b, "x+b": x + b, "b-y": b - y,
        "1-c+b": 1 - c + b, "1-a-b": 1 - a - b,
    }


def _table(rows, terms: dict[str, torch.Tensor]) -> torch.Tensor:
    zero = torch.zeros_like(terms["1"])
    out = []
    for row in rows:
        entries = dict(row)
        out.append(torch.stack([terms[entries[q]] if q in entries else zero for q in range(9)], dim=-1))
    return torch.stack(out, dim=-2)  # (..., 9, 9)


def rotation_matrix(theta: torch.Tensor) -> torch.Tensor:
    """``theta (...)`` in radians -> ``R (..., 9, 9)``; ``R[p, q]`` is the weight of kernel position q
    in the rotated kernel's position p. Meant for ``|theta| < 45deg`` (the routing bound is 40deg)."""
    terms = _terms(theta)
    pos, neg = _table(_ROWS_POSITIVE, terms), _table(_ROWS_NEGATIVE, terms)
    return torch.where((theta >= 0)[..., None, None], pos, neg)


def rotate_kernels(weight: torch.Tensor, alpha: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """Per-sample rotated, gated and summed kernels.

    ``weight (K, C_out, C_in, 3, 3)``, ``alpha, theta (B, K)`` -> ``(B * C_out, C_in, 3, 3)``
    (sample-major, ready for a grouped conv with groups = B).
    """
    n, c_out, c_in, kh, kw = weight.shape
    if (kh, kw) != (3, 3):
        raise ValueError(f"adaptive rotated convolution supports 3x3 kernels only, got {kh}x{kw}")
    if alpha.shape != theta.shape or alpha.shape[1] != n:
        raise ValueError(f"alpha {tuple(alpha.shape)} / theta {tuple(theta.shape)} must both be (B, {n})")
    b = theta.shape[0]
    rot = rotation_matrix(theta) * alpha[..., None, None]  # (B, K, 9, 9)
    rot = rot.permute(0, 2, 1, 3).reshape(b * 9, n * 9)  # rows (b, p), columns (k, q)
    w = weight.permute(0, 3, 4, 1, 2).reshape(n * 9, c_out * c_in)  # rows (k, q)
    out = torch.mm(rot, w).view(b, 3, 3, c_out, c_in)
    return out.permute(0, 3, 4, 1, 2).reshape(b * c_out, c_in, 3, 3)


class _ChannelsLastLayerNorm(nn.Module):
    """LayerNorm over the channels of a (B, C, H, W) map (key ``norm.norm`` as the original)."""

    def __init__(self, dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class RountingFunction(nn.Module):
    """Routing network (name spelled as the original): ``x (B, C, H, W) -> (alpha, theta)``, each
    ``(B, kernel_number)``.

    ``z = mean_hw(ReLU(LN_c(dwconv3x3(x))))``; ``alpha = sigmoid(fc_alpha(dropout(z)))``;
    ``theta = softsign(fc_theta(dropout(z))) * max_angle`` (two independent dropouts, p = 0.2).
    """

    def __init__(self, in_channels: int, kernel_number: int = 1, dropout_rate: float = 0.2,
                 max_angle_deg: float = 40.0):
        super().__init__()
        self.kernel_number = kernel_number
        self.dwc = nn.Conv2d(in_channels, in_channels, 3, padding=1, groups=in_channels, bias=False)
        self.norm = _ChannelsLastLayerNorm(in_channels)
        self.dropout1 = nn.Dropout(dropout_rate)
        self.fc_alpha = nn.Linear(in_channels, kernel_number, bias=True)
        self.dropout2 = nn.Dropout(dropout_rate)
        self.fc_theta = nn.Linear(in_channels, kernel_number, bias=False)
        self.max_angle = max_angle_deg / 180.0 * math.pi
        for w in (self.dwc.weight, self.fc_alpha.weight, self.fc_theta.weight):
            trunc_normal_(w, std=0.02)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        z = torch.relu(self.norm(self.dwc(x)))
        z = F.adaptive_avg_pool2d(z, 1).flatten(1)  # (B, C)
        alpha = torch.sigmoid(self.fc_alpha(self.dropout1(z)))
        theta = F.softsign(self.fc_theta(self.dropout2(z))) * self.max_angle
        return alpha, theta


class AdaptiveRotatedConv2d(nn.Module):
    """``(B, C_in, H, W) -> (B, C_out, H', W')``: a 3x3 conv whose kernel is rotated and gated per
    sample by `RountingFunction` (no bias)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, stride: int = 1,
                 padding: int = 1, dilation: int = 1, groups: int = 1, kernel_number: int = 1):
        super().__init__()
        if kernel_size != 3:
            raise ValueError(f"adaptive rotated convolution supports kernel_size 3 only, got {kernel_size}")
        if in_channels % groups or out_channels % groups:
            raise ValueError(f"channels {in_channels}->{out_channels} not divisible by groups {groups}")
        self.in_channels, self.out_channels = in_channels, out_channels
        self.stride, self.padding, self.dilation, self.groups = stride, padding, dilation, groups
        self.kernel_number = kernel_number
        self.rounting_func = RountingFunction(in_channels, kernel_number)
        self.weight = nn.Parameter(torch.empty(kernel_number, out_channels, in_channels // groups, 3, 3))
        # On the 5-D tensor: fan_out = kernel_number * (C_in / groups) * 9, as the original.
        nn.init.kaiming_normal_(self.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        alpha, theta = self.rounting_func(x)
        weight = rotate_kernels(self.weight, alpha, theta)  # (B * C_out, C_in / groups, 3, 3)
        b, c, h, w = x.shape
        out = F.conv2d(x.reshape(1, b * c, h, w), weight, None, self.stride, self.padding, self.dilation,
                       groups=self.groups * b)
        return out.view(b, self.out_channels, *out.shape[-2:])

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size=3, kernel_number={self.kernel_number}, "
                f"stride={self.stride}, padding={self.padding}, dilation={self.dilation}, groups={self.groups}")
