"""Tests for the synthetic dataset generator (data/synthetic.py).

A reduced dataset is generated once per module (a few hundred milliseconds) and checked the way
the loaders will read it: the REFER pickle and COCO annotations (masks decoded with pycocotools
exactly like REFER's getMask, overlaps -> holes), the RefSegRS folder (masks as 0/255 greyscale),
and the tiny BERT folder through transformers.
"""
from __future__ import annotations

import hashlib
import io
import json
import pickle
import re
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils

from data import synthetic as syn

SIZE = 48
COUNTS = dict(num_images=12, num_val=3, num_test=4)
# pycocotools' decode warns about numpy 2's copy keyword on every call; not our code.
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

REF_KEYS = {"ref_id", "ann_id", "image_id", "category_id", "split", "sent_ids", "sentences", "file_name"}
SENT_KEYS = {"raw", "sent", "sent_id", "tokens"}


class _NoGlobalsUnpickler(pickle.Unpickler):
    """Plain dicts/lists/strings/numbers only: any class reference is refused."""

    def find_class(self, module, name):  # pragma: no cover - only reached on a bad pickle
        raise pickle.UnpicklingError(f"refs pickle references {module}.{name}")


def _load_refs(root: Path) -> list[dict]:
    data = (root / "rrsisd" / "refs(unc).p").read_bytes()
    return _NoGlobalsUnpickler(io.BytesIO(data)).load()


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _refer_mask(ann: dict, height: int, width: int) -> np.ndarray:
    """REFER getMask + the loaders' ``== 1`` rule; also returns the raw summed count map."""
    seg = ann["segmentation"]
    rle = mask_utils.frPyObjects(seg, height, width) if isinstance(seg[0], list) else seg
    return mask_utils.decode(rle).sum(axis=2)


@pytest.fixture(scope="module")
def out(tmp_path_factory) -> dict[str, Path]:
    return syn.generate(tmp_path_factory.mktemp("syn") / "a", seed=0, image_size=SIZE, **COUNTS)


@pytest.fixture(scope="module")
def rrsisd(out):
    root = out["rrsisd"]
    refs = _load_refs(root)
    inst = json.loads((root / "rrsisd" / "instances.json").read_text())
    anns = {a["id"]: a for a in inst["annotations"]}
    images = {i["id"]: i for i in inst["images"]}
    masks = {}
    for a in inst["annotations"]:
        img = images[a["image_id"]]
        masks[a["id"]] = _refer_mask(a, img["height"], img["width"])
    return refs, inst, anns, images, masks


def _image_array(out, image: dict) -> np.ndarray:
    path = out["rrsisd"] / "images" / "rrsisd" / "JPEGImages" / image["file_name"]
    return np.asarray(Image.open(path).convert("RGB"), dtype=np.float64)


# --------------------------------------------------------------------------------------------
# Determinism, arguments, CLI
# --------------------------------------------------------------------------------------------

def test_same_seed_gives_identical_files_and_other_seed_differs(out, tmp_path):
    again = syn.generate(tmp_path / "b", seed=0, image_size=SIZE, **COUNTS)
    other = syn.generate(tmp_path / "c", seed=1, image_size=SIZE, **COUNTS)
    base = _files(out["rrsisd"].parent)
    assert len(base) > 100
    assert _files(again["rrsisd"].parent) == base
    changed = _files(other["rrsisd"].parent)
    assert changed.keys() - {"synthetic.json"} == base.keys() - {"synthetic.json"}
    differing = [k for k in base if base[k] != changed.get(k)]
    assert len(differing) > len(base) // 2


def test_rerun_replaces_own_output_but_refuses_foreign_folder(tmp_path):
    first = syn.generate(tmp_path / "d", seed=3, num_images=6, num_val=1, num_test=1, image_size=SIZE)
    before = _files(tmp_path / "d")
    syn.generate(tmp_path / "d", seed=3, num_images=2, num_val=1, num_test=1, image_size=SIZE)
    syn.generate(tmp_path / "d", seed=3, num_images=6, num_val=1, num_test=1, image_size=SIZE)
    assert _files(tmp_path / "d") == before  # no stale files from the smaller run
    assert first["bert"] == tmp_path / "d" / "bert"

    (tmp_path / "e" / "rrsisd").mkdir(parents=True)
    (tmp_path / "e" / "rrsisd" / "mine.txt").write_text("keep me")
    with pytest.raises(syn.SyntheticDataError, match="not written by data.synthetic"):
        syn.generate(tmp_path / "e", num_images=2)
    assert (tmp_path / "e" / "rrsisd" / "mine.txt").read_text() == "keep me"


