"""Model registry: name -> the model's `ModelSpec` (declared at the end of its own file).

    cfg = model_config('fianet', swin_type='base', pretrained_swin='.../swin_base_patch4_window12_384_22k.pth',
                       num_tmem=3)
    model = build_model(cfg)            # random init (reference init rule), model.config = cfg
    spec = model_spec('fianet')         # recipe, loss owner, SyncBN, validation protocol, inputs, text side

A config is a plain, JSON-serialisable dict holding everything needed to rebuild the model (it is
stored in our checkpoints). Model modules are imported lazily, so a half-written model cannot
break the others. Adding a model is one file in ``lib/`` ending in a ``SPEC`` and one line here.
"""
from __future__ import annotations

import copy
import importlib
from typing import Any, Mapping

from torch import nn

from lib.spec import ModelSpec
from lib.swin import SWIN_DEFAULTS, SWIN_TYPES  # noqa: F401  (re-exported: the Swin size table)


class UnknownModelError(ValueError):
    """A model name that is not registered."""


# name -> "module:SPEC attribute"; one line per model.
_MODELS: dict[str, str] = {
    "lavt": "lib.lavt:LAVT_SPEC",
    "lavt_one": "lib.lavt:LAVT_ONE_SPEC",
    "fianet": "lib.fianet:SPEC",
    "rmsin": "lib.rmsin:SPEC",
    "crossvlt": "lib.crossvlt:SPEC",
    "lgformer": "lib.lgformer:SPEC",
    "tris_stage1": "lib.tris:SPEC_STAGE1",
    "tris_stage2": "lib.tris:SPEC_STAGE2",
}


def register_model(name: str, spec: str | ModelSpec) -> None:
    """Add a model: ``'module:ATTRIBUTE'`` of its spec, or the `ModelSpec` itself."""
    _MODELS[name] = spec  # type: ignore[assignment]


def available_models() -> list[str]:
    return list(_MODELS)


def _load(target: str) -> Any:
    module, _, attr = target.partition(":")
    return getattr(importlib.import_module(module), attr)


def model_spec(name: str) -> ModelSpec:
    """The `ModelSpec` of a registered model (imports its module)."""
    if name not in _MODELS:
        raise UnknownModelError(f"unknown model {name!r}; valid names: {', '.join(available_models())}")
    entry = _MODELS[name]
    return entry if isinstance(entry, ModelSpec) else _load(entry)


def model_config(name: str, **options: Any) -> dict[str, Any]:
    """Full, JSON-serialisable config of model ``name`` (the reference builder's defaults, changed
    by ``options``: swin_type, window_size, pretrained_swin, img_size, mha, fusion_drop, bert,
    swin_overrides, the model's own options, ...)."""
    return model_spec(name).build_config(name, **options)


def tiny_model_config(name: str, **options: Any) -> dict[str, Any]:
    """`model_config` of a seconds-on-a-CPU variant (the spec's ``tiny`` options; keywords override)."""
    spec = model_spec(name)
    return spec.build_config(name, **{**copy.deepcopy(dict(spec.tiny)), **options})


def build_model(config: Mapping[str, Any]) -> nn.Module:
    """Build a model from its config (random init following the reference rule); ``model.config``
    and ``model.spec`` are set."""
    config = copy.deepcopy(dict(config))
    if "model" not in config:
        raise ValueError("model config has no 'model' entry")
    spec = model_spec(config["model"])
    model = _load(spec.target)(config)
    model.config = config
    model.spec = spec
    return model


def fixture_model_name(fixture_config: Mapping[str, Any]) -> str:
    """Our registry name for a fixture: LAVT fixtures use their variant (``lavt`` / ``lavt_one``)."""
    model = str(fixture_config.get("model", ""))
    if model == "lavt":
        return str(fixture_config.get("variant") or "lavt_one")
    return model


def config_from_fixture(fixture_config: Mapping[str, Any]) -> dict[str, Any]:
    """Convert a reference fixture's ``config`` into ours (the model's spec knows its schema)."""
    name = fixture_model_name(fixture_config)
    spec = model_spec(name)
    if spec.config_from_fixture is None:
        raise ValueError(f"model {name!r} has no fixture conversion")
    return spec.config_from_fixture(fixture_config)
