"""Multi-scale deformable attention in plain PyTorch, and the multi-scale helpers around it.

Multi-scale deformable attention (Zhu et al., "Deformable DETR", ICLR 2021, section 4.1, eq. 3):
every query q with reference point p_q (normalised (x, y) in [0, 1]) attends, per head m, to
``P`` sampled points on each of the ``L`` feature levels:

    MSDeformAttn(z_q, p_q, {x^l}) = sum_m W_m [ sum_l sum_k A_mlqk * W'_m x^l(p_q + dp_mlqk) ]

with offsets ``dp`` and weights ``A`` linear in the query, ``A`` normalised by ONE softmax over all
``L * P`` samples of a head (levels and points together). A sample's value is read by bilinear
interpolation at pixel coordinate ``loc * size - 0.5`` with zeros outside the map, which is
exactly ``F.grid_sample(align_corners=False, padding_mode='zeros')`` at ``2 * loc - 1``; the
offsets are divided by the level's (W, H) so one unit moves one pixel of that level.

Nothing here is compiled: `ms_deform_attn_core` is the grid_sample form (one call per level) and
runs on any device and dtype, with autograd. `ms_deform_attn_naive` is an independent reference
(explicit bilinear gathers, loop over samples and levels) used by the tests and the benchmark.

Also here, because every Mask2Former-style pixel decoder needs them: `level_reference_points`
(pixel-centre reference points), `flatten_levels` (maps -> one token sequence with spatial shapes
and start indices) and `sine_position_encoding` (DETR's normalised 2-D sine encoding; Carion et
al., ECCV 2020, section 3.2 / appendix).
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

SpatialShapes = Sequence[tuple[int, int]]

__all__ = [
    "MSDeformAttn", "ms_deform_attn_core", "ms_deform_attn_naive", "level_reference_points",
    "flatten_levels", "sine_position_encoding", "as_shape_list",
]


def as_shape_list(spatial_shapes: SpatialShapes | torch.Tensor) -> list[tuple[int, int]]:
    """``[(H_l, W_l), ...]`` as Python ints, from a list or an (L, 2) integer tensor."""
    if torch.is_tensor(spatial_shapes):
        return [(int(h), int(w)) for h, w in spatial_shapes.tolist()]
    return [(int(h), int(w)) for h, w in spatial_shapes]


def _check(value: torch.Tensor, shapes: list[tuple[int, int]], loc: torch.Tensor, weights: torch.Tensor) -> None:
    _, s, m, _ = value.shape
    if s != sum(h * w for h, w in shapes):
        raise ValueError(f"value has {s} positions but the spatial shapes {shapes} hold {sum(h * w for h, w in shapes)}")
    if loc.dim() != 6 or loc.shape[-1] != 2 or loc.shape[3] != len(shapes) or loc.shape[2] != m:
        raise ValueError(f"sampling_locations must be (B, Lq, {m} heads, {len(shapes)} levels, P, 2), got {tuple(loc.shape)}")
    if tuple(weights.shape) != tuple(loc.shape[:-1]):
        raise ValueError(f"attention_weights {tuple(weights.shape)} must be {tuple(loc.shape[:-1])}")


def ms_deform_attn_core(value: torch.Tensor, spatial_shapes: SpatialShapes | torch.Tensor,
                        sampling_locations: torch.Tensor, attention_weights: torch.Tensor) -> torch.Tensor:
    """The sampling-and-weighting core of multi-scale deformable attention (grid_sample form).

    ``value (B, S, M, D)`` (levels flattened row-major and concatenated, S = sum H_l W_l),
    ``sampling_locations (B, Lq, M, L, P, 2)`` normalised (x, y) (may leave [0, 1]: zeros there),
    ``attention_weights (B, Lq, M, L, P)`` (already normalised) -> ``(B, Lq, M * D)``.
    """
    shapes = as_shape_list(spatial_shapes)
    _check(value, shapes, sampling_locations, attention_weights)
    b, _, m, d = value.shape
    _, lq, _, n_levels, n_points, _ = sampling_locations.shape
    values = value.split([h * w for h, w in shapes], dim=1)
    grids = 2 * sampling_locations - 1
    samples = []
    for lvl, (h, w) in enumerate(shapes):
        v = values[lvl].flatten(2).transpose(1, 2).reshape(b * m, d, h, w)  # (B*M, D, H, W)
        g = grids[:, :, :, lvl].transpose(1, 2).flatten(0, 1)  # (B*M, Lq, P, 2)
        samples.append(F.grid_sample(v, g, mode="bilinear", padding_mode="zeros", align_corners=False))
    weights = attention_weights.transpose(1, 2).reshape(b * m, 1, lq, n_levels * n_points)
    out = (torch.stack(samples, dim=-2).flatten(-2) * weights).sum(-1)  # (B*M, D, Lq)
    return out.view(b, m * d, lq).transpose(1, 2).contiguous()


def ms_deform_attn_naive(value: torch.Tensor, spatial_shapes: SpatialShapes | torch.Tensor,
                         sampling_locations: torch.Tensor, attention_weights: torch.Tensor) -> torch.Tensor:
    """Reference for `ms_deform_attn_core` without grid_sample: a loop over batch samples, levels
    and points with explicit bilinear interpolation (four corner gathers, zeros outside the map).
    Same arguments and result; slow, for tests and the benchmark."""
    shapes = as_shape_list(spatial_shapes)
    _check(value, shapes, sampling_locations, attention_weights)
    b, _, m, d = value.shape
    _, lq, _, _, n_points, _ = sampling_locations.shape
    starts = [0]
    for h, w in shapes:
        starts.append(starts[-1] + h * w)
    out = value.new_zeros(b, lq, m, d)
    for n in range(b):
        acc = value.new_zeros(lq, m, d)
        for lvl, (h, w) in enumerate(shapes):
            v = value[n, starts[lvl]:starts[lvl + 1]]  # (H*W, M, D)
            for p in range(n_points):
                loc = sampling_locations[n, :, :, lvl, p]  # (Lq, M, 2)
                px = loc[..., 0] * w - 0.5  # pixel coordinates of the sample (pixel centres at k + 0.5)
                py = loc[..., 1] * h - 0.5
                x0, y0 = torch.floor(px), torch.floor(py)
                fx, fy = px - x0, py - y0
                sample = value.new_zeros(lq, m, d)
                for dy, wy in ((0, 1 - fy), (1, fy)):
                    for dx, wx in ((0, 1 - fx), (1, fx)):
                        xi, yi = (x0 + dx).long(), (y0 + dy).long()
                        inside = (xi >= 0) & (xi < w) & (yi >= 0) & (yi < h)  # (Lq, M)
                        idx = (yi.clamp(0, h - 1) * w + xi.clamp(0, w - 1))  # (Lq, M)
                        heads = torch.arange(m, device=value.device).expand_as(idx)
                        corner = v[idx, heads]  # (Lq, M, D)
                        sample = sample + corner * (wx * wy * inside)[..., None]
                acc = acc + sample * attention_weights[n, :, :, lvl, p][..., None]
        out[n] = acc
    return out.reshape(b, lq, m * d)


class MSDeformAttn(nn.Module):
    """Multi-scale deformable attention module (Deformable DETR, section 4.1), parameters named as
    the original (``sampling_offsets``, ``attention_weights``, ``value_proj``, ``output_proj``).

    ``forward(query (B, Lq, C), reference_points (B, Lq, L, 2) normalised (x, y) [or (B, Lq, L, 4)
    boxes (cx, cy, w, h)], input_flatten (B, S, C), spatial_shapes [(H_l, W_l)] or (L, 2) tensor,
    level_start_index=None, input_padding_mask (B, S) bool = None) -> (B, Lq, C)``.
    """

    def __init__(self, d_model: int = 256, n_levels: int = 4, n_heads: int = 8, n_points: int = 4):
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"d_model {d_model} must be divisible by n_heads {n_heads}")
        self.d_model, self.n_levels, self.n_heads, self.n_points = d_model, n_levels, n_heads, n_points
        self.sampling_offsets = nn.Linear(d_model, n_heads * n_levels * n_points * 2)
        self.attention_weights = nn.Linear(d_model, n_heads * n_levels * n_points)
        self.value_proj = nn.Linear(d_model, d_model)
        self.output_proj = nn.Linear(d_model, d_model)
        self._reset_parameters()

    @torch.no_grad()
    def _reset_parameters(self) -> None:
        """Deformable DETR's init: zero offset weights, offset bias = head k's unit direction at
        angle 2*pi*k/heads (scaled so its larger |component| is 1) times (point index + 1) on every
        level; uniform attention at start (weights and bias 0); xavier projections, zero bias."""
        nn.init.zeros_(self.sampling_offsets.weight)
        theta = torch.arange(self.n_heads, dtype=torch.float32) * (2.0 * math.pi / self.n_heads)
        grid = torch.stack([theta.cos(), theta.sin()], -1)
        grid = grid / grid.abs().max(-1, keepdim=True)[0]
        grid = grid.view(self.n_heads, 1, 1, 2).repeat(1, self.n_levels, self.n_points, 1)
        grid = grid * torch.arange(1, self.n_points + 1, dtype=torch.float32).view(1, 1, -1, 1)
        self.sampling_offsets.bias.copy_(grid.reshape(-1))
        nn.init.zeros_(self.attention_weights.weight)
        nn.init.zeros_(self.attention_weights.bias)
        for proj in (self.value_proj, self.output_proj):
            nn.init.xavier_uniform_(proj.weight)
            nn.init.zeros_(proj.bias)

    def forward(self, query: torch.Tensor, reference_points: torch.Tensor, input_flatten: torch.Tensor,
                spatial_shapes: SpatialShapes | torch.Tensor, level_start_index: torch.Tensor | None = None,
                input_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        shapes = as_shape_list(spatial_shapes)
        if len(shapes) != self.n_levels:
            raise ValueError(f"MSDeformAttn built for {self.n_levels} levels got {len(shapes)} spatial shapes")
        b, lq, _ = query.shape
        s = input_flatten.shape[1]
        m, n_l, n_p = self.n_heads, self.n_levels, self.n_points
        value = self.value_proj(input_flatten)
        if input_padding_mask is not None:
            value = value.masked_fill(input_padding_mask[..., None], 0.0)
        value = value.view(b, s, m, self.d_model // m)
        offsets = self.sampling_offsets(query).view(b, lq, m, n_l, n_p, 2)
        weights = self.attention_weights(query).view(b, lq, m, n_l * n_p).softmax(-1).view(b, lq, m, n_l, n_p)
        if reference_points.shape[-1] == 2:
            # offsets are in pixels of each level: x by the level width, y by its height
            normalizer = torch.tensor([[w, h] for h, w in shapes], dtype=offsets.dtype, device=offsets.device)
            loc = reference_points[:, :, None, :, None, :] + offsets / normalizer[None, None, None, :, None, :]
        elif reference_points.shape[-1] == 4:
            loc = (reference_points[:, :, None, :, None, :2]
                   + offsets / n_p * reference_points[:, :, None, :, None, 2:] * 0.5)
        else:
            raise ValueError(f"reference_points must end in 2 or 4 coordinates, got {tuple(reference_points.shape)}")
        out = ms_deform_attn_core(value, shapes, loc, weights)
        return self.output_proj(out)


# --------------------------------------------------------------------------------------------
# Multi-scale helpers
# --------------------------------------------------------------------------------------------
def level_reference_points(spatial_shapes: SpatialShapes | torch.Tensor, device: torch.device | None = None,
                           dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Pixel-centre reference points ``(1, S, 2)`` in normalised (x, y): ``((j + 0.5) / W_l,
    (i + 0.5) / H_l)`` for every pixel of every level, row-major, levels concatenated (all
    positions valid, so no valid-ratio rescaling)."""
    pts = []
    for h, w in as_shape_list(spatial_shapes):
        y = (torch.arange(h, device=device, dtype=dtype) + 0.5) / h
        x = (torch.arange(w, device=device, dtype=dtype) + 0.5) / w
        yy, xx = torch.meshgrid(y, x, indexing="ij")
        pts.append(torch.stack([xx.reshape(-1), yy.reshape(-1)], -1))
    return torch.cat(pts, 0)[None]


