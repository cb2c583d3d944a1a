"""CrossVLT: cross-aware early fusion with stage-divided vision and language encoders
(Cho, Yu, Kang, IEEE TMM 2023). LAVT with a language encoder cut into four stages that alternate
with the four Swin stages:

    ids --L1 (BERT embeddings + n1 BERT layers)--------------------------> w1 ----------+
    image --patch embed--> V1(w1) --x_down1--> L2(V->L over x_down1) ----> w2           |
                           V2(w2) --x_down2--> L3(V->L over x_down2) ----> w3           |
                           V3(w3) --x_down3--> L4(V->L over x_down3) ----> w4           |
                           V4(w4)                                                       |
    [norm_i(attn1_i)] --SimpleDecoding--> upsample --> logits (B, 2, H, W)              |
                                                                                        |
    training: S_i = cos(proj_i(Swin_i tokens), proj(L_i [CLS])) / temp_i  (i = 1..4) <--+
              alignment loss = sum_i BCE(upsample(S_i -> target size), target)

The vision side is the shared multi-modal Swin (`lib.swin.MultiModalSwin`) with `CrossAwareLayer`
stages (the reference's ``MMLayer``, state_dict ``backbone.{i}.layers``): Swin blocks -> X;
`fuse`: P = ``proj``(X) (alignment only), R = ``attn1``(X, w_i), X <- X + ``linear1``(R) * R, decoder
map = ``norm{i}``(R); stages 0-2 then PatchMerging -> X_down and `after_merge`: R2 =
``attn2``(X_down, w_i), X_down <- X_down + ``linear2``(R2) * R2, which is the next vision stage's
input AND the keys/values of the next language stage L_{i+2}, run there to give w_{i+1}.
`CrossVLTBackbone` only regroups the modules into the reference's tree (``backbone.{i}``).

API (the choice asked for by the common model contract):

* ``model(image, text, l_mask) -> logits (B, 2, H, W)`` in every mode;
* ``model(image, text, l_mask, target=mask) -> (logits, alignment_loss)``: with the ground truth
  (B, H, W) the forward also computes the four similarity maps and returns the weighted alignment
  loss (a scalar, float32). Whether the maps are computed depends on ``target``, never on
  ``nn.Module.training`` (the reference's forward returns a different number of outputs in
  training and eval mode).
  The total training loss of the reference is ``2 * weighted_CE(logits, target) + alignment_loss``
  (`CrossVLT.loss`: terms ``ce`` and ``align``).
* ``return_features=True`` appends a dict of named intermediate tensors (named by the reference's
  module paths, e.g. ``backbone.1.layers.attn1``, ``lang_stage2.sequence_output``).

The temperature ``temp`` (4,) is a non-persistent buffer of ones by default: the reference creates
it as a parameter but never optimises it (it is in no optimiser group), and its test-time model
(and the state_dict of its ``test.py``) has no ``temp``. With ``alignment.learnable_temperature``
it is an ``nn.Parameter`` (then ``temp`` is a state_dict key, as in the reference's training files).

Language stages are built from `transformers` BERT pieces (``BertEmbeddings``, ``BertLayer``,
``BertSelfOutput``, ``BertIntermediate``, ``BertOutput``) with eager attention and the vendored
numerics of `bert.text_encoder` (embedding sum order, -10000 mask). The V->L attention is our own
module because its key/value inputs are 256/512/1024 wide, not 768.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from transformers import BertConfig
from transformers.models.bert.modeling_bert import (
    BertEmbeddings,
    BertIntermediate,
    BertLayer,
    BertOutput,
    BertSelfOutput,
)

from bert.text_encoder import MASK_VALUE, bert_config_dict
from lib.decoder import SimpleDecoding
from lib.lavt import TINY_OPTIONS, family_builder, swin_kwargs
from lib.layers import backbone_decay_split, init_backbone_weights, tanh_gate
from lib.losses import weighted_cross_entropy
from lib.spec import ModelSpec, Recipe, SegmentationModel
from lib.swin import SWIN_DEFAULTS, MultiModalStage, MultiModalSwin

# The reference's training loss: L = 2 * CE_w + sum_i 1 * BCE_i.
SEGMENTATION_LOSS_WEIGHT = 2.0
ALIGNMENT_LOSS_WEIGHTS = (1.0, 1.0, 1.0, 1.0)
ALIGN_DIM = 256  # width of the alignment projections (vision `proj`, language `proj`)
FUSION_HEAD_DIM = 64  # FusionLayer uses dim // 64 heads
WORD_MASK_SCALE = 1e4  # FusionLayer adds (1e4 * mask - 1e4) to the logits


class CrossVLTConfigError(ValueError):
    """A CrossVLT config that cannot be built."""


# ============================================================================================
# Language side
# ============================================================================================
def _hf_bert_config(cfg: Mapping[str, Any]) -> BertConfig:
    """A transformers BertConfig (eager attention: a plain additive mask on every version)."""
    config = BertConfig(**bert_config_dict(dict(cfg)))
    config._attn_implementation = "eager"
    return config


def _run_bert_layer(layer: BertLayer, h: torch.Tensor, ext_mask: torch.Tensor) -> torch.Tensor:
    out = layer(h, attention_mask=ext_mask)
    return out[0] if isinstance(out, (tuple, list)) else out  # transformers 4.x returns a tuple


@torch.no_grad()
def _init_bert_style(module: nn.Module, std: float, skip: Sequence[nn.Module] = ()) -> None:
    """BERT init: Linear / Embedding normal(0, std), biases 0, LayerNorm 1 / 0."""
    skipped = {id(m) for s in skip for m in s.modules()}
    for m in module.modules():
        if id(m) in skipped:
            continue
        if isinstance(m, (nn.Linear, nn.Embedding)):
            m.weight.normal_(0.0, std)
            if isinstance(m, nn.Embedding) and m.padding_idx is not None:
                m.weight[m.padding_idx].zero_()
        if isinstance(m, nn.Linear) and m.bias is not None:
            m.bias.zero_()
        elif isinstance(m, nn.LayerNorm):
            m.weight.fill_(1.0)
            m.bias.zero_()


class BertLayerStack(nn.Module):
    """``layer``: BERT layers run with the extended text mask; ``proj``: Linear(hidden -> 256) on
    the [CLS] position (alignment loss only). State_dict ``lang_stage1.encoder.*``."""

    def __init__(self, config: BertConfig, num_layers: int):
        super().__init__()
        self.layer = nn.ModuleList(BertLayer(config) for _ in range(num_layers))
        self.proj = nn.Linear(config.hidden_size, ALIGN_DIM)

    def forward(self, h: torch.Tensor, ext_mask: torch.Tensor) -> torch.Tensor:
        for layer in self.layer:
            h = _run_bert_layer(layer, h, ext_mask)
        return h


class LanguageStage1(nn.Module):
    """L1 (``lang_stage1``): BERT embeddings + the first BERT layers.

    ``forward(ids (B, N), l_mask (B, N)) -> (words (B, N, hidden), ext_mask (B, 1, 1, N))``;
    ``ext_mask`` = (1 - mask) * -10000 is reused by the self-attention of L2-L4.
    """

    def __init__(self, config: BertConfig, num_layers: int):
        super().__init__()
        self.embeddings = BertEmbeddings(config)
        self.encoder = BertLayerStack(config, num_layers)

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """Vendored BERT order ``(word + position) + token_type`` (transformers adds token types first)."""
        emb = self.embeddings
        positions = torch.arange(ids.shape[1], device=ids.device)
        x = emb.word_embeddings(ids) + emb.position_embeddings(positions)[None]
        x = x + emb.token_type_embeddings(torch.zeros_like(ids))
        return emb.dropout(emb.LayerNorm(x))

    def forward(self, ids: torch.Tensor, l_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        dtype = self.embeddings.word_embeddings.weight.dtype
        ext_mask = (1.0 - l_mask[:, None, None, :].to(dtype)) * MASK_VALUE
        return self.encoder(self.embed(ids), ext_mask), ext_mask

    def cls_embedding(self, words: torch.Tensor) -> torch.Tensor:
        return self.encoder.proj(words[:, 0])


class VisionToLanguageCrossAttention(nn.Module):
    """Multi-head attention of the words (queries, ``hidden`` wide) over visual tokens
    (keys/values, ``vision_dim`` wide); keys ``self.{query,key,value}``. No visual mask: the
    reference's all-ones encoder mask adds exactly 0."""

    def __init__(self, config: BertConfig, vision_dim: int):
        super().__init__()
        if config.hidden_size % config.num_attention_heads:
            raise CrossVLTConfigError(f"BERT hidden size {config.hidden_size} is not a multiple of "
                                      f"{config.num_attention_heads} heads")
        self.num_heads = config.num_attention_heads
        self.head_dim = config.hidden_size // self.num_heads
        self.query = nn.Linear(config.hidden_size, config.hidden_size)
        self.key = nn.Linear(vision_dim, config.hidden_size)
        self.value = nn.Linear(vision_dim, config.hidden_size)
        self.dropout = nn.Dropout(config.attention_probs_dropout_prob)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        return x.view(b, n, self.num_heads, self.head_dim).transpose(1, 2)  # (B, h, n, d)

    def forward(self, words: torch.Tensor, vision: torch.Tensor) -> torch.Tensor:
        q, k, v = self._heads(self.query(words)), self._heads(self.key(vision)), self._heads(self.value(vision))
        scores = torch.matmul(q, k.transpose(-1, -2)) / self.head_dim ** 0.5  # (B, h, N, M)
        ctx = torch.matmul(self.dropout(scores.softmax(dim=-1)), v)  # (B, h, N, d)
        return ctx.transpose(1, 2).reshape(words.shape)


