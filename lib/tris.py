"""TRIS: "Referring Image Segmentation Using Text Supervision" (Liu et al., ICCV 2023), its two
networks on CLIP ResNet towers (`lib.clip`).

Stage 1, `TRISStage1` (localisation, weakly supervised by text only; the method section of the paper):

    ids (B, 20) --CLIP text--> sentence embedding (B, E) --lan_project--> (B, D), repeated: (B, B, D)
    image --CLIP ResNet--> c4 (B, 32w, h, w) --vis_project--> (B, D, h, w) -> tokens (B, hw, D)
    both L2-normalised; bilateral prompt: V += 0.1 new_vis, T += 0.1 new_lan (not re-normalised)
    score = exp(logit_scale) * V T^T (B, hw, B): image i against EVERY sentence j of the batch
    eval  -> ReLU(own-pair map score[i, :, i]) upsampled to the input (bilinear, align_corners=False);
             by default each image is paired with its own sentence only (the reference evaluates
             one image and one sentence at a time), see ``eval_pairing``
    train -> per pair j: mean + max of the map + (1 - p)^3 log(0.01 + p), p = spatial mean of the
             softmax over [constant background map 1, the B pair maps]; background column dropped

The stage-1 loss (`TRISStage1.loss`, the paper's text-classification loss and its calibration
with a frozen CLIP ViT-B/32; weights 5, 1, 2 as the reference's ``--w4``, ``--w1``, ``--w5``):

    loss_cls = 5 * multilabel_soft_margin(cls (B, B), identity)   each image's own sentence positive
    cam  = sigmoid map (B, 1, H, W) -> 224 (bilinear, align_corners=True); fg = cam * image -> 224
    s_i  = cos(ViT image embedding of fg_i, ViT sentence embedding of sentence i)      (B,)
    loss_pos = 1 * mean_i -log(clamp(s_i, 1e-4, 0.9999))
    s_ik = cos(ViT image embedding of fg_i, ViT embedding of hard negative k)      (B, K), K = 3
    loss_neg = 2 * mean_ik -log(1 - s_ik)                      (no clamp, as the reference)

``loss_neg`` exists only when the batch carries ``neg_text`` (B, K, T) (the dataset's
``negative_samples``; the reference adds the term only when ``--negative_samples`` > 0). A weight 0
drops its term. As in the reference there is no clamp in ``loss_neg``: a cosine >= 1 (possible only
by rounding for an image embedding equal to a negative's text embedding) gives +inf / NaN, which
train.py's finite-loss check turns into a one-line stop (the reference would go on with NaN
weights). Gradients of the calibration terms flow through the frozen ViT into ``cam`` only.

The calibrator (`TRISStage1.calibrator`, a `lib.clip.FrozenCLIP`) is a CLIP ViT-B/32 read from a local
file (``calibration.weights`` in the config, or `TRISStage1.load_calibrator` / ``prepare_training``;
OpenAI's TorchScript ``ViT-B-32.pt`` only with ``allow_torchscript``, never from a config). It is not a submodule: it is in no state_dict (a
stage-1 checkpoint holds the stage-1 network only), in no optimiser, never trains, stays in eval
mode and follows the model's device (float32; the reference keeps it in the float16 weights
``clip.load`` gives on a GPU). Tiny test configs use a seeded random ViT instead
(``calibration.random_init``, the same weights on every process and after a resume). The text the
ViT reads is TRIS's own 20 CLIP tokens (the reference loads the ViT with ``txt_length=20``: a 20x20
causal mask and the first 20 rows of the 77 positional embeddings; the sentence embedding is the
state at the largest id, as everywhere in CLIP). The released ``train_stage1.py`` calls
``clip.load("ViT-B-32")``; that string is not one of CLIP's model names (``"ViT-B/32"``), so unless a
file named ``ViT-B-32`` exists in the working directory ``clip.load`` raises "Model ViT-B-32 not
found" (no fallback, no other model): the run needs the ViT-B/32 checkpoint as a local file, as the
commented-out ``clip.load("../clip_weights/ViT-B-32.pt")`` next to it suggests. `clip_similarity` is
the score the loss and PRMS share.

``logit_scale`` is TRIS's own (init ln(1/0.07)); the reference never optimises it.

Stage 2, `TRISStage2` (segmentation trained on the pseudo masks; the method section of the paper):

    ids --CLIP text--> word states (B, 20, 512) (all 20, padding included: no mask anywhere)
    image --CLIP ResNet--> c1..c4; c_k += PixelAttention(c_k, words) for k = 2, 3, 4
    ConvBNPReLU reductions, top-down decoder (bilinear, align_corners=False, to the skip size)
    eval  -> final_seg1 logits (B, 1, H, W); train -> [final_seg1, final_seg2, final_seg3, final_seg4]

Its loss is the sum of the four BCE-with-logits terms (deep supervision, weights 1).

Decision rules (evaluation at the original resolution: the map is upsampled bilinearly with
align_corners=True to the ground truth's size first): stage 1 foreground = positive response;
stage 2 foreground = sigmoid > 0.5 (logit > 0). The reference divides every map by its maximum
before thresholding, which turns an all-negative stage-2 map into an all-foreground mask; here
stage 2 thresholds the sigmoid directly (a documented difference).

A stage-2 checkpoint given to the stage-1 class (or vice versa) is refused with one line
(`check_state_dict`); the reference loads either into either class with ``strict=False``.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import os
from typing import Any, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from lib.checkpoint import CheckpointError, CheckpointMismatchError
from lib.clip import CLIP, FrozenCLIP, VisionTransformer, clip_config, load_clip_weights, load_frozen_clip
from lib.spec import ModelSpec, Recipe, TextSide, resize_logits

__all__ = ["BilateralPrompt", "PixelAttention", "ConvBNPReLU", "TRISStage1", "TRISStage2", "SPEC_STAGE1",
           "SPEC_STAGE2", "build_config", "config_from_fixture", "focal_penalty", "clip_similarity",
           "calibration_config", "build_calibrator", "CalibratorUnavailableError"]

CONTEXT_LENGTH = 20         # CLIP tokens per sentence (the reference's --max_query_len)
PROMPT_WEIGHT = 0.1         # the bilateral prompt's hard-coded residual weight
STAGE1_LOSS_WEIGHT = 5.0    # --w4
STAGE1_LOSS_WEIGHTS = {"cls": STAGE1_LOSS_WEIGHT, "pos": 1.0, "neg": 2.0}  # --w4, --w1, --w5
POS_CLAMP = (1e-4, 0.9999)  # the reference's clamp of the positive cosine before -log
CALIBRATOR_SEED = 0         # the random tiny calibrator's weights
DEFAULT_IMG_SIZE = 320


def _upsample(x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)


def _resize_to(x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """(B, 1, h, w) -> (B, H, W) float32, bilinear align_corners=True (the evaluation upsampling)."""
    return resize_logits(x, size)[:, 0]


# --------------------------------------------------------------------------------------------
# Stage-1 modules
# --------------------------------------------------------------------------------------------
def _conv_in_relu(cin: int, cout: int, relu: bool = True) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Conv2d(cin, cout, 1), nn.InstanceNorm2d(cout, affine=True)]
    return nn.Sequential(*layers, nn.ReLU()) if relu else nn.Sequential(*layers)


class BilateralPrompt(nn.Module):
    """The paper's bilateral prompt: cross-attention between the pixel tokens and the B
    sentence embeddings of the batch, in both directions.

    ``(vis (B, C, h, w), lan (B, N, C)) -> (new_vis (B, C, h, w), new_lan (B, N, C))``:
    Q/K/V of the image are 1x1 conv -> affine InstanceNorm -> ReLU, of the text Linear -> ReLU;
    ``new_vis = IN(conv(softmax_N(Qv Kt^T / sqrt(C)) Vt))``, ``new_lan = Linear(softmax_hw(Qt Kv /
    sqrt(C)) Vv)``. Keys ``v_proj{1,2,3}``, ``t_proj{1,2,3}``, ``v_output``, ``t_output``.
    """

    def __init__(self, channels: int):
        super().__init__()
        c = channels
        self.v_proj1, self.v_proj2, self.v_proj3 = (_conv_in_relu(c, c) for _ in range(3))
        self.t_proj1, self.t_proj2, self.t_proj3 = (nn.Sequential(nn.Linear(c, c), nn.ReLU()) for _ in range(3))
        self.v_output = _conv_in_relu(c, c, relu=False)
        self.t_output = nn.Sequential(nn.Linear(c, c))

    def forward(self, vis: torch.Tensor, lan: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        b, c, h, w = vis.shape
        scale = math.sqrt(lan.shape[-1])
        qv = self.v_proj1(vis).reshape(b, c, h * w).transpose(1, 2)   # (B, hw, C)
        kv = self.v_proj2(vis).reshape(b, c, h * w)                   # (B, C, hw)
        vv = self.v_proj3(vis).reshape(b, c, h * w).transpose(1, 2)   # (B, hw, C)
        qt, kt, vt = self.t_proj1(lan), self.t_proj2(lan), self.t_proj3(lan)  # (B, N, C)
        attn_v = F.softmax(qv.matmul(kt.transpose(1, 2)) / scale, dim=2)      # over the N sentences
        attn_t = F.softmax(qt.matmul(kv) / scale, dim=2)                      # over the hw pixels
        new_vis = attn_v.matmul(vt).permute(0, 2, 1).reshape(b, c, h, w)
        return self.v_output(new_vis), self.t_output(attn_t.matmul(vv))


def focal_penalty(p: torch.Tensor, power: float = 3.0, offset: float = 0.01) -> torch.Tensor:
    """``(1 - p)^power * log(offset + p)``: pushes the mean foreground probability of a pair map up."""
    return torch.pow(1 - p, power) * torch.log(offset + p)


# --------------------------------------------------------------------------------------------
# Calibration with a frozen CLIP ViT
# --------------------------------------------------------------------------------------------
class CalibratorUnavailableError(ValueError):
    """Stage-1 calibration needs the frozen CLIP ViT-B/32 and none is configured (one line)."""


# A seconds-on-a-CPU ViT for tests: one 64-wide block per tower, 32-d embeddings, CLIP's full BPE
# vocabulary (any real token id fits) and 224 input (7x7 patches of 32).
_TINY_VIT = {"vision_layers": 1, "vision_width": 64, "embed_dim": 32, "transformer_width": 64,
             "transformer_heads": 1, "transformer_layers": 1}


def calibration_config(weights: str | os.PathLike = "", random_init: bool = False) -> dict[str, Any]:
    """The ``calibration`` entry of a stage-1 config: the ViT's `CLIP` config (ViT-B/32, or the tiny
    random one), the local weights file, and whether the weights are a seeded random draw. (The
    TorchScript opt-in is never stored: a config read from a checkpoint cannot open code.)"""
    clip = clip_config("ViT-B/32", **(_TINY_VIT if random_init and not weights else {}))
    return {"clip": clip, "weights": str(weights or ""),
            "random_init": bool(random_init and not weights), "seed": CALIBRATOR_SEED,
            "note": ("random weights: tests only, not the reference's calibration" if random_init and not weights
                     else "CLIP ViT-B/32 from a local file")}


def build_calibrator(calibration: Mapping[str, Any], allow_torchscript: bool = False) -> FrozenCLIP:
    """The frozen ViT a ``calibration`` config describes: loaded from ``weights`` (a ViT CLIP file;
    its shapes decide the architecture; OpenAI's TorchScript archive only with
    ``allow_torchscript``), or drawn from ``seed`` when ``random_init`` (the global RNG is left
    untouched, so every process and every resume get the same weights). One-line errors."""
    weights = str(calibration.get("weights") or "")
    if weights:
        if not os.path.isfile(weights):
            raise CalibratorUnavailableError(f"--clip_vitb32 {weights}: file not found")
        try:
            model = load_frozen_clip(weights, allow_torchscript=allow_torchscript)
        except CheckpointError as e:
            msg = str(e).strip().splitlines()[0]
            hint = " (--allow_torchscript opts in)" if "TorchScript" in msg else ""
            raise CalibratorUnavailableError(f"--clip_vitb32: {msg}{hint}") from None
        if not isinstance(model.visual, VisionTransformer):
            raise CalibratorUnavailableError(f"--clip_vitb32 {weights}: a CLIP ResNet, not a ViT (TRIS calibrates "
                                             "with CLIP ViT-B/32)")
        return model
    if calibration.get("random_init"):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(calibration.get("seed", CALIBRATOR_SEED)))
            return FrozenCLIP(calibration["clip"])
    raise CalibratorUnavailableError(
        "TRIS stage-1 training needs the frozen CLIP ViT-B/32 of its calibration losses: pass --clip_vitb32 PATH "
        "(a local ViT-B-32.pt / open_clip / state_dict file; OpenAI's archive also needs --allow_torchscript)")


def clip_similarity(calibrator: CLIP, image: torch.Tensor, mask: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    """Cosine between the calibrator's embedding of the masked image and of sentences.

    ``image`` (B, 3, H, W) normalised as the model's input (TRIS: ImageNet statistics), ``mask``
    (B, 1, h, w) (the loss: the sigmoid map; PRMS: the ReLU'd map); both are resized to the ViT's
    input (224) bilinearly with align_corners=True, and the ViT embeds ``mask * image``. ``text``
    (B, T) CLIP ids -> cosine (B,), or (B, K, T) -> (B, K) (K sentences per image). Computed in
    float32; the text side needs no gradient (the calibrator is frozen), the image side keeps the
    graph into ``mask`` (and ``image``).
    """
    if image.dim() != 4 or mask.dim() != 4 or mask.shape[1] != 1 or mask.shape[0] != image.shape[0]:
        raise ValueError(f"clip_similarity needs image (B, 3, H, W) and mask (B, 1, h, w), got "
                         f"{tuple(image.shape)} and {tuple(mask.shape)}")
    if text.dim() not in (2, 3) or text.shape[0] != image.shape[0]:
        raise ValueError(f"clip_similarity needs text (B, T) or (B, K, T) with B = {image.shape[0]}, "
                         f"got {tuple(text.shape)}")
    size = int(getattr(calibrator.visual, "input_resolution", 224))
    with torch.autocast(device_type=image.device.type, enabled=False):
        img, cam = image.float(), mask.float()
        if tuple(img.shape[-2:]) != (size, size):
            img = F.interpolate(img, size=(size, size), mode="bilinear", align_corners=True)
        if tuple(cam.shape[-2:]) != (size, size):
            cam = F.interpolate(cam, size=(size, size), mode="bilinear", align_corners=True)
        emb = calibrator.encode_image(cam * img).float()
        emb = emb / emb.norm(dim=-1, keepdim=True)                        # (B, E)
        ids = text.reshape(-1, text.shape[-1])
        with torch.no_grad():
            sent = calibrator.encode_text(ids)[1].float()
            sent = sent / sent.norm(dim=-1, keepdim=True)
        if text.dim() == 2:
            return (emb * sent).sum(-1)
        return torch.einsum("be,bke->bk", emb, sent.reshape(text.shape[0], text.shape[1], -1))


# --------------------------------------------------------------------------------------------
# Stage-2 modules
# --------------------------------------------------------------------------------------------
class PixelAttention(nn.Module):
    """LAVT-style pixel-word attention (Yang et al., CVPR 2022) as TRIS uses it, no padding mask.

    ``(vis (B, Ci, H, W), words (B, Ct, T)) -> (B, Ci, H, W)``: keys / values Conv1d Ct -> Ci of
    the words, query = IN(1x1(vis)); ``G = softmax_T(q k / sqrt(Ci)) v``; output
    ``ReLU(Wo(ReLU(Wm(vis)) * IN(Ww(G))))``.
    """

    def __init__(self, visual_channels: int, language_channels: int):
        super().__init__()
        ci, ct = visual_channels, language_channels
        self.Wk = nn.Conv1d(ct, ci, 1)
        self.Wv = nn.Conv1d(ct, ci, 1)
        self.Wq = nn.Conv2d(ci, ci, 1)
        self.Wm = nn.Conv2d(ci, ci, 1)
        self.Ww = nn.Conv2d(ci, ci, 1)
        self.Wo = nn.Conv2d(ci, ci, 1)
        self.ins_q = nn.InstanceNorm2d(ci, affine=True)
        self.ins_w = nn.InstanceNorm2d(ci, affine=True)

    def forward(self, vis: torch.Tensor, words: torch.Tensor) -> torch.Tensor:
        b, ci, h, w = vis.shape
        keys, values = self.Wk(words), self.Wv(words)                          # (B, Ci, T)
        query = self.ins_q(self.Wq(vis)).reshape(b, ci, h * w).permute(0, 2, 1)  # (B, HW, Ci)
        attn = F.softmax(query.matmul(keys) / math.sqrt(ci), dim=2)             # (B, HW, T)
        g = attn.matmul(values.permute(0, 2, 1)).permute(0, 2, 1).reshape(b, ci, h, w)
        g = self.ins_w(self.Ww(g))
        return F.relu(self.Wo(F.relu(self.Wm(vis)) * g))


class ConvBNPReLU(nn.Module):
    """3x3 conv (no bias) -> BatchNorm -> PReLU (one slope); keys ``conv``, ``bn``, ``relu``."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(cout)
        self.relu = nn.PReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.bn(self.conv(x)))


