"""The checkpoint loader: safe loading, layouts, strict reports, Swin ImageNet files, atomic saves."""
from __future__ import annotations

import argparse
import os
import random

import pytest
import torch
import torch.nn.functional as F

import lib.checkpoint as ckpt_mod
from lib.checkpoint import (
    CheckpointError,
    CheckpointMismatchError,
    CheckpointNotFoundError,
    extract_state_dict,
    load_model_state,
    load_swin_pretrained,
    safe_torch_load,
    save_checkpoint,
    split_lavt_checkpoint,
)
from lib.registry import build_model, tiny_model_config


class NotAllowed:
    """An arbitrary class: pickling it into a checkpoint must make loading fail."""

    def __init__(self):
        self.x = 1


def _tiny(name="lavt_one", **kw):
    torch.manual_seed(0)
    return build_model(tiny_model_config(name, **kw))


# ------------------------------------------------------------------------------ safe loading
def test_safe_load_accepts_namespace_args(tmp_path):
    path = tmp_path / "orig.pth"
    torch.save({"model": {"w": torch.ones(2)}, "args": argparse.Namespace(lr=3e-5, swin_type="base"), "epoch": 3}, path)
    ck = safe_torch_load(path)
    assert ck["args"].swin_type == "base" and torch.equal(ck["model"]["w"], torch.ones(2))


def test_safe_load_refuses_arbitrary_objects(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"model": {}, "payload": NotAllowed()}, path)
    with pytest.raises(CheckpointError, match="refused to load") as info:
        safe_torch_load(path)
    assert "NotAllowed" in str(info.value)  # the refused global is named