@pytest.mark.parametrize("kwargs, flag", [
    (dict(image_size=16), "--image_size"), (dict(num_images=0), "--num_images"),
    (dict(num_val=0), "--num_val"), (dict(num_test=-2), "--num_test"),
    (dict(refs_per_image=0), "--refs_per_image"),
])
def test_bad_arguments_name_the_flag(tmp_path, kwargs, flag):
    with pytest.raises(syn.SyntheticDataError, match=re.escape(flag)):
        syn.generate(tmp_path / "x", **kwargs)
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("classes, message", [
    ("ship,pizza", "unknown class(es) 'pizza'"), ("ship,vehicle", "leaves 2 class(es) of the rrsisd layout"),
])
def test_bad_classes_name_the_flag(tmp_path, classes, message):
    with pytest.raises(syn.SyntheticDataError, match=re.escape(message)):
        syn.generate(tmp_path / "x", layouts="rrsisd", classes=classes)
    assert not (tmp_path / "x").exists()


def test_classes_restrict_the_drawn_objects(tmp_path):
    chosen = ["ship", "vehicle", "storage tank", "windmill"]
    root = syn.generate(tmp_path / "c", seed=1, image_size=SIZE, layouts="rrsisd", classes=",".join(chosen),
                        **COUNTS)["rrsisd"]
    inst = json.loads((root / "rrsisd" / "instances.json").read_text())
    names = {c["id"]: c["name"] for c in inst["categories"]}
    drawn = {names[a["category_id"]] for a in inst["annotations"]}
    assert drawn == set(chosen)  # 19 scenes of 2-3 classes each: every chosen class appears
    captions = [s["raw"] for r in _load_refs(root) for s in r["sentences"]]
    assert all(any(c in text for c in chosen) for text in captions)
    settings = json.loads((tmp_path / "c" / syn.MARKER).read_text())
    assert settings["classes"] == {"rrsisd": chosen}