def _seg_head(cin: int, mid: int) -> nn.Sequential:
    return nn.Sequential(ConvBNPReLU(cin, mid), nn.Conv2d(mid, 1, 1, bias=False))


# --------------------------------------------------------------------------------------------
# The two networks
# --------------------------------------------------------------------------------------------
class _TRISBase(nn.Module):
    """What both stages share: the CLIP backbone (``backbone.*``), weight loading, the stage check."""

    stage: int = 0
    # Keys only the OTHER stage's checkpoints have (used to name the stage of a wrong file).
    other_stage_keys: tuple[str, ...] = ()

    def __init__(self, config: dict[str, Any]):
        super().__init__()
        if int(config.get("stage", self.stage)) != self.stage:
            raise ValueError(f"config is for TRIS stage {config.get('stage')}, not stage {self.stage}")
        self.config = config
        self.backbone = CLIP(config["clip"])

    def load_pretrained_clip(self, path: str | os.PathLike, allow_torchscript: bool = False) -> list[str]:
        """CLIP weights of a local file into ``backbone`` (strict: every CLIP key and shape); returns
        the loaded keys as names of this model (``backbone.*``). A TorchScript archive (OpenAI's
        RN50.pt) needs ``allow_torchscript=True`` (it is code)."""
        report = load_clip_weights(self.backbone, path, allow_torchscript=allow_torchscript, strict=True)
        return [f"backbone.{k}" for k in report.loaded]

    def check_state_dict(self, state: Mapping[str, Any]) -> None:
        """Refuse, in one line, a checkpoint of the other TRIS stage."""
        if any(k.startswith(self.other_stage_keys) for k in state):
            other = 3 - self.stage
            raise CheckpointMismatchError(
                f"this checkpoint holds TRIS stage-{other} weights (keys {', '.join(p + '*' for p in self.other_stage_keys)}) "
                f"but the model is TRIS stage {self.stage}; load it with the stage-{other} model (tris_stage{other})")

    def backbone_parameter_names(self) -> list[str]:
        return [f"backbone.{n}" for n, _ in self.backbone.named_parameters()]

    def set_fast_paths(self, flag: bool) -> None:
        """No fused path: the ops are the reference's (kept for the contract)."""


