"""FIANet: fine-grained image-text alignment for referring remote-sensing segmentation
(Lei et al., IEEE TGRS 2024). LAVT plus:

    ids + {l_mask, t_mask, p_mask} --BERT (x3, same ids)--> l (sentence), t (ground object), p (position)
    Swin stage i -> x_i -> FIAM:
        g   = sigmoid(fc2(relu(fc1(mean_tokens(x_i)))))          channel modulation
        r   = PWAM(x_i, l)                                         context branch -> stage output
        ctx = tanh_gate(r) * r
        op  = OPAB(x_i, t, p)                                      object / position branches
        x   = x_i + (ctx + op) * g   --PatchMerging--> stage i+1
    [norm_i(r_i)] --TMEM (text-aware multi-scale, uses l)--> decoder --> logits

The three BERT passes run as one batched call on 3B sequences by default (``batched_text``);
in eval it gives the same numbers as three calls.
"""
from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import nn

from lib.fusion import OPAB, PWAM, SpatialImageLanguageAttention, tanh_gate
from lib.lavt import (
    SWIN_FAMILY_PRETRAINED_MISSING,
    TINY_OPTIONS,
    LAVTOne,
    family_builder,
    family_config_from_fixture,
    fusion_stage_kwargs,
    swin_kwargs,
)
from lib.losses import ce_dice_loss_terms
from lib.multiscale import PyramidNeck
from lib.spec import ModelSpec, Recipe, TextSide
from lib.swin import MultiModalStage, MultiModalSwin


