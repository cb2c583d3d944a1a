"""Datasets: item contract, sentence protocols, transforms, black boxes, masks, cache, errors."""
from __future__ import annotations

import json
import pickle
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader
from torchvision.transforms import functional as TF

from data import datasets as ds_mod
from data import word_masks
from data.datasets import (
    DatasetError,
    DatasetFileNotFoundError,
    RefSegRSDataset,
    RRSISDDataset,
    build_dataset,
    read_refsegrs_mask,
)
from data.tokenizer import TokenizerFolderError
from data.transforms import black_box, choose_black_box_refs

pytestmark = pytest.mark.usefixtures("nltk_data_dir")

ITEM_KEYS = {"image", "target", "text", "l_mask", "t_mask", "p_mask", "ref_id", "line", "sent_index",
             "sentence", "category", "index"}

# ref_id -> (split, sentences, polygons, image size (w, h), white image?)
RRSISD_REFS = {
    7: ("train", ["the vehicle on the left", "a white vehicle", "the vehicle near the bridge"],
        [[4, 4, 20, 4, 20, 20, 4, 20]], (64, 64), True),
    3: ("train", ["the ship on the right"], [[30, 30, 60, 30, 60, 60, 30, 60]], (64, 64), True),
    9: ("train", ["the bridge"], [[0, 0, 10, 0, 10, 10, 0, 10]], (64, 64), True),
    4: ("train", ["a large storage tank"], [[5, 40, 25, 40, 25, 60, 5, 60]], (64, 64), True),
    5: ("train", ["the dam"], [[40, 0, 63, 0, 63, 20, 40, 20]], (64, 64), True),
    # two overlapping polygons: the overlap is background in the target (sum == 1 quirk)
    11: ("val", ["the airplane at the top", "an airplane in the middle", "the airplane"],
         [[2, 2, 30, 2, 30, 20, 2, 20], [20, 10, 45, 10, 45, 35, 20, 35]], (50, 40), False),
    12: ("val", ["the windmill on the right", "a windmill"], [[35, 5, 48, 5, 48, 30, 35, 30]], (50, 40), False),
    13: ("val", ["the harbor", "the ship near the harbor", "a harbor on the left"],
         [[1, 1, 20, 1, 20, 38, 1, 38]], (50, 40), False),
    20: ("test", ["the stadium"], [[10, 10, 30, 10, 30, 30, 10, 30]], (50, 40), False),
}

REFSEGRS_LINES = {
    "train": ["101 the car on the street", "102 a van near the building", "", "103 the tree on the left"],
    "val": ["201 the road marking on the road"],
    "test": ["301 the yellow car near the low vegetation", "302 the bus on the road"],
}
REFSEGRS_MASK_VALUES = [0, 50, 51, 255]  # one band each: > 50 keeps the last two


def write_vocab(folder: Path, sentences) -> dict:
    words = sorted({w for s in sentences for w in s.lower().split()})
    tokens = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + words
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.txt").write_text("\n".join(tokens) + "\n")
    return {t: i for i, t in enumerate(tokens)}


def noise_image(size, seed, white=False) -> Image.Image:
    w, h = size
    if white:
        return Image.new("RGB", (w, h), (255, 255, 255))
    return Image.fromarray(np.random.RandomState(seed).randint(0, 256, (h, w, 3), dtype=np.uint8))


def write_rrsisd(root: Path, refs=RRSISD_REFS) -> Path:
    data_dir, image_dir = root / "rrsisd", root / "images" / "rrsisd" / "JPEGImages"
    data_dir.mkdir(parents=True)
    image_dir.mkdir(parents=True)
    images, anns, ref_list = [], [], []
    for ref_id, (split, sentences, polygons, size, white) in refs.items():
        image_id, ann_id = 1000 + ref_id, 2000 + ref_id
        noise_image(size, ref_id, white).save(image_dir / f"{image_id}.png")  # lossless for exact checks
        images.append({"id": image_id, "file_name": f"{image_id}.png", "width": size[0], "height": size[1]})
        anns.append({"id": ann_id, "image_id": image_id, "category_id": 1, "segmentation": polygons})
        ref_list.append({"ref_id": ref_id, "ann_id": ann_id, "image_id": image_id, "category_id": 1,
                         "split": split, "sent_ids": list(range(len(sentences))),
                         "sentences": [{"raw": s, "sent": s, "sent_id": 10 * ref_id + k, "tokens": s.split()}
                                       for k, s in enumerate(sentences)]})
    (data_dir / "instances.json").write_text(json.dumps(
        {"images": images, "annotations": anns, "categories": [{"id": 1, "name": "vehicle"}]}))
    with open(data_dir / "refs(unc).p", "wb") as f:
        pickle.dump(ref_list, f, protocol=2)
    return root