def test_cli_prints_summary_and_paths(tmp_path, capsys):
    rc = syn.main(["--out", str(tmp_path / "cli"), "--num_images", "4", "--num_val", "1",
                   "--num_test", "2", "--image_size", "40", "--seed", "5"])
    text = capsys.readouterr().out
    assert rc == 0
    assert "rrsisd: train 4 images / 12 refs /" in text and "test 2 images / 6 refs /" in text
    assert "refsegrs: train 4 images / 12 refs / 12 sentences" in text
    assert f"--refer_data_root {tmp_path / 'cli' / 'rrsisd'} --dataset rrsisd" in text
    assert f"--refer_data_root {tmp_path / 'cli' / 'refsegrs'} --dataset refsegrs" in text
    assert str(tmp_path / "cli" / "bert") in text
    assert syn.main(["--out", str(tmp_path / "bad"), "--image_size", "8"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --image_size") and "Traceback" not in err


# --------------------------------------------------------------------------------------------
# RRSIS-D layout
# --------------------------------------------------------------------------------------------

def test_refs_pickle_is_a_list_of_plain_ref_dicts(out, rrsisd):
    refs, inst, anns, images, _ = rrsisd
    assert isinstance(refs, list) and len(refs) == 3 * sum(COUNTS.values())
    assert [r["ref_id"] for r in refs] == list(range(len(refs)))
    splits = [r["split"] for r in refs]
    assert splits == sorted(splits, key=["train", "val", "test"].index)  # stored in split order
    assert {s: len({r["image_id"] for r in refs if r["split"] == s}) for s in syn.SPLITS} == {
        "train": 12, "val": 3, "test": 4}
    sent_ids = []
    for r in refs:
        assert type(r) is dict and set(r) == REF_KEYS
        ann = anns[r["ann_id"]]
        assert ann["image_id"] == r["image_id"] and ann["category_id"] == r["category_id"]
        assert r["file_name"] == images[r["image_id"]]["file_name"]
        assert 1 <= len(r["sentences"]) <= 2
        assert r["sent_ids"] == [s["sent_id"] for s in r["sentences"]]
        for s in r["sentences"]:
            assert set(s) == SENT_KEYS
            assert s["raw"] == s["sent"] == s["raw"].lower().strip() and s["raw"]
            assert s["tokens"] == s["raw"].split() and all(type(t) is str for t in s["tokens"])
        sent_ids += r["sent_ids"]
    assert sent_ids == list(range(len(sent_ids)))
    assert any(len(r["sentences"]) == 2 for r in refs)  # the multi-sentence path is exercised


def test_instances_json_is_well_formed(out, rrsisd):
    _, inst, anns, images, _ = rrsisd
    assert set(inst) == {"images", "annotations", "categories"}
    assert [c["name"] for c in inst["categories"]] == list(syn.RRSISD_CLASSES)
    assert [c["id"] for c in inst["categories"]] == list(range(1, 21))
    assert len(images) == len(inst["images"]) == sum(COUNTS.values())
    assert len(anns) == len(inst["annotations"])
    for img in inst["images"]:
        assert img["height"] == img["width"] == SIZE
        with Image.open(out["rrsisd"] / "images" / "rrsisd" / "JPEGImages" / img["file_name"]) as im:
            assert im.format == "JPEG" and im.mode == "RGB" and im.size == (SIZE, SIZE)
    per_image = defaultdict(int)
    for a in inst["annotations"]:
        assert set(a) == {"id", "image_id", "category_id", "segmentation", "area", "bbox", "iscrowd"}
        assert a["image_id"] in images and 1 <= a["category_id"] <= 20 and a["iscrowd"] == 0
        assert isinstance(a["segmentation"], list) and a["segmentation"]
        per_image[a["image_id"]] += 1
    assert set(per_image.values()) <= {3, 4, 5}


def test_annotations_decode_to_the_drawn_objects(out, rrsisd):
    refs, inst, anns, images, masks = rrsisd
    kinds = defaultdict(int)
    for a in inst["annotations"]:
        count = masks[a["id"]]
        seg = a["segmentation"]
        if isinstance(seg[0], dict):
            kinds["rle"] += 1
            assert len(seg) == 1 and isinstance(seg[0]["counts"], str) and seg[0]["size"] == [SIZE, SIZE]
        else:
            kinds["multi-polygon" if len(seg) > 1 else "polygon"] += 1
            assert all(len(p) >= 6 and len(p) % 2 == 0 for p in seg)
        # Parts never overlap, so REFER's "== 1" rule leaves the object whole.
        assert count.max() == 1
        m = count == 1
        assert a["area"] == m.sum() > 0
        ys, xs = np.nonzero(m)
        assert a["bbox"] == [xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1]
    assert kinds["rle"] > 0 and kinds["polygon"] > 0 and kinds["multi-polygon"] > 0

    # Objects of one image never overlap each other either.
    for image_id in images:
        total = sum(masks[a] for a in anns if anns[a]["image_id"] == image_id)
        assert total.max() == 1

    # Sanity: every ref's mask covers a uniformly coloured region that stands out from its surroundings.
    for r in refs:
        m = masks[r["ann_id"]] == 1
        img = _image_array(out, images[r["image_id"]])
        inner = syn._erode(m)  # without the darker rim
        ring = _dilate(_dilate(m)) & ~m
        assert inner.sum() > 0
        inside, around = img[inner].mean(axis=0), img[ring].mean(axis=0)
        assert np.linalg.norm(inside - around) > 35, r
        assert img[inner].std(axis=0).max() < 20, r


def _dilate(mask: np.ndarray) -> np.ndarray:
    return ~syn._erode(~mask.astype(bool))


def test_target_masks_are_large_enough_on_average():
    for styles in (syn.RRSISD_STYLES, syn.REFSEGRS_STYLES):
        rng = np.random.default_rng(7)
        fractions = []
        for _ in range(80):
            scene, refs = syn.sample_described_scene(rng, 64, styles, refs_per_image=3)
            fractions += [scene.objects[r.target].area / 64 ** 2 for r in refs]
        assert 0.10 <= np.mean(fractions) <= 0.25
        assert min(fractions) > 0.01


# --------------------------------------------------------------------------------------------
# Captions: unique per image, consistent with the geometry, and needed to find the target
# --------------------------------------------------------------------------------------------

COLOUR_WORDS = sorted(syn.COLOURS, key=len, reverse=True)  # "dark green" before "green"


def _centroid(m: np.ndarray) -> tuple[float, float]:
    ys, xs = np.nonzero(m)
    return xs.mean() + 0.5, ys.mean() + 0.5


def test_captions_are_unique_per_image_and_targets_differ(rrsisd):
    refs, _, anns, images, masks = rrsisd
    by_image = defaultdict(list)
    for r in refs:
        by_image[r["image_id"]].append(r)
    shared_class = 0
    for image_refs in by_image.values():
        assert len(image_refs) == 3
        captions = [s["raw"] for r in image_refs for s in r["sentences"]]
        assert len(captions) == len(set(captions))
        targets = [masks[r["ann_id"]] == 1 for r in image_refs]
        for i in range(len(targets)):
            for j in range(i + 1, len(targets)):
                assert not (targets[i] & targets[j]).any()  # different objects, not one target twice
        cats = [r["category_id"] for r in image_refs]
        shared_class += len(set(cats)) < len(cats)
    # Almost every image has two targets of one class: neither the image nor the class word
    # alone tells which object is meant.
    assert shared_class >= 0.9 * len(by_image)


def test_captions_agree_with_the_geometry(out, rrsisd):
    """Colour, size and absolute position words are true of the target, and a cue that is
    needed (the class occurs more than once) singles the target out."""
    refs, _, anns, images, masks = rrsisd
    colour_of = {}
    for a in anns.values():
        m = masks[a["id"]] == 1
        img = _image_array(out, images[a["image_id"]])
        mean = img[syn._erode(m)].mean(axis=0)
        colour_of[a["id"]] = min(syn.COLOURS, key=lambda k: np.linalg.norm(np.array(syn.COLOURS[k]) - mean))
    names = {i + 1: n for i, n in enumerate(syn.RRSISD_CLASSES)}
    checked = defaultdict(int)
    for r in refs:
        target = anns[r["ann_id"]]
        same = [a for a in anns.values() if a["image_id"] == target["image_id"]
                and a["category_id"] == target["category_id"] and a["id"] != target["id"]]
        name = names[target["category_id"]]
        for s in r["sentences"]:
            text = s["raw"]
            assert name in text
            head, _, tail = text.partition(name)
            words = head.split()
            assert words[0] in ("the", "a")
            colour = next((c for c in COLOUR_WORDS if re.search(rf"\b{c}\b", head)), None)
            if colour:
                assert colour_of[target["id"]] == colour, text
                checked["colour"] += 1
            for size_word, bigger in (("large", True), ("big", True), ("small", False), ("little", False)):
                if size_word in words:
                    assert same, text
                    for o in same:
                        ratio = target["area"] / o["area"]
                        assert ratio >= 1.6 if bigger else ratio <= 1 / 1.6, text
                    checked["size"] += 1
            tail = tail.strip()
            key = next((k for k, v in syn.POSITION_PHRASES.items() if tail in v), None)
            if key is not None:
                cx, cy = _centroid(masks[target["id"]] == 1)
                for value, third in zip((cy, cx), key):
                    if third is not None:
                        lo = syn.THIRDS[third] * SIZE / 3
                        assert lo <= value < lo + SIZE / 3, text
                checked["position"] += 1
            if same and not colour and not any(w in words for w in ("large", "big", "small", "little")):
                assert tail, f"{text!r} does not say which {name}"
            if same and colour and not tail and not any(
                    w in words for w in ("large", "big", "small", "little")):
                assert all(colour_of[o["id"]] != colour for o in same), text
    assert min(checked["colour"], checked["size"], checked["position"]) > 0


def _obj(name: str, colour: str, box: tuple[int, int, int, int], size: int = 60) -> syn.SceneObject:
    x0, y0, x1, y1 = box
    m = np.zeros((size, size), np.uint8)
    m[y0:y1, x0:x1] = 1
    poly = np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1]], dtype=np.float64)
    return syn.SceneObject(name, colour, [poly], m)


