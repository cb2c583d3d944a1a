"""BERT text encoder: vendored-BERT numerics on transformers, key layout, loading from a folder."""
from __future__ import annotations

import json

import pytest
import torch
from transformers import BertModel

from bert.text_encoder import BertConfigError, BertTextEncoder, bert_config_dict, build_text_encoder

TINY = {"vocab_size": 50, "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
        "intermediate_size": 48, "max_position_embeddings": 32}


def _fixture_encoder(fx):
    enc = build_text_encoder(fx["config"]["bert"]).eval()
    sd = {k[len("text_encoder."):]: v for k, v in fx["state_dict"].items() if k.startswith("text_encoder.")}
    missing, unexpected = enc.load_state_dict(sd, strict=True)
    assert not missing and not unexpected
    return enc


def test_is_a_transformers_bert_without_pooler_or_position_ids():
    enc = build_text_encoder(TINY)
    assert isinstance(enc, BertModel) and enc.pooler is None
    keys = set(enc.state_dict())
    assert not any("pooler" in k or "position_ids" in k or "token_type_ids" in k for k in keys)
    assert "embeddings.word_embeddings.weight" in keys and "encoder.layer.1.output.LayerNorm.bias" in keys
    assert enc.config._attn_implementation == "eager"


def test_lavt_fixture_text_features_within_tolerance(fixtures_dir):
    fx = torch.load(fixtures_dir / "lavt_a.pt")
    enc = _fixture_encoder(fx)
    inp = fx["inputs"]
    with torch.no_grad():
        h = enc(inp["text"], attention_mask=inp["l_mask"])[0]
    ref = fx["features"]["text_encoder.last_hidden_state"]
    assert (h - ref).abs().max() <= fx["tolerance"]["features"]["text_encoder.last_hidden_state"]


def test_fianet_three_masks_including_all_zero_row(fixtures_dir):
    fx = torch.load(fixtures_dir / "fianet_a.pt")
    enc = _fixture_encoder(fx)
    inp = fx["inputs"]
    assert inp["t_mask"][1].sum() == 0  # the all-zero ground-object mask of sample 1
    for name, mask in (("l", "l_mask"), ("t", "t_mask"), ("p", "p_mask")):
        with torch.no_grad():
            h = enc(inp["text"], attention_mask=inp[mask]).last_hidden_state
        key = f"text_encoder.{name}_feats"
        assert (h - fx["features"][key]).abs().max() <= fx["tolerance"]["features"][key], key


def test_vendored_numerics_differ_from_stock_forward():
    """Our forward is not the stock one: a fully masked row attends to every token (the -10000
    constant cancels in the softmax), whereas stock transformers attends uniformly."""
    torch.manual_seed(0)
    enc = build_text_encoder(TINY).eval()
    with torch.no_grad():  # peaked (non-uniform) attention, so uniform vs. full attention differ
        for layer in enc.encoder.layer:
            layer.attention.self.query.weight.normal_(0, 1)
            layer.attention.self.key.weight.normal_(0, 1)
    ids = torch.randint(1, 50, (1, 7))
    zeros = torch.zeros_like(ids)
    with torch.no_grad():
        ours_zero = enc(ids, attention_mask=zeros)[0]
        ours_ones = enc(ids, attention_mask=torch.ones_like(ids))[0]
        stock_zero = BertModel.forward(enc, input_ids=ids, attention_mask=zeros).last_hidden_state
    assert (ours_zero - ours_ones).abs().max() < 1e-3  # -10000 cancels up to float32 rounding
    assert (ours_zero - stock_zero).abs().max() > 1e-2


def test_embedding_sum_order():
    """Embeddings are LayerNorm((word + position) + token_type) then dropout."""
    torch.manual_seed(1)
    enc = build_text_encoder(dict(TINY, num_hidden_layers=0)).eval()
    ids = torch.randint(0, 50, (2, 5))
    e = enc.embeddings
    expected = e.LayerNorm(e.word_embeddings(ids) + e.position_embeddings(torch.arange(5))[None]
                           + e.token_type_embeddings(torch.zeros_like(ids)))
    with torch.no_grad():
        assert torch.equal(enc(ids, attention_mask=torch.ones_like(ids))[0], expected)


def test_padding_positions_do_not_change_real_tokens():
    torch.manual_seed(2)
    enc = build_text_encoder(TINY).eval()
    ids = torch.randint(1, 50, (2, 9))
    mask = torch.ones_like(ids)
    mask[:, 6:] = 0
    ids2 = ids.clone()
    ids2[:, 6:] = torch.randint(1, 50, (2, 3))
    with torch.no_grad():
        a = enc(ids, attention_mask=mask)[0]
        b = enc(ids2, attention_mask=mask)[0]
    assert torch.equal(a[:, :6], b[:, :6])


def test_config_and_pretrained_folder(tmp_path):
    torch.manual_seed(3)
    src = build_text_encoder(TINY).eval()
    src.save_pretrained(tmp_path)
    cfg = bert_config_dict(str(tmp_path))
    assert cfg["hidden_size"] == 32 and cfg["num_hidden_layers"] == 2
    loaded = build_text_encoder(cfg, pretrained=tmp_path).eval()
    assert isinstance(loaded, BertTextEncoder) and loaded.config._attn_implementation == "eager"
    ids = torch.randint(1, 50, (2, 6))
    m = torch.ones_like(ids)
    with torch.no_grad():
        assert torch.equal(src(ids, attention_mask=m)[0], loaded(ids, attention_mask=m)[0])
    # a plain config dict / the built-in name / bad arguments
    assert bert_config_dict("bert-base-uncased")["num_hidden_layers"] == 12
    assert json.loads(json.dumps(cfg)) == cfg
    with pytest.raises(BertConfigError):
        bert_config_dict("no/such/folder")
    with pytest.raises(FileNotFoundError):
        build_text_encoder(TINY, pretrained=tmp_path / "missing")


def test_dropout_active_only_in_train_mode():
    torch.manual_seed(4)
    enc = build_text_encoder(TINY)
    ids = torch.randint(1, 50, (2, 6))
    m = torch.ones_like(ids)
    enc.train()
    a, b = enc(ids, attention_mask=m)[0], enc(ids, attention_mask=m)[0]
    assert not torch.equal(a, b)
    enc.eval()
    with torch.no_grad():
        assert torch.equal(enc(ids, attention_mask=m)[0], enc(ids, attention_mask=m)[0])
