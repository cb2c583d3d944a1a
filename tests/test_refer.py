"""REFER API: loading, split semantics, mask decoding and the restricted unpickler."""
from __future__ import annotations

import json
import os
import pickle

import numpy as np
import pytest
from pycocotools import mask as mask_utils

from refer.refer import REFER, ReferError, ReferFileNotFoundError, decode_segmentation, load_refs_pickle

# pycocotools' own numpy-2 deprecation notice when the tests decode expected masks directly
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

H, W = 8, 10


def square(x0, y0, x1, y1):
    """Polygon of the axis-aligned square with corners (x0, y0) and (x1, y1)."""
    return [x0, y0, x1, y0, x1, y1, x0, y1]


def rle_of(array):
    rle = mask_utils.encode(np.asfortranarray(array.astype(np.uint8)))
    return {"size": list(rle["size"]), "counts": rle["counts"].decode("ascii")}


def block(y0, y1, x0, x1):
    m = np.zeros((H, W), np.uint8)
    m[y0:y1, x0:x1] = 1
    return m


SEGMENTATIONS = {
    10: [square(1, 1, 4, 4)],                          # one polygon
    11: [square(0, 0, 3, 3), square(6, 4, 9, 7)],      # two disjoint polygons
    12: [rle_of(block(2, 5, 2, 6))],                   # list of compressed RLE dicts
    13: rle_of(block(0, 2, 0, 10)),                    # bare RLE dict (reference crashes)
    # uncompressed RLE, column-major runs: 9 zeros, 3 ones (rows 1..3 of column 1), then zeros
    14: [{"size": [H, W], "counts": [9, 3, H * W - 12]}],
    15: [square(1, 1, 5, 5), square(3, 3, 7, 7)],      # overlapping polygons -> overlap sums to 2
}
SPLITS = {10: "train", 11: "val", 12: "test", 13: "testA", 14: "testB", 15: "testAB"}
REF_ORDER = [13, 10, 15, 11, 12, 14]  # deliberately not sorted


def write_refer(root, segmentations=SEGMENTATIONS, splits=SPLITS, order=REF_ORDER, dataset="rrsisd"):
    data_dir = root / dataset
    data_dir.mkdir(parents=True)
    images = [{"id": i, "file_name": f"{i}.jpg", "height": H, "width": W} for i in segmentations]
    anns = [{"id": 100 + i, "image_id": i, "category_id": 1, "segmentation": seg, "bbox": [0, 0, 1, 1]}
            for i, seg in segmentations.items()]
    (data_dir / "instances.json").write_text(json.dumps(
        {"images": images, "annotations": anns, "categories": [{"id": 1, "name": "vehicle"}]}))
    refs = [{"ref_id": i, "ann_id": 100 + i, "image_id": i, "category_id": 1, "split": splits[i],
             "sent_ids": [1000 + i], "sentences": [{"raw": f"ref {i}", "sent": f"ref {i}", "sent_id": 1000 + i,
                                                     "tokens": ["ref", str(i)]}]} for i in order]
    with open(data_dir / "refs(unc).p", "wb") as f:
        pickle.dump(refs, f, protocol=2)
    return root


@pytest.fixture()
def refer(tmp_path):
    return REFER(write_refer(tmp_path), "rrsisd", "unc")


def test_refs_keep_pickle_order_and_index(refer, tmp_path):
    assert refer.getRefIds() == REF_ORDER
    assert [r["ref_id"] for r in refer.loadRefs([15, 10])] == [15, 10]
    assert refer.loadRefs(11)[0]["ann_id"] == 111
    assert refer.getAnnIds(ref_ids=[12]) == [112]
    assert refer.getImgIds(ref_ids=[14, 10, 14]) == [14, 10]
    assert refer.loadImgs(12)[0]["file_name"] == "12.jpg"
    assert refer.loadAnns([110])[0]["image_id"] == 10
    assert refer.Cats[1] == "vehicle"
    assert refer.image_dir == tmp_path / "images" / "rrsisd" / "JPEGImages"
    assert refer.image_path(12) == refer.image_dir / "12.jpg"
    assert refer.getRefIds(image_ids=[11]) == [11]


@pytest.mark.parametrize("split,expected", [
    ("train", [10]), ("val", [11]),
    ("test", [13, 15, 12, 14]),      # every split containing "test", pickle order
    ("testA", [13, 15]),             # last letter contained: testA and testAB
    ("testB", [15, 14]),
    ("testC", []),
    ("testAB", [15]),                # exact
])
def test_split_semantics(refer, split, expected):
    assert refer.getRefIds(split=split) == expected


