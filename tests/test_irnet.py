"""IRNet pseudo masks (lib/irnet.py, lib/crf.py, tools/pseudo_masks.py): hand-made cases and a
tiny end-to-end run of the CLI."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from scipy import ndimage

from engine import UserError
from lib import crf as crf_lib
from lib import irnet as irn
from tools import pseudo_masks as pm


# --------------------------------------------------------------------------------------------
# Pairs, paths, losses
# --------------------------------------------------------------------------------------------
def test_search_offsets_and_paths() -> None:
    assert irn.search_offsets(2) == [(0, 1), (1, -1), (1, 0), (1, 1)]
    assert len(irn.search_offsets(10)) == 152 and len(irn.search_offsets(5)) == 34
    assert irn.path_coords(0, 3) == [(0, 0), (0, 1), (0, 2), (0, 3)]
    # a diagonal path keeps the pixels less than one pixel away from the line: |x - y| <= 1
    assert sorted(irn.path_coords(2, 2)) == [(0, 0), (0, 1), (1, 0), (1, 1), (1, 2), (2, 1), (2, 2)]


def test_pair_labels_by_hand() -> None:
    pi = irn.PairIndex(2, (3, 4))  # sources: rows 0-1, columns 1-2
    label = np.array([[0, 0, 1, 1],
                      [0, 255, 1, 1],
                      [0, 0, 0, 1]])
    bg, fg, neg = pi.pair_labels(label)
    offsets = [tuple(o) for o in pi.offsets]
    src = [(0, 1), (0, 2), (1, 1), (1, 2)]

    def expect(a: tuple[int, int], b: tuple[int, int]) -> tuple[float, float, float]:
        la, lb = label[a], label[b]
        if la == 255 or lb == 255:
            return 0.0, 0.0, 0.0
        return float(la == lb == 0), float(la == lb == 1), float(la != lb)

    for k, (dy, dx) in enumerate(offsets):
        for s, (y, x) in enumerate(src):
            assert (bg[k, s].item(), fg[k, s].item(), neg[k, s].item()) == expect((y, x), (y + dy, x + dx))
    k = offsets.index((0, 1))
    assert neg[k, 0] == 1 and fg[k, 1] == 1  # (0,1)-(0,2): 0 vs 1; (0,2)-(0,3): 1 vs 1


def test_affinity_is_one_minus_path_max() -> None:
    pi = irn.PairIndex(4, (8, 10))
    edge = torch.zeros(1, 8, 10)
    edge[0, 2, 5] = 0.8
    aff = pi.affinity(edge)
    offsets = [tuple(o) for o in pi.offsets]
    src = pi.src.view(-1).tolist()
    s = src.index(2 * 10 + 3)  # pixel (2, 3)
    assert aff[0, offsets.index((0, 3)), s].item() == pytest.approx(0.2)  # (2,3) -> (2,6) passes (2,5)
    assert aff[0, offsets.index((1, 0)), s].item() == pytest.approx(1.0)  # (2,3) -> (3,3) does not
    s2 = src.index(0 * 10 + 3)  # (0, 3) -> (2, 5): the boundary is the end point
    assert aff[0, offsets.index((2, 2)), s2].item() == pytest.approx(0.2)


def test_affinity_loss_on_known_boundary() -> None:
    pi = irn.PairIndex(3, (6, 8))
    label = np.zeros((6, 8), np.int64)
    label[:, 4:] = 1
    bg, fg, neg = (t[None] for t in pi.pair_labels(label))
    target = pi.offset_target()
    zero_dp = torch.zeros(1, 2, 6, 8)
    wall = torch.zeros(1, 6, 8)
    wall[0, :, 4] = 1.0  # a boundary exactly on the label change: every negative pair crosses it
    # ... but fg pairs touching column 4 also see it: take a boundary of 1 between the labels only
    half = torch.full((1, 6, 8), 0.5)
    out = irn.irn_losses(pi.affinity(half), pi.pair_displacement(zero_dp), target, bg, fg, neg)
    assert out["pos_aff"].item() == pytest.approx(-math.log(0.5 + 1e-5), rel=1e-4)
    assert out["neg_aff"].item() == pytest.approx(-math.log(0.5 + 1e-5), rel=1e-4)
    assert out["dp_bg"].item() == pytest.approx(0.0, abs=1e-6)
    # zero displacement of fg pairs: |offset| summed over (dy, dx), averaged over fg pairs, halved
    fg_pairs = fg[0]
    expected = (fg_pairs * torch.from_numpy(np.abs(pi.offsets).sum(1)).float()[:, None]).sum() / (2 * fg_pairs.sum())
    assert out["dp_fg"].item() == pytest.approx(expected.item(), rel=1e-4)
    on_wall = irn.irn_losses(pi.affinity(wall), pi.pair_displacement(zero_dp), target, bg, fg, neg)
    assert on_wall["neg_aff"].item() == pytest.approx(0.0, abs=1e-4)  # crossing pairs: affinity 0
    assert on_wall["pos_aff"].item() > 1.0  # fg pairs starting on the wall are penalised
    total = (on_wall["pos_aff"] + on_wall["neg_aff"]) / 2 + (on_wall["dp_fg"] + on_wall["dp_bg"]) / 2
    assert on_wall["total"].item() == pytest.approx(total.item())


# --------------------------------------------------------------------------------------------
# Random walk, centroids, instances
# --------------------------------------------------------------------------------------------
def test_random_walk_stops_at_boundary_wall() -> None:
    edge = torch.zeros(16, 16)
    edge[:, 8] = 1.0
    seeds = torch.zeros(1, 16, 16)
    seeds[0, 4, 2] = 1.0
    rw = irn.random_walk(seeds, edge)
    assert rw[0, :, :8].min() > 0  # spread over the whole left region
    assert rw[0, :, 9:].abs().max() == 0  # nothing crosses the wall
    ratio = rw[0, :, :8].min() / rw[0, :, :8].max()
    assert ratio > 0.5  # 256 steps: nearly uniform inside the region
    dense = irn.random_walk(seeds, edge, dense=True)  # the reference's squared dense matrix
    assert torch.allclose(rw, dense, rtol=1e-4, atol=1e-7)


def test_centroid_clustering_two_centres() -> None:
    h, w = 12, 24
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    cy = np.full((h, w), 6.0, np.float32)
    cx = np.where(xx < 12, 5.0, 17.0).astype(np.float32)
    dp = np.stack([cy - yy, cx - xx])
    cent = irn.find_centroids(dp, iterations=300)
    assert set(map(tuple, cent.reshape(2, -1).T.tolist())) == {(6, 5), (6, 17)}
    inst = irn.cluster_centroids(cent, dp)
    assert inst.max() == 1
    assert len(np.unique(inst[:, :12])) == 1 and len(np.unique(inst[:, 12:])) == 1
    assert inst[0, 0] != inst[0, 23]


def test_instances_keep_small_components_with_zero_score() -> None:
    rw = torch.zeros(1, 20, 20)
    rw[0, 1:10, 1:10] = 1.0
    rw[0, 17, 17] = 1.0  # a tiny separate blob
    masks, scores = irn.instances_from_walk(rw, (80, 80), bg_thres=0.25)
    assert masks.shape[1:] == (80, 80) and len(masks) == 2
    small = int(np.argmin(masks.reshape(2, -1).sum(1)))
    assert 0 < masks[small].sum() < 0.01 * 6400 and scores[small] == 0.0
    assert scores[1 - small] == pytest.approx(1.0)
    empty, _ = irn.instances_from_walk(torch.zeros(1, 10, 10), (40, 40))
    assert len(empty) == 0


def test_seed_labels_rule() -> None:
    cam = np.array([[0.05, 0.1, 0.2, 0.3, 0.31, 0.9]], np.float32)
    img = np.zeros((1, 6, 3), np.uint8)
    assert irn.seed_labels(cam, img, 0.3, 0.1).tolist() == [[0, 0, 255, 255, 1, 1]]


def test_network_shapes_and_frozen_backbone() -> None:
    net = irn.IRNet(irn.tiny_backbone(0))
    net.train()
    assert not net.resnet50.training and net.fc_edge1.training
    edge, dp = net(torch.randn(1, 3, 70, 90))
    assert edge.shape == (1, 1, 18, 23) and dp.shape == (1, 2, 18, 23)
    (edge.sum() + dp.sum()).backward()
    assert all(p.grad is None for p in net.resnet50.parameters())
    assert net.fc_edge6.weight.grad is not None and net.fc_dp7[3].weight.grad is not None
    assert "fc_dp7.4.running_mean" in net.state_dict()


# --------------------------------------------------------------------------------------------
# CRF approximation
# --------------------------------------------------------------------------------------------
def test_crf_approx_cleans_along_colour_edge() -> None:
    rng = np.random.default_rng(0)
    h, w = 48, 64
    img = np.zeros((h, w, 3), np.uint8)
    img[:, :30] = (200, 40, 40)
    img[:, 30:] = (30, 60, 200)
    truth = np.zeros((h, w), np.int64)
    truth[:, 30:] = 1
    noisy = truth.copy()
    flip = rng.random((h, w)) < 0.25
    noisy[flip] = 1 - noisy[flip]
    shifted = np.zeros((h, w), np.int64)
    shifted[:, 25:] = 1  # label edge 5 px off the colour edge
    out = crf_lib.crf_inference_label(img, np.stack([noisy, shifted]), backend="approx")
    assert (noisy != truth).mean() > 0.2 and (out[0] != truth).mean() < 0.01
    assert (out[1] != truth).mean() < 0.01


# --------------------------------------------------------------------------------------------
# CLI end to end
# --------------------------------------------------------------------------------------------
def make_prms(root: Path, n: int, seed: int = 0) -> dict[int, np.ndarray]:
    """n synthetic images (64-96 px, a square of another colour on a noisy background) and maps =
    the square blurred, shifted and noised, max-normalised; returns the ground truth per ref."""
    rng = np.random.default_rng(seed)
    (root / "maps").mkdir(parents=True)
    (root / "images").mkdir()
    gts, lines = {}, []
    for i in range(n):
        hh, ww = (int(v) for v in rng.integers(64, 97, size=2))
        bgc = rng.integers(0, 256, 3)
        img = np.empty((hh, ww, 3), np.float32)
        img[:] = bgc
        s = int(rng.integers(16, 32))
        y0, x0 = int(rng.integers(0, hh - s)), int(rng.integers(0, ww - s))
        gt = np.zeros((hh, ww), bool)
        gt[y0:y0 + s, x0:x0 + s] = True
        img[gt] = (bgc + 128) % 256
        img = np.clip(img + rng.normal(0, 6, img.shape), 0, 255).astype(np.uint8)
        m = ndimage.shift(ndimage.gaussian_filter(gt.astype(np.float32), s / 4), rng.normal(0, s / 8, 2), order=1)
        m = np.clip(m + rng.normal(0, 0.05, m.shape), 0, None)
        path = root / "images" / f"{i}.png"
        Image.fromarray(img).save(path)
        np.save(root / "maps" / f"{i}.npy", (m / (m.max() + 1e-5)).astype(np.float32))
        gts[100 + i] = gt
        lines.append(json.dumps({"index": i, "ref_id": 100 + i, "image_id": i, "image": str(path.resolve()),
                                 "map": f"maps/{i}.npy", "size": [hh, ww]}))
    (root / "index.jsonl").write_text("\n".join(lines) + "\n")
    return gts


def test_cli_end_to_end_tiny_irnet_and_resume(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    gts = make_prms(tmp_path / "prms", 5)
    out = tmp_path / "out"
    argv = ["--prms", str(tmp_path / "prms"), "--out", str(out), "--tiny", "--device", "cpu", "--no_progress",
            "--crf", "approx"]
    assert pm.run(argv) == 0
    index = [json.loads(line) for line in (out / "index.jsonl").read_text().splitlines()]
    assert [r["ref_id"] for r in index] == sorted(gts)
    for r in index:
        assert r["method"] == "irnet (tiny random backbone)" and r["mask"] == f"masks/{r['ref_id']}.png"
        im = Image.open(out / r["mask"])
        assert im.mode == "L" and im.size == gts[r["ref_id"]].shape[::-1]
        assert set(np.unique(np.asarray(im))) <= {0, 1}
        assert (out / "irn" / "seeds" / f"{r['ref_id']}.png").is_file()
    assert (out / "irn" / "res50_irn.safetensors").is_file() and (out / "irn" / "train_log.jsonl").is_file()
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["crf"] == "crf=approx" and cfg["tiny"] is True and cfg["irn_crop_size"] == 128
    summary = json.loads((out / "summary.json").read_text())
    assert summary["method"] == "irnet (tiny random backbone)" and summary["crf"] == "crf=approx"
    assert summary["counts"]["seeds"]["made"] == 5 and summary["counts"]["irn_training"]["trained"]
    assert summary["counts"]["masks"]["made"] == 5
    before = {p: p.stat().st_mtime_ns for p in (out / "masks").iterdir()}
    assert pm.run(argv) == 0  # resume: nothing left to do
    again = json.loads((out / "summary.json").read_text())["counts"]
    assert again["seeds"] == {"made": 0, "skipped": 5}
    assert again["irn_training"]["trained"] is False
    assert again["masks"]["made"] == 0 and again["masks"]["skipped"] == 5
    assert {p: p.stat().st_mtime_ns for p in (out / "masks").iterdir()} == before
    res = pm.evaluate_against(out, lambda ref: gts[ref])
    assert res["n"] == 5 and 0.0 <= res["mIoU"] <= 1.0
    assert "seeds:" in capsys.readouterr().out
    with pytest.raises(UserError, match="another configuration"):
        pm.run(argv + ["--beta", "5"])


def test_cli_threshold_variants(tmp_path: Path) -> None:
    gts = make_prms(tmp_path / "prms", 3, seed=1)
    for method in ("threshold", "threshold+crf"):
        out = tmp_path / method
        assert pm.run(["--prms", str(tmp_path / "prms"), "--out", str(out), "--method", method, "--crf", "approx",
                       "--no_progress"]) == 0
        summary = json.loads((out / "summary.json").read_text())
        assert summary["method"] == f"{method} (reduced variant, no IRNet)"
        assert summary["crf"] == ("none" if method == "threshold" else "crf=approx")
        rec = json.loads((out / "index.jsonl").read_text().splitlines()[0])
        mask = np.asarray(Image.open(out / rec["mask"]))
        if method == "threshold":
            cam = np.load(tmp_path / "prms" / "maps" / "0.npy")
            assert np.array_equal(mask == 1, cam > 0.3)
        assert pm.evaluate_against(out, lambda ref: gts[ref])["mIoU"] > 0.3


def test_cli_errors(tmp_path: Path) -> None:
    make_prms(tmp_path / "prms", 1)
    with pytest.raises(UserError, match="--irn_backbone"):
        pm.run(["--prms", str(tmp_path / "prms"), "--out", str(tmp_path / "o")])
    with pytest.raises(UserError, match="index.jsonl"):
        pm.run(["--prms", str(tmp_path), "--out", str(tmp_path / "o"), "--tiny"])
    with pytest.raises(UserError, match="--irn_backbone .*not found"):
        pm.run(["--prms", str(tmp_path / "prms"), "--out", str(tmp_path / "o"), "--irn_backbone", "nope.pth"])


def test_evaluate_against_by_hand(tmp_path: Path) -> None:
    (tmp_path / "masks").mkdir()
    a = np.zeros((4, 4), np.uint8)
    a[:2, :2] = 1  # 4 pixels
    b = np.zeros((4, 4), np.uint8)  # empty prediction
    Image.fromarray(a, mode="L").save(tmp_path / "masks" / "1.png")
    Image.fromarray(b, mode="L").save(tmp_path / "masks" / "2.png")
    (tmp_path / "index.jsonl").write_text(
        "\n".join(json.dumps({"ref_id": i, "mask": f"masks/{i}.png", "method": "x"}) for i in (1, 2)) + "\n")
    g1 = np.zeros((4, 4), bool)
    g1[:2, :] = True  # 8 pixels: IoU 4/8
    g2 = np.zeros((4, 4), bool)
    g2[3, 3] = True  # IoU 0
    res = pm.evaluate_against(tmp_path, lambda ref: {1: g1, 2: g2}[ref])
    assert res["mIoU"] == pytest.approx(0.25) and res["oIoU"] == pytest.approx(4 / 9) and res["n"] == 2
