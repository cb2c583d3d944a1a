"""`SimpleDecoding`: the LAVT family's top-down convolutional decoder
(Yang et al., LAVT, CVPR 2022).

Three fusion steps, deepest first; each upsamples the running map to the next skip map
(bilinear, align_corners=True), concatenates ``[upsampled, skip]`` and applies
``conv1 (3x3, no bias) -> BN -> ReLU -> conv2 (3x3, no bias) -> BN -> ReLU``; then a 1x1 conv
with bias to 2 classes. Output at the resolution of the first (1/4) map.

Plug-in points (RMSIN): ``conv2_factory(in_ch, out_ch)`` builds the second conv of each step
(RMSIN: a rotated conv), and ``upsample='scale'`` upsamples by ``scale_factor=2`` instead of to the
skip map's size.

Fast path: ``channels_last`` runs the decoder's convolutions, BatchNorms and upsampling on
channels-last (NHWC) maps, the layout cuDNN's tensor-core convolutions want; the output is
returned in the ordinary (contiguous) layout. Only the memory layout changes, so the numbers are
those of the plain path up to the convolution's summation order (~1e-7 relative in float32).
``'auto'`` (default) uses it on the devices in `CHANNELS_LAST_AUTO_DEVICES` (CUDA) and wherever
the Winograd path below runs (it computes in NHWC); with direct convolutions on CPU it measured
no faster (BENCHMARKS.md, "Models"); ``True`` / ``False`` force it.

Fast path ``winograd``: on CPU in float32 the 3x3 convolutions of maps of at least
`WINOGRAD_MIN_PIXELS` run as Winograd F(4x4, 3x3) (`winograd_conv3x3`, 4x fewer multiplies,
forward and backward): the decoder is ~half of the model's FLOPs and its direct convolutions run
near the GEMM peak already, so fewer multiplies is the way to make it faster. Rounding changes
(~1e-5 of a map's range), inside the fixtures' tolerance; ``winograd=0`` restores the direct
convolutions, 2 selects F(2x2, 3x3).
"""
from __future__ import annotations

from typing import Callable, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn

# Devices on which ``channels_last='auto'`` takes the channels-last path.
CHANNELS_LAST_AUTO_DEVICES: frozenset[str] = frozenset({"cuda"})
# ``winograd='auto'``: the Winograd tile size per device type (CPU only; cuDNN picks its own).
WINOGRAD_AUTO: dict[str, int] = {"cpu": 4}
# Smaller maps keep the direct convolution: with few tiles the filter transform and the short
# GEMMs cost more than they save (measured 2x slower at 30x30 x 1536 channels, faster from 60x60).
WINOGRAD_MIN_PIXELS = 48 * 48

ChannelsLast = Union[bool, str]  # True, False or "auto"


def check_channels_last(value: ChannelsLast) -> ChannelsLast:
    if value not in (True, False, "auto"):
        raise ValueError(f"channels_last must be True, False or 'auto', got {value!r}")
    return value


# --------------------------------------------------------------------------------------------
# Winograd 3x3 convolutions (CPU fast path)
# --------------------------------------------------------------------------------------------
# Transform matrices of Winograd's minimal filtering F(m x m, 3 x 3) (Lavin & Gray, "Fast
# Algorithms for Convolutional Neural Networks", CVPR 2016, section 4): m x m output tiles from
# (m + 2) x (m + 2) input tiles; B^T (input), G (filter), A^T (output).
WINOGRAD_MATRICES: dict[int, tuple[list[list[float]], list[list[float]], list[list[float]]]] = {
    2: ([[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]],
        [[1, 0, 0], [0.5, 0.5, 0.5], [0.5, -0.5, 0.5], [0, 0, 1]],
        [[1, 1, 1, 0], [0, 1, -1, -1]]),
    4: ([[4, 0, -5, 0, 1, 0], [0, -4, -4, 1, 1, 0], [0, 4, -4, -1, 1, 0], [0, -2, -1, 2, 1, 0],
         [0, 2, -1, -2, 1, 0], [0, 4, 0, -5, 0, 1]],
        [[1 / 4, 0, 0], [-1 / 6, -1 / 6, -1 / 6], [-1 / 6, 1 / 6, -1 / 6], [1 / 24, 1 / 12, 1 / 6],
         [1 / 24, -1 / 12, 1 / 6], [0, 0, 1]],
        [[1, 1, 1, 1, 1, 0], [0, 1, -1, 2, -2, 0], [0, 1, 1, 4, 4, 0], [0, 1, -1, 8, -8, 1]]),
}


