"""LGFormer (lib/lgformer.py): reference fixture, official checkpoint layout, loss, gradients,
mixed precision, the prediction rule and the spec."""
from __future__ import annotations

import argparse
import importlib.util

import pytest
import torch

from lib.checkpoint import (
    CheckpointMismatchError,
    extract_state_dict,
    load_model_state,
    safe_torch_load,
)
from lib.lgformer import SPEC, LGFormer, build_config
from tools.check_reference import flatten_features

TINY_BERT = {"vocab_size": 64, "hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
             "intermediate_size": 64, "max_position_embeddings": 32, "type_vocab_size": 2}


def tiny_config(**kw) -> dict:
    """Seconds on a CPU: Swin 16 / 2-2-2-2, 32-wide BERT, 32-wide decoders, 4 query layers (wraps)."""
    kw.setdefault("max_tokens", 8)
    return build_config("lgformer", swin_overrides={"embed_dim": 16, "depths": [2, 2, 2, 2], "num_heads": [1, 2, 4, 8]},
                        window_size=7, bert=TINY_BERT, img_size=64,
                        pixel_decoder={"conv_dim": 32, "mask_dim": 32, "enc_layers": 1, "dim_feedforward": 64,
                                       "nheads": 4, "text_heads": 4, "text_ffn": 64},
                        query_decoder={"num_layers": 4, "dim_ffn": 64, "nhead": 4}, **kw)


def tiny_batch(n_tokens: int = 8, size: tuple[int, int] = (64, 64)):
    g = torch.Generator().manual_seed(0)
    image = torch.randn(2, 3, *size, generator=g)
    text = torch.randint(3, 64, (2, n_tokens), generator=g)
    l_mask = torch.ones(2, n_tokens, dtype=torch.long)
    l_mask[1, 5:] = 0
    text[1, 5:] = 0
    target = (torch.rand(2, *size, generator=g) > 0.7).long()
    return {"image": image, "text": text, "l_mask": l_mask, "target": target}


