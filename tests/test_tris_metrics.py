"""Evaluation at the original resolution and the point metrics (Hit, PointM), on hand-computed
cases with non-square images (a swapped x / y would fail them)."""
from __future__ import annotations

import pytest
import torch

import utils


def test_resize_to_original_non_square_bilinear_align_corners():
    # f(y, x) = 3y + x is linear, so bilinear interpolation with align_corners=True reproduces it:
    # a 2x3 map to 3x5 samples f at y = r/2, x = c/2.
    pred = torch.tensor([[0.0, 1.0, 2.0], [3.0, 4.0, 5.0]])
    out = utils.resize_to_original(pred, (3, 5))
    expected = torch.tensor([[0.0, 0.5, 1.0, 1.5, 2.0],
                             [1.5, 2.0, 2.5, 3.0, 3.5],
                             [3.0, 3.5, 4.0, 4.5, 5.0]])
    assert out.shape == (3, 5) and torch.allclose(out, expected, atol=1e-6)
    # every rank keeps its leading dimensions; the same size is a no-op
    assert utils.resize_to_original(pred[None], (3, 5)).shape == (1, 3, 5)
    assert utils.resize_to_original(pred[None, None].repeat(2, 4, 1, 1), (3, 5)).shape == (2, 4, 3, 5)
    assert torch.equal(utils.resize_to_original(pred, (2, 3)), pred)
    with pytest.raises(ValueError, match="prediction must be"):
        utils.resize_to_original(torch.zeros(5), (3, 5))


def test_argmax_point_row_major_ties():
    score = torch.tensor([[0.0, 2.0, 1.0],
                          [2.0, 0.0, 2.0]])
    assert utils.argmax_point(score) == (0, 1)  # first maximum in row-major order
    assert utils.argmax_point(torch.zeros(4, 7)) == (0, 0)  # an all-zero stage-1 map
    assert utils.argmax_point(torch.tensor([[-3.0, -1.0], [-2.0, -4.0]])) == (0, 1)  # negative logits


def test_point_in_box_inclusive_and_axis_order():
    box = (1, 2, 3, 4)  # x1, y1, x2, y2
    assert utils.point_in_box((4, 3), box)       # row 4 = y2, col 3 = x2: bounds included
    assert utils.point_in_box((2, 1), box)
    assert not utils.point_in_box((5, 3), box)   # below
    assert not utils.point_in_box((1, 2), box)   # col inside, row above: catches x / y swaps
    assert utils.point_in_box((1, 2), [(9, 9, 9, 9), (2, 1, 2, 1)])  # any of several boxes
    assert utils.coco_box_to_xyxy([1.7, 2.2, 3.9, 4.5]) == (1, 2, 4, 6)  # truncation, then x + w


def test_evaluate_at_original_resolution_hand_computed():
    # Network-size map 2x2, ground truth 4x6. Upsampled: v(r, c) = -1 + (c / 5) * (2 + r / 3).
    pred = torch.tensor([[[-1.0, 1.0], [-1.0, 2.0]]])
    gt = torch.zeros(4, 6, dtype=torch.bool)
    gt[:, 3:] = True
    res = utils.evaluate_at_original_resolution(pred, gt, box=(5, 3, 5, 3))
    expected_mask = torch.zeros(4, 6, dtype=torch.bool)
    expected_mask[0:2, 3:] = True   # rows 0-1: c > 2.5 / 2.14
    expected_mask[2:4, 2:] = True   # rows 2-3: c > 1.88 / 1.67
    assert torch.equal(res["mask"], expected_mask)
    assert (res["inter"], res["union"]) == (12, 14) and res["iou"] == pytest.approx(12 / 14)
    assert res["point"] == (3, 5) and res["hit"] and res["hit_mask"]
    # the same box with x and y swapped misses
    assert not utils.evaluate_at_original_resolution(pred, gt, box=(3, 5, 3, 5))["hit"]
    # threshold: logit > 0 is sigmoid > 0.5; an all-negative map predicts nothing
    neg = utils.evaluate_at_original_resolution(pred - 5, gt)
    assert not neg["mask"].any() and neg["iou"] == 0.0 and neg["point"] == (3, 5) and "hit" not in neg
    with pytest.raises(ValueError, match="one sample at a time"):
        utils.evaluate_at_original_resolution(torch.zeros(2, 2, 2), gt)


def test_point_metrics_accumulate():
    pm = utils.PointMetrics()
    mask = torch.zeros(3, 5, dtype=torch.bool)
    mask[2, 4] = True
    s_hit_both = torch.zeros(3, 5)
    s_hit_both[2, 4] = 1.0                                   # max at (2, 4): in box and mask
    s_box_only = torch.zeros(3, 5)
    s_box_only[0, 4] = 1.0                                   # in box (x 3..4, y 0..2), not mask
    s_none = torch.zeros(3, 5)
    s_none[1, 0] = 1.0
    box = (3, 0, 4, 2)
    assert pm.update(s_hit_both, box, mask) == {"point": (2, 4), "hit": True, "hit_mask": True}
    assert pm.update(s_box_only, box, mask)["hit"] and not pm.update(s_none, box, mask)["hit"]
    summary = pm.summary()
    assert summary["Hit"] == pytest.approx(2 / 3) and summary["PointM"] == pytest.approx(1 / 3)
    assert summary["num_points"] == 3
    assert utils.PointMetrics().summary() == {"Hit": 0.0, "PointM": 0.0, "num_points": 0}
    with pytest.raises(ValueError, match="mask shape"):
        utils.point_hits(s_none, mask=mask.t())
