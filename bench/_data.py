"""Dataset construction at RRSIS-D scale (``--what data``): first start vs cached start.

Writes synthetic annotations at RRSIS-D scale into a temporary folder (17,402 refs with one
caption each, split 12,181 / 1,740 / 3,481 like the real ``refs(unc).p``; 800x800 images in
``instances.json`` segmented by polygons (70 %) or compressed RLE (30 %); no image files, since
construction never opens images), then builds the train, val and test ``RRSISDDataset`` (mode
eval, the dataset's default 22 tokens) in fresh processes: the first with an empty cache
(tokenisation + word masks), then ``repeats`` more reusing it (median / min / max reported).
Text variants: ``masks`` (ids + FIANet word masks with NLTK), ``ids`` (``word_masks=False``:
what LAVT / RMSIN / CrossVLT need) and ``builtin`` (word masks with the built-in POS tagger).
``masks`` needs the NLTK tagger data (``NLTK_DATA``; defaults to ``../shared/nltk_data`` when
present). The ``tiny`` setting writes 1/100 of the refs.
"""
from __future__ import annotations

import json
import pickle
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from _common import ROOT, BenchError, Options, base_record, child_env

SPLITS = {"train": 12181, "val": 1740, "test": 3481}
SCALE = {"paper": 1, "tiny": 100}  # the tiny setting writes 1/100 of the refs
IMAGE_SIZE = 800

CLASSES = ["airplane", "airport", "golf field", "expressway service area", "baseball field", "stadium",
           "ground track field", "storage tank", "basketball court", "chimney", "tennis court", "overpass",
           "train station", "ship", "expressway toll station", "dam", "harbor", "bridge", "vehicle", "windmill"]
COLOURS = ["white", "gray", "red", "blue", "green", "dark", "black", "yellow"]
SIZES = ["large", "small", "big", "long", "round", "tiny"]
PLACES = ["on the left", "on the right", "at the top", "at the bottom", "in the middle", "in the upper left",
          "in the lower right", "in the bottom left corner", "at the top right of the image",
          "in the center of the image", "on the far left", "near the edge of the image"]
RELATIONS = ["near the {}", "next to the {}", "on the left of the {}", "above the {}", "below the {}",
             "between the {} and the {}", "to the right of the {}", "beside the {}"]


def caption(rng: random.Random, cls: str) -> str:
    """A caption in RRSIS-D style: article, optional size/colour, class, place and/or relation."""
    words = [rng.choice(["the", "a", "the", "the"])]
    if rng.random() < 0.4:
        words.append(rng.choice(SIZES))
    if rng.random() < 0.4:
        words.append(rng.choice(COLOURS))
    words.append(cls)
    if rng.random() < 0.7:
        words.append(rng.choice(PLACES))
    if rng.random() < 0.5:
        relation = rng.choice(RELATIONS)
        words.append(relation.format(*[rng.choice(CLASSES) for _ in range(relation.count("{}"))]))
    if rng.random() < 0.1:  # a few long ones that exceed the 22-token limit
        words.append("which is " + rng.choice(PLACES) + " and " + rng.choice(RELATIONS).format(rng.choice(CLASSES), rng.choice(CLASSES)))
    return " ".join(words)


def polygon(rng: random.Random, points: int = 40) -> list[float]:
    """A star-shaped blob polygon inside an 800x800 image."""
    import math

    cx, cy = rng.uniform(150, 650), rng.uniform(150, 650)
    radius = rng.uniform(20, 140)
    coords = []
    for k in range(points):
        angle = 2 * math.pi * k / points
        r = radius * rng.uniform(0.8, 1.0)
        coords += [round(cx + r * math.cos(angle), 2), round(cy + r * math.sin(angle), 2)]
    return coords