def test_cues_on_a_hand_made_scene():
    # Two red vehicles (left: small, right: large) and one ship at the bottom middle.
    left = _obj("vehicle", "red", (4, 25, 12, 33))       # 8x8, centre (8, 29)
    right = _obj("vehicle", "red", (44, 22, 56, 36))     # 12x14, centre (50, 29)
    ship = _obj("ship", "white", (24, 46, 36, 56))       # centre (30, 51)
    scene = syn.Scene(np.zeros((60, 60, 3), np.uint8), [left, right, ship])
    cues = syn.target_cues(scene, 0, 60)
    assert ("size", "small") in cues.unique and ("colour", "red") not in cues.unique
    assert ("position", (None, "left")) in cues.unique
    assert ("position", ("middle", "middle")) not in cues.true
    assert ("relation", ("left", "ship")) not in cues.true  # 22 px left but also 22 px above: not level
    right_cues = syn.target_cues(scene, 1, 60)
    assert ("size", "large") in right_cues.unique and ("position", (None, "right")) in right_cues.unique
    ship_cues = syn.target_cues(scene, 2, 60)
    assert ship_cues.unique == []  # the only ship needs no cue
    assert ("position", ("bottom", None)) in ship_cues.true

    # Same colour, same size, same place relative to everything: no caption possible.
    twin_a = _obj("vehicle", "blue", (10, 10, 20, 20))
    twin_b = _obj("vehicle", "blue", (10, 14, 20, 24))
    clash = syn.Scene(np.zeros((60, 60, 3), np.uint8), [twin_a, twin_b, ship])
    assert syn.target_cues(clash, 0, 60).unique == []
    assert syn.compose_caption(np.random.default_rng(0), "vehicle", syn.target_cues(clash, 0, 60),
                               needs_cue=True) is None
    # Different colours fix it, and every caption then says the colour or something unique.
    twin_b.colour = "white"
    rng = np.random.default_rng(0)
    for _ in range(20):
        text = syn.compose_caption(rng, "vehicle", syn.target_cues(clash, 0, 60), needs_cue=True)
        assert "blue" in text.split()


