"""CrossVLT: reference fixture, checkpoint keys, alignment loss (hand-computed), gradients, shapes,
optimiser groups, pretrained-weight loading."""
from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from lib.checkpoint import CheckpointMismatchError, extract_state_dict, load_model_state
from lib.crossvlt import CrossVLT, alignment_loss, similarity_map
from lib.registry import build_model, config_from_fixture, model_config, tiny_model_config
from tools.check_reference import check_fixture

FIXTURE = "crossvlt_a.pt"


@pytest.fixture(scope="module")
def fixture(fixtures_dir):
    return torch.load(fixtures_dir / FIXTURE)


@pytest.fixture(scope="module")
def fixture_model(fixture):
    """(model, load report): built from the fixture config, loaded strictly through lib.checkpoint."""
    model = build_model(config_from_fixture(fixture["config"])).eval()
    rep = load_model_state(model, extract_state_dict(fixture["state_dict"]), strict=True)
    return model, rep


def _tiny(**kw) -> CrossVLT:
    torch.manual_seed(0)
    kw.setdefault("bert_layers_per_stage", [1, 1, 1, 1])
    return build_model(tiny_model_config("crossvlt", **kw))


def _inputs(b=2, n=10, h=72, w=88, seed=0):
    g = torch.Generator().manual_seed(seed)
    img = torch.randn(b, 3, h, w, generator=g)
    ids = torch.randint(1, 100, (b, n), generator=g)
    mask = torch.ones(b, n, dtype=torch.long)
    mask[1, n // 2:] = 0
    ids[1, n // 2:] = 0
    target = (torch.rand(b, h, w, generator=g) > 0.6).long()
    return img, ids, mask, target


# --------------------------------------------------------------------------------------------
# Reference fixture
# --------------------------------------------------------------------------------------------
def test_fixture_matches_reference(fixtures_dir, fixture):
    lines: list[str] = []
    (res,) = check_fixture(fixtures_dir / FIXTURE, print_fn=lines.append)
    assert res.ok, "\n".join(lines)
    assert res.model == "crossvlt" and res.logits[0].diff <= 1e-4
    # every stored feature (language stages, every vision stage, decoder) is produced and compared
    n_ref = sum(len(v) if isinstance(v, list) else 1 for v in fixture["features"].values())
    assert len(res.features) == n_ref and all(r.diff is not None for r in res.features)


def test_fixture_plain_attention_path_and_padding(fixture, fixture_model):
    """With the reference's window-attention op order the logits match within the fixture's stored
    tolerance (1e-4; not bit for bit across CPUs and thread counts: the reference's own 1- vs
    2-thread noise is 3.3e-6); changing padded token ids changes nothing (same machine, exact)."""
    model, _ = fixture_model
    inp = fixture["inputs"]
    model.set_fast_paths(False)
    try:
        with torch.no_grad():
            logits = model(inp["image"].float(), inp["text"], inp["l_mask"])
            text = inp["text"][1:].clone()
            text[0, inp["l_mask"][1] == 0] = 7
            a = model(inp["image"][1:].float(), inp["text"][1:], inp["l_mask"][1:])
            b = model(inp["image"][1:].float(), text, inp["l_mask"][1:])
    finally:
        model.set_fast_paths(True)
    assert (logits - fixture["outputs"]).abs().max() <= fixture["tolerance"]["outputs"]
    assert torch.equal(a, b)


def test_fixture_state_dict_keys_are_the_originals(fixture, fixture_model):
    model, rep = fixture_model
    assert set(model.state_dict()) == set(fixture["state_dict"])  # no `temp`, no pooler, no extra BERT layers
    assert rep.ok and not rep.missing and not rep.unexpected and len(rep.loaded) == len(fixture["state_dict"])
    # a reference TRAINING state_dict has `temp` on top: not one of our keys, declared for loaders
    with pytest.raises(CheckpointMismatchError, match="temp"):
        load_model_state(model, {**fixture["state_dict"], "temp": torch.ones(4)}, strict=True)
    assert model.checkpoint_ignored_keys == ("temp",)


def test_fixture_config_conversion(fixture):
    cfg = config_from_fixture(fixture["config"])
    assert json.loads(json.dumps(cfg)) == cfg
    assert cfg["model"] == "crossvlt" and cfg["swin"]["embed_dim"] == 32 and cfg["swin"]["window_size"] == 7
    assert cfg["bert_layers_per_stage"] == [1, 0, 0, 0]
    assert [c["num_hidden_layers"] for c in cfg["bert_stage_configs"]] == [1, 0, 0, 0]
    assert cfg["decoder"] == {"c4_dims": 256, "factor": 2}
    bad = json.loads(json.dumps(fixture["config"]))
    bad["bert_stage_configs"][2]["vision_dim"] = 999
    with pytest.raises(ValueError, match="vision_dim"):
        config_from_fixture(bad)


# --------------------------------------------------------------------------------------------
# Alignment loss
# --------------------------------------------------------------------------------------------
def _bce(z: float, y: float) -> float:
    """BCE with logits by hand: -y log s(z) - (1 - y) log(1 - s(z))."""
    s = 1 / (1 + math.exp(-z))
    return -(y * math.log(s) + (1 - y) * math.log(1 - s))


def test_similarity_map_hand_computed():
    # two pixels (H=1, W=2) with 2-d projections; [CLS] (0, 2)
    x_proj = torch.tensor([[[3.0, 4.0], [1.0, 0.0]]])
    cls = torch.tensor([[0.0, 2.0]])
    s = similarity_map(x_proj, cls, 1, 2)
    assert s.shape == (1, 1, 1, 2)
    assert torch.allclose(s, torch.tensor([[[[0.8, 0.0]]]]), atol=1e-7)  # cos = 4/5 and 0


def test_alignment_loss_hand_computed():
    """Maps (0.8, 0.0) on a 1x2 grid, target 1x3 (1, 1, 0): align_corners upsampling gives logits
    (0.8, 0.4, 0.0) / tau; mean BCE per map; weighted sum over the maps."""
    s = torch.tensor([[[[0.8, 0.0]]]])
    target = torch.tensor([[[1, 1, 0]]])

    def mean_bce(tau):
        return sum(_bce(z / tau, y) for z, y in ((0.8, 1), (0.4, 1), (0.0, 0))) / 3

    assert mean_bce(1.0) == pytest.approx((0.371101 + 0.513015 + 0.693147) / 3, abs=1e-6)
    temp = torch.tensor([1.0, 0.5, 1.0, 2.0])
    got = alignment_loss([s] * 4, target, temp)
    want = mean_bce(1.0) + mean_bce(0.5) + mean_bce(1.0) + mean_bce(2.0)
    assert got.item() == pytest.approx(want, abs=1e-6)
    got_w = alignment_loss([s] * 4, target, temp, weights=(0.0, 2.0, 0.0, 1.0))
    assert got_w.item() == pytest.approx(2 * mean_bce(0.5) + mean_bce(2.0), abs=1e-6)
    assert got.dtype == torch.float32 and got.dim() == 0


def test_model_alignment_loss_follows_the_formula():
    """The model's loss = sum_i BCE(upsample(cos(proj_i(tokens), proj(CLS_i)) / 1), target) with the
    maps at the real stage sizes and the target's size (not 480)."""
    model = _tiny().eval()
    img, ids, mask, target = _inputs()
    with torch.no_grad():
        logits, loss, feats = model(img, ids, mask, target=target, return_features=True)
    words = [feats[f"lang_stage{k}.sequence_output"] for k in (1, 2, 3, 4)]
    clss = [model.lang_stage1.encoder.proj(words[0][:, 0])] + \
           [getattr(model, f"lang_stage{k}").proj(words[k - 1][:, 0]) for k in (2, 3, 4)]
    want = 0.0
    for i, (h, w) in enumerate([(18, 22), (9, 11), (5, 6), (3, 3)]):
        xp = feats[f"backbone.{i}.x_proj"]
        cos = F.cosine_similarity(xp, clss[i][:, None, :], dim=-1).view(2, 1, h, w)
        assert torch.allclose(feats["similarity_maps"][i], cos, atol=1e-6)
        up = F.interpolate(cos, size=(72, 88), mode="bilinear", align_corners=True).squeeze(1)
        want += F.binary_cross_entropy_with_logits(up, target.float()).item()
    assert loss.item() == pytest.approx(want, rel=1e-5)
    assert torch.equal(model.temp, torch.ones(4)) and "temp" not in model.state_dict()


def test_alignment_parameters_receive_gradients():
    model = _tiny().train()
    img, ids, mask, target = _inputs()
    logits, aux = model(img, ids, mask, target=target)
    aux.backward()
    align = [f"backbone.{i}.layers.proj.weight" for i in range(4)] + ["lang_stage1.encoder.proj.weight"] + \
            [f"lang_stage{k}.proj.weight" for k in (2, 3, 4)]
    params = dict(model.named_parameters())
    for name in align:
        g = params[name].grad
        assert g is not None and g.abs().sum() > 0, name


def test_training_step_gradients_and_dead_parameters():
    """Full reference loss 2 * CE_w + alignment: exactly the listed dead parameters get no gradient."""
    model = _tiny().train()
    img, ids, mask, target = _inputs()
    logits, aux = model(img, ids, mask, target=target)
    loss = 2 * F.cross_entropy(logits, target, weight=torch.tensor([0.9, 1.1])) + aux
    loss.backward()
    no_grad = sorted(n for n, p in model.named_parameters() if p.grad is None)
    assert no_grad == sorted(model.dead_parameter_names()) == \
        ["backbone.3.layers.linear1.0.weight", "backbone.3.layers.linear1.2.weight"]
    unused = set(model.unused_parameter_names())
    assert {n for n in unused if n.startswith("lang_stage1.embeddings.")} == \
        {f"lang_stage1.embeddings.{n}" for n, _ in model.lang_stage1.embeddings.named_parameters()}


def test_learnable_temperature_option():
    model = _tiny(learnable_temperature=True).train()
    assert "temp" in model.state_dict() and isinstance(model.temp, torch.nn.Parameter)
    img, ids, mask, target = _inputs()
    _, aux = model(img, ids, mask, target=target)
    aux.backward()
    assert model.temp.grad is not None and model.temp.grad.abs().sum() > 0
    assert any(g["params"] == [model.temp] and g["weight_decay"] == 0.0 for g in model.parameter_groups(0.01))


# --------------------------------------------------------------------------------------------
# Shapes, contract, registry
# --------------------------------------------------------------------------------------------
def test_output_shapes_at_a_non_480_size():
    model = _tiny()
    img, ids, mask, target = _inputs(h=72, w=88)
    for train in (True, False):
        model.train(train)
        with torch.no_grad():
            out = model(img, ids, mask)  # no target: logits only, in both modes
        assert isinstance(out, torch.Tensor) and out.shape == (2, 2, 72, 88)
    with torch.no_grad():
        logits, aux, feats = model(img, ids, mask, target=target, return_features=True)
    assert logits.shape == (2, 2, 72, 88) and aux.dim() == 0 and torch.isfinite(aux)
    assert [tuple(s.shape) for s in feats["similarity_maps"]] == [(2, 1, 18, 22), (2, 1, 9, 11), (2, 1, 5, 6), (2, 1, 3, 3)]
    assert feats["backbone.0.out"].shape == (2, 16, 18, 22) and feats["backbone.3.out"].shape == (2, 128, 3, 3)
    assert feats["lang_stage4.sequence_output"].shape == (2, 10, 32)


def test_model_config_and_build():
    cfg = model_config("crossvlt", swin_type="tiny", swin_overrides={"depths": [1, 1, 1, 1]},
                       bert={"hidden_size": 64, "num_attention_heads": 2, "intermediate_size": 64,
                             "vocab_size": 100, "max_position_embeddings": 32})
    assert json.loads(json.dumps(cfg)) == cfg
    assert cfg["bert_layers_per_stage"] == [6, 1, 1, 1]  # 6 + 1 + 1 + 1, the reference code's split
    assert cfg["alignment"]["learnable_temperature"] is False
    model = build_model(cfg)
    keys = model.state_dict().keys()
    assert "lang_stage1.encoder.layer.5.output.LayerNorm.weight" in keys
    assert not any(k.startswith("lang_stage1.encoder.layer.6.") for k in keys)
    assert model.lang_stage2.crossattention.self.key.weight.shape == (64, 192)  # vision_dim = 2 * 96
    assert model.lang_stage4.crossattention.self.value.weight.shape == (64, 768)
    assert model.backbone[0].layers.attn1.v_q[0].weight.shape == (192, 96, 1)  # stage-0 attn1 inner width 2C
    assert not hasattr(model.backbone[3].layers, "attn2")
    with pytest.raises(ValueError, match="bert_layers_per_stage"):
        model_config("crossvlt", bert_layers_per_stage=[6, 1, 1])


def test_parameter_groups_follow_the_reference():
    model = _tiny()
    groups = model.parameter_groups(0.01)
    assert len(groups) == 7
    ids = [id(p) for g in groups for p in g["params"]]
    assert len(ids) == len(set(ids))  # no parameter twice
    names = {id(p): n for n, p in model.named_parameters()}
    skipped = {n for n, p in model.named_parameters() if id(p) not in set(ids)}
    assert skipped == set(model.not_optimized_parameter_names())  # the L1 embeddings only
    no_decay = [names[id(p)] for p in groups[0]["params"]]
    assert groups[0]["weight_decay"] == 0.0 and all(g["weight_decay"] == 0.01 for g in groups[1:])
    assert all(n.startswith("backbone.") and ("norm" in n or "relative_position_bias_table" in n) for n in no_decay)
    assert "backbone.0.norm0.weight" in no_decay and "backbone.1.layers.blocks.0.attn.relative_position_bias_table" in no_decay
    assert [names[id(groups[k]["params"][0])].split(".")[0] for k in range(2, 7)] == \
        ["classifier", "lang_stage1", "lang_stage2", "lang_stage3", "lang_stage4"]


# --------------------------------------------------------------------------------------------
# One backbone: CrossVLT's vision stages are ordinary MultiModalSwin stages
# --------------------------------------------------------------------------------------------
def test_vision_side_is_the_shared_multimodal_swin():
    """No forked stage loop: the shared forward runs the stages; parameter names are the original
    state_dict keys; the language stage run after PatchMerging is linked, not owned (a deep copy
    links the copy's own stage)."""
    import copy

    from lib.crossvlt import CrossAwareLayer
    from lib.swin import MultiModalStage, MultiModalSwin

    model = _tiny()
    bb = model.backbone
    assert isinstance(bb, MultiModalSwin) and type(bb).forward_with_text is MultiModalSwin.forward_with_text
    assert len(bb.layers) == 4 and all(type(layer) is CrossAwareLayer for layer in bb.layers)
    assert CrossAwareLayer.forward is MultiModalStage.forward
    assert bb.patch_embed is bb[0].patch_embed and bb.norm2 is bb[2].norm2 and bb.layers[1] is bb[1].layers
    params = [n for n, _ in model.named_parameters()]
    buffers = {n for n, _ in model.named_buffers()}
    assert [k for k in model.state_dict() if k not in buffers] == params
    assert not any(k.startswith("backbone.") and "lang_stage" in k for k in model.state_dict())
    twin = copy.deepcopy(model)
    for i in range(3):
        (lang,) = twin.backbone.layers[i]._next_language
        assert lang is getattr(twin, f"lang_stage{i + 2}") and lang is not getattr(model, f"lang_stage{i + 2}")


def test_language_stage_attends_to_the_merged_and_fused_tokens():
    """L_{i+2} (run in vision stage i's after-merge hook) = lang_stage(words of L_{i+1}, text mask,
    the gated merged tokens that vision stage i hands to stage i+1)."""
    model = _tiny().eval()
    img, ids, mask, _ = _inputs()
    with torch.no_grad():
        _, feats = model(img, ids, mask, return_features=True)
        ext_mask = (1.0 - mask[:, None, None, :].float()) * -10000.0
        for k in (2, 3, 4):
            want = getattr(model, f"lang_stage{k}")(feats[f"lang_stage{k - 1}.sequence_output"], ext_mask,
                                                    feats[f"backbone.{k - 2}.x_next"])
            assert torch.allclose(feats[f"lang_stage{k}.sequence_output"], want, atol=1e-5), k
    assert feats["backbone.1.x_next"].shape == (2, 5 * 6, 64)  # merged to (9+1)/2 x (11+1)/2, width 2C
    assert "backbone.layers.0.x_residual" not in feats and "backbone.patch_embed" not in feats


def test_grad_ckpt_gives_the_same_training_step():
    img, ids, mask, target = _inputs()
    grads = []
    for flag in (False, True):
        model = _tiny().train()
        model.set_grad_ckpt(flag)
        assert all(layer.grad_ckpt is flag for layer in model.backbone.layers)
        torch.manual_seed(4)  # the same drop-path / dropout draws
        logits, aux = model(img, ids, mask, target=target)
        (F.cross_entropy(logits, target) + aux).backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for n, g in grads[0].items():
        assert torch.allclose(g, grads[1][n], rtol=1e-4, atol=1e-5), n


# --------------------------------------------------------------------------------------------
# Pretrained weights
# --------------------------------------------------------------------------------------------
def test_load_pretrained_swin_key_mapping(tmp_path):
    """Official Swin layout: patch_embed.* -> backbone.0.patch_embed.*, layers.i.* ->
    backbone.i.layers.*; head / final norm / attn_mask ignored."""
    model = _tiny()
    g = torch.Generator().manual_seed(1)
    swin = {}
    for k, v in model.state_dict().items():
        parts = k.split(".")
        if k.startswith("backbone.0.patch_embed."):
            swin[k[len("backbone.0."):]] = torch.randn(v.shape, generator=g)
        elif parts[2] == "layers" and parts[3] in ("blocks", "downsample") and v.is_floating_point():
            swin[f"layers.{parts[1]}." + ".".join(parts[3:])] = torch.randn(v.shape, generator=g)
    swin.update({"norm.weight": torch.ones(128), "head.weight": torch.zeros(10, 128),
                 "layers.1.blocks.1.attn_mask": torch.zeros(4, 49, 49)})
    path = tmp_path / "swin.pth"
    torch.save({"model": swin}, path)
    loaded = model.load_pretrained_swin(path)  # the loaded keys, in this model's names
    assert len(loaded) == 117 and all(k in model.state_dict() for k in loaded)
    assert "backbone.2.layers.blocks.1.mlp.fc2.weight" in loaded
    sd = model.state_dict()
    assert torch.equal(sd["backbone.0.patch_embed.proj.weight"], swin["patch_embed.proj.weight"])
    assert torch.equal(sd["backbone.2.layers.blocks.1.mlp.fc2.weight"], swin["layers.2.blocks.1.mlp.fc2.weight"])
    assert torch.equal(sd["backbone.1.layers.downsample.reduction.weight"], swin["layers.1.downsample.reduction.weight"])


def test_load_pretrained_bert_selects_embeddings_and_first_layers(tmp_path):
    from transformers import BertConfig, BertModel

    bert_cfg = {"vocab_size": 100, "hidden_size": 32, "num_hidden_layers": 5, "num_attention_heads": 2,
                "intermediate_size": 64, "max_position_embeddings": 32}
    torch.manual_seed(3)
    BertModel(BertConfig(**bert_cfg), add_pooling_layer=True).save_pretrained(tmp_path)
    hf = BertModel.from_pretrained(str(tmp_path), add_pooling_layer=False).state_dict()

    model = _tiny(bert=bert_cfg, bert_layers_per_stage=[2, 1, 1, 1])
    before = model.lang_stage2.layer[0].output.dense.weight.clone()
    loaded = model.load_pretrained_bert(tmp_path)
    sd = model.state_dict()
    assert torch.equal(sd["lang_stage1.embeddings.word_embeddings.weight"], hf["embeddings.word_embeddings.weight"])
    assert torch.equal(sd["lang_stage1.encoder.layer.1.attention.self.query.weight"],
                       hf["encoder.layer.1.attention.self.query.weight"])
    assert all(k.startswith(("lang_stage1.embeddings.", "lang_stage1.encoder.layer.")) for k in loaded)
    assert torch.equal(model.lang_stage2.layer[0].output.dense.weight, before)  # L2-L4 stay random (reference)

    exp = _tiny(bert=bert_cfg, bert_layers_per_stage=[2, 1, 1, 1], init_lang_from_bert=True)
    exp.load_pretrained_bert(tmp_path)  # experiment: L2..L4 from BERT layers 2, 3, 4
    assert torch.equal(exp.lang_stage4.layer[0].output.dense.weight, hf["encoder.layer.4.output.dense.weight"])
    too_deep = _tiny(bert=bert_cfg, bert_layers_per_stage=[6, 1, 1, 1])
    with pytest.raises(ValueError, match="no encoder layer 5"):
        too_deep.load_pretrained_bert(tmp_path)


def test_engine_drops_declared_ignored_keys_of_original_checkpoints(fixture, tmp_path):
    """test.py/demo.py load a reference TRAINING file (with `temp`) strictly once `temp` is dropped."""
    import argparse

    import engine

    path = tmp_path / "crossvlt_train.pth"
    torch.save({"model": {**fixture["state_dict"], "temp": torch.ones(4)}}, path)
    ckpt = engine.read_checkpoint(str(path))
    cfg = config_from_fixture(fixture["config"])
    orig = engine.config_from_args
    engine.config_from_args = lambda args: cfg  # the flags would describe this config
    try:
        model = engine.model_from_checkpoint(ckpt, str(path), argparse.Namespace(model="crossvlt"))
    finally:
        engine.config_from_args = orig
    sd = model.state_dict()
    for k, v in fixture["state_dict"].items():
        assert torch.equal(sd[k], v.to(sd[k].dtype)), k
