"""Multi-scale deformable attention in plain PyTorch (lib/deformable.py)."""
from __future__ import annotations

import math

import pytest
import torch

from lib.deformable import (
    MSDeformAttn,
    flatten_levels,
    level_reference_points,
    ms_deform_attn_core,
    ms_deform_attn_naive,
    sine_position_encoding,
)

# Non-square levels, one of them a single row, one with odd sides.
SHAPES = [(3, 5), (1, 4), (6, 7)]


def _random_inputs(dtype: torch.dtype, b: int = 2, lq: int = 9, m: int = 3, d: int = 4, p: int = 3, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    s = sum(h * w for h, w in SHAPES)
    value = torch.randn(b, s, m, d, generator=g, dtype=dtype)
    # locations in [-0.4, 1.4]: a good share of the samples leaves the map (partly or entirely)
    loc = torch.rand(b, lq, m, len(SHAPES), p, 2, generator=g, dtype=dtype) * 1.8 - 0.4
    weights = torch.rand(b, lq, m, len(SHAPES) * p, generator=g, dtype=dtype).softmax(-1).view(b, lq, m, len(SHAPES), p)
    return value, loc, weights


@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
def test_core_matches_naive_loop(dtype, tol):
    value, loc, weights = _random_inputs(dtype)
    outside = ((loc < 0) | (loc > 1)).any(-1).float().mean().item()
    assert 0.2 < outside < 0.8  # the case really exercises the zero padding
    ours = ms_deform_attn_core(value, SHAPES, loc, weights)
    ref = ms_deform_attn_naive(value, SHAPES, loc, weights)
    assert ours.shape == (2, 9, 3 * 4)
    assert (ours - ref).abs().max().item() < tol
    # spatial shapes as an (L, 2) tensor, as the original passes them
    same = ms_deform_attn_core(value, torch.tensor(SHAPES), loc, weights)
    assert torch.equal(same, ours)


def test_samples_far_outside_read_zero():
    value, loc, weights = _random_inputs(torch.float64)
    far = torch.full_like(loc, 3.0)  # every sample several maps away
    assert ms_deform_attn_core(value, SHAPES, far, weights).abs().max().item() == 0.0


def test_gradcheck_float64():
    value, loc, weights = _random_inputs(torch.float64, b=1, lq=2, m=2, d=2, p=2, seed=3)
    inputs = tuple(t.clone().requires_grad_(True) for t in (value, loc, weights))
    assert torch.autograd.gradcheck(lambda v, l, w: ms_deform_attn_core(v, SHAPES, l, w), inputs, eps=1e-6, atol=1e-6)


def test_bad_shapes_raise_clear_errors():
    value, loc, weights = _random_inputs(torch.float32)
    with pytest.raises(ValueError, match="positions"):
        ms_deform_attn_core(value[:, 1:], SHAPES, loc, weights)
    with pytest.raises(ValueError, match="attention_weights"):
        ms_deform_attn_core(value, SHAPES, loc, weights[..., :1])


def test_module_init_is_deformable_detr():
    attn = MSDeformAttn(d_model=32, n_levels=3, n_heads=8, n_points=4)
    bias = attn.sampling_offsets.bias.view(8, 3, 4, 2)
    # head 0 points along +x, head 2 along +y, head 5 along (-1, -1); point k at distance k + 1
    assert torch.allclose(bias[0, 1, :, 0], torch.tensor([1.0, 2.0, 3.0, 4.0]))
    assert torch.allclose(bias[2, 0, 2], torch.tensor([0.0, 3.0]), atol=1e-6)
    assert torch.allclose(bias[5, 2, 0], torch.tensor([-1.0, -1.0]))
    assert bias.abs().amax(-1).gt(0).all() and torch.equal(bias[:, 0], bias[:, 2])
    assert attn.sampling_offsets.weight.abs().sum() == 0
    assert attn.attention_weights.weight.abs().sum() == 0 and attn.attention_weights.bias.abs().sum() == 0
    assert attn.value_proj.bias.abs().sum() == 0 and attn.output_proj.bias.abs().sum() == 0


def _identity_attention(offset_x: float, offset_y: float) -> MSDeformAttn:
    """One level, one head, one point, identity projections, a constant pixel offset."""
    attn = MSDeformAttn(d_model=2, n_levels=1, n_heads=1, n_points=1)
    with torch.no_grad():
        for lin in (attn.value_proj, attn.output_proj):
            lin.weight.copy_(torch.eye(2))
            lin.bias.zero_()
        attn.sampling_offsets.weight.zero_()
        attn.sampling_offsets.bias.copy_(torch.tensor([offset_x, offset_y]))
    return attn


def test_module_hand_computed_samples():
    """Offsets are in pixels of the level (x by W, y by H); align_corners=False with zero padding."""
    h, w = 2, 3
    img = torch.arange(1.0, 7.0).view(1, 1, h, w).repeat(1, 2, 1, 1)  # channel 0 = channel 1 = [[1,2,3],[4,5,6]]
    src, shapes, _ = flatten_levels([img])
    ref = level_reference_points(shapes)[:, :, None]  # (1, 6, 1, 2) pixel centres
    cases = {
        (1.0, 0.0): [2, 3, 0, 5, 6, 0],          # one pixel right; the right column reads zeros
        (0.0, 1.0): [4, 5, 6, 0, 0, 0],          # one pixel down
        (0.5, 0.0): [1.5, 2.5, 1.5, 4.5, 5.5, 3.0],  # half a pixel: mean of two; at the border half of it
    }
    for (dx, dy), expected in cases.items():
        out = _identity_attention(dx, dy)(src, ref, src, shapes)
        assert torch.allclose(out[0, :, 0], torch.tensor(expected, dtype=torch.float32)), (dx, dy, out[0, :, 0])
    # a padding mask zeroes the masked values before sampling
    mask = torch.zeros(1, 6, dtype=torch.bool)
    mask[0, 1] = True
    out = _identity_attention(1.0, 0.0)(src, ref, src, shapes, input_padding_mask=mask)
    assert torch.allclose(out[0, :, 0], torch.tensor([0.0, 3, 0, 5, 6, 0]))


def test_module_matches_naive_core():
    torch.manual_seed(0)
    attn = MSDeformAttn(d_model=16, n_levels=3, n_heads=4, n_points=2)
    with torch.no_grad():  # non-trivial offsets and weights
        attn.sampling_offsets.weight.normal_(0, 0.5)
        attn.attention_weights.weight.normal_(0, 0.5)
    maps = [torch.randn(2, 16, h, w) for h, w in SHAPES]
    src, shapes, _ = flatten_levels(maps)
    ref = level_reference_points(shapes)[:, :, None].expand(2, -1, 3, -1)
    out = attn(src, ref, src, shapes)
    b, s, _ = src.shape
    value = attn.value_proj(src).view(b, s, 4, 4)
    off = attn.sampling_offsets(src).view(b, s, 4, 3, 2, 2)
    wts = attn.attention_weights(src).view(b, s, 4, 6).softmax(-1).view(b, s, 4, 3, 2)
    norm = torch.tensor([[w, h] for h, w in SHAPES], dtype=torch.float32)
    loc = ref[:, :, None, :, None, :] + off / norm[None, None, None, :, None, :]
    expected = attn.output_proj(ms_deform_attn_naive(value, shapes, loc, wts))
    assert (out - expected).abs().max().item() < 1e-5


def test_reference_points_and_flatten():
    ref = level_reference_points([(2, 4), (1, 1)])
    assert ref.shape == (1, 9, 2)
    assert torch.allclose(ref[0, :4], torch.tensor([[0.125, 0.25], [0.375, 0.25], [0.625, 0.25], [0.875, 0.25]]))
    assert torch.allclose(ref[0, 4], torch.tensor([0.125, 0.75]))
    assert torch.allclose(ref[0, 8], torch.tensor([0.5, 0.5]))
    maps = [torch.randn(1, 3, 2, 4), torch.randn(1, 3, 1, 1)]
    tokens, shapes, starts = flatten_levels(maps)
    assert shapes == [(2, 4), (1, 1)] and starts == [0, 8]
    assert torch.equal(tokens[0, 5], maps[0][0, :, 1, 1]) and torch.equal(tokens[0, 8], maps[1][0, :, 0, 0])


def test_sine_position_encoding_values():
    x = torch.zeros(2, 5, 3, 4)
    pos = sine_position_encoding(x, num_pos_feats=8)
    assert pos.shape == (2, 16, 3, 4) and pos.dtype == torch.float32
    scale = 2 * math.pi
    i, j = 2, 1  # row 3 of 3, column 2 of 4 (1-based cumulative counts)
    y = 3 / (3 + 1e-6) * scale
    xx = 2 / (4 + 1e-6) * scale
    dim_t = [10000 ** (2 * (k // 2) / 8) for k in range(8)]
    exp_y = [math.sin(y / dim_t[k]) if k % 2 == 0 else math.cos(y / dim_t[k]) for k in range(8)]
    exp_x = [math.sin(xx / dim_t[k]) if k % 2 == 0 else math.cos(xx / dim_t[k]) for k in range(8)]
    assert torch.allclose(pos[1, :, i, j], torch.tensor(exp_y + exp_x), atol=1e-6)  # y channels first
