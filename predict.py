"""Segment what one or more sentences refer to over a whole scene, tile by tile, in bounded memory.

    python predict.py --resume CKPT --scene SCENE.tif --text "the storage tanks" [--text ...] \\
        [--mode all | best | topk K] [--tile PX] [--overlap 0.25] [--blend cosine] --out DIR

The scene is read as windows of ``--tile`` pixels (default: the model's input size at its training
ground sample distance) overlapping by ``--overlap``; each window is resized to the model input as in
training, its foreground probabilities are mapped back to the native grid and blended with its
neighbours' (``--blend``), and thresholded once. Memory holds one strip of tiles, never the scene.

Per sentence ``k`` it writes, next to a JSON summary ``<scene>_predict.json``:

* ``<scene>_<k>_<slug>_prob.tif``  uint8 probability ``round(254 p)``, 255 = nodata (CRS and transform
  of the scene, tiled, DEFLATE);
* ``<scene>_<k>_<slug>_mask.tif``  0/1 mask of the selected referent(s), 255 = nodata;
* ``<scene>_<k>_<slug>.geojson`` (and ``.gpkg`` when fiona with GDAL's GPKG driver is installed)
  polygons in the scene CRS with ``score`` (mean blended probability), ``rank``, ``area``;
* ``<scene>_<k>_<slug>_overview.png``  the scene, decimated, with the mask tinted over it.

``--mode all`` keeps every connected component (class-like sentences); ``best`` keeps the one with
the highest mean probability (a referring expression names one object); ``topk K`` keeps K ranked
candidates. ``--context_pass`` first scores the whole scene squeezed into one model input and ranks
components by mean probability times that coarse prior.

Unfinished outputs carry a ``.part`` suffix; an interrupted run leaves a sidecar tile index
(``<scene>.tiles.json``) and the next identical command resumes at the last written block row. The
index is also saved every ``--checkpoint_every`` seconds (rasters flushed first), so a run killed
outright (SIGKILL, out of memory) resumes from its last checkpoint.

The models fuse language into the image encoder from the first stage on (LAVT, Yang et al., CVPR 2022,
Sec. 3.1), so there are no text-free image features to share between sentences: what is shared is the
read, resampled and normalised tile, scored for every sentence before the next tile is read.
"""
from __future__ import annotations

import json
import os
import resource
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

import args as args_lib
import engine
import utils
from data import scene as sc
from engine import UserError

# Ground sample distance of training sets with one scale (RefSegRS, Yuan et al. 2024: 0.13 m).
# RRSIS-D mixes 0.5-30 m, so no single value is assumed for it.
DATASET_GSD: dict[str, float] = {"refsegrs": 0.13}