def write_refsegrs(root: Path, lines=REFSEGRS_LINES) -> Path:
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    for split, split_lines in lines.items():
        (root / f"output_phrase_{split}.txt").write_text("\n".join(split_lines) + "\n")
        for line in split_lines:
            if not line:
                continue
            sample_id = line.split(" ")[0]
            noise_image((24, 20), int(sample_id)).save(root / "images" / f"{sample_id}.tif")
            mask = np.zeros((20, 24), np.uint8)
            for band, value in enumerate(REFSEGRS_MASK_VALUES):
                mask[5 * band:5 * band + 5, :] = value
            Image.fromarray(mask).save(root / "masks" / f"{sample_id}.tif")
    return root


def all_sentences():
    sents = [s for ref in RRSISD_REFS.values() for s in ref[1]]
    return sents + [line.partition(" ")[2] for ls in REFSEGRS_LINES.values() for line in ls if line]


@pytest.fixture()
def env(tmp_path):
    write_vocab(tmp_path / "tok", all_sentences())
    return {"rrsisd": write_rrsisd(tmp_path / "rrsisd_root"), "refsegrs": write_refsegrs(tmp_path / "refsegrs_root"),
            "tok": tmp_path / "tok", "cache": tmp_path / "cache"}


def rrsisd(env, split, **kw):
    kw.setdefault("cache_dir", env["cache"])
    kw.setdefault("img_size", 32)
    return RRSISDDataset(env["rrsisd"], split, env["tok"], **kw)


def refsegrs(env, split, **kw):
    kw.setdefault("cache_dir", env["cache"])
    kw.setdefault("img_size", 32)
    return RefSegRSDataset(env["refsegrs"], split, env["tok"], **kw)


def check_item(item, size, n):
    assert set(item) == ITEM_KEYS
    assert item["image"].dtype == torch.float32 and item["image"].shape == (3, size, size)
    assert item["target"].dtype == torch.int64 and item["target"].shape == (size, size)
    assert set(item["target"].unique().tolist()) <= {0, 1}
    for key in ("text", "l_mask", "t_mask", "p_mask"):
        assert item[key].dtype == torch.int64 and item[key].shape == (n,)
    for key in ("ref_id", "line", "sent_index", "index"):
        assert type(item[key]) is int
    assert isinstance(item["sentence"], str) and isinstance(item["category"], str)


def test_rrsisd_items_and_collate(env):
    ds = rrsisd(env, "val", mode="eval")
    assert len(ds) == 8  # 3 + 2 + 3 sentences
    item = ds[0]
    check_item(item, 32, 22)
    assert (item["ref_id"], item["line"], item["sent_index"], item["index"]) == (11, -1, 0, 0)
    assert item["sentence"] == "the airplane at the top" and item["category"] == "vehicle"
    # [CLS] the airplane at the top [SEP] -> 7 real tokens; airplane is NLTK word 1 -> position 2
    assert item["l_mask"].tolist() == [1] * 7 + [0] * 15
    assert item["t_mask"].nonzero().flatten().tolist() == [2]
    assert item["p_mask"].nonzero().flatten().tolist() == [3, 4, 5]  # "at the top"
    batch = next(iter(DataLoader(ds, batch_size=3)))
    assert batch["image"].shape == (3, 3, 32, 32) and batch["text"].shape == (3, 22)
    assert batch["ref_id"].tolist() == [11, 11, 11] and batch["sent_index"].tolist() == [0, 1, 2]
    assert batch["sentence"][1] == "an airplane in the middle"