class FIANetStage(MultiModalStage):
    """Swin blocks + FIAM (context PWAM + gate, OPAB, channel modulation)."""

    dead_in_last_stage = ("fc1", "fc2", "context_tanh_gate", "object_position_align_blk")
    always_dead = ("object_position_align_blk.go_embedding",)

    def __init__(self, *, num_heads_fusion: int = 1, fusion_drop: float = 0.0, l_in: int = 768, **swin: Any):
        super().__init__(**swin)
        dim = self.dim
        self.fc1 = nn.Linear(dim, dim // 8)
        self.fc2 = nn.Linear(dim // 8, dim)
        self.context_pixel_attn = PWAM(dim, dim, l_in, dim, dim, num_heads=num_heads_fusion, dropout=fusion_drop)
        self.context_tanh_gate = tanh_gate(dim)
        self.object_position_align_blk = OPAB(dim, dim, l_in, dim, dim, num_heads=num_heads_fusion, dropout=fusion_drop)

    def fuse(self, x, H, W, text, feats, prefix):
        if self.last and feats is None:  # the trunk update of the last stage is discarded
            return self.context_pixel_attn(x, text["l"], text["l_mask"]), None
        g = torch.sigmoid(self.fc2(torch.relu(self.fc1(x.mean(dim=1)))))  # (B, C), mean over tokens
        r = self.context_pixel_attn(x, text["l"], text["l_mask"])
        ctx = self.context_tanh_gate(r) * r
        op = self.object_position_align_blk(x, H, W, text["t"], text["t_mask"], text["p"], text["p_mask"])
        if feats is not None:
            feats[prefix + "object_position_align_blk"] = op
        return r, x + (ctx + op) * g.unsqueeze(1)


class FeedForward(nn.Module):
    """``net = Linear(d, h) -> GELU -> Dropout -> Linear(h, d) -> Dropout`` (keys ``net.0``, ``net.3``)."""

    def __init__(self, dim: int, hidden: int, dropout: float = 0.0):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, dim),
                                 nn.Dropout(dropout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class TMEMBlock(nn.Module):
    """Pre-norm cross-attention of the pooled map to the sentence words, then a pre-norm MLP.

    ``(g (B, C, h, w), l, l_mask) -> (B, C, h, w)``; one attention head.
    """

    def __init__(self, dim: int, l_in: int = 768, mlp_ratio: int = 2):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.tma = SpatialImageLanguageAttention(dim, l_in, dim, dim, out_channels=dim, num_heads=1)
        self.norm2 = nn.LayerNorm(dim)
        self.ff = FeedForward(dim, dim * mlp_ratio)

    def forward(self, g: torch.Tensor, l: torch.Tensor, l_mask: torch.Tensor) -> torch.Tensor:
        b, c, h, w = g.shape
        z = g.flatten(2).transpose(1, 2)  # (B, h*w, C)
        z = z + self.tma(self.norm1(z), l, l_mask)
        z = z + self.ff(self.norm2(z))
        return z.reshape(b, h, w, c).permute(0, 3, 1, 2)


class FIANetBackbone(MultiModalSwin):
    """Multi-modal Swin with FIAM stages, followed by TMEM (``tmem``) on the normalised outputs."""

    def __init__(self, *args: Any, tmem_channels: list[int], num_tmem: int, l_in: int, tmem_mlp_ratio: int = 2,
                 **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.tmem = PyramidNeck(tmem_channels, num_tmem, lambda hidden: TMEMBlock(hidden, l_in, tmem_mlp_ratio))
        self.set_fast_paths(self.fused_attn)  # the TMEM attention follows the same switch

    def forward(self, image, text, feats=None):
        outs = self.forward_stages(image, text, feats)
        outs = self.tmem(outs, text["l"], text["l_mask"], feats=feats, prefix="backbone.tmem.")
        if feats is not None:
            feats["backbone.output"] = outs
        return outs


class FIANet(LAVTOne):
    """FIANet (``lavt_one``-style, BERT inside). ``forward(image, text, l_mask, t_mask, p_mask)``."""

    stage_cls = FIANetStage

    def build_backbone(self, config: dict[str, Any]) -> MultiModalSwin:
        t = config["tmem"]
        return FIANetBackbone(self.stage_cls, fusion_stage_kwargs(config), tmem_channels=t["channels"],
                              num_tmem=config["num_tmem"], l_in=config["l_in"], tmem_mlp_ratio=t.get("mlp_ratio", 2),
                              **swin_kwargs(config))

    def encode_text(self, text, l_mask, t_mask=None, p_mask=None, feats=None) -> dict:
        """Three BERT passes over the same ids with the sentence / object / position masks."""
        if t_mask is None or p_mask is None:
            raise ValueError("FIANet needs t_mask and p_mask (ground-object and position word masks)")
        masks = (l_mask, t_mask, p_mask)
        if self.config.get("batched_text", True):
            b = text.shape[0]
            h = self.text_encoder(text.repeat(3, 1), attention_mask=torch.cat(masks))[0]
            hs = h.split(b)
        else:
            hs = [self.text_encoder(text, attention_mask=m)[0] for m in masks]
        out = {}
        for name, h, m in zip("ltp", hs, masks):
            if feats is not None:
                feats[f"text_encoder.{name}_feats"] = h
            out[name] = h.permute(0, 2, 1)
            out[f"{name}_mask"] = m.unsqueeze(-1)
        return out

    def loss(self, outputs: torch.Tensor, batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``0.9 * weighted CE + 0.1 * Dice`` (paper section III-E), as two named terms."""
        return ce_dice_loss_terms(self.logits(outputs), batch["target"])


def _configure(cfg: dict, options: dict) -> None:
    num_tmem = int(options.get("num_tmem", 1))
    if num_tmem < 1:
        raise ValueError(f"num_tmem must be >= 1, got {num_tmem}")
    cfg["num_tmem"] = num_tmem
    e = cfg["swin"]["embed_dim"]
    cfg["tmem"] = {"channels": [e * 2 ** i for i in range(len(cfg["swin"]["depths"]))], "mlp_ratio": 2}


def _from_fixture(fx: Mapping[str, Any], cfg: dict) -> None:
    tmem = fx.get("tmem", {})
    if "channels" in tmem:
        cfg["tmem"]["channels"] = [int(c) for c in tmem["channels"]]
    cfg["num_tmem"] = int(fx.get("num_tmem", tmem.get("num_blocks", cfg["num_tmem"])))


_build = family_builder(_configure, extras=("num_tmem",))

SPEC = ModelSpec(
    target="lib.fianet:FIANet", build_config=_build,
    config_from_fixture=lambda fx: family_config_from_fixture(fx, "fianet", _build, _from_fixture, ("num_tmem",)),
    # The README's commands: RRSIS-D lr 3e-5 / 40 epochs / 22 tokens / 3 TMEM blocks; RefSegRS 5e-5 / 60 / 20 / 1.
    recipes={"rrsisd": Recipe(lr=3e-5, epochs=40, batch_size=8, max_tokens=22, options={"num_tmem": 3}),
             "refsegrs": Recipe(lr=5e-5, epochs=60, batch_size=8, max_tokens=20, options={"num_tmem": 1}),
             "*": Recipe(lr=5e-5, epochs=60, batch_size=8, max_tokens=20, options={"num_tmem": 1})},
    sync_bn=False,  # trained on one GPU with plain BatchNorm
    val_protocol="one-per-ref", test_protocol="one-per-ref", inputs=("image", "text", "l_mask", "t_mask", "p_mask"),
    text=TextSide("bert", word_masks=True), pretrained_missing=SWIN_FAMILY_PRETRAINED_MISSING, tiny=TINY_OPTIONS)