class TileScorer:
    """The only model-specific part of scene inference: tiles of the scene -> foreground probability.

    Loads an OpenRRSIS checkpoint once; ``scores(tiles, sentence)`` resizes each ``(h, w, 3)`` uint8
    tile to the model input (PIL bilinear, as in training), runs the model on the batch and returns
    ``(B, h, w)`` float32 probabilities: ``model.predict_scores(outputs, (h, w))``, the model's own
    foreground probability at the tile's resolution (for two-class logits the softmax of the
    logits resized as demo.py resizes them, so ``p > 0.5`` is demo.py's mask).
    """

    def __init__(self, checkpoint_path: str, device: torch.device, amp: str, tokenizer_dir: str | None = None,
                 dataset: str | None = None, max_tokens: int | None = None, quantize: str = "off",
                 channels_last: str = "auto", inference_mode: str = "on") -> None:
        ckpt = engine.read_checkpoint(checkpoint_path)
        if engine.checkpoint_model_name(ckpt) is None:
            raise UserError(f"--resume {checkpoint_path}: not an OpenRRSIS checkpoint (no model config inside); "
                            f"predict.py needs one written by train.py")
        saved = ckpt.get("args") if isinstance(ckpt.get("args"), dict) else {}
        config = ckpt["config"]
        self.model = engine.model_from_checkpoint(ckpt, checkpoint_path, None)
        del ckpt
        self.model.to(device).eval()
        engine.prepare_for_inference(self.model, device, quantize=quantize, channels_last=channels_last)
        self.device, self.amp = device, amp
        self.inference_mode = inference_mode
        # The model's spec names its forward inputs, normalisation, default size and token limit.
        spec = engine.spec_of(self.model)
        self._input_keys = tuple(spec.inputs)
        self._mean_std = (spec.mean, spec.std)
        self.word_masks = spec.text.word_masks
        size = saved.get("img_size") or config.get("img_size") or spec.default_img_size
        self.size = int(size[0] if isinstance(size, (list, tuple)) else size)
        self.patch_grid = spec.output_stride  # the coarsest feature map is this many times smaller
        self.tokenizer_dir = engine.tokenizer_name(spec, tokenizer_dir or saved.get("bert_tokenizer"),
                                                   saved.get("clip_bpe"))
        if not self.tokenizer_dir:
            raise UserError("--bert_tokenizer: not stored in the checkpoint; pass the tokenizer folder")
        self.dataset = dataset or saved.get("dataset") or "rrsisd"
        self.max_tokens = int(max_tokens or saved.get("max_tokens") or spec.text.context_length or 20)
        gsd = saved.get("model_gsd") or config.get("gsd")
        self.gsd: float | None = float(gsd) if gsd else DATASET_GSD.get(self.dataset)
        self.model_name = config.get("model")
        self._texts: dict[str, dict[str, torch.Tensor]] = {}
        self._last: tuple[np.ndarray, torch.Tensor] | None = None

    def _text(self, sentence: str) -> dict[str, torch.Tensor]:
        if sentence not in self._texts:
            import demo

            self._texts[sentence] = demo.encode_sentences([sentence], self.tokenizer_dir, self.max_tokens,
                                                          self.word_masks, self.dataset)
        return self._texts[sentence]

    def _images(self, tiles: np.ndarray) -> torch.Tensor:
        # The same tiles are scored for every sentence: resize and normalise them once.
        if self._last is not None and self._last[0] is tiles:
            return self._last[1]
        from data.transforms import image_to_tensor

        s = self.size
        batch = torch.stack([image_to_tensor(Image.fromarray(t).resize((s, s), Image.BILINEAR), *self._mean_std)
                             for t in tiles])
        self._last = (tiles, batch)
        return batch

    def scores(self, tiles: np.ndarray, sentence: str) -> np.ndarray:
        # The cached text / tile tensors are only read, never changed in place, so inference
        # tensors are safe to keep between calls.
        with engine.inference_context(self.inference_mode):
            b, h, w = tiles.shape[:3]
            text = {k: v.expand(b, -1) for k, v in self._text(sentence).items()}
            batch = {"image": self._images(tiles), **text}
            inputs = engine.model_inputs(engine.to_device(batch, self.device), self._input_keys)
            with engine.autocast(self.device, self.amp):
                outputs = self.model(**inputs)
            return self.model.predict_scores(outputs, (h, w)).float().cpu().numpy()


# --------------------------------------------------------------------------------------------
# Steps
# --------------------------------------------------------------------------------------------
def parse_mode(values: list[str]) -> tuple[str, int]:
    """``--mode all|best|topk K`` -> (mode, K)."""
    mode = values[0]
    if mode not in sc.MODES:
        raise UserError(f"--mode {mode!r}: choose one of all, best, topk K")
    if mode == "topk":
        if len(values) != 2 or not values[1].isdigit() or int(values[1]) < 1:
            raise UserError(f"--mode {' '.join(values)}: topk needs a positive count, e.g. --mode topk 3")
        return mode, int(values[1])
    if len(values) != 1:
        raise UserError(f"--mode {' '.join(values)}: only topk takes a count")
    return mode, 1


def open_scene(path: str) -> sc.SceneReader:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            reader = sc.SceneReader(path)
        except sc.SceneError as e:
            raise UserError(str(e)) from None
    for w in caught:
        if issubclass(w.category, UserWarning):
            print(f"warning: {w.message}", file=sys.stderr)
    return reader


