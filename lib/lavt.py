"""LAVT: Language-Aware Vision Transformer (Yang et al., CVPR 2022).

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
reference op order, which also keeps the decoder in the plain layout with direct convolutions),
``channels_last`` (``'auto'`` by default: the decoder's channels-last fast path on CUDA only) and
``winograd`` (``'auto'`` by default: the decoder's Winograd 3x3 convolutions on CPU in float32;
see `lib.decoder`).
"""
from __future__ import annotations

import functools
import json
from typing import Any, Callable, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from bert.text_encoder import bert_config_dict, build_text_encoder
from lib.decoder import ChannelsLast, SimpleDecoding, check_channels_last
from lib.fusion import PWAM, tanh_gate
from lib.losses import weighted_cross_entropy
from lib.spec import ModelSpec, Recipe, SegmentationModel
from lib.swin import SWIN_DEFAULTS, SWIN_TYPES, MultiModalStage, MultiModalSwin, SwinConfig


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


def swin_kwargs(config: Mapping[str, Any]) -> dict[str, Any]:
    """Backbone keyword arguments from our model config (its `SwinConfig` plus the fast-path switches)."""
    return dict(SwinConfig.from_dict(config["swin"]).backbone_kwargs(),
                fused_attn=config.get("fused_attn", True), grad_ckpt=config.get("grad_ckpt", False))


def fusion_stage_kwargs(config: dict[str, Any]) -> list[dict[str, Any]]:
    f = config["fusion"]
    return [dict(num_heads_fusion=h, fusion_drop=f.get("dropout", 0.0), l_in=config["l_in"]) for h in f["num_heads"]]


