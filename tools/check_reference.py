#!/usr/bin/env python
"""Check our models against the reference fixtures (numbers produced by the original code).

    python tools/check_reference.py FIXTURE.pt [FIXTURE2.pt ...] [--plain-attention] [--threads N]

For each fixture: build the model from the fixture's ``config`` (lib.registry.config_from_fixture),
load its ``state_dict`` STRICTLY through lib.checkpoint (LAVT: also as the two-part ``lavt``
checkpoint described by ``lavt_variant['key_mapping']``), run ``inputs`` in eval / no_grad / float32
and print the max abs difference of the logits and of every stored feature next to its tolerance.
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


def _flatten_features(feats: Mapping[str, Any]) -> dict[str, torch.Tensor]:
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


def check_fixture(path: str | Path, *, fused_attention: bool = True, print_fn: Callable[[str], None] = print) -> FixtureResult:
    """Check one fixture; prints one line per compared tensor. Raises `FixtureError` if unusable."""
    path = Path(path)
    try:
        fx = safe_torch_load(path)
    except CheckpointError as exc:
        raise FixtureError(str(exc)) from None
    if not isinstance(fx, Mapping) or not {"config", "state_dict", "inputs", "outputs"} <= set(fx):
        raise FixtureError(f"{path}: not a reference fixture (needs config, state_dict, inputs, outputs)")
    try:
        cfg = config_from_fixture(fx["config"])
    except UnknownModelError as exc:
        raise FixtureError(f"{path}: {exc}") from None
    except (KeyError, TypeError, ValueError) as exc:
        raise FixtureError(f"{path}: cannot convert the fixture config: {exc}") from None
    cfg["fused_attn"] = fused_attention
    model = build_model(cfg)
    load_model_state(model, extract_state_dict(fx["state_dict"]), strict=True)

    tol = fx.get("tolerance", {})
    logit_tol = float(tol.get("outputs", DEFAULT_LOGIT_TOL))
    feat_tol = tol.get("features", {})
    result = FixtureResult(str(path), cfg["model"])
    print_fn(f"== {path.name}: model {cfg['model']} (swin {cfg['swin']['embed_dim']}/{cfg['swin']['depths']}/"
             f"window {cfg['swin']['window_size']}), strict load OK, attention {'SDPA' if fused_attention else 'plain'}")

    args = _forward_args(model, fx["inputs"])
    logits, feats = _run(model, args)
    result.logits.append(Row("logits", _max_diff(logits, fx["outputs"]), logit_tol))

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
        result.logits.append(Row("logits (lavt, two-part checkpoint)", _max_diff(logits2, ref2), logit_tol))

    ours = _flatten_features(feats)
    for name, ref in _flatten_features(fx.get("features", {})).items():
        t = float(feat_tol.get(name, DEFAULT_LOGIT_TOL))
        mine = ours.get(name)
        if mine is None:
            result.features.append(Row(name, None, t, "not produced by our model"))
        elif tuple(mine.shape) != tuple(ref.shape):
            result.features.append(Row(name, None, t, f"shape {list(mine.shape)} vs reference {list(ref.shape)}"))
        else:
            result.features.append(Row(name, _max_diff(mine, ref), t))

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
            results.append(check_fixture(path, fused_attention=not args.plain_attention))
        except FixtureError as exc:
            print(f"error: {exc}")
            unusable.append(Path(path).name)
    passed = [r for r in results if r.ok]
    worst = max((r.diff for res in results for r in res.logits if r.diff is not None), default=float("nan"))
    n_feat = sum(len(r.features) for r in results)
    n_feat_ok = sum(sum(f.ok for f in r.features) for r in results)
    status = "PASS" if len(passed) == len(args.fixtures) else "FAIL"
    line = (f"{status}: {len(passed)}/{len(args.fixtures)} fixtures match; worst logit max|d| {worst:.3e}; "
            f"features within tolerance {n_feat_ok}/{n_feat}")
    if unusable:
        line += f"; unusable: {', '.join(unusable)}"
    print(line)
    if unusable:
        return 2
    return 0 if status == "PASS" else 1


if __name__ == "__main__":
    sys.exit(main())
