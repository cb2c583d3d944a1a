"""Positive response map selection (PRMS) of TRIS (Liu et al., "Referring Image Segmentation Using
Text Supervision", ICCV 2023, Sec. 3.4): one response map per ref, chosen among its sentences by a
frozen CLIP ViT-B/32, for the pseudo-mask step (``tools.pseudo_masks``).

    python -m tools.prms --resume STAGE1_CKPT --dataset refcoco --split train --out DIR \\
        [--clip_vitb32 ViT-B-32.pt --allow_torchscript] [--refer_data_root ... as test.py]

Per ref, with its K sentences in one batch (each image paired with its own sentence only, i.e.
what the reference computes one sentence at a time):

* ``M_j`` = the stage-1 eval output (the ReLU'd response map, (K, 1, S, S)) upsampled to the image's
  original size (bilinear, align_corners=True);
* ``score_j = sum_k cos(ViT(M_j * image), ViT_text(sentence_k))`` over all K sentences of the ref,
  the masked image at 224 x 224 (the ReLU'd map, not its sigmoid, is the mask, as the reference);
* the best map is kept and divided by its maximum + 1e-5 -> float32 (H, W) in [0, 1].

Output folder::

    index.jsonl   {"index", "ref_id", "image_id", "image" (absolute path), "map" (relative), "size": [H, W]}
    maps/<index>_<image_id>.npy
    config.json   the checkpoint, dataset and calibrator (a rerun with another one is refused)
    summary.json  written last: the completion marker (counts; diagnostic PointM / mIoU vs the ground truth)

Resumable: refs whose map is listed in ``index.jsonl`` and exists are skipped. The diagnostic
(``--no_diagnostic`` turns it off) reads the ground truth only after every map is written, in a
separate pass over the saved files: nothing it reads can change a map.
"""
from __future__ import annotations

import json
import re
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F

import args as args_lib
import engine
import utils
from engine import UserError

FORMAT = "openrrsis-prms-v1"


def _image_id(ds: Any, sample: Any) -> int:
    """The dataset's image id of a sample (REFER: the ref's ``image_id``; else the digits of the
    file name, as the reference parses COCO names)."""
    refer = getattr(ds, "refer", None)
    if refer is not None and sample.ref_id in getattr(refer, "Refs", {}):
        return int(refer.Refs[sample.ref_id]["image_id"])
    digits = re.findall(r"\d+", Path(sample.image_path).stem)
    return int(digits[-1]) if digits else -1


def calibrator_of(model: torch.nn.Module, path: str, allow_torchscript: bool) -> torch.nn.Module:
    """The frozen CLIP ViT-B/32 that scores the maps: the file of ``--clip_vitb32`` if given, else
    the calibrator the stage-1 checkpoint's config names (its file, or a tiny model's seeded random
    ViT)."""
    from lib.tris import CalibratorUnavailableError

    if not callable(getattr(model, "load_calibrator", None)):
        raise UserError("--resume: this model has no CLIP calibrator (PRMS needs a TRIS stage-1 checkpoint)")
    try:
        if path:
            return model.load_calibrator(path, allow_torchscript=allow_torchscript)
        return model.calibrator
    except CalibratorUnavailableError as e:
        raise UserError(str(e).strip().splitlines()[0]) from None


@torch.no_grad()
def select_map(model: torch.nn.Module, calibrator: torch.nn.Module, image: torch.Tensor, text: torch.Tensor,
               size: Sequence[int]) -> tuple[np.ndarray, int, list[float]]:
    """PRMS for one ref: ``image`` (K, 3, S, S) (the same picture K times), ``text`` (K, T) its K
    sentences, ``size`` the original (H, W). Returns (the selected map normalised to [0, 1] as
    float32 (H, W), the selected sentence, the K scores)."""
    from lib.tris import clip_similarity

    maps = model(image, text)                       # (K, 1, S, S), ReLU'd (eval output)
    maps = F.interpolate(maps.float(), size=tuple(size), mode="bilinear", align_corners=True)
    k = text.shape[0]
    all_texts = text.unsqueeze(0).expand(k, k, text.shape[-1])   # row j: every sentence of the ref
    cos = clip_similarity(calibrator, image, maps, all_texts)    # (K, K)
    scores = cos.float().sum(1)
    best = int(scores.argmax())
    m = maps[best, 0]
    m = m / (m.max() + 1e-5)
    return m.cpu().numpy().astype(np.float32), best, [float(s) for s in scores]


def original_size(path: str) -> tuple[int, int]:
    """(H, W) of an image file, from its header."""
    from PIL import Image

    with Image.open(path) as im:
        return im.height, im.width


def _read_index(path: Path) -> dict[int, dict[str, Any]]:
    records: dict[int, dict[str, Any]] = {}
    if path.is_file():
        for line in path.read_text().splitlines():
            if line.strip():
                try:
                    rec = json.loads(line)
                except ValueError:
                    continue  # a line cut by a crash: that ref is redone
                records[int(rec["ref_id"])] = rec
    return records


