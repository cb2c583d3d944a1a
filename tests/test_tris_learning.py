"""TRIS learns from text alone on generated data (Liu et al., ICCV 2023, Sec. 3; tiny models, CPU).

One run of ``tools.tris_pipeline`` (stage 1 -> PRMS -> threshold pseudo masks -> stage 2 -> test)
on ``data.synthetic``'s ``colour_only`` RefCOCO layout: 64 px images of 3 objects in pairwise
different colours, every caption "the <colour> <class>", so one sentence per ref and exactly 3
refs per image. Asserted, each against a baseline computed from the same data:

(a) stage 1 on the test split: PointM above `text_blind_point_bound` (here 1/3: a map that
    ignores the sentence puts all 3 sentences of an image on one pixel, which lies on at most one
    target), and its foreground (response > 0) above all-ones masks in mIoU;
(b) the pseudo masks' mIoU with the hidden training ground truth above that of all-ones masks
    (empty masks: 0);
(c) stage 2, trained only on those pseudo masks: test PointM above the same bound.

Settings that learn (measured on the 2-core development machine, OMP_NUM_THREADS=1): the tiny CLIP
of ``--tiny`` (ResNet width 8, one block per stage) at ``--img_size 224`` for stage 1: its PointM
is the arg-max of a stride-32 map, 7x7 here. How coarse a map may be is bounded by the targets'
shapes (rings, arcs, bars: the middle of an object's cell is often background): the GT mask
itself, area-pooled to the stride-32 grid and upsampled as the model's map is, has PointM 0.68 at
128 px (4x4), 0.86 at 160 (5x5), 0.96 at 192, 1.00 at 224 on this data; at 160 px stage 1 reached
only 0.31-0.53 (most misses on the background between objects). Stage 1 runs 10 epochs of 36
steps, batch 8, lr 5e-4 with ``--lr_multi 1``: the backbone at the full lr, not the reference's
0.1x, because this tiny CLIP is random and has to learn its features (at 0.1x, 14 epochs at
160 px: PointM 0.31; with 1x: 0.51). Stage 2: 5 epochs at 128 px, lr 1e-3.
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
FLAGS = ["--tiny", "--img_size", "224", "--method", "threshold", "--eval_splits", "test", "--device", "cpu",
         "--workers", "0", "--seed", SEED, "--epochs", "10", "-b", "8", "--lr", "1e-3", "--no_val",
         "--print-freq", "1000", "--w1", "0", "--w5", "0", "--negative_samples", "0",
         "--stage1_flags", "--lr 5e-4 --lr_multi 1", "--stage2_flags", "--epochs 5 --img_size 128"]


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


# MEASURED with these flags (seeds 0 / 1 / 2, and seed 0 again with AVX2 emulated: ATEN_CPU_CAPABILITY=avx2
# ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2; each run inside pytest; test split 144 sentences,
# text-blind PointM bound 1/3; train split all-ones pseudo-mask mIoU 0.118, text-blind oracle object 0.333):
#   stage 1 test PointM 0.639 / 0.757 / 0.597 / 0.632, test mIoU 0.448 / 0.517 / 0.364 / 0.449
#   threshold pseudo masks (train) mIoU 0.378 / 0.492 / 0.340 / 0.383
#   stage 2 test PointM 0.812 / 0.826 / 0.639 / 0.792, test mIoU 0.501 / 0.573 / 0.406 / 0.491
# Margins: about half the smallest measured excess over the baseline. The pseudo masks are also
# above the text-blind ORACLE object (0.333) in every run, but by 0.007 at worst, so that is not asserted.
STAGE1_POINT_MARGIN = 0.13   # smallest excess 0.597 - 0.333 = 0.264
STAGE1_MIOU_MARGIN = 0.12    # smallest excess 0.364 - 0.118 = 0.246
PSEUDO_MARGIN = 0.11         # smallest excess 0.340 - 0.118 = 0.222
STAGE2_MARGIN = 0.15         # smallest excess 0.639 - 0.333 = 0.306


def test_stage1_maps_hit_the_referred_object_more_often_than_a_text_blind_map(run):
    """Stage 1 alone (image-text pairs, no mask): PointM above the text-blind bound, and its
    foreground (response > 0) above all-ones masks in mIoU."""
    bound = text_blind_point_bound(run["test"])
    base = trivial_pseudo_baselines(run["test"])
    assert bound == pytest.approx(1 / 3)   # 3 non-overlapping targets per image, one sentence each
    assert run["stage1"]["split"] == "test" and run["stage1"]["resolution"] == "original"
    assert run["stage1"]["PointM"] > bound + STAGE1_POINT_MARGIN, (run["stage1"], bound)
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