def plan_tiles(args, reader: sc.SceneReader, scorer: TileScorer) -> tuple[sc.TilingPlan, dict[str, Any]]:
    """Tile side in scene pixels from the two ground sample distances, overlap in pixels; checks."""
    scene_gsd = args.scene_gsd if args.scene_gsd else reader.info.gsd
    model_gsd = args.model_gsd if args.model_gsd else scorer.gsd
    for flag, v in (("--scene_gsd", args.scene_gsd), ("--model_gsd", args.model_gsd)):
        if v is not None and v <= 0:
            raise UserError(f"{flag} {v}: must be a positive number of metres per pixel")
    # scene pixels per model pixel: >1 when the scene is finer than the training images
    ratio = (model_gsd / scene_gsd) if (scene_gsd and model_gsd) else 1.0
    tile = args.tile if args.tile is not None else max(1, round(scorer.size * ratio))
    at_model_scale = tile / ratio
    if at_model_scale < scorer.patch_grid:
        raise UserError(f"--tile {tile}: smaller than the model's patch grid ({scorer.patch_grid} px at the "
                        f"model's scale = {scorer.patch_grid * ratio:.0f} scene px)")
    if not 0.0 <= args.overlap <= 0.5:
        raise UserError(f"--overlap {args.overlap}: must be a fraction of the tile in [0, 0.5]")
    plan = sc.TilingPlan(tile=tile, overlap=round(args.overlap * tile), blend=args.blend,
                         batch_size=args.batch_size, threshold=args.threshold,
                         checkpoint_every=args.checkpoint_every)
    try:
        plan.check()
    except sc.SceneError as e:
        raise UserError(str(e)) from None
    scale = {"scene_gsd": scene_gsd, "model_gsd": model_gsd, "scene_px_per_model_px": ratio,
             "model_input": scorer.size}
    if not (scene_gsd and model_gsd):
        scale["note"] = "ground sample distance unknown (scene or model): tiles are not resampled for scale"
    return plan, scale


def output_paths(out: Path, stem: str, sentences: list[str]) -> list[dict[str, Path]]:
    import demo

    paths = []
    for k, s in enumerate(sentences):
        base = f"{stem}_{k}_{demo.slug(s)}"
        paths.append({"prob": out / f"{base}_prob.tif", "mask": out / f"{base}_mask.tif",
                      "labels": out / f"{base}_labels.tif.part", "geojson": out / f"{base}.geojson",
                      "gpkg": out / f"{base}.gpkg", "overview": out / f"{base}_overview.png"})
    return paths


def part(path: Path) -> Path:
    return path.with_name(path.name + ".part")


def peak_memory_mb(device: torch.device) -> dict[str, float]:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    out = {"peak_rss_mb": round(rss, 1)}
    if device.type == "cuda":
        out["peak_cuda_mb"] = round(torch.cuda.max_memory_allocated(device) / 2 ** 20, 1)
    return out


