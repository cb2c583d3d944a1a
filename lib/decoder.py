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
``'auto'`` (default) uses it on the devices in `CHANNELS_LAST_AUTO_DEVICES`: CUDA only, because
on CPU it measured no faster (BENCHMARKS.md, "Models"); ``True`` / ``False`` force it.
"""
from __future__ import annotations

from typing import Callable, Union

import torch
import torch.nn.functional as F
from torch import nn

# Devices on which ``channels_last='auto'`` takes the channels-last path.
CHANNELS_LAST_AUTO_DEVICES: frozenset[str] = frozenset({"cuda"})

ChannelsLast = Union[bool, str]  # True, False or "auto"


def check_channels_last(value: ChannelsLast) -> ChannelsLast:
    if value not in (True, False, "auto"):
        raise ValueError(f"channels_last must be True, False or 'auto', got {value!r}")
    return value


def _conv3x3(cin: int, cout: int) -> nn.Module:
    return nn.Conv2d(cin, cout, 3, padding=1, bias=False)


class SimpleDecoding(nn.Module):
    """``forward(x_c4, x_c3, x_c2, x_c1) -> (B, 2, H1, W1)`` with ``c4_dims = 8 * embed_dim``."""

    def __init__(self, c4_dims: int, factor: int = 2, conv2_factory: Callable[[int, int], nn.Module] | None = None,
                 upsample: str = "size", num_classes: int = 2, channels_last: ChannelsLast = "auto"):
        super().__init__()
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
        x = g("relu1")(g("bn1")(g("conv1")(x)))
        return g("relu2")(g("bn2")(g("conv2")(x)))

    def uses_channels_last(self, x: torch.Tensor) -> bool:
        """Whether a forward on ``x``'s device takes the channels-last path."""
        if self.channels_last == "auto":
            return x.device.type in CHANNELS_LAST_AUTO_DEVICES
        return bool(self.channels_last)

    def forward(self, x_c4: torch.Tensor, x_c3: torch.Tensor, x_c2: torch.Tensor, x_c1: torch.Tensor) -> torch.Tensor:
        channels_last = self.uses_channels_last(x_c4)
        if channels_last:
            # Convolutions, BatchNorm, ReLU, cat and bilinear upsampling keep the NHWC layout of
            # their inputs, so after this one conversion the plain decoder stays NHWC throughout.
            x_c4, x_c3, x_c2, x_c1 = (m.contiguous(memory_format=torch.channels_last) for m in (x_c4, x_c3, x_c2, x_c1))
        x = self._step(x_c4, x_c3, 4, channels_last)
        x = self._step(x, x_c2, 3, channels_last)
        x = self._step(x, x_c1, 2, channels_last)
        x = self.conv1_1(x)
        return x.contiguous() if channels_last else x
