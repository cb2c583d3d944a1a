"""Pyramid neck shared by FIANet's TMEM and RMSIN's CIM (Lei et al., IEEE TGRS
2024; Liu et al., CVPR 2024).

    maps (4 scales) -> adaptive-avg-pool each to the LAST map's size -> concat (sum C_s)
      -> down_channel (1x1, sum C_s -> sum C_s / 4) -> blocks -> bn -> up_channel (1x1)
      -> split per scale -> fusion[s] = ScaleAwareGate(map_s, global_s)

The blocks are model-specific: TMEM blocks are text-conditioned, CIM blocks are not. Whatever
extra arguments `PyramidNeck.forward` receives are passed to every block.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from lib.layers import h_sigmoid


def pyramid_pool(maps: Sequence[torch.Tensor]) -> torch.Tensor:
    """Average-pool every map to the size of the last one and concatenate on channels."""
    size = maps[-1].shape[-2:]
    return torch.cat([F.adaptive_avg_pool2d(m, size) for m in maps], dim=1)


class ScaleAwareGate(nn.Module):
    """``local * weight + global`` with ``local = bn1(1x1(x_l))``, ``global = up(bn2(1x1(x_g)))``,
    ``weight = up(h_sigmoid(bn3(1x1(x_g))))``; ``up`` = bilinear, align_corners=False, to x_l's size.
    The hard-sigmoid is applied before upsampling."""

    def __init__(self, inp: int, oup: int):
        super().__init__()
        self.local_embedding = nn.Conv2d(inp, oup, 1)
        self.bn1 = nn.BatchNorm2d(oup)
        self.global_embedding = nn.Conv2d(inp, oup, 1)
        self.bn2 = nn.BatchNorm2d(oup)
        self.global_act = nn.Conv2d(inp, oup, 1)
        self.bn3 = nn.BatchNorm2d(oup)

    def forward(self, x_l: torch.Tensor, x_g: torch.Tensor) -> torch.Tensor:
        size = x_l.shape[-2:]
        local = self.bn1(self.local_embedding(x_l))
        weight = F.interpolate(h_sigmoid(self.bn3(self.global_act(x_g))), size=size, mode="bilinear", align_corners=False)
        glob = F.interpolate(self.bn2(self.global_embedding(x_g)), size=size, mode="bilinear", align_corners=False)
        return local * weight + glob


class PyramidNeck(nn.Module):
    """Generic TMEM/CIM skeleton over the stage maps ``channels`` (e.g. [E, 2E, 4E, 8E]).

    ``block_factory(hidden) -> nn.Module`` builds each of the ``num_blocks`` blocks (``block[k]``);
    ``hidden = sum(channels) // 4``. ``forward(maps, *block_args, feats=None, prefix='')``.
    """

    def __init__(self, channels: Sequence[int], num_blocks: int, block_factory: Callable[[int], nn.Module]):
        super().__init__()
        self.channels = [int(c) for c in channels]
        dim = sum(self.channels)
        hidden = dim // 4
        self.down_channel = nn.Conv2d(dim, hidden, 1)
        self.block = nn.ModuleList(block_factory(hidden) for _ in range(num_blocks))
        self.bn = nn.BatchNorm2d(hidden)
        self.up_channel = nn.Conv2d(hidden, dim, 1)
        self.fusion = nn.ModuleList(ScaleAwareGate(c, c) for c in self.channels)

    def forward(self, maps: Sequence[torch.Tensor], *block_args: Any, feats: dict | None = None, prefix: str = "") -> list[torch.Tensor]:
        if len(maps) != len(self.channels):
            raise ValueError(f"expected {len(self.channels)} maps, got {len(maps)}")
        if feats is not None:
            feats[prefix + "input"] = list(maps)
        g = self.down_channel(pyramid_pool(maps))
        for k, blk in enumerate(self.block):
            g = blk(g, *block_args)
            if feats is not None:
                feats[f"{prefix}block.{k}"] = g
        g = self.up_channel(self.bn(g))
        parts = torch.split(g, self.channels, dim=1)
        return [gate(m, part) for gate, m, part in zip(self.fusion, maps, parts)]