def _combine_into(out: torch.Tensor, parts: Sequence[torch.Tensor], coeffs: Sequence[float]) -> torch.Tensor:
    """``out = sum_k coeffs[k] * parts[k]`` in place (views with a contiguous channel axis)."""
    first = True
    for c, p in zip(coeffs, parts):
        if c == 0:
            continue
        if first:
            out.copy_(p)
            if c != 1:
                out.mul_(c)
            first = False
        else:
            out.add_(p, alpha=c)
    return out


def _tiles(n: int, m: int) -> int:
    return -(-n // m)


def _input_transform(x: torch.Tensor, m: int) -> torch.Tensor:
    """NHWC map (B, H, W, C) -> transformed tiles (a^2, B*th*tw, C), a = m + 2, zero padding 1."""
    bt = WINOGRAD_MATRICES[m][0]
    a = m + 2
    b, h, w, c = x.shape
    th, tw = _tiles(h, m), _tiles(w, m)
    xp = F.pad(x, (0, 0, 1, tw * m + 1 - w, 1, th * m + 1 - h))
    rows = [xp[:, k: k + (th - 1) * m + 1: m] for k in range(a)]  # a x (B, th, Wp, C)
    v = x.new_empty(a, a, b, th, tw, c)
    tmp = x.new_empty(b, th, xp.shape[2], c)
    for i in range(a):
        _combine_into(tmp, rows, bt[i])
        cols = [tmp[:, :, k: k + (tw - 1) * m + 1: m] for k in range(a)]  # a x (B, th, tw, C)
        for j in range(a):
            _combine_into(v[i, j], cols, bt[j])
    return v.view(a * a, b * th * tw, c)


def _output_transform(mt: torch.Tensor, m: int, b: int, h: int, w: int) -> torch.Tensor:
    """(a^2, B*th*tw, C) products -> NHWC map (B, H, W, C)."""
    at = WINOGRAD_MATRICES[m][2]
    a = m + 2
    th, tw, c = _tiles(h, m), _tiles(w, m), mt.shape[-1]
    mt = mt.view(a, a, b, th, tw, c)
    y = mt.new_empty(b, th, m, tw, m, c)
    tmp = mt.new_empty(a, b, th, tw, c)
    for p in range(m):
        _combine_into(tmp, [mt[i] for i in range(a)], at[p])
        for q in range(m):
            _combine_into(y[:, :, p, :, q], [tmp[j] for j in range(a)], at[q])
    y = y.view(b, th * m, tw * m, c)
    return y[:, :h, :w] if (th * m, tw * m) != (h, w) else y


def _output_transform_t(dy: torch.Tensor, m: int) -> torch.Tensor:
    """Adjoint of `_output_transform`: NHWC gradient (B, H, W, C) -> (a^2, B*th*tw, C)."""
    at = WINOGRAD_MATRICES[m][2]
    a = m + 2
    b, h, w, c = dy.shape
    th, tw = _tiles(h, m), _tiles(w, m)
    dy = F.pad(dy, (0, 0, 0, tw * m - w, 0, th * m - h)).view(b, th, m, tw, m, c)
    out = dy.new_empty(a, a, b, th, tw, c)
    tmp = dy.new_empty(a, b, th, m, tw, c)  # adjoint over the column index first
    for j in range(a):
        _combine_into(tmp[j], [dy[:, :, :, :, q] for q in range(m)], [at[q][j] for q in range(m)])
    for i in range(a):
        for j in range(a):
            _combine_into(out[i, j], [tmp[j][:, :, p] for p in range(m)], [at[p][i] for p in range(m)])
    return out.view(a * a, b * th * tw, c)


def _weight_transform(weight: torch.Tensor, m: int) -> torch.Tensor:
    """(C_out, C, 3, 3) -> U (a^2, C, C_out) = G g G^T per (out, in) pair."""
    g = torch.tensor(WINOGRAD_MATRICES[m][1], dtype=weight.dtype, device=weight.device)
    a = m + 2
    co, c = weight.shape[:2]
    # Contiguous (3, 3, C, C_out) first: the GEMMs then read U without strided gathers.
    w = weight.permute(2, 3, 1, 0).reshape(3, 3 * c * co)
    t = (g @ w).view(a, 3, c * co)  # over the filter rows
    return torch.matmul(g, t).view(a * a, c, co)  # over the filter columns -> (a, a, C*C_out)


def _winograd_nhwc(x: torch.Tensor, weight: torch.Tensor, m: int) -> torch.Tensor:
    b, h, w, _ = x.shape
    mt = torch.bmm(_input_transform(x, m), _weight_transform(weight, m))  # (a^2, T, C_out)
    return _output_transform(mt, m, b, h, w)


class _WinogradConv3x3(torch.autograd.Function):
    """3x3 / stride 1 / padding 1 convolution without bias; input and output NCHW-shaped, the
    output in channels-last memory. Backward: the input gradient is the same Winograd
    convolution of the output gradient with the flipped, transposed filter; the weight gradient
    is ``G^T (V^T dM) G`` with the input tiles V recomputed (only x is saved, like the direct
    convolution)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, m: int) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        ctx.m = m
        xn = x.detach().permute(0, 2, 3, 1).contiguous()
        return _winograd_nhwc(xn, weight.detach(), m).permute(0, 3, 1, 2)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, weight = ctx.saved_tensors
        m = ctx.m
        gn = grad.permute(0, 2, 3, 1).contiguous()
        gx = gw = None
        if ctx.needs_input_grad[0]:
            gx = _winograd_nhwc(gn, weight.flip(2, 3).transpose(0, 1), m).permute(0, 3, 1, 2)
        if ctx.needs_input_grad[1]:
            v = _input_transform(x.permute(0, 2, 3, 1).contiguous(), m)
            du = torch.bmm(v.transpose(1, 2), _output_transform_t(gn, m))  # (a^2, C, C_out)
            g = torch.tensor(WINOGRAD_MATRICES[m][1], dtype=weight.dtype, device=weight.device)
            a = m + 2
            c, co = du.shape[1:]
            t = (g.t() @ du.view(a, a * c * co)).view(3, a, c * co)  # adjoint over the rows
            gw = torch.matmul(g.t(), t).view(3, 3, c, co).permute(3, 2, 0, 1)  # (C_out, C, 3, 3)
        return gx, gw, None


def winograd_conv3x3(x: torch.Tensor, weight: torch.Tensor, m: int = 2) -> torch.Tensor:
    """``F.conv2d(x, weight, padding=1)`` for a 3x3 filter (stride 1, no bias) by Winograd
    F(m x m, 3 x 3), ``m`` in {2, 4}: ``x (B, C, H, W)``, ``weight (C_out, C, 3, 3)`` ->
    ``(B, C_out, H, W)`` in channels-last memory.

    The (m + 2)^2 products per tile run as one batched GEMM over all tiles, so the multiplies
    drop by 9 m^2 / (m + 2)^2 (2.25x for m = 2, 4x for m = 4), forward and backward. Only the
    rounding differs from the direct convolution: m = 2 adds exact halvings and sums (max error
    ~3e-6 of the output range in float32, measured), m = 4 has larger constants (~1e-5).
    """
    if m not in WINOGRAD_MATRICES:
        raise ValueError(f"Winograd tile size must be one of {sorted(WINOGRAD_MATRICES)}, got {m!r}")
    return _WinogradConv3x3.apply(x, weight, m)


def _conv3x3(cin: int, cout: int) -> nn.Module:
    return nn.Conv2d(cin, cout, 3, padding=1, bias=False)


class SimpleDecoding(nn.Module):
    """``forward(x_c4, x_c3, x_c2, x_c1) -> (B, 2, H1, W1)`` with ``c4_dims = 8 * embed_dim``."""

    def __init__(self, c4_dims: int, factor: int = 2, conv2_factory: Callable[[int, int], nn.Module] | None = None,
                 upsample: str = "size", num_classes: int = 2, channels_last: ChannelsLast = "auto",
                 winograd: int | str = "auto"):
        super().__init__()
        self.winograd = winograd
        if upsample not in ("size", "scale"):
            raise ValueError(f"upsample must be 'size' or 'scale', got {upsample!r}")
        self.channels_last = check_channels_last(channels_last)
        conv2 = conv2_factory or _conv3x3
        hidden = c4_dims // factor
        c3, c2, c1 = c4_dims // 2, c4_dims // 4, c4_dims // 8
        self.upsample = upsample
        # Attribute names follow the originals (checkpoint keys).
        self.conv1_4 = _conv3x3(c4_dims + c3, hidden)
        self.bn1_4 = nn.BatchNorm2d(hidden)
        self.relu1_4 = nn.ReLU()
        self.conv2_4 = conv2(hidden, hidden)
        self.bn2_4 = nn.BatchNorm2d(hidden)
        self.relu2_4 = nn.ReLU()
        self.conv1_3 = _conv3x3(hidden + c2, hidden)
        self.bn1_3 = nn.BatchNorm2d(hidden)
        self.relu1_3 = nn.ReLU()
        self.conv2_3 = conv2(hidden, hidden)
        self.bn2_3 = nn.BatchNorm2d(hidden)
        self.relu2_3 = nn.ReLU()
        self.conv1_2 = _conv3x3(hidden + c1, hidden)
        self.bn1_2 = nn.BatchNorm2d(hidden)
        self.relu1_2 = nn.ReLU()
        self.conv2_2 = conv2(hidden, hidden)
        self.bn2_2 = nn.BatchNorm2d(hidden)
        self.relu2_2 = nn.ReLU()
        self.conv1_1 = nn.Conv2d(hidden, num_classes, 1)

    def _up(self, x: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        if x.shape[-2] < like.shape[-2] or x.shape[-1] < like.shape[-1]:
            if self.upsample == "scale":
                return F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=True)
            return F.interpolate(x, size=like.shape[-2:], mode="bilinear", align_corners=True)
        return x

    def _step(self, x: torch.Tensor, skip: torch.Tensor, level: int, channels_last: bool = False) -> torch.Tensor:
        x = torch.cat([self._up(x, skip), skip], dim=1)
        if channels_last:  # a no-op when both inputs were NHWC; RMSIN's rotated conv returns NCHW
            x = x.contiguous(memory_format=torch.channels_last)
        g = lambda name: getattr(self, f"{name}_{level}")  # noqa: E731
        m = self.winograd_tile(x)
        x = g("relu1")(g("bn1")(self._conv(g("conv1"), x, m)))
        return g("relu2")(g("bn2")(self._conv(g("conv2"), x, m)))

    @staticmethod
    def _conv(conv: nn.Module, x: torch.Tensor, m: int) -> torch.Tensor:
        """``conv(x)``, by Winograd F(m x m, 3 x 3) when ``m`` and conv is a plain 3x3 / stride 1 /
        padding 1 convolution without bias (RMSIN's rotated convs run as they are)."""
        if (m and x.shape[-2] * x.shape[-1] >= WINOGRAD_MIN_PIXELS and type(conv) is nn.Conv2d and conv.kernel_size == (3, 3) and conv.stride == (1, 1)
                and conv.padding == (1, 1) and conv.dilation == (1, 1) and conv.groups == 1 and conv.bias is None
                and x.dtype == torch.float32 and conv.weight.dtype == torch.float32):
            return winograd_conv3x3(x, conv.weight, m)
        return conv(x)

    def winograd_tile(self, x: torch.Tensor) -> int:
        """Winograd tile size a forward on ``x`` uses (0: direct convolutions). ``winograd`` is
        ``'auto'`` (`WINOGRAD_AUTO` by device type), 0 / False (off), True (4), 2 or 4.
        float32 only: under autocast the convolutions stay direct (bf16 GEMMs)."""
        if self.winograd == "auto":
            if torch.is_autocast_enabled(x.device.type):
                return 0
            return WINOGRAD_AUTO.get(x.device.type, 0)
        return 4 if self.winograd is True else int(self.winograd)

    def uses_channels_last(self, x: torch.Tensor, finest_pixels: int | None = None) -> bool:
        """Whether a forward on ``x``'s device takes the channels-last path (``finest_pixels``: the
        pixel count of the decoder's finest map, which decides whether Winograd runs at all)."""
        if self.channels_last == "auto":
            # Winograd works on NHWC maps: channels-last inputs save its layout copies (~7 %).
            # Only where it will run (the finest map is large enough): small inputs keep the plain
            # layout and so exactly the numbers they had before the Winograd path existed.
            return x.device.type in CHANNELS_LAST_AUTO_DEVICES or (
                self.winograd_tile(x) > 0 and (finest_pixels is None or finest_pixels >= WINOGRAD_MIN_PIXELS))
        return bool(self.channels_last)

    def forward(self, x_c4: torch.Tensor, x_c3: torch.Tensor, x_c2: torch.Tensor, x_c1: torch.Tensor) -> torch.Tensor:
        channels_last = self.uses_channels_last(x_c4, x_c1.shape[-2] * x_c1.shape[-1])
        if channels_last:
            # Convolutions, BatchNorm, ReLU, cat and bilinear upsampling keep the NHWC layout of
            # their inputs, so after this one conversion the plain decoder stays NHWC throughout.
            x_c4, x_c3, x_c2, x_c1 = (m.contiguous(memory_format=torch.channels_last) for m in (x_c4, x_c3, x_c2, x_c1))
        x = self._step(x_c4, x_c3, 4, channels_last)
        x = self._step(x, x_c2, 3, channels_last)
        x = self._step(x, x_c1, 2, channels_last)
        x = self.conv1_1(x)
        return x.contiguous() if channels_last or self.winograd_tile(x) else x
