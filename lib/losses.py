"""Segmentation loss terms of the LAVT family; each model's ``loss`` composes them.

* LAVT (Yang et al., CVPR 2022, section 3.5; and CrossVLT's segmentation term): class-weighted
  cross-entropy, weights [0.9, 1.1].
* FIANet / RMSIN: ``0.9 * CE_w + 0.1 * Dice`` where Dice is computed on the softmax
  probabilities against the one-hot target for BOTH classes, ``1 - (2 I + 1e-6) / (U + 1e-6)``
  per sample and class, SUMMED over batch and classes (so it grows with the batch size).

Losses are always computed in float32 (autocast disabled inside), on full-resolution logits
``(B, 2, H, W)`` and an int64 target ``(B, H, W)``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

CLASS_WEIGHTS = (0.9, 1.1)
DICE_EPS = 1e-6


def weighted_cross_entropy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean CE with class weights [0.9, 1.1] (weighted mean: sum w_y * nll / sum w_y)."""
    with torch.autocast(device_type=logits.device.type, enabled=False):
        weight = torch.tensor(CLASS_WEIGHTS, device=logits.device)
        return F.cross_entropy(logits.float(), target.long(), weight=weight)


def dice_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Sum over samples and classes of ``1 - (2*sum(p*t) + eps) / (sum(p) + sum(t) + eps)``."""
    with torch.autocast(device_type=logits.device.type, enabled=False):
        probs = logits.float().softmax(dim=1)
        onehot = F.one_hot(target.long(), probs.shape[1]).permute(0, 3, 1, 2).to(probs.dtype)
        inter = (probs * onehot).sum(dim=(2, 3))
        union = probs.sum(dim=(2, 3)) + onehot.sum(dim=(2, 3))
        return (1 - (2 * inter + DICE_EPS) / (union + DICE_EPS)).sum()


def ce_dice_loss_terms(logits: torch.Tensor, target: torch.Tensor) -> dict[str, torch.Tensor]:
    """FIANet / RMSIN loss as named, weighted terms: ``{'ce': 0.9 * weighted CE, 'dice': 0.1 * Dice}``."""
    return {"ce": 0.9 * weighted_cross_entropy(logits, target), "dice": 0.1 * dice_loss(logits, target)}


def ce_dice_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """FIANet / RMSIN loss: ``0.9 * weighted CE + 0.1 * Dice``."""
    terms = ce_dice_loss_terms(logits, target)
    return terms["ce"] + terms["dice"]
