"""LGFormer: linguistic query-guided mask generation for referring image segmentation
(Wei, Chen, Chen, Zhu, arXiv 2301.06429), as the authors' public implementation computes it.

    ids, l_mask --BERT--> l (B, C_l, N)
    image --Swin stage i--> x_i --VLBA(x_i, l)--> (r_v, r_l)
        r_v --norm_i--> s_i                               (stage map for the decoder)
        x_i + G_v(r_v) * r_v --PatchMerging--> stage i+1  (gated visual trunk)
        (l + G_l(r_l) * r_l) * m --> stage i+1            (gated, re-masked words)
    text for the decoder: r_l of the last stage
    pixel decoder (float32): s4, s3, s2 --proj + sine pos + level embed--> memory (B, S, 256)
        k x [multi-scale deformable self-attention + FFN, then pixel->word cross-attention + FFN]
        split -> 1/32, 1/16, 1/8 maps; FPN to 1/4 with s1 -> mask features F (B, 256, H/4, W/4)
    query decoder: q0 = txt_proj(masked mean of the words); layer k cross-attends to level k mod 3
    kernel head: each q_k -> 256 weights + 1 bias, mask_k = F . w + b, upsampled to the image
    outputs = [mask_0, ..., mask_K] (all supervised); prediction = sigmoid(mask_K) > 0.5

The paper's method section (the VLBA module, the Mask2Former-style pixel decoder of Cheng et al.,
CVPR 2022, and the linguistic-query decoder) is followed as the released code implements it; the
decoder depths and FFN widths, the text width (BERT hidden size) and the token count are config
values (the reference: 6 encoder layers with FFN 1024, 6 query layers with FFN 2048, 768, 20).
State-dict keys equal the original's, so its checkpoints (``{'model': ...}``) load strictly.
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from bert.text_encoder import build_text_encoder
from lib.deformable import (
    MSDeformAttn,
    flatten_levels,
    level_reference_points,
    sine_position_encoding,
)
from lib.fusion import instance_norm_tokens, pointwise, tanh_gate
from lib.lavt import TINY_OPTIONS, family_builder, swin_kwargs
from lib.layers import backbone_decay_split
from lib.spec import ModelSpec, Recipe, TextSide
from lib.swin import SWIN_DEFAULTS, MultiModalStage, MultiModalSwin

# Additive bias of padded words in the VLBA logits: (1e4 * m - 1e4), not -inf.
_WORD_MASK_SCALE = 1e4
POS_WEIGHT = 1.1  # BCE positive-class weight of the reference training loss


# --------------------------------------------------------------------------------------------
# Encoder: VLBA and the multi-modal Swin stage
# --------------------------------------------------------------------------------------------
def _gelu_drop(seq: nn.Sequential, x: torch.Tensor, start: int) -> torch.Tensor:
    """``seq[start+1]`` (GELU) then ``seq[start+2]`` (Dropout) of a Conv-GELU-Dropout sequence."""
    return seq[start + 2](seq[start + 1](x))


class VisionLanguageAttention(nn.Module):
    """The two attention directions of VLBA from ONE logit matrix (``image_lang_att``).

    ``(x (B, L, C_v), l (B, C_l, N), l_mask (B, N, 1)) -> (vis (B, L, C_v), lang (B, C_l, N))``.
    Logits = IN(query(x)) . (key(l) * m) * C_v^-0.5 (the full width, whatever the head count)
    + (1e4 m - 1e4); words -> pixels: softmax over the words, values value(l) * m, then
    IN(W(.)); pixels -> words: softmax of the transposed logits over the pixels, values
    IN(sym_value(x)), masked, then sym_W. InstanceNorms have no affine parameters; heads split the
    channels head-major.
    """

    def __init__(self, v_channels: int, l_channels: int, num_heads: int = 1):
        super().__init__()
        if v_channels % num_heads or l_channels % num_heads:
            raise ValueError(f"VLBA widths {v_channels}/{l_channels} not divisible by {num_heads} heads")
        self.v_channels, self.l_channels, self.num_heads = v_channels, l_channels, num_heads
        self.query = nn.Sequential(nn.Conv1d(v_channels, v_channels, 1), nn.InstanceNorm1d(v_channels))
        self.key = nn.Conv1d(l_channels, v_channels, 1)
        self.value = nn.Conv1d(l_channels, v_channels, 1)
        self.W = nn.Sequential(nn.Conv1d(v_channels, v_channels, 1), nn.InstanceNorm1d(v_channels))
        self.sym_value = nn.Sequential(nn.Conv1d(v_channels, l_channels, 1), nn.InstanceNorm1d(l_channels))
        self.sym_W = nn.Conv1d(l_channels, l_channels, 1)
        self.fused = True

    def forward(self, x: torch.Tensor, l: torch.Tensor, l_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        b, L, cv = x.shape
        cl, h = self.l_channels, self.num_heads
        m = l_mask.transpose(1, 2).to(x.dtype)  # (B, 1, N)
        n = l.shape[-1]
        if self.fused:  # token layout, 1x1 convs as GEMMs
            q = instance_norm_tokens(pointwise(self.query[0], x), self.query[1])  # (B, L, C_v)
            lt = l.transpose(1, 2)
            k = pointwise(self.key, lt).transpose(1, 2) * m  # (B, C_v, N)
            v = pointwise(self.value, lt).transpose(1, 2) * m
            sym_v = instance_norm_tokens(pointwise(self.sym_value[0], x), self.sym_value[1])  # (B, L, C_l)
            sym_v = sym_v.view(b, L, h, cl // h).transpose(1, 2)  # (B, h, L, C_l/h)
        else:  # the reference op sequence (channels-first Conv1d, nn.InstanceNorm1d)
            xc = x.transpose(1, 2)
            q = self.query(xc).transpose(1, 2)
            k = self.key(l) * m
            v = self.value(l) * m
            sym_v = self.sym_value(xc).reshape(b, h, cl // h, L).transpose(2, 3)
        q = q.reshape(b, L, h, cv // h).transpose(1, 2)  # (B, h, L, C_v/h)
        k = k.reshape(b, h, cv // h, n)
        v = v.reshape(b, h, cv // h, n)
        logits = torch.matmul(q, k) * (self.v_channels ** -0.5)
        logits = logits + (_WORD_MASK_SCALE * m.unsqueeze(1) - _WORD_MASK_SCALE)  # (B, h, L, N)
        out = torch.matmul(logits.softmax(-1), v.transpose(2, 3))  # (B, h, L, C_v/h)
        out = out.transpose(1, 2).reshape(b, L, cv)
        sym = torch.matmul(logits.transpose(2, 3).softmax(-1), sym_v)  # softmax over the pixels
        sym = sym.transpose(1, 2).reshape(b, n, cl)  # (B, N, C_l)
        if self.fused:
            out = instance_norm_tokens(pointwise(self.W[0], out), self.W[1])
            sym = pointwise(self.sym_W, sym * m.transpose(1, 2)).transpose(1, 2)
        else:
            out = self.W(out.transpose(1, 2)).transpose(1, 2)
            sym = self.sym_W(sym.transpose(1, 2) * m)
        return out, sym


class VLBA(nn.Module):
    """Vision-language bidirectional attention (``fusion``):
    ``(x (B, L, C), l (B, C_l, N), l_mask (B, N, 1)) -> (r_v (B, L, C), r_l (B, C_l, N))``.

    r_v = project_mm([vis_project(x), attention_vis]) and r_l = sym_project_mm([lang_project(l) * m,
    attention_lang * m]) * m: concatenation along channels and a 2-layer 1x1 MLP (GELU) per side.
    """

    def __init__(self, dim: int, l_in: int = 768, num_heads: int = 1, dropout: float = 0.0):
        super().__init__()
        self.vis_project = nn.Sequential(nn.Conv1d(dim, dim, 1), nn.GELU(), nn.Dropout(dropout))
        self.lang_project = nn.Sequential(nn.Conv1d(l_in, l_in, 1), nn.GELU(), nn.Dropout(dropout))
        self.image_lang_att = VisionLanguageAttention(dim, l_in, num_heads)
        self.project_mm = nn.Sequential(nn.Conv1d(2 * dim, dim, 1), nn.GELU(), nn.Dropout(dropout),
                                        nn.Conv1d(dim, dim, 1), nn.GELU(), nn.Dropout(dropout))
        self.sym_project_mm = nn.Sequential(nn.Conv1d(2 * l_in, l_in, 1), nn.GELU(), nn.Dropout(dropout),
                                            nn.Conv1d(l_in, l_in, 1), nn.GELU(), nn.Dropout(dropout))
        self.fused = True

    def forward(self, x: torch.Tensor, l: torch.Tensor, l_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        vis_aux, lang_aux = self.image_lang_att(x, l, l_mask)
        if self.fused:  # token layout (B, L, C) / (B, N, C_l)
            mt = l_mask.to(x.dtype)  # (B, N, 1)
            vis = _gelu_drop(self.vis_project, pointwise(self.vis_project[0], x), 0)
            lang = _gelu_drop(self.lang_project, pointwise(self.lang_project[0], l.transpose(1, 2)), 0) * mt
            lang_aux = lang_aux.transpose(1, 2) * mt
            mm = torch.cat([vis, vis_aux], -1)
            r_v = _gelu_drop(self.project_mm, pointwise(self.project_mm[0], mm), 0)
            r_v = _gelu_drop(self.project_mm, pointwise(self.project_mm[3], r_v), 3)
            ml = torch.cat([lang, lang_aux], -1)
            r_l = _gelu_drop(self.sym_project_mm, pointwise(self.sym_project_mm[0], ml), 0)
            r_l = _gelu_drop(self.sym_project_mm, pointwise(self.sym_project_mm[3], r_l), 3) * mt
            return r_v, r_l.transpose(1, 2)
        m = l_mask.transpose(1, 2).to(x.dtype)  # (B, 1, N)
        vis = self.vis_project(x.transpose(1, 2))
        lang = self.lang_project(l) * m
        r_v = self.project_mm(torch.cat([vis, vis_aux.transpose(1, 2)], 1)).transpose(1, 2)
        r_l = self.sym_project_mm(torch.cat([lang, lang_aux * m], 1)) * m
        return r_v, r_l


class LGFormerStage(MultiModalStage):
    """Swin blocks + VLBA (``fusion``) + visual gate (``res_gate``) + word gate (``sym_res_gate``).

    Updates the language state: ``l`` becomes the gated, re-masked words and ``l_out`` the VLBA
    language output r_l (the last stage's is the decoder's text).
    """

    # Computed by the reference and discarded in the last stage (no PatchMerging, no next stage).
    dead_in_last_stage: tuple[str, ...] = ("res_gate", "sym_res_gate")

    def __init__(self, *, num_heads_fusion: int = 1, fusion_drop: float = 0.0, l_in: int = 768, **swin: Any):
        super().__init__(**swin)
        self.fusion = VLBA(self.dim, l_in, num_heads_fusion, fusion_drop)
        self.res_gate = tanh_gate(self.dim)
        self.sym_res_gate = tanh_gate(l_in)

    def fuse(self, x, H, W, text, feats, prefix):
        m = text["l_mask"]
        r_v, r_l = self.fusion(x, text["l"], m)
        if feats is not None:
            feats[prefix + "fusion.vis"] = r_v
            feats[prefix + "fusion.lang"] = r_l
        if self.last and feats is None:  # both gated updates of the last stage are never used
            return r_v, None, {**text, "l_out": r_l}
        x = x + self.res_gate(r_v) * r_v
        rt = r_l.transpose(1, 2)
        l = (text["l"] + (self.sym_res_gate(rt) * rt).transpose(1, 2)) * m.transpose(1, 2).to(r_l.dtype)
        if feats is not None:
            feats[prefix + "l_next"] = l
        return r_v, x, {**text, "l": l, "l_out": r_l}


# --------------------------------------------------------------------------------------------
# Decoder building blocks
# --------------------------------------------------------------------------------------------
class CrossAttention(nn.Module):
    """Multi-head cross-attention with separate q/k/v projections (key/value widths may differ from
    the query's), laid out as ``nn.MultiheadAttention(embed, heads, kdim, vdim)`` stores it:
    ``q_proj_weight (E, E)``, ``k_proj_weight (E, kdim)``, ``v_proj_weight (E, vdim)``,
    ``in_proj_bias (3E)``, ``out_proj``. Batch-first:
    ``(query (B, Lq, E), key (B, Lk, kdim), value (B, Lk, vdim), key_padding_mask (B, Lk) bool,
    True = ignore) -> (B, Lq, E)``. Attention dropout is not supported (0 in LGFormer).
    """

    def __init__(self, embed_dim: int, num_heads: int, kdim: int | None = None, vdim: int | None = None):
        super().__init__()
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim {embed_dim} not divisible by {num_heads} heads")
        self.embed_dim, self.num_heads = embed_dim, num_heads
        self.q_proj_weight = nn.Parameter(torch.empty(embed_dim, embed_dim))
        self.k_proj_weight = nn.Parameter(torch.empty(embed_dim, kdim or embed_dim))
        self.v_proj_weight = nn.Parameter(torch.empty(embed_dim, vdim or embed_dim))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * embed_dim))
        self.out_proj = nn.Linear(embed_dim, embed_dim)
        self.fused = True
        for w in (self.q_proj_weight, self.k_proj_weight, self.v_proj_weight):
            nn.init.xavier_uniform_(w)
        nn.init.zeros_(self.out_proj.bias)

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                key_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        b, lq, e = query.shape
        h = self.num_heads
        bq, bk, bv = self.in_proj_bias.chunk(3)
        q = F.linear(query, self.q_proj_weight, bq).view(b, lq, h, e // h).transpose(1, 2)
        k = F.linear(key, self.k_proj_weight, bk).view(b, -1, h, e // h).transpose(1, 2)
        v = F.linear(value, self.v_proj_weight, bv).view(b, -1, h, e // h).transpose(1, 2)
        if self.fused:
            mask = None if key_padding_mask is None else ~key_padding_mask[:, None, None, :]
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        else:  # nn.MultiheadAttention's op order: scale q, q k^T (+ -inf at padded keys), softmax, @ v
            attn = (q * (e // h) ** -0.5) @ k.transpose(-2, -1)
            if key_padding_mask is not None:
                attn = attn.masked_fill(key_padding_mask[:, None, None, :], float("-inf"))
            out = attn.softmax(-1) @ v
        return self.out_proj(out.transpose(1, 2).reshape(b, lq, e))


class CrossAttentionLayer(nn.Module):
    """Post-norm cross-attention + FFN (the original's ``TransformerDecoderLayer``):
    ``q = norm_ca(q + attn(q + query_pos, key + key_pos, key))``, ``q = norm_ffn(q + ffn(q))`` with
    ``ffn = Linear -> ReLU -> Dropout -> Linear``. Every weight matrix xavier-uniform."""

    def __init__(self, d_model: int, kdim: int, nhead: int = 8, dim_feedforward: int = 2048, dropout: float = 0.0):
        super().__init__()
        self.cross_attn = CrossAttention(d_model, nhead, kdim, kdim)
        self.ffn = nn.Sequential(nn.Linear(d_model, dim_feedforward), nn.ReLU(True), nn.Dropout(dropout),
                                 nn.Linear(dim_feedforward, d_model))
        self.norm_ca = nn.LayerNorm(d_model)
        self.norm_ffn = nn.LayerNorm(d_model)
        self.dropout_ca = nn.Dropout(dropout)
        self.dropout_ffn = nn.Dropout(dropout)
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)

    def forward(self, query: torch.Tensor, key: torch.Tensor, key_pos: torch.Tensor | None,
                query_pos: torch.Tensor | None, key_mask: torch.Tensor | None = None) -> torch.Tensor:
        q = query if query_pos is None else query + query_pos
        k = key if key_pos is None else key + key_pos
        query = self.norm_ca(query + self.dropout_ca(self.cross_attn(q, k, key, key_mask)))
        return self.norm_ffn(query + self.dropout_ffn(self.ffn(query)))


class DeformableEncoderLayer(nn.Module):
    """Post-norm multi-scale deformable self-attention + ReLU FFN (Deformable DETR encoder layer;
    ``self_attn``, ``norm1``, ``linear1``, ``linear2``, ``norm2``). ``src (B, S, C) -> (B, S, C)``."""

    def __init__(self, d_model: int = 256, d_ffn: int = 1024, dropout: float = 0.0, n_levels: int = 3,
                 n_heads: int = 8, n_points: int = 4):
        super().__init__()
        self.self_attn = MSDeformAttn(d_model, n_levels, n_heads, n_points)
        self.dropout1 = nn.Dropout(dropout)
        self.norm1 = nn.LayerNorm(d_model)
        self.linear1 = nn.Linear(d_model, d_ffn)
        self.dropout2 = nn.Dropout(dropout)
        self.linear2 = nn.Linear(d_ffn, d_model)
        self.dropout3 = nn.Dropout(dropout)
        self.norm2 = nn.LayerNorm(d_model)

    def forward(self, src: torch.Tensor, pos: torch.Tensor, reference_points: torch.Tensor,
                spatial_shapes: Sequence[tuple[int, int]]) -> torch.Tensor:
        src = self.norm1(src + self.dropout1(self.self_attn(src + pos, reference_points, src, spatial_shapes)))
        ffn = self.linear2(self.dropout2(F.relu(self.linear1(src))))
        return self.norm2(src + self.dropout3(ffn))


class DeformableTextEncoder(nn.Module):
    """``encoder``: k x [deformable self-attention layer (``layers.k``), then pixel->word
    cross-attention (``cross_attn_layers.k``; key = words + ``key_embed``, value = words,
    query position = the pixels' position encoding, padded words masked)]."""

    def __init__(self, num_layers: int, d_model: int, d_ffn: int, dropout: float, n_levels: int, n_heads: int,
                 n_points: int, text_dim: int, text_len: int, text_heads: int, text_ffn: int):
        super().__init__()
        self.layers = nn.ModuleList(DeformableEncoderLayer(d_model, d_ffn, dropout, n_levels, n_heads, n_points)
                                    for _ in range(num_layers))
        self.cross_attn_layers = nn.ModuleList(CrossAttentionLayer(d_model, text_dim, text_heads, text_ffn, 0.0)
                                               for _ in range(num_layers))
        self.key_embed = nn.Embedding(text_len, text_dim)

    def forward(self, src: torch.Tensor, pos: torch.Tensor, spatial_shapes: Sequence[tuple[int, int]],
                txt: torch.Tensor, txt_mask: torch.Tensor, feats: dict | None = None, prefix: str = "") -> torch.Tensor:
        if txt.shape[1] != self.key_embed.num_embeddings:
            raise ValueError(f"LGFormer's key_embed holds {self.key_embed.num_embeddings} token positions; "
                             f"got {txt.shape[1]} tokens (the token count is fixed by the model config)")
        ref = level_reference_points(spatial_shapes, src.device, src.dtype)  # (1, S, 2)
        ref = ref[:, :, None].expand(src.shape[0], -1, len(spatial_shapes), -1)  # same point on every level
        key_pos = self.key_embed.weight[None].expand(txt.shape[0], -1, -1)  # (B, N, C), one per sample
        key_mask = ~txt_mask.squeeze(-1).bool()
        out = src
        for k, (layer, cross) in enumerate(zip(self.layers, self.cross_attn_layers)):
            out = layer(out, pos, ref, spatial_shapes)
            if feats is not None:
                feats[f"{prefix}layers.{k}"] = out
            out = cross(out, txt, key_pos, pos, key_mask)
            if feats is not None:
                feats[f"{prefix}cross_attn_layers.{k}"] = out
        return out


class DeformableTransformer(nn.Module):
    """``transformer``: the encoder plus the learned ``level_embed`` (L, C) added to each level's
    position encoding. Init as the reference: xavier on every matrix (text layers and key_embed
    included), then the deformable attention's own init, then N(0, 1) level embeddings."""

    def __init__(self, d_model: int, n_levels: int, **encoder: Any):
        super().__init__()
        self.encoder = DeformableTextEncoder(d_model=d_model, n_levels=n_levels, **encoder)
        self.level_embed = nn.Parameter(torch.empty(n_levels, d_model))
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)
        for m in self.modules():
            if isinstance(m, MSDeformAttn):
                m._reset_parameters()
        nn.init.normal_(self.level_embed)

    def forward(self, srcs: Sequence[torch.Tensor], pos_embeds: Sequence[torch.Tensor], txt: torch.Tensor,
                txt_mask: torch.Tensor, feats: dict | None = None, prefix: str = ""):
        src, shapes, starts = flatten_levels(srcs)
        pos = torch.cat([p.flatten(2).transpose(1, 2) + self.level_embed[lvl].view(1, 1, -1)
                         for lvl, p in enumerate(pos_embeds)], 1)
        memory = self.encoder(src, pos, shapes, txt, txt_mask, feats, prefix + "encoder.")
        return memory, shapes, starts


def _conv_gn(cin: int, cout: int, k: int, bias: bool, relu: bool = False) -> nn.Sequential:
    """Conv2d + GroupNorm(32) (+ ReLU), Kaiming-uniform (a = 1) weights, as the FPN convs."""
    conv = nn.Conv2d(cin, cout, k, padding=k // 2, bias=bias)
    nn.init.kaiming_uniform_(conv.weight, a=1)
    if bias:
        nn.init.zeros_(conv.bias)
    layers: list[nn.Module] = [conv, nn.GroupNorm(32, cout)]
    if relu:
        layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


class PixelDecoder(nn.Module):
    """Mask2Former's multi-scale deformable pixel decoder with pixel->word cross-attention
    (``pix_dec``), always run in float32 (autocast off).

    ``forward([s1, s2, s3, s4] (B, C_i, H_i, W_i), words (B, N, C_l), mask (B, N, 1), feats)
    -> (mask_features (B, mask_dim, H_1, W_1), [1/32, 1/16, 1/8 maps (B, conv_dim, H, W)])``.
    Levels enter the transformer low to high resolution (s4, s3, s2); one FPN step adds s1.
    """

    def __init__(self, in_channels: Sequence[int], *, conv_dim: int = 256, mask_dim: int = 256, enc_layers: int = 6,
                 dim_feedforward: int = 1024, nheads: int = 8, n_points: int = 4, dropout: float = 0.0,
                 text_dim: int = 768, text_len: int = 20, text_heads: int = 8, text_ffn: int = 2048):
        super().__init__()
        trans_in = list(in_channels[1:])  # s2, s3, s4
        self.input_proj = nn.ModuleList()
        for c in trans_in[::-1]:
            proj = nn.Sequential(nn.Conv2d(c, conv_dim, 1), nn.GroupNorm(32, conv_dim))
            nn.init.xavier_uniform_(proj[0].weight, gain=1)
            nn.init.zeros_(proj[0].bias)
            self.input_proj.append(proj)
        self.transformer = DeformableTransformer(
            conv_dim, len(trans_in), num_layers=enc_layers, d_ffn=dim_feedforward, dropout=dropout, n_heads=nheads,
            n_points=n_points, text_dim=text_dim, text_len=text_len, text_heads=text_heads, text_ffn=text_ffn)
        self.pos_feats = conv_dim // 2
        self.mask_features = nn.Conv2d(conv_dim, mask_dim, 1)
        nn.init.kaiming_uniform_(self.mask_features.weight, a=1)
        nn.init.zeros_(self.mask_features.bias)
        # One FPN level: log2(8) - log2(4) (transformer's finest stride vs the common stride 4).
        self.adapter_1 = _conv_gn(in_channels[0], conv_dim, 1, bias=False)
        self.layer_1 = _conv_gn(conv_dim, conv_dim, 3, bias=False, relu=True)

    def forward(self, features: Sequence[torch.Tensor], txt: torch.Tensor, txt_mask: torch.Tensor,
                feats: dict | None = None, prefix: str = "classifier.pix_dec."):
        with torch.autocast(device_type=txt.device.type, enabled=False):
            maps = [f.float() for f in features]
            txt = txt.float()
            srcs, pos = [], []
            for proj, x in zip(self.input_proj, maps[:0:-1]):  # s4, s3, s2
                srcs.append(proj(x))
                pos.append(sine_position_encoding(x, self.pos_feats))
            memory, shapes, _ = self.transformer(srcs, pos, txt, txt_mask, feats, prefix + "transformer.")
            b = memory.shape[0]
            levels = memory.split([h * w for h, w in shapes], 1)
            outs = [z.transpose(1, 2).reshape(b, -1, h, w) for z, (h, w) in zip(levels, shapes)]
            lateral = self.adapter_1(maps[0])
            y = lateral + F.interpolate(outs[-1], size=lateral.shape[-2:], mode="bilinear", align_corners=False)
            mask_features = self.mask_features(self.layer_1(y))
        if feats is not None:
            feats[prefix + "mask_features"] = mask_features
            feats[prefix + "multi_scale_features"] = outs
        return mask_features, outs


class QueryDecoder(nn.Module):
    """The linguistic-query decoder (``dynamic_conv_gen_body``): ``num_layers`` post-norm
    cross-attention layers without self-attention; layer k attends to level k mod 3 (1/32, 1/16,
    1/8) with key = level + ``level_embed`` + sine position, value = level + ``level_embed``,
    query position = ``query_embed``. ``(q0 (B, Q, D), [maps]) -> [q0, q1, ..., q_K]``."""

    def __init__(self, num_layers: int = 6, d_model: int = 768, mask_dim: int = 256, nhead: int = 8,
                 dim_ffn: int = 2048, dropout: float = 0.0, num_queries: int = 1, num_levels: int = 3):
        super().__init__()
        self.layers = nn.ModuleList(CrossAttentionLayer(d_model, mask_dim, nhead, dim_ffn, dropout)
                                    for _ in range(num_layers))
        self.pos_feats = mask_dim // 2
        self.query_embed = nn.Embedding(num_queries, d_model)
        self.level_embed = nn.Embedding(num_levels, mask_dim)

    def forward(self, query: torch.Tensor, maps: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        b = query.shape[0]
        pos = [sine_position_encoding(x, self.pos_feats).flatten(2).transpose(1, 2).to(x.dtype) for x in maps]
        query_pos = self.query_embed.weight[None].expand(b, -1, -1)
        outs = [query]
        for i, layer in enumerate(self.layers):
            idx = i % len(maps)
            vis = maps[idx].flatten(2).transpose(1, 2) + self.level_embed.weight[idx][None, None, :]
            query = layer(query, vis, pos[idx], query_pos)
            outs.append(query)
        return outs


class LGFormerDecoder(nn.Module):
    """``classifier``: pixel decoder, sentence query (``txt_proj``), query decoder and the kernel
    MLP (``dynamic_conv_gen_head``: D -> D -> D -> mask_dim + 1 with ReLUs). Returns the masks at
    1/4 resolution, one per query: ``mask_k = sum_c F[:, c] w_k[c] + b_k`` (B, Q, H/4, W/4)."""

    def __init__(self, in_channels: Sequence[int], *, text_dim: int, text_len: int, pixel: Mapping[str, Any],
                 query: Mapping[str, Any], kernel_size: int = 1):
        super().__init__()
        if kernel_size != 1:
            raise ValueError(f"only 1x1 dynamic kernels are implemented (as the reference uses), got {kernel_size}")
        mask_dim = int(pixel.get("mask_dim", 256))
        self.pix_dec = PixelDecoder(in_channels, text_dim=text_dim, text_len=text_len, **pixel)
        self.txt_proj = nn.Linear(text_dim, text_dim)
        self.dynamic_conv_gen_body = QueryDecoder(d_model=text_dim, mask_dim=mask_dim, **query)
        self.dynamic_conv_gen_head = nn.Sequential(nn.Linear(text_dim, text_dim), nn.ReLU(True),
                                                   nn.Linear(text_dim, text_dim), nn.ReLU(True),
                                                   nn.Linear(text_dim, mask_dim * kernel_size ** 2 + 1))

    def forward(self, maps: Sequence[torch.Tensor], words: torch.Tensor, l_mask: torch.Tensor,
                feats: dict | None = None) -> list[torch.Tensor]:
        """``maps``: the 4 stage maps; ``words (B, C_l, N)``; ``l_mask (B, N, 1)``."""
        words = words.transpose(1, 2)  # (B, N, C_l)
        mask_features, ms = self.pix_dec(maps, words, l_mask, feats)
        m = l_mask.to(words.dtype).expand_as(words)
        sentence = (words * m).sum(1, keepdim=True) / torch.clamp(m.sum(1, keepdim=True), min=1e-6)
        q0 = self.txt_proj(sentence)  # (B, 1, C_l): the linguistic query
        queries = self.dynamic_conv_gen_body(q0, ms)
        outs = []
        for q in queries:
            kernel = self.dynamic_conv_gen_head(q)  # (B, Q, mask_dim + 1)
            w, bias = kernel[..., :-1], kernel[..., -1]
            outs.append(torch.einsum("bchw,bqc->bqhw", mask_features.to(w.dtype), w) + bias[..., None, None])
        if feats is not None:
            feats["classifier.txt_proj"] = q0
            feats["classifier.dynamic_conv_gen_body.queries"] = queries
            feats["classifier.output"] = outs
        return outs


# --------------------------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------------------------
class LGFormer(nn.Module):
    """LGFormer with BERT inside (``text_encoder``), the VLBA Swin (``backbone``) and the decoder
    (``classifier``).

    ``forward(image (B, 3, H, W), text (B, N) ids, l_mask (B, N) 0/1, return_features=False)
    -> [mask_0, ..., mask_K]`` logits (B, 1, H, W) each (bilinear, align_corners=False), plus a
    dict of named intermediate tensors with ``return_features``. ``N`` must equal
    ``config['text_len']`` (the learned key position embedding has that many rows).
    """

    def __init__(self, config: Mapping[str, Any]):
        super().__init__()
        self.config = dict(config)
        l_in = int(config["l_in"])
        f = config["fusion"]
        stage_kwargs = [dict(num_heads_fusion=h, fusion_drop=f.get("dropout", 0.0), l_in=l_in) for h in f["num_heads"]]
        self.backbone = MultiModalSwin(LGFormerStage, stage_kwargs, **swin_kwargs(config))
        self.backbone.init_weights()  # overwrites the gates' zero init too, as in the reference
        e = config["swin"]["embed_dim"]
        self.classifier = LGFormerDecoder([e * 2 ** i for i in range(4)], text_dim=l_in, text_len=int(config["text_len"]),
                                          pixel=config["pixel_decoder"], query=config["query_decoder"],
                                          kernel_size=int(config.get("kernel_size", 1)))
        self.text_encoder = build_text_encoder(config["bert"])
        self.set_fast_paths(config.get("fused_attn", True))

    def forward(self, image: torch.Tensor, text: torch.Tensor, l_mask: torch.Tensor, return_features: bool = False):
        feats: dict[str, Any] | None = {} if return_features else None
        h = self.text_encoder(text, attention_mask=l_mask)[0]  # (B, N, C_l)
        if feats is not None:
            feats["text_encoder.last_hidden_state"] = h
        lang = {"l": h.transpose(1, 2), "l_mask": l_mask.unsqueeze(-1)}
        maps, lang = self.backbone.forward_with_text(image, lang, feats)
        if feats is not None:
            feats["backbone.output"] = maps
            feats["backbone.l_out"] = lang["l_out"]
        masks = self.classifier(maps, lang["l_out"], lang["l_mask"], feats)
        masks = [F.interpolate(m, size=image.shape[-2:], mode="bilinear", align_corners=False) for m in masks]
        return (masks, feats) if return_features else masks

    # -- the model contract --------------------------------------------------------------------
    def loss(self, outputs: Sequence[torch.Tensor], batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The reference loss: for every mask k, mean BCE-with-logits (pos_weight 1.1) against the
        (B, H, W) ``batch['target']``, all weights 1 -> ``{'bce_0': ..., 'bce_K': ...}``."""
        target = batch["target"]
        out: dict[str, torch.Tensor] = {}
        with torch.autocast(device_type=target.device.type, enabled=False):
            t = target[:, None].float()
            pw = torch.tensor([POS_WEIGHT], device=target.device)
            for k, m in enumerate(outputs):
                m = m.float()
                if m.shape[-2:] != t.shape[-2:]:
                    m = F.interpolate(m, size=t.shape[-2:], mode="bilinear", align_corners=False)
                out[f"bce_{k}"] = F.binary_cross_entropy_with_logits(m, t, pos_weight=pw)
        return out

    def predict_scores(self, outputs: Sequence[torch.Tensor], size: Sequence[int]) -> torch.Tensor:
        """Foreground probability of the last mask at ``size``: sigmoid after bilinear resizing
        (align_corners=False) -> (B, H, W)."""
        logits = outputs[-1].float()
        if tuple(logits.shape[-2:]) != tuple(size):
            logits = F.interpolate(logits, size=tuple(size), mode="bilinear", align_corners=False)
        return logits[:, 0].sigmoid()

    def predict_mask(self, outputs: Sequence[torch.Tensor], size: Sequence[int]) -> torch.Tensor:
        """The reference rule: sigmoid(last mask) > 0.5 -> (B, H, W) bool."""
        return self.predict_scores(outputs, size) > 0.5

    def dead_parameter_names(self) -> list[str]:
        """Parameters that never receive a gradient: the last stage's two gates."""
        i = len(self.backbone.layers) - 1
        layer = self.backbone.layers[i]
        return [f"backbone.layers.{i}.{mod}.{n}" for mod in layer.dead_in_last_stage
                for n, _ in layer.get_submodule(mod).named_parameters()]

    def not_optimized_parameter_names(self) -> list[str]:
        """Parameters the reference leaves out of its optimiser: the BERT embeddings."""
        return [f"text_encoder.embeddings.{n}" for n, _ in self.text_encoder.embeddings.named_parameters()]

    def unused_parameter_names(self) -> list[str]:
        """Everything the reference never updates (`dead_parameter_names` +
        `not_optimized_parameter_names`); freezing them changes no optimiser result."""
        return self.dead_parameter_names() + self.not_optimized_parameter_names()

    def parameter_groups(self, weight_decay: float) -> list[dict[str, Any]]:
        """The reference's AdamW groups, trainable parameters only: backbone names containing norm /
        absolute_pos_embed / relative_position_bias_table (no decay), the rest of the backbone,
        the decoder, and every BERT encoder layer (embeddings excluded)."""
        skip = set(self.unused_parameter_names())
        no_decay, backbone = backbone_decay_split(self.backbone, skip)
        groups = [
            {"params": no_decay, "weight_decay": 0.0},
            {"params": backbone, "weight_decay": weight_decay},
            {"params": [p for p in self.classifier.parameters() if p.requires_grad], "weight_decay": weight_decay},
            {"params": [p for p in self.text_encoder.encoder.parameters() if p.requires_grad],
             "weight_decay": weight_decay},
        ]
        return [g for g in groups if g["params"]]

    def set_grad_ckpt(self, flag: bool) -> None:
        self.backbone.set_grad_ckpt(flag)

    def set_fast_paths(self, flag: bool) -> None:
        """Every fast path on (SDPA window / cross attention, GEMM 1x1 projections in VLBA) or the
        reference op order (``False``)."""
        for m in self.modules():
            if hasattr(m, "fused"):
                m.fused = bool(flag)



# --------------------------------------------------------------------------------------------
# Config and spec
# --------------------------------------------------------------------------------------------
PIXEL_DECODER_DEFAULTS: dict[str, Any] = {
    "conv_dim": 256, "mask_dim": 256, "enc_layers": 6, "dim_feedforward": 1024, "nheads": 8, "n_points": 4,
    "dropout": 0.0, "text_heads": 8, "text_ffn": 2048,
}
QUERY_DECODER_DEFAULTS: dict[str, Any] = {"num_layers": 6, "dim_ffn": 2048, "nhead": 8, "dropout": 0.0, "num_queries": 1}
TEXT_LEN = 20


def _parse_heads(mha: Any) -> list[int]:
    if isinstance(mha, (list, tuple)):
        heads = [int(h) for h in mha]
    elif not mha:
        heads = [1, 1, 1, 1]
    else:
        try:
            heads = [int(h) for h in str(mha).split("-")]
        except ValueError:
            raise ValueError(f"--mha must look like '1-1-1-1', got {mha!r}") from None
    if len(heads) != 4 or min(heads) < 1:
        raise ValueError(f"--mha needs 4 positive head counts, got {mha!r}")
    return heads


def _configure(cfg: dict[str, Any], options: Mapping[str, Any]) -> None:
    """LGFormer's entries on top of the LAVT-family config: the token count (``text_len``, the rows
    of the learned key embedding), the pixel / query decoder sizes, the 1x1 dynamic kernel."""
    pix = {**PIXEL_DECODER_DEFAULTS, **dict(options.get("pixel_decoder") or {})}
    qry = {**QUERY_DECODER_DEFAULTS, **dict(options.get("query_decoder") or {})}
    for key in set(pix) - set(PIXEL_DECODER_DEFAULTS):
        raise ValueError(f"unknown pixel decoder option {key!r}; valid: {', '.join(PIXEL_DECODER_DEFAULTS)}")
    for key in set(qry) - set(QUERY_DECODER_DEFAULTS):
        raise ValueError(f"unknown query decoder option {key!r}; valid: {', '.join(QUERY_DECODER_DEFAULTS)}")
    if options.get("drop_path_rate") is not None:
        cfg["swin"]["drop_path_rate"] = float(options["drop_path_rate"])
    for unused in ("decoder", "batched_text"):  # the family's SimpleDecoding / FIANet entries
        cfg.pop(unused, None)
    cfg.update(text_len=int(options.get("max_tokens") or TEXT_LEN), pixel_decoder=pix, query_decoder=qry, kernel_size=1)


_build = family_builder(_configure, extras=("max_tokens", "pixel_decoder", "query_decoder", "drop_path_rate"))


def build_config(name: str = "lgformer", **options: Any) -> dict[str, Any]:
    """The full LGFormer config with the reference builder's defaults (Swin-B, window 12 when the
    pretrained file name says ``window12``, else 7; drop-path 0.3; 6/6 decoder layers; 20 tokens);
    options as `lib.lavt.family_config` plus ``max_tokens``, ``pixel_decoder``, ``query_decoder``."""
    return _build(name, **options)


def config_from_fixture(fx: Mapping[str, Any]) -> dict[str, Any]:
    """Our config from an LGFormer reference fixture's ``config`` (swin, vlba, pixel_decoder,
    query_decoder, bert, max_tokens, img_size)."""
    fs = fx["swin"]
    if fs.get("ape"):
        raise ValueError("fixture uses an absolute position embedding (ape=True), which LGFormer never does")
    overrides = {k: fs[k] for k in ("embed_dim", "depths", "num_heads", *SWIN_DEFAULTS) if k in fs}
    vlba = fx.get("vlba", {})
    pd, qd = fx.get("pixel_decoder", {}), fx.get("query_decoder", {})
    deform, text_ca = pd.get("deform_attn", {}), pd.get("text_cross_attn", {})
    pix = {"conv_dim": pd.get("conv_dim", 256), "mask_dim": pd.get("mask_dim", 256),
           "enc_layers": pd.get("transformer_enc_layers", 6), "dim_feedforward": pd.get("transformer_dim_feedforward", 1024),
           "nheads": pd.get("transformer_nheads", deform.get("n_heads", 8)), "n_points": deform.get("n_points", 4),
           "dropout": pd.get("transformer_dropout", 0.0), "text_heads": text_ca.get("nhead", 8),
           "text_ffn": text_ca.get("dim_feedforward", 2048)}
    if int(deform.get("n_levels", 3)) != 3:
        raise ValueError(f"fixture deformable attention has {deform['n_levels']} levels; LGFormer uses 3")
    qry = {"num_layers": qd.get("num_layers", 6), "dim_ffn": qd.get("dim_ffn", 2048), "nhead": qd.get("nhead", 8),
           "dropout": qd.get("dropout", 0.0), "num_queries": qd.get("num_queries", 1)}
    text_len = int(pd.get("key_embed", [fx.get("max_tokens", TEXT_LEN)])[0])
    size = fx.get("img_size", 480)
    cfg = build_config("lgformer", window_size=int(fs["window_size"]), mha=vlba.get("num_heads_fusion", ""),
                       fusion_drop=float(vlba.get("fusion_drop", 0.0)), bert=dict(fx["bert"]), swin_overrides=overrides,
                       img_size=size, max_tokens=text_len, pixel_decoder=pix, query_decoder=qry)
    l_in = vlba.get("l_in_channels")
    if l_in is not None and int(l_in) != cfg["l_in"]:
        raise ValueError(f"fixture VLBA l_in_channels {l_in} != BERT hidden size {cfg['l_in']}")
    return cfg


SPEC = ModelSpec(
    target="lib.lgformer:LGFormer",
    build_config=build_config,
    # Reference recipe (train scripts): AdamW lr 5e-5, wd 1e-2, 16 per GPU x 2 GPUs, 40 epochs,
    # 480 px, exactly 20 tokens; per-iteration poly schedule; BERT dropout 0.1, drop-path 0.3.
    recipes={"*": Recipe(lr=5e-5, epochs=40, batch_size=16, max_tokens=TEXT_LEN, weight_decay=1e-2, gpus=2)},
    config_from_fixture=config_from_fixture,
    sync_bn=False,  # no BatchNorm anywhere (the reference's SyncBatchNorm conversion is a no-op)
    val_protocol="all",
    inputs=("image", "text", "l_mask"),
    text=TextSide(tokenizer="bert", context_length=TEXT_LEN),  # the key embedding fixes exactly 20 tokens
    pretrained_missing=(
        r"backbone\.layers\.\d+\.(fusion|res_gate|sym_res_gate)\.",
        r"backbone\.norm\d+\.",
        r"classifier\.",
    ),
    # Seconds on a CPU: Swin 16 / 2-2-2-2, the tiny BERT, 32-wide decoders, 4 query layers (wrapping the 3 scales).
    tiny={**TINY_OPTIONS, "pixel_decoder": {"conv_dim": 32, "mask_dim": 32, "enc_layers": 1, "dim_feedforward": 64,
                                            "nheads": 4, "text_heads": 4, "text_ffn": 64},
          "query_decoder": {"num_layers": 4, "dim_ffn": 64, "nhead": 4}},
)
