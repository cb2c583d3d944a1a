"""Small shared building blocks: stochastic depth, the reference init rule, MLP, gates."""
from __future__ import annotations

import torch
from timm.layers import DropPath, trunc_normal_  # exact equivalents of what the originals import
from torch import nn

__all__ = ["DropPath", "trunc_normal_", "Mlp", "tanh_gate", "init_backbone_weights", "h_sigmoid"]


class Mlp(nn.Module):
    """Transformer MLP: ``fc1 (C -> hidden) -> GELU (erf) -> dropout -> fc2 -> dropout``.

    Keys ``fc1.*`` / ``fc2.*`` match the Swin checkpoints.
    """

    def __init__(self, dim: int, hidden: int, drop: float = 0.0):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)
        self.drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


def tanh_gate(dim: int) -> nn.Sequential:
    """Language gate ``Linear -> ReLU -> Linear -> Tanh`` without biases (keys ``.0`` / ``.2``).

    Used as LAVT's ``res_gate``, FIANet's ``context_tanh_gate`` / ``go_tanh_gating`` and RMSIN's
    ``visual_gate``; the output (in (-1, 1)) multiplies the gated tensor element-wise.
    """
    return nn.Sequential(
        nn.Linear(dim, dim, bias=False),
        nn.ReLU(),
        nn.Linear(dim, dim, bias=False),
        nn.Tanh(),
    )


def h_sigmoid(x: torch.Tensor) -> torch.Tensor:
    """Hard sigmoid ``ReLU6(x + 3) / 6``."""
    return nn.functional.relu6(x + 3) / 6


@torch.no_grad()
def init_backbone_weights(module: nn.Module) -> None:
    """The LAVT reference implementation's backbone init rule (Yang et al., CVPR 2022), applied to
    every sub-module.

    ``nn.Linear``: weight trunc-normal(std 0.02, cut at +-2 absolute), bias 0; ``nn.LayerNorm``:
    weight 1, bias 0. Convolutions, BatchNorm and InstanceNorm keep PyTorch's defaults.
    """
    for m in module.modules():
        if isinstance(m, nn.Linear):
            trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            if m.weight is not None:
                nn.init.ones_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


NO_DECAY_KEYS = ("norm", "absolute_pos_embed", "relative_position_bias_table")


def backbone_decay_split(backbone: nn.Module, skip: set[str] = frozenset(), prefix: str = "backbone.",
                         ) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """The LAVT family's backbone parameter groups: ``(no_decay, decay)`` where names containing
    ``norm`` / ``absolute_pos_embed`` / ``relative_position_bias_table`` get no weight decay;
    frozen parameters and the full names in ``skip`` are left out."""
    no_decay, decay = [], []
    for name, p in backbone.named_parameters():
        if not p.requires_grad or prefix + name in skip:
            continue
        (no_decay if any(k in name for k in NO_DECAY_KEYS) else decay).append(p)
    return no_decay, decay