def generate(root: Path, seed: int = 0, scale: int = 1) -> dict:
    """Write ``<root>/rrsisd/{refs(unc).p, instances.json}`` and a tokenizer folder; returns paths.
    ``scale``: write 1/scale of RRSIS-D's refs per split."""
    from pycocotools import mask as mask_utils

    rng = random.Random(seed)
    (root / "rrsisd").mkdir(parents=True, exist_ok=True)
    (root / "images" / "rrsisd" / "JPEGImages").mkdir(parents=True, exist_ok=True)
    images, anns, refs, words = [], [], [], set()
    split_list = [s for s, n in SPLITS.items() for _ in range(max(1, n // scale))]
    rng.shuffle(split_list)
    for index, split in enumerate(split_list):
        image_id, cat = index + 1, rng.randrange(len(CLASSES))
        poly = polygon(rng)
        if rng.random() < 0.3:
            rle = mask_utils.frPyObjects([poly], IMAGE_SIZE, IMAGE_SIZE)[0]
            segmentation = [{"size": rle["size"], "counts": rle["counts"].decode("ascii")}]
        else:
            segmentation = [poly]
        text = caption(rng, CLASSES[cat])
        words.update(text.split())
        images.append({"id": image_id, "file_name": f"{image_id:05d}.jpg", "height": IMAGE_SIZE, "width": IMAGE_SIZE})
        anns.append({"id": image_id, "image_id": image_id, "category_id": cat + 1, "segmentation": segmentation,
                     "area": 0, "bbox": [0, 0, 1, 1], "iscrowd": 0})
        refs.append({"ref_id": index, "ann_id": image_id, "image_id": image_id, "category_id": cat + 1,
                     "split": split, "sent_ids": [index], "file_name": f"{image_id:05d}.jpg",
                     "sentences": [{"raw": text, "sent": text, "sent_id": index, "tokens": text.split()}]})
    categories = [{"id": i + 1, "name": name} for i, name in enumerate(CLASSES)]
    (root / "rrsisd" / "instances.json").write_text(json.dumps({"images": images, "annotations": anns,
                                                                  "categories": categories}))
    with open(root / "rrsisd" / "refs(unc).p", "wb") as f:
        pickle.dump(refs, f, protocol=2)
    tok = root / "bert"
    tok.mkdir(exist_ok=True)
    (tok / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + sorted(words)) + "\n")
    return {"root": root, "tokenizer": tok, "refs": len(refs),
            "instances_mb": (root / "rrsisd" / "instances.json").stat().st_size / 2**20,
            "refs_mb": (root / "rrsisd" / "refs(unc).p").stat().st_size / 2**20}


TEXT_VARIANTS = {"masks": {}, "ids": {"word_masks": False}, "builtin": {"pos_tagger": "builtin"}}


def construct(root: str, tokenizer: str, cache: str, variant: str = "masks") -> dict:
    """Time imports and the construction of the three splits in this (fresh) process."""
    start = time.perf_counter()
    from data.datasets import RRSISDDataset

    result = {"import_s": time.perf_counter() - start, "splits": {}}
    total = 0.0
    for split in SPLITS:
        t0 = time.perf_counter()
        ds = RRSISDDataset(root, split, tokenizer, mode="eval", cache_dir=cache, **TEXT_VARIANTS[variant])
        elapsed = time.perf_counter() - t0
        total += elapsed
        result["splits"][split] = {"seconds": round(elapsed, 3), "items": len(ds)}
    result["construct_s"] = total
    result["transformers_imported"] = "transformers" in sys.modules
    result["nltk_imported"] = "nltk" in sys.modules
    return result


def run_fresh(root: Path, tokenizer: Path, cache: Path, variant: str) -> dict:
    """`construct` in a fresh process (``bench/run.py --construct``)."""
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "run.py"), "--construct", str(root), str(tokenizer),
                           str(cache), variant], capture_output=True, text=True, env=child_env(), cwd=ROOT)
    if proc.returncode != 0:
        raise BenchError(f"dataset construction ({variant}) failed: {proc.stderr.strip().splitlines()[-1:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def measure(setting: str, variants: list[str], opts: Options, repeats: int) -> list[dict[str, Any]]:
    """One record per text variant: the first start and ``repeats`` cached starts, each in a fresh process."""
    unknown = [v for v in variants if v not in TEXT_VARIANTS]
    if unknown or not variants:
        raise BenchError(f"--text {','.join(variants)}: choose from {', '.join(TEXT_VARIANTS)}")
    work = Path(tempfile.mkdtemp(prefix="openrrsis-bench-data-"))
    records = []
    try:
        t0 = time.perf_counter()
        info = generate(work / "data", scale=SCALE[setting])
        generate_s = time.perf_counter() - t0
        for variant in variants:
            cache = work / f"cache-{variant}"
            first = run_fresh(info["root"], info["tokenizer"], cache, variant)
            runs = [run_fresh(info["root"], info["tokenizer"], cache, variant) for _ in range(max(1, repeats))]
            records.append(record(setting, opts, info, generate_s, variant, first, runs))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return records


def record(setting: str, opts: Options, info: dict, generate_s: float, variant: str, first: dict,
           runs: list[dict]) -> dict[str, Any]:
    """A variant's record: ``median_s`` / ``min_s`` / ``max_s`` of the cached starts, ``first_start_s``."""
    times = [r["construct_s"] for r in runs]
    cached = sorted(runs, key=lambda r: r["construct_s"])[len(runs) // 2]  # the median run
    rec = base_record("-", "data", setting, opts, None, 22)
    rec.update({
        "text": variant, "batch": None, "refs": info["refs"], "sentences": info["refs"],
        "instances_json_mb": round(info["instances_mb"], 1), "refs_pickle_mb": round(info["refs_mb"], 1),
        "generate_s": round(generate_s, 2), "first_start_s": round(first["construct_s"], 3),
        "median_s": round(statistics.median(times), 3), "min_s": round(min(times), 3), "max_s": round(max(times), 3),
        "times_s": [round(t, 3) for t in times], "unit": "s/construction (train+val+test, cached)",
        "import_s": round(cached["import_s"], 2), "first_splits": first["splits"], "cached_splits": cached["splits"],
        "cached_loads_transformers": cached["transformers_imported"], "cached_loads_nltk": cached["nltk_imported"],
        "first_loads_nltk": first["nltk_imported"], "peak_mem_mib": None,
    })
    return rec