def run(args) -> int:
    t_start = time.time()
    mode, topk = parse_mode(args.mode)
    for flag, v in (("--min_area", args.min_area), ("--simplify", args.simplify)):
        if v < 0:
            raise UserError(f"{flag} {v}: must be >= 0")
    engine.check_quantize_device(args.quantize, args.device)  # before opening the device
    device = utils.resolve_device(args.device)
    amp = utils.resolve_amp(args.amp, device, log_prefix="[predict]")
    utils.keep_freed_memory(device, log_prefix="[predict]")
    reader = open_scene(args.scene)
    try:
        scorer = TileScorer(args.resume, device, amp, args.bert_tokenizer, args.dataset, args.max_tokens,
                            quantize=args.quantize, channels_last=args.channels_last, inference_mode=args.inference_mode)
        plan, scale = plan_tiles(args, reader, scorer)
        info = reader.info
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        stem = Path(info.path).stem
        paths = output_paths(out, stem, args.text)
        for p in paths:  # a finished output of an earlier run must not survive looking current
            for key in ("prob", "mask", "geojson", "gpkg", "overview"):
                p[key].unlink(missing_ok=True)
        fingerprint = {"scene": str(Path(info.path).resolve()), "size": [info.width, info.height],
                       "checkpoint": str(Path(args.resume).resolve()),
                       "checkpoint_mtime": os.path.getmtime(args.resume), "sentences": list(args.text),
                       "tile": plan.tile, "overlap": plan.overlap, "blend": plan.blend,
                       "threshold": plan.threshold, "context_pass": bool(args.context_pass)}
        index = sc.TileIndex(out / f"{stem}.tiles.json", fingerprint)
        if args.restart:
            index.remove()
        if not all(part(p["prob"]).is_file() and p["labels"].is_file() for p in paths):
            index.remove()  # the partial rasters a sidecar refers to are gone

        prior = None
        if args.context_pass:
            prior = sc.context_prior(reader, scorer.scores, args.text, scorer.size)

        rows, cols = sc.tile_grid(info.width, info.height, plan.tile, plan.overlap)
        bar = utils.progress(range(len(rows) * len(cols)), enabled=not args.no_progress, desc="tiles",
                             unit="tile")
        bar_update = getattr(bar, "update", None)
        t0 = time.time()
        result = sc.run_tiled_pass(reader, scorer.scores, args.text, plan, [part(p["prob"]) for p in paths],
                                   [p["labels"] for p in paths], index=index, prior=prior, progress=bar_update)
        if hasattr(bar, "close"):
            bar.close()
        seconds = time.time() - t0

        pixel_area = abs(info.transform.a * info.transform.e - info.transform.b * info.transform.d)
        min_area_px = args.min_area / pixel_area if pixel_area else args.min_area
        per_sentence = []
        for sentence, p, writer in zip(args.text, paths, result.writers):
            tracker = writer.tracker
            roots = tracker.roots()
            components = tracker.components()
            chosen = sc.select_components(components, mode, topk, min_area_px,
                                          use_prior=prior is not None)
            sc.write_mask(info, p["labels"], part(p["mask"]), roots, [c["id"] for c in chosen])
            polygons = sc.write_geojson(part(p["geojson"]), sc.component_polygons(
                info, p["labels"], roots, chosen, args.simplify, sentence), info, sentence)
            gpkg_note = sc.write_gpkg(part(p["gpkg"]), sc.component_polygons(
                info, p["labels"], roots, chosen, args.simplify, sentence), info)
            os.replace(part(p["prob"]), p["prob"])
            os.replace(part(p["mask"]), p["mask"])
            os.replace(part(p["geojson"]), p["geojson"])
            if gpkg_note is None:
                os.replace(part(p["gpkg"]), p["gpkg"])
            overview = sc.write_overview(p["overview"], reader, p["mask"], args.overview_size)
            p["labels"].unlink(missing_ok=True)
            per_sentence.append({
                "sentence": sentence, "probability": str(p["prob"]), "mask": str(p["mask"]),
                "geojson": str(p["geojson"]), "gpkg": str(p["gpkg"]) if gpkg_note is None else None,
                "gpkg_note": gpkg_note, "overview": str(p["overview"]), "overview_size": list(overview),
                "components": len(components), "polygons": polygons,
                "selected": [{k: c[k] for k in ("id", "rank", "score", "area", "bbox")}
                             | ({"prior": c["prior"]} if prior is not None else {}) for c in chosen[:50]],
            })
            print(f"[predict] {sentence!r}: {len(chosen)} component(s) kept ({mode}), {polygons} polygon(s) "
                  f"-> {p['mask']}")
        summary = {
            "scene": info.path, "width": info.width, "height": info.height, "crs": info.crs_text(),
            "transform": list(info.transform)[:6], "georeferenced": info.georeferenced,
            "model": scorer.model_name, "checkpoint": args.resume, "device": str(device), "amp": amp,
            "inference": engine.inference_options(args),
            "tile": plan.tile, "overlap_px": plan.overlap, "blend": plan.blend, "batch_size": plan.batch_size,
            "threshold": plan.threshold, "mode": mode, "topk": topk if mode == "topk" else None,
            "context_pass": bool(args.context_pass), "scale": scale,
            "tiles": result.tiles, "tiles_scored": result.scored, "tiles_skipped_nodata": result.skipped,
            "resumed_from_row": result.resumed_from_row, "seconds_tiled_pass": round(seconds, 3),
            "tiles_per_s": round(result.scored / seconds, 3) if seconds > 0 else None,
            "seconds_total": round(time.time() - t_start, 3), **peak_memory_mb(device),
            "sentences": per_sentence,
        }
        (out / f"{stem}_predict.json").write_text(json.dumps(summary, indent=2))
    finally:
        reader.close()
    return 0


def _interrupt(signum, frame) -> None:
    # A job scheduler's SIGTERM unwinds like Ctrl-C, so the tile index of the rows on disk is saved.
    raise KeyboardInterrupt


def main() -> int:
    import signal

    signal.signal(signal.SIGTERM, _interrupt)
    with sc.gdal_env():
        return run(args_lib.get_predict_parser().parse_args())


if __name__ == "__main__":
    engine.cli_main(main)
