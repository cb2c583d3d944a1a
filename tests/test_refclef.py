"""ReferIt (``--dataset refclef``): the synthetic REFER layout, the dataset loader on it (RLE masks
through the REFER API, SAIAPR image folders, both split files, every sentence evaluated) and
LGFormer through train.py -> test.py on it."""
from __future__ import annotations

import json
import pickle
import re

import numpy as np
import pytest
import torch
from pycocotools import mask as mask_utils
from test_entrypoints import TINY, data_args, run, synth  # noqa: F401  (session fixture)

import args as args_lib
import data.synthetic as syn
from data.datasets import DATASET_NAMES, DatasetFileNotFoundError, ReferDataset, build_dataset, split_counts
from refer.refer import IMAGE_DIRS

SIZE = 40


@pytest.fixture(scope="module")
def clef(tmp_path_factory):
    out = tmp_path_factory.mktemp("clef")
    paths = syn.generate(out / "syn", seed=2, num_images=5, num_val=2, num_test=3, image_size=SIZE,
                         layouts="refclef")
    return {"root": paths["refclef"], "tok": paths["bert"], "cache": out / "cache"}


def load_refs(clef, split_by="unc"):
    with open(clef["root"] / "refclef" / f"refs({split_by}).p", "rb") as f:
        return pickle.load(f)  # written by the test's own generator


def load_instances(clef):
    return json.loads((clef["root"] / "refclef" / "instances.json").read_text())


def make(clef, split, **kw):
    kw.setdefault("mode", "eval")
    return build_dataset("refclef", clef["root"], split, clef["tok"], img_size=SIZE, cache_dir=clef["cache"],
                         word_masks=False, **kw)


def test_names_are_registered():
    assert "refclef" in args_lib.DATASETS and "refclef" in DATASET_NAMES
    assert str(IMAGE_DIRS["refclef"]).replace("\\", "/") == "images/saiapr_tc-12"


def test_layout_files_and_rle_segmentations(clef):
    root = clef["root"]
    assert {p.name for p in (root / "refclef").iterdir()} == {"refs(unc).p", "refs(berkeley).p", "instances.json"}
    inst = load_instances(clef)
    names = [img["file_name"] for img in inst["images"]]
    assert len(names) == 5 + 2 + 3
    for img in inst["images"]:  # SAIAPR TC-12: <id // 1000, 2 digits>/images/<id>.jpg
        assert img["file_name"] == f"{img['id'] // 1000:02d}/images/{img['id']}.jpg"
        assert (root / "images" / "saiapr_tc-12" / img["file_name"]).is_file()
    assert len({n.split("/")[0] for n in names}) > 1  # spread over several folders
    kinds = set()
    for ann in inst["annotations"]:
        seg = ann["segmentation"]
        parts = [seg] if isinstance(seg, dict) else seg
        kinds.add(type(seg).__name__)
        assert all(isinstance(p, dict) and isinstance(p["counts"], str) and p["size"] == [SIZE, SIZE] for p in parts)
    assert kinds == {"dict", "list"}  # both RLE forms the REFER API reads


def test_splits_and_every_sentence_evaluated(clef):
    refs = load_refs(clef)
    for split in syn.SPLITS:
        mine = [r for r in refs if r["split"] == split]
        ds = make(clef, split)
        assert isinstance(ds, ReferDataset) and ds.max_tokens == 20
        counts = split_counts(ds)
        assert counts["refs"] == len(mine) and counts["sentences"] == sum(len(r["sentences"]) for r in mine)
        assert len(ds) == counts["sentences"]  # 'all': one item per (ref, sentence)
        assert [(s.ref_id, s.sentence) for s in ds.samples] == [
            (r["ref_id"], t["raw"]) for r in mine for t in r["sentences"]]
        assert len(make(clef, split, eval_protocol="one-per-ref")) == len(mine)
        assert all("saiapr_tc-12" in s.image_path for s in ds.samples)
    assert any(len(r["sentences"]) > 1 for r in refs)  # 'all' and 'one-per-ref' really differ
    assert len(make(clef, "train", mode="train")) == sum(r["split"] == "train" for r in refs)