def flatten_levels(maps: Sequence[torch.Tensor]) -> tuple[torch.Tensor, list[tuple[int, int]], list[int]]:
    """``[(B, C, H_l, W_l)]`` -> ``(tokens (B, S, C), spatial shapes [(H_l, W_l)], start indices)``."""
    shapes = [(int(x.shape[-2]), int(x.shape[-1])) for x in maps]
    starts = [0]
    for h, w in shapes[:-1]:
        starts.append(starts[-1] + h * w)
    return torch.cat([x.flatten(2).transpose(1, 2) for x in maps], 1), shapes, starts


def sine_position_encoding(x: torch.Tensor, num_pos_feats: int = 128, temperature: float = 10000.0,
                           scale: float = 2 * math.pi, eps: float = 1e-6) -> torch.Tensor:
    """DETR's normalised 2-D sine position encoding for a map ``x (B, C, H, W)`` (no padding mask)
    -> ``(B, 2 * num_pos_feats, H, W)`` float32.

    Row i (1-based) has y = i / (H + eps) * scale, column j has x = j / (W + eps) * scale;
    per axis ``num_pos_feats`` channels [sin(t / T^(0/n)), cos(t / T^(0/n)), sin(t / T^(2/n)), ...];
    y channels first, then x.
    """
    b, _, h, w = x.shape
    dev = x.device
    y_embed = torch.arange(1, h + 1, dtype=torch.float32, device=dev).view(1, h, 1).expand(b, h, w)
    x_embed = torch.arange(1, w + 1, dtype=torch.float32, device=dev).view(1, 1, w).expand(b, h, w)
    y_embed = y_embed / (y_embed[:, -1:, :] + eps) * scale
    x_embed = x_embed / (x_embed[:, :, -1:] + eps) * scale
    dim_t = torch.arange(num_pos_feats, dtype=torch.float32, device=dev)
    dim_t = temperature ** (2 * torch.div(dim_t, 2, rounding_mode="floor") / num_pos_feats)
    pos_x = x_embed[..., None] / dim_t
    pos_y = y_embed[..., None] / dim_t
    pos_x = torch.stack((pos_x[..., 0::2].sin(), pos_x[..., 1::2].cos()), dim=4).flatten(3)
    pos_y = torch.stack((pos_y[..., 0::2].sin(), pos_y[..., 1::2].cos()), dim=4).flatten(3)
    return torch.cat((pos_y, pos_x), dim=3).permute(0, 3, 1, 2)
