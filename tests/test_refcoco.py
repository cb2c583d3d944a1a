"""RefCOCO, RefCOCO+ and RefCOCOg (umd / google) in the REFER layout, on synthetic data.

A small synthetic RefCOCO tree is generated once per module (``data.synthetic``, layout
``refcoco``) and read through ``build_dataset`` and ``python -m data.check``: every split name
of every family member, the REFER ``test`` union, one evaluation item per sentence, 20 tokens,
greyscale COCO images as RGB, no black boxes, and the generator's own guarantees.
"""
from __future__ import annotations

import json
import pickle
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from data import check
from data import synthetic as syn
from data.datasets import DATASET_NAMES, DatasetFileNotFoundError, ReferDataset, build_dataset

pytestmark = [pytest.mark.usefixtures("nltk_data_dir"),
              pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")]

SIZE = 32
# (dataset, splitBy) -> split names the files hold; "test" selects every split containing "test".
FAMILY = {
    ("refcoco", "unc"): ("train", "val", "testA", "testB"),
    ("refcoco+", "unc"): ("train", "val", "testA", "testB"),
    ("refcocog", "umd"): ("train", "val", "test"),
    ("refcocog", "google"): ("train", "val"),
}
LOCATION_WORDS = {"left", "right", "top", "bottom", "middle", "center", "upper", "lower", "above", "below",
                  "near", "next", "beside", "corner", "side"}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    out = tmp_path_factory.mktemp("refcoco")
    paths = syn.generate(out / "syn", seed=0, num_images=6, num_val=2, num_test=4, image_size=SIZE,
                         layouts="refcoco")
    return {"root": paths["refcoco"], "tok": paths["bert"], "cache": out / "cache"}


def load_refs(data, name, split_by) -> list[dict]:
    return pickle.loads((data["root"] / name / f"refs({split_by}).p").read_bytes())  # our own file


def dataset(data, name, split, split_by, **kw):
    kw.setdefault("img_size", SIZE)
    kw.setdefault("cache_dir", data["cache"])
    kw.setdefault("mode", "eval")
    return build_dataset(name, data["root"], split, data["tok"], splitBy=split_by, max_tokens=None, **kw)


def test_names_are_registered():
    assert {"refcoco", "refcoco+", "refcocog"} <= set(DATASET_NAMES)


@pytest.mark.parametrize("name,split_by", list(FAMILY))
def test_every_split_loads(data, name, split_by):
    refs = load_refs(data, name, split_by)
    assert {r["split"] for r in refs} == set(FAMILY[(name, split_by)])
    splits = list(FAMILY[(name, split_by)])
    if any("test" in s for s in splits) and "test" not in splits:
        splits.append("test")
    for split in splits:
        ds = dataset(data, name, split, split_by, word_masks=False)
        assert isinstance(ds, ReferDataset) and ds.dataset == name and ds.max_tokens == 20
        expected = [r["ref_id"] for r in refs if (r["split"] == split or (split == "test" and "test" in r["split"]))]
        assert [ds.samples[m[0]].ref_id for m in ds.groups] == expected
        item = ds[0]
        assert item["image"].shape == (3, SIZE, SIZE) and item["text"].shape == (20,)
        assert item["target"].sum() > 0 and item["category"] in syn.COCO_STYLES
        assert not item["t_mask"].any()


def test_test_is_the_union_of_testA_and_testB(data):
    refs = load_refs(data, "refcoco", "unc")
    test, a, b = (dataset(data, "refcoco", s, "unc", word_masks=False) for s in ("test", "testA", "testB"))
    ids = lambda ds: [ds.samples[m[0]].ref_id for m in ds.groups]  # noqa: E731
    assert len(ids(a)) > 0 and len(ids(b)) > 0
    assert sorted(ids(test)) == sorted(ids(a) + ids(b))
    assert ids(test) == [r["ref_id"] for r in refs if r["split"] in ("testA", "testB")]  # pickle order
    assert {refs[i]["split"] for i in ids(a)} == {"testA"} and {refs[i]["split"] for i in ids(b)} == {"testB"}
    with pytest.raises(ValueError, match="no refs"):
        dataset(data, "refcocog", "testA", "google")  # google has no test refs


def test_one_eval_item_per_sentence(data):
    refs = [r for r in load_refs(data, "refcoco", "unc") if r["split"] == "val"]
    assert any(len(r["sentences"]) > 1 for r in refs)
    ds = dataset(data, "refcoco", "val", "unc")
    expected = [(r["ref_id"], k, s["raw"]) for r in refs for k, s in enumerate(r["sentences"])]
    assert len(ds) == len(expected) > len(refs)
    got = [(item["ref_id"], item["sent_index"], item["sentence"]) for item in (ds[i] for i in range(len(ds)))]
    assert got == expected
    # all sentences of a ref share its target; different sentences give different token ids
    first = {}
    for i, (ref_id, k, _) in enumerate(expected):
        item = ds[i]
        if k == 0:
            first[ref_id] = item
        else:
            assert torch.equal(item["target"], first[ref_id]["target"])
            assert not torch.equal(item["text"], first[ref_id]["text"])
    one = dataset(data, "refcoco", "val", "unc", eval_protocol="one-per-ref")
    assert len(one) == len(refs)
    train = dataset(data, "refcoco", "train", "unc", mode="train")
    assert len(train) == sum(r["split"] == "train" for r in load_refs(data, "refcoco", "unc"))
    batch = next(iter(DataLoader(train, batch_size=4)))
    assert batch["image"].shape == (4, 3, SIZE, SIZE) and batch["text"].shape == (4, 20)


def test_no_black_boxes_and_greyscale_images_become_rgb(data):
    train = dataset(data, "refcoco", "train", "unc", mode="train")
    assert not train.black_box_active  # RRSIS-D only
    grey = [i for i, s in enumerate(train.samples) if Image.open(s.image_path).mode == "L"]
    assert grey, "the synthetic COCO images include greyscale ones"
    ev = dataset(data, "refcoco", "train", "unc")
    item = ev[grey[0]]
    mean = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)
    pixels = item["image"] * std + mean  # undo the normalisation: three equal channels
    assert torch.allclose(pixels[0], pixels[1], atol=1e-5) and torch.allclose(pixels[1], pixels[2], atol=1e-5)
    # two evaluations of the same train item are identical (no random boxes in eval mode either)
    assert torch.equal(ev[0]["image"], ev[0]["image"])