def test_masks_are_the_decoded_rle(clef):
    anns = {a["id"]: a for a in load_instances(clef)["annotations"]}
    forms = set()
    for split in syn.SPLITS:
        ds = make(clef, split)
        for row, sample in enumerate(ds.samples):
            seg = anns[ds.refer.Refs[sample.ref_id]["ann_id"]]["segmentation"]
            forms.add(type(seg).__name__)
            parts = [seg] if isinstance(seg, dict) else seg
            rles = [{"size": p["size"], "counts": p["counts"].encode()} for p in parts]
            expected = (mask_utils.decode(rles).sum(axis=2) == 1).astype(np.uint8)
            got = ds.original_mask(row)
            assert got.shape == (SIZE, SIZE) and got.sum() > 0
            np.testing.assert_array_equal(got, expected)
    assert forms == {"dict", "list"}  # the bare RLE dict went through the loader too
    item = ds[0]
    assert item["image"].shape == (3, SIZE, SIZE) and item["target"].shape == (SIZE, SIZE)
    # Same size as the original here, so the nearest resize keeps the mask unchanged.
    np.testing.assert_array_equal(item["target"].numpy(), ds.get_original_mask(0))


def test_berkeley_split_file(clef):
    unc, berkeley = load_refs(clef, "unc"), load_refs(clef, "berkeley")
    assert [r["ref_id"] for r in unc] == [r["ref_id"] for r in berkeley]
    assert [r["split"] for r in unc] != [r["split"] for r in berkeley]
    for split in syn.SPLITS:
        ds = make(clef, split, splitBy="berkeley")
        assert split_counts(ds)["refs"] == sum(r["split"] == split for r in berkeley)


def test_wrong_split_file_names_the_choices(clef):
    with pytest.raises(DatasetFileNotFoundError, match=re.escape("unc or berkeley")) as err:
        make(clef, "test", splitBy="umd")
    assert "refs(umd).p" in str(err.value) and "\n" not in str(err.value)


def _files(root):
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def test_generator_is_deterministic_and_leaves_other_layouts_alone(clef, tmp_path):
    kw = dict(seed=2, num_images=5, num_val=2, num_test=3, image_size=SIZE)
    again = syn.generate(tmp_path / "again", layouts=["refclef"], **kw)
    assert set(again) == {"refclef", "bert"}
    assert _files(again["refclef"]) == _files(clef["root"])
    # The refclef stream is spawned after the older layouts': their files do not change with it.
    both = syn.generate(tmp_path / "both", layouts="rrsisd,refclef", **kw)
    alone = syn.generate(tmp_path / "alone", layouts="rrsisd", **kw)
    assert _files(both["rrsisd"]) == _files(alone["rrsisd"])
    assert _files(both["refclef"]) == _files(clef["root"])


def test_lgformer_train_test_on_refclef(synth, tmp_path):  # noqa: F811
    out = tmp_path / "run"
    run("train.py", "--model", "lgformer", *data_args(synth, "refclef"), *TINY, "--epochs", "1", "-b", "4",
        "--output-dir", str(out))
    ck = torch.load(out / "checkpoint_best.pth", weights_only=True)
    assert ck["config"]["model"] == "lgformer" and ck["args"]["dataset"] == "refclef"
    res = tmp_path / "res.json"
    run("test.py", "--resume", str(out / "checkpoint_best.pth"), *data_args(synth, "refclef"),
        "--workers", "0", "--device", "cpu", "--split", "test", "--save_json", str(res))
    summary = json.loads(res.read_text())
    with open(synth["refclef"] / "refclef" / "refs(unc).p", "rb") as f:
        refs = pickle.load(f)
    sentences = sum(len(r["sentences"]) for r in refs if r["split"] == "test")
    assert summary["num_samples"] == sentences  # every sentence of every test ref
    assert 0.0 <= summary["mIoU"] <= 1.0
