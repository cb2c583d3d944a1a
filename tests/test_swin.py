"""Multi-modal Swin pieces: windows, masks, relative positions, patch ops, fast paths."""
from __future__ import annotations

import itertools

import pytest
import torch

from lib.swin import (
    PatchEmbed,
    PatchMerging,
    SwinBlock,
    WindowAttention,
    relative_position_index,
    run_swin_blocks,
    shifted_window_mask,
    window_partition,
    window_reverse,
)


def test_relative_position_index_by_hand():
    w = 3
    idx = relative_position_index(w)
    assert idx.shape == (9, 9) and idx.dtype == torch.int64
    for p, q in itertools.product(range(9), repeat=2):
        (r1, c1), (r2, c2) = divmod(p, w), divmod(q, w)
        assert idx[p, q] == (r1 - r2 + w - 1) * (2 * w - 1) + (c1 - c2 + w - 1)


def test_window_partition_roundtrip_and_order():
    x = torch.arange(2 * 4 * 6).float().view(2, 4, 6, 1)
    win = window_partition(x, 2)
    assert win.shape == (2 * 6, 4, 1)
    # second window of image 0 = rows 0-1, cols 2-3 (row-major over windows)
    assert win[1, :, 0].tolist() == [2.0, 3.0, 8.0, 9.0]
    assert torch.equal(window_reverse(win, 2, 4, 6), x)


def _regions(n: int, w: int, s: int) -> list[int]:
    """Region id (0, 1, 2) of each padded coordinate, written independently of the library."""
    return [0 if i < n - w else (1 if i < n - s else 2) for i in range(n)]