class LAVTOne(SegmentationModel):
    """LAVT with BERT inside (``lavt_one``).

    ``forward(image (B,3,H,W), text (B,N), l_mask (B,N), t_mask=None, p_mask=None,
    return_features=False) -> logits (B, 2, H, W)`` (or ``(logits, features)``).
    """

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
        self.set_winograd(config.get("winograd", "auto") if config.get("fused_attn", True) else 0)

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

    # -- the contract ------------------------------------------------------------------------
    def loss(self, outputs: torch.Tensor, batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Class-weighted cross-entropy (weights 0.9 / 1.1) on the full-size logits (LAVT, section 3.5)."""
        return {"ce": weighted_cross_entropy(self.logits(outputs), batch["target"])}

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

    def set_fast_paths(self, flag: bool) -> None:
        """Every fast path on (``True``: SDPA window attention, GEMM fusion projections, the
        decoder's channels-last layout where enabled) or the reference op order (``False``)."""
        self.backbone.set_fast_paths(flag)
        self.set_channels_last(self.config.get("channels_last", "auto") if flag else False)
        self.set_winograd(self.config.get("winograd", "auto") if flag else 0)

    def set_winograd(self, value: int | str) -> None:
        """The decoder's Winograd 3x3 convolutions (`lib.decoder.SimpleDecoding.winograd`):
        ``'auto'`` (CPU, float32), 0 (direct), 2 or 4 (tile size)."""
        if hasattr(self.classifier, "winograd"):
            self.classifier.winograd = value

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


# --------------------------------------------------------------------------------------------
# Config and spec of the LAVT family (Swin + BERT + per-stage fusion)
# --------------------------------------------------------------------------------------------
# Entries of every LAVT-family config besides the sizes (defaults held here once).
FAMILY_OPTIONS: dict[str, Any] = {
    "fused_attn": True,       # fast paths on (the fixtures pass with them)
    "batched_text": True,     # FIANet: three BERT passes as one batched call
    "grad_ckpt": False,       # activation checkpointing of the Swin blocks
    "bert_pretrained": "",    # local folder with BERT weights (informational)
}
Configure = Callable[[dict, dict], None]


def _parse_mha(mha: str | list | tuple, n: int) -> list[int]:
    if isinstance(mha, (list, tuple)):
        heads = [int(h) for h in mha]
    elif not mha:
        heads = [1] * n
    else:
        try:
            heads = [int(h) for h in str(mha).split("-")]
        except ValueError:
            raise ValueError(f"--mha must look like '4-4-4-4', got {mha!r}") from None
    if len(heads) != n or min(heads) < 1:
        raise ValueError(f"--mha needs {n} positive head counts, got {mha!r}")
    return heads


def family_config(name: str, *, swin_type: str = "base", window_size: int | None = None, pretrained_swin: str = "",
                  img_size: int = 480, mha: str = "", fusion_drop: float = 0.0, num_tmem: int = 1,
                  bert: Mapping[str, Any] | str = "bert-base-uncased",
                  swin_overrides: Mapping[str, Any] | None = None, configure: Configure | None = None,
                  extras: tuple[str, ...] = (), **extra: Any) -> dict[str, Any]:
    """Full, JSON-serialisable config of a LAVT-family model with the reference builder's defaults.

    ``window_size``: explicit value, else 12 when 'window12' occurs in ``pretrained_swin`` (the
    reference rule), else 7. ``swin_overrides`` replaces entries of the Swin table (e.g. tiny
    widths for tests). ``bert``: BertConfig dict, 'bert-base-uncased', or a local folder.
    ``configure(cfg, options)`` adds the model's own entries; ``extras`` names the keyword
    options it reads besides `FAMILY_OPTIONS`; other keywords are ignored.
    """
    swin = SwinConfig.named(swin_type).to_dict()
    for key, value in (swin_overrides or {}).items():
        if key not in swin:
            raise ValueError(f"unknown Swin override {key!r}; valid: {', '.join(sorted(swin))}")
        swin[key] = list(value) if isinstance(value, tuple) else value
    if window_size is None:
        explicit = (swin_overrides or {}).get("window_size")
        window_size = explicit or (12 if "window12" in str(pretrained_swin) else 7)
    swin["window_size"] = int(window_size)
    n = len(swin["depths"])
    if n != 4 or len(swin["num_heads"]) != 4:
        raise ValueError(f"the LAVT family needs 4 Swin stages, got depths {swin['depths']}, heads {swin['num_heads']}")
    bert_cfg = bert_config_dict(bert)
    # Options of other models (the generic model flags) are ignored, as the spec contract says.
    extra = {k: v for k, v in extra.items() if k in FAMILY_OPTIONS or k in extras}
    e = swin["embed_dim"]
    customised = any(swin[k] != SWIN_TYPES[swin_type][k] for k in ("embed_dim", "depths", "num_heads"))
    cfg: dict[str, Any] = {
        "model": name,
        "swin_type": "custom" if customised else swin_type,
        "swin": swin,
        "pretrained_swin": str(pretrained_swin or ""),
        "img_size": [int(x) for x in img_size] if isinstance(img_size, (list, tuple)) else int(img_size),
        "fusion": {"num_heads": _parse_mha(mha, n), "dropout": float(fusion_drop)},
        "l_in": int(bert_cfg["hidden_size"]),
        "decoder": {"c4_dims": 8 * e, "factor": 2},
        "bert": bert_cfg,
    }
    for key, default in FAMILY_OPTIONS.items():
        cfg[key] = extra.get(key, default)
    if configure is not None:
        configure(cfg, {"num_tmem": num_tmem, **extra})
    json.dumps(cfg)  # must stay plain data
    return cfg


def family_builder(configure: Configure | None = None, extras: tuple[str, ...] = ()) -> Callable[..., dict[str, Any]]:
    """A spec's ``build_config`` for a LAVT-family model with its own ``configure`` hook (a
    ``functools.partial``, not a closure, so that a whole model pickles)."""
    return functools.partial(family_config, configure=configure, extras=extras)


FixtureHook = Callable[[Mapping[str, Any], dict], None]


def family_config_from_fixture(fixture_config: Mapping[str, Any], name: str, build: Callable[..., dict[str, Any]],
                               from_fixture: FixtureHook | None = None,
                               fixture_options: tuple[str, ...] = ()) -> dict[str, Any]:
    """Convert a reference fixture's ``config`` (LAVT-builder schema: ``swin``, ``fusion``,
    ``bert``, ``decoder``, ``img_size``) into our config; ``from_fixture`` completes the model's
    own entries; ``fixture_options`` are top-level fixture keys passed to ``build``."""
    fs = fixture_config["swin"]
    if fs.get("ape"):
        raise ValueError("fixture uses an absolute position embedding (ape=True), which the LAVT family never does")
    overrides = {k: fs[k] for k in ("embed_dim", "depths", "num_heads", *SWIN_DEFAULTS) if k in fs}
    fusion = fixture_config.get("fusion", {})
    heads = fusion.get("num_heads_fusion") or fixture_config.get("builder_args", {}).get("mha", "")
    extra = {k: int(fixture_config[k]) for k in fixture_options if k in fixture_config}
    cfg = build(name, window_size=int(fs["window_size"]), mha=heads, fusion_drop=float(fusion.get("fusion_drop", 0.0)),
                bert=dict(fixture_config["bert"]), swin_overrides=overrides,
                img_size=int(fixture_config.get("img_size", [480])[0]), **extra)
    l_in = fusion.get("l_in_channels")
    if l_in is not None and int(l_in) != cfg["l_in"]:
        raise ValueError(f"fixture fusion l_in_channels {l_in} != BERT hidden size {cfg['l_in']}")
    dec = fixture_config.get("decoder", {})
    if "c4_dims" in dec:
        cfg["decoder"] = {"c4_dims": int(dec["c4_dims"]), "factor": int(dec.get("factor", 2))}
    if from_fixture is not None:
        from_fixture(fixture_config, cfg)
    return cfg


# A deliberately tiny model for tests, quick starts and the `--setting tiny` benchmark: Swin embed
# 16, depths 2-2-2-2, heads 1-2-4-8, window 7, and a one-layer 32-wide BERT (seconds on a CPU).
TINY_BERT: dict[str, Any] = {
    "vocab_size": 128, "hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
    "intermediate_size": 64, "max_position_embeddings": 64, "type_vocab_size": 2,
}
TINY_OPTIONS: dict[str, Any] = {
    "swin_overrides": {"embed_dim": 16, "depths": [2, 2, 2, 2], "num_heads": [1, 2, 4, 8]},
    "bert": TINY_BERT, "window_size": 7,
}
# Keys a model keeps missing when only ImageNet Swin weights and a BERT folder are loaded: the
# language-fusion modules, the decoder, the stage norms (the Swin file has one final norm only)
# and the PatchMerging-free last-stage parts; everything under ``backbone.layers.*.blocks`` and
# ``backbone.patch_embed`` must come from the file.
SWIN_FAMILY_PRETRAINED_MISSING: tuple[str, ...] = (
    r"backbone\.layers\.\d+\.(?!blocks\.|downsample\.)", r"backbone\.norm\d+\.", r"backbone\.(tmem|cim)\.",
    r"classifier\.",
)


def _lavt_spec(target: str) -> ModelSpec:
    build = family_builder()
    return ModelSpec(
        target=target, build_config=build,
        config_from_fixture=lambda fx: family_config_from_fixture(fx, fx.get("variant") or "lavt_one", build),
        recipes={"*": Recipe(lr=5e-5, epochs=40, batch_size=8, max_tokens=20, gpus=4)},  # README: 4 GPUs x 8
        sync_bn=True, val_protocol="one-per-ref", inputs=("image", "text", "l_mask"),
        pretrained_missing=SWIN_FAMILY_PRETRAINED_MISSING, tiny=TINY_OPTIONS)


LAVT_ONE_SPEC = _lavt_spec("lib.lavt:LAVTOne")
LAVT_SPEC = _lavt_spec("lib.lavt:LAVT")