def test_cue_kinds_are_drawn_by_weight_not_by_count():
    # One colour cue against five position cues: drawn per kind, colour wins 6 times in 7.
    cues = [("colour", "red")] + [("position", k) for k in list(syn.POSITION_PHRASES)[:5]]
    rng = np.random.default_rng(0)
    kinds = [syn._pick_cue(rng, cues)[0] for _ in range(1400)]
    share = kinds.count("colour") / len(kinds)
    expected = syn.CUE_WEIGHTS["colour"] / (syn.CUE_WEIGHTS["colour"] + syn.CUE_WEIGHTS["position"])
    assert abs(share - expected) < 0.03
    positions = {v for k, v in (syn._pick_cue(rng, cues) for _ in range(400)) if k == "position"}
    assert len(positions) == 5  # every cue of the chosen kind stays possible


# --------------------------------------------------------------------------------------------
# RefSegRS layout
# --------------------------------------------------------------------------------------------

def test_refsegrs_files_and_masks(out):
    root = out["refsegrs"]
    ids, by_image = [], defaultdict(list)
    for split, n_images in zip(syn.SPLITS, COUNTS.values()):
        text = (root / f"output_phrase_{split}.txt").read_text()
        assert text.endswith("\n")
        lines = text.splitlines()
        assert len(lines) == 3 * n_images
        for line in lines:
            sample_id, caption = line.split(" ", 1)
            assert re.fullmatch(r"\d+", sample_id) and caption == caption.strip().lower()
            assert any(name in caption for name in syn.REFSEGRS_CLASSES)
            ids.append(int(sample_id))
            with Image.open(root / "images" / f"{sample_id}.tif") as im:
                assert im.format == "TIFF" and im.mode == "RGB" and im.size == (SIZE, SIZE)
                image_bytes = im.tobytes()
            with Image.open(root / "masks" / f"{sample_id}.tif") as mk:
                assert mk.format == "TIFF" and mk.mode == "L" and mk.size == (SIZE, SIZE)
                mask = np.asarray(mk)
            assert set(np.unique(mask)) == {0, 255}
            by_image[hashlib.sha256(image_bytes).hexdigest()].append((caption, mask > 50))
    assert ids == list(range(len(ids)))  # one sample id (own files) per phrase line
    assert len(list((root / "images").iterdir())) == len(list((root / "masks").iterdir())) == len(ids)
    # Lines of one scene share the picture but name different targets with different words.
    assert len(by_image) == sum(COUNTS.values())
    for samples in by_image.values():
        captions = [c for c, _ in samples]
        assert len(samples) == 3 and len(set(captions)) == 3
        for i in range(3):
            for j in range(i + 1, 3):
                assert not (samples[i][1] & samples[j][1]).any()