class _RunsCode:
    """Unpickling this calls ``os.system``: the classic hostile checkpoint."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("layout", ["torch_zip", "plain_pickle_v4", "plain_pickle_v2"])
def test_hostile_pickle_is_refused_naming_the_global(tmp_path, layout):
    import pickle

    marker = tmp_path / "pwned"
    path = tmp_path / "hostile.pth"
    payload = {"model": {"w": torch.zeros(1)}, "x": _RunsCode(marker)}
    if layout == "torch_zip":
        torch.save(payload, path)
    else:
        path.write_bytes(pickle.dumps({"x": _RunsCode(marker)}, protocol=4 if layout.endswith("v4") else 2))
    with pytest.raises(CheckpointError) as info:
        safe_torch_load(path)
    msg = str(info.value)
    assert not marker.exists(), "the pickle's code ran"
    assert "\n" not in msg and str(path) in msg
    assert "refused" in msg and f"{os.system.__module__}.system" in msg, msg  # posix.system / nt.system
    assert "weights_only" not in msg  # never torch's advice to load it unsafely


@pytest.mark.parametrize("kind", ["random_bytes", "truncated", "empty", "text", "plain_dict_pickle"])
def test_non_checkpoint_files_say_so_in_one_line(tmp_path, kind):
    import pickle

    path = tmp_path / f"{kind}.pth"
    if kind == "random_bytes":
        path.write_bytes(random.Random(0).randbytes(4096))
    elif kind == "truncated":
        torch.save({"model": {"w": torch.randn(1000)}}, path)
        path.write_bytes(path.read_bytes()[:1500])
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "text":
        path.write_text("version https://git-lfs.github.com/spec/v1\noid sha256:abc\nsize 123\n")
    else:
        path.write_bytes(pickle.dumps({"model": {"w": 1}}, protocol=4))
    with pytest.raises(CheckpointError) as info:
        safe_torch_load(path)
    msg = str(info.value)
    assert msg == f"{path}: not a checkpoint (corrupt or another format)"


def test_safe_load_missing_and_corrupt(tmp_path):
    with pytest.raises(CheckpointNotFoundError, match="not found"):
        safe_torch_load(tmp_path / "nope.pth")
    with pytest.raises(FileNotFoundError):  # also a FileNotFoundError for callers
        safe_torch_load(tmp_path / "nope.pth")
    bad = tmp_path / "bad.pth"
    torch.save({"w": torch.randn(100)}, bad)
    bad.write_bytes(bad.read_bytes()[:200])  # truncated
    with pytest.raises(CheckpointError, match=r"not a checkpoint \(corrupt or another format\)"):
        safe_torch_load(bad)


# ------------------------------------------------------------------------------ layouts
def test_extract_state_dict_layouts():
    w = torch.ones(1)
    assert extract_state_dict({"a.w": w}) == {"a.w": w}
    assert extract_state_dict({"state_dict": {"module.a.w": w, "module.b": w}}) == {"a.w": w, "b": w}
    assert extract_state_dict({"model": {"module.a.w": w}, "epoch": 1}) == {"a.w": w}
    two_part = {"model": {"backbone.x": w}, "bert_model": {"module.embeddings.e": w, "module.pooler.dense.weight": w}}
    assert extract_state_dict(two_part) == {"backbone.x": w, "text_encoder.embeddings.e": w}
    assert extract_state_dict({"model": {"text_encoder.pooler.dense.bias": w, "x": w}}) == {"x": w}
    with pytest.raises(CheckpointError, match="not tensors"):
        extract_state_dict({"model": {"x": 3}})


def test_two_part_split_roundtrip():
    model = _tiny("lavt")
    sd = model.state_dict()
    parts = split_lavt_checkpoint(sd)
    assert set(parts["bert_model"]) == {k[len("text_encoder."):] for k in sd if k.startswith("text_encoder.")}
    merged = extract_state_dict(parts)
    assert merged.keys() == sd.keys()
    load_model_state(_tiny("lavt"), merged)  # strict


# ------------------------------------------------------------------------------ strict loading
def test_mismatch_raises_readable_report():
    model = _tiny()
    sd = dict(model.state_dict())
    sd.pop("classifier.conv1_1.bias")
    sd["backbone.extra.weight"] = torch.zeros(3)
    sd["backbone.norm0.weight"] = torch.zeros(5)
    before = model.classifier.conv1_4.weight.clone()
    sd["classifier.conv1_4.weight"] = sd["classifier.conv1_4.weight"] + 1
    with pytest.raises(CheckpointMismatchError) as err:
        load_model_state(model, sd)
    msg = str(err.value)
    assert "classifier.conv1_1.bias" in msg and "backbone.extra.weight" in msg
    assert "backbone.norm0.weight: [5] vs [16]" in msg
    assert "1 missing, 1 unexpected" in msg and "1 shape mismatches" in msg
    assert torch.equal(model.classifier.conv1_4.weight, before)  # nothing loaded on failure


def test_non_strict_loads_matching_and_prints(capsys):
    model = _tiny()
    sd = {k: v + 1 if v.is_floating_point() else v for k, v in model.state_dict().items()}
    sd.pop("classifier.conv1_1.bias")
    rep = load_model_state(model, sd, strict=False)
    assert rep.missing == ["classifier.conv1_1.bias"] and not rep.ok
    assert torch.equal(model.classifier.conv1_4.weight, sd["classifier.conv1_4.weight"])
    assert "missing" in capsys.readouterr().out


def test_long_reports_are_summarised():
    model = _tiny()
    with pytest.raises(CheckpointMismatchError) as err:
        load_model_state(model, {})
    msg = str(err.value)
    assert "keys)" in msg and len(msg.splitlines()) < 40


def test_float16_state_loads_into_float32():
    model = _tiny()
    sd = {k: v.half() if v.is_floating_point() else v for k, v in model.state_dict().items()}
    other = _tiny()
    load_model_state(other, sd)
    assert other.classifier.conv1_4.weight.dtype == torch.float32
    assert torch.equal(other.classifier.conv1_4.weight, model.classifier.conv1_4.weight.half().float())


# ------------------------------------------------------------------------------ Swin ImageNet files
def _official_swin_file(backbone, path, window_from=None):
    """A synthetic official Swin checkpoint: backbone Swin keys + classification extras."""
    sd = {k: v.clone() for k, v in backbone.state_dict().items()
          if k.startswith("patch_embed.") or ".blocks." in k or ".downsample." in k}
    if window_from is not None:
        w = window_from
        for k in list(sd):
            if k.endswith("relative_position_bias_table"):
                sd[k] = torch.randn((2 * w - 1) ** 2, sd[k].shape[1])
            elif k.endswith("relative_position_index"):
                sd[k] = torch.zeros(w * w, w * w, dtype=torch.long)
    sd["head.weight"] = torch.randn(10, 8)
    sd["head.bias"] = torch.randn(10)
    sd["norm.weight"] = torch.randn(128)
    sd["norm.bias"] = torch.randn(128)
    sd["layers.0.blocks.1.attn_mask"] = torch.zeros(4, 49, 49)
    torch.save({"model": sd}, path)
    return sd


def test_swin_official_format_loads(tmp_path, capsys):
    src = _tiny().backbone
    dst = _tiny().backbone
    with torch.no_grad():
        for p in src.parameters():
            p.add_(1.0)
    sd = _official_swin_file(src, tmp_path / "swin_tiny_patch4_window7_224.pth")
    rep = load_swin_pretrained(dst, tmp_path / "swin_tiny_patch4_window7_224.pth")
    assert {"head.weight", "head.bias", "norm.weight", "norm.bias", "layers.0.blocks.1.attn_mask"} <= set(rep.ignored)
    assert not rep.unexpected and not rep.mismatched
    assert torch.equal(dst.layers[1].blocks[0].mlp.fc1.weight, src.layers[1].blocks[0].mlp.fc1.weight)
    assert torch.equal(dst.layers[0].downsample.reduction.weight, src.layers[0].downsample.reduction.weight)
    # fusion, gates and stage norms are not in the file: they keep their init and are reported
    assert not torch.equal(dst.layers[0].fusion.vis_project[0].weight, src.layers[0].fusion.vis_project[0].weight)
    assert any(k.startswith("norm0") for k in rep.missing) and any(".fusion." in k for k in rep.missing)
    assert "Swin weights from" in capsys.readouterr().out
    assert len(rep.loaded) == len([k for k in sd if not k.startswith(("head.", "norm.")) and "attn_mask" not in k])


def test_swin_window7_file_into_window12_model_interpolates(tmp_path):
    dst = _tiny(window_size=12).backbone
    src = _tiny(window_size=12).backbone
    sd = _official_swin_file(src, tmp_path / "w7.pth", window_from=7)
    # 'state_dict' layout with DDP 'module.' prefixes is handled too
    torch.save({"state_dict": {"module." + k: v for k, v in sd.items()}}, tmp_path / "w7_module.pth")
    rep = load_swin_pretrained(dst, tmp_path / "w7_module.pth")
    key = "layers.2.blocks.1.attn.relative_position_bias_table"
    table = sd[key]
    heads = table.shape[1]
    expect = F.interpolate(table.permute(1, 0).reshape(1, heads, 13, 13), size=(23, 23), mode="bicubic",
                           align_corners=False).reshape(heads, 529).permute(1, 0)
    assert torch.allclose(dst.state_dict()[key], expect)
    assert any("13x13 -> 23x23" in n for n in rep.notes)
    # the window-12 index buffer is kept (derived), not overwritten by the window-7 one
    assert dst.layers[0].blocks[0].attn.relative_position_index.shape == (144, 144)
    assert not rep.mismatched


# ------------------------------------------------------------------------------ our checkpoints
def test_atomic_save_keeps_old_file_on_failure(tmp_path, monkeypatch):
    path = tmp_path / "ckpt.pth"
    save_checkpoint(path, {"model": {"w": torch.zeros(3)}, "epoch": 1})
    original = path.read_bytes()

    real_save = torch.save

    def failing_save(obj, fh, *a, **k):
        fh.write(b"partial bytes")  # a write that dies midway
        raise OSError("disk full")

    monkeypatch.setattr(ckpt_mod.torch, "save", failing_save)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(path, {"model": {"w": torch.ones(3)}, "epoch": 2})
    monkeypatch.setattr(ckpt_mod.torch, "save", real_save)
    assert path.read_bytes() == original
    assert safe_torch_load(path)["epoch"] == 1
    assert os.listdir(tmp_path) == ["ckpt.pth"]  # no temp file left behind


def test_next_save_removes_temp_files_of_an_interrupted_save(tmp_path):
    # What a save killed before its os.replace leaves: mkstemp names ".<target>.<random>.tmp".
    stale = [tmp_path / ".checkpoint_last.pth.k1x9q2.tmp", tmp_path / ".checkpoint_best.pth.abcd.tmp"]
    for f in stale:
        f.write_bytes(b"partial")
    unrelated = [tmp_path / "notes.tmp", tmp_path / ".other.tmp"]
    for f in unrelated:
        f.write_bytes(b"keep")
    save_checkpoint(tmp_path / "checkpoint_last.pth", {"epoch": 1})
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["checkpoint_last.pth"] + [f.name for f in unrelated])
    # A save under another name removes its own leftovers too.
    (tmp_path / ".model.pth.zz.tmp").write_bytes(b"partial")
    save_checkpoint(tmp_path / "model.pth", {"epoch": 2})
    assert not list(tmp_path.glob(".model.pth.*.tmp")) and safe_torch_load(tmp_path / "model.pth")["epoch"] == 2


def test_check_finite_names_the_bad_keys():
    from lib.checkpoint import NonFiniteWeightsError, check_finite

    good = {"a.weight": torch.ones(2), "a.index": torch.arange(3), "b.bias": torch.zeros(1)}
    check_finite(good, "f.pth")  # no error
    bad = dict(good, **{"c.weight": torch.tensor([1.0, float("nan")]), "d.bias": torch.tensor([float("-inf")]),
                        "e.w": torch.full((2,), float("inf"), dtype=torch.float16), "f.w": torch.tensor([float("nan")]),
                        "g.w": torch.tensor([float("nan")])})
    with pytest.raises(NonFiniteWeightsError) as info:
        check_finite(bad, "run/checkpoint_best.pth")
    msg = str(info.value)
    assert msg.startswith("run/checkpoint_best.pth: ") and "\n" not in msg
    assert "c.weight, d.bias, e.w and 2 more" in msg and "a.weight" not in msg


def test_strict_load_refuses_non_finite_weights(tmp_path):
    model = _tiny("lavt_one")
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    key = next(k for k, v in sd.items() if v.is_floating_point() and v.dim() >= 2)
    sd[key][0] = float("nan")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(CheckpointError, match=f"x.pth: weights hold NaN or inf values in {key}"):
        load_model_state(model, sd, strict=True, source="x.pth")
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # nothing was loaded
    path = tmp_path / "diverged.pth"
    save_checkpoint(path, {"model": sd, "config": model.config})
    import engine

    with pytest.raises(engine.UserError, match=f"{path}: weights hold NaN"):
        engine.model_from_checkpoint(engine.read_checkpoint(str(path)), str(path))


def test_our_checkpoint_roundtrip(tmp_path):
    """Our checkpoint rebuilds its model from the stored config through the loader test.py uses."""
    import engine

    model = _tiny("fianet").eval()
    path = tmp_path / "model_best.pth"
    save_checkpoint(path, {"model": model.state_dict(), "config": model.config, "epoch": 5})
    ck = engine.read_checkpoint(str(path))
    loaded = engine.model_from_checkpoint(ck, str(path)).eval()
    assert ck["epoch"] == 5 and loaded.config == model.config
    img = torch.randn(1, 3, 40, 40)
    ids = torch.randint(1, 100, (1, 8))
    m = torch.ones_like(ids)
    with torch.no_grad():
        assert torch.equal(model(img, ids, m, m, m), loaded(img, ids, m, m, m))
    torch.save({"model": model.state_dict()}, tmp_path / "noconfig.pth")
    with pytest.raises(engine.UserError, match="no config inside"):
        engine.model_from_checkpoint(engine.read_checkpoint(str(tmp_path / "noconfig.pth")), "noconfig.pth")


def test_load_pretrained_bert_folder_into_text_encoder(tmp_path):
    """A local Hugging Face BERT folder (with a pooler) is copied strictly into model.text_encoder."""
    from transformers import BertConfig, BertModel

    from lib.checkpoint import has_bert_weights, load_pretrained_bert
    from lib.registry import build_model, tiny_model_config

    model = build_model(tiny_model_config("lavt_one"))
    cfg = BertConfig(**{k: v for k, v in model.config["bert"].items() if k != "model_type"})
    torch.manual_seed(3)
    hf = BertModel(cfg)  # with a pooler, as downloaded folders have
    assert not has_bert_weights(tmp_path)
    hf.save_pretrained(tmp_path)
    assert has_bert_weights(tmp_path)
    load_pretrained_bert(model, tmp_path)
    ours = model.text_encoder.state_dict()
    for k, v in hf.state_dict().items():
        if not k.startswith("pooler.") and k in ours:
            assert torch.equal(ours[k], v), k
    assert torch.equal(ours["embeddings.word_embeddings.weight"], hf.embeddings.word_embeddings.weight)
