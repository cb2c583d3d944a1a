#!/usr/bin/env python
"""Check our models against the reference fixtures (numbers produced by the original code).

    python tools/check_reference.py FIXTURE.pt [FIXTURE2.pt ...] [--plain-attention] [--threads N]

For each fixture: build the model from the fixture's ``config`` (lib.registry.config_from_fixture),
load its ``state_dict`` STRICTLY through lib.checkpoint (LAVT: also as the two-part ``lavt``
checkpoint described by ``lavt_variant['key_mapping']``), run ``inputs`` in eval / no_grad / float32
and print the max abs difference of the outputs (a tensor, a list of maps, a dict) and of every
stored feature next to its tolerance; a fixture holding several networks (TRIS: ``stage1`` /
``stage2``) is checked per network, training-mode outputs (``outputs_train``) on a freshly loaded
model in train mode under no_grad. The LGFormer / TRIS files store their weights as a recipe:
expand them first with ``expand_fixture.py``.
The last line is one summary. Exit 0 when every logit difference is <= the fixture's output
tolerance (1e-4) and every compared feature is within ``tolerance['features'][name]``; 1 on a
mismatch; 2 when a fixture cannot be used (unreadable, unknown model).
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from lib.checkpoint import CheckpointError, extract_state_dict, load_model_state, safe_torch_load, split_lavt_checkpoint
from lib.registry import UnknownModelError, build_model, config_from_fixture

DEFAULT_LOGIT_TOL = 1e-4


class FixtureError(ValueError):
    """A fixture that cannot be checked (exit code 2)."""


@dataclass
class Row:
    name: str
    diff: float | None  # None: tensor not produced by our model / shape differs
    tol: float
    note: str = ""

    @property
    def ok(self) -> bool:
        return self.diff is not None and self.diff <= self.tol


@dataclass
class FixtureResult:
    path: str
    model: str
    logits: list[Row] = field(default_factory=list)
    features: list[Row] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return bool(self.logits) and all(r.ok for r in self.logits) and all(r.ok for r in self.features)


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.detach().float() - b.float()).abs().max().item()


def flatten_features(feats: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """``{'backbone.output': [t0, t1]}`` -> ``{'backbone.output[0]': t0, ...}``."""
    out = {}
    for k, v in feats.items():
        if isinstance(v, (list, tuple)):
            out.update({f"{k}[{i}]": t for i, t in enumerate(v)})
        else:
            out[k] = v
    return out


def _forward_args(model: torch.nn.Module, inputs: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The fixture inputs the model's forward takes (its spec's ``inputs``), images in float32."""
    keys = model.spec.inputs
    missing = [k for k in keys if k not in inputs]
    if missing:
        raise FixtureError(f"the model's forward takes {', '.join(missing)}, which the fixture inputs lack")
    return {k: inputs[k].float() if k == "image" else inputs[k] for k in keys}


def _run(model: torch.nn.Module, kwargs: dict[str, torch.Tensor]):
    model.eval()
    with torch.no_grad():
        return model(**kwargs, return_features=True)


