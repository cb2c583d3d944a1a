"""CPU speed paths that change rounding only: the subnormal-free shift mask of the Swin blocks
and the decoder's Winograd 3x3 convolutions. Each is checked against the reference op sequence,
values and gradients."""
from __future__ import annotations

import torch

from lib.swin import FAST_SHIFT_MASK, REFERENCE_SHIFT_MASK, SwinBlock, run_swin_blocks, shifted_window_mask


def test_fast_shift_mask_matches_reference_mask_values_and_gradients():
    torch.manual_seed(0)
    blocks = torch.nn.ModuleList([SwinBlock(16, 2, 4, 0), SwinBlock(16, 2, 4, 2)]).double()
    x = torch.randn(2, 36, 16, dtype=torch.float64, requires_grad=True)
    results = {}
    for fused in (False, True):  # plain path on CPU + autograd either way; only the mask differs
        for blk in blocks:
            blk.attn.fused = fused
        blocks.zero_grad()
        x.grad = None
        out = run_swin_blocks(blocks, x, 6, 6)
        out.square().sum().backward()
        table = blocks[1].attn.relative_position_bias_table.grad.clone()
        results[fused] = (out.detach(), x.grad.clone(), table)
    for a, b in zip(results[True], results[False]):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    # The masks differ only across regions, and exp() of the fast value is exactly zero.
    ref, fast = shifted_window_mask(8, 8, 4, 2), shifted_window_mask(8, 8, 4, 2, value=FAST_SHIFT_MASK)
    assert torch.equal(ref == REFERENCE_SHIFT_MASK, fast == FAST_SHIFT_MASK) and (ref != 0).any()
    assert torch.exp(torch.tensor(FAST_SHIFT_MASK)) == 0
    assert 0 < torch.exp(torch.tensor(REFERENCE_SHIFT_MASK)) < torch.finfo(torch.float32).tiny  # subnormal