# --------------------------------------------------------------------------------------------
# Tiny BERT folder
# --------------------------------------------------------------------------------------------

def _all_captions(out) -> list[str]:
    refs = _load_refs(out["rrsisd"])
    captions = [s["raw"] for r in refs for s in r["sentences"]]
    for split in syn.SPLITS:
        captions += [ln.split(" ", 1)[1] for ln in
                     (out["refsegrs"] / f"output_phrase_{split}.txt").read_text().splitlines()]
    return captions


def test_bert_folder_tokenizes_every_caption_and_builds_a_model(out):
    import torch
    from transformers import BertConfig, BertModel, BertTokenizer

    folder = out["bert"]
    vocab = (folder / "vocab.txt").read_text().splitlines()
    assert vocab[:5] == ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    assert len(vocab) == len(set(vocab))
    assert json.loads((folder / "tokenizer_config.json").read_text())["do_lower_case"] is True
    tok = BertTokenizer.from_pretrained(str(folder))
    assert len(tok) == len(vocab) and tok.pad_token_id == 0
    captions = _all_captions(out)
    for caption in captions:
        ids = tok.encode(caption, add_special_tokens=True)
        assert tok.unk_token_id not in ids, caption
        assert ids[0] == tok.cls_token_id and ids[-1] == tok.sep_token_id
        assert len(ids) <= 20, caption  # fits every loader's max_tokens: never truncated
    assert tok.tokenize("the vehicle") == ["the", "vehicle"]
    assert tok.unk_token_id not in tok.encode("Zebra-Crossing 42!")  # spelled out, still no [UNK]

    config = BertConfig.from_pretrained(str(folder))
    assert (config.hidden_size, config.num_hidden_layers, config.vocab_size) == (64, 2, len(vocab))
    torch.manual_seed(0)
    model = BertModel(config).eval()
    ids = torch.tensor([tok.encode(captions[0])])
    with torch.no_grad():
        hidden = model(ids, attention_mask=torch.ones_like(ids)).last_hidden_state
    assert hidden.shape == (1, ids.shape[1], 64) and torch.isfinite(hidden).all()


# --------------------------------------------------------------------------------------------
# Geometry helpers
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("shape", sorted(syn.SHAPES))
def test_every_shape_fits_its_region_without_self_overlap(shape):
    rng = np.random.default_rng(0)
    for region in [(0, 0, 24, 24), (30, 4, 60, 20), (8, 30, 22, 62)]:
        for _ in range(5):
            polys = syn.place_shape(rng, shape, region, margin=1.0)
            pts = np.concatenate(polys)
            assert (pts[:, 0] >= region[0] + 1 - 1e-6).all() and (pts[:, 0] <= region[2] - 1 + 1e-6).all()
            assert (pts[:, 1] >= region[1] + 1 - 1e-6).all() and (pts[:, 1] <= region[3] - 1 + 1e-6).all()
            parts = syn.rasterise(polys, 64)
            assert parts.sum(axis=0).max() <= 1 and (parts.reshape(len(parts), -1).sum(1) > 0).all()


def test_split_regions_tiles_the_image():
    rng = np.random.default_rng(1)
    for k in (3, 4, 5):
        regions = syn.split_regions(rng, 64, k)
        assert len(regions) == k
        cover = np.zeros((64, 64), int)
        for x0, y0, x1, y1 in regions:
            assert x1 - x0 >= 64 * 0.4 ** 2 and y1 - y0 >= 64 * 0.4 ** 2
            cover[int(np.ceil(y0)):int(np.ceil(y1)), int(np.ceil(x0)):int(np.ceil(x1))] += 1
        assert (cover == 1).all()