class VisionToLanguageAttention(nn.Module):
    """``crossattention``: V->L attention, then ``output`` = dense + dropout + residual + LayerNorm."""

    def __init__(self, config: BertConfig, vision_dim: int):
        super().__init__()
        self.self = VisionToLanguageCrossAttention(config, vision_dim)
        self.output = BertSelfOutput(config)

    def forward(self, words: torch.Tensor, vision: torch.Tensor) -> torch.Tensor:
        return self.output(self.self(words, vision), words)


class LanguageStage(nn.Module):
    """L2-L4 (``lang_stage{2,3,4}``): V->L cross-attention block (post-LN attention + BERT FFN,
    no self-attention before it), then ``layer`` = ordinary BERT layers with the text mask, and
    ``proj`` on [CLS] for the alignment loss.

    ``forward(words (B, N, hidden), ext_mask (B, 1, 1, N), vision (B, M, vision_dim)) -> words``.
    """

    def __init__(self, config: BertConfig, num_layers: int, vision_dim: int):
        super().__init__()
        self.crossattention = VisionToLanguageAttention(config, vision_dim)
        self.intermediate = BertIntermediate(config)
        self.output = BertOutput(config)
        self.layer = nn.ModuleList(BertLayer(config) for _ in range(num_layers))
        self.proj = nn.Linear(config.hidden_size, ALIGN_DIM)
        _init_bert_style(self, config.initializer_range)  # the reference trains L2-L4 from scratch

    def forward(self, words: torch.Tensor, ext_mask: torch.Tensor, vision: torch.Tensor) -> torch.Tensor:
        a = self.crossattention(words, vision)
        h = self.output(self.intermediate(a), a)
        for layer in self.layer:
            h = _run_bert_layer(layer, h, ext_mask)
        return h

    def cls_embedding(self, words: torch.Tensor) -> torch.Tensor:
        return self.proj(words[:, 0])