@pytest.mark.parametrize("hp,wp,w,s", [(8, 12, 4, 2), (7, 7, 7, 3), (14, 7, 7, 3)])
def test_shift_mask_matches_regions(hp, wp, w, s):
    mask = shifted_window_mask(hp, wp, w, s)
    rows, cols = _regions(hp, w, s), _regions(wp, w, s)
    nwc = wp // w
    assert mask.shape == (hp // w * nwc, w * w, w * w)
    for n in range(mask.shape[0]):
        wr, wc = divmod(n, nwc)
        ids = [rows[wr * w + i // w] * 3 + cols[wc * w + i % w] for i in range(w * w)]
        expect = torch.tensor([[0.0 if a == b else -100.0 for b in ids] for a in ids])
        assert torch.equal(mask[n], expect)
    # a map no larger than the window still gets a (non-trivial) mask: the reference keeps the shift
    assert (shifted_window_mask(7, 7, 7, 3) != 0).any()


def test_patch_merging_order_and_odd_padding():
    pm = PatchMerging(1)
    pm.norm = torch.nn.Identity()
    pm.reduction = torch.nn.Identity()  # expose the concatenation
    x = torch.arange(1, 10).float().view(1, 9, 1)  # 3 x 3 map, values 1..9
    out = pm(x, 3, 3)
    assert out.shape == (1, 4, 4)
    # first 2x2 cell: [even/even, odd/even, even/odd, odd/odd] = [(0,0), (1,0), (0,1), (1,1)]
    assert out[0, 0].tolist() == [1.0, 4.0, 2.0, 5.0]
    # bottom-right cell lies in the zero padding except (2,2)
    assert out[0, 3].tolist() == [9.0, 0.0, 0.0, 0.0]


def test_patch_embed_pads_right_and_bottom():
    pe = PatchEmbed(4, 3, 8)
    x = torch.randn(1, 3, 10, 13)
    y = pe(x)
    assert y.shape == (1, 8, 3, 4)
    padded = torch.nn.functional.pad(x, (0, 3, 0, 2))
    assert torch.allclose(pe(padded), y)


def _block_stack(dim=16, heads=2, w=4, depth=2, fused=True, drop_path=0.0):
    torch.manual_seed(0)
    blocks = torch.nn.ModuleList(
        SwinBlock(dim, heads, w, 0 if j % 2 == 0 else w // 2, drop_path=drop_path, fused_attn=fused)
        for j in range(depth))
    for blk in blocks:  # non-trivial bias tables
        torch.nn.init.normal_(blk.attn.relative_position_bias_table, std=1.0)
    return blocks


@pytest.mark.parametrize("H,W", [(8, 8), (6, 10), (3, 3)])
def test_fused_attention_equals_plain(H, W):
    blocks = _block_stack()
    x = torch.randn(2, H * W, 16)
    with torch.no_grad():
        fused = run_swin_blocks(blocks, x, H, W)
        for blk in blocks:
            blk.attn.fused = False
        plain = run_swin_blocks(blocks, x, H, W)
    assert (fused - plain).abs().max() < 1e-5


def test_sdpa_used_for_inference_plain_for_cpu_training(monkeypatch):
    calls = []
    real = torch.nn.functional.scaled_dot_product_attention

    def counting(*a, **k):
        calls.append(1)
        return real(*a, **k)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", counting)
    blocks = _block_stack()
    x = torch.randn(1, 16, 16)
    with torch.no_grad():
        run_swin_blocks(blocks, x, 4, 4)
    assert len(calls) == 2
    run_swin_blocks(blocks, x, 4, 4).sum().backward()  # CPU + autograd: plain path
    assert len(calls) == 2


def test_window_attention_plain_is_reference_formula():
    torch.manual_seed(1)
    att = WindowAttention(8, 2, 2, fused=False)
    x = torch.randn(3, 4, 8)
    q, k, v = att.qkv(x).view(3, 4, 3, 2, 4).permute(2, 0, 3, 1, 4)
    bias = att.relative_position_bias_table[att.relative_position_index.view(-1)].view(4, 4, 2).permute(2, 0, 1)
    a = ((q * 4 ** -0.5) @ k.transpose(-2, -1) + bias).softmax(-1)
    expect = att.proj((a @ v).transpose(1, 2).reshape(3, 4, 8))
    assert torch.allclose(att(x), expect, atol=1e-6)


def test_padding_is_not_masked_in_unshifted_windows():
    """Zero-padded tokens are ordinary keys in non-shifted windows (reference behaviour): a 3x3
    map in a 4x4 window equals attention over the zero-padded (after norm1) 4x4 window."""
    torch.manual_seed(2)
    blk = SwinBlock(8, 2, 4, 0, fused_attn=False)
    x = torch.randn(1, 9, 8)
    out = blk(x, 3, 3, None)
    y = blk.norm1(x).view(1, 3, 3, 8)
    y = torch.nn.functional.pad(y, (0, 0, 0, 1, 0, 1)).view(1, 16, 8)
    att = blk.attn(y)[:, [0, 1, 2, 4, 5, 6, 8, 9, 10]]
    expect = x + att
    expect = expect + blk.mlp(blk.norm2(expect))
    assert torch.allclose(out, expect, atol=1e-6)


def test_grad_ckpt_gives_identical_gradients():
    blocks = _block_stack(drop_path=0.2)
    blocks.train()
    x = torch.randn(2, 36, 16, requires_grad=True)
    grads = []
    for ckpt in (False, True):
        blocks.zero_grad()
        x.grad = None
        torch.manual_seed(5)
        run_swin_blocks(blocks, x, 6, 6, grad_ckpt=ckpt).square().sum().backward()
        grads.append([x.grad.clone()] + [p.grad.clone() for p in blocks.parameters()])
    for a, b in zip(*grads):
        assert torch.equal(a, b)


def test_autocast_bf16_runs():
    blocks = _block_stack()
    x = torch.randn(1, 49, 16)
    ref = run_swin_blocks(blocks, x, 7, 7)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = run_swin_blocks(blocks, x, 7, 7)
    assert torch.isfinite(out).all()
    assert (out.float() - ref).abs().max() < 0.1 * ref.abs().max()


def test_swin_config_holds_the_defaults_once_and_reads_old_layouts():
    from lib.swin import SWIN_DEFAULTS, SwinConfig

    base = SwinConfig.named("base")
    assert base.to_dict() == {**SWIN_TYPES_BASE, "window_size": 7, **SWIN_DEFAULTS}
    assert SwinConfig.from_dict(base.to_dict()) == base  # the stored JSON layout round-trips
    old = {"embed_dim": 16, "depths": (2, 2, 2, 2), "num_heads": [1, 2, 4, 8], "window_size": 7}  # older, shorter
    cfg = SwinConfig.from_dict(old)
    assert cfg.drop_path_rate == 0.3 and cfg.depths == [2, 2, 2, 2]
    with pytest.raises(ValueError, match="unknown Swin option"):
        SwinConfig.from_dict({**old, "windw_size": 12})
    with pytest.raises(ValueError, match="--swin_type"):
        SwinConfig.named("huge")


SWIN_TYPES_BASE = {"embed_dim": 128, "depths": [2, 2, 18, 2], "num_heads": [4, 8, 16, 32]}
