"""Model registry: name -> plain config dict -> model.

    cfg = model_config('fianet', swin_type='base', pretrained_swin='.../swin_base_patch4_window12_384_22k.pth',
                       num_tmem=3)
    model = build_model(cfg)            # random init (reference init rule), model.config = cfg

A config is a plain, JSON-serialisable dict holding everything needed to rebuild the model (it is
stored in our checkpoints). Models are imported lazily, so a half-written model module cannot break
the others. New models register with `register_model`.
"""
from __future__ import annotations

import copy
import importlib
import json
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

from torch import nn

from bert.text_encoder import bert_config_dict


class UnknownModelError(ValueError):
    """A model name that is not registered."""


# lavt.md §2.1
SWIN_TYPES: dict[str, dict[str, Any]] = {
    "tiny": {"embed_dim": 96, "depths": [2, 2, 6, 2], "num_heads": [3, 6, 12, 24]},
    "small": {"embed_dim": 96, "depths": [2, 2, 18, 2], "num_heads": [3, 6, 12, 24]},
    "base": {"embed_dim": 128, "depths": [2, 2, 18, 2], "num_heads": [4, 8, 16, 32]},
    "large": {"embed_dim": 192, "depths": [2, 2, 18, 2], "num_heads": [6, 12, 24, 48]},
}

# Fixed Swin hyper-parameters of the LAVT builder (lavt.md §2.2).
SWIN_DEFAULTS: dict[str, Any] = {
    "mlp_ratio": 4.0, "qkv_bias": True, "qk_scale": None, "drop_rate": 0.0, "attn_drop_rate": 0.0,
    "drop_path_rate": 0.3, "patch_size": 4, "in_chans": 3, "patch_norm": True,
}

# Extra keyword arguments of `model_config` that become top-level config entries.
_EXTRA_DEFAULTS: dict[str, Any] = {
    "fused_attn": True,       # window attention through SDPA (fast path; fixtures pass with it)
    "batched_text": True,     # FIANet: three BERT passes as one batched call
    "grad_ckpt": False,       # activation checkpointing of the Swin blocks
    "bert_pretrained": "",    # local folder with BERT weights, loaded by build_model(load_pretrained=True)
}


@dataclass(frozen=True)
class ModelSpec:
    """How to build one registered model.

    ``target`` is ``'module:Class'`` (imported lazily); ``configure(cfg, extra)`` adds the
    model-specific entries to a config; ``from_fixture(fixture_cfg, cfg)`` completes a config
    converted from a reference fixture.
    """

    target: str
    configure: Callable[[dict, dict], None] | None = None
    from_fixture: Callable[[Mapping, dict], None] | None = None
    extras: tuple[str, ...] = field(default_factory=tuple)
    # Converts a fixture whose config has a schema of its own (CrossVLT) straight into our config.
    fixture_schema: Callable[[Mapping], dict] | None = None


def _configure_fianet(cfg: dict, extra: dict) -> None:
    num_tmem = int(extra.get("num_tmem", 1))
    if num_tmem < 1:
        raise ValueError(f"num_tmem must be >= 1, got {num_tmem}")
    cfg["num_tmem"] = num_tmem
    e = cfg["swin"]["embed_dim"]
    cfg["tmem"] = {"channels": [e * 2 ** i for i in range(len(cfg["swin"]["depths"]))], "mlp_ratio": 2}


def _fianet_from_fixture(fx: Mapping, cfg: dict) -> None:
    tmem = fx.get("tmem", {})
    if "channels" in tmem:
        cfg["tmem"]["channels"] = [int(c) for c in tmem["channels"]]
    cfg["num_tmem"] = int(fx.get("num_tmem", tmem.get("num_blocks", cfg["num_tmem"])))


def _configure_rmsin(cfg: dict, extra: dict) -> None:
    # CIM over the stage widths; the attention head layout is fixed in the original (rmsin.md §3.3).
    # Grid and token counts are derived from cfg["img_size"] in lib.rmsin.
    e = cfg["swin"]["embed_dim"]
    cfg["cim"] = {"channels": [e * 2 ** i for i in range(len(cfg["swin"]["depths"]))], "num_blocks": 1,
                  "mlp_ratio": 2, "key_dim": 32, "num_heads": 8, "attn_ratio": 2}
    cfg["arc"] = {"kernel_number": 1}


def _rmsin_from_fixture(fx: Mapping, cfg: dict) -> None:
    cim = fx.get("cim", {})
    if "channels" in cim:
        cfg["cim"]["channels"] = [int(c) for c in cim["channels"]]
    cfg["cim"]["num_blocks"] = int(cim.get("num_layers", cfg["cim"]["num_blocks"]))
    csa = cim.get("CrossScaleAttention", {})
    for key in ("key_dim", "num_heads", "attn_ratio"):
        if key in csa:
            cfg["cim"][key] = int(csa[key])
    size = fx.get("img_size")
    if isinstance(size, (list, tuple)) and len(size) == 2 and int(size[0]) != int(size[1]):
        cfg["img_size"] = [int(size[0]), int(size[1])]


