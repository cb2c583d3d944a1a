"""ReferIt in TRIS's own annotation format (``--dataset referit_tris``): loading, RLE decoding, the
5 %-box rule of its evaluation, the restricted unpickler, and test.py with a tiny TRIS checkpoint."""
from __future__ import annotations

import json
import pickle
import subprocess
from pathlib import Path

import numpy as np
import pytest
from conftest import tiny_checkpoint
from pycocotools import mask as mask_utils
from test_entrypoints import run

import args as args_lib
from data.datasets import DATASET_NAMES, DatasetError, DatasetFileNotFoundError, ReferItTRISDataset, build_dataset
from data.synthetic import generate


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("referit_tris")
    paths = generate(out, seed=3, num_images=4, num_test=3, image_size=64, layouts=("referit_tris",))
    assert set(paths) == {"referit_tris", "bert"}  # opt-in layout: nothing else written
    return paths["referit_tris"]


def _table(root: Path, split: str) -> dict:
    with open(root / "annotations" / f"{split}.pickle", "rb") as f:
        return pickle.load(f)  # our own generated file


def _box_fraction(ann: dict, h: int, w: int) -> float:
    x1, y1, x2, y2 = ann["bbox"][0]
    return (x2 - x1) * (y2 - y1) / (h * w)


def test_registered_names():
    assert "referit_tris" in args_lib.DATASETS and "referit_tris" in DATASET_NAMES


def test_counts_and_small_box_rule(data, tmp_path):
    for split in ("train", "test"):
        anns = [a for entry in _table(data, split).values() for a in entry["annotations"]]
        small = sum(_box_fraction(a, 64, 64) <= 0.05 for a in anns)
        assert 0 < small < len(anns)  # the generator's small squares
        train = build_dataset("referit_tris", data, split, "clip", mode="train", cache_dir=tmp_path, word_masks=False)
        ev = build_dataset("referit_tris", data, split, "clip", mode="eval", cache_dir=tmp_path, word_masks=False)
        assert len(train) == len(train.samples) == len(anns)  # training keeps every annotation
        assert len(ev) == len(anns) - small and ev.small_boxes_skipped == small
        assert all(_box_fraction(ann, 64, 64) > 0.05 for ann in ev.annotations)
        assert [s.ref_id for s in ev.samples] == list(range(len(ev)))  # running index
    item = ev[0]
    assert item["image"].shape == (3, 320, 320) and item["target"].shape == (320, 320)
    assert item["text"].shape == (20,) and int(item["text"][0]) == 49406  # CLIP SOT
    assert item["line"] == -1 and item["sent_index"] == 0 and item["category"] == ""
    assert item["sentence"] == ev.annotations[0]["query"].strip()


def test_masks_and_boxes_match_pycocotools(data, tmp_path):
    ds = ReferItTRISDataset(data, "train", "clip", mode="train", cache_dir=tmp_path, word_masks=False)
    parts_seen = set()
    for i, ann in enumerate(ds.annotations):
        rles = [dict(r, counts=r["counts"].encode("ascii")) for r in ann["segmentation"]]
        decoded = mask_utils.decode(rles)  # (H, W, k)
        parts_seen.add(decoded.shape[2])
        expected = (decoded.sum(axis=2) > 0).astype(np.uint8)
        np.testing.assert_array_equal(ds.original_mask(i), expected)
        x1, y1, x2, y2 = ann["bbox"][0]
        assert ds.original_box(i) == [x1, y1, x2 - x1, y2 - y1]
        ys, xs = np.nonzero(expected)  # the generator's box is the mask's tight box
        assert (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1) == (x1, y1, x2, y2)
    assert parts_seen == {1, 2}  # single-part and two-part RLE lists both decoded and summed


def test_eval_rule_at_exactly_five_percent(tmp_path):
    """A box of exactly 5 % is skipped (the rule keeps only area > 5 %); one pixel more is kept."""
    from PIL import Image

    (tmp_path / "annotations").mkdir()
    (tmp_path / "images").mkdir()
    h, w = 20, 40  # 5 % = 40 px
    Image.fromarray(np.zeros((h, w, 3), np.uint8)).save(tmp_path / "images" / "7.jpg")
    mask = np.zeros((h, w), np.uint8)
    mask[0:4, 0:10] = 1
    rle = mask_utils.encode(np.asfortranarray(mask))
    anns = [{"image_id": 7, "query": "exactly five", "bbox": [[0, 0, 10, 4]], "segmentation": [rle]},
            {"image_id": 7, "query": "just over", "bbox": [[0, 0, 41, 1]], "segmentation": [rle]}]
    with open(tmp_path / "annotations" / "test.pickle", "wb") as f:
        pickle.dump({"7": {"annotations": anns}}, f, protocol=4)  # bytes RLE counts, Python 3 style
    ds = ReferItTRISDataset(tmp_path, "test", "clip", mode="eval", cache_dir=tmp_path, word_masks=False)
    assert [s.sentence for s in ds.samples] == ["just over"] and ds.small_boxes_skipped == 1
    assert ds.original_mask(0).sum() == 40


class _Evil:
    def __reduce__(self):
        return (subprocess.call, (["true"],))


def test_restricted_unpickler_refuses_globals(tmp_path):
    (tmp_path / "annotations").mkdir()
    with open(tmp_path / "annotations" / "test.pickle", "wb") as f:
        pickle.dump({"1": {"annotations": [{"query": _Evil()}]}}, f)
    with pytest.raises(DatasetError, match=r"refusing to unpickle subprocess\.call"):
        ReferItTRISDataset(tmp_path, "test", "clip", mode="eval", cache_dir=tmp_path)
    with open(tmp_path / "annotations" / "test.pickle", "wb") as f:
        pickle.dump({"1": {"annotations": [{"query": "x", "bbox": [{1, 2}]}]}}, f)  # a set: no global, still refused
    with pytest.raises(DatasetError, match="unexpected set value"):
        ReferItTRISDataset(tmp_path, "test", "clip", mode="eval", cache_dir=tmp_path)
    with pytest.raises(DatasetFileNotFoundError, match=r"val\.pickle.*train, test"):
        ReferItTRISDataset(tmp_path, "val", "clip", mode="eval", cache_dir=tmp_path)


def test_tris_checkpoint_evaluates_on_referit_tris(data, tmp_path):
    ckpt = tiny_checkpoint("tris_stage2", tmp_path / "tris_stage2.pth", {"dataset": "referit_tris", "img_size": 64})
    res = tmp_path / "res.json"
    run("test.py", "--resume", str(ckpt), "--dataset", "referit_tris", "--refer_data_root", str(data),
        "--cache_dir", str(tmp_path / "cache"), "--workers", "0", "--device", "cpu", "--split", "all",
        "--save_json", str(res))
    summary = json.loads(res.read_text())
    anns = [a for entry in _table(data, "test").values() for a in entry["annotations"]]
    assert summary["num_samples"] == sum(_box_fraction(a, 64, 64) > 0.05 for a in anns)
    assert 0.0 <= summary["mIoU"] <= 1.0 and "PointM" in summary
