"""TRIS stage 1 and stage 2 against the reference fixture ``tris_a.pt`` (both networks, eval and
training mode, logits and every stored feature within the stored tolerances), the stage check, the
loss terms and the decision rules."""
from __future__ import annotations

import copy
import subprocess
import sys

import pytest
import torch

from lib.checkpoint import CheckpointMismatchError, extract_state_dict, load_model_state
from lib.tris import SPEC_STAGE1, SPEC_STAGE2, TRISStage1, TRISStage2, build_config

SPECS = {"stage1": SPEC_STAGE1, "stage2": SPEC_STAGE2}
CLASSES = {"stage1": TRISStage1, "stage2": TRISStage2}


@pytest.fixture(scope="session")
def tris_fixture(fixtures_dir, tmp_path_factory):
    """``tris_a.pt`` expanded once (its weights are stored as a recipe)."""
    out = tmp_path_factory.mktemp("tris") / "tris_a_full.pt"
    subprocess.run([sys.executable, str(fixtures_dir / "expand_fixture.py"), str(fixtures_dir / "tris_a.pt"), str(out)],
                   check=True, capture_output=True, timeout=300)
    return torch.load(out)


def _loaded(fx, stage: str):
    cfg = SPECS[stage].config_from_fixture(fx["config"])
    torch.manual_seed(0)
    model = CLASSES[stage](cfg)
    rep = load_model_state(model, extract_state_dict(fx["state_dict"][stage]), strict=True)
    assert rep.ok and len(rep.loaded) == len(fx["state_dict"][stage])
    return model


def _inputs(fx):
    return fx["inputs"]["image"].float(), fx["inputs"]["text"]


def _diff(a, b) -> float:
    return (a.float() - b.float()).abs().max().item()


@pytest.fixture(scope="module")
def models(tris_fixture):
    """Per stage: (eval model, eval outputs + features, fresh training-mode outputs + features)."""
    fx = tris_fixture
    image, text = _inputs(fx)
    res = {}
    for stage in ("stage1", "stage2"):
        model = _loaded(fx, stage)
        fresh = copy.deepcopy(model)  # the training forward updates BN statistics: use a fresh copy
        with torch.no_grad():
            ev = model.eval()(image, text, return_features=True)
            tr = fresh.train()(image, text, return_features=True)
        res[stage] = (model, ev, tr, fresh)
    return res


@pytest.mark.parametrize("stage", ["stage1", "stage2"])
def test_eval_outputs_and_features_match_reference(tris_fixture, models, stage):
    fx = tris_fixture
    _, (out, feats), _, _ = models[stage]
    assert out.shape == fx["outputs"][stage].shape
    assert _diff(out, fx["outputs"][stage]) <= fx["tolerance"]["outputs"][stage]
    tol = fx["tolerance"]["features"][stage]
    assert set(fx["features"][stage]) <= set(feats), "every stored feature is produced"
    bad = {k: _diff(feats[k], ref) for k, ref in fx["features"][stage].items()
           if feats[k].shape != ref.shape or _diff(feats[k], ref) > tol[k]}
    assert not bad, bad


def test_stage1_training_outputs_match_reference(tris_fixture, models):
    fx = tris_fixture
    _, _, (out, feats), fresh = models["stage1"]
    ref, tol = fx["outputs_train"]["stage1"], fx["tolerance"]["outputs_train"]["stage1"]
    for key in ("cls", "cls_fg", "relu_map", "sigmoid_map", "logit_scale_exp"):
        assert out[key].shape == ref[key].shape and _diff(out[key], ref[key]) <= tol[key], key
    loss = fresh.loss(out, {})
    assert set(loss) == {"loss_cls"} and loss["loss_cls"].dtype == torch.float32
    assert abs(loss["loss_cls"].item() / 5.0 - ref["loss_cls"].item()) <= tol["loss_cls"]  # weight w4 = 5
    for key, r in fx["features_train"]["stage1"].items():
        assert _diff(feats[key], r) <= fx["tolerance"]["features_train"]["stage1"][key], key
    with pytest.raises(ValueError, match="training-mode outputs"):
        fresh.loss(torch.zeros(3, 1, 4, 4), {})


