"""Export a checkpoint to the ecosystem's format: ``model.safetensors`` + ``config.json`` + ``README.md``.

    python -m tools.export checkpoints/fianet_rrsisd/checkpoint_best.pth exported/fianet_rrsisd \\
        [--metrics results/test.json ...]
    python -m tools.export model_best_FIANet.pth exported/fianet --model fianet --window12 --num_tmem 3 \\
        --ck_bert pretrained_weights/bert-base-uncased        # an original checkpoint: its model flags

The weights are the model's own ``state_dict`` after a strict load, so every supported layout
(ours, the originals' ``{'model'}`` / two-part ``{'model', 'bert_model'}`` / raw state dicts,
``module.`` prefixes) comes out keyed the same way, optimiser and RNG states dropped.
``config.json`` holds the model config (plain data that rebuilds the model), the training
arguments and where the weights came from (path and SHA-256). ``README.md`` is a short model card:
the model, its recipe, its data and, with ``--metrics``, the metrics of test.py result files.

``test.py``, ``demo.py`` and everything else that takes ``--resume`` accept the folder and read it
with ``safetensors`` and ``json`` only (``lib.checkpoint.read_checkpoint_file_or_folder``): no pickle.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Sequence

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from torch import nn  # noqa: E402

import args as args_lib  # noqa: E402
import engine  # noqa: E402
from engine import UserError  # noqa: E402
from lib import checkpoint as ckpt_lib  # noqa: E402
from lib import registry  # noqa: E402
from tools import published as published_lib  # noqa: E402
from tools import results as results_lib  # noqa: E402

# Training arguments worth a line in the model card, in this order.
_RECIPE_KEYS = ("epochs", "lr", "batch_size", "weight_decay", "max_tokens", "num_tmem", "img_size", "amp",
                "seed", "val_split", "drop_path_rate", "pretrained_swin_weights", "ck_bert")
_DATA_KEYS = ("dataset", "splitBy", "refer_data_root", "bert_tokenizer")


def _plain(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))


def model_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's tensors as safetensors wants them: detached, contiguous, on the CPU, no shared storage."""
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in model.state_dict().items()}


