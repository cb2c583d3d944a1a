"""RMSIN (lib/rmsin.py, lib/arc.py): reference fixture, sizes, gradients, rotated convolution."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from lib.arc import AdaptiveRotatedConv2d, rotate_kernels, rotation_matrix
from lib.checkpoint import extract_state_dict, load_model_state
from lib.losses import ce_dice_loss, dice_loss, weighted_cross_entropy
from lib.registry import build_model, config_from_fixture, model_config, model_spec, tiny_model_config
from lib.rmsin import RMSIN, stage_grids
from tools.check_reference import check_fixture


@pytest.fixture(scope="module")
def rmsin_fixture(fixtures_dir):
    return torch.load(fixtures_dir / "rmsin_a.pt")


def _inputs(batch: int, size: int, vocab: int, tokens: int = 8):
    g = torch.Generator().manual_seed(0)
    image = torch.randn(batch, 3, size, size, generator=g)
    text = torch.randint(3, vocab, (batch, tokens), generator=g)
    l_mask = torch.ones(batch, tokens, dtype=torch.long)
    l_mask[1:, tokens // 2:] = 0
    return image, text, l_mask


# --------------------------------------------------------------------------------------------
# Reference fixture
# --------------------------------------------------------------------------------------------
def test_fixture_matches_reference(fixtures_dir, rmsin_fixture):
    lines: list[str] = []
    (res,) = check_fixture(fixtures_dir / "rmsin_a.pt", print_fn=lines.append)
    assert res.ok, "\n".join(lines)
    assert res.model == "rmsin"
    assert res.logits[0].diff <= 1e-4
    # every stored feature (IIM branch, CIM input / block / output, decoder) is produced and compared
    n_ref = sum(len(v) if isinstance(v, list) else 1 for v in rmsin_fixture["features"].values())
    assert len(res.features) == n_ref and all(r.diff is not None for r in res.features)


def test_fixture_state_dict_loads_strictly(rmsin_fixture):
    cfg = config_from_fixture(rmsin_fixture["config"])
    assert cfg["model"] == "rmsin" and cfg["cim"]["channels"] == [16, 32, 64, 128]
    model = build_model(cfg)
    sd = rmsin_fixture["state_dict"]
    assert set(model.state_dict()) == set(sd)  # the original's key names (misspelled rounting_func, 5-D ARC weight)
    rep = load_model_state(model, extract_state_dict({"model": sd}), strict=True)
    assert rep.ok and not rep.missing and not rep.unexpected and len(rep.loaded) == len(sd)
    # the derived CIM sizes equal the original's literals at 480 px
    att = model.backbone.cim.block[0].csa1.m.attention
    assert att.grid == (15, 15) and tuple(att.proj.weight.shape) == (225, 314)
    assert tuple(model.classifier.conv2_4.weight.shape) == (1, 64, 64, 3, 3)
    assert model.classifier.upsample == "scale"


# --------------------------------------------------------------------------------------------
# Other input sizes (everything the original hard-codes for 480 px is derived)
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("size, grids, tokens, upsample", [
    (160, [(40, 40), (20, 20), (10, 10), (5, 5)], 25 + 9 + 4, "scale"),
    (104, [(26, 26), (13, 13), (7, 7), (4, 4)], 16 + 4 + 4, "size"),  # 13 -> 7 does not double
])
def test_other_input_sizes(size, grids, tokens, upsample):
    assert stage_grids(size) == grids
    cfg = tiny_model_config("rmsin", img_size=size)
    model = build_model(cfg).eval()
    att = model.backbone.cim.block[0].csa2.m.attention
    assert att.grid == grids[-1] and tuple(att.proj.weight.shape) == (grids[-1][0] * grids[-1][1], tokens)
    assert model.classifier.upsample == upsample
    image, text, l_mask = _inputs(2, size, cfg["bert"]["vocab_size"])
    with torch.no_grad():
        logits, feats = model(image, text, l_mask, return_features=True)
    assert logits.shape == (2, 2, size, size) and torch.isfinite(logits).all()
    assert feats["classifier.output"].shape == (2, 2, *grids[0])
    e = cfg["swin"]["embed_dim"]
    assert [tuple(t.shape) for t in feats["backbone.output"]] == [(2, e * 2 ** i, *grids[i]) for i in range(4)]
    assert feats["backbone.cim.block.0"].shape == (2, 15 * e // 4, *grids[-1])
    assert feats["backbone.layers.3.visual_residual"].shape == (2, grids[-1][0] * grids[-1][1], 8 * e)
    # the model runs at the size it was built for, and says so otherwise
    with pytest.raises(ValueError, match="last-stage grid"):
        with torch.no_grad():
            model(_inputs(2, 2 * size, cfg["bert"]["vocab_size"])[0], text, l_mask)


def test_model_config_defaults():
    """`model_config('rmsin')` gives the reference layout (Swin-B, window 12 from the weights
    name, CIM on [128, 256, 512, 1024], one CIM block, one rotated kernel), and it builds."""
    cfg = model_config("rmsin", pretrained_swin="pretrained_weights/swin_base_patch4_window12_384_22k.pth",
                       bert=tiny_model_config("rmsin")["bert"])
    assert cfg["swin"]["window_size"] == 12 and cfg["img_size"] == 480
    assert cfg["cim"] == {"channels": [128, 256, 512, 1024], "num_blocks": 1, "mlp_ratio": 2, "key_dim": 32,
                          "num_heads": 8, "attn_ratio": 2}
    assert cfg["arc"] == {"kernel_number": 1}
    assert stage_grids(cfg["img_size"])[-1] == (15, 15)
    assert model_spec("rmsin").recipe("rrsisd").lr == 3e-5
    # building the full Swin-B model takes seconds and a GB; build it with tiny widths instead
    small = model_config("rmsin", swin_overrides={"embed_dim": 8, "depths": [1, 1, 1, 1], "num_heads": [1, 1, 1, 1]},
                         window_size=7, img_size=64, bert=cfg["bert"])
    model = build_model(small)
    assert isinstance(model, RMSIN) and model.config["model"] == "rmsin"


def test_loss_is_ce_plus_dice():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 2, 8, 8, generator=g)
    target = torch.randint(0, 2, (2, 8, 8), generator=g)
    loss = ce_dice_loss(logits, target)
    expected = 0.9 * weighted_cross_entropy(logits, target) + 0.1 * dice_loss(logits, target)
    assert torch.allclose(loss, expected)
    # Dice by hand: softmax, one-hot of both classes, summed over batch and classes
    p = logits.softmax(1)
    t = F.one_hot(target, 2).permute(0, 3, 1, 2).float()
    dice = (1 - (2 * (p * t).sum((2, 3)) + 1e-6) / (p.sum((2, 3)) + t.sum((2, 3)) + 1e-6)).sum()
    ce = F.cross_entropy(logits, target, weight=torch.tensor([0.9, 1.1]))
    assert torch.allclose(loss, 0.9 * ce + 0.1 * dice, atol=1e-6)


# --------------------------------------------------------------------------------------------
# Training step: gradients
# --------------------------------------------------------------------------------------------
UNUSED = sorted(
    [f"backbone.layers.3.res_gate.{i}.weight" for i in (0, 2)]
    + [f"backbone.layers.3.visual_gate.{i}.weight" for i in (0, 2)]
    + [f"backbone.layers.3.visual_residual.repblock.{branch}{suffix}.{p}"
       for suffix in ("", "_2")
       for branch, params in (("brb_3x3", ("conv1.weight", "bn1.weight", "bn1.bias", "conv2.weight", "bn2.weight",
                                           "bn2.bias")),
                              ("brb_1x1", ("conv.weight", "bn.weight", "bn.bias")),
                              ("brb_identity", ("weight", "bias")))
       for p in params]
)


def test_training_step_gradients():
    torch.manual_seed(0)
    cfg = tiny_model_config("rmsin", img_size=96)
    model = build_model(cfg).train()
    assert len(UNUSED) == 26 and sorted(model.unused_parameter_names()) == UNUSED
    dead_bn = model.backbone.layers[3].visual_residual.repblock.brb_identity
    stats_before = dead_bn.running_mean.clone()
    image, text, l_mask = _inputs(2, 96, cfg["bert"]["vocab_size"])
    target = torch.zeros(2, 96, 96, dtype=torch.long)
    target[:, 20:60, 30:70] = 1
    loss = sum(model.loss(model(image, text, l_mask), {"target": target}).values())
    loss.backward()
    params = dict(model.named_parameters())
    no_grad = sorted(n for n, p in params.items() if p.grad is None)
    assert no_grad == UNUSED
    # A 1-channel 1x1 conv feeding a training-mode BatchNorm is scale-invariant: its true gradient
    # is exactly 0 and only float rounding decides whether ~1e-11 or 0 comes out, so skip those.
    scale_invariant = (".brb_3x3.conv1.", ".brb_3x3_2.conv1.", ".brb_1x1.conv.", ".brb_1x1_2.conv.")
    zero = [n for n, p in params.items() if p.grad is not None and not p.grad.abs().sum() > 0
            and not n.startswith("text_encoder.embeddings")  # unused vocabulary rows are legitimately zero
            and not any(k in n for k in scale_invariant)]
    assert zero == []
    for name in ("classifier.conv2_2.weight", "classifier.conv2_4.rounting_func.fc_theta.weight",
                 "classifier.conv2_3.rounting_func.dwc.weight", "backbone.cim.block.0.csa1.m.attention.proj.weight",
                 "backbone.layers.2.visual_residual.repblock.brb_3x3_2.conv2.weight"):
        assert params[name].grad.abs().sum() > 0, name
    # the dead stage-4 IIM branch still updates its BatchNorm statistics, as in the reference
    assert not torch.equal(dead_bn.running_mean, stats_before)


# --------------------------------------------------------------------------------------------
# Adaptive rotated convolution
# --------------------------------------------------------------------------------------------
def _bilinear_rotated_kernel(kernel: torch.Tensor, theta: float) -> torch.Tensor:
    """Independent construction of the rotated 3x3 kernel: output position (r, c) (offsets in
    {-1, 0, 1}) samples the input kernel bilinearly at the rotated position
    (r cos t + c sin t, -r sin t + c cos t), clamped into the kernel's square (corners fall outside
    it and are pulled back onto its border)."""
    k = kernel.double()
    out = torch.zeros_like(k)
    cos, sin = math.cos(theta), math.sin(theta)
    for r in (-1, 0, 1):
        for c in (-1, 0, 1):
            rr = min(1.0, max(-1.0, r * cos + c * sin)) + 1  # index space [0, 2]
            cc = min(1.0, max(-1.0, -r * sin + c * cos)) + 1
            r0, c0 = min(int(math.floor(rr)), 1), min(int(math.floor(cc)), 1)
            fr, fc = rr - r0, cc - c0
            out[..., r + 1, c + 1] = ((1 - fr) * (1 - fc) * k[..., r0, c0] + (1 - fr) * fc * k[..., r0, c0 + 1]
                                      + fr * (1 - fc) * k[..., r0 + 1, c0] + fr * fc * k[..., r0 + 1, c0 + 1])
    return out


ANGLES = [0.0, math.radians(40.0), -math.radians(40.0)]


@pytest.mark.parametrize("theta", ANGLES + [math.radians(17.0), -math.radians(3.0)])
def test_rotation_matrix_is_bilinear_rotation(theta):
    # Column q of R is the rotated image of the unit kernel e_q.
    eye = torch.eye(9).view(9, 3, 3)
    expected = torch.stack([_bilinear_rotated_kernel(e, theta).flatten() for e in eye], dim=1)
    got = rotation_matrix(torch.tensor(theta, dtype=torch.float64))
    assert torch.allclose(got, expected, atol=1e-12)


def test_rotation_table_hand_values():
    """Entries of R(40deg) / R(-40deg) evaluated by hand from the table of rmsin.md §4.3."""
    t = math.radians(40.0)
    x, y = math.cos(t), math.sin(t)
    pos = rotation_matrix(torch.tensor(t, dtype=torch.float64))
    assert pos[0, 0].item() == pytest.approx(x - y) and pos[0, 1].item() == pytest.approx(1 - x + y)
    assert pos[1, 4].item() == pytest.approx(1 - (x + y) + x * y) and pos[5, 8].item() == pytest.approx(x * y)
    neg = rotation_matrix(torch.tensor(-t, dtype=torch.float64))
    xn, yn = math.cos(-t), math.sin(-t)
    assert neg[0, 0].item() == pytest.approx(xn + yn) and neg[0, 3].item() == pytest.approx(1 - xn - yn)
    assert neg[7, 8].item() == pytest.approx(-xn * yn) and neg[3, 7].item() == pytest.approx(xn * yn - yn)
    assert torch.equal(rotation_matrix(torch.tensor(0.0)), torch.eye(9))
    assert torch.allclose(pos.sum(1), torch.ones(9, dtype=torch.float64))  # interpolation weights sum to 1


def test_rotate_kernels_matches_direct_rotation():
    g = torch.Generator().manual_seed(3)
    weight = torch.randn(2, 4, 3, 3, 3, generator=g)  # kernel_number 2, C_out 4, C_in 3
    theta = torch.tensor([[ANGLES[0], ANGLES[1]], [ANGLES[2], ANGLES[1]], [ANGLES[1], ANGLES[2]]])
    alpha = torch.tensor([[1.0, 0.5], [0.25, 0.75], [0.6, 0.1]])
    got = rotate_kernels(weight, alpha, theta).view(3, 4, 3, 3, 3)
    for b in range(3):
        expected = sum(alpha[b, k].double() * _bilinear_rotated_kernel(weight[k], theta[b, k].item())
                       for k in range(2))
        assert torch.allclose(got[b].double(), expected, atol=1e-5)


def test_arc_grouped_conv_equals_per_sample_loop():
    torch.manual_seed(0)
    conv = AdaptiveRotatedConv2d(6, 5, 3, padding=1).eval()
    with torch.no_grad():  # large routing weights so the angles are far from 0
        conv.rounting_func.fc_theta.weight.normal_(0, 3.0)
    x = torch.randn(3, 6, 9, 7)
    with torch.no_grad():
        out = conv(x)
        alpha, theta = conv.rounting_func(x)
        assert alpha.shape == theta.shape == (3, 1)
        assert (theta.abs() < math.radians(40)).all() and theta.abs().max() > math.radians(5)
        for b in range(3):
            kernel = (alpha[b, 0].double() * _bilinear_rotated_kernel(conv.weight[0], theta[b, 0].item())).float()
            ref = F.conv2d(x[b:b + 1], kernel, padding=1)
            assert torch.allclose(out[b:b + 1], ref, atol=1e-5)
    assert out.shape == (3, 5, 9, 7)


def test_arc_rejects_other_kernel_sizes():
    with pytest.raises(ValueError, match="3"):
        AdaptiveRotatedConv2d(4, 4, 5, padding=2)