def test_stage2_training_outputs_and_loss_match_reference(tris_fixture, models):
    fx = tris_fixture
    _, _, (out, _), fresh = models["stage2"]
    ref, tol = fx["outputs_train"]["stage2"], fx["tolerance"]["outputs_train"]["stage2"]
    assert len(out) == 4
    for mine, r in zip(out, ref["logits"]):
        assert _diff(mine, r) <= tol["logits"]
    pseudo = fx["inputs"]["pseudo_gt"]
    terms = fresh.loss(out, {"target": pseudo[:, 0]})  # (B, H, W) like the data pipeline
    assert sorted(terms) == ["loss_seg1", "loss_seg2", "loss_seg3", "loss_seg4"]
    assert abs(sum(terms.values()).item() - ref["loss"].item()) <= tol["loss"]
    assert torch.equal(sum(fresh.loss(out, {"pseudo_gt": pseudo}).values()), sum(terms.values()))


def test_stage_mismatch_refused_with_one_line(tris_fixture, models):
    fx = tris_fixture
    for model_stage, file_stage in (("stage1", "stage2"), ("stage2", "stage1")):
        model = models[model_stage][0]
        before = model.backbone.visual.conv1.weight.detach().clone()
        other = dict(extract_state_dict(fx["state_dict"][file_stage]))
        other["backbone.visual.conv1.weight"] = other["backbone.visual.conv1.weight"] + 1  # would load if not refused
        with pytest.raises(CheckpointMismatchError) as exc:
            load_model_state(model, other, strict=False)
        msg = str(exc.value)
        assert "\n" not in msg and f"TRIS {file_stage[:5]}-{file_stage[5]} weights" in msg
        assert f"the model is TRIS stage {model_stage[5]}" in msg
        assert torch.equal(model.backbone.visual.conv1.weight, before)  # refused before anything loads


def test_padding_and_truncation_sensitivity(tris_fixture, models):
    """No padding mask anywhere: padded ids leave stage 1 bit-identical (causal text) but move
    stage 2 (PixelAttention reads every token state); stage 1 couples the batch, stage 2 does not."""
    image, text = _inputs(tris_fixture)
    padded = text.clone()
    padded[1, 9:] = 5
    with torch.no_grad():
        s1 = models["stage1"][0](image, padded)
        s2 = models["stage2"][0](image, padded)
        real = text.clone()
        real[1, 2] = real[1, 2] + 1
        s2_real = models["stage2"][0](image, real)
    ref1, ref2 = models["stage1"][1][0], models["stage2"][1][0]
    assert torch.equal(s1, ref1)
    assert _diff(s2[1], ref2[1]) > 1e-3 and torch.equal(s2[0], ref2[0]) and torch.equal(s2[2], ref2[2])
    assert torch.equal(s2_real[0], ref2[0]) and _diff(s2_real[1], ref2[1]) > 1e-3


def test_decision_rules(models):
    m1, (out1, _), _, _ = models["stage1"]
    m2, (out2, _), _, _ = models["stage2"]
    size = (50, 70)  # an "original" size other than the input's (128 x 160)
    mask1 = m1.predict_mask(out1, size)
    up = torch.nn.functional.interpolate(out1, size=size, mode="bilinear", align_corners=True)[:, 0]
    assert mask1.shape == (3, 50, 70) and torch.equal(mask1, up > 0)
    s1 = m1.predict_scores(out1, size)
    assert s1.min() >= 0 and s1.max() <= 1 and torch.allclose(s1.flatten(1).max(1).values, torch.ones(3), atol=1e-4)
    # stage 2: sigmoid > 0.5. The fixture's logits are negative almost everywhere; the
    # reference's divide-by-max rule would call sample 1 (all negative) all foreground.
    logits = out2
    assert (logits[1] < 0).all()
    mask2 = m2.predict_mask(logits, size)
    assert not mask2[1].any() and not mask2[2].any()
    up2 = torch.nn.functional.interpolate(logits, size=size, mode="bilinear", align_corners=True)[:, 0]
    assert torch.equal(mask2, torch.sigmoid(up2) > 0.5)
    reference_rule = (up2 / (up2.flatten(1).max(1).values[:, None, None] + 1e-5)) > 1e-9
    assert reference_rule[1].all()  # the bug this rule fixes
    assert torch.allclose(m2.predict_scores(logits, size), torch.sigmoid(up2))
    # training outputs go through the same rules
    train_out = [logits, logits, logits, logits]
    assert torch.equal(m2.predict_mask(train_out, size), mask2)