def test_refsegrs_items(env):
    ds = refsegrs(env, "train", mode="eval")
    assert len(ds) == 3  # the blank line is skipped but keeps its number
    assert [ds[i]["line"] for i in range(3)] == [0, 1, 3]
    item = ds[0]
    check_item(item, 32, 20)
    assert (item["ref_id"], item["sent_index"], item["category"]) == (-1, 0, "")
    assert item["sentence"] == "the car on the street"
    assert item["t_mask"].nonzero().flatten().tolist() == [2, 5]  # car, "tree" inside street
    assert ds.samples[2].image_path.endswith("images/103.tif")


def test_eval_protocols(env):
    all_ds = rrsisd(env, "val", mode="eval", eval_protocol="all")
    assert [(s.ref_id, s.sent_index) for s in all_ds.samples] == [
        (11, 0), (11, 1), (11, 2), (12, 0), (12, 1), (13, 0), (13, 1), (13, 2)]
    assert [all_ds[i]["sent_index"] for i in range(len(all_ds))] == [0, 1, 2, 0, 1, 0, 1, 2]
    picks = {}
    for seed in range(8):
        one = rrsisd(env, "val", mode="eval", eval_protocol="one-per-ref", seed=seed)
        assert len(one) == 3 and [one[i]["ref_id"] for i in range(3)] == [11, 12, 13]
        chosen = tuple(one[i]["sent_index"] for i in range(3))
        again = rrsisd(env, "val", mode="eval", eval_protocol="one-per-ref", seed=seed)
        assert tuple(again[i]["sent_index"] for i in range(3)) == chosen  # deterministic per seed
        assert chosen == tuple(one[i]["sent_index"] for i in range(3))  # and per access
        picks[seed] = chosen
    assert len(set(picks.values())) > 1  # the seed matters


def test_train_mode_draws_a_sentence_per_access(env):
    ds = rrsisd(env, "val", mode="train")
    assert len(ds) == 3
    np.random.seed(0)
    seen = {ds[0]["sent_index"] for _ in range(30)}
    assert seen == {0, 1, 2}
    assert {ds[1]["ref_id"] for _ in range(5)} == {12}


def test_pil_resize_and_normalise_equality(env):
    ds = rrsisd(env, "val", mode="eval", img_size=32)
    item = ds[0]
    image = Image.open(env["rrsisd"] / "images" / "rrsisd" / "JPEGImages" / "1011.png").convert("RGB")
    expected = TF.normalize(TF.to_tensor(TF.resize(image, [32, 32])), [0.485, 0.456, 0.406], [0.229, 0.224, 0.225])
    assert torch.equal(item["image"], expected)
    summed = ds.refer.getMask(ds.refer.Refs[11])
    target = Image.fromarray((summed == 1).astype(np.uint8)).resize((32, 32), Image.NEAREST)
    assert torch.equal(item["target"], torch.from_numpy(np.array(target, dtype=np.int64)))


def test_original_masks_and_overlap_holes(env):
    ds = rrsisd(env, "val", mode="eval")
    mask = ds.get_original_mask(0)
    assert mask.shape == (40, 50) and mask.dtype == np.uint8
    assert mask[5, 5] == 1 and mask[25, 40] == 1  # inside one polygon each
    assert mask[15, 25] == 0  # inside both polygons: summed to 2 -> background
    assert ds.original_mask(3).shape == (40, 50)


def test_refsegrs_mask_threshold(env, tmp_path):
    ds = refsegrs(env, "val", mode="eval")
    mask = ds.get_original_mask(0)
    assert mask.shape == (20, 24)
    assert [int(mask[5 * b, 0]) for b in range(4)] == [0, 0, 1, 1]  # values 0, 50, 51, 255
    # colour masks are converted to grey; 16-bit masks keep their raw depth (OpenCV ANYDEPTH)
    rgb = np.zeros((2, 2, 3), np.uint8)
    rgb[0, 0] = 255
    rgb[1, 1] = (40, 40, 40)
    Image.fromarray(rgb).save(tmp_path / "rgb.tif")
    assert read_refsegrs_mask(tmp_path / "rgb.tif").tolist() == [[1, 0], [0, 0]]
    Image.fromarray(np.array([[0, 51], [50, 65535]], np.uint16)).save(tmp_path / "deep.tif")
    assert read_refsegrs_mask(tmp_path / "deep.tif").tolist() == [[0, 1], [0, 1]]


