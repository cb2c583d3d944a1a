"""Check a dataset on disk and optionally export what the loaders produce.

    python -m data.check --dataset rrsisd --refer_data_root DIR --split val --bert_tokenizer BERT_DIR
                         [--splitBy unc] [--max_tokens N] [--export OUT] [--cache_dir DIR]

``--dataset`` is one of rrsisd, refsegrs, refcoco, refcoco+, refcocog (``--splitBy`` umd or
google for refcocog; the default is the dataset's first: unc, or umd for refcocog).

Prints, per split: refs, sentences and images; then counted warnings (never a crash) for
missing or unreadable images, 16-bit / 32-bit / float images (read min-max rescaled to 8 bit),
images whose size differs from the annotation, masks that cannot be decoded, empty masks, empty
or whitespace-only sentences (skipped in training), sentences cut by the token limit and
word-mask flags past it.

``--export OUT`` (one split) writes ``OUT/samples.jsonl`` -- one object per (ref, sentence) in
evaluation ('all') order with keys ``ref_id`` (REFER datasets) or ``line`` (RefSegRS), ``sent_index``,
``sentence``, ``input_ids``, ``attention_mask``, ``target_mask``, ``position_mask``, ``mask_png``
-- and ``OUT/masks/*.png``: each ground truth at the image's original resolution, 0/255.

Bad input (missing folder or file, unknown split, tokenizer folder without vocab.txt, ...)
prints one line on stderr and exits with code 2.
"""
from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from PIL import Image

from .datasets import DATASET_NAMES, DEFAULT_MAX_TOKENS, REFER_DATASETS, build_dataset, mask_file_stem, split_counts
from .transforms import is_high_depth

EXAMPLES_SHOWN = 5