class TRISStage1(_TRISBase):
    """TRIS stage 1. ``forward(image (B, 3, H, W), text (B, T) CLIP ids, return_features=False)``.

    Eval: the ReLU'd own-pair response map ``(B, 1, H, W)``. The bilateral prompt's softmax runs
    over the sentences paired with an image, so the map depends on which sentences share the
    batch. ``eval_pairing='own'`` (default) pairs each image with its own sentence only: every
    sample then gets exactly what the reference's evaluation and PRMS compute (batch size 1),
    whatever the batch. ``'batch'`` pairs it with all B sentences, as the training forward does
    (the reference fixtures' eval outputs were made so). Training: a dict with ``cls``
    ``(B, B)``, ``cls_fg`` ``(B,)``, ``relu_map`` / ``sigmoid_map`` / ``map`` ``(B, 1, H, W)`` and
    ``logit_scale_exp``. Config: ``clip``, ``hidden_dim``, ``text_dim`` (= CLIP ``embed_dim``),
    ``bilateral_prompt``, ``prompt_weight``, ``focal_p``, ``focal_lambda``, ``loss_weights``
    (``cls`` / ``pos`` / ``neg``), ``eval_pairing``, ``calibration`` (`calibration_config`).

    ``calibrator``: the frozen CLIP ViT of the calibration losses and of PRMS, built on first use
    (evaluation never needs it) and kept outside the module tree (see the module docstring).
    ``prepare_training(calibrator=PATH)`` builds it before a run, so a missing file fails first.
    """

    stage = 1
    other_stage_keys = ("attention2.", "attention3.", "attention4.", "reduced_c", "final_seg", "output")

    def __init__(self, config: dict[str, Any]):
        super().__init__(config)
        d = int(config["hidden_dim"])
        c4 = self.backbone.visual.stage_channels[3]
        self.vis_project = nn.Conv2d(c4, d, kernel_size=1, bias=True)
        self.lan_project = nn.Linear(int(config["text_dim"]), d)
        self.logit_scale = nn.Parameter(torch.ones([]) * math.log(1 / 0.07))
        self.attn_fusion = BilateralPrompt(d) if config.get("bilateral_prompt", True) else None
        self.eval_pairing = str(config.get("eval_pairing", "own"))
        if self.eval_pairing not in ("own", "batch"):
            raise ValueError(f"eval_pairing must be 'own' or 'batch', got {self.eval_pairing!r}")
        # Not a submodule (plain attribute): no state_dict entry, no optimiser, model.train() cannot reach it.
        object.__setattr__(self, "_calibrator", None)

    # -- the frozen calibrator -----------------------------------------------------------------
    def _loss_weight(self, term: str) -> float:
        return float(self.config.get("loss_weights", {}).get(term, STAGE1_LOSS_WEIGHTS[term]))

    @property
    def needs_calibrator(self) -> bool:
        """Whether the loss has a calibration term (``pos`` or ``neg`` weight non-zero)."""
        return self._loss_weight("pos") != 0 or self._loss_weight("neg") != 0

    def _device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def calibrator(self) -> FrozenCLIP:
        """The frozen CLIP ViT (built from ``config['calibration']`` on first access, on the model's
        device, float32, eval mode, ``requires_grad=False``). `CalibratorUnavailableError` when the
        config names no weights file and no random draw."""
        if self._calibrator is None:
            calib = build_calibrator(self.config.get("calibration") or calibration_config())
            object.__setattr__(self, "_calibrator", calib.to(self._device()))
        return self._calibrator

    def load_calibrator(self, path: str | os.PathLike, allow_torchscript: bool = False) -> FrozenCLIP:
        """Build the calibrator from a local ViT CLIP file now (recorded in ``config['calibration']``);
        OpenAI's TorchScript ``ViT-B-32.pt`` needs ``allow_torchscript=True`` (it is code)."""
        calibration = calibration_config(path)
        calib = build_calibrator(calibration, allow_torchscript=allow_torchscript)
        calibration["clip"] = dict(calib.config)  # the file's architecture
        self.config["calibration"] = calibration
        object.__setattr__(self, "_calibrator", calib.to(self._device()))
        return calib

    def prepare_training(self, calibrator: str | os.PathLike = "", allow_torchscript: bool = False) -> None:
        """Build the calibrator before training: from ``calibrator`` (a file, which replaces the
        config's), else from the config (its file, or its seeded random draw). A no-op when the
        loss has no calibration term; `CalibratorUnavailableError` when there is nothing to build."""
        if not self.needs_calibrator and not calibrator:
            return
        path = str(calibrator or (self.config.get("calibration") or {}).get("weights") or "")
        if path:
            self.load_calibrator(path, allow_torchscript=allow_torchscript)
        else:
            _ = self.calibrator

    def _apply(self, fn, recurse: bool = True):
        # .to() / .cuda() / .cpu(): the calibrator follows the model's device (it stays float32).
        out = super()._apply(fn, recurse)
        if self._calibrator is not None:
            object.__setattr__(self, "_calibrator", self._calibrator.to(self._device()))
        return out

    def forward(self, image: torch.Tensor, text: torch.Tensor, return_features: bool = False):
        feats: dict[str, torch.Tensor] | None = {} if return_features else None
        b = image.shape[0]
        _, sentence = self.backbone.encode_text(text, feats, "backbone.")
        c4 = self.backbone.visual.stages(image.to(self.backbone.dtype), feats, "backbone.visual.")[3]
        if feats is not None:  # the attention pool is unused by TRIS; computed only to check its weights
            feats["backbone.visual.attnpool.global"], feats["backbone.visual.attnpool.dense"] = \
                self.backbone.visual.attnpool(c4)
        lan = self.lan_project(sentence)                      # (B, D)
        vis = self.vis_project(c4.float())                    # (B, D, h, w)
        if feats is not None:
            feats["lan_project"], feats["vis_project"] = lan, vis
        h, w = vis.shape[-2:]
        vis_tok = vis.flatten(2).transpose(1, 2)              # (B, hw, D)
        # Training (and the "batch" pairing) scores image i against all B sentences; the "own"
        # pairing gives each image only its own sentence, i.e. the reference's batch-1 evaluation.
        pair_all = self.training or self.eval_pairing == "batch"
        lan = lan.unsqueeze(0).repeat(b, 1, 1) if pair_all else lan.unsqueeze(1)  # (B, B or 1, D)
        vis_tok = vis_tok / vis_tok.norm(dim=-1, keepdim=True)
        lan = lan / lan.norm(dim=-1, keepdim=True)
        if self.attn_fusion is not None:
            new_vis, new_lan = self.attn_fusion(vis_tok.transpose(1, 2).reshape(b, -1, h, w), lan)
            if feats is not None:
                feats["attn_fusion.new_vis"], feats["attn_fusion.new_lan"] = new_vis, new_lan
            wgt = float(self.config.get("prompt_weight", PROMPT_WEIGHT))
            vis_tok = new_vis.flatten(2).transpose(1, 2) * wgt + vis_tok
            lan = new_lan * wgt + lan
        cosine = torch.bmm(vis_tok, lan.transpose(1, 2))      # (B, hw, B)
        if feats is not None:
            feats["score_cosine"] = cosine
        scale = self.logit_scale.exp()
        score = scale * cosine
        if pair_all:  # score[i, :, i]
            own = torch.diagonal(score, dim1=0, dim2=2).transpose(0, 1).reshape(b, 1, h, w)
        else:
            own = score.transpose(1, 2).reshape(b, 1, h, w)
        seg = _upsample(own, image.shape[-2:])
        if not self.training:
            out: Any = F.relu(seg)
        else:
            pair_maps = score.transpose(1, 2).reshape(b, b, h, w)
            with_bg = torch.cat([torch.ones_like(pair_maps[:, :1]), pair_maps], dim=1)   # (B, 1+B, h, w)
            probs = F.softmax(with_bg, dim=1)
            if feats is not None:
                feats["softmax_with_background"] = probs
            flat, pflat = with_bg.flatten(2), probs.flatten(2)
            cls = flat.mean(-1) + flat.max(-1).values + focal_penalty(
                pflat.mean(-1), float(self.config.get("focal_p", 3.0)), float(self.config.get("focal_lambda", 0.01)))
            cls_fg = torch.diagonal(pflat[:, 1:].mean(-1))     # mean foreground prob. of the own pair
            out = {"cls": cls[:, 1:], "cls_fg": cls_fg, "relu_map": F.relu(seg), "sigmoid_map": torch.sigmoid(seg),
                   "map": seg, "logit_scale_exp": scale}
        return (out, feats) if return_features else out

    # -- contract ----------------------------------------------------------------------------
    @staticmethod
    def response_map(outputs: Any) -> torch.Tensor:
        """The ReLU'd own-pair map (B, 1, H, W) inside eval or training outputs."""
        return outputs["relu_map"] if isinstance(outputs, Mapping) else outputs

    def loss(self, outputs: Any, batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``{'loss_cls': 5 L_cls, 'loss_pos': 1 L_pos, 'loss_neg': 2 L_neg}`` float32 (the module
        docstring); ``loss_neg`` only when ``batch`` has ``neg_text`` (B, K, T); a weight 0 drops
        its term. Reads ``batch['image']`` (B, 3, H, W) and ``batch['text']`` (B, T)."""
        if not isinstance(outputs, Mapping) or "cls" not in outputs:
            raise ValueError("TRIS stage-1 loss needs the training-mode outputs (call model.train() first)")
        terms: dict[str, torch.Tensor] = {}
        with torch.autocast(device_type=outputs["cls"].device.type, enabled=False):
            w_cls, w_pos, w_neg = (self._loss_weight(k) for k in ("cls", "pos", "neg"))
            if w_cls:
                cls = outputs["cls"].float()
                target = torch.eye(cls.shape[0], device=cls.device, dtype=cls.dtype)
                terms["loss_cls"] = w_cls * F.multilabel_soft_margin_loss(cls, target)
            use_neg = bool(w_neg) and batch.get("neg_text") is not None
            if w_pos or use_neg:
                text = batch["text"]
                texts = text[:, None]                                   # (B, 1, T)
                if use_neg:
                    neg = batch["neg_text"].to(text.device)
                    if neg.dim() != 3 or neg.shape[0] != text.shape[0] or neg.shape[-1] != text.shape[-1]:
                        raise ValueError(f"neg_text must be (B, K, {text.shape[-1]}), got {tuple(neg.shape)}")
                    texts = torch.cat([texts, neg.to(text.dtype)], dim=1)  # (B, 1 + K, T): one ViT image pass
                sim = clip_similarity(self.calibrator, batch["image"], outputs["sigmoid_map"], texts)
                if w_pos:
                    terms["loss_pos"] = w_pos * -torch.log(sim[:, 0].clamp(*POS_CLAMP)).mean()
                if use_neg:
                    terms["loss_neg"] = w_neg * -torch.log(1 - sim[:, 1:]).mean()
        return terms

    def predict_scores(self, outputs: Any, size: Sequence[int]) -> torch.Tensor:
        """(B, H, W) in [0, 1]: the response map at ``size`` divided by its maximum (+1e-5), as the
        maps PRMS saves."""
        m = _resize_to(self.response_map(outputs), size)
        return m / (m.flatten(1).max(1).values[:, None, None] + 1e-5)

    def predict_mask(self, outputs: Any, size: Sequence[int]) -> torch.Tensor:
        """(B, H, W) bool: positive response at ``size``."""
        return _resize_to(self.response_map(outputs), size) > 0

    def unused_parameter_names(self) -> list[str]:
        """Never updated by the reference: the CLIP attention pool and CLIP's own logit scale (no
        gradient), and TRIS's ``logit_scale`` (gets a gradient but is in no optimiser group)."""
        pool = [f"backbone.visual.attnpool.{n}" for n, _ in self.backbone.visual.attnpool.named_parameters()]
        return pool + ["backbone.logit_scale", "logit_scale"]

    def parameter_groups(self, weight_decay: float) -> list[dict[str, Any]]:
        """The reference's AdamW groups: CLIP at ``lr_scale`` 0.1, the new modules at 1 (both with
        ``weight_decay``); trainable parameters only."""
        backbone, head = [], []
        for name, p in self.named_parameters():
            if not p.requires_grad or name == "logit_scale":
                continue
            (backbone if name.startswith("backbone.") else head).append(p)
        groups = [{"params": backbone, "weight_decay": weight_decay, "lr_scale": 0.1},
                  {"params": head, "weight_decay": weight_decay, "lr_scale": 1.0}]
        return [g for g in groups if g["params"]]


