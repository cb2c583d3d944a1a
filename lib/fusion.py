"""Language-to-vision fusion blocks shared by the LAVT family.

* `SpatialImageLanguageAttention` — every pixel attends over the words (LAVT's PWAM; Yang et al.,
  CVPR 2022). Also the attention inside FIANet's OPAB and TMEM blocks.
* `PWAM` — pixel-word attention module: projected visual feature x attended language feature.
* `tanh_gate` — the language gate (re-exported from `lib.layers`).
* `OPAB` — FIANet's object/position alignment block (Lei et al., IEEE TGRS 2024).

Shapes: visual tokens ``x (B, L, C_v)``, language ``l (B, C_l, N)`` (channels first),
word mask ``l_mask (B, N, 1)`` (0/1, integer or float).

The 1x1 ``Conv1d`` layers (kept as modules: their weights are the checkpoints' 3-D tensors) run
by default as matrix products in the token layout (``fused = True``): on CPU a 1x1 Conv1d over
thousands of positions is about 3x slower than the same GEMM, and the permutes disappear. The
InstanceNorms then normalise over the token axis with the same formula. ``fused = False`` keeps
the reference op sequence (Conv1d on channels-first tensors, nn.InstanceNorm1d), bit-exact with
the originals; both agree to float rounding (~1e-6).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lib.layers import tanh_gate

__all__ = ["SpatialImageLanguageAttention", "PWAM", "OPAB", "tanh_gate"]

# Additive bias for padded words: logits + (1e4 * m - 1e4). NOT -inf: with an all-zero mask the
# attention is uniform over zeroed values and the output is (numerically almost) zero.
_WORD_MASK_SCALE = 1e4


def pointwise(conv: nn.Conv1d, x: torch.Tensor) -> torch.Tensor:
    """A 1x1 ``Conv1d`` applied to tokens ``(B, L, C_in) -> (B, L, C_out)`` as one GEMM."""
    return F.linear(x, conv.weight.squeeze(-1), conv.bias)


def instance_norm_tokens(x: torch.Tensor, norm: nn.InstanceNorm1d) -> torch.Tensor:
    """``nn.InstanceNorm1d`` (no affine, no running stats) for tokens ``(B, L, C)``: every
    (sample, channel) is normalised over the L positions (biased variance)."""
    var, mean = torch.var_mean(x, dim=1, keepdim=True, unbiased=False)
    return (x - mean) * torch.rsqrt(var + norm.eps)


class SpatialImageLanguageAttention(nn.Module):
    """Pixel-to-word cross-attention, ``(x, l, l_mask) -> (B, L, out_channels)``.

    query = InstanceNorm(Conv1x1(x)) over the L positions; key/value = Conv1x1(l) multiplied by the
    mask; logits scaled by ``key_channels ** -0.5`` (the TOTAL key width, whatever the head count);
    output = InstanceNorm(Conv1x1(heads concatenated)). InstanceNorms have no affine parameters.
    """

    def __init__(self, v_in_channels: int, l_in_channels: int, key_channels: int, value_channels: int,
                 out_channels: int | None = None, num_heads: int = 1):
        super().__init__()
        out_channels = out_channels or value_channels
        if key_channels % num_heads or value_channels % num_heads:
            raise ValueError(f"key/value channels {key_channels}/{value_channels} not divisible by {num_heads} heads")
        self.key_channels, self.value_channels, self.num_heads = key_channels, value_channels, num_heads
        self.f_query = nn.Sequential(nn.Conv1d(v_in_channels, key_channels, 1), nn.InstanceNorm1d(key_channels))
        self.f_key = nn.Sequential(nn.Conv1d(l_in_channels, key_channels, 1))
        self.f_value = nn.Sequential(nn.Conv1d(l_in_channels, value_channels, 1))
        self.W = nn.Sequential(nn.Conv1d(value_channels, out_channels, 1), nn.InstanceNorm1d(out_channels))
        self.fused = True

    def forward(self, x: torch.Tensor, l: torch.Tensor, l_mask: torch.Tensor) -> torch.Tensor:
        b, L, _ = x.shape
        h = self.num_heads
        m = l_mask.permute(0, 2, 1)  # (B, 1, N)
        if self.fused:
            q = instance_norm_tokens(pointwise(self.f_query[0], x), self.f_query[1])  # (B, L, Ck)
            lt = l.transpose(1, 2)  # (B, N, C_l)
            k = pointwise(self.f_key[0], lt).transpose(1, 2) * m  # (B, Ck, N), padded words zeroed
            v = pointwise(self.f_value[0], lt).transpose(1, 2) * m
        else:
            q = self.f_query(x.permute(0, 2, 1)).permute(0, 2, 1)  # (B, L, Ck)
            k = self.f_key(l) * m  # padded words zeroed
            v = self.f_value(l) * m
        n = v.shape[-1]
        q = q.reshape(b, L, h, self.key_channels // h).permute(0, 2, 1, 3)  # (B, h, L, Ck/h)
        k = k.reshape(b, h, self.key_channels // h, n)  # channel c -> head c // (Ck/h)
        v = v.reshape(b, h, self.value_channels // h, n)
        logits = (self.key_channels ** -0.5) * (q @ k)
        logits = logits + (_WORD_MASK_SCALE * m.unsqueeze(1) - _WORD_MASK_SCALE)
        out = logits.softmax(dim=-1) @ v.permute(0, 1, 3, 2)  # (B, h, L, Cv/h)
        out = out.permute(0, 2, 1, 3).reshape(b, L, self.value_channels)
        if self.fused:
            return instance_norm_tokens(pointwise(self.W[0], out), self.W[1])
        return self.W(out.permute(0, 2, 1)).permute(0, 2, 1)


class PWAM(nn.Module):
    """Pixel-word attention module: ``project_mm(vis_project(x) * image_lang_att(x, l, m))``.

    ``(x (B, L, dim), l, l_mask) -> (B, L, value_channels)``; both projections are
    Conv1x1 -> GELU -> Dropout (keys ``vis_project.0``, ``project_mm.0``).
    """

    def __init__(self, dim: int, v_in_channels: int, l_in_channels: int, key_channels: int, value_channels: int,
                 num_heads: int = 1, dropout: float = 0.0):
        super().__init__()
        self.vis_project = nn.Sequential(nn.Conv1d(dim, dim, 1), nn.GELU(), nn.Dropout(dropout))
        self.image_lang_att = SpatialImageLanguageAttention(v_in_channels, l_in_channels, key_channels,
                                                            value_channels, out_channels=value_channels,
                                                            num_heads=num_heads)
        self.project_mm = nn.Sequential(nn.Conv1d(value_channels, value_channels, 1), nn.GELU(), nn.Dropout(dropout))
        self.fused = True

    def forward(self, x: torch.Tensor, l: torch.Tensor, l_mask: torch.Tensor) -> torch.Tensor:
        if self.fused:  # token layout throughout: (B, L, C)
            vis = self.vis_project[2](self.vis_project[1](pointwise(self.vis_project[0], x)))
            mm = vis * self.image_lang_att(x, l, l_mask)
            return self.project_mm[2](self.project_mm[1](pointwise(self.project_mm[0], mm)))
        vis = self.vis_project(x.permute(0, 2, 1))  # (B, dim, L)
        lang = self.image_lang_att(x, l, l_mask)  # (B, L, dim)
        return self.project_mm(vis * lang.permute(0, 2, 1)).permute(0, 2, 1)


class OPAB(nn.Module):
    """FIANet object/position alignment block, ``(x, H, W, t, t_mask, p, p_mask) -> (B, L, C)``.

    Ground-object branch: gated cross-attention to the object words ``t``. Spatial-position branch:
    cross-attention to the position words ``p``, reduced to a (B, 1, H, W) spatial attention map
    ``sigmoid(conv1([mean_c, max_c]))``. Output = object branch x spatial map.
    ``go_embedding`` exists in the original (and its checkpoints) but is never used.
    """

    def __init__(self, dim: int, v_in_channels: int, l_in_channels: int, key_channels: int, value_channels: int,
                 num_heads: int = 1, dropout: float = 0.0):
        super().__init__()
        self.dim = dim
        self.go_cross_attn = SpatialImageLanguageAttention(v_in_channels, l_in_channels, key_channels,
                                                           value_channels, out_channels=value_channels,
                                                           num_heads=num_heads)
        self.go_tanh_gating = tanh_gate(dim)
        self.go_embedding = nn.Linear(dim, dim, bias=False)  # unused (kept for checkpoint compatibility)
        self.sp_cross_attn = SpatialImageLanguageAttention(v_in_channels, l_in_channels, key_channels,
                                                           value_channels, out_channels=value_channels,
                                                           num_heads=num_heads)
        self.conv1 = nn.Conv2d(2, 1, 3, padding=1, bias=False)

    def forward(self, x: torch.Tensor, H: int, W: int, t: torch.Tensor, t_mask: torch.Tensor,
                p: torch.Tensor, p_mask: torch.Tensor) -> torch.Tensor:
        b = x.shape[0]
        go = self.go_cross_attn(x, t, t_mask)
        go = self.go_tanh_gating(go) * go
        sp = self.sp_cross_attn(x, p, p_mask).reshape(b, H, W, self.dim).permute(0, 3, 1, 2)  # (B, C, H, W)
        pooled = torch.cat([sp.mean(dim=1, keepdim=True), sp.amax(dim=1, keepdim=True)], dim=1)  # mean first
        spatial = torch.sigmoid(self.conv1(pooled)).permute(0, 2, 3, 1).reshape(b, H * W, 1)
        return go * spatial
