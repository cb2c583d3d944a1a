"""CLIP building blocks (Radford et al., "Learning Transferable Visual Models From Natural Language
Supervision", ICML 2021, §2.4 "Choosing and Scaling a Model"), written once for every model that
uses CLIP towers (TRIS now; its frozen ViT-B/32 calibration next).

* `ModifiedResNet`: the CLIP ResNet (3-conv stem + average pool, anti-aliased bottlenecks whose
  stride is an average pool, attention pooling). `stages(x)` returns the four stage maps
  (c1..c4: strides 4, 8, 16, 32), which TRIS uses; the attention pool accepts any map size (its
  positional grid is resized bilinearly) and returns the pooled vector and the per-location map.
* `VisionTransformer`: the CLIP ViT (patch conv, class token, pre-LN, ``ln_post`` of the class
  token times ``proj``).
* `CLIP`: both towers with OpenAI's state_dict names (``visual.*``, ``transformer.resblocks.*``,
  ``token_embedding``, ``positional_embedding``, ``ln_final``, ``text_projection``,
  ``logit_scale``). ``encode_text(ids (B, T))`` runs the causal text transformer (no padding
  mask: padding can never reach earlier positions) and returns the per-token states after
  ``ln_final`` ``(B, T, W)`` and the sentence embedding ``(B, E)``: the state at the position of
  the LARGEST id (the end-of-text token, CLIP §2.4) times ``text_projection``. When a sentence was
  truncated before its end token, the largest id is the start token, so the embedding is the
  state at position 0.

Weights come from a LOCAL file only (never a download), through `load_clip_state_dict`:

* a plain state_dict or a checkpoint dict holding one (``state_dict`` / ``model``; open_clip's
  checkpoints of the OpenAI architectures use the same key names) is read with
  ``torch.load(weights_only=True)``;
* OpenAI's released ``RN50.pt`` / ``ViT-B-32.pt`` are TorchScript archives, i.e. CODE that runs
  when loaded. They are refused unless the caller opts in with ``allow_torchscript=True``; then
  ``torch.jit.load(...).state_dict()`` is used. The three metadata scalars ``input_resolution``,
  ``context_length`` and ``vocab_size`` are dropped and float16 weights are cast to float32.

`clip_config_from_state_dict` derives the architecture from a state_dict's shapes.

`FrozenCLIP` is a CLIP that never trains (every parameter ``requires_grad=False``, ``train()``
keeps it in eval mode): a fixed scorer such as TRIS's ViT-B/32 calibrator. Gradients still flow
through it into its inputs. `load_frozen_clip` builds one with the architecture of a local file.
"""
from __future__ import annotations

import math
import os
import zipfile
from collections import OrderedDict
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from lib.checkpoint import CheckpointError, LoadReport, extract_state_dict, load_model_state, safe_torch_load

__all__ = ["LayerNorm", "QuickGELU", "ResidualAttentionBlock", "Transformer", "Bottleneck", "AttentionPool2d",
           "ModifiedResNet", "VisionTransformer", "CLIP", "causal_mask", "clip_config", "clip_config_from_state_dict",
           "is_torchscript_archive", "load_clip_state_dict", "load_clip_weights", "CLIP_METADATA_KEYS", "FrozenCLIP",
           "load_frozen_clip"]

# Scalars OpenAI's archives keep next to the weights; they are not parameters.
CLIP_METADATA_KEYS = ("input_resolution", "context_length", "vocab_size")

# OpenAI's released architectures (the shapes of RN50.pt / RN101.pt / ViT-B-32.pt).
CLIP_ARCHS: dict[str, dict[str, Any]] = {
    "RN50": dict(embed_dim=1024, image_resolution=224, vision_layers=[3, 4, 6, 3], vision_width=64,
                 vision_patch_size=None),
    "RN101": dict(embed_dim=512, image_resolution=224, vision_layers=[3, 4, 23, 3], vision_width=64,
                  vision_patch_size=None),
    "ViT-B/32": dict(embed_dim=512, image_resolution=224, vision_layers=12, vision_width=768, vision_patch_size=32),
}
_TEXT_DEFAULTS = dict(context_length=77, vocab_size=49408, transformer_width=512, transformer_heads=8,
                      transformer_layers=12)


def clip_config(arch: str = "RN50", **overrides: Any) -> dict[str, Any]:
    """The plain config of one of OpenAI's CLIP architectures (``RN50``, ``RN101``, ``ViT-B/32``)."""
    if arch not in CLIP_ARCHS:
        raise ValueError(f"unknown CLIP architecture {arch!r}; known: {', '.join(CLIP_ARCHS)}")
    return _complete({**CLIP_ARCHS[arch], **_TEXT_DEFAULTS, **overrides})


