"""CLIP towers (lib/clip.py), local CLIP weight files in every format, and the BPE tokenizer.

Expected token ids were produced by the reference's own ``clip.tokenize(s)[:20]`` (OpenAI's
SimpleTokenizer with the same BPE file) and are hard-coded here.
"""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import data.clip_tokenizer as ct
from lib.checkpoint import CheckpointError
from lib.clip import (
    CLIP,
    causal_mask,
    clip_config,
    clip_config_from_state_dict,
    is_torchscript_archive,
    load_clip_state_dict,
    load_clip_weights,
)

# Writing a tiny TorchScript archive with torch.jit.trace warns about traced shape checks and jit's deprecation.
pytestmark = pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning", "ignore:`torch.jit:FutureWarning")

TINY_TEXT = dict(context_length=16, vocab_size=50, transformer_width=64, transformer_heads=1, transformer_layers=2)
TINY_RN = dict(embed_dim=24, image_resolution=64, vision_layers=[1, 2, 1, 1], vision_width=8, vision_patch_size=None,
               **TINY_TEXT)
TINY_VIT = dict(embed_dim=24, image_resolution=32, vision_layers=2, vision_width=64, vision_patch_size=16, **TINY_TEXT)


def _tiny(cfg: dict, seed: int = 0) -> CLIP:
    torch.manual_seed(seed)
    model = CLIP(cfg)
    with torch.no_grad():  # non-trivial BN statistics and a non-zero bn3 (CLIP zero-inits it)
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    return model.eval()


def _ids(batch: int, length: int, eot: list[int], vocab: int = 50) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, vocab - 2, (batch, length), generator=g)
    ids[:, 0] = vocab - 2
    for i, pos in enumerate(eot):
        if pos is not None:
            ids[i, pos] = vocab - 1
            ids[i, pos + 1:] = 0
    return ids


# ------------------------------------------------------------------------------ towers
def test_resnet_stage_shapes_and_attention_pool_any_size():
    model = _tiny(TINY_RN)
    x = torch.randn(2, 3, 72, 88)  # not a multiple of 32: every average pool floors
    c = model.visual.stages(x)
    assert [tuple(t.shape) for t in c] == [(2, 32, 18, 22), (2, 64, 9, 11), (2, 128, 4, 5), (2, 256, 2, 2)]
    g, dense = model.visual.attnpool(c[3])
    assert g.shape == (2, 24) and dense.shape == (2, 24, 2, 2)
    # at the training grid (64 px -> 2x2) the positional grid is used as is
    assert model.encode_image(torch.randn(1, 3, 64, 64)).shape == (1, 24)


def test_text_encoder_causal_eot_and_truncation():
    model = _tiny(TINY_RN)
    ids = _ids(3, 10, [9, 4, None])
    with torch.no_grad():
        tokens, sent = model.encode_text(ids)
    assert tokens.shape == (3, 10, 64) and sent.shape == (3, 24)
    # sentence embedding = projected state at argmax id (EOT; SOT at position 0 when truncated)
    pos = torch.tensor([9, 4, 0])
    assert torch.allclose(sent, tokens[torch.arange(3), pos] @ model.text_projection, atol=1e-6)
    # causal: changing ids after the EOT (padding) changes neither the EOT state nor earlier states
    ids2 = ids.clone()
    ids2[1, 5:] = 7
    with torch.no_grad():
        tokens2, sent2 = model.encode_text(ids2)
    assert torch.equal(tokens2[1, :5], tokens[1, :5]) and torch.equal(sent2, sent)
    # a truncated sentence's body tokens do not change its (SOT) embedding
    ids3 = ids.clone()
    ids3[2, 3] = 5 if ids3[2, 3] != 5 else 6
    with torch.no_grad():
        _, sent3 = model.encode_text(ids3)
    assert torch.equal(sent3[2], sent[2])
    with pytest.raises(ValueError, match="more than the 16 positions"):
        model.encode_text(torch.ones(1, 17, dtype=torch.long))


def test_causal_mask_values():
    m = causal_mask(4)
    assert torch.isinf(m).sum() == 6 and (m.triu(1) == float("-inf")).sum() == 6 and (m.tril() == 0).all()


def test_vit_tower_shapes_and_logits():
    model = _tiny(TINY_VIT)
    img = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        emb = model.encode_image(img)
        per_image, per_text = model(img, _ids(3, 8, [7, 3, 5]))
    assert emb.shape == (2, 24) and per_image.shape == (2, 3) and torch.equal(per_text, per_image.t())
    # cosine logits scaled by exp(logit_scale) = 1/0.07
    assert per_image.abs().max() <= 1 / 0.07 + 1e-4
    with pytest.raises(ValueError, match="32x32"):
        model.encode_image(torch.randn(1, 3, 48, 48))


def test_config_from_state_dict_round_trip():
    for cfg in (TINY_RN, TINY_VIT):
        derived = clip_config_from_state_dict(_tiny(cfg).state_dict())
        assert CLIP(derived).config == CLIP(cfg).config
    rn50 = clip_config("RN50")
    assert rn50["vision_heads"] == 32 and rn50["transformer_heads"] == 8 and rn50["embed_dim"] == 1024


# ------------------------------------------------------------------------------ weight files
class _Traceable(nn.Module):
    """Wraps a CLIP so torch.jit.trace writes a TorchScript archive with the same state_dict
    names (``visual.*``, ``transformer.*``, ...) plus OpenAI's metadata scalars."""

    def __init__(self, clip: CLIP):
        super().__init__()
        for name, mod in clip.named_children():
            self.add_module(name, mod)
        for name, p in clip.named_parameters(recurse=False):
            self.register_parameter(name, p)
        self.register_buffer("input_resolution", torch.tensor(64))
        self.register_buffer("context_length", torch.tensor(16))
        self.register_buffer("vocab_size", torch.tensor(50))

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.visual(image)[0] + self.text_projection.sum() + self.positional_embedding.sum() \
            + self.token_embedding.weight.sum() + self.ln_final.weight.sum() + self.logit_scale \
            + sum(p.sum() for p in self.transformer.parameters())


@pytest.fixture(scope="module")
def tiny_rn_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("clipfiles")
    src = _tiny(TINY_RN, seed=3)
    ref = {k: v.clone() for k, v in src.state_dict().items()}
    half = copy.deepcopy(src).half()
    torch.save(src.state_dict(), d / "plain.pt")
    torch.save({"epoch": 3, "state_dict": {f"module.{k}": v for k, v in src.state_dict().items()}},
               d / "open_clip.pt")
    archive = torch.jit.trace(_Traceable(half).float().eval(), torch.randn(1, 3, 64, 64))
    archive = archive.half()  # OpenAI's archives hold float16 weights
    torch.jit.save(archive, str(d / "RN.pt"))
    return d, ref


def test_load_plain_open_clip_and_torchscript_give_equal_tensors(tiny_rn_files):
    d, ref = tiny_rn_files
    half_ref = {k: (v.half().float() if v.is_floating_point() else v) for k, v in ref.items()}
    for name, expected in (("plain.pt", ref), ("open_clip.pt", ref), ("RN.pt", half_ref)):
        sd = load_clip_state_dict(d / name, allow_torchscript=name == "RN.pt")
        assert set(sd) == set(ref), name  # metadata scalars dropped, nothing missing
        for k, v in sd.items():
            assert v.dtype == expected[k].dtype and torch.equal(v, expected[k]), (name, k)
        target = _tiny(TINY_RN, seed=9)
        rep = load_clip_weights(target, d / name, allow_torchscript=name == "RN.pt")
        assert rep.ok and len(rep.loaded) == len(ref)
        assert torch.equal(target.visual.layer2[1].conv2.weight, expected["visual.layer2.1.conv2.weight"])


def test_torchscript_refused_without_opt_in(tiny_rn_files):
    d, _ = tiny_rn_files
    assert is_torchscript_archive(d / "RN.pt") and not is_torchscript_archive(d / "plain.pt")
    with pytest.raises(CheckpointError, match="TorchScript archive") as exc:
        load_clip_state_dict(d / "RN.pt")
    assert "\n" not in str(exc.value) and "allow_torchscript=True" in str(exc.value)


def test_weight_file_errors(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        load_clip_state_dict(tmp_path / "missing.pt")
    torch.save({"conv.weight": torch.ones(1)}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="not a CLIP state_dict"):
        load_clip_state_dict(tmp_path / "other.pt")
    # a file of another architecture fails the strict load with a shape report
    torch.save(_tiny(TINY_VIT).state_dict(), tmp_path / "vit.pt")
    with pytest.raises(CheckpointError, match="strict checkpoint load failed"):
        load_clip_weights(_tiny(TINY_RN), tmp_path / "vit.pt")


# ------------------------------------------------------------------------------ tokenizer
@pytest.fixture(scope="module")
def tokenizer():
    return ct.load_tokenizer()


def test_tokenizer_short_sentence(tokenizer):
    ids, mask = ct.encode(tokenizer, "the man on the left")
    assert ids == [49406, 518, 786, 525, 518, 1823, 49407] + [0] * 13
    assert mask == [1] * 7 + [0] * 13
    assert ct.encode(tokenizer, "A photo of a cat")[0][:7] == [49406, 320, 1125, 539, 320, 2368, 49407]


def test_tokenizer_exactly_18_tokens_keeps_eot(tokenizer):
    ids, mask = ct.encode(tokenizer, " ".join(["a"] * 18))
    assert ids == [49406] + [320] * 18 + [49407] and mask == [1] * 20


def test_tokenizer_truncated_sentence_has_no_eot(tokenizer):
    s = ("the large storage tank at the top right corner of the image, next to the small white building "
         "and the road")
    ids, mask = ct.encode(tokenizer, s)
    assert ids == [49406, 518, 3638, 6824, 6172, 536, 518, 1253, 1155, 5253, 539, 518, 2867, 267, 1131, 531, 518,
                   2442, 1579, 2307]
    assert ct.EOT_ID not in ids and mask == [1] * 20
    # the sentence embedding then comes from the SOT position (the largest id)
    assert int(torch.tensor(ids).argmax()) == 0
    ids19, _ = ct.encode(tokenizer, " ".join(["a"] * 19))
    assert ids19 == [49406] + [320] * 19
    _, _, lengths = ct.encode_many(tokenizer, [s, "a dog"])
    assert lengths == [24, 4]


def test_tokenizer_non_ascii_and_cleaning(tokenizer):
    ids, _ = ct.encode(tokenizer, "Café naïve &amp; 日本 😀")
    assert ids == [49406, 15304, 1097, 35689, 563, 261, 39121, 19277, 361, 7334, 49407] + [0] * 9
    # lower case, whitespace collapsed, HTML entities unescaped, mojibake repaired (ftfy)
    assert ct.encode(tokenizer, "  CAFÉ   NAÏVE & 日本\t😀 ")[0] == ids
    assert tokenizer.encode("cafÃ© au lait") == [15304, 2566, 572, 585]
    assert tokenizer.decode(tokenizer.encode("naïve 日本")).strip() == "naïve 日本"


def test_tokenizer_bad_vocab_file(tmp_path):
    with pytest.raises(ct.ClipTokenizerError, match="not found"):
        ct.load_tokenizer(tmp_path / "nope.txt.gz")
    (tmp_path / "bad.txt.gz").write_text("not gzip")
    with pytest.raises(ct.ClipTokenizerError, match="not a gzipped"):
        ct.load_tokenizer(tmp_path / "bad.txt.gz")


@pytest.mark.parametrize("vision", [dict(layers=2, width=64, patch_size=16, image_size=32, head_width=64),
                                    dict(layers=[1, 2, 1, 1], width=8, image_size=64, head_width=64)],
                         ids=["vit", "resnet"])
def test_open_clip_checkpoint_loads_and_matches_open_clip(tmp_path, vision):
    """A tiny open_clip model (QuickGELU, OpenAI layout), saved as open_clip's training saves it
    (``{'epoch', 'state_dict'}`` with ``module.``), loads strictly into our CLIP built from the
    file's shapes, and both towers give open_clip's embeddings."""
    from open_clip.model import CLIP as OpenClipCLIP
    from open_clip.model import CLIPTextCfg, CLIPVisionCfg

    torch.manual_seed(4)
    oc = OpenClipCLIP(embed_dim=24, vision_cfg=CLIPVisionCfg(**vision), quick_gelu=True,
                      text_cfg=CLIPTextCfg(context_length=16, vocab_size=50, width=64, heads=1, layers=2))
    with torch.no_grad():
        for m in oc.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.running_var.uniform_(0.5, 1.5)
    oc.eval()
    path = tmp_path / "open_clip_epoch_1.pt"
    torch.save({"epoch": 1, "name": "tiny", "state_dict": {f"module.{k}": v for k, v in oc.state_dict().items()}}, path)
    sd = load_clip_state_dict(path)
    ours = CLIP(clip_config_from_state_dict(sd)).eval()
    assert load_clip_weights(ours, path).ok
    img = torch.randn(2, 3, vision["image_size"], vision["image_size"])
    ids = _ids(2, 16, [7, None])
    with torch.no_grad():
        assert torch.allclose(ours.encode_image(img), oc.encode_image(img), atol=1e-5)
        assert torch.allclose(ours.encode_text(ids)[1], oc.encode_text(ids), atol=1e-5)