class TRISStage2(_TRISBase):
    """TRIS stage 2. ``forward(image (B, 3, H, W), text (B, T), return_features=False)``.

    Eval: ``final_seg1`` logits ``(B, 1, H, W)``; training: the list of the four deep-supervision
    logits ``[seg1, seg2, seg3, seg4]``, each ``(B, 1, H, W)``. Config: ``clip``, ``text_dim``
    (512), ``v_chans`` (CLIP stage widths), ``reduced`` (64, 128, 256, 512), ``decoder`` (256,
    128, 64, 32), ``loss_weights``.
    """

    stage = 2
    other_stage_keys = ("vis_project.", "lan_project.", "attn_fusion.")

    def __init__(self, config: dict[str, Any]):
        super().__init__(config)
        v = [int(c) for c in config.get("v_chans", self.backbone.visual.stage_channels)]
        r = [int(c) for c in config.get("reduced", (64, 128, 256, 512))]
        o = [int(c) for c in config.get("decoder", (256, 128, 64, 32))]
        t = int(config["text_dim"])
        self.attention2 = PixelAttention(v[1], t)
        self.attention3 = PixelAttention(v[2], t)
        self.attention4 = PixelAttention(v[3], t)
        self.reduced_c1, self.reduced_c2, self.reduced_c3, self.reduced_c4 = (
            ConvBNPReLU(v[k], r[k]) for k in range(4))
        # final_seg1..4 read output1..4 (widths o[3], o[2], o[1], o[0]).
        self.final_seg1 = _seg_head(o[3], 32)
        self.final_seg2 = _seg_head(o[2], 32)
        self.final_seg3 = _seg_head(o[1], 64)
        self.final_seg4 = _seg_head(o[0], 64)
        self.output4 = ConvBNPReLU(r[3], o[0])
        self.output3 = ConvBNPReLU(o[0], o[1])
        self.output2 = ConvBNPReLU(o[1], o[2])
        self.output1 = ConvBNPReLU(o[2], o[3])

    def forward(self, image: torch.Tensor, text: torch.Tensor, return_features: bool = False):
        feats: dict[str, torch.Tensor] | None = {} if return_features else None
        size = image.shape[-2:]
        words, _ = self.backbone.encode_text(text, feats, "backbone.")
        lan = words.permute(0, 2, 1)                                           # (B, 512, T)
        c1, c2, c3, c4 = self.backbone.visual.stages(image.to(self.backbone.dtype), feats, "backbone.visual.")
        fused = []
        for k, (c, att) in enumerate(((c2, self.attention2), (c3, self.attention3), (c4, self.attention4)), start=2):
            a = att(c, lan)
            if feats is not None:
                feats[f"attention{k}"] = a
            fused.append(a + c)
        d = [self.reduced_c1(c1), self.reduced_c2(fused[0]), self.reduced_c3(fused[1]), self.reduced_c4(fused[2])]
        o4 = self.output4(d[3])
        s4 = _upsample(o4, d[2].shape[-2:])
        o3 = self.output3(s4 + d[2])
        s3 = _upsample(o3, d[1].shape[-2:])
        o2 = self.output2(s3 + d[1])
        s2 = _upsample(o2, d[0].shape[-2:])
        o1 = self.output1(s2 + d[0])
        head1 = self.final_seg1(o1)
        if feats is not None:
            for k in range(4):
                feats[f"reduced_c{k + 1}"] = d[k]
            feats.update(output4=o4, output3=o3, output2=o2, output1=o1, final_seg1=head1)
        seg1 = _upsample(head1, size)
        if self.training:
            out: Any = [seg1, _upsample(self.final_seg2(s2), size), _upsample(self.final_seg3(s3), size),
                        _upsample(self.final_seg4(s4), size)]
        else:
            out = seg1
        return (out, feats) if return_features else out

    # -- contract ----------------------------------------------------------------------------
    @staticmethod
    def main_logits(outputs: Any) -> torch.Tensor:
        """The ``final_seg1`` logits (B, 1, H, W) inside eval or training outputs."""
        return outputs[0] if isinstance(outputs, (list, tuple)) else outputs

    def loss(self, outputs: Any, batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Deep-supervised BCE with logits (mean) of each output against the (pseudo) mask
        ``batch['target']`` (B, H, W) (or ``batch['pseudo_gt']`` (B, 1, H, W)), weights 1:
        ``{'loss_seg1': ..., ..., 'loss_seg4': ...}``."""
        maps = list(outputs) if isinstance(outputs, (list, tuple)) else [outputs]
        target = batch["target"] if "target" in batch else batch["pseudo_gt"]
        if target.dim() == 3:
            target = target.unsqueeze(1)
        weights = self.config.get("loss_weights", {}).get("seg", [1.0, 1.0, 1.0, 1.0])
        with torch.autocast(device_type=maps[0].device.type, enabled=False):
            target = target.float()
            out = {}
            for k, (m, w) in enumerate(zip(maps, weights), start=1):
                if m.shape[-2:] != target.shape[-2:]:
                    raise ValueError(f"TRIS stage-2 target is {tuple(target.shape[-2:])}, "
                                     f"the logits are {tuple(m.shape[-2:])}")
                out[f"loss_seg{k}"] = float(w) * F.binary_cross_entropy_with_logits(m.float(), target)
            return out

    def predict_scores(self, outputs: Any, size: Sequence[int]) -> torch.Tensor:
        """(B, H, W) sigmoid of the main logits at ``size``."""
        return torch.sigmoid(_resize_to(self.main_logits(outputs), size))

    def predict_mask(self, outputs: Any, size: Sequence[int]) -> torch.Tensor:
        """(B, H, W) bool: sigmoid > 0.5, i.e. logit > 0 (the reference's divide-by-max rule is
        not used: it makes an all-negative map all foreground)."""
        return _resize_to(self.main_logits(outputs), size) > 0

    def unused_parameter_names(self) -> list[str]:
        """No gradient in the reference: the CLIP attention pool, CLIP's logit scale and its
        ``text_projection`` (stage 2 reads the word states, not the sentence embedding)."""
        pool = [f"backbone.visual.attnpool.{n}" for n, _ in self.backbone.visual.attnpool.named_parameters()]
        return pool + ["backbone.logit_scale", "backbone.text_projection"]

    def parameter_groups(self, weight_decay: float) -> list[dict[str, Any]]:
        """The reference's groups: backbone parameters at ``lr_scale`` 0.1 except those named
        ``*positional_embedding*``, which join the head at 1; trainable parameters only."""
        backbone, head = [], []
        for name, p in self.named_parameters():
            if not p.requires_grad:
                continue
            (backbone if name.startswith("backbone.") and "positional_embedding" not in name else head).append(p)
        groups = [{"params": backbone, "weight_decay": weight_decay, "lr_scale": 0.1},
                  {"params": head, "weight_decay": weight_decay, "lr_scale": 1.0}]
        return [g for g in groups if g["params"]]


# --------------------------------------------------------------------------------------------
# Configs and specs
# --------------------------------------------------------------------------------------------
def _clip_from_options(options: Mapping[str, Any]) -> dict[str, Any]:
    arch = str(options.get("clip_backbone") or "RN50").replace("clip-", "")
    if arch not in ("RN50", "RN101"):
        raise ValueError(f"TRIS needs a CLIP ResNet backbone (RN50 or RN101), got {arch!r}")
    return clip_config(arch, **dict(options.get("clip_overrides") or {}))


def build_config(name: str, stage: int | None = None, **options: Any) -> dict[str, Any]:
    """The full config of ``tris_stage1`` / ``tris_stage2`` (the stage comes from ``stage`` or the
    name). Options used: ``clip_backbone`` (RN50 | RN101), ``clip_overrides`` (CLIP constructor
    sizes, e.g. a tiny text tower for tests), ``hidden_dim`` (stage 1, 1024),
    ``clip_pretrained`` (a local CLIP file, loaded by `load_pretrained_clip`), ``clip_allow_torchscript``;
    stage 1 also ``clip_vitb32`` (the calibrator's local file) and ``calibrator='random'`` (a seeded
    random tiny ViT, for tests); the rest is ignored."""
    stage = int(stage if stage is not None else (2 if name.rstrip().endswith("2") else 1))
    clip = _clip_from_options(options)
    cfg: dict[str, Any] = {"model": name, "stage": stage, "clip": clip, "txt_length": CONTEXT_LENGTH,
                           "clip_pretrained": str(options.get("clip_pretrained") or ""),
                           "clip_allow_torchscript": bool(options.get("clip_allow_torchscript", False))}
    if stage == 1:
        weights = dict(STAGE1_LOSS_WEIGHTS)
        for flag, term in (("w4", "cls"), ("w1", "pos"), ("w5", "neg")):  # --w4 / --w1 / --w5
            value = (options.get("loss_weight_flags") or {}).get(flag)
            if value is not None:
                if not value >= 0:
                    raise ValueError(f"--{flag} {value}: a loss weight must be >= 0")
                weights[term] = float(value)
        cfg.update(text_dim=clip["embed_dim"], hidden_dim=int(options.get("hidden_dim") or 1024), bilateral_prompt=True,
                   prompt_weight=PROMPT_WEIGHT, focal_p=3.0, focal_lambda=0.01, loss_weights=weights,
                   eval_pairing="own",
                   calibration=calibration_config(options.get("clip_vitb32") or "",
                                                  random_init=options.get("calibrator") == "random"))
    elif stage == 2:
        w = clip["vision_width"]
        cfg.update(text_dim=clip["transformer_width"], v_chans=[w * 4, w * 8, w * 16, w * 32],
                   reduced=[64, 128, 256, 512], decoder=[256, 128, 64, 32], loss_weights={"seg": [1.0] * 4})
    else:
        raise ValueError(f"TRIS has stages 1 and 2, got {stage}")
    return cfg


def config_from_fixture(fx: Mapping[str, Any], stage: int = 1) -> dict[str, Any]:
    """Our config of one stage of a TRIS reference fixture config (``fx['stage1']`` / ``['stage2']``); the
    stage-1 calibration weights are 0 (the fixtures hold no ViT calibrator)."""
    key = f"stage{stage}"
    part = fx[key] if key in fx else fx
    c = dict(part["clip"])
    clip = {k: c[k] for k in ("embed_dim", "image_resolution", "vision_layers", "vision_width", "vision_patch_size",
                              "context_length", "vocab_size", "transformer_width", "transformer_heads",
                              "transformer_layers", "vision_heads") if k in c}
    clip = clip_config("RN50", **clip)
    args = part.get("args", {})
    hard = part.get("hard_coded", {})
    cfg = build_config(f"tris_stage{stage}", stage=stage)
    cfg["clip"] = clip
    cfg["txt_length"] = int(c.get("txt_length", args.get("max_query_len", CONTEXT_LENGTH)))
    if stage == 1:
        cfg.update(text_dim=int(hard.get("textdim", clip["embed_dim"])), hidden_dim=int(args["hidden_dim"]),
                   bilateral_prompt=float(args.get("attn_multi", 0.1)) > 0,
                   prompt_weight=float(hard.get("bilateral_prompt_add_weight", PROMPT_WEIGHT)),
                   focal_p=float(args.get("FOCAL_P", 3.0)), focal_lambda=float(args.get("FOCAL_LAMBDA", 0.01)),
                   eval_pairing="batch",  # the fixture's eval forward ran the whole batch together
                   # The fixtures hold the network and its loss_cls only, no ViT calibrator: no calibration terms.
                   loss_weights={**STAGE1_LOSS_WEIGHTS, "pos": 0.0, "neg": 0.0})
    else:
        cfg.update(text_dim=int(hard.get("textdim", 512)))
        for ours, theirs in (("v_chans", "v_chans"), ("reduced", "reduced"), ("decoder", "outputs")):
            if theirs in hard:
                cfg[ours] = [int(x) for x in hard[theirs]]
    return cfg


# scripts/train_stage1.sh and train_stage2.sh: one GPU, batch 48, 15 epochs, AdamW lr 5e-5 wd 0.01,
# seed 1234; stage 1 draws 3 hard negative sentences per sample (--negative_samples 3).
NEGATIVE_SAMPLES = 3
_RECIPES_STAGE2 = {"*": Recipe(lr=5e-5, epochs=15, batch_size=48, max_tokens=CONTEXT_LENGTH, weight_decay=0.01,
                               seed=1234)}
_RECIPES = {"*": dataclasses.replace(_RECIPES_STAGE2["*"], options={"negative_samples": NEGATIVE_SAMPLES})}
_TEXT = TextSide("clip", context_length=CONTEXT_LENGTH)


# Seconds on a CPU: one bottleneck per ResNet stage, a one-layer 64-wide text tower (the full BPE
# vocabulary, so real tokenised sentences fit); stage 1 calibrates with a seeded random tiny ViT.
_TINY = {"clip_overrides": {"vision_layers": [1, 1, 1, 1], "vision_width": 8, "transformer_width": 64,
                            "transformer_heads": 1, "transformer_layers": 1}, "hidden_dim": 64, "calibrator": "random"}

SPEC_STAGE1 = ModelSpec(
    target="lib.tris:TRISStage1", build_config=functools.partial(build_config, stage=1), recipes=_RECIPES,
    config_from_fixture=functools.partial(config_from_fixture, stage=1), sync_bn=True, val_protocol="all",
    inputs=("image", "text"), train_inputs=("image", "text"), text=_TEXT, default_img_size=DEFAULT_IMG_SIZE,
    pretrained_missing=(r"vis_project\.", r"lan_project\.", r"logit_scale$", r"attn_fusion\."),
    tiny=_TINY, eval_at_original_resolution=True,  # the paper's protocol: GT at the image's own size
)
SPEC_STAGE2 = dataclasses.replace(
    SPEC_STAGE1, target="lib.tris:TRISStage2", build_config=functools.partial(build_config, stage=2),
    config_from_fixture=functools.partial(config_from_fixture, stage=2), recipes=_RECIPES_STAGE2,
    pretrained_missing=(r"attention[234]\.", r"reduced_c[1-4]\.", r"output[1-4]\.", r"final_seg[1-4]\."),
    schedule_step="epoch",  # train_stage2.py steps its poly schedule once per epoch: lr ~ constant
)
SPEC = SPEC_STAGE1  # the file's default spec (stage 1); the registry names both