def test_word_masks_use_no_class_list(data):
    ds = dataset(data, "refcoco", "val", "unc")
    assert not ds.features.target_mask.any()  # FIANet's class lists are RRSIS-D / RefSegRS only
    assert ds.features.position_mask.any()


def test_refcocog_needs_its_split_by(data):
    assert len(dataset(data, "refcocog", "val", None, word_masks=False)) > 0  # default: umd
    with pytest.raises(DatasetFileNotFoundError) as err:
        dataset(data, "refcocog", "val", "unc")
    message = str(err.value)
    assert "refs(unc).p" in message and "--splitBy umd or google" in message and "\n" not in message


def test_refcoco_plus_has_no_location_words_and_refcoco_has_them(data):
    plus = [s["raw"] for r in load_refs(data, "refcoco+", "unc") for s in r["sentences"]]
    full = [s["raw"] for r in load_refs(data, "refcoco", "unc") for s in r["sentences"]]
    assert plus and not any(set(s.split()) & LOCATION_WORDS for s in plus)
    assert any(set(s.split()) & LOCATION_WORDS for s in full)


def test_generator_layout_is_deterministic_and_complete(data, tmp_path):
    again = syn.generate(tmp_path / "again", seed=0, num_images=6, num_val=2, num_test=4, image_size=SIZE,
                         layouts=["refcoco"])
    assert set(again) == {"refcoco", "bert"} and not (tmp_path / "again" / "rrsisd").exists()
    files = lambda root: {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}  # noqa: E731
    assert files(again["refcoco"]) == files(data["root"])
    for name, split_by in FAMILY:
        refs = load_refs(data, name, split_by)
        instances = json.loads((data["root"] / name / "instances.json").read_text())
        anns = {a["id"]: a for a in instances["annotations"]}
        images = {i["id"]: i for i in instances["images"]}
        assert len({r["ref_id"] for r in refs}) == len(refs)
        for ref in refs:
            assert anns[ref["ann_id"]]["image_id"] == ref["image_id"]
            assert ref["sent_ids"] == [s["sent_id"] for s in ref["sentences"]]
            assert (data["root"] / "images/mscoco/images/train2014" / images[ref["image_id"]]["file_name"]).is_file()
    # the tokenizer covers every caption without [UNK] and within LAVT's 20 tokens
    from transformers import BertTokenizer

    tok = BertTokenizer.from_pretrained(str(data["tok"]))
    for name, split_by in FAMILY:
        for ref in load_refs(data, name, split_by):
            for sent in ref["sentences"]:
                ids = tok.encode(sent["raw"])
                assert tok.unk_token_id not in ids and len(ids) <= 20, sent["raw"]