def export_model(model: nn.Module, out_dir: str | Path, *, args: dict[str, Any] | None = None,
                 source: dict[str, Any] | None = None, metrics: Sequence[dict[str, Any]] = ()) -> Path:
    """Write ``model`` (built by the registry, so ``model.config`` is set) to ``out_dir``."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    if out.is_file():
        raise UserError(f"OUT_DIR {out_dir}: is a file (expected a folder)")
    out.mkdir(parents=True, exist_ok=True)
    config = _plain(model.config)
    state = model_state(model)
    weights = out / ckpt_lib.EXPORT_WEIGHTS
    save_file(state, str(weights), metadata={"format": "pt", "openrrsis": ckpt_lib.EXPORT_FORMAT,
                                              "model": str(config["model"])})
    meta = {"format": ckpt_lib.EXPORT_FORMAT, "model": config["model"], "config": config,
            "args": _plain(args or {}), "source": _plain(source or {}),
            "weights_sha256": results_lib.sha256_of(weights)}
    (out / ckpt_lib.EXPORT_CONFIG).write_text(json.dumps(meta, indent=2) + "\n")
    n_params = sum(v.numel() for k, v in model.named_parameters())
    (out / "README.md").write_text(model_card(meta, n_params, metrics))
    return out


def _display_name(model: str) -> str:
    try:
        doc = json.loads(published_lib.PUBLISHED_JSON.read_text(encoding="utf-8"))
        return str(doc.get("models", {}).get(model, model))
    except (OSError, json.JSONDecodeError):
        return model


def model_card(meta: dict[str, Any], n_params: int, metrics: Sequence[dict[str, Any]] = ()) -> str:
    """A short Markdown model card: model, recipe, data, metrics (from test.py result records)."""
    cfg, args, src = meta["config"], meta.get("args") or {}, meta.get("source") or {}
    swin = cfg.get("swin", {})
    lines = [f"# {_display_name(cfg['model'])}: OpenRRSIS export", "",
             f"`model.safetensors` ({n_params / 1e6:.1f} M parameters, sha256 `{meta['weights_sha256']}`) and "
             "`config.json` (the model config that rebuilds it, the training arguments, the source). "
             "Loaded with safetensors and json only, no pickle.", "",
             "```bash",
             "python test.py --resume THIS_FOLDER --split all --refer_data_root DATA --bert_tokenizer BERT_FOLDER",
             'python demo.py --resume THIS_FOLDER --img IMAGE --text "the sentence"',
             "```", "", "## Model", "",
             f"- `--model {cfg['model']}`, Swin {cfg.get('swin_type', '?')} (embed {swin.get('embed_dim')}, depths "
             f"{'-'.join(map(str, swin.get('depths', [])))}, window {swin.get('window_size')}), "
             f"image size {cfg.get('img_size')}" + (f", {cfg['num_tmem']} TMEM blocks" if "num_tmem" in cfg else ""),
             f"- converted from `{src.get('path', '?')}` (sha256 `{src.get('sha256', '?')}`, {src.get('layout', '?')})"]
    recipe = [f"{k} {args[k]}" for k in _RECIPE_KEYS if args.get(k) not in (None, "")]
    data = [f"{k} {args[k]}" for k in _DATA_KEYS if args.get(k) not in (None, "")]
    lines += ["", "## Recipe", ""]
    lines.append("- " + ", ".join(recipe) if recipe and src.get("layout") != "original checkpoint"
                 else "- not recorded: an original checkpoint holds no training arguments (see the paper)")
    lines += ["", "## Data", "", "- " + (", ".join(data) if data else "not recorded")]
    if metrics:
        lines += ["", "## Metrics (percent)", "",
                  "| dataset | split | protocol | " + " | ".join(results_lib.METRICS) + " | expressions | same weights |",
                  "|---|---|---|" + "---:|" * len(results_lib.METRICS) + "---:|---|"]
        for r in metrics:
            proto = r.get("protocol") or {}
            same = (r.get("checkpoint") or {}).get("sha256") in (src.get("sha256"), meta["weights_sha256"])
            lines.append(f"| {r.get('dataset')} | {r.get('split')} | {proto.get('name', '?')} | "
                         + " | ".join(f"{100 * r[m]:.2f}" for m in results_lib.METRICS)
                         + f" | {r.get('num_samples', '?')} | {'yes' if same else 'NO: another checkpoint'} |")
        lines += ["", "oIoU = ΣI/ΣU over expressions, mIoU = mean per-expression IoU, P@X = share with IoU >= X. "
                  "`python -m tools.report` adds bootstrap confidence intervals and the published numbers."]
    return "\n".join(lines) + "\n"


def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m tools.export", description=__doc__.split("\n\n")[0],
                                allow_abbrev=False,
                                epilog="Any further flags are test.py's model flags (--model, --window12, --num_tmem, "
                                       "--swin_type, --ck_bert, --img_size, ...), needed for original checkpoints.")
    p.add_argument("checkpoint", help="checkpoint file (ours or an original one) or an exported folder")
    p.add_argument("out_dir", help="output folder")
    p.add_argument("--metrics", nargs="*", default=[], help="test.py result files (or folders) for the model card")
    return p


def export_checkpoint(path: str, out_dir: str | Path, flags: argparse.Namespace | None = None, *,
                      config: dict[str, Any] | None = None, metrics: Sequence[str | Path] = ()) -> Path:
    """Convert the checkpoint at ``path`` (ours, an original layout, or an exported folder) to ``out_dir``.

    An original checkpoint holds no config: it comes from ``config`` when given, else from the
    model flags ``flags`` (test.py's, resolved with the model's recipe).
    """
    ckpt = engine.read_checkpoint(path)
    stored = engine.checkpoint_model_name(ckpt)
    if stored is not None:
        train_args = ckpt.get("args") if isinstance(ckpt.get("args"), dict) else {}
        layout = str(ckpt.get("format") or "OpenRRSIS checkpoint")
        if "epoch" in ckpt:
            layout += f", epoch {ckpt['epoch']}"
        model = engine.model_from_checkpoint(ckpt, path)
    else:
        layout, train_args = "original checkpoint", {}
        if config is not None:
            ckpt = {"model": ckpt_lib.extract_state_dict(ckpt), "config": config}
            model = engine.model_from_checkpoint(ckpt, path)
        else:
            if flags is None or not flags.model:
                raise UserError(f"{path} is an original checkpoint: pass --model "
                                f"({', '.join(registry.available_models())}) and the flags it was trained with")
            engine.resolve_args(flags, flags.model)
            train_args = vars(flags)
            model = engine.model_from_checkpoint(ckpt, path, flags)
    del ckpt
    try:
        records = [results_lib.load_record(p) for p in results_lib.expand_paths(metrics)]
    except results_lib.ResultsError as e:
        raise UserError(f"--metrics: {e}") from None
    source = {**results_lib.checkpoint_info(path), "layout": layout}
    return export_model(model, out_dir, args=train_args, source=source, metrics=records)


def run(argv: Sequence[str] | None = None) -> Path:
    a, rest = get_parser().parse_known_args(argv)
    flags = args_lib.get_parser().parse_args(rest)
    out = export_checkpoint(a.checkpoint, a.out_dir, flags, metrics=a.metrics)
    print(f"[export] {a.checkpoint} -> {out}/{ckpt_lib.EXPORT_WEIGHTS}, {ckpt_lib.EXPORT_CONFIG}, README.md")
    return out


def main() -> int:
    run()
    return 0


if __name__ == "__main__":
    engine.cli_main(main)
