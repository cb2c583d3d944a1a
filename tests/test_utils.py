"""Metrics on hand-computed cases, RNG state round trip, evaluation sharding."""
from __future__ import annotations

import random

import numpy as np
import pytest
import torch

import utils


def _mask(rows: list[str]) -> torch.Tensor:
    return torch.tensor([[c == "#" for c in r] for r in rows])


def test_iou_hand_computed():
    pred = _mask(["##..",
                  "##..",
                  "....",
                  "...."])
    gt = _mask(["#...",
                "#...",
                "#...",
                "...."])
    inter, union = utils.intersection_union(pred[None], gt[None])
    assert inter.tolist() == [2] and union.tolist() == [5]
    assert utils.sample_iou(inter, union).tolist() == [pytest.approx(0.4)]


def test_empty_prediction_and_empty_ground_truth():
    empty = torch.zeros(1, 4, 4, dtype=torch.bool)
    full = torch.ones(1, 4, 4, dtype=torch.bool)
    # Both empty: union is 0, the reference counts IoU 0 (not 1).
    i, u = utils.intersection_union(empty, empty)
    assert (i.item(), u.item()) == (0, 0)
    assert utils.sample_iou(i, u).item() == 0.0
    # Empty prediction against a full mask: IoU 0, union 16.
    i, u = utils.intersection_union(empty, full)
    assert (i.item(), u.item()) == (0, 16)
    # Empty ground truth with a prediction: IoU 0.
    i, u = utils.intersection_union(full, empty)
    assert utils.sample_iou(i, u).item() == 0.0


def test_segmetrics_aggregates_like_reference():
    # Three samples with (I, U) = (2, 5), (9, 10), (0, 0).
    a_pred = _mask(["##..", "##..", "....", "...."])
    a_gt = _mask(["#...", "#...", "#...", "...."])
    b_pred = torch.zeros(4, 4, dtype=torch.bool); b_pred.view(-1)[:9] = True
    b_gt = torch.zeros(4, 4, dtype=torch.bool); b_gt.view(-1)[:10] = True
    c = torch.zeros(4, 4, dtype=torch.bool)
    m = utils.SegMetrics()
    m.update(torch.stack([a_pred, b_pred]), torch.stack([a_gt, b_gt]), ["ship", "dam"])
    m.update(c[None], c[None], ["ship"])
    s = m.summary()
    assert s["num_samples"] == 3
    assert s["oIoU"] == pytest.approx((2 + 9 + 0) / (5 + 10 + 0))
    assert s["mIoU"] == pytest.approx((0.4 + 0.9 + 0.0) / 3)
    assert s["P@0.5"] == pytest.approx(1 / 3)
    assert s["P@0.9"] == pytest.approx(1 / 3)  # 0.9 >= 0.9 counts
    assert s["per_category"]["ship"]["num_samples"] == 2
    assert s["per_category"]["ship"]["mIoU"] == pytest.approx(0.2)
    assert s["per_category"]["dam"]["oIoU"] == pytest.approx(0.9)
    table = utils.format_results_table(s)
    assert "73.33" in table  # oIoU 11/15 as a percentage


def test_batched_equals_one_by_one():
    g = torch.Generator().manual_seed(0)
    pred = torch.rand(6, 8, 8, generator=g) > 0.5
    gt = torch.rand(6, 8, 8, generator=g) > 0.6
    a, b = utils.SegMetrics(), utils.SegMetrics()
    a.update(pred, gt)
    for k in range(6):
        b.update(pred[k:k + 1], gt[k:k + 1])
    assert a.summary() == b.summary()


def test_shape_mismatch_is_a_clear_error():
    with pytest.raises(ValueError, match="shape"):
        utils.intersection_union(torch.zeros(1, 2, 2), torch.zeros(1, 3, 3))


def test_rng_state_round_trip():
    utils.seed_everything(3)
    state = utils.get_rng_state()
    first = (random.random(), np.random.rand(), torch.rand(1).item())
    utils.set_rng_state(state)
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == first


def test_shard_sampler_covers_each_index_once():
    shards = [list(utils.ShardSampler(7, r, 3)) for r in range(3)]
    assert sorted(sum(shards, [])) == list(range(7))


def test_single_process_fallback(monkeypatch):
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(k, raising=False)
    info = utils.init_distributed("cpu")
    assert (info.rank, info.world_size, info.distributed, info.device.type) == (0, 1, False, "cpu")