def _compare(name: str, ours: Any, ref: Any, tol: Any) -> list[Row]:
    """Rows comparing an output structure (tensor, list of tensors, dict of tensors) with the
    reference's; ``tol`` is a number or the same structure of numbers. Reference entries named
    ``loss*`` are loss values, not outputs (the model's ``loss`` is tested separately)."""
    if torch.is_tensor(ref):
        t = float(tol) if isinstance(tol, (int, float)) else DEFAULT_LOGIT_TOL
        if not torch.is_tensor(ours):
            return [Row(name, None, t, "not produced by our model")]
        if tuple(ours.shape) != tuple(ref.shape):
            return [Row(name, None, t, f"shape {list(ours.shape)} vs reference {list(ref.shape)}")]
        return [Row(name, _max_diff(ours, ref), t)]
    if isinstance(ref, (list, tuple)):
        if not isinstance(ours, (list, tuple)) or len(ours) != len(ref):
            return [Row(name, None, DEFAULT_LOGIT_TOL, f"{len(ref)} maps in the reference, ours differ")]
        tols = tol if isinstance(tol, (list, tuple)) else [tol] * len(ref)
        return [row for i, (o, r, t) in enumerate(zip(ours, ref, tols)) for row in _compare(f"{name}[{i}]", o, r, t)]
    if isinstance(ref, Mapping):
        if isinstance(ours, (list, tuple)) and "logits" in ref:  # a list of maps stored as {'logits': [...]}
            return _compare(f"{name}.logits", ours, ref["logits"], tol.get("logits", tol) if isinstance(tol, Mapping) else tol)
        rows = []
        for k, r in ref.items():
            if str(k).startswith("loss"):
                continue
            t = tol.get(k, DEFAULT_LOGIT_TOL) if isinstance(tol, Mapping) else tol
            mine = ours.get(k) if isinstance(ours, Mapping) else None
            rows += _compare(f"{name}.{k}", mine, r, t)
        return rows
    return []