def test_parameter_groups_and_unused(models):
    for stage in ("stage1", "stage2"):
        model = models[stage][0]
        names = {id(p): n for n, p in model.named_parameters()}
        groups = model.parameter_groups(0.01)
        grouped = [names[id(p)] for g in groups for p in g["params"]]
        assert len(grouped) == len(set(grouped))
        backbone_group = {names[id(p)] for p in groups[0]["params"]}
        assert groups[0]["lr_scale"] == 0.1 and all(n.startswith("backbone.") for n in backbone_group)
        unused = set(model.unused_parameter_names())
        assert "backbone.visual.attnpool.c_proj.weight" in unused
        if stage == "stage1":
            assert "logit_scale" not in grouped  # the reference never optimises TRIS's logit scale
        else:
            assert "backbone.positional_embedding" in {names[id(p)] for p in groups[1]["params"]}
            assert "backbone.text_projection" in unused


def test_build_config_and_specs(tris_fixture):
    c1, c2 = build_config("tris_stage1"), build_config("tris_stage2")
    assert (c1["stage"], c2["stage"]) == (1, 2)
    assert c1["clip"]["vision_layers"] == [3, 4, 6, 3] and c1["text_dim"] == 1024 and c1["hidden_dim"] == 1024
    assert c2["v_chans"] == [256, 512, 1024, 2048] and c2["text_dim"] == 512
    assert build_config("tris_stage1", clip_backbone="clip-RN101")["text_dim"] == 512
    with pytest.raises(ValueError, match="CLIP ResNet"):
        build_config("tris_stage1", clip_backbone="ViT-B/32")
    for spec in (SPEC_STAGE1, SPEC_STAGE2):
        assert spec.inputs == ("image", "text") and spec.text.tokenizer == "clip" and spec.text.context_length == 20
        assert spec.default_img_size == 320 and spec.mean == (0.485, 0.456, 0.406)
        assert spec.recipe("refcoco").batch_size == 48
    assert SPEC_STAGE1.config_from_fixture(tris_fixture["config"])["stage"] == 1
    assert SPEC_STAGE2.config_from_fixture(tris_fixture["config"])["stage"] == 2
    # the expected-missing patterns cover exactly the non-CLIP keys
    sd1 = tris_fixture["state_dict"]["stage1"]
    head = [k for k in sd1 if not k.startswith("backbone.")]
    assert head and not SPEC_STAGE1.unexpected_missing(head)
    assert SPEC_STAGE1.unexpected_missing(["backbone.ln_final.weight"]) == ["backbone.ln_final.weight"]
    sd2 = tris_fixture["state_dict"]["stage2"]
    assert not SPEC_STAGE2.unexpected_missing([k for k in sd2 if not k.startswith("backbone.")])


def test_stage1_own_pairing_equals_batch_of_one(tris_fixture):
    """Default evaluation pairs each image with its own sentence: every sample gets the map the
    reference's batch-1 evaluation computes, independent of the rest of the batch."""
    fx = tris_fixture
    image, text = _inputs(fx)
    model = _loaded(fx, "stage1").eval()
    assert model.eval_pairing == "batch"  # the fixture config: the whole batch together
    with torch.no_grad():
        coupled = model(image, text)
        singles = torch.cat([model(image[i:i + 1], text[i:i + 1]) for i in range(3)])
        model.eval_pairing = "own"
        own = model(image, text)
        own_pair = model(image[:2], text[:2])
    assert _diff(coupled, fx["outputs"]["stage1"]) <= 1e-4
    assert torch.allclose(own, singles, atol=1e-5, rtol=0)
    assert torch.allclose(own_pair, own[:2], atol=1e-5, rtol=0)  # the batch's content does not matter
    assert _diff(own, coupled) > 1e-3  # and it is not the coupled map
    assert build_config("tris_stage1")["eval_pairing"] == "own"