def _complete(cfg: dict[str, Any]) -> dict[str, Any]:
    """Fill the derived head counts (text: width // 64; ResNet attention pool: width * 32 // 64;
    ViT: width // 64), as OpenAI's model builder does."""
    cfg = dict(cfg)
    resnet = isinstance(cfg["vision_layers"], (list, tuple))
    if resnet:
        cfg["vision_layers"] = [int(n) for n in cfg["vision_layers"]]
    cfg.setdefault("transformer_heads", cfg["transformer_width"] // 64)
    cfg.setdefault("vision_heads", cfg["vision_width"] * 32 // 64 if resnet else cfg["vision_width"] // 64)
    return cfg


# --------------------------------------------------------------------------------------------
# Text transformer
# --------------------------------------------------------------------------------------------
class LayerNorm(nn.LayerNorm):
    """LayerNorm computed in float32 and cast back (CLIP's half-precision weights)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.float()).to(x.dtype)


class QuickGELU(nn.Module):
    """``x * sigmoid(1.702 x)``, the activation CLIP was trained with."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


class ResidualAttentionBlock(nn.Module):
    """Pre-LN transformer block on ``(L, B, W)`` (sequence first): self-attention, then a 4x
    QuickGELU MLP (keys ``attn.in_proj_weight``, ``mlp.c_fc``, ``mlp.c_proj``, ``ln_1``, ``ln_2``)."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.attn = nn.MultiheadAttention(width, heads)
        self.ln_1 = LayerNorm(width)
        self.mlp = nn.Sequential(OrderedDict([
            ("c_fc", nn.Linear(width, width * 4)), ("gelu", QuickGELU()), ("c_proj", nn.Linear(width * 4, width))]))
        self.ln_2 = LayerNorm(width)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        if attn_mask is not None:
            attn_mask = attn_mask.to(dtype=x.dtype, device=x.device)
        h = self.ln_1(x)
        x = x + self.attn(h, h, h, need_weights=False, attn_mask=attn_mask)[0]
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    """``layers`` residual attention blocks (``resblocks.k``) on ``(L, B, W)``."""

    def __init__(self, width: int, layers: int, heads: int):
        super().__init__()
        self.width = width
        self.layers = layers
        self.resblocks = nn.Sequential(*[ResidualAttentionBlock(width, heads) for _ in range(layers)])

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None,
                feats: dict[str, torch.Tensor] | None = None, prefix: str = "") -> torch.Tensor:
        for k, block in enumerate(self.resblocks):
            x = block(x, attn_mask)
            if feats is not None:
                feats[f"{prefix}resblocks.{k}"] = x.permute(1, 0, 2)  # stored batch first
        return x


def causal_mask(length: int, device: torch.device | None = None) -> torch.Tensor:
    """Additive ``(L, L)`` mask, ``-inf`` above the diagonal (a token sees itself and earlier ones)."""
    return torch.full((length, length), float("-inf"), device=device).triu_(1)


# --------------------------------------------------------------------------------------------
# ResNet tower
# --------------------------------------------------------------------------------------------
class Bottleneck(nn.Module):
    """CLIP bottleneck: 1x1 -> 3x3 -> (avgpool s) -> 1x1 x4, all stride 1; the shortcut is
    ``avgpool s -> 1x1 conv -> BN`` (keys ``downsample.0`` / ``downsample.1``; the pool is ``-1``)."""

    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.avgpool = nn.AvgPool2d(stride) if stride > 1 else nn.Identity()
        self.conv3 = nn.Conv2d(planes, planes * self.expansion, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.downsample: nn.Module | None = None
        if stride > 1 or inplanes != planes * self.expansion:
            self.downsample = nn.Sequential(OrderedDict([
                ("-1", nn.AvgPool2d(stride)),
                ("0", nn.Conv2d(inplanes, planes * self.expansion, 1, bias=False)),
                ("1", nn.BatchNorm2d(planes * self.expansion))]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(self.avgpool(out)))
        identity = x if self.downsample is None else self.downsample(x)
        return F.relu(out + identity)


class AttentionPool2d(nn.Module):
    """Multi-head attention of the mean token over the (mean + spatial) tokens.

    ``(B, C, H, W) -> (global (B, out), dense (B, out, H, W))``. The learned ``spacial_dim``²
    positional grid is resized bilinearly (align_corners=False) to ``H x W``, so any input size
    works; at the training size this is the identity.
    """

    def __init__(self, spacial_dim: int, embed_dim: int, num_heads: int, output_dim: int | None = None):
        super().__init__()
        self.positional_embedding = nn.Parameter(torch.randn(spacial_dim ** 2 + 1, embed_dim) / embed_dim ** 0.5)
        self.k_proj = nn.Linear(embed_dim, embed_dim)
        self.q_proj = nn.Linear(embed_dim, embed_dim)
        self.v_proj = nn.Linear(embed_dim, embed_dim)
        self.c_proj = nn.Linear(embed_dim, output_dim or embed_dim)
        self.num_heads = num_heads
        self.embed_dim = embed_dim
        self.spacial_dim = spacial_dim

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        b, c, h, w = x.shape
        tokens = x.flatten(2).permute(2, 0, 1)  # (HW, B, C)
        tokens = torch.cat([tokens.mean(dim=0, keepdim=True), tokens], dim=0)
        s = self.spacial_dim
        grid = self.positional_embedding[1:].reshape(1, s, s, c).permute(0, 3, 1, 2)
        grid = F.interpolate(grid, size=(h, w), mode="bilinear", align_corners=False)
        pos = torch.cat([self.positional_embedding[:1], grid.reshape(c, h * w).t()], dim=0)
        tokens = tokens + pos[:, None, :].to(tokens.dtype)
        out, _ = F.multi_head_attention_forward(
            query=tokens, key=tokens, value=tokens, embed_dim_to_check=c, num_heads=self.num_heads,
            q_proj_weight=self.q_proj.weight, k_proj_weight=self.k_proj.weight, v_proj_weight=self.v_proj.weight,
            in_proj_weight=None, in_proj_bias=torch.cat([self.q_proj.bias, self.k_proj.bias, self.v_proj.bias]),
            bias_k=None, bias_v=None, add_zero_attn=False, dropout_p=0.0, out_proj_weight=self.c_proj.weight,
            out_proj_bias=self.c_proj.bias, use_separate_proj_weight=True, training=self.training, need_weights=False)
        out = out.permute(1, 2, 0)  # (B, out, 1 + HW)
        return out[:, :, 0], out[:, :, 1:].reshape(b, -1, h, w)


class ModifiedResNet(nn.Module):
    """The CLIP ResNet (CLIP §2.4): 3-conv stem (3 -> w/2 -> w/2 -> w) + avgpool 2, four layers of
    `Bottleneck` (widths w, 2w, 4w, 8w; x4 expansion) and `AttentionPool2d`.

    ``stages(x (B, 3, H, W))`` -> ``[c1 (B, 4w, H/4, W/4), c2 (8w, /8), c3 (16w, /16), c4 (32w, /32)]``
    (sizes floor at every average pool). ``forward`` returns the attention-pool pair of ``c4``.
    """

    def __init__(self, layers: Sequence[int], output_dim: int, heads: int, input_resolution: int = 224,
                 width: int = 64):
        super().__init__()
        self.output_dim = output_dim
        self.input_resolution = input_resolution
        self.conv1 = nn.Conv2d(3, width // 2, kernel_size=3, stride=2, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width // 2)
        self.conv2 = nn.Conv2d(width // 2, width // 2, kernel_size=3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width // 2)
        self.conv3 = nn.Conv2d(width // 2, width, kernel_size=3, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(width)
        self.avgpool = nn.AvgPool2d(2)
        inplanes = width
        stage_layers = []
        for i, blocks in enumerate(layers):
            planes = width * 2 ** i
            mods = [Bottleneck(inplanes, planes, stride=1 if i == 0 else 2)]
            inplanes = planes * Bottleneck.expansion
            mods += [Bottleneck(inplanes, planes) for _ in range(1, blocks)]
            stage_layers.append(nn.Sequential(*mods))
        self.layer1, self.layer2, self.layer3, self.layer4 = stage_layers
        self.attnpool = AttentionPool2d(input_resolution // 32, width * 32, heads, output_dim)

    @property
    def stage_channels(self) -> list[int]:
        return [layer[0].bn3.num_features for layer in (self.layer1, self.layer2, self.layer3, self.layer4)]

    def stem(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.conv1.weight.dtype)
        for conv, bn in ((self.conv1, self.bn1), (self.conv2, self.bn2), (self.conv3, self.bn3)):
            x = F.relu(bn(conv(x)))
        return self.avgpool(x)

    def stages(self, x: torch.Tensor, feats: dict[str, torch.Tensor] | None = None,
               prefix: str = "visual.") -> list[torch.Tensor]:
        x = self.stem(x)
        outs = []
        for i, layer in enumerate((self.layer1, self.layer2, self.layer3, self.layer4), start=1):
            x = layer(x)
            outs.append(x)
            if feats is not None:
                feats[f"{prefix}layer{i}"] = x
        return outs

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.attnpool(self.stages(x)[3])


# --------------------------------------------------------------------------------------------
# ViT tower
# --------------------------------------------------------------------------------------------
class VisionTransformer(nn.Module):
    """The CLIP ViT: ``(B, 3, R, R) -> (B, output_dim)`` (patch conv, class token + learned
    positions, ``ln_pre``, transformer, ``ln_post`` of the class token, ``@ proj``). The input must
    be ``input_resolution`` square (the positions are not resized)."""

    def __init__(self, input_resolution: int, patch_size: int, width: int, layers: int, heads: int, output_dim: int):
        super().__init__()
        self.input_resolution = input_resolution
        self.output_dim = output_dim
        self.conv1 = nn.Conv2d(3, width, kernel_size=patch_size, stride=patch_size, bias=False)
        scale = width ** -0.5
        self.class_embedding = nn.Parameter(scale * torch.randn(width))
        self.positional_embedding = nn.Parameter(scale * torch.randn((input_resolution // patch_size) ** 2 + 1, width))
        self.ln_pre = LayerNorm(width)
        self.transformer = Transformer(width, layers, heads)
        self.ln_post = LayerNorm(width)
        self.proj = nn.Parameter(scale * torch.randn(width, output_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(x.to(self.conv1.weight.dtype))
        x = x.flatten(2).transpose(1, 2)  # (B, grid², W)
        if x.shape[1] + 1 != self.positional_embedding.shape[0]:
            raise ValueError(f"CLIP ViT expects {self.input_resolution}x{self.input_resolution} images, "
                             f"got a {x.shape[1]}-patch input")
        cls = self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], dim=1) + self.positional_embedding.to(x.dtype)
        x = self.ln_pre(x)
        x = self.transformer(x.permute(1, 0, 2)).permute(1, 0, 2)
        return self.ln_post(x[:, 0, :]) @ self.proj


# --------------------------------------------------------------------------------------------
# Both towers
# --------------------------------------------------------------------------------------------
class CLIP(nn.Module):
    """CLIP with OpenAI's state_dict layout, built from a plain config (see `clip_config`).

    Config keys: ``embed_dim``, ``image_resolution``, ``vision_layers`` (list: ResNet blocks per
    layer; int: ViT depth), ``vision_width``, ``vision_patch_size`` (None for a ResNet),
    ``vision_heads``, ``context_length`` (rows of ``positional_embedding``), ``vocab_size``,
    ``transformer_width`` / ``_heads`` / ``_layers``.
    """

    def __init__(self, config: Mapping[str, Any]):
        super().__init__()
        cfg = _complete(dict(config))
        self.config = cfg
        self.context_length = int(cfg["context_length"])
        if isinstance(cfg["vision_layers"], (list, tuple)):
            self.visual: nn.Module = ModifiedResNet(cfg["vision_layers"], cfg["embed_dim"], cfg["vision_heads"],
                                                    cfg["image_resolution"], cfg["vision_width"])
        else:
            self.visual = VisionTransformer(cfg["image_resolution"], cfg["vision_patch_size"], cfg["vision_width"],
                                            cfg["vision_layers"], cfg["vision_heads"], cfg["embed_dim"])
        width = cfg["transformer_width"]
        self.transformer = Transformer(width, cfg["transformer_layers"], cfg["transformer_heads"])
        self.vocab_size = int(cfg["vocab_size"])
        self.token_embedding = nn.Embedding(self.vocab_size, width)
        self.positional_embedding = nn.Parameter(torch.empty(self.context_length, width))
        self.ln_final = LayerNorm(width)
        self.text_projection = nn.Parameter(torch.empty(width, cfg["embed_dim"]))
        self.logit_scale = nn.Parameter(torch.ones([]) * math.log(1 / 0.07))
        self.initialize_parameters()

    def initialize_parameters(self) -> None:
        """CLIP's initialisation (normal token / position embeddings, scaled attention and MLP weights,
        zero-init of each bottleneck's last BN) — only matters when no weights are loaded."""
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.positional_embedding, std=0.01)
        if isinstance(self.visual, ModifiedResNet):
            pool = self.visual.attnpool
            std = pool.c_proj.in_features ** -0.5
            for lin in (pool.q_proj, pool.k_proj, pool.v_proj, pool.c_proj):
                nn.init.normal_(lin.weight, std=std)
            for layer in (self.visual.layer1, self.visual.layer2, self.visual.layer3, self.visual.layer4):
                for name, param in layer.named_parameters():
                    if name.endswith("bn3.weight"):
                        nn.init.zeros_(param)
        t = self.transformer
        proj_std = (t.width ** -0.5) * ((2 * t.layers) ** -0.5)
        for block in t.resblocks:
            nn.init.normal_(block.attn.in_proj_weight, std=t.width ** -0.5)
            nn.init.normal_(block.attn.out_proj.weight, std=proj_std)
            nn.init.normal_(block.mlp.c_fc.weight, std=(2 * t.width) ** -0.5)
            nn.init.normal_(block.mlp.c_proj.weight, std=proj_std)
        nn.init.normal_(self.text_projection, std=t.width ** -0.5)

    @property
    def dtype(self) -> torch.dtype:
        return self.visual.conv1.weight.dtype

    def encode_text(self, text: torch.Tensor, feats: dict[str, torch.Tensor] | None = None,
                    prefix: str = "") -> tuple[torch.Tensor, torch.Tensor]:
        """``text (B, T)`` ids -> ``(tokens (B, T, W) after ln_final, sentence (B, E))``.

        ``T`` may be any length up to ``context_length``; the causal mask is built for ``T`` (the
        same values as slicing the 77x77 mask). The sentence embedding is the state at
        ``text.argmax(-1)`` (the end token, or position 0 for a sentence truncated before it).
        """
        if text.dim() != 2:
            raise ValueError(f"CLIP text must be (B, T) token ids, got shape {tuple(text.shape)}")
        b, t = text.shape
        if t > self.context_length:
            raise ValueError(f"CLIP text has {t} tokens, more than the {self.context_length} positions of the model")
        x = self.token_embedding(text.long()).to(self.dtype)
        if feats is not None:
            feats[prefix + "token_embedding"] = x
        x = x + self.positional_embedding.to(self.dtype)[:t]
        x = self.transformer(x.permute(1, 0, 2), causal_mask(t, x.device), feats, prefix + "transformer.")
        x = self.ln_final(x.permute(1, 0, 2)).to(self.dtype)
        if feats is not None:
            feats[prefix + "ln_final"] = x
        sentence = x[torch.arange(b, device=x.device), text.argmax(dim=-1)] @ self.text_projection
        if feats is not None:
            feats[prefix + "encode_text.sentence_embedding"] = sentence
        return x, sentence

    def encode_image(self, image: torch.Tensor) -> torch.Tensor:
        """The image embedding ``(B, E)``: the ViT output, or the ResNet's attention-pooled vector."""
        out = self.visual(image.to(self.dtype))
        return out[0] if isinstance(out, tuple) else out

    def forward(self, image: torch.Tensor, text: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """CLIP's scaled cosine logits ``(per_image (B_i, B_t), per_text (B_t, B_i))``."""
        img = F.normalize(self.encode_image(image), dim=-1)
        txt = F.normalize(self.encode_text(text)[1], dim=-1)
        logits = self.logit_scale.exp() * img @ txt.t()
        return logits, logits.t()


# --------------------------------------------------------------------------------------------
# Weights from local files
# --------------------------------------------------------------------------------------------
def is_torchscript_archive(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a TorchScript archive (a zip with ``code/`` or ``constants.pkl``) rather
    than a ``torch.save`` file (a zip with only ``data.pkl`` and tensor records, or a legacy pickle)."""
    try:
        with zipfile.ZipFile(path) as zf:
            names = zf.namelist()
    except (zipfile.BadZipFile, OSError):
        return False
    return any(n.endswith("/constants.pkl") or "/code/" in n for n in names)


def _clean_clip_state(sd: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    out = {}
    for k, v in sd.items():
        if k in CLIP_METADATA_KEYS or k.endswith("attn_mask"):  # metadata / derived buffers
            continue
        out[k] = v.float() if torch.is_tensor(v) and v.is_floating_point() else v
    return out


def load_clip_state_dict(path: str | os.PathLike, allow_torchscript: bool = False) -> dict[str, torch.Tensor]:
    """The CLIP state_dict of a local file (OpenAI key names), floating tensors as float32.

    Plain state_dicts and checkpoint dicts (open_clip's ``{'state_dict': ...}``, ``module.``
    prefixes) go through the weights-only loader. A TorchScript archive (OpenAI's ``RN50.pt``) is
    code: it is refused with one line unless ``allow_torchscript=True``.
    """
    p = Path(path)
    if not p.is_file():
        raise CheckpointError(f"CLIP weights not found: {p}")
    if is_torchscript_archive(p):
        if not allow_torchscript:
            raise CheckpointError(
                f"{p}: is a TorchScript archive (code that runs when loaded, e.g. OpenAI's RN50.pt); refused. "
                "Opt in with allow_torchscript=True if you trust the file, or convert it once to a plain "
                "state_dict (torch.save(torch.jit.load(f).state_dict(), out))")
        try:
            sd = torch.jit.load(str(p), map_location="cpu").state_dict()
        except RuntimeError as exc:
            raise CheckpointError(f"{p}: cannot load the TorchScript archive ({str(exc).splitlines()[0]})") from None
    else:
        ckpt = safe_torch_load(p)
        if not isinstance(ckpt, Mapping):
            raise CheckpointError(f"{p}: expected a state_dict or a checkpoint dict, got {type(ckpt).__name__}")
        sd = extract_state_dict(ckpt)
    sd = _clean_clip_state(sd)
    if "token_embedding.weight" not in sd or "visual.conv1.weight" not in sd:
        raise CheckpointError(f"{p}: not a CLIP state_dict with OpenAI key names "
                              "(no token_embedding.weight / visual.conv1.weight)")
    return sd


def clip_config_from_state_dict(sd: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    """The `CLIP` config whose parameters have exactly the shapes of ``sd``."""
    def blocks(prefix: str) -> int:
        return len({k[len(prefix):].split(".")[0] for k in sd if k.startswith(prefix)})

    if "visual.proj" in sd:
        width = sd["visual.conv1.weight"].shape[0]
        patch = sd["visual.conv1.weight"].shape[-1]
        grid = round((sd["visual.positional_embedding"].shape[0] - 1) ** 0.5)
        vision = dict(vision_layers=blocks("visual.transformer.resblocks."), vision_width=width,
                      vision_patch_size=patch, image_resolution=patch * grid, vision_heads=width // 64)
    else:
        width = sd["visual.layer1.0.conv1.weight"].shape[0]
        grid = round((sd["visual.attnpool.positional_embedding"].shape[0] - 1) ** 0.5)
        vision = dict(vision_layers=[blocks(f"visual.layer{i}.") for i in range(1, 5)], vision_width=width,
                      vision_patch_size=None, image_resolution=32 * grid, vision_heads=width * 32 // 64)
    text_width = sd["ln_final.weight"].shape[0]
    return dict(embed_dim=sd["text_projection"].shape[1], **vision,
                context_length=sd["positional_embedding"].shape[0], vocab_size=sd["token_embedding.weight"].shape[0],
                transformer_width=text_width, transformer_heads=max(1, text_width // 64),
                transformer_layers=blocks("transformer.resblocks."))


def load_clip_weights(model: CLIP, path: str | os.PathLike, allow_torchscript: bool = False,
                      strict: bool = True) -> LoadReport:
    """Load a local CLIP file into ``model`` (strict by default: every key, every shape)."""
    return load_model_state(model, load_clip_state_dict(path, allow_torchscript), strict=strict)


# --------------------------------------------------------------------------------------------
# A frozen CLIP (a fixed scorer)
# --------------------------------------------------------------------------------------------
class FrozenCLIP(CLIP):
    """`CLIP` whose parameters never receive gradients and which stays in eval mode whatever
    ``train()`` is asked (its forward has no dropout or BatchNorm, but a fixed scorer must not
    change behaviour with its owner's mode). Gradients flow through it into its inputs."""

    def __init__(self, config: Mapping[str, Any]):
        super().__init__(config)
        self.requires_grad_(False)
        super().train(False)

    def train(self, mode: bool = True) -> "FrozenCLIP":
        return super().train(False)


def load_frozen_clip(path: str | os.PathLike, allow_torchscript: bool = False) -> FrozenCLIP:
    """A `FrozenCLIP` with the architecture and the weights of a local CLIP file (strict load, float32)."""
    sd = load_clip_state_dict(path, allow_torchscript=allow_torchscript)
    model = FrozenCLIP(clip_config_from_state_dict(sd))
    load_model_state(model, sd, strict=True)
    return model