# ============================================================================================
# Vision side
# ============================================================================================
class FusionLayer(nn.Module):
    """L->V multi-head cross-attention of CrossVLT, pixels attend to words.

    ``(x (B, L, v_dim), words (B, N, l_dim), l_mask (B, N)) -> (B, L, v_dim)``:
    q = InstanceNorm(Conv1x1(x)) (B, d, L), channel c in head c // head_dim; k = ``l_q``(words),
    v = ``values_l``(words) (not masked); logits q.k / sqrt(head_dim) + (1e4 m - 1e4); softmax over
    words; out = GELU(Conv1x1(InstanceNorm(Conv1x1(heads)) + x)). InstanceNorms have no parameters.
    """

    def __init__(self, v_dim: int, l_dim: int, dim: int):
        super().__init__()
        # The reference uses dim // 64 heads (it needs dim >= 64); narrower test models get one head.
        self.num_heads = max(1, dim // FUSION_HEAD_DIM)
        self.head_dim = dim // self.num_heads
        if self.num_heads * self.head_dim != dim:
            raise CrossVLTConfigError(f"fusion width {dim} is not divisible into {self.num_heads} heads of "
                                      f"{FUSION_HEAD_DIM} (dim // {FUSION_HEAD_DIM}); choose another embed_dim")
        self.dim = dim
        self.v_q = nn.Sequential(nn.Conv1d(v_dim, dim, 1), nn.InstanceNorm1d(dim))
        self.l_q = nn.Linear(l_dim, dim)
        self.values_l = nn.Linear(l_dim, dim)
        # The reference declares this InstanceNorm with `dim` features; without affine/stats the
        # count is unused, so it is declared with the real channel count (no warning, same numbers).
        self.w_v = nn.Sequential(nn.Conv1d(dim, v_dim, 1), nn.InstanceNorm1d(v_dim))
        self.project_mm = nn.Sequential(nn.Conv1d(v_dim, v_dim, 1), nn.GELU())

    def forward(self, x: torch.Tensor, words: torch.Tensor, l_mask: torch.Tensor) -> torch.Tensor:
        b, L, _ = x.shape
        h, d = self.num_heads, self.head_dim
        v = x.transpose(1, 2)  # (B, v_dim, L)
        q = self.v_q(v).reshape(b, h, d, L).transpose(2, 3)  # (B, h, L, d)
        k = self.l_q(words).view(b, -1, h, d).transpose(1, 2)  # (B, h, N, d)
        val = self.values_l(words).view(b, -1, h, d).transpose(1, 2)
        logits = torch.matmul(q, k.transpose(-1, -2)) / d ** 0.5  # (B, h, L, N)
        m = l_mask[:, None, None, :].to(logits.dtype)
        logits = logits + (WORD_MASK_SCALE * m - WORD_MASK_SCALE)
        out = torch.matmul(logits.softmax(dim=-1), val)  # (B, h, L, d)
        out = out.transpose(1, 2).reshape(b, L, self.dim).transpose(1, 2)  # (B, dim, L)
        return self.project_mm(self.w_v(out) + v).transpose(1, 2)


class CrossAwareLayer(MultiModalStage):
    """The reference's ``MMLayer`` (``backbone.{i}.layers``) as an ordinary `MultiModalStage`:
    Swin blocks, alignment ``proj``, two L->V fusions (``attn1`` before, ``attn2`` after
    PatchMerging) with their tanh gates (``linear1``, ``linear2``), and, after PatchMerging, the
    next language stage attending to the merged and fused tokens. Stage 0's ``attn1`` has inner
    width 2C; the last stage has no PatchMerging and no ``attn2`` / ``linear2``, and its gated trunk
    is never used.

    Language state (``text``) read and written by the hooks: ``words`` (B, N, hidden) the output of
    language stage i+1 (the one this vision stage i fuses with), ``l_mask`` (B, N), ``ext_mask``
    (B, 1, 1, N) its -10000 self-attention mask, and, only when the alignment loss is computed,
    ``cls`` (B, 256) = ``proj`` of that language stage on [CLS]; `fuse` then adds
    ``similarity{i}`` (B, 1, H, W).
    """

    def __init__(self, *, l_in: int = 768, **swin: Any):
        super().__init__(**swin)
        dim = self.dim
        self.proj = nn.Linear(dim, ALIGN_DIM)
        self.attn1 = FusionLayer(dim, l_in, 2 * dim if self.stage_index == 0 else dim)
        self.linear1 = tanh_gate(dim)
        if self.downsample is not None:
            self.attn2 = FusionLayer(2 * dim, l_in, 2 * dim)
            self.linear2 = tanh_gate(2 * dim)
        # The language stage that runs after this stage's PatchMerging. A tuple, not a sub-module:
        # its weights belong to ``lang_stage{i+2}`` (the original key names), set by `attach_language`.
        self._next_language: tuple[LanguageStage, ...] = ()

    def attach_language(self, stage: LanguageStage) -> None:
        """Run ``stage`` (L_{i+2}, a module owned elsewhere) on this stage's merged tokens."""
        self._next_language = (stage,)

    def fuse(self, x, H, W, text, feats, prefix):
        """R = attn1(X, words); X <- X + linear1(R) * R; emits R (decoder map before norm_i) and,
        with the alignment loss, S_i = cos(proj(X), cls) on the pre-fusion tokens X."""
        if "cls" in text or feats is not None:
            x_proj = self.proj(x)
            if feats is not None:
                feats[prefix + "x_proj"] = x_proj
            if "cls" in text:
                text = {**text, f"similarity{self.stage_index}": similarity_map(x_proj, text["cls"], H, W)}
        r = self.attn1(x, text["words"], text["l_mask"])
        if feats is not None:
            feats[prefix + "attn1"] = r
        if self.last and feats is None:
            return r, None, text  # the reference computes and discards the last gated trunk
        return r, x + self.linear1(r) * r, text

    def after_merge(self, x, H, W, text, feats, prefix):
        """R2 = attn2(X_down, words); X_down <- X_down + linear2(R2) * R2, the next vision stage's
        input and the keys/values of the next language stage, which updates ``words`` (and ``cls``)."""
        r2 = self.attn2(x, text["words"], text["l_mask"])
        x = x + self.linear2(r2) * r2
        (language,) = self._next_language
        words = language(text["words"], text["ext_mask"], x)
        if feats is not None:
            feats[f"lang_stage{self.stage_index + 2}.sequence_output"] = words
        text = {**text, "words": words}
        if "cls" in text:
            text["cls"] = language.cls_embedding(words)
        return x, text


class CrossVLTBackbone(MultiModalSwin):
    """`MultiModalSwin` with `CrossAwareLayer` stages, laid out as the reference's module tree:
    ``{i}.layers`` (stage i), ``{i}.norm{i}`` (its output norm), ``0.patch_embed`` — one
    container per vision stage, so parameter names and state_dict keys are the originals'
    (``backbone.{i}.layers.*``) and the construction / init order is theirs too.

    ``backbone[i]`` is the container of stage i; ``patch_embed``, ``pos_drop``, ``layers`` (a list)
    and ``norm{i}`` resolve into the containers, so `MultiModalSwin`'s forward runs unchanged.
    """

    def __init__(self, **kwargs: Any):
        super().__init__(CrossAwareLayer, **kwargs)
        layers = self._modules.pop("layers")
        for i, layer in enumerate(layers):
            group = nn.Module()
            if i == 0:
                group.patch_embed = self._modules.pop("patch_embed")
                group.pos_drop = self._modules.pop("pos_drop")
            group.layers = layer
            group.add_module(f"norm{i}", self._modules.pop(f"norm{i}"))
            self.add_module(str(i), group)

    @torch.no_grad()
    def init_weights(self) -> None:
        """The reference's init of every ``backbone`` module: Linear trunc-normal 0.02 / bias 0,
        LayerNorm 1 / 0, Conv2d Kaiming-normal fan_out, Conv1d Kaiming-normal fan_in, conv biases 0.
        (So the gates do NOT start at zero, as in the reference.)"""
        init_backbone_weights(self)
        for m in self.modules():
            if isinstance(m, (nn.Conv1d, nn.Conv2d)):
                nn.init.kaiming_normal_(m.weight, mode="fan_out" if isinstance(m, nn.Conv2d) else "fan_in")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def __getattr__(self, name: str) -> Any:
        groups = self.__dict__.get("_modules", {})  # absent while unpickling
        if name in ("patch_embed", "pos_drop") and "0" in groups:
            return getattr(groups["0"], name)
        if name == "layers" and "0" in groups:
            return [groups[str(i)].layers for i in range(len(self.num_features))]
        if name.startswith("norm") and name[4:] in groups:
            return getattr(groups[name[4:]], name)
        return super().__getattr__(name)

    def __getitem__(self, i: int) -> nn.Module:
        return self._modules[str(i)]

    def __len__(self) -> int:
        return len(self.num_features)


# ============================================================================================
# Alignment loss
# ============================================================================================
def similarity_map(x_proj: torch.Tensor, cls: torch.Tensor, H: int, W: int) -> torch.Tensor:
    """Cosine similarity of every pixel's projection with the [CLS] projection.

    ``x_proj (B, H*W, D), cls (B, D) -> (B, 1, H, W)`` (L2 normalisation with eps 1e-12).
    """
    v = F.normalize(x_proj, dim=-1)
    c = F.normalize(cls, dim=1)
    return torch.matmul(v, c.unsqueeze(-1)).view(-1, H, W, 1).permute(0, 3, 1, 2)


def alignment_loss(sim_maps: Sequence[torch.Tensor], target: torch.Tensor, temperature: torch.Tensor | Sequence[float],
                   weights: Sequence[float] = ALIGNMENT_LOSS_WEIGHTS) -> torch.Tensor:
    """``sum_i w_i * mean BCEWithLogits(upsample(S_i / tau_i), target)``.

    ``sim_maps[i] (B, 1, h_i, w_i)`` is divided by ``temperature[i]``, upsampled bilinearly
    (align_corners=True) to the target size (B, H, W) — the reference hard-codes 480x480 —, and
    compared with the 0/1 target; mean over pixels and batch. Computed in float32.
    """
    if len(sim_maps) != len(weights):
        raise ValueError(f"{len(sim_maps)} similarity maps but {len(weights)} alignment-loss weights")
    size = tuple(target.shape[-2:])
    tgt = target.float()
    with torch.autocast(device_type=target.device.type, enabled=False):
        total = target.new_zeros((), dtype=torch.float32)
        for i, (s, w) in enumerate(zip(sim_maps, weights)):
            logits = F.interpolate(s.float() / temperature[i], size=size, mode="bilinear", align_corners=True)
            total = total + w * F.binary_cross_entropy_with_logits(logits.squeeze(1), tgt)
    return total


def _reference_feature_names(feats: dict[str, Any], maps: Sequence[torch.Tensor]) -> None:
    """Rename the backbone's captured features in place to the reference's module paths:
    ``backbone.layers.{i}.X`` -> ``backbone.{i}.layers.X`` (inside ``MMLayer``), except the stage's
    hand-off tokens ``backbone.{i}.x_next`` and alignment tokens ``backbone.{i}.x_proj``; adds the
    decoder maps ``backbone.{i}.out`` (B, C_i, H_i, W_i) and ``backbone.0.patch_embed``."""
    for key in [k for k in feats if k.startswith("backbone.layers.")]:
        _, _, i, name = key.split(".", 3)
        value = feats.pop(key)
        if name != "x_residual":  # = attn1 (the map before norm_i), already captured
            feats[f"backbone.{i}.{name}" if name in ("x_next", "x_proj") else f"backbone.{i}.layers.{name}"] = value
    feats["backbone.0.patch_embed"] = feats.pop("backbone.patch_embed")
    for i, m in enumerate(maps):
        feats[f"backbone.{i}.out"] = m


# ============================================================================================
# The model
# ============================================================================================
def stage_bert_configs(config: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The four language-stage BERT configs (``num_hidden_layers`` = that stage's layer count)."""
    cfgs = config.get("bert_stage_configs")
    if cfgs is None:
        layers = config.get("bert_layers_per_stage", [6, 1, 1, 1])
        cfgs = [dict(config["bert"], num_hidden_layers=int(n)) for n in layers]
    if len(cfgs) != 4:
        raise CrossVLTConfigError(f"CrossVLT needs 4 language-stage configs, got {len(cfgs)}")
    hidden = {int(c["hidden_size"]) for c in cfgs}
    if len(hidden) != 1:
        raise CrossVLTConfigError(f"all language stages must share one hidden size, got {sorted(hidden)}")
    return [dict(c) for c in cfgs]


class CrossVLT(SegmentationModel):
    """CrossVLT. ``forward(image (B,3,H,W), text (B,N), l_mask (B,N), target=None,
    return_features=False)`` -> ``logits`` | ``(logits, alignment_loss)`` [+ features dict]."""

    def __init__(self, config: dict[str, Any]):
        super().__init__()
        self.config = config
        s = config["swin"]
        depths, heads = list(s["depths"]), list(s["num_heads"])
        if len(depths) != 4 or len(heads) != 4:
            raise CrossVLTConfigError(f"CrossVLT needs 4 Swin stages, got depths {depths}, heads {heads}")
        bert_cfgs = [_hf_bert_config(c) for c in stage_bert_configs(config)]
        l_in = bert_cfgs[0].hidden_size
        e = int(s["embed_dim"])
        self.backbone = CrossVLTBackbone(stage_kwargs=[{"l_in": l_in}] * 4, **swin_kwargs(config))
        self.backbone.init_weights()
        self.lang_stage1 = LanguageStage1(bert_cfgs[0], bert_cfgs[0].num_hidden_layers)
        _init_bert_style(self.lang_stage1, bert_cfgs[0].initializer_range, skip=[self.lang_stage1.encoder.proj])
        # V->L keys/values of L_{k+1}: the merged and fused tokens of vision stage k (width 2^(k+1) E).
        for k in (2, 3, 4):
            self.add_module(f"lang_stage{k}", LanguageStage(bert_cfgs[k - 1], bert_cfgs[k - 1].num_hidden_layers,
                                                            vision_dim=e * 2 ** (k - 1)))
            self.backbone.layers[k - 2].attach_language(getattr(self, f"lang_stage{k}"))
        dec = config.get("decoder", {})
        self.classifier = SimpleDecoding(int(dec.get("c4_dims", 8 * e)), int(dec.get("factor", 2)))
        align = config.get("alignment", {})
        if align.get("learnable_temperature", False):
            self.temp = nn.Parameter(torch.ones(4))
        else:
            self.register_buffer("temp", torch.ones(4), persistent=False)
        self.alignment_weights = tuple(float(w) for w in align.get("weights", ALIGNMENT_LOSS_WEIGHTS))

    @property
    def checkpoint_ignored_keys(self) -> tuple[str, ...]:
        """Keys of original checkpoints that this model deliberately does not hold: the reference's
        training files carry ``temp`` (never optimised, always ones); a loader should drop them."""
        return () if isinstance(self.temp, nn.Parameter) else ("temp",)

    # -- forward -----------------------------------------------------------------------------
    def forward(self, image: torch.Tensor, text: torch.Tensor, l_mask: torch.Tensor, t_mask: torch.Tensor | None = None,
                p_mask: torch.Tensor | None = None, target: torch.Tensor | None = None, return_features: bool = False):
        feats: dict[str, Any] | None = {} if return_features else None
        align = target is not None
        words, ext_mask = self.lang_stage1(text, l_mask)
        if feats is not None:
            feats["lang_stage1.sequence_output"] = words
        state = {"words": words, "l_mask": l_mask, "ext_mask": ext_mask}
        if align:  # each vision stage i compares its pre-fusion tokens with language stage i's [CLS]
            state["cls"] = self.lang_stage1.cls_embedding(words)
        maps, state = self.backbone.forward_with_text(image, state, feats)
        sims = [state[f"similarity{i}"] for i in range(4)] if align else []
        if feats is not None:
            _reference_feature_names(feats, maps)
        y = self.classifier(maps[3], maps[2], maps[1], maps[0])
        if feats is not None:
            feats["classifier.output"] = y
            if align:
                feats["similarity_maps"] = sims
        logits = F.interpolate(y, size=image.shape[-2:], mode="bilinear", align_corners=True)
        out: tuple = (logits,)
        if align:
            out += (alignment_loss(sims, target, self.temp, self.alignment_weights),)
        if feats is not None:
            out += (feats,)
        return out[0] if len(out) == 1 else out

    def loss(self, outputs: Any, batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``2 * weighted CE`` (``ce``) plus the alignment loss the forward computed from the
        target (``align``; present when ``target`` was among the forward's inputs)."""
        terms = {"ce": SEGMENTATION_LOSS_WEIGHT * weighted_cross_entropy(self.logits(outputs), batch["target"])}
        if isinstance(outputs, (tuple, list)) and len(outputs) > 1 and isinstance(outputs[1], torch.Tensor):
            terms["align"] = outputs[1].float()
        return terms

    # -- training helpers --------------------------------------------------------------------
    def dead_parameter_names(self) -> list[str]:
        """Parameters that get no gradient in a training forward (``target`` given): the gate of
        the last stage, whose trunk update is computed by the reference and then discarded."""
        return [f"backbone.3.layers.linear1.{n}" for n, _ in self.backbone.layers[3].linear1.named_parameters()]

    def not_optimized_parameter_names(self) -> list[str]:
        """Parameters the reference leaves out of its optimiser: the BERT embeddings of L1 (they
        get gradients but keep their pretrained values). (The reference's ``temp`` parameter is not
        optimised either; here it is a buffer unless ``alignment.learnable_temperature``.)"""
        return [f"lang_stage1.embeddings.{n}" for n, _ in self.lang_stage1.embeddings.named_parameters()]

    def unused_parameter_names(self) -> list[str]:
        """Everything the reference never updates (train.py freezes these): `dead_parameter_names`
        plus `not_optimized_parameter_names`. Freezing them changes no optimiser result."""
        return self.dead_parameter_names() + self.not_optimized_parameter_names()

    def parameter_groups(self, weight_decay: float) -> list[dict[str, Any]]:
        """The reference's AdamW groups, trainable parameters only:
        backbone names containing norm / absolute_pos_embed / relative_position_bias_table (no
        decay), other backbone (Swin + fusion + gates + alignment projections), decoder,
        ``lang_stage1.encoder`` (its BERT layers + proj), ``lang_stage2``, ``lang_stage3``,
        ``lang_stage4``. The L1 embeddings are not optimised (`not_optimized_parameter_names`).
        With ``alignment.learnable_temperature`` (not the reference), ``temp`` forms an extra group
        without decay."""
        skip = set(self.not_optimized_parameter_names())
        no_decay, backbone = backbone_decay_split(self.backbone, skip)

        def trainable(prefix: str, module: nn.Module) -> list[nn.Parameter]:
            return [p for n, p in module.named_parameters() if p.requires_grad and f"{prefix}.{n}" not in skip]

        groups = [
            {"params": no_decay, "weight_decay": 0.0},
            {"params": backbone, "weight_decay": weight_decay},
            {"params": trainable("classifier", self.classifier), "weight_decay": weight_decay},
            {"params": trainable("lang_stage1.encoder", self.lang_stage1.encoder), "weight_decay": weight_decay},
            {"params": trainable("lang_stage2", self.lang_stage2), "weight_decay": weight_decay},
            {"params": trainable("lang_stage3", self.lang_stage3), "weight_decay": weight_decay},
            {"params": trainable("lang_stage4", self.lang_stage4), "weight_decay": weight_decay},
        ]
        if isinstance(self.temp, nn.Parameter) and self.temp.requires_grad:
            groups.append({"params": [self.temp], "weight_decay": 0.0})
        return [g for g in groups if g["params"]]

    def set_grad_ckpt(self, flag: bool) -> None:
        self.backbone.set_grad_ckpt(flag)

    def set_fast_paths(self, flag: bool) -> None:
        """SDPA window attention on / off (the backbone's only fast path)."""
        self.backbone.set_fast_paths(flag)

    # -- pretrained weights ------------------------------------------------------------------
    def load_pretrained_swin(self, path: str | Path) -> list[str]:
        """Official Swin ImageNet weights: ``patch_embed.*`` -> ``backbone.0``,
        ``layers.{i}.*`` -> ``backbone.{i}.layers.*``; head, final norm and attn masks dropped.
        Goes through `lib.checkpoint.load_swin_pretrained` on a view with the Swin key layout;
        returns the loaded keys in this model's names."""
        from lib.checkpoint import load_swin_pretrained

        view = nn.Module()
        view.patch_embed = self.backbone.patch_embed
        view.layers = nn.ModuleList(self.backbone.layers)
        loaded = []
        for key in load_swin_pretrained(view, path).loaded:  # back to this model's key names
            if key.startswith("patch_embed."):
                loaded.append("backbone.0." + key)
            else:
                _, i, rest = key.split(".", 2)
                loaded.append(f"backbone.{i}.layers.{rest}")
        return loaded

    def load_pretrained_bert(self, folder: str | Path) -> list[str]:
        """Copy a local Hugging Face BERT (e.g. bert-base-uncased) into L1: embeddings and the first
        ``n1`` encoder layers (selected explicitly; the pooler and later layers are
        unused, as in the reference). With ``init_lang_from_bert`` in the config, L2-L4's self-attention layers are also
        initialised from the following BERT layers (an experiment; the reference keeps them random).
        Returns the loaded key names (``lang_stage*``)."""
        from transformers import BertModel

        folder = Path(folder)
        if not folder.is_dir():
            raise FileNotFoundError(f"BERT weights folder not found: {folder}")
        sd = BertModel.from_pretrained(str(folder), add_pooling_layer=False, local_files_only=True).state_dict()
        plan: dict[str, torch.Tensor] = {f"lang_stage1.{k}": v for k, v in sd.items() if k.startswith("embeddings.")
                                         and not k.endswith(("position_ids", "token_type_ids"))}
        source = 0
        stages: list[tuple[str, int]] = [("lang_stage1.encoder.layer", len(self.lang_stage1.encoder.layer))]
        if self.config.get("init_lang_from_bert", False):
            stages += [(f"lang_stage{k}.layer", len(getattr(self, f"lang_stage{k}").layer)) for k in (2, 3, 4)]
        for prefix, count in stages:
            for j in range(count):
                layer_keys = {k: v for k, v in sd.items() if k.startswith(f"encoder.layer.{source}.")}
                if not layer_keys:
                    raise ValueError(f"{folder}: BERT has no encoder layer {source} (needed for {prefix}.{j})")
                for k, v in layer_keys.items():
                    plan[f"{prefix}.{j}." + k[len(f"encoder.layer.{source}."):]] = v
                source += 1
        own = self.state_dict()
        bad = [k for k, v in plan.items() if k not in own or tuple(own[k].shape) != tuple(v.shape)]
        if bad:
            raise ValueError(f"{folder}: BERT weights do not fit the language stages ({', '.join(bad[:4])} ...)")
        self.load_state_dict(plan, strict=False)
        return list(plan)


# ============================================================================================
# Config and spec
# ============================================================================================
def _configure(cfg: dict, options: dict) -> None:
    """Language stages of 6 + 1 + 1 + 1 BERT layers sharing one BERT config (the released code's split)."""
    layers = [int(n) for n in options.get("bert_layers_per_stage", (6, 1, 1, 1))]
    if len(layers) != 4 or min(layers) < 0:
        raise ValueError(f"bert_layers_per_stage needs 4 non-negative layer counts, got {layers}")
    cfg["bert_layers_per_stage"] = layers
    cfg["bert_stage_configs"] = [dict(cfg["bert"], num_hidden_layers=n) for n in layers]
    cfg["alignment"] = {"learnable_temperature": bool(options.get("learnable_temperature", False)),
                        "weights": [1.0, 1.0, 1.0, 1.0]}
    cfg["init_lang_from_bert"] = bool(options.get("init_lang_from_bert", False))


_build = family_builder(_configure, extras=("bert_layers_per_stage", "learnable_temperature", "init_lang_from_bert"))


def config_from_fixture(fx: Mapping[str, Any]) -> dict:
    """CrossVLT fixtures have their own schema: ``segmodel_kwargs`` / ``swin`` sizes, four
    ``bert_stage_configs`` (with ``vision_dim``), ``bert_layers_per_stage`` and ``decoder``."""
    kw = {**fx.get("swin", {}), **fx.get("segmodel_kwargs", {})}
    if kw.get("ape"):
        raise ValueError("fixture uses an absolute position embedding (ape=True), which CrossVLT never does")
    stage_cfgs = [dict(c) for c in fx["bert_stage_configs"]]
    layers = [int(n) for n in (fx.get("bert_layers_per_stage") or [c["num_hidden_layers"] for c in stage_cfgs])]
    if len(stage_cfgs) != 4 or len(layers) != 4:
        raise ValueError(f"CrossVLT fixture needs 4 language stages, got {len(stage_cfgs)} configs / {len(layers)} counts")
    if any(int(c.get("num_hidden_layers", n)) != n for c, n in zip(stage_cfgs, layers)):
        raise ValueError(f"bert_layers_per_stage {layers} disagrees with the stage configs' num_hidden_layers")
    overrides = {k: kw[k] for k in ("embed_dim", "depths", "num_heads", *SWIN_DEFAULTS) if k in kw}
    cfg = _build("crossvlt", window_size=int(kw["window_size"]), bert=stage_cfgs[0], swin_overrides=overrides,
                 img_size=int(fx.get("img_size", [480])[0]), bert_layers_per_stage=layers)
    cfg["bert_stage_configs"] = [dict(bert_config_dict(c), num_hidden_layers=n) for c, n in zip(stage_cfgs, layers)]
    e = cfg["swin"]["embed_dim"]
    for k, c in enumerate(stage_cfgs[1:], start=1):
        if "vision_dim" in c and int(c["vision_dim"]) != e * 2 ** k:
            raise ValueError(f"language stage {k + 1} vision_dim {c['vision_dim']} != width {e * 2 ** k} of vision stage {k}")
    dec = fx.get("decoder", {})
    if "c4_dims" in dec:
        cfg["decoder"] = {"c4_dims": int(dec["c4_dims"]), "factor": int(dec.get("factor", 2))}
    return cfg


SPEC = ModelSpec(
    target="lib.crossvlt:CrossVLT", build_config=_build, config_from_fixture=config_from_fixture,
    # 2 GPUs x 6 per GPU, 21 tokens, seed 12345; validation on all sentences of every ref.
    recipes={"*": Recipe(lr=3e-5, epochs=40, batch_size=6, max_tokens=21, seed=12345, gpus=2)},
    sync_bn=True, val_protocol="all", inputs=("image", "text", "l_mask"),
    train_inputs=("image", "text", "l_mask", "target"),
    pretrained_missing=(r"backbone\.\d+\.layers\.(?!blocks\.|downsample\.)", r"backbone\.\d+\.norm\d+\.",
                        r"lang_stage[234]\.", r"lang_stage1\.encoder\.proj\.", r"classifier\."),
    tiny={**TINY_OPTIONS, "bert_layers_per_stage": [1, 1, 1, 1]})
