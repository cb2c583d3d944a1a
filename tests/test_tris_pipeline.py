"""The TRIS weakly supervised pipeline end to end on generated data (tiny models, CPU): stage 1 ->
PRMS -> pseudo masks -> stage 2 -> test (``tools.tris_pipeline``), and the proof that no mask of
the training split is ever used for training (Liu et al., ICCV 2023, Sec. 3: text supervision only).

One pipeline run (module fixture) checks every step's files, the skip / refuse / resume rules and
the PRMS selection rule; the poisoning test reruns stages 1-4 on a copy of the data whose
training-split masks are rewritten and demands bit-identical stage-1 and stage-2 weights (same
machine, same seeds, one thread: exact equality is the claim) while the ground-truth diagnostic of
the pseudo masks changes (the poison took effect). Checkpoint selection: these runs pass
``--no_val`` (the last epoch is the best checkpoint); with validation, selection reads the ground
truth of the VAL split only, which the poisoning leaves untouched.

What is NOT asserted here: learning. This run is as short as the data flow allows (2 steps per
stage at lr 1e-5, so the maps stay positive and the threshold pseudo masks are not empty: the
poisoning must have something to change). `tests/test_tris_learning.py` trains long enough on
an easier layout (``data.synthetic`` ``colour_only``) and asserts that the pseudo masks and stage 2
beat text-blind baselines. Before it, stage 1 measured PointM 0.00 here: at 64 px its 2x2 map,
bilinearly upsampled, always peaks in an image corner, and an all-zero map's arg-max is pixel 0.
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import ROOT

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

# The synthetic layout: RefCOCO, 2 refs (different targets) per image, 64 px images.
DATA = dict(seed=1, num_images=32, num_val=4, num_test=8, image_size=64, layouts="refcoco", refs_per_image=2)
IMG = 64
# 2 steps at lr 1e-5 keep the tiny stage-1 maps positive (longer runs collapse them to non-positive
# responses, i.e. empty PRMS maps and pseudo masks, which would leave the poisoning nothing to change).
POISON_DIAGNOSTIC_CHANGE = 0.02
SEED = "0"
FLAGS = ["--tiny", "--img_size", str(IMG), "--method", "threshold", "--eval_splits", "test", "--device", "cpu",
         "--workers", "0", "--seed", SEED, "--epochs", "1", "--max_steps", "2", "-b", "8", "--lr", "1e-5",
         "--no_val", "--print-freq", "50"]


def _run_pipeline(out: Path, root: Path, cache: Path, *extra: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "tools.tris_pipeline", "--out", str(out), "--dataset", "refcoco",
           "--refer_data_root", str(root), "--cache_dir", str(cache), *FLAGS, *extra]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900,
                          env={**__import__("os").environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"})
    if proc.returncode != 0:
        raise AssertionError(f"pipeline failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    from data.synthetic import generate

    base = tmp_path_factory.mktemp("tris_data")
    paths = generate(base / "data", **DATA)
    return {"root": Path(paths["refcoco"]), "cache": base / "cache"}


@pytest.fixture(scope="module")
def pipeline(data, tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("tris_pipeline")
    proc = _run_pipeline(out, data["root"], data["cache"])
    return {"out": out, "stdout": proc.stdout}


def _dataset(root: Path, cache: Path, split: str, mode: str = "eval", **kw):
    from data.datasets import build_dataset
    from data.tokenizer import clip_name

    return build_dataset("refcoco", root, split, clip_name(None), img_size=IMG, max_tokens=20, mode=mode,
                         cache_dir=cache, word_masks=False, **kw)


def text_blind_point_bound(ds) -> float:
    """The best PointM any text-blind map can reach on ``ds`` (every sentence of every ref).

    A map that ignores the sentence gives every sentence of an image the same arg-max pixel p; a
    sentence counts as a hit when p lies on its ground-truth mask. For one image the best p hits
    ``max_p sum_s [p in mask_s]`` sentences, so summing that over the images and dividing by the
    number of sentences bounds the PointM of any text-blind method from above (exactly: it is
    reached by putting every image's arg-max on its most-referred pixel).
    """
    per_image: dict[str, np.ndarray] = {}
    for row, sample in enumerate(ds.samples):
        m = ds.original_mask(row).astype(np.int32)
        per_image[sample.image_path] = per_image.get(sample.image_path, 0) + m
    return float(sum(v.max() for v in per_image.values()) / len(ds.samples))


def trivial_pseudo_baselines(ds) -> dict[str, float]:
    """Per-ref mIoU on the train split of: the empty mask, the all-ones mask, and the best
    text-blind choice among the image's ground-truth objects (one mask for all refs of an image,
    the one maximising their summed IoU: an oracle the text-blind maps cannot beat on average)."""
    refs: dict[str, list[np.ndarray]] = {}
    for members in ds.groups:
        refs.setdefault(ds.samples[members[0]].image_path, []).append(ds.original_mask(members[0]).astype(bool))
    all_ones, blind = [], []
    for masks in refs.values():
        all_ones += [m.mean() for m in masks]

        def iou(a, b):
            u = (a | b).sum()
            return (a & b).sum() / u if u else 0.0
        blind.append(max(sum(iou(c, m) for m in masks) for c in masks))
    n = sum(len(v) for v in refs.values())
    return {"empty": 0.0, "all": float(np.mean(all_ones)), "text_blind_object": float(sum(blind) / n)}


def _result(out: Path, stage: str) -> dict:
    return json.loads((out / "5_test" / "output" / f"{stage}.json").read_text())


# --------------------------------------------------------------------------------------------
def test_pipeline_writes_every_step_and_skips_when_done(pipeline, data):
    out = pipeline["out"]
    for step in ("1_stage1", "2_prms", "3_pseudo", "4_stage2", "5_test"):
        assert (out / step / "config.json").is_file() and (out / step / "done.json").is_file(), step
        assert f"{step}: done in" in pipeline["stdout"], pipeline["stdout"]
    prms = out / "2_prms" / "output"
    recs = [json.loads(x) for x in (prms / "index.jsonl").read_text().splitlines()]
    train = _dataset(data["root"], data["cache"], "train")
    assert len(recs) == len(train.groups) and (prms / "summary.json").is_file()
    m = np.load(prms / recs[0]["map"])
    assert m.dtype == np.float32 and list(m.shape) == recs[0]["size"] and 0 <= m.min() and m.max() <= 1
    assert Path(recs[0]["image"]).is_absolute()
    # Second run: every step skipped (markers + identical configs).
    again = _run_pipeline(out, data["root"], data["cache"])
    assert again.stdout.count("already done (skipped)") == 5, again.stdout
    # Other flags for an existing step folder: refused in one line.
    proc = subprocess.run([sys.executable, "-m", "tools.tris_pipeline", "--out", str(out), "--dataset", "refcoco",
                           "--refer_data_root", str(data["root"]), "--cache_dir", str(data["cache"]), *FLAGS,
                           "--weight-decay", "0.5"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "holds a run with other flags" in proc.stderr
    # A training step without its marker (a crash after the last checkpoint) resumes from checkpoint_last.
    (out / "4_stage2" / "done.json").unlink()
    again = _run_pipeline(out, data["root"], data["cache"])
    assert "4_stage2: done in" in again.stdout and again.stdout.count("already done (skipped)") == 4
    log = (out / "4_stage2" / "log.txt").read_text()
    assert "--resume " + str(out / "4_stage2" / "output" / "checkpoint_last.pth") in log and "already complete" in log


def test_metrics_and_diagnostics_are_recorded(pipeline, data):
    """test.py records for both stages (mIoU, PointM at the original resolution) and the two ground-truth
    diagnostics, each agreeing with a recomputation from the written files."""
    from tools.pseudo_masks import evaluate_against

    out = pipeline["out"]
    for stage in ("stage1", "stage2"):
        res = _result(out, stage)
        assert res["split"] == "test" and res["resolution"] == "original" and 0 <= res["PointM"] <= 1
    train = _dataset(data["root"], data["cache"], "train")
    rows = {train.samples[m[0]].ref_id: m[0] for m in train.groups}
    diag = json.loads((out / "3_pseudo" / "diagnostic.json").read_text())
    again = evaluate_against(out / "3_pseudo" / "output", lambda r: train.original_mask(rows[r]))
    assert diag == pytest.approx(again) and diag["n"] == len(train.groups)
    assert "3_pseudo: done in" in pipeline["stdout"] and "mIoU" in pipeline["stdout"]
    base = trivial_pseudo_baselines(train)
    assert 0 < base["all"] < base["text_blind_object"] <= 1
    assert 0 < text_blind_point_bound(_dataset(data["root"], data["cache"], "test")) <= 1


def _poison(root: Path) -> None:
    """Rewrite every train-split annotation: polygons halved in size and moved towards the
    centre, RLE masks replaced by a corner square, so a training path that read them would see
    other targets."""
    from data.datasets import load_plain_pickle

    refs = load_plain_pickle(root / "refcoco" / "refs(unc).p")
    train_anns = {r["ann_id"] for r in refs if r["split"] == "train"}
    inst = json.loads((root / "refcoco" / "instances.json").read_text())
    sizes = {im["id"]: (im["height"], im["width"]) for im in inst["images"]}
    changed = 0
    for ann in inst["annotations"]:
        if ann["id"] not in train_anns:
            continue
        h, w = sizes[ann["image_id"]]
        seg = ann["segmentation"]
        if isinstance(seg, list) and all(isinstance(p, list) for p in seg):
            ann["segmentation"] = [[float(v * 0.5 + (w if k % 2 == 0 else h) * 0.25) for k, v in enumerate(poly)]
                                   for poly in seg]
        else:  # an RLE mask: replaced by a square in the top-left corner
            ann["segmentation"] = [[0.0, 0.0, w / 4, 0.0, w / 4, h / 4, 0.0, h / 4]]
        changed += 1
    assert changed > 0
    (root / "refcoco" / "instances.json").write_text(json.dumps(inst))


def test_poisoned_training_masks_change_nothing_but_the_diagnostic(pipeline, data, tmp_path):
    poisoned = tmp_path / "refcoco"
    shutil.copytree(data["root"], poisoned)
    _poison(poisoned)
    clean_train = _dataset(data["root"], data["cache"], "train")
    dirty_train = _dataset(poisoned, tmp_path / "cache", "train")
    assert any((clean_train.original_mask(m[0]) != dirty_train.original_mask(m[0])).any()
               for m in clean_train.groups)
    out = tmp_path / "run"
    _run_pipeline(out, poisoned, tmp_path / "cache", "--stop_after", "4_stage2")
    for step in ("1_stage1", "4_stage2"):
        a = torch.load(pipeline["out"] / step / "output" / "checkpoint_last.pth", weights_only=True)["model"]
        b = torch.load(out / step / "output" / "checkpoint_last.pth", weights_only=True)["model"]
        assert a.keys() == b.keys()
        for k in a:  # same process type, same machine, same seeds: exact equality is the claim
            assert torch.equal(a[k], b[k]), (step, k)
    clean = json.loads((pipeline["out"] / "3_pseudo" / "diagnostic.json").read_text())["mIoU"]
    dirty = json.loads((out / "3_pseudo" / "diagnostic.json").read_text())["mIoU"]
    # Measured (seeds 0, 1, 2): clean 0.113 / 0.114 / 0.091, poisoned 0.032 / 0.032 / 0.025 -> changes of
    # 0.080 / 0.082 / 0.066; 0.02 sits well below the smallest.
    assert abs(clean - dirty) > POISON_DIAGNOSTIC_CHANGE, (clean, dirty)


def test_pseudo_path_dataset_never_reads_the_ground_truth(data, tmp_path):
    from PIL import Image

    from data.datasets import DatasetError

    train = _dataset(data["root"], data["cache"], "train")
    folder = tmp_path / "pseudo"
    (folder / "masks").mkdir(parents=True)
    lines = []
    for members in train.groups:
        s = train.samples[members[0]]
        with Image.open(s.image_path) as im:
            w, h = im.size
        m = np.zeros((h, w), np.uint8)
        m[: h // 2, : w // 3] = 1   # a known mask, nothing like the ground truth
        Image.fromarray(m, "L").save(folder / "masks" / f"{s.ref_id}.png")
        lines.append(json.dumps({"ref_id": s.ref_id, "mask": f"masks/{s.ref_id}.png", "method": "test"}))
    (folder / "index.jsonl").write_text("\n".join(lines[1:]) + "\n")
    (folder / "summary.json").write_text("{}")
    with pytest.raises(DatasetError, match=r"1 of \d+ training refs have no pseudo mask"):
        _dataset(data["root"], data["cache"], "train", mode="train", pseudo_masks=folder)
    (folder / "index.jsonl").write_text("\n".join(lines) + "\n")
    ds = _dataset(data["root"], data["cache"], "train", mode="train", pseudo_masks=folder)
    item = ds[0]
    target = item["target"].numpy()
    s0 = train.samples[ds.sample_index(0)]
    with Image.open(folder / "masks" / f"{s0.ref_id}.png") as im:   # the pseudo mask, resized with NEAREST
        expected = np.asarray(im.resize((IMG, IMG), Image.NEAREST))
    assert target.shape == (IMG, IMG) and target.sum() > 0 and np.array_equal(target, expected)
    for method in (ds.original_mask, ds.get_original_mask, ds.original_box):
        with pytest.raises(DatasetError, match="never read"):
            method(0)


def test_prms_keeps_the_map_whose_masked_image_matches_all_sentences_best(monkeypatch):
    """PRMS on a hand-made case: 3 sentences, cosine matrix chosen so that sentence 1 has the
    largest row sum although sentence 0 has the largest single cosine."""
    import torch.nn.functional as F

    from lib import tris
    from tools import prms

    k, s, size = 3, 8, (12, 20)
    maps = torch.rand(k, 1, s, s, generator=torch.Generator().manual_seed(0)) * torch.tensor([1.0, 2.0, 3.0])[:, None, None, None]
    cos = torch.tensor([[0.9, -0.5, -0.5], [0.3, 0.3, 0.3], [0.1, 0.1, 0.1]])
    seen = {}

    def fake_similarity(calibrator, image, mask, text):
        seen.update(image=image.shape, mask=mask.shape, text=text.clone())
        return cos

    monkeypatch.setattr(tris, "clip_similarity", fake_similarity)
    text = torch.arange(k * 4).reshape(k, 4)
    out, best, scores = prms.select_map(lambda image, text: maps, None, torch.zeros(k, 3, s, s), text, size)
    assert best == 1 and scores == pytest.approx([-0.1, 0.9, 0.3])
    assert seen["mask"] == (k, 1, *size)                       # scored at the original resolution
    assert all(torch.equal(seen["text"][j], text) for j in range(k))   # each map against all K sentences
    expected = F.interpolate(maps, size=size, mode="bilinear", align_corners=True)[1, 0]
    expected = expected / (expected.max() + 1e-5)
    assert out.dtype == np.float32 and out.shape == size
    np.testing.assert_allclose(out, expected.numpy(), rtol=1e-6, atol=1e-7)