def diagnostic(out: Path, ds: Any) -> dict[str, float]:
    """PointM (arg-max on the mask), Hit (arg-max in the box) and mIoU (foreground = positive map)
    of the saved maps against the ground truth, each ref counted once per sentence (as the
    reference prints them). Reads only the finished maps."""
    records = _read_index(out / "index.jsonl")
    ref_rows = {ds.samples[members[0]].ref_id: members for members in ds.groups}
    points = utils.PointMetrics()
    ious = []
    for ref_id, rec in records.items():
        members = ref_rows.get(ref_id)
        if members is None:
            continue
        score = torch.from_numpy(np.load(out / rec["map"]))
        gt = torch.from_numpy(ds.original_mask(members[0])).bool()
        box = ds.original_box(members[0]) if callable(getattr(ds, "original_box", None)) else None
        box = utils.coco_box_to_xyxy(box) if box is not None else utils.mask_box(gt)
        pred = score > 1e-9
        inter, union = float((pred & gt).sum()), float((pred | gt).sum())
        for _ in members:
            points.update(score, box, gt)
            ious.append(inter / union if union else 0.0)
    res = {k: float(v) for k, v in points.summary().items() if isinstance(v, (int, float))}
    res["mIoU"] = float(np.mean(ious)) if ious else 0.0
    return res


def run(argv: Sequence[str] | None = None) -> int:
    args = args_lib.get_prms_parser().parse_args(argv)
    started = time.time()
    ckpt = engine.read_checkpoint(args.resume)
    stored = engine.checkpoint_model_name(ckpt)
    name = stored or args.model
    if name is None:
        raise UserError(f"--resume {args.resume} is an original checkpoint: pass --model tris_stage1")
    saved = ckpt.get("args") if isinstance(ckpt.get("args"), dict) else {}
    if args.img_size is None and isinstance(saved.get("img_size"), int):
        args.img_size = saved["img_size"]   # the size it was trained at, as test.py
    engine.resolve_args(args, name)
    model = engine.model_from_checkpoint(ckpt, args.resume, args if not stored else None)
    del ckpt
    device = utils.init_distributed(args.device).device
    model.to(device).eval()
    calibrator = calibrator_of(model, args.clip_vitb32, args.allow_torchscript).to(device).eval()

    ds = engine.build_dataset(args, args.split, mode="eval", eval_protocol="all")
    out = Path(args.out)
    try:
        (out / "maps").mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"--out {out}: cannot create it ({e.strerror or e})") from None
    config = {"format": FORMAT, "checkpoint": str(Path(args.resume).resolve()), "model": name,
              "dataset": args.dataset, "split": args.split, "splitBy": getattr(ds, "split_by", None),
              "refer_data_root": str(Path(args.refer_data_root).resolve()), "img_size": args.img_size,
              "clip_vitb32": args.clip_vitb32 or "the checkpoint's calibrator"}
    config_file = out / "config.json"
    if config_file.is_file():
        old = json.loads(config_file.read_text())
        if old != config:
            diff = sorted(k for k in set(old) | set(config) if old.get(k) != config.get(k))
            raise UserError(f"--out {out} holds PRMS maps of another run (different {', '.join(diff)}); "
                            f"choose a new --out")
    else:
        config_file.write_text(json.dumps(config, indent=2) + "\n")
    (out / "summary.json").unlink(missing_ok=True)   # not complete until this run ends

    index_file = out / "index.jsonl"
    done = {r: rec for r, rec in _read_index(index_file).items() if (out / rec["map"]).is_file()}
    index_file.write_text("".join(json.dumps(rec) + "\n" for rec in done.values()))
    todo = [(g, members) for g, members in enumerate(ds.groups) if ds.samples[members[0]].ref_id not in done]
    skipped = len(ds.groups) - len(todo)
    with index_file.open("a") as index:
        for g, members in utils.progress(todo, desc="PRMS", total=len(todo)):
            items = [ds[k] for k in members]   # eval 'all' protocol: item index == sample index
            image = torch.stack([it["image"] for it in items]).to(device)
            text = torch.stack([it["text"] for it in items]).to(device)
            sample = ds.samples[members[0]]
            size = original_size(sample.image_path)
            selected, best, scores = select_map(model, calibrator, image, text, size)
            image_id = _image_id(ds, sample)
            rel = f"maps/{g:06d}_{image_id}.npy"
            np.save(out / rel, selected)
            rec = {"index": g, "ref_id": int(sample.ref_id), "image_id": image_id,
                   "image": str(Path(sample.image_path).resolve()), "map": rel, "size": [int(size[0]), int(size[1])],
                   "sentence": int(best), "scores": [round(s, 6) for s in scores]}
            index.write(json.dumps(rec) + "\n")
            index.flush()
    records = sorted(_read_index(index_file).values(), key=lambda r: r["index"])
    index_file.write_text("".join(json.dumps(rec) + "\n" for rec in records))
    summary: dict[str, Any] = {"refs": len(records), "computed": len(todo), "skipped_existing": skipped,
                               "seconds": round(time.time() - started, 1)}
    if not args.no_diagnostic:
        try:
            summary["diagnostic"] = diagnostic(out, ds)
        except (FileNotFoundError, NotImplementedError, ValueError) as e:
            summary["diagnostic"] = f"no ground truth ({type(e).__name__})"
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    diag = summary.get("diagnostic")
    extra = (f"; diagnostic vs ground truth: PointM {100 * diag.get('PointM', 0):.2f}  mIoU {100 * diag['mIoU']:.2f}"
             if isinstance(diag, dict) else "")
    print(f"[prms] {len(records)} maps in {out} ({len(todo)} computed, {skipped} already there, "
          f"{summary['seconds']} s){extra}")
    return 0


def main() -> None:
    engine.cli_main(lambda: run(sys.argv[1:]))


if __name__ == "__main__":
    main()