class _OneLineParser(argparse.ArgumentParser):
    """argparse that reports a bad command line in one line (exit code 2)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    p = _OneLineParser(prog="python -m data.check", description=__doc__.split("\n\n")[0])
    p.add_argument("--dataset", required=True, choices=DATASET_NAMES)
    p.add_argument("--refer_data_root", required=True, help="dataset root folder")
    p.add_argument("--split", required=True, help="split name, or several separated by commas (e.g. train,val,test)")
    p.add_argument("--bert_tokenizer", required=True, help="local BERT tokenizer folder (with vocab.txt)")
    p.add_argument("--splitBy", default=None,
                   help="REFER split file refs(<splitBy>).p (default: unc; umd for refcocog)")
    p.add_argument("--max_tokens", type=int, default=None,
                   help="token limit (default: rrsisd 22 as in FIANet, 20 for the others)")
    p.add_argument("--export", default=None, help="write samples.jsonl and masks/*.png here (one split only)")
    p.add_argument("--cache_dir", default=None, help="text-feature cache folder (default: <root>/.openrrsis_cache)")
    return p


class Warnings:
    """Counted warnings with a few examples each."""

    def __init__(self) -> None:
        self.counts: Counter = Counter()
        self.examples: dict[str, list[str]] = {}

    def add(self, kind: str, example: str) -> None:
        self.counts[kind] += 1
        shown = self.examples.setdefault(kind, [])
        if len(shown) < EXAMPLES_SHOWN:
            shown.append(example)


def _annotated_sizes(ds: Any) -> dict[str, tuple[int, int]]:
    """Image path -> (width, height) from the annotations (REFER datasets only)."""
    refer = getattr(ds, "refer", None)
    if refer is None:
        return {}
    sizes = {}
    for sample in ds.samples:
        image = refer.Imgs[refer.Refs[sample.ref_id]["image_id"]]
        if "width" in image and "height" in image:
            sizes[sample.image_path] = (int(image["width"]), int(image["height"]))
    return sizes


def check_images(ds: Any, warnings: Warnings) -> None:
    expected = _annotated_sizes(ds)
    for path in dict.fromkeys(s.image_path for s in ds.samples):
        if not Path(path).is_file():
            warnings.add("missing images", path)
            continue
        try:
            with Image.open(path) as image:
                size, mode = image.size, image.mode
                image.verify()
        except Exception as exc:
            warnings.add("unreadable images", f"{path} ({type(exc).__name__})")
            continue
        if is_high_depth(mode):
            warnings.add(f"images with more than 8 bits per pixel (mode {mode}; read min-max rescaled to 8 bit)", path)
        if path in expected and expected[path] != size:
            warnings.add("images whose size differs from the annotation", f"{path} {size} vs {expected[path]}")


def group_masks(ds: Any, warnings: Warnings) -> list[np.ndarray | None]:
    """Original-resolution mask of every ref (None where it cannot be read)."""
    masks = []
    for members in ds.groups:
        sample = ds.samples[members[0]]
        try:
            mask = ds.original_mask(members[0])
        except (OSError, ValueError) as exc:
            warnings.add("unreadable masks", str(exc).splitlines()[0] if str(exc) else repr(exc))
            masks.append(None)
            continue
        if not mask.any():
            warnings.add("empty masks", mask_file_stem(sample))
        masks.append(mask)
    return masks


def check_text(ds: Any, warnings: Warnings) -> None:
    features = ds.features
    for sample in ds.samples:
        if not sample.sentence:  # stored stripped: empty or whitespace-only in the file
            if sample.line < 0:
                where = f"ref {sample.ref_id} sentence {sample.sent_index}"
            else:
                where = f"line {sample.line + 1}"
            warnings.add("empty sentences (skipped in training)", where)
    for index in np.flatnonzero(features.lengths > ds.max_tokens):
        warnings.add(f"sentences truncated at {ds.max_tokens} tokens",
                     f"{ds.samples[index].sentence!r} ({int(features.lengths[index])} tokens)")
    for index in np.flatnonzero(features.overflow):
        warnings.add(f"word-mask flags clipped at {ds.max_tokens} tokens", repr(ds.samples[index].sentence))


def export(ds: Any, masks: Sequence[np.ndarray | None], out: Path) -> int:
    """Write samples.jsonl and masks/*.png; returns the number of samples written."""
    (out / "masks").mkdir(parents=True, exist_ok=True)
    features = ds.features
    mask_files: list[str | None] = []
    for members, mask in zip(ds.groups, masks):
        if mask is None:
            mask_files.append(None)
            continue
        name = f"masks/{mask_file_stem(ds.samples[members[0]])}.png"
        Image.fromarray((mask > 0).astype(np.uint8) * 255).save(out / name)
        mask_files.append(name)
    with open(out / "samples.jsonl", "w", encoding="utf-8") as f:
        for index, sample in enumerate(ds.samples):
            record: dict[str, Any] = {"ref_id": sample.ref_id} if sample.line < 0 else {"line": sample.line}
            record.update(
                sent_index=sample.sent_index, sentence=sample.sentence,
                input_ids=features.input_ids[index].tolist(), attention_mask=features.attention_mask[index].tolist(),
                target_mask=features.target_mask[index].tolist(), position_mask=features.position_mask[index].tolist(),
                mask_png=mask_files[sample.group],
            )
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
    return len(ds.samples)


def run(args: argparse.Namespace) -> int:
    splits = [s.strip() for s in args.split.split(",") if s.strip()]
    if not splits:
        raise ValueError("--split is empty")
    if args.export and len(splits) != 1:
        raise ValueError(f"--export needs exactly one split, got --split {args.split}")
    max_tokens = args.max_tokens if args.max_tokens is not None else DEFAULT_MAX_TOKENS[args.dataset]
    if max_tokens < 2:
        raise ValueError(f"--max_tokens must be at least 2, got {max_tokens}")
    kwargs: dict[str, Any] = dict(max_tokens=max_tokens, mode="eval", eval_protocol="all", cache_dir=args.cache_dir)
    if args.dataset in REFER_DATASETS:
        kwargs["splitBy"] = args.splitBy
    for split in splits:
        ds = build_dataset(args.dataset, args.refer_data_root, split, args.bert_tokenizer, **kwargs)
        counts = split_counts(ds)
        print(f"{args.dataset} {split}: refs {counts['refs']}, sentences {counts['sentences']}, "
              f"images {counts['images']}")
        warnings = Warnings()
        check_images(ds, warnings)
        masks = group_masks(ds, warnings)
        check_text(ds, warnings)
        if not warnings.counts:
            print("  no warnings")
        for kind, count in warnings.counts.items():
            print(f"  warning: {kind}: {count} (e.g. {'; '.join(warnings.examples[kind])})")
        if args.export:
            out = Path(args.export)
            written = export(ds, masks, out)
            print(f"  exported {written} samples to {out / 'samples.jsonl'} and masks to {out / 'masks'}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return run(args)
    except (OSError, ValueError, KeyError) as exc:
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else repr(exc)
        print(f"python -m data.check: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
