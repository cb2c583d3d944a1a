"""LAVT: Language-Aware Vision Transformer (Yang et al., CVPR 2022), lavt.md.

    ids, l_mask --BERT--> l (B, 768, N)
    image --Swin stage i--> x_i --PWAM(x_i, l)--> r_i --+--> norm_i(r_i) ---------> decoder --> logits
                                                        +--> x_i + LG(r_i) * r_i --PatchMerging--> stage i+1

`LAVTOne` is the ``lavt_one`` variant (BERT inside, trained with dropout). `LAVT` is the ``lavt``
variant: identical modules and numbers, but its official checkpoints are two-part
(``model`` + ``bert_model``, handled by `lib.checkpoint`) and the reference never puts its
separate BERT in train mode, so ``train()`` keeps ``text_encoder`` in eval (dropout off).

`LAVTOne` is also the base class of the other LAVT-family models: they override
``stage_cls`` / ``build_backbone`` / ``build_classifier`` / ``encode_text``.

Config entries read here besides the sizes: ``fused_attn`` (fast paths on; ``False`` gives the
reference op order, which also keeps the decoder in the plain layout) and ``channels_last``
(``'auto'`` by default: the decoder's channels-last fast path on CUDA only, see `lib.decoder`).
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from bert.text_encoder import build_text_encoder
from lib.decoder import ChannelsLast, SimpleDecoding, check_channels_last
from lib.fusion import PWAM, tanh_gate
from lib.swin import MultiModalStage, MultiModalSwin


class LAVTStage(MultiModalStage):
    """Swin blocks + PWAM (``fusion``) + language gate (``res_gate``)."""

    # Parameters the reference computes but discards in the last stage (no PatchMerging after it).
    dead_in_last_stage: tuple[str, ...] = ("res_gate",)
    always_dead: tuple[str, ...] = ()

    def __init__(self, *, num_heads_fusion: int = 1, fusion_drop: float = 0.0, l_in: int = 768, **swin: Any):
        super().__init__(**swin)
        dim = self.dim
        self.fusion = PWAM(dim, dim, l_in, dim, dim, num_heads=num_heads_fusion, dropout=fusion_drop)
        self.res_gate = tanh_gate(dim)

    def fuse(self, x, H, W, text, feats, prefix):
        r = self.fusion(x, text["l"], text["l_mask"])
        if self.last and feats is None:
            return r, None  # the gated trunk update of the last stage is never used
        return r, x + self.res_gate(r) * r


def swin_kwargs(config: dict[str, Any]) -> dict[str, Any]:
    """Backbone keyword arguments from our model config."""
    s = config["swin"]
    return dict(
        embed_dim=s["embed_dim"], depths=s["depths"], num_heads=s["num_heads"], window_size=s["window_size"],
        mlp_ratio=s.get("mlp_ratio", 4.0), qkv_bias=s.get("qkv_bias", True), qk_scale=s.get("qk_scale"),
        drop_rate=s.get("drop_rate", 0.0), attn_drop_rate=s.get("attn_drop_rate", 0.0),
        drop_path_rate=s.get("drop_path_rate", 0.3), patch_size=s.get("patch_size", 4),
        in_chans=s.get("in_chans", 3), patch_norm=s.get("patch_norm", True),
        fused_attn=config.get("fused_attn", True), grad_ckpt=config.get("grad_ckpt", False),
    )


def fusion_stage_kwargs(config: dict[str, Any]) -> list[dict[str, Any]]:
    f = config["fusion"]
    return [dict(num_heads_fusion=h, fusion_drop=f.get("dropout", 0.0), l_in=config["l_in"]) for h in f["num_heads"]]


class LAVTOne(nn.Module):
    """LAVT with BERT inside (``lavt_one``).

    ``forward(image (B,3,H,W), text (B,N), l_mask (B,N), t_mask=None, p_mask=None,
    return_features=False) -> logits (B, 2, H, W)`` (or ``(logits, features)``).
    """

    uses_word_masks = False
    stage_cls: type[MultiModalStage] = LAVTStage
    keep_text_encoder_eval = False

    def __init__(self, config: dict[str, Any]):
        super().__init__()
        self.config = config
        self.backbone = self.build_backbone(config)
        self.classifier = self.build_classifier(config)
        self.text_encoder = build_text_encoder(config["bert"])
        # Reference init order: backbone built with default init, then the backbone init rule.
        self.backbone.init_weights()
        self.set_channels_last(decoder_channels_last(config))

    # -- construction hooks ------------------------------------------------------------------
    def build_backbone(self, config: dict[str, Any]) -> MultiModalSwin:
        return MultiModalSwin(self.stage_cls, fusion_stage_kwargs(config), **swin_kwargs(config))

    def build_classifier(self, config: dict[str, Any]) -> nn.Module:
        """The decoder (``classifier``): maps of the 4 stages -> (B, 2, H/4, W/4) logits."""
        return SimpleDecoding(config["decoder"]["c4_dims"], config["decoder"].get("factor", 2))

    # -- forward -----------------------------------------------------------------------------
    def encode_text(self, text: torch.Tensor, l_mask: torch.Tensor, t_mask=None, p_mask=None, feats=None) -> dict:
        """BERT last hidden state -> ``{'l': (B, C_l, N), 'l_mask': (B, N, 1)}``."""
        h = self.text_encoder(text, attention_mask=l_mask)[0]
        if feats is not None:
            feats["text_encoder.last_hidden_state"] = h
        return {"l": h.permute(0, 2, 1), "l_mask": l_mask.unsqueeze(-1)}

    def forward(self, image: torch.Tensor, text: torch.Tensor, l_mask: torch.Tensor, t_mask: torch.Tensor | None = None,
                p_mask: torch.Tensor | None = None, return_features: bool = False):
        feats: dict[str, Any] | None = {} if return_features else None
        lang = self.encode_text(text, l_mask, t_mask, p_mask, feats)
        maps = self.backbone(image, lang, feats)
        x = self.classifier(maps[3], maps[2], maps[1], maps[0])
        if feats is not None:
            feats["classifier.output"] = x
        logits = F.interpolate(x, size=image.shape[-2:], mode="bilinear", align_corners=True)
        return (logits, feats) if return_features else logits

    # -- training helpers --------------------------------------------------------------------
    def unused_parameter_names(self) -> list[str]:
        """Parameters that the reference never uses (no gradient): dead last-stage trunk updates
        and modules defined but never called. Train.py leaves them out of the optimiser."""
        names: dict[str, None] = {}  # ordered set
        layers = self.backbone.layers
        for i, layer in enumerate(layers):
            dead = list(layer.always_dead) + (list(layer.dead_in_last_stage) if i == len(layers) - 1 else [])
            for mod in dead:
                sub = layer.get_submodule(mod)
                names.update((f"backbone.layers.{i}.{mod}.{n}", None) for n, _ in sub.named_parameters())
        return list(names)

    def train(self, mode: bool = True):
        super().train(mode)
        if self.keep_text_encoder_eval:
            self.text_encoder.eval()
        return self

    def set_grad_ckpt(self, flag: bool) -> None:
        self.backbone.set_grad_ckpt(flag)

    def set_fused_attention(self, flag: bool) -> None:
        """Every fast path on (``True``) or the reference op order (``False``, decoder layout included)."""
        self.backbone.set_fused_attention(flag)
        self.set_channels_last(self.config.get("channels_last", "auto") if flag else False)

    def set_channels_last(self, flag: ChannelsLast) -> None:
        """The decoder's channels-last fast path: ``True``, ``False`` or ``'auto'`` (CUDA only)."""
        self.classifier.channels_last = check_channels_last(flag)


def decoder_channels_last(config: dict[str, Any]) -> ChannelsLast:
    """The decoder layout a config asks for: ``config['channels_last']`` (default ``'auto'``), and
    never with the fast paths off (``fused_attn=False`` is the reference op order)."""
    if not config.get("fused_attn", True):
        return False
    return check_channels_last(config.get("channels_last", "auto"))


class LAVT(LAVTOne):
    """The ``lavt`` variant: same modules; its BERT never switches to train mode (dropout off)."""

    keep_text_encoder_eval = True
