"""Model-level behaviour: registry, shapes, gradients, padding invariance, fast paths, losses."""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from lib.losses import ce_dice_loss, dice_loss, weighted_cross_entropy
from lib.registry import (
    SWIN_TYPES,
    UnknownModelError,
    available_models,
    build_model,
    model_config,
    model_spec,
    tiny_model_config,
)

VOCAB = 128


def _inputs(b=2, n=12, h=48, w=48, seed=0):
    g = torch.Generator().manual_seed(seed)
    img = torch.randn(b, 3, h, w, generator=g)
    ids = torch.randint(1, VOCAB, (b, n), generator=g)
    l_mask = torch.ones(b, n, dtype=torch.long)
    l_mask[1, n // 2:] = 0
    ids[1, n // 2:] = 0
    t_mask = torch.zeros_like(l_mask)
    t_mask[0, 2:4] = 1  # sample 1: all-zero object mask, as the reference pipeline can produce
    p_mask = torch.zeros_like(l_mask)
    p_mask[0, 4:7] = 1
    p_mask[1] = l_mask[1]
    return img, ids, l_mask, t_mask, p_mask


def _model(name, **kw):
    torch.manual_seed(0)
    return build_model(tiny_model_config(name, **kw))


def test_registry_names_and_errors():
    assert {"lavt", "lavt_one", "fianet"} <= set(available_models())
    with pytest.raises(UnknownModelError, match="valid names: lavt, lavt_one, fianet"):
        model_config("nope")
    with pytest.raises(ValueError, match="swin_type"):
        model_config("lavt", swin_type="huge")
    with pytest.raises(ValueError, match="mha"):
        model_config("lavt", mha="4-4")


def test_model_config_reference_defaults():
    cfg = model_config("fianet", pretrained_swin="x/swin_base_patch4_window12_384_22k.pth", num_tmem=3, mha="4-4-4-4")
    assert json.loads(json.dumps(cfg)) == cfg  # plain data
    s = cfg["swin"]
    assert (s["embed_dim"], s["depths"], s["num_heads"], s["window_size"]) == (128, [2, 2, 18, 2], [4, 8, 16, 32], 12)
    assert s["drop_path_rate"] == 0.3 and s["mlp_ratio"] == 4.0
    assert cfg["fusion"]["num_heads"] == [4, 4, 4, 4] and cfg["l_in"] == 768
    assert cfg["decoder"]["c4_dims"] == 1024 and cfg["num_tmem"] == 3
    assert cfg["tmem"]["channels"] == [128, 256, 512, 1024]
    assert cfg["bert"]["num_hidden_layers"] == 12
    assert model_config("lavt")["swin"]["window_size"] == 7
    assert model_config("lavt", window_size=12)["swin"]["window_size"] == 12
    assert model_config("lavt", swin_type="large")["decoder"]["c4_dims"] == 1536


@pytest.mark.parametrize("name", ["lavt", "lavt_one", "fianet"])
def test_build_and_forward_each_model(name):
    model = _model(name).eval()
    assert model.config["model"] == name
    assert model.spec.text.word_masks == (name == "fianet")
    with torch.no_grad():
        out = model(*_inputs())
    assert out.shape == (2, 2, 48, 48) and torch.isfinite(out).all()


@pytest.mark.parametrize("swin_type", list(SWIN_TYPES))
def test_shapes_every_swin_type(swin_type):
    """Each type's depth and head pattern, at 8 channels per head; input not divisible by 32."""
    t = SWIN_TYPES[swin_type]
    over = {"embed_dim": 8 * t["num_heads"][0], "depths": t["depths"], "num_heads": t["num_heads"]}
    model = _model("lavt_one", swin_type=swin_type, swin_overrides=over).eval()
    img, ids, lm, _, _ = _inputs(h=100, w=120)
    with torch.no_grad():
        logits, feats = model(img, ids, lm, return_features=True)
    assert logits.shape == (2, 2, 100, 120)
    e = over["embed_dim"]
    sizes = [(25, 30), (13, 15), (7, 8), (4, 4)]
    for i, m in enumerate(feats["backbone.output"]):
        assert m.shape == (2, e * 2 ** i, *sizes[i])
    assert feats["classifier.output"].shape == (2, 2, 25, 30)


def test_window12_and_odd_sizes():
    model = _model("lavt", window_size=12).eval()
    with torch.no_grad():
        out = model(*_inputs(h=72, w=52)[:3])
    assert out.shape == (2, 2, 72, 52)


def _train_step(model, name):
    model.train()
    model.zero_grad()
    img, ids, lm, tm, pm = _inputs()
    out = model(img, ids, lm, tm, pm)
    target = torch.randint(0, 2, (2, 48, 48), generator=torch.Generator().manual_seed(1))
    sum(model.loss(out, {"target": target}).values()).backward()


@pytest.mark.parametrize("name,n_unused", [("lavt_one", 2), ("fianet", 29)])
def test_unused_parameters_get_no_gradient_all_others_do(name, n_unused):
    model = _model(name)
    unused = model.unused_parameter_names()
    assert len(unused) == n_unused and len(set(unused)) == n_unused
    _train_step(model, name)
    no_grad = {n for n, p in model.named_parameters() if p.grad is None}
    assert no_grad == set(unused)
    if name == "fianet":
        assert all("go_embedding" in n or ".layers.3." in n for n in unused)
    else:
        assert all(n.startswith("backbone.layers.3.res_gate.") for n in unused)


def test_lavt_variant_keeps_bert_in_eval_mode():
    lavt, one = _model("lavt"), _model("lavt_one")
    lavt.train()
    one.train()
    assert lavt.backbone.training and not lavt.text_encoder.training
    assert one.text_encoder.training


def test_padding_invariance():
    """Changing the ids at padded positions, or appending more padding, changes nothing."""
    model = _model("fianet").eval()
    img, ids, lm, tm, pm = _inputs()
    ids2 = ids.clone()
    ids2[1, 6:] = torch.randint(1, VOCAB, (6,))
    with torch.no_grad():
        a = model(img, ids, lm, tm, pm)
        b = model(img, ids2, lm, tm, pm)
        pad = lambda t: F.pad(t, (0, 5))  # noqa: E731
        c = model(img, pad(ids), pad(lm), pad(tm), pad(pm))
    assert torch.equal(a, b)
    assert (a - c).abs().max() < 1e-5


def test_samples_are_independent():
    model = _model("lavt_one").eval()
    img, ids, lm, _, _ = _inputs()
    ids2 = ids.clone()
    ids2[1, 2] = (ids2[1, 2] % (VOCAB - 1)) + 1
    with torch.no_grad():
        a, b = model(img, ids, lm), model(img, ids2, lm)
    assert torch.equal(a[0], b[0]) and not torch.equal(a[1], b[1])


def test_fianet_batched_text_equals_three_calls():
    model = _model("fianet").eval()
    x = _inputs()
    with torch.no_grad():
        a, fa = model(*x, return_features=True)
        model.config["batched_text"] = False
        b, fb = model(*x, return_features=True)
    for k in ("l", "t", "p"):
        assert (fa[f"text_encoder.{k}_feats"] - fb[f"text_encoder.{k}_feats"]).abs().max() <= 1e-6
    assert (a - b).abs().max() <= 1e-6


def test_fused_attention_model_equals_plain():
    model = _model("fianet").eval()
    x = _inputs(h=100, w=120)
    with torch.no_grad():
        a = model(*x)
        model.set_fast_paths(False)
        b = model(*x)
    assert (a - b).abs().max() < 1e-5


def test_grad_ckpt_model_gradients_identical():
    grads = []
    for flag in (False, True):
        model = _model("lavt_one", grad_ckpt=flag)
        model.eval()  # no dropout: compare the pure computation
        for p in model.parameters():
            p.grad = None
        img, ids, lm, _, _ = _inputs()
        model(img, ids, lm).square().mean().backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for k in grads[0]:
        assert torch.equal(grads[0][k], grads[1][k]), k


def test_autocast_bf16_forward_close():
    model = _model("fianet").eval()
    x = _inputs()
    with torch.no_grad():
        ref = model(*x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(*x)
    assert torch.isfinite(out).all()
    assert (out.float() - ref).abs().max() < 0.1 * ref.abs().max()


def test_autocast_bf16_training_step():
    model = _model("fianet")
    model.train()
    img, ids, lm, tm, pm = _inputs()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(img, ids, lm, tm, pm)
        loss = sum(model.loss(out, {"target": torch.zeros(2, 48, 48, dtype=torch.long)}).values())
    assert loss.dtype == torch.float32
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


# ------------------------------------------------------------------------------- losses
def test_weighted_ce_by_hand():
    logits = torch.tensor([[[[2.0, -1.0]], [[0.0, 1.0]]]])  # (1, 2, 1, 2)
    target = torch.tensor([[[0, 1]]])
    nll0 = -torch.log_softmax(torch.tensor([2.0, 0.0]), 0)[0]
    nll1 = -torch.log_softmax(torch.tensor([-1.0, 1.0]), 0)[1]
    expect = (0.9 * nll0 + 1.1 * nll1) / (0.9 + 1.1)
    assert torch.allclose(weighted_cross_entropy(logits, target), expect)
    model = _model("lavt")
    assert model.loss(logits, {"target": target}) == {"ce": weighted_cross_entropy(logits, target)}


def test_dice_sums_over_batch_and_classes():
    logits = torch.zeros(3, 2, 4, 4)  # p = 0.5 everywhere
    target = torch.zeros(3, 4, 4, dtype=torch.long)
    target[:, :2] = 1  # 8 of 16 pixels foreground
    # per sample and class: inter = 0.5*8 = 4, union = 8 + 8 = 16 -> dice = (8+e)/(16+e)
    per = 1 - (8 + 1e-6) / (16 + 1e-6)
    assert torch.allclose(dice_loss(logits, target), torch.tensor(6 * per))
    total = ce_dice_loss(logits, target)
    assert torch.allclose(total, 0.9 * weighted_cross_entropy(logits, target) + 0.1 * torch.tensor(6 * per))
    terms = _model("fianet").loss(logits, {"target": target})  # the model's named terms
    assert set(terms) == {"ce", "dice"} and torch.allclose(terms["ce"] + terms["dice"], total)
    with pytest.raises(ValueError, match="unknown model"):
        model_spec("nope")


@pytest.mark.parametrize("name,kw,entries,params", [
    ("lavt_one", {}, 648, 227_739_514),
    ("fianet", {"num_tmem": 1}, 853, 251_918_706),
    ("fianet", {"num_tmem": 3}, 885, 256_168_626),
])
def test_paper_size_state_dict_layout(name, kw, entries, params):
    """Swin-B window 12 + BERT-base, built on the meta device: the originals' entry and parameter
    counts (lavt.md §9, fianet.md §8) and sample key names."""
    with torch.device("meta"):
        model = build_model(model_config(name, window_size=12, **kw))
    sd = model.state_dict()
    assert len(sd) == entries
    assert sum(p.numel() for p in model.parameters()) == params
    assert sd["backbone.layers.2.blocks.17.attn.relative_position_bias_table"].shape == (529, 16)
    assert sd["backbone.layers.3.blocks.1.attn.relative_position_index"].shape == (144, 144)
    assert sd["classifier.conv1_2.weight"].shape == (512, 640, 3, 3)
    assert "text_encoder.encoder.layer.11.output.LayerNorm.bias" in sd
    if name == "fianet":
        assert sd["backbone.tmem.down_channel.weight"].shape == (480, 1920, 1, 1)
        assert sd["backbone.tmem.block.0.ff.net.3.weight"].shape == (480, 960)
        assert sd["backbone.layers.1.object_position_align_blk.conv1.weight"].shape == (1, 2, 3, 3)
    else:
        assert sd["backbone.layers.3.res_gate.2.weight"].shape == (1024, 1024)


def test_fusion_gemm_path_equals_reference_ops():
    """PWAM / pixel-word attention: 1x1 convs as GEMMs in token layout == the reference op order
    (values and gradients), including an all-zero word mask."""
    from lib.fusion import PWAM

    torch.manual_seed(3)
    pwam = PWAM(16, 16, 24, 16, 16, num_heads=2)
    x = torch.randn(2, 30, 16, requires_grad=True)
    l = torch.randn(2, 24, 7)
    m = torch.ones(2, 7, 1, dtype=torch.long)
    m[1] = 0
    outs, grads = [], []
    for fused in (True, False):
        pwam.fused = pwam.image_lang_att.fused = fused
        x.grad = None
        y = pwam(x, l, m)
        y.square().sum().backward()
        outs.append(y.detach())
        grads.append(x.grad.clone())
    assert (outs[0] - outs[1]).abs().max() < 1e-5
    assert (grads[0] - grads[1]).abs().max() < 1e-4 * grads[1].abs().max()