def _stage_views(fx: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    """A fixture holding several networks (``config['stages']``, e.g. TRIS) as one fixture per
    network, named ``<model>_<stage>`` in the registry; other fixtures as they are."""
    stages = fx["config"].get("stages")
    if not stages:
        return [fx]
    views = []
    for stage in stages:
        view = {k: (v[stage] if isinstance(v, Mapping) and stage in v else v) for k, v in fx.items()
                if k not in ("config", "tolerance", "inputs")}
        view["config"] = dict(fx["config"], model=f"{fx['config']['model']}_{stage}")
        view["inputs"] = fx["inputs"]
        view["tolerance"] = {k: (v[stage] if isinstance(v, Mapping) and stage in v else v)
                             for k, v in fx.get("tolerance", {}).items()}
        views.append(view)
    return views


def _build_loaded(fx: Mapping[str, Any], cfg: dict[str, Any]) -> torch.nn.Module:
    model = build_model(cfg)
    load_model_state(model, extract_state_dict(fx["state_dict"]), strict=True)
    return model


def check_fixture(path: str | Path, *, fused_attention: bool = True,
                  print_fn: Callable[[str], None] = print) -> list[FixtureResult]:
    """Check one fixture file (one result per network it holds); prints one line per compared
    tensor. Raises `FixtureError` if unusable."""
    path = Path(path)
    try:
        fx = safe_torch_load(path)
    except CheckpointError as exc:
        raise FixtureError(str(exc)) from None
    if not isinstance(fx, Mapping) or not {"config", "state_dict", "inputs", "outputs"} <= set(fx):
        raise FixtureError(f"{path}: not a reference fixture (needs config, state_dict, inputs, outputs)")
    if "weights_recipe" in fx:
        raise FixtureError(f"{path}: compact fixture (weights stored as a recipe); expand it first with "
                           f"expand_fixture.py IN OUT")
    return [_check_view(path, view, fused_attention, print_fn) for view in _stage_views(fx)]


def _check_view(path: Path, fx: Mapping[str, Any], fused_attention: bool, print_fn: Callable[[str], None]) -> FixtureResult:
    try:
        cfg = config_from_fixture(fx["config"])
    except UnknownModelError as exc:
        raise FixtureError(f"{path}: {exc}") from None
    except (KeyError, TypeError, ValueError) as exc:
        raise FixtureError(f"{path}: cannot convert the fixture config: {exc}") from None
    cfg["fused_attn"] = fused_attention
    try:
        model = _build_loaded(fx, cfg)
    except CheckpointError as exc:
        raise FixtureError(f"{path}: {str(exc).splitlines()[0]}") from None

    tol = fx.get("tolerance", {})
    logit_tol = tol.get("outputs", DEFAULT_LOGIT_TOL)
    feat_tol = tol.get("features", {})
    result = FixtureResult(str(path), cfg["model"])
    swin = cfg.get("swin")
    sizes = f" (swin {swin['embed_dim']}/{swin['depths']}/window {swin['window_size']})" if swin else ""
    print_fn(f"== {path.name}: model {cfg['model']}{sizes}, strict load OK, fast paths {'on' if fused_attention else 'off'}")

    args = _forward_args(model, fx["inputs"])
    logits, feats = _run(model, args)
    result.logits += _compare("outputs", logits, fx["outputs"], logit_tol)

    variant = fx.get("lavt_variant")
    if isinstance(variant, Mapping):
        # The same weights as an official two-part `lavt` checkpoint ({'model', 'bert_model'}, split
        # as key_mapping describes), loaded into the `lavt` variant by the same loader.
        model2 = build_model(dict(cfg, model="lavt"))
        two_part = split_lavt_checkpoint(fx["state_dict"], str(variant.get("bert_prefix", "text_encoder.")))
        load_model_state(model2, extract_state_dict(two_part), strict=True)
        logits2, _ = _run(model2, args)
        ref2 = fx["outputs"]
        if str(variant.get("outputs_variant", "lavt_one")) != "lavt":  # logits stored for the other variant?
            other = variant.get("other_variant_outputs", fx.get("other_variant_outputs"))
            ref2 = other if torch.is_tensor(other) else ref2
        result.logits += _compare("outputs (lavt, two-part checkpoint)", logits2, ref2, logit_tol)

    def features(ours_raw: Mapping[str, Any], refs: Mapping[str, Any], tols: Mapping[str, Any], suffix: str) -> None:
        ours = flatten_features(ours_raw)
        for name, ref in flatten_features(refs).items():
            result.features += _compare(name + suffix, ours.get(name), ref, float(tols.get(name, DEFAULT_LOGIT_TOL)))

    features(feats, fx.get("features", {}), feat_tol, "")
    if "outputs_train" in fx:
        # Training-mode forward (BatchNorm on batch statistics) under no_grad, on a freshly loaded
        # model so the eval numbers above are not affected by updated running statistics.
        fresh = _build_loaded(fx, cfg).train()
        with torch.no_grad():
            out_t, feats_t = fresh(**args, return_features=True)
        result.logits += _compare("outputs_train", out_t, fx["outputs_train"], tol.get("outputs_train", logit_tol))
        features(feats_t, fx.get("features_train", {}) or {}, tol.get("features_train", {}) or {}, " (train)")

    for row in result.logits + result.features:
        diff = "   n/a   " if row.diff is None else f"{row.diff:.3e}"
        print_fn(f"  {'ok  ' if row.ok else 'FAIL'} {row.name:<48} max|d| {diff}  tol {row.tol:.3e} {row.note}")
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("fixtures", nargs="+", help="reference fixture files (*.pt)")
    parser.add_argument("--plain-attention", action="store_true", help="use the plain (non-SDPA) window attention")
    parser.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: leave as is)")
    args = parser.parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)

    results: list[FixtureResult] = []
    unusable: list[str] = []
    for path in args.fixtures:
        try:
            results += check_fixture(path, fused_attention=not args.plain_attention)
        except FixtureError as exc:
            print(f"error: {exc}")
            unusable.append(Path(path).name)
    passed = [r for r in results if r.ok]
    worst = max((r.diff for res in results for r in res.logits if r.diff is not None), default=float("nan"))
    n_feat = sum(len(r.features) for r in results)
    n_feat_ok = sum(sum(f.ok for f in r.features) for r in results)
    status = "PASS" if results and len(passed) == len(results) and not unusable else "FAIL"
    line = (f"{status}: {len(passed)}/{len(results)} networks match; worst output max|d| {worst:.3e}; "
            f"features within tolerance {n_feat_ok}/{n_feat}")
    if unusable:
        line += f"; unusable: {', '.join(unusable)}"
    print(line)
    if unusable:
        return 2
    return 0 if status == "PASS" else 1


if __name__ == "__main__":
    sys.exit(main())
