"""Evaluate a checkpoint with the papers' protocol and print the paper-style table.

    python test.py --resume checkpoints/checkpoint_best.pth --dataset rrsisd --split test \\
        --refer_data_root DATA --bert_tokenizer BERT [--eval_protocol one-per-ref] \\
        [--save_json results.json] [--save_masks masks/] [--vis 8]
    python test.py ... --split all --save_json results/   # every evaluation split: results/<split>.json
    torchrun --nproc_per_node 4 test.py ...        # metrics are summed over ranks

Checkpoints are ours (the model config is stored inside) or an original implementation's
(``{'model': ...}``, optional ``bert_model``, ``module.`` prefix); for the latter pass ``--model`` and
the flags it was trained with (``--window12``, ``--num_tmem``, ``--swin_type``). Loading is strict:
a wrong flag gives a key report instead of silently random weights.

Metrics (as the reference ``test.py`` of LAVT, RMSIN and FIANet): argmax at the evaluation size
against the resized ground truth, overall IoU = ΣI/ΣU, mean IoU with IoU = 0 for an empty union,
precision@0.5…0.9, plus per-category IoU for REFER datasets. A model whose spec asks for it (TRIS)
is evaluated as its paper does instead: the prediction upsampled to each image's own size against
the ground truth at that size, plus Hit (arg-max of the score map in the ground-truth box) and
PointM (arg-max on the ground-truth mask), in the table and the JSON. By default every sentence of every
ref is evaluated; ``--eval_protocol one-per-ref`` evaluates one seeded random sentence per ref (the FIANet protocol).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

import args as args_lib
import engine
import utils
from engine import UserError
from lib import registry
from tools import results as results_lib


def mask_file_name(batch: dict[str, Any], k: int) -> str:
    """``000012_ref345_s0.png`` (REFER datasets) or ``000012_line17_s0.png`` (RefSegRS)."""
    idx = int(batch["index"][k])
    ref_id = int(batch["ref_id"][k])
    sent = int(batch["sent_index"][k])
    key = f"ref{ref_id}" if ref_id >= 0 else f"line{int(batch['line'][k])}"
    return f"{idx:06d}_{key}_s{sent}.png"


class PredictionWriter:
    """Writes predicted masks (0/255 PNG) with an index, and the first N overlay pictures."""

    def __init__(self, masks_dir: str | None, vis: int, vis_dir: Path, rank: int) -> None:
        self.masks_dir = Path(masks_dir) if masks_dir else None
        self.vis_left = vis if rank == 0 else 0
        self.vis_dir = vis_dir
        self.rank = rank
        self.index_lines: list[dict[str, Any]] = []
        if self.masks_dir:
            self.masks_dir.mkdir(parents=True, exist_ok=True)
        if self.vis_left:
            self.vis_dir.mkdir(parents=True, exist_ok=True)

    def __call__(self, batch: dict[str, Any], pred: torch.Tensor, iou: torch.Tensor) -> None:
        if not self.masks_dir and not self.vis_left:
            return
        pred_np = pred.cpu().numpy().astype(bool)
        ious = iou.cpu().tolist()
        for k in range(pred_np.shape[0]):
            name = mask_file_name(batch, k)
            if self.masks_dir:
                Image.fromarray(pred_np[k].astype(np.uint8) * 255).save(self.masks_dir / name)
                rec: dict[str, Any] = {"file": name, "index": int(batch["index"][k])}
                if int(batch["ref_id"][k]) >= 0:
                    rec["ref_id"] = int(batch["ref_id"][k])
                else:
                    rec["line"] = int(batch["line"][k])
                rec.update(sent_index=int(batch["sent_index"][k]), sentence=batch["sentence"][k], iou=ious[k])
                self.index_lines.append(rec)
            if self.vis_left:
                pic = utils.denormalize(batch["image"][k].cpu())
                gt = batch["target"][k].cpu().numpy().astype(bool)
                panel = utils.side_by_side(pic, utils.overlay(pic, gt, (40, 200, 40)),
                                           utils.overlay(pic, pred_np[k], (255, 40, 40)))
                Image.fromarray(panel).save(self.vis_dir / name.replace(".png", f"_iou{ious[k]:.2f}.png"))
                self.vis_left -= 1

    def finish(self) -> None:
        """Write ``index.jsonl`` (merged over ranks, sorted by sample index)."""
        if not self.masks_dir:
            return
        part = self.masks_dir / f".index.rank{self.rank}.jsonl"
        part.write_text("".join(json.dumps(r) + "\n" for r in self.index_lines))
        utils.barrier()
        if self.rank == 0:
            records = []
            for f in sorted(self.masks_dir.glob(".index.rank*.jsonl")):
                records += [json.loads(line) for line in f.read_text().splitlines() if line]
                f.unlink()
            records.sort(key=lambda r: r["index"])
            (self.masks_dir / "index.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))


def run(args) -> int:
    engine.check_quantize_device(getattr(args, "quantize", "off"), args.device)  # before opening the device
    info = utils.init_distributed(args.device)
    args.amp = utils.resolve_amp(args.amp, info.device, log_prefix="[test]" if info.is_main else None)
    utils.keep_freed_memory(info.device, log_prefix="[test]" if info.is_main else None)
    ckpt = engine.read_checkpoint(args.resume)
    stored = engine.checkpoint_model_name(ckpt)
    try:
        requested = args_lib.resolve_model_name(args, registry.available_models())
    except ValueError as e:
        raise UserError(str(e)) from None
    if stored and requested and requested != stored:
        raise UserError(f"--resume {args.resume} holds a '{stored}' model, but --model {args.model} was given")
    name = stored or requested
    if name is None:
        raise UserError(f"--resume {args.resume} is an original checkpoint: pass --model "
                        f"({', '.join(registry.available_models())}) and the flags it was trained with")
    saved_args = ckpt.get("args") if isinstance(ckpt.get("args"), dict) else {}
    if args.max_tokens is None and saved_args.get("max_tokens"):
        args.max_tokens = int(saved_args["max_tokens"])  # evaluate with the token limit it was trained with
    if args.img_size is None:  # evaluate at the size it was trained at (as demo.py)
        size = saved_args.get("img_size") or (ckpt["config"].get("img_size") if stored else None)
        if isinstance(size, int):
            args.img_size = size
    engine.resolve_args(args, name)
    if args.clip_weights and info.is_main:
        print(f"[test] --clip_weights {args.clip_weights} is not used: the checkpoint holds every weight")
    model = engine.model_from_checkpoint(ckpt, args.resume, args if not stored else None, strict=not args.non_strict)
    del ckpt
    model.to(info.device).eval()
    inference = engine.inference_options(args)  # --quantize / --channels_last / --inference_mode
    engine.prepare_for_inference(model, info.device, quantize=inference["quantize"],
                                 channels_last=inference["channels_last"])

    try:
        splits = results_lib.split_datasets(
            args.split, args.dataset, args.refer_data_root, args.splitBy,
            lambda split: engine.build_dataset(args, split, mode="eval", eval_protocol=args.eval_protocol))
    except results_lib.ResultsError as e:
        raise UserError(str(e)) from None
    several = len(splits) > 1
    try:
        json_paths = results_lib.json_targets(args.save_json, [s for s, _ in splits]) if args.save_json else []
    except results_lib.ResultsError as e:
        raise UserError(str(e)) from None
    checkpoint = results_lib.checkpoint_info(args.resume) if info.is_main else {}
    records = []
    for split, ds in splits:  # the model and the datasets' caches are loaded once for every split
        loader = engine.eval_loader(ds, args.eval_batch_size, args.workers, args.pin_mem, info)
        vis_dir = Path(args.output_dir) / "vis" / (split if several else "")
        masks_dir = str(Path(args.save_masks) / split) if args.save_masks and several else args.save_masks
        writer = PredictionWriter(masks_dir, args.vis, vis_dir, info.rank)
        recorder = results_lib.ExpressionRecorder()
        summary = engine.evaluate(model, loader, info.device, args.amp, on_batch=results_lib.chain(writer, recorder),
                                  desc=f"{args.dataset} {split}", inference_mode=inference["inference_mode"] == "on")
        writer.finish()
        expressions = recorder.gather()
        if info.is_main:
            gt_size = ", ground truth at the original resolution" if summary.get("resolution") == "original" else ""
            options = "".join(f", {k.replace('_', '-')} {v}" for k, v in inference.items()
                              if v != engine.INFERENCE_DEFAULTS[k])
            title = (f"{name} on {args.dataset} {split} ({args.eval_protocol} protocol, "
                     f"{args.img_size}x{args.img_size}{gt_size}{options})")
            print(utils.format_results_table(summary, title))
            records.append(results_lib.build_record(
                summary, expressions, model=name, dataset=args.dataset, split=split,
                split_by=getattr(ds, "split_by", None), eval_protocol=args.eval_protocol, seed=args.seed,
                img_size=args.img_size, checkpoint=checkpoint, config=getattr(model, "config", None),
                train_args=saved_args))
            records[-1]["amp"] = args.amp  # the resolved --amp the numbers were computed with
            records[-1]["inference"] = inference  # the options that produced these numbers
            if masks_dir:
                print(f"[test] {summary['num_samples']} masks written to {masks_dir} (index.jsonl maps files)")
            if args.vis:
                print(f"[test] overlays written to {vis_dir}")
    if info.is_main and json_paths:
        paths = results_lib.write_records(records, json_paths)
        print(f"[test] metrics and per-expression IoUs written to {', '.join(map(str, paths))}")
    return 0


def main() -> int:
    return run(args_lib.get_test_parser().parse_args())


if __name__ == "__main__":
    engine.cli_main(main)