def white_pixels_lost(item) -> int:
    """Pixels of an all-white original that came out exactly black (normalised)."""
    black = (torch.zeros(3, 1, 1) - torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)) / torch.tensor(
        [0.229, 0.224, 0.225]).view(3, 1, 1)
    return int(torch.isclose(item["image"], black).all(0).sum())


def test_black_box_only_for_train_split_in_train_mode(env):
    train = rrsisd(env, "train", mode="train", img_size=64)  # originals are 64x64 white: no resampling
    assert train.black_box_active and len(train.black_box_refs) == 1  # int(0.2 * 5)
    (boxed,) = train.black_box_refs
    for index, members in enumerate(train.groups):
        ref_id = train.samples[members[0]].ref_id
        lost = white_pixels_lost(train[index])
        assert (lost > 0) == (ref_id == boxed)
        if ref_id == boxed:
            assert lost >= 32 * 32
            assert not torch.equal(train[index]["image"], train[index]["image"])  # fresh boxes per access
    evaluation = rrsisd(env, "train", mode="eval", img_size=64)
    assert not evaluation.black_box_active
    assert all(white_pixels_lost(evaluation[i]) == 0 for i in range(len(evaluation)))
    off = rrsisd(env, "train", mode="train", img_size=64, black_box=False)
    assert all(white_pixels_lost(off[i]) == 0 for i in range(len(off)))
    assert not refsegrs(env, "train", mode="train").__dict__.get("black_box_active", False)


def test_black_box_geometry():
    assert choose_black_box_refs(list(range(10)), 3) == choose_black_box_refs(list(range(10)), 3)
    assert len(choose_black_box_refs(list(range(11)), 0)) == 2
    tall = Image.new("RGB", (32, 100), (255, 255, 255))
    out = np.asarray(black_box(tall, random.Random(0)))
    assert out[:32].min() == 0 and out[32:].min() == 255  # y bounded by the width
    narrow = Image.new("RGB", (10, 40), (255, 255, 255))
    out = np.asarray(black_box(narrow, random.Random(0)))
    assert (out[:10] == 0).all() and (out[10:] == 255).all()  # boxes shrink to the width
    wide = Image.new("RGB", (100, 20), (255, 255, 255))
    assert np.asarray(black_box(wide, random.Random(1))).shape == (20, 100, 3)
    a = np.asarray(black_box(Image.new("RGB", (64, 64), "white"), random.Random(1)))
    b = np.asarray(black_box(Image.new("RGB", (64, 64), "white"), random.Random(2)))
    assert not np.array_equal(a, b)


def test_second_construction_uses_the_cache(env, monkeypatch):
    rrsisd(env, "val", mode="eval")
    refsegrs(env, "test", mode="eval")

    def boom(*_a, **_k):
        raise AssertionError("the tagger ran although the cache should hit")

    monkeypatch.setattr(word_masks.WordMasker, "__init__", boom)
    again = rrsisd(env, "val", mode="eval")
    assert again[2]["sentence"] == "the airplane"
    refsegrs(env, "test", mode="eval")
    with pytest.raises(AssertionError, match="tagger"):
        rrsisd(env, "val", mode="eval", max_tokens=21)


def test_word_masks_off_builds_without_nltk(env, monkeypatch):
    import sys

    def boom(*_a, **_k):
        raise AssertionError("the word masker must not be built with word_masks=False")

    with monkeypatch.context() as patch:
        patch.setitem(sys.modules, "nltk", None)  # `import nltk` raises ImportError
        patch.setattr(word_masks.WordMasker, "__init__", boom)
        plain = {name: fn(env, split, mode="eval", word_masks=False)
                 for name, fn, split in (("rrsisd", rrsisd, "val"), ("refsegrs", refsegrs, "test"))}
        train = rrsisd(env, "train", word_masks=False)
        items = [plain["rrsisd"][0], plain["refsegrs"][1], train[0]]
        batch = next(iter(DataLoader(plain["rrsisd"], batch_size=3)))
    for item, n in zip(items, (22, 20, 22)):
        check_item(item, 32, n)
        assert not item["t_mask"].any() and not item["p_mask"].any()
    assert batch["t_mask"].shape == (3, 22) and not batch["t_mask"].any()
    # The masks are still computed by a later word_masks=True run (its own cache entry), with the same ids.
    full = rrsisd(env, "val", mode="eval")
    assert full[0]["t_mask"].any() and full[0]["p_mask"].any()
    assert torch.equal(full[0]["text"], items[0]["text"]) and torch.equal(full[0]["l_mask"], items[0]["l_mask"])


