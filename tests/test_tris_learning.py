"""TRIS learns from text alone on generated data (Liu et al., ICCV 2023, Sec. 3; tiny models, CPU).

One run of ``tools.tris_pipeline`` (stage 1 -> PRMS -> threshold pseudo masks -> stage 2 -> test)
on ``data.synthetic``'s ``colour_only`` RefCOCO layout: 64 px images of 3 objects in pairwise
different colours, every caption "the <colour> <class>", so one sentence per ref and exactly 3
refs per image. Asserted, each against a baseline computed from the same data:

(a) stage 1 on the test split: its foreground (response > 0) above all-ones masks in mIoU (its
    PointM is NOT robustly above the text-blind bound in this budget: see that test);
(b) the pseudo masks' mIoU with the hidden training ground truth above that of all-ones masks
    (empty masks: 0);
(c) stage 2, trained only on those pseudo masks: test PointM above `text_blind_point_bound` (here
    1/3: a map that ignores the sentence puts all 3 sentences of an image on one pixel, which lies
    on at most one target).

Settings that learn (measured on the 2-core development machine, OMP_NUM_THREADS=1): the tiny CLIP
of ``--tiny`` (ResNet width 8, one block per stage) at ``--img_size 160`` for stage 1 (the stride-32
stage-4 map is 5x5; at 64 px it is 2x2 and a bilinearly upsampled 2x2 map always peaks in a corner,
i.e. on the background: that, and all-zero maps whose arg-max is pixel 0, gave the PointM 0.00
measured before), batch 8 (batch 16 learned slower per second), lr 1e-3 for the new modules
(the backbone at 0.1x, the reference's scale), 14 epochs of 36 steps for stage 1, 5 for stage 2
(at 128 px).
The calibration losses are switched off (``--w1 0 --w5 0 --negative_samples 0``): their random
tiny ViT carries no information. PRMS still scores the maps with that random ViT, so its choice
among a ref's sentences is arbitrary; with one sentence per ref here there is nothing to choose.
MEASURED and MARGINS are at the assertions. The training split's ground truth never reaches
training (``tests/test_tris_pipeline.py``, poisoning test); here it is read for the diagnostics.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT
from test_tris_pipeline import text_blind_point_bound, trivial_pseudo_baselines

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

DATA = dict(seed=0, num_images=96, num_val=4, num_test=48, image_size=64, layouts="refcoco", refs_per_image=3,
            colour_only=True)
SEED = os.environ.get("TRIS_LEARNING_SEED", "0")   # the measurements below ran seeds 0, 1, 2
FLAGS = ["--tiny", "--img_size", "160", "--method", "threshold", "--eval_splits", "test", "--device", "cpu",
         "--workers", "0", "--seed", SEED, "--epochs", "14", "-b", "8", "--lr", "1e-3", "--no_val",
         "--print-freq", "1000", "--w1", "0", "--w5", "0", "--negative_samples", "0",
         "--stage2_flags", "--epochs 5 --img_size 128"]


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> dict:
    from data.datasets import build_dataset
    from data.synthetic import generate
    from data.tokenizer import clip_name

    base = tmp_path_factory.mktemp("tris_learning")
    root = Path(generate(base / "data", **DATA)["refcoco"])
    out, cache = base / "run", base / "cache"
    cmd = [sys.executable, "-m", "tools.tris_pipeline", "--out", str(out), "--dataset", "refcoco",
           "--refer_data_root", str(root), "--cache_dir", str(cache), *FLAGS]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"})
    assert proc.returncode == 0, f"pipeline failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"

    def ds(split: str):
        return build_dataset("refcoco", root, split, clip_name(None), img_size=128, max_tokens=20, mode="eval",
                             cache_dir=cache, word_masks=False)

    def read(name: str) -> dict:
        return json.loads((out / name).read_text())

    return {"out": out, "stdout": proc.stdout, "test": ds("test"), "train": ds("train"),
            "stage1": read("5_test/output/stage1.json"), "stage2": read("5_test/output/stage2.json"),
            "pseudo": read("3_pseudo/diagnostic.json")}


# MEASURED with these flags (seeds 0 / 1 / 2; test split 144 sentences, text-blind PointM bound 1/3;
# train split all-ones pseudo-mask mIoU 0.118, text-blind oracle object 0.333):
#   stage 1 test PointM 0.354 / 0.528 / 0.417, test mIoU 0.271 / 0.379 / 0.311
#   PRMS maps (train) PointM 0.302 / 0.455 / 0.431; threshold pseudo masks mIoU 0.259 / 0.371 / 0.316
#   stage 2 test PointM 0.486 / 0.681 / 0.597, test mIoU 0.239 / 0.339 / 0.276
# A rerun of seed 0 inside pytest (same flags) gave stage 1 PointM 0.306 / mIoU 0.253, pseudo 0.226,
# stage 2 PointM 0.451: stage 1's PointM is NOT robustly above 1/3, so it is not asserted.
# Margins: about half the smallest measured excess over the baseline (including that rerun).
STAGE1_MIOU_MARGIN = 0.06    # smallest excess 0.253 - 0.118 = 0.135
PSEUDO_MARGIN = 0.05         # smallest excess 0.226 - 0.118 = 0.108
STAGE2_MARGIN = 0.06         # smallest excess 0.451 - 0.333 = 0.118


def test_stage1_foreground_covers_the_target_better_than_all_ones_masks(run):
    """Stage 1's foreground (response > 0) above all-ones masks in mIoU. Its PointM is only recorded:
    0.31-0.53 against the text-blind 1/3 at 160 px (5x5 map), 0.26-0.35 at 128 px (4x4: a bilinearly
    upsampled map peaks on one of its 16 grid nodes, 12 of them on the image border)."""
    bound = text_blind_point_bound(run["test"])
    base = trivial_pseudo_baselines(run["test"])
    assert bound == pytest.approx(1 / 3)   # 3 non-overlapping targets per image, one sentence each
    assert run["stage1"]["split"] == "test" and run["stage1"]["resolution"] == "original"
    assert 0 <= run["stage1"]["PointM"] <= 1
    assert run["stage1"]["mIoU"] > base["all"] + STAGE1_MIOU_MARGIN, (run["stage1"], base)


def test_pseudo_masks_overlap_the_hidden_ground_truth(run):
    base = trivial_pseudo_baselines(run["train"])
    assert run["pseudo"]["n"] == len(run["train"].groups)
    assert run["pseudo"]["mIoU"] > base["all"] + PSEUDO_MARGIN, (run["pseudo"], base)


def test_stage2_trained_on_pseudo_masks_beats_the_text_blind_bound(run):
    bound = text_blind_point_bound(run["test"])
    assert bound == pytest.approx(1 / 3)   # 3 non-overlapping targets per image, one sentence each
    assert run["stage2"]["split"] == "test"
    assert run["stage2"]["PointM"] > bound + STAGE2_MARGIN, (run["stage2"], bound)


def test_colour_only_layout_names_each_target_by_its_own_colour(tmp_path):
    from data.datasets import load_plain_pickle
    from data.synthetic import generate

    root = Path(generate(tmp_path, seed=3, num_images=6, image_size=64, layouts="refcoco", colour_only=True)["refcoco"])
    refs = load_plain_pickle(root / "refcoco" / "refs(unc).p")
    inst = json.loads((root / "refcoco" / "instances.json").read_text())
    names = {c["id"]: c["name"] for c in inst["categories"]}
    per_image: dict[int, list[dict]] = {}
    for r in refs:
        per_image.setdefault(r["image_id"], []).append(r)
    anns_per_image: dict[int, int] = {}
    for ann in inst["annotations"]:
        anns_per_image[ann["image_id"]] = anns_per_image.get(ann["image_id"], 0) + 1
    for image_id, rs in per_image.items():
        assert len(rs) == 3 == anns_per_image[image_id]      # every one of the 3 objects is a target
        sents = [r["sentences"][0]["sent"] for r in rs]
        assert all(len(r["sentences"]) == 1 for r in rs) and len(set(sents)) == 3
        colours = [s.split()[1] for s in sents]
        assert len(set(colours)) == 3                          # pairwise different colours
        for r, s in zip(rs, sents):
            assert s == f"the {s.split()[1]} {names[r['category_id']]}"


def test_loss_weight_flags_reach_the_stage1_config():
    import args as args_lib
    import engine
    from lib import registry

    def config(*flags: str) -> dict:
        ns = args_lib.get_parser().parse_args(["--model", "tris_stage1", "--tiny", *flags])
        return engine.config_from_args(ns)

    assert config()["loss_weights"] == {"cls": 5.0, "pos": 1.0, "neg": 2.0}
    cfg = config("--w1", "0", "--w5", "0", "--w4", "3")
    assert cfg["loss_weights"] == {"cls": 3.0, "pos": 0.0, "neg": 0.0}
    assert not registry.build_model(cfg).needs_calibrator
    with pytest.raises(engine.UserError, match="--w1 -1.0: a loss weight must be >= 0"):
        config("--w1", "-1")