def test_bad_layout_name(tmp_path):
    with pytest.raises(syn.SyntheticDataError, match=re.escape("--layouts")):
        syn.generate(tmp_path / "x", layouts="rrsisd,coco")


@pytest.mark.parametrize("name,split_by,split", [("refcoco", None, "testB"), ("refcoco+", "unc", "val"),
                                                  ("refcocog", "umd", "test"), ("refcocog", "google", "val")])
def test_data_check_on_the_layout(data, tmp_path, capsys, name, split_by, split):
    argv = ["--dataset", name, "--refer_data_root", str(data["root"]), "--split", split,
            "--bert_tokenizer", str(data["tok"]), "--cache_dir", str(data["cache"]), "--export", str(tmp_path / "x")]
    if split_by:
        argv += ["--splitBy", split_by]
    assert check.main(argv) == 0
    out = capsys.readouterr().out
    refs = [r for r in load_refs(data, name, split_by or "unc")
            if r["split"] == split or (split == "test" and "test" in r["split"])]
    images = {r["image_id"] for r in refs}
    sentences = sum(len(r["sentences"]) for r in refs)
    assert f"{name} {split}: refs {len(refs)}, sentences {sentences}, images {len(images)}" in out
    assert "no warnings" in out
    rows = [json.loads(line) for line in (tmp_path / "x" / "samples.jsonl").read_text().splitlines()]
    assert [(r["ref_id"], r["sent_index"]) for r in rows] == [
        (ref["ref_id"], k) for ref in refs for k in range(len(ref["sentences"]))]
    assert all(len(r["input_ids"]) == 20 for r in rows)
    mask = np.asarray(Image.open(tmp_path / "x" / rows[0]["mask_png"]))
    assert mask.shape == (SIZE, SIZE) and set(np.unique(mask)) == {0, 255}


def test_data_check_refcocog_default_split_by(data, capsys):
    argv = ["--dataset", "refcocog", "--refer_data_root", str(data["root"]), "--split", "train,val",
            "--bert_tokenizer", str(data["tok"]), "--cache_dir", str(data["cache"])]
    assert check.main(argv) == 0
    out = capsys.readouterr().out
    assert "refcocog train: refs" in out and "refcocog val: refs" in out


def test_missing_refcoco_tree_is_a_one_line_error(tmp_path, data, capsys):
    (tmp_path / "empty").mkdir()
    argv = ["--dataset", "refcoco+", "--refer_data_root", str(tmp_path / "empty"), "--split", "val",
            "--bert_tokenizer", str(data["tok"])]
    assert check.main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(Path("refcoco+") / "refs(unc).p") in err