# --------------------------------------------------------------------------------------------
# Reference fixture (expanded once per session from its compact recipe)
# --------------------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def lgformer_fixture(fixtures_dir, tmp_path_factory):
    compact = fixtures_dir / "lgformer_a.pt"
    script = fixtures_dir / "expand_fixture.py"
    if not compact.is_file() or not script.is_file():
        pytest.skip(f"{compact.name} / {script.name} not found in {fixtures_dir}")
    spec = importlib.util.spec_from_file_location("expand_fixture", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = tmp_path_factory.mktemp("lgformer") / "lgformer_a_full.pt"
    assert module.main([str(compact), str(out)]) == 0  # regenerates and checks every tensor's sha256
    return safe_torch_load(out)


def _fixture_model(fx: dict, fused: bool = True) -> LGFormer:
    cfg = SPEC.config_from_fixture(fx["config"])
    cfg["fused_attn"] = fused
    model = LGFormer(cfg).eval()
    rep = load_model_state(model, extract_state_dict({"model": fx["state_dict"]}), strict=True)
    assert rep.ok and not rep.missing and not rep.unexpected and len(rep.loaded) == len(fx["state_dict"])
    return model


@pytest.mark.parametrize("fused", [True, False], ids=["fast-paths", "reference-ops"])
def test_fixture_matches_reference(lgformer_fixture, fused):
    fx = lgformer_fixture
    cfg = SPEC.config_from_fixture(fx["config"])
    assert cfg["pixel_decoder"]["enc_layers"] == 2 and cfg["query_decoder"]["num_layers"] == 4
    assert cfg["query_decoder"]["dim_ffn"] == 256 and cfg["text_len"] == 20 and cfg["img_size"] == [104, 136]
    model = _fixture_model(fx, fused)
    inp = fx["inputs"]
    with torch.no_grad():
        masks, feats = model(inp["image"].float(), inp["text"], inp["l_mask"], return_features=True)
    tol = fx["tolerance"]
    assert len(masks) == len(fx["outputs"]) == 5
    for k, (mine, ref) in enumerate(zip(masks, fx["outputs"])):
        assert mine.shape == ref.shape == (2, 1, 104, 136)
        assert (mine - ref).abs().max().item() <= tol["outputs"], f"mask {k}"
    ours = flatten_features(feats)
    refs = flatten_features(fx["features"])
    assert len(refs) == 46 and set(refs) == set(tol["features"])
    for name, ref in refs.items():  # every stored feature is produced and compared
        assert name in ours, name
        assert ours[name].shape == ref.shape, name
        assert (ours[name] - ref).abs().max().item() <= tol["features"][name], name
    # the reference's decision rule on the last map
    pred = model.predict_mask(masks, (104, 136))
    assert torch.equal(pred, fx["outputs"][-1][:, 0] > 0)


def test_official_checkpoint_layout_loads_strictly(lgformer_fixture, tmp_path):
    """A file laid out like model_refcoco.pth (train.py's dict_to_save) loads through the loader."""
    fx = lgformer_fixture
    path = tmp_path / "model_refcoco.pth"
    torch.save({"model": fx["state_dict"], "optimizer": {"state": {}, "param_groups": []}, "epoch": 39,
                "args": argparse.Namespace(swin_type="base", window12=True), "lr_scheduler": {"last_epoch": 1}}, path)
    sd = extract_state_dict(safe_torch_load(path))
    assert set(sd) == set(fx["state_dict"])
    model = LGFormer(SPEC.config_from_fixture(fx["config"])).eval()
    rep = load_model_state(model, sd, strict=True)
    assert rep.ok and len(rep.loaded) == len(fx["state_dict"])
    inp = fx["inputs"]
    with torch.no_grad():
        masks = model(inp["image"].float(), inp["text"], inp["l_mask"])
    assert (masks[-1] - fx["outputs"][-1]).abs().max().item() <= fx["tolerance"]["outputs"]
    # a missing key is a strict-load error, not a silent partial load
    broken = {k: v for k, v in sd.items() if k != "classifier.pix_dec.transformer.encoder.key_embed.weight"}
    with pytest.raises(CheckpointMismatchError, match="key_embed"):
        load_model_state(model, broken, strict=True)


# --------------------------------------------------------------------------------------------
# Training: loss, gradients, mixed precision
# --------------------------------------------------------------------------------------------
def test_loss_and_gradients_reach_every_used_parameter():
    torch.manual_seed(0)
    model = LGFormer(tiny_config()).train()
    batch = tiny_batch()
    outputs = model(batch["image"], batch["text"], batch["l_mask"])
    assert len(outputs) == 5 and all(o.shape == (2, 1, 64, 64) for o in outputs)
    terms = model.loss(outputs, batch)
    assert list(terms) == [f"bce_{k}" for k in range(5)]
    assert all(t.dtype == torch.float32 and t.dim() == 0 and torch.isfinite(t) for t in terms.values())
    # each term is BCE-with-logits with pos_weight 1.1, computed by hand
    x, t = outputs[2].detach()[:, 0], batch["target"].float()
    by_hand = -(1.1 * t * torch.nn.functional.logsigmoid(x) + (1 - t) * torch.nn.functional.logsigmoid(-x)).mean()
    assert torch.allclose(terms["bce_2"].detach(), by_hand, atol=1e-6)
    sum(terms.values()).backward()
    dead = set(model.dead_parameter_names())
    assert dead == {f"backbone.layers.3.{g}.{i}.weight" for g in ("res_gate", "sym_res_gate") for i in (0, 2)}
    unused = set(model.unused_parameter_names())
    assert dead < unused and any(n.startswith("text_encoder.embeddings.") for n in unused)
    for name, p in model.named_parameters():
        if name in dead:
            assert p.grad is None, name
        elif name not in unused:
            assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_parameter_groups_follow_the_reference():
    model = LGFormer(tiny_config())
    groups = model.parameter_groups(0.01)
    ids = [id(p) for g in groups for p in g["params"]]
    assert len(ids) == len(set(ids))
    names = {id(p): n for n, p in model.named_parameters()}
    grouped = {names[i] for i in ids}
    unused = set(model.unused_parameter_names())
    assert grouped == set(names.values()) - unused
    no_decay = [names[id(p)] for p in groups[0]["params"]]
    assert groups[0]["weight_decay"] == 0.0 and all(g["weight_decay"] == 0.01 for g in groups[1:])
    assert all("norm" in n or "relative_position_bias_table" in n for n in no_decay)
    assert {names[id(p)] for p in groups[3]["params"]} == {n for n in names.values() if n.startswith("text_encoder.encoder.")}


def test_bf16_autocast_keeps_the_pixel_decoder_in_float32():
    torch.manual_seed(0)
    model = LGFormer(tiny_config()).eval()
    batch = tiny_batch()
    with torch.no_grad():
        ref = model(batch["image"], batch["text"], batch["l_mask"])
        with torch.autocast("cpu", dtype=torch.bfloat16):
            masks, feats = model(batch["image"], batch["text"], batch["l_mask"], return_features=True)
            terms = model.loss(masks, batch)
    assert feats["classifier.pix_dec.mask_features"].dtype == torch.float32
    assert all(t.dtype == torch.float32 for t in feats["classifier.pix_dec.multi_scale_features"])
    assert feats["backbone.output"][0].dtype == torch.bfloat16  # the rest does run in bf16
    assert all(torch.isfinite(m.float()).all() for m in masks)
    assert all(t.dtype == torch.float32 and torch.isfinite(t) for t in terms.values())
    scale = ref[-1].abs().max().item()
    assert (masks[-1].float() - ref[-1]).abs().max().item() < 0.1 * scale + 0.1


# --------------------------------------------------------------------------------------------
# Inference behaviour and config
# --------------------------------------------------------------------------------------------
def test_padding_and_sample_independence():
    torch.manual_seed(0)
    model = LGFormer(tiny_config()).eval()
    batch = tiny_batch()
    with torch.no_grad():
        base = model(batch["image"], batch["text"], batch["l_mask"])[-1]
        padded = batch["text"].clone()
        padded[1, 5:] = 7  # padded ids never matter
        same = model(batch["image"], padded, batch["l_mask"])[-1]
        changed = batch["text"].clone()
        changed[1, 2] = (changed[1, 2] + 1) % 64  # a real token of sample 1 only
        moved = model(batch["image"], changed, batch["l_mask"])[-1]
    assert torch.equal(base, same)
    assert torch.equal(base[0], moved[0]) and (base[1] - moved[1]).abs().max() > 1e-4


def test_prediction_rule():
    model = LGFormer(tiny_config())
    logits = torch.tensor([[[[-1.0, 0.5], [2.0, -0.1]]]])
    outputs = [torch.zeros_like(logits), logits]  # only the last map counts
    assert torch.equal(model.predict_mask(outputs, (2, 2)), torch.tensor([[[False, True], [True, False]]]))
    assert torch.allclose(model.predict_scores(outputs, (2, 2)), logits[:, 0].sigmoid())
    up = model.predict_scores(outputs, (4, 4))
    assert up.shape == (1, 4, 4) and torch.allclose(up[0, 0, 0], torch.tensor(-1.0).sigmoid())  # align_corners=False


def test_token_count_must_match_key_embed():
    model = LGFormer(tiny_config()).eval()
    batch = tiny_batch(n_tokens=6)
    with pytest.raises(ValueError, match="key_embed holds 8 token positions"):
        model(batch["image"], batch["text"], batch["l_mask"])


def test_reference_defaults_and_recipe():
    cfg = build_config("lgformer", pretrained_swin="pretrained_weights/swin_base_patch4_window12_384_22k.pth",
                       unrelated_flag=3)  # unknown generic options are ignored
    assert cfg["swin"]["embed_dim"] == 128 and cfg["swin"]["depths"] == [2, 2, 18, 2]
    assert cfg["swin"]["window_size"] == 12 and cfg["swin"]["drop_path_rate"] == 0.3
    assert cfg["pixel_decoder"]["enc_layers"] == 6 and cfg["pixel_decoder"]["dim_feedforward"] == 1024
    assert cfg["query_decoder"]["num_layers"] == 6 and cfg["query_decoder"]["dim_ffn"] == 2048
    assert cfg["text_len"] == 20 and cfg["l_in"] == 768 and cfg["fusion"]["num_heads"] == [1, 1, 1, 1]
    assert cfg["bert"]["hidden_dropout_prob"] == 0.1
    assert build_config("lgformer")["swin"]["window_size"] == 7
    r = SPEC.recipe("refcoco")
    assert (r.lr, r.weight_decay, r.batch_size, r.epochs, r.max_tokens) == (5e-5, 1e-2, 16, 40, 20)
    assert SPEC.recipe("rrsisd") == r and SPEC.inputs == ("image", "text", "l_mask")
    with pytest.raises(ValueError, match="query decoder option"):
        build_config("lgformer", query_decoder={"layers": 3})


def test_pretrained_missing_covers_the_new_modules():
    """Keys an ImageNet Swin + BERT load leaves missing are exactly the LGFormer-specific ones."""
    model = LGFormer(tiny_config())
    keys = list(model.state_dict())
    swin_like = [k for k in keys if k.startswith("backbone.") and (".blocks." in k or ".downsample." in k
                                                                    or k.startswith("backbone.patch_embed."))]
    others = [k for k in keys if not k.startswith("text_encoder.") and k not in swin_like]
    assert SPEC.unexpected_missing(others) == []
    assert SPEC.unexpected_missing(swin_like) == swin_like
