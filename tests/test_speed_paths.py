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


# --------------------------------------------------------------------------------------------
# Winograd 3x3 convolutions of the decoder
# --------------------------------------------------------------------------------------------
import pytest  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import lib.decoder as decoder  # noqa: E402
from lib.registry import build_model, tiny_model_config  # noqa: E402


@pytest.mark.parametrize("m", [2, 4])
@pytest.mark.parametrize("shape", [(2, 5, 3, 7, 9), (1, 4, 6, 8, 8), (2, 3, 2, 13, 12)])
def test_winograd_conv_equals_direct_conv_and_its_gradients(m, shape):
    b, c, co, h, w = shape
    g = torch.Generator().manual_seed(0)
    x = torch.randn(b, c, h, w, dtype=torch.float64, generator=g, requires_grad=True)
    wt = torch.randn(co, c, 3, 3, dtype=torch.float64, generator=g, requires_grad=True)
    out = decoder.winograd_conv3x3(x, wt, m)
    ref = F.conv2d(x, wt, padding=1)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-12)  # exact algebra: float64 rounding only
    assert out.shape == ref.shape
    if h % m == 0 and w % m == 0:  # uncropped: the NHWC result as is
        assert out.is_contiguous(memory_format=torch.channels_last)
    gy = torch.randn(ref.shape, dtype=torch.float64, generator=g)
    grads = torch.autograd.grad(out, (x, wt), gy)
    ref_grads = torch.autograd.grad(ref, (x, wt), gy)
    for a, r in zip(grads, ref_grads):
        torch.testing.assert_close(a, r, rtol=0, atol=1e-11)


def test_winograd_decoder_matches_direct_logits_and_gradients(monkeypatch):
    monkeypatch.setattr(decoder, "WINOGRAD_MIN_PIXELS", 0)  # the tiny maps are below the size rule
    torch.manual_seed(0)
    model = build_model(tiny_model_config("fianet", img_size=64))
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, model.config["bert"]["vocab_size"], (2, 8), generator=g)
    masks = [torch.ones(2, 8, dtype=torch.long) for _ in range(3)]
    masks[1][:, 3:] = 0
    masks[2][:, :3] = 0
    inputs = [torch.randn(2, 3, 64, 64, generator=g), ids, *masks]
    target = torch.randint(0, 2, (2, 64, 64), generator=g)
    model.eval()
    with torch.no_grad():
        ref = model(*inputs)
        assert model.classifier.winograd_tile(ref) == 4  # the default on CPU
        model.set_winograd(0)
        direct = model(*inputs)
    # float32: Winograd F(4x4, 3x3) rounds differently (~1e-5 of the map range); the fixtures'
    # logit tolerance is 1e-4.
    torch.testing.assert_close(ref, direct, rtol=0, atol=1e-4)
    assert (ref - direct).abs().max() > 0  # it really ran the other path
    model.train()
    grads = {}
    for tile in (0, 4):
        model.set_winograd(tile)
        model.zero_grad()
        torch.manual_seed(3)  # same dropout draws
        F.cross_entropy(model(*inputs), target).backward()
        grads[tile] = {n: p.grad.clone() for n, p in model.classifier.named_parameters()}
    for n in grads[0]:
        scale = grads[0][n].abs().max().item() + 1e-12
        torch.testing.assert_close(grads[4][n], grads[0][n], rtol=0, atol=1e-3 * scale, msg=n)
