"""Segment what one or more sentences refer to in one image.

    python demo.py --resume CKPT --img IMAGE --text "the storage tank at the top right" \\
        [--text "the ship on the left" ...] [--out DIR]

For every sentence it writes, at the image's own resolution, the predicted mask (``*_mask.png``,
0/255) and an overlay (``*_overlay.png``: the mask tinted over the image with its contour drawn);
with ``--heatmap`` also the model's score map (``predict_scores``) as a JET heat map blended over
the image 0.6 / 0.4 (``*_heatmap.png``, as TRIS's demo draws its response maps).
The image is read and preprocessed once and all sentences run as one batch. (These models fuse
language into the image encoder from the first stage on, so there is no text-free image encoding
that could be reused between sentences.)
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

import args as args_lib
import engine
import utils
from engine import UserError


def slug(text: str, limit: int = 40) -> str:
    s = re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_")
    return s[:limit] or "sentence"


def encode_sentences(sentences: list[str], tokenizer_dir: str, max_tokens: int, word_masks: bool,
                     dataset: str) -> dict[str, torch.Tensor]:
    """Token ids, attention masks and (for FIANet) the ground-object / position word masks."""
    from data import tokenizer as tok
    from data import word_masks as wm

    try:
        tokenizer = tok.load_tokenizer(tokenizer_dir)
    except FileNotFoundError as e:
        raise UserError(str(e)) from None
    if word_masks:
        classes = wm.DATASET_CLASSES.get(dataset)
        if classes is None:
            raise UserError(f"--dataset {dataset!r}: the word masks need the class list of rrsisd or refsegrs")
        try:
            feats = wm.compute_text_features(sentences, tokenizer, classes, max_tokens)
        except wm.NLTKDataMissingError as e:
            raise UserError(str(e)) from None
        arrays = {"text": feats.input_ids, "l_mask": feats.attention_mask,
                  "t_mask": feats.target_mask, "p_mask": feats.position_mask}
    else:
        ids, attention, _ = tok.encode_many(tokenizer, sentences, max_tokens)
        arrays = {"text": np.asarray(ids), "l_mask": np.asarray(attention)}
    return {k: torch.as_tensor(np.asarray(v), dtype=torch.int64) for k, v in arrays.items()}


def run(args) -> int:
    texts_in = [t.strip() for t in args.text]
    empty = [i for i, t in enumerate(texts_in) if not t]
    if empty:
        raise UserError(f"--text number {empty[0] + 1} is empty: give the sentence that names the object")
    device = utils.resolve_device(args.device)
    args.amp = utils.resolve_amp(args.amp, device, log_prefix="[demo]")
    ckpt = engine.read_checkpoint(args.resume)
    saved = ckpt.get("args") if isinstance(ckpt.get("args"), dict) else {}
    stored = engine.checkpoint_model_name(ckpt)
    if stored is None:
        # An original checkpoint: the model flags come from the command line.
        if not args.model:
            raise UserError(f"--resume {args.resume} is an original checkpoint: pass --model and its flags")
        full = args_lib.get_parser().parse_args([])
        for k in ("model", "num_tmem", "window12", "swin_type", "img_size"):
            setattr(full, k, getattr(args, k))
        full.dataset = args.dataset or "rrsisd"
        full.ck_bert = args.ck_bert or full.ck_bert
        engine.resolve_args(full, args.model)
        saved = vars(full)
        model = engine.model_from_checkpoint(ckpt, args.resume, full)
    else:
        model = engine.model_from_checkpoint(ckpt, args.resume, None)
    del ckpt
    model.to(device).eval()
    spec = engine.spec_of(model)

    tokenizer_dir = engine.tokenizer_name(spec, args.bert_tokenizer or saved.get("bert_tokenizer"), saved.get("clip_bpe"))
    if not tokenizer_dir:
        raise UserError("--bert_tokenizer: not stored in the checkpoint; pass the tokenizer folder")
    dataset = args.dataset or saved.get("dataset") or "rrsisd"
    size = int(args.img_size or saved.get("img_size") or model.config.get("img_size") or spec.default_img_size)
    max_tokens = int(args.max_tokens or saved.get("max_tokens") or spec.text.context_length or 20)

    path = Path(args.img)
    if not path.is_file():
        raise UserError(f"--img {args.img}: file not found")
    from data.transforms import image_to_tensor, load_rgb

    try:
        picture = load_rgb(path)  # 16-bit / float images rescaled as in training
    except (UnidentifiedImageError, OSError) as e:
        raise UserError(f"--img {args.img}: not a readable image ({e})") from None

    width, height = picture.size
    image = image_to_tensor(picture.resize((size, size), Image.BILINEAR), spec.mean, spec.std)  # as in training
    texts = encode_sentences(texts_in, tokenizer_dir, max_tokens, spec.text.word_masks, dataset)
    batch = {"image": image[None].expand(len(texts_in), -1, -1, -1), **texts}
    batch = engine.to_device(batch, device)
    with torch.no_grad(), engine.autocast(device, args.amp):
        outputs = model(**engine.model_inputs(batch, spec.inputs))
    # The model's own decision rule at the image's own resolution.
    masks = model.predict_mask(outputs, (height, width)).cpu().numpy().astype(bool)
    heat = model.predict_scores(outputs, (height, width)).float().cpu().numpy() if args.heatmap else None

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    pic = np.asarray(picture)
    summary = []
    for k, (sentence, mask) in enumerate(zip(texts_in, masks)):
        stem = f"{path.stem}_{k}_{slug(sentence)}"
        mask_path, overlay_path = out / f"{stem}_mask.png", out / f"{stem}_overlay.png"
        Image.fromarray(mask.astype(np.uint8) * 255).save(mask_path)
        Image.fromarray(utils.overlay(pic, mask)).save(overlay_path)
        record = {"sentence": sentence, "mask": str(mask_path), "overlay": str(overlay_path),
                  "foreground_fraction": round(float(mask.mean()), 4), "amp": args.amp}
        if heat is not None:  # the score map in JET over the image, blended 0.6 image / 0.4 map
            heat_path = out / f"{stem}_heatmap.png"
            Image.fromarray(utils.heatmap_overlay(pic, heat[k])).save(heat_path)
            record["heatmap"] = str(heat_path)
        summary.append(record)
        print(f"[demo] {sentence!r}: {100 * mask.mean():.1f}% of the image -> {overlay_path}")
    (out / "demo.json").write_text(json.dumps(summary, indent=2))
    return 0


def main() -> int:
    return run(args_lib.get_demo_parser().parse_args())


if __name__ == "__main__":
    engine.cli_main(main)