def test_default_cache_folder_is_under_the_data_root(env):
    RefSegRSDataset(env["refsegrs"], "val", env["tok"], img_size=16)
    assert list((env["refsegrs"] / ".openrrsis_cache").glob("refsegrs-val-20-*.npz"))


def test_build_dataset_factory(env):
    ds = build_dataset("rrsisd", env["rrsisd"], "test", env["tok"], img_size=16, cache_dir=env["cache"],
                       max_tokens=None, mode="eval")
    assert isinstance(ds, RRSISDDataset) and ds.max_tokens == 22 and len(ds) == 1
    ds = build_dataset("refsegrs", env["refsegrs"], "test", env["tok"], img_size=16, cache_dir=env["cache"],
                       max_tokens=None)
    assert isinstance(ds, RefSegRSDataset) and ds.max_tokens == 20 and len(ds) == 2
    with pytest.raises(DatasetError) as err:
        build_dataset("referit", env["rrsisd"], "test", env["tok"])
    assert "--dataset" in str(err.value) and "rrsisd, refsegrs" in str(err.value)


def one_line(excinfo, *needles):
    message = str(excinfo.value)
    assert "\n" not in message
    for needle in needles:
        assert str(needle) in message, message


def test_bad_inputs_are_one_line_errors(env, tmp_path):
    with pytest.raises(FileNotFoundError) as e:
        rrsisd({**env, "rrsisd": tmp_path / "nope"}, "val")
    one_line(e, tmp_path / "nope")
    with pytest.raises(FileNotFoundError) as e:
        refsegrs({**env, "refsegrs": tmp_path / "nope"}, "val")
    one_line(e, tmp_path / "nope")
    with pytest.raises(DatasetError) as e:
        refsegrs(env, "testA")
    one_line(e, "testA", "train, val, test")
    with pytest.raises(ValueError) as e:
        rrsisd(env, "valid")
    one_line(e, "valid")
    with pytest.raises(DatasetError) as e:
        RRSISDDataset(write_rrsisd(tmp_path / "trainonly", {9: RRSISD_REFS[9]}), "val", env["tok"])
    one_line(e, "'val'", "no refs")
    with pytest.raises(TokenizerFolderError) as e:
        rrsisd({**env, "tok": tmp_path}, "val")
    one_line(e, "--bert_tokenizer", tmp_path)
    with pytest.raises(DatasetError) as e:
        rrsisd(env, "val", mode="test")
    one_line(e, "mode")
    with pytest.raises(DatasetError) as e:
        rrsisd(env, "val", mode="eval", eval_protocol="first")
    one_line(e, "eval_protocol")


def test_missing_annotation_and_split_files(env):
    (env["refsegrs"] / "output_phrase_val.txt").unlink()
    with pytest.raises(DatasetFileNotFoundError) as e:
        refsegrs(env, "val")
    one_line(e, "output_phrase_val.txt")
    (env["rrsisd"] / "rrsisd" / "instances.json").unlink()
    with pytest.raises(FileNotFoundError) as e:
        rrsisd(env, "val")
    one_line(e, "instances.json")
    (env["rrsisd"] / "rrsisd" / "refs(unc).p").unlink()
    with pytest.raises(FileNotFoundError) as e:
        rrsisd(env, "val")
    one_line(e, "refs(unc).p")


def test_missing_or_unreadable_image(env):
    ds = rrsisd(env, "val", mode="eval")
    path = Path(ds.samples[0].image_path)
    path.unlink()
    with pytest.raises(DatasetFileNotFoundError) as e:
        ds[0]
    one_line(e, path)
    path.write_bytes(b"this is not an image")
    with pytest.raises(DatasetError) as e:
        ds[0]
    one_line(e, path)
    mask = env["refsegrs"] / "masks" / "201.tif"
    mask.unlink()
    with pytest.raises(DatasetFileNotFoundError) as e:
        refsegrs(env, "val", mode="eval")[0]
    one_line(e, mask)


def test_module_has_no_model_imports():
    source = Path(ds_mod.__file__).read_text()
    assert "import lib" not in source and "from lib" not in source