def _configure_crossvlt(cfg: dict, extra: dict) -> None:
    """crossvlt.md §2.1: language stages of 6 + 1 + 1 + 1 BERT layers sharing one BERT config."""
    layers = [int(n) for n in extra.get("bert_layers_per_stage", (6, 1, 1, 1))]
    if len(layers) != 4 or min(layers) < 0:
        raise ValueError(f"bert_layers_per_stage needs 4 non-negative layer counts, got {layers}")
    cfg["bert_layers_per_stage"] = layers
    cfg["bert_stage_configs"] = [dict(cfg["bert"], num_hidden_layers=n) for n in layers]
    cfg["alignment"] = {"learnable_temperature": bool(extra.get("learnable_temperature", False)),
                        "weights": [1.0, 1.0, 1.0, 1.0]}
    cfg["init_lang_from_bert"] = bool(extra.get("init_lang_from_bert", False))


def _crossvlt_config_from_fixture(fx: Mapping) -> dict:
    """CrossVLT fixtures (fixtures/README.md): ``segmodel_kwargs`` / ``swin`` sizes, four
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
    cfg = model_config("crossvlt", window_size=int(kw["window_size"]), bert=stage_cfgs[0], swin_overrides=overrides,
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


_MODELS: dict[str, ModelSpec] = {
    "lavt": ModelSpec("lib.lavt:LAVT"),
    "lavt_one": ModelSpec("lib.lavt:LAVTOne"),
    "fianet": ModelSpec("lib.fianet:FIANet", _configure_fianet, _fianet_from_fixture, ("num_tmem",)),
    "crossvlt": ModelSpec("lib.crossvlt:CrossVLT", _configure_crossvlt,
                          extras=("bert_layers_per_stage", "learnable_temperature", "init_lang_from_bert"),
                          fixture_schema=_crossvlt_config_from_fixture),
    "rmsin": ModelSpec("lib.rmsin:RMSIN", _configure_rmsin, _rmsin_from_fixture),
}


def register_model(name: str, spec: ModelSpec) -> None:
    """Add a model (e.g. from its own module) to the registry."""
    _MODELS[name] = spec


def available_models() -> list[str]:
    return list(_MODELS)


def _spec(name: str) -> ModelSpec:
    if name not in _MODELS:
        raise UnknownModelError(f"unknown model {name!r}; valid names: {', '.join(available_models())}")
    return _MODELS[name]


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


def model_config(name: str, *, swin_type: str = "base", window_size: int | None = None, pretrained_swin: str = "",
                 img_size: int = 480, mha: str = "", fusion_drop: float = 0.0, num_tmem: int = 1,
                 bert: Mapping[str, Any] | str = "bert-base-uncased-config-or-folder",
                 swin_overrides: Mapping[str, Any] | None = None, **extra: Any) -> dict[str, Any]:
    """Full, JSON-serialisable config of model ``name`` with the reference builder's defaults.

    ``window_size``: explicit value, else 12 when 'window12' occurs in ``pretrained_swin`` (the
    reference rule), else 7. ``swin_overrides`` replaces entries of the Swin table (e.g. tiny
    widths for tests). ``bert``: BertConfig dict, 'bert-base-uncased', or a local folder.
    Extra keywords: ``fused_attn``, ``batched_text``, ``grad_ckpt``, ``bert_pretrained``.
    """
    spec = _spec(name)
    if swin_type not in SWIN_TYPES:
        raise ValueError(f"--swin_type must be one of {', '.join(SWIN_TYPES)}, got {swin_type!r}")
    swin = {**copy.deepcopy(SWIN_TYPES[swin_type]), **SWIN_DEFAULTS}
    for key, value in (swin_overrides or {}).items():
        if key not in swin and key != "window_size":
            raise ValueError(f"unknown Swin override {key!r}; valid: {', '.join(sorted(swin))}")
        swin[key] = list(value) if isinstance(value, tuple) else value
    if window_size is None:
        window_size = swin.get("window_size") or (12 if "window12" in str(pretrained_swin) else 7)
    swin["window_size"] = int(window_size)
    n = len(swin["depths"])
    if n != 4 or len(swin["num_heads"]) != 4:
        raise ValueError(f"the LAVT family needs 4 Swin stages, got depths {swin['depths']}, heads {swin['num_heads']}")
    bert_cfg = bert_config_dict(bert)
    unknown = set(extra) - set(_EXTRA_DEFAULTS) - set(spec.extras)
    if unknown:
        raise ValueError(f"unknown option(s) for model {name!r}: {', '.join(sorted(unknown))}")
    e = swin["embed_dim"]
    customised = any(swin[k] != SWIN_TYPES[swin_type][k] for k in ("embed_dim", "depths", "num_heads"))
    cfg: dict[str, Any] = {
        "model": name,
        "swin_type": "custom" if customised else swin_type,
        "swin": swin,
        "pretrained_swin": str(pretrained_swin or ""),
        "img_size": int(img_size),
        "fusion": {"num_heads": _parse_mha(mha, n), "dropout": float(fusion_drop)},
        "l_in": int(bert_cfg["hidden_size"]),
        "decoder": {"c4_dims": 8 * e, "factor": 2},
        "bert": bert_cfg,
    }
    for key, default in _EXTRA_DEFAULTS.items():
        cfg[key] = extra.get(key, default)
    if spec.configure is not None:
        spec.configure(cfg, {"num_tmem": num_tmem, **extra})
    json.dumps(cfg)  # must stay plain data
    return cfg


def _load_target(target: str) -> type[nn.Module]:
    module, _, cls = target.partition(":")
    return getattr(importlib.import_module(module), cls)


def model_class(name: str) -> type[nn.Module]:
    """The class of a registered model (imported on demand; nothing is built)."""
    return _load_target(_spec(name).target)


def build_model(config: Mapping[str, Any], *, load_pretrained: bool = False) -> nn.Module:
    """Build a model from its config (random init following the reference rule).

    With ``load_pretrained``, also load ``config['pretrained_swin']`` (official Swin ImageNet file,
    non-strict with a printed report) and ``config['bert_pretrained']`` (local BERT folder).
    """
    config = copy.deepcopy(dict(config))
    model = _load_target(_spec(config["model"]).target)(config)
    model.config = config
    if load_pretrained:
        from lib.checkpoint import load_pretrained_bert, load_pretrained_swin  # lazy: checkpoint imports the registry

        if config.get("pretrained_swin"):
            print(load_pretrained_swin(model, config["pretrained_swin"]))
        if config.get("bert_pretrained"):
            load_pretrained_bert(model, config["bert_pretrained"])
    return model


def fixture_model_name(fixture_config: Mapping[str, Any]) -> str:
    """Our registry name for a fixture: LAVT fixtures use their variant (``lavt`` / ``lavt_one``)."""
    model = str(fixture_config.get("model", ""))
    if model == "lavt":
        return str(fixture_config.get("variant") or "lavt_one")
    return model


def config_from_fixture(fixture_config: Mapping[str, Any]) -> dict[str, Any]:
    """Convert a reference fixture's ``config`` (LAVT-builder schema, fixtures/README.md) into ours."""
    name = fixture_model_name(fixture_config)
    spec = _spec(name)
    if spec.fixture_schema is not None:
        return spec.fixture_schema(fixture_config)
    fs = fixture_config["swin"]
    if fs.get("ape"):
        raise ValueError("fixture uses an absolute position embedding (ape=True), which the LAVT family never does")
    overrides = {k: fs[k] for k in ("embed_dim", "depths", "num_heads", *SWIN_DEFAULTS) if k in fs}
    fusion = fixture_config.get("fusion", {})
    heads = fusion.get("num_heads_fusion") or fixture_config.get("builder_args", {}).get("mha", "")
    extra = {"num_tmem": int(fixture_config["num_tmem"])} if "num_tmem" in spec.extras and "num_tmem" in fixture_config else {}
    cfg = model_config(name, window_size=int(fs["window_size"]), mha=heads,
                       fusion_drop=float(fusion.get("fusion_drop", 0.0)), bert=dict(fixture_config["bert"]),
                       swin_overrides=overrides, img_size=int(fixture_config.get("img_size", [480])[0]), **extra)
    l_in = fusion.get("l_in_channels")
    if l_in is not None and int(l_in) != cfg["l_in"]:
        raise ValueError(f"fixture fusion l_in_channels {l_in} != BERT hidden size {cfg['l_in']}")
    dec = fixture_config.get("decoder", {})
    if "c4_dims" in dec:
        cfg["decoder"] = {"c4_dims": int(dec["c4_dims"]), "factor": int(dec.get("factor", 2))}
    if spec.from_fixture is not None:
        spec.from_fixture(fixture_config, cfg)
    return cfg


# A deliberately tiny BERT for tests, quick starts and the `--setting tiny` benchmark.
TINY_BERT: dict[str, Any] = {
    "vocab_size": 128, "hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
    "intermediate_size": 64, "max_position_embeddings": 64, "type_vocab_size": 2,
}


def tiny_model_config(name: str, **kwargs: Any) -> dict[str, Any]:
    """`model_config` with tiny widths (Swin embed 16, depths 2-2-2-2, heads 1-2-4-8, window 7) and a
    one-layer 32-wide BERT: seconds on a CPU. Keywords override `model_config` arguments."""
    kwargs.setdefault("swin_overrides", {"embed_dim": 16, "depths": [2, 2, 2, 2], "num_heads": [1, 2, 4, 8]})
    kwargs.setdefault("bert", TINY_BERT)
    kwargs.setdefault("window_size", 7)
    return model_config(name, **kwargs)