def test_unknown_split_is_a_clear_error(refer):
    with pytest.raises(ReferError, match="no such split 'tran'"):
        refer.getRefIds(split="tran")


def expected_polygons(polys):
    return mask_utils.decode(mask_utils.frPyObjects(polys, H, W)).sum(axis=2)


def test_polygon_masks(refer):
    single = refer.getMask(refer.Refs[10])
    assert single.dtype == np.uint8 and single.shape == (H, W)
    np.testing.assert_array_equal(single, expected_polygons(SEGMENTATIONS[10]))
    assert set(np.unique(single)) == {0, 1} and single[2, 2] == 1 and single[6, 8] == 0
    double = refer.getMask(refer.Refs[11])
    np.testing.assert_array_equal(double, expected_polygons(SEGMENTATIONS[11]))
    assert double[1, 1] == 1 and double[5, 7] == 1 and double.max() == 1


def test_rle_list_bare_dict_and_uncompressed(refer):
    np.testing.assert_array_equal(refer.getMask(refer.Refs[12]), block(2, 5, 2, 6))
    np.testing.assert_array_equal(refer.getMask(refer.Refs[13]), block(0, 2, 0, 10))
    np.testing.assert_array_equal(refer.getMask(refer.Refs[14]), block(1, 4, 1, 2))


def test_overlapping_parts_sum_to_two(refer):
    summed = refer.getMask(refer.Refs[15])
    assert summed.max() == 2
    assert summed[4, 4] == 2 and summed[2, 2] == 1 and summed[6, 6] == 1 and summed[0, 0] == 0


def test_decode_segmentation_errors():
    with pytest.raises(ReferError, match="RLE size"):
        decode_segmentation([{"size": [3, 3], "counts": [9]}], H, W)
    with pytest.raises(ReferError, match="unsupported segmentation"):
        decode_segmentation("nope", H, W)
    assert decode_segmentation([], H, W).sum() == 0


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned > PWNED_MARKER",))


def test_hostile_pickle_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_refer(tmp_path)
    path = tmp_path / "rrsisd" / "refs(unc).p"
    path.write_bytes(pickle.dumps([{"ref_id": 1, "payload": _Evil()}], protocol=2))
    with pytest.raises(ReferError) as err:
        REFER(tmp_path, "rrsisd")
    message = str(err.value)
    assert "system" in message and str(path) in message and "\n" not in message
    assert not (tmp_path / "PWNED_MARKER").exists()


@pytest.mark.parametrize("payload,match", [
    ({1, 2}, "unexpected set"),                        # protocol-4 set opcodes need no import
    ({"refs": []}, "list of ref dicts"),
    (b"\x00bytes", "unexpected bytes"),
])
def test_non_plain_pickles_are_refused(tmp_path, payload, match):
    path = tmp_path / "refs.p"
    path.write_bytes(pickle.dumps(payload, protocol=4))
    with pytest.raises(ReferError, match=match):
        load_refs_pickle(path)


def test_garbage_pickle_is_one_line_error(tmp_path):
    path = tmp_path / "refs.p"
    path.write_bytes(b"\x80\x04garbage")
    with pytest.raises(ReferError) as err:
        load_refs_pickle(path)
    assert str(path) in str(err.value) and "\n" not in str(err.value)


def test_missing_files_name_the_path(tmp_path):
    with pytest.raises(ReferFileNotFoundError, match="data root"):
        REFER(tmp_path / "nowhere")
    write_refer(tmp_path)
    with pytest.raises(ReferFileNotFoundError, match=r"refs\(umd\)\.p"):
        REFER(tmp_path, "rrsisd", "umd")
    (tmp_path / "rrsisd" / "instances.json").unlink()
    with pytest.raises(ReferFileNotFoundError, match="instances.json"):
        REFER(tmp_path, "rrsisd")


def test_refcoco_family_image_folder(tmp_path):
    write_refer(tmp_path, dataset="refcoco+")
    refer = REFER(tmp_path, "refcoco+")
    assert refer.image_dir == tmp_path / "images" / "mscoco" / "images" / "train2014"
    with pytest.raises(ReferError, match="unknown REFER dataset"):
        REFER(tmp_path, "cityscapes")
