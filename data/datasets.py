"""Referring-segmentation datasets: RRSIS-D, the RefCOCO family, ReferIt (REFER layout) and RefSegRS.

Every item is a plain dict (batches with torch's ``default_collate``)::

    image     float32 (3, S, S)   resized (PIL bilinear) and ImageNet-normalised
    target    int64   (S, S)      0/1, resized with PIL nearest
    text      int64   (N,)        word-piece ids, 0-padded (N = max_tokens)
    l_mask    int64   (N,)        attention mask
    t_mask    int64   (N,)        FIANet ground-object mask (zeros when word_masks=False)
    p_mask    int64   (N,)        FIANet spatial-position mask (zeros when word_masks=False)
    ref_id    int                 REFER ref id (-1 for RefSegRS)
    line      int                 0-based line of the phrase file (-1 for REFER datasets)
    sent_index int                sentence index within the ref
    sentence  str                 the sentence, stripped
    category  str                 class name (REFER) or '' (RefSegRS)
    index     int                 item index
    neg_text  int64   (K, N)      only with ``negative_samples=K`` (train mode): hard negative sentences

Which sentence an item uses (as the reference loaders of LAVT, RMSIN and FIANet):

* ``mode='train'``: one item per ref, a random sentence per access (``np.random``); empty or
  whitespace-only sentences are skipped (one warning with their count; a ref left without any
  sentence is left out), while evaluation keeps them so that the protocol's counts hold;
* ``mode='eval', eval_protocol='all'``: one item per (ref, sentence), ref then sentence order
  (the ``test.py`` protocol of LAVT / RMSIN);
* ``mode='eval', eval_protocol='one-per-ref'``: one item per ref, the sentence drawn once by a
  seeded generator (FIANet's one-sentence protocol, made deterministic).

Hard negatives (TRIS, Liu et al., ICCV 2023: the calibration's negative expressions), train mode
only, ``negative_samples=K`` (`build_dataset`, or ``set_negative_samples``): at every access, K times
a random OTHER ref of the same image (same split) and a random sentence of it (duplicates allowed);
when the image has no other ref, random sentences of random refs of the split, rejecting those
equal (as strings) to the item's own sentence. Same tokenizer and length as ``text``; drawn with
``np.random`` like the item's sentence.

``dataset.samples`` lists every (ref, sentence) in ``'all'`` order; ``original_mask`` gives a
sample's ground truth at the image's own resolution. Token ids and word masks are computed
once and cached on disk (see ``data.word_masks.build_text_features``). Only FIANet reads the word
masks: ``word_masks=False`` skips them (and NLTK) for the other models; ``pos_tagger`` picks the
tagger of the position masks (``data.word_masks``: ``"nltk"`` or the opt-in ``"builtin"``).

Datasets (``build_dataset`` names):

* ``rrsisd``: ``<root>/rrsisd/refs(unc).p``, images ``<root>/images/rrsisd/JPEGImages/``; 22 tokens
  (FIANet); the train split blacks out random boxes on 20 % of the refs in train mode.
* ``refcoco``, ``refcoco+`` (splitBy ``unc``), ``refcocog`` (splitBy ``umd`` or ``google``):
  ``<root>/<name>/refs(<splitBy>).p`` and ``instances.json``, COCO train2014 images under
  ``<root>/images/mscoco/images/train2014/`` (greyscale files are converted to RGB); 20 tokens
  (LAVT); splits ``train``, ``val``, ``test`` (every split containing "test"), ``testA``,
  ``testB`` (``testC``); no black boxes; FIANet's class lists do not cover them (``t_mask`` zeros).
* ``refclef`` (ReferIt, Kazemzadeh et al., EMNLP 2014; splitBy ``unc`` or ``berkeley``):
  ``<root>/refclef/refs(<splitBy>).p`` and ``instances.json``, SAIAPR TC-12 images under
  ``<root>/images/saiapr_tc-12/`` (``file_name`` ``<nn>/images/<id>.jpg``); masks are RLE, decoded
  by the REFER API like every other segmentation; 20 tokens; splits ``train``, ``val``, ``test``;
  every sentence of every ref is evaluated; no black boxes, no FIANet class list (``t_mask`` zeros).
* ``referit_tris``: ReferIt in the annotation format released with TRIS (Liu et al., ICCV 2023;
  derived from the MultiGrounding release): ``<root>/annotations/{train,test}.pickle`` (a dict keyed
  by image id, each value with an ``annotations`` list of ``image_id`` / ``query`` / ``bbox`` /
  ``segmentation`` dicts, read by a restricted unpickler), images ``<root>/images/<id>.jpg``; one item
  per annotation (``ref_id`` = running index); the mask is the union of the decoded RLE parts;
  20 tokens. In eval mode annotations whose first box covers at most 5 % of the image are skipped,
  as TRIS's ReferIt evaluation does; train mode keeps every annotation.
* ``refsegrs``: ``images/<id>.tif``, ``masks/<id>.tif``, ``output_phrase_<split>.txt``; 20 tokens.
"""
from __future__ import annotations

import json
import os
import pickle
import sys
import weakref
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from PIL import Image

from refer.refer import (
    _CONTAINER_TYPES,
    _SCALAR_TYPES,
    IMAGE_DIRS,
    REFER,
    ReferError,
    _PlainUnpickler,
    decode_segmentation,
)

from .tokenizer import check_tokenizer_folder
from .transforms import IMAGENET_MEAN, IMAGENET_STD, SegmentationTransform, black_box, choose_black_box_refs, load_rgb
from .word_masks import DATASET_CLASSES, TextFeatures, build_text_features, default_cache_dirs

__all__ = ["DatasetError", "DatasetFileNotFoundError", "Sample", "ReferDataset", "RRSISDDataset",
           "RefSegRSDataset", "ReferItTRISDataset", "load_plain_pickle", "build_dataset", "DATASET_NAMES", "REFER_DATASETS", "DEFAULT_MAX_TOKENS",
           "REFSEGRS_SPLITS", "REFERIT_TRIS_SPLITS", "SPLIT_BY"]

DATASET_NAMES = ("rrsisd", "refsegrs", "refcoco", "refcoco+", "refcocog", "refclef", "referit_tris")
REFER_DATASETS = ("rrsisd", "refcoco", "refcoco+", "refcocog", "refclef")
# splitBy values each REFER dataset is distributed with (used for a hint when the file is missing).
SPLIT_BY = {"rrsisd": ("unc",), "refcoco": ("unc", "google"), "refcoco+": ("unc",), "refcocog": ("umd", "google"),
            "refclef": ("unc", "berkeley")}
# Reference token lengths: FIANet uses 22 on RRSIS-D, 20 elsewhere; LAVT 20 on RefCOCO.
DEFAULT_MAX_TOKENS = {"rrsisd": 22, "refsegrs": 20, "refcoco": 20, "refcoco+": 20, "refcocog": 20, "refclef": 20,
                      "referit_tris": 20}
REFSEGRS_SPLITS = ("train", "val", "test")
MODES = ("train", "eval")
EVAL_PROTOCOLS = ("all", "one-per-ref")


class DatasetError(ValueError):
    """Bad dataset argument or content (message is one line)."""


class DatasetFileNotFoundError(FileNotFoundError):
    """A dataset file or folder is missing (message names the path)."""


class Sample(NamedTuple):
    """One (ref, sentence) pair; ``group`` is the index of its ref among the dataset's refs."""

    ref_id: int
    line: int
    sent_index: int
    sentence: str
    image_path: str
    category: str
    group: int


def open_rgb(path: str | Path) -> Image.Image:
    """Open an image as 8-bit RGB (`data.transforms.load_rgb`: 16-bit and float images are
    min-max rescaled); one-line errors for a missing or unreadable file."""
    path = Path(path)
    if not path.is_file():
        raise DatasetFileNotFoundError(f"image not found: {path}")
    try:
        return load_rgb(path)
    except Exception as exc:
        raise DatasetError(f"cannot read image {path}: {type(exc).__name__}: {exc}") from None


class _GroundingDataset(torch.utils.data.Dataset):
    """Shared item logic: subclasses fill ``samples`` / ``groups`` and load images and masks."""

    has_black_box = False

    def _setup(self, samples: list[Sample], features: TextFeatures, *, img_size: int, mode: str,
               eval_protocol: str, seed: int) -> None:
        if mode not in MODES:
            raise DatasetError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
        if eval_protocol not in EVAL_PROTOCOLS:
            raise DatasetError(f"eval_protocol must be one of {', '.join(EVAL_PROTOCOLS)}, got {eval_protocol!r}")
        self.samples = samples
        self.mode, self.eval_protocol, self.seed = mode, eval_protocol, seed
        self.transform = SegmentationTransform(img_size)
        self.groups: list[list[int]] = []
        for index, sample in enumerate(samples):
            if sample.group == len(self.groups):
                self.groups.append([])
            self.groups[sample.group].append(index)
        self.features = features
        self._text = {
            "text": torch.from_numpy(features.input_ids.astype(np.int64)),
            "l_mask": torch.from_numpy(features.attention_mask.astype(np.int64)),
            "t_mask": torch.from_numpy(features.target_mask.astype(np.int64)),
            "p_mask": torch.from_numpy(features.position_mask.astype(np.int64)),
        }
        if mode == "eval" and eval_protocol == "all":
            self._fixed: list[int] | None = list(range(len(samples)))
        elif mode == "eval":  # one sentence per ref, drawn once with a seeded generator
            rng = np.random.RandomState(seed)
            self._fixed = [members[rng.randint(len(members))] for members in self.groups]
        else:
            self._fixed = None  # train: the sentence is drawn at every access
        self.negative_samples = 0

    def set_negative_samples(self, count: int) -> None:
        """Give every training item ``neg_text`` (``count``, T): ``count`` hard negative sentences
        (module docstring); 0 turns them off. Train mode only."""
        count = int(count)
        if count < 0:
            raise DatasetError(f"negative_samples must be >= 0, got {count}")
        if count and self.mode != "train":
            raise DatasetError("negative_samples is for train mode only (evaluation items carry no negatives)")
        self.negative_samples = count
        if not count:
            return
        by_image: dict[str, list[int]] = {}
        for g, members in enumerate(self.groups):
            by_image.setdefault(self.samples[members[0]].image_path, []).append(g)
        # other refs of the same image, per ref
        self._same_image = [[h for h in by_image[self.samples[m[0]].image_path] if h != g]
                            for g, m in enumerate(self.groups)]
        if any(not others for others in self._same_image) and len({s.sentence for s in self.samples}) < 2:
            raise DatasetError("negative_samples: a ref has no other ref on its image and every sentence of the "
                               "split is the same string, so no negative sentence can be drawn")

    def _negative_rows(self, group: int, sentence: str) -> list[int]:
        """Sample rows of ``negative_samples`` negatives for an item of ``group`` whose sentence is ``sentence``."""
        rows: list[int] = []
        others = self._same_image[group]
        while len(rows) < self.negative_samples:
            if others:
                members = self.groups[others[np.random.choice(len(others))]]
                rows.append(members[np.random.choice(len(members))])
            else:  # no other ref on the image: any ref of the split, another sentence string
                members = self.groups[np.random.choice(len(self.groups))]
                row = members[np.random.choice(len(members))]
                if self.samples[row].sentence != sentence:
                    rows.append(row)
        return rows

    # -- to be provided by subclasses -------------------------------------------------------------
    def _image(self, sample: Sample) -> Image.Image:
        return open_rgb(sample.image_path)

    def original_mask(self, sample_index: int) -> np.ndarray:
        """Ground truth of ``samples[sample_index]`` at the original resolution: uint8 0/1 ``(h, w)``."""
        raise NotImplementedError

    def original_box(self, sample_index: int) -> list[float] | None:
        """The annotated COCO box ``[x, y, w, h]`` of ``samples[sample_index]`` in original pixels, or
        None when the dataset has no boxes (RefSegRS)."""
        return None

    # -- items -----------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self._fixed) if self._fixed is not None else len(self.groups)

    def sample_index(self, index: int) -> int:
        """Which sample item ``index`` uses (random in train mode)."""
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(f"item index {index} out of range for {len(self)} items")
        if self._fixed is not None:
            return self._fixed[index]
        members = self.groups[index]
        return members[np.random.choice(len(members))]

    def get_original_mask(self, index: int) -> np.ndarray:
        """Ground truth of item ``index`` at the image's original resolution (uint8 0/1)."""
        if index < 0:
            index += len(self)
        if self._fixed is not None:
            return self.original_mask(self._fixed[index])
        return self.original_mask(self.groups[index][0])  # every sentence of a ref shares the mask

    def _augment(self, sample: Sample, image: Image.Image) -> Image.Image:
        return image

    def _target_mask(self, row: int, image: Image.Image) -> np.ndarray:
        """The training / evaluation target of sample ``row`` at the original resolution: the
        ground truth, or the ref's pseudo mask once `use_pseudo_masks` was called."""
        pseudo = getattr(self, "_pseudo_masks", None)
        if pseudo is None:
            return self.original_mask(row)
        ref_id = self.samples[row].ref_id
        mask = read_pseudo_mask(pseudo[ref_id])
        if mask.shape != (image.height, image.width):
            raise DatasetError(f"pseudo mask {pseudo[ref_id]} is {mask.shape[1]}x{mask.shape[0]}, its image "
                               f"{self.samples[row].image_path} is {image.width}x{image.height}")
        return mask

    def use_pseudo_masks(self, folder: str | Path) -> None:
        """Train on the pseudo masks of a ``tools.pseudo_masks`` folder (TRIS stage 2, Liu et al.,
        ICCV 2023, Sec. 3.5): every sentence of a ref gets the union of that ref's pseudo mask
        (resized with nearest neighbour by the transform). From here on the ground truth of this
        dataset cannot be read: ``original_mask`` / ``get_original_mask`` / ``original_box`` raise."""
        folder = Path(folder)
        index_file, summary = folder / "index.jsonl", folder / "summary.json"
        if not index_file.is_file():
            raise DatasetFileNotFoundError(f"--pseudo_path {folder}: no index.jsonl (not a tools.pseudo_masks folder)")
        if not summary.is_file():
            raise DatasetError(f"--pseudo_path {folder}: no summary.json, the pseudo-mask run did not finish "
                               f"(rerun tools.pseudo_masks)")
        masks: dict[int, Path] = {}
        for n, line in enumerate(index_file.read_text().splitlines(), start=1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
                masks[int(rec["ref_id"])] = folder / str(rec["mask"])
            except (ValueError, KeyError, TypeError):
                raise DatasetError(f"--pseudo_path {index_file}: line {n} is not a {{ref_id, mask}} record") from None
        refs = [self.samples[members[0]].ref_id for members in self.groups]
        missing = [r for r in refs if r not in masks]
        if missing:
            raise DatasetError(f"--pseudo_path {folder}: {len(missing)} of {len(refs)} training refs have no pseudo "
                               f"mask (e.g. ref {missing[0]}); make them from the PRMS maps of this split")
        self._pseudo_masks = {r: masks[r] for r in refs}

        def refused(*_: Any, **__: Any) -> Any:
            raise DatasetError("the ground truth of a dataset trained on pseudo masks is never read")

        # Instance attributes shadow the methods: no code path can reach the ground truth any more.
        self.original_mask = self.get_original_mask = self.original_box = refused  # type: ignore[method-assign]

    def __getitem__(self, index: int) -> dict[str, Any]:
        if index < 0:
            index += len(self)
        row = self.sample_index(index)
        sample = self.samples[row]
        try:
            image = self._augment(sample, self._image(sample))
        except (DatasetError, DatasetFileNotFoundError) as e:  # name the ref / line too (one line)
            where = f"ref {sample.ref_id}" if sample.ref_id >= 0 else f"line {sample.line}"
            raise type(e)(f"{e} ({where}, sentence {sample.sent_index})") from None
        image_t, target_t = self.transform(image, self._target_mask(row, image))
        item = {"image": image_t, "target": target_t}
        for key, table in self._text.items():
            item[key] = table[row]
        item.update(ref_id=sample.ref_id, line=sample.line, sent_index=sample.sent_index,
                    sentence=sample.sentence, category=sample.category, index=index)
        if self.negative_samples:
            item["neg_text"] = self._text["text"][self._negative_rows(sample.group, sample.sentence)]
        return item


def warn_empty_sentences(where: str, skipped: int, dropped_refs: int) -> None:
    """One warning line (stderr) for all empty / whitespace-only sentences a training split skipped."""
    if skipped:
        refs = f"; left out {dropped_refs} refs without any sentence left" if dropped_refs else ""
        print(f"warning: {where}: skipped {skipped} empty or whitespace-only sentences for training{refs} "
              "(python -m data.check lists them)", file=sys.stderr, flush=True)


# REFER indexes alive in this process, so building train and val re-reads the files only once.
_REFER_CACHE: "weakref.WeakValueDictionary[tuple, REFER]" = weakref.WeakValueDictionary()


def load_refer(root: Path, dataset: str, split_by: str) -> REFER:
    """``REFER(root, dataset, split_by)``, shared while unchanged files are already loaded."""
    files = (root / dataset / f"refs({split_by}).p", root / dataset / "instances.json")
    try:
        stamp = tuple((st.st_mtime_ns, st.st_size) for st in (f.stat() for f in files))
    except OSError:
        return REFER(root, dataset=dataset, splitBy=split_by)  # let REFER name the missing file
    key = (str(root.resolve()), dataset, split_by, stamp)
    refer = _REFER_CACHE.get(key)
    if refer is None:
        refer = REFER(root, dataset=dataset, splitBy=split_by)
        _REFER_CACHE[key] = refer
    return refer


def _cache_dirs(root: Path, cache_dir: str | Path | None) -> list[Path]:
    return [Path(cache_dir)] if cache_dir is not None else default_cache_dirs(root)


class ReferDataset(_GroundingDataset):
    """A REFER-layout dataset: ``rrsisd``, ``refcoco``, ``refcoco+``, ``refcocog`` or ``refclef``.

    Target = pixels where the summed segmentation equals 1 (overlapping parts become holes,
    as in the reference). For ``rrsisd`` the train split in train mode blacks out random
    boxes on a fixed 20 % of the refs (``black_box``); evaluation never does, and the RefCOCO
    family never does by default. Images are converted to RGB (COCO has greyscale files).
    """

    def __init__(self, root: str | Path, split: str, tokenizer_dir: str | Path, *, dataset: str = "rrsisd",
                 img_size: int = 480, max_tokens: int | None = None, splitBy: str | None = None, mode: str = "train",
                 eval_protocol: str = "all", seed: int = 0, black_box: bool | None = None,
                 cache_dir: str | Path | None = None, word_masks: bool = True, pos_tagger: str | None = None):
        if dataset not in IMAGE_DIRS:
            raise DatasetError(f"unknown REFER dataset {dataset!r}; valid: {', '.join(IMAGE_DIRS)}")
        self.root, self.split, self.dataset = Path(root), split, dataset
        if not self.root.is_dir():
            raise DatasetFileNotFoundError(f"dataset root (--refer_data_root) not found: {self.root}")
        check_tokenizer_folder(tokenizer_dir)
        max_tokens = DEFAULT_MAX_TOKENS[dataset] if max_tokens is None else max_tokens
        self.max_tokens = max_tokens
        splitBy = SPLIT_BY[dataset][0] if splitBy is None else splitBy  # refcocog: umd
        self.split_by = splitBy
        ref_file = self.root / dataset / f"refs({splitBy}).p"
        if not ref_file.is_file() and splitBy not in SPLIT_BY.get(dataset, (splitBy,)):
            raise DatasetFileNotFoundError(
                f"REFER refs file not found: {ref_file} (--splitBy {splitBy}; {dataset} is distributed "
                f"with --splitBy {' or '.join(SPLIT_BY[dataset])})")
        self.refer = load_refer(self.root, dataset, splitBy)
        ref_ids = self.refer.getRefIds(split=split)
        if not ref_ids:
            raise DatasetError(f"split {split!r} has no refs in {self.refer.ref_file}")

        samples, raws = [], []
        skipped = dropped_refs = 0
        image_dir = str(self.refer.image_dir) + os.sep  # plain strings: Path joins cost ~0.1 s on 17k refs
        for ref_id in ref_ids:
            ref = self.refer.Refs[ref_id]
            sentences = ref["sentences"]
            if not isinstance(sentences, list) or not sentences:
                raise DatasetError(f"ref {ref_id} in {self.refer.ref_file} has no sentences")
            image = self.refer.Imgs.get(ref["image_id"])
            if image is None or "file_name" not in image:
                raise DatasetError(f"ref {ref_id}: image {ref['image_id']!r} missing from {self.refer.instances_file}")
            image_path = image_dir + image["file_name"]
            category = str(self.refer.Cats.get(ref.get("category_id"), ""))
            group = samples[-1].group + 1 if samples else 0  # consecutive over the refs kept
            kept = 0
            for sent_index, sent in enumerate(sentences):
                if not isinstance(sent, dict) or not isinstance(sent.get("raw"), str):
                    raise DatasetError(f"ref {ref_id} in {self.refer.ref_file}: sentence {sent_index} has no 'raw' text")
                if mode == "train" and not sent["raw"].strip():
                    skipped += 1  # nothing to ground; evaluation keeps it (the protocol counts it)
                    continue
                raws.append(sent["raw"])
                samples.append(Sample(ref_id, -1, sent_index, sent["raw"].strip(), image_path, category, group))
                kept += 1
            dropped_refs += kept == 0
        warn_empty_sentences(f"{dataset} {split}", skipped, dropped_refs)
        if not samples:
            raise DatasetError(f"split {split!r} of {self.refer.ref_file} has no non-empty sentences")

        features = build_text_features(
            raws, tokenizer_dir, DATASET_CLASSES.get(dataset, ()), max_tokens,
            cache_dirs=_cache_dirs(self.root, cache_dir), name=f"{dataset}-{splitBy}-{split}-{max_tokens}",
            word_masks=word_masks, pos_tagger=pos_tagger,
        )
        self._setup(samples, features, img_size=img_size, mode=mode, eval_protocol=eval_protocol, seed=seed)
        use_boxes = (dataset == "rrsisd") if black_box is None else bool(black_box)
        # Drawn for every split like the reference, but only used in train mode on the train split.
        self.black_box_refs = choose_black_box_refs(ref_ids, seed)
        self.black_box_active = use_boxes and split == "train" and mode == "train"

    def _augment(self, sample: Sample, image: Image.Image) -> Image.Image:
        if self.black_box_active and sample.ref_id in self.black_box_refs:
            return black_box(image)
        return image

    def original_mask(self, sample_index: int) -> np.ndarray:
        ref = self.refer.Refs[self.samples[sample_index].ref_id]
        try:
            summed = self.refer.getMask(ref)
        except ReferError as exc:
            raise DatasetError(f"ref {ref['ref_id']}: {exc}") from None
        return (summed == 1).astype(np.uint8)

    def original_box(self, sample_index: int) -> list[float] | None:
        ann = self.refer.refToAnn.get(self.samples[sample_index].ref_id)
        box = ann.get("bbox") if ann else None
        return [float(v) for v in box] if box is not None and len(box) == 4 else None


class RRSISDDataset(ReferDataset):
    """RRSIS-D (REFER layout, ``<root>/rrsisd/refs(unc).p``); max 22 tokens like FIANet."""

    def __init__(self, root: str | Path, split: str, tokenizer_dir: str | Path, *, img_size: int = 480,
                 max_tokens: int | None = 22, splitBy: str | None = "unc", mode: str = "train", eval_protocol: str = "all",
                 seed: int = 0, black_box: bool = True, cache_dir: str | Path | None = None,
                 word_masks: bool = True, pos_tagger: str | None = None):
        super().__init__(root, split, tokenizer_dir, dataset="rrsisd", img_size=img_size, max_tokens=max_tokens,
                         splitBy=splitBy, mode=mode, eval_protocol=eval_protocol, seed=seed,
                         black_box=black_box, cache_dir=cache_dir, word_masks=word_masks, pos_tagger=pos_tagger)


def read_refsegrs_mask(path: str | Path) -> np.ndarray:
    """RefSegRS mask -> uint8 0/1 where the grey value is ``> 50``.

    8-bit files are read as greyscale (colour / palette images converted with PIL's ``L``);
    16-bit and 32-bit files keep their raw values, like OpenCV's ``IMREAD_ANYDEPTH`` in the
    reference loader.
    """
    path = Path(path)
    if not path.is_file():
        raise DatasetFileNotFoundError(f"mask not found: {path}")
    try:
        with Image.open(path) as mask:
            mask.load()
            if mask.mode in ("L", "I", "F") or mask.mode.startswith("I;16"):
                values = np.asarray(mask)
            else:
                values = np.asarray(mask.convert("L"))
    except Exception as exc:
        raise DatasetError(f"cannot read mask {path}: {type(exc).__name__}: {exc}") from None
    return (values > 50).astype(np.uint8)


class RefSegRSDataset(_GroundingDataset):
    """RefSegRS: ``images/<id>.tif``, ``masks/<id>.tif``, ``output_phrase_<split>.txt``.

    Each non-empty phrase-file line ``ID word word ...`` is one item with one sentence.
    """

    def __init__(self, root: str | Path, split: str, tokenizer_dir: str | Path, *, img_size: int = 480,
                 max_tokens: int | None = 20, mode: str = "train", eval_protocol: str = "all", seed: int = 0,
                 cache_dir: str | Path | None = None, word_masks: bool = True, pos_tagger: str | None = None):
        self.root, self.split, self.dataset = Path(root), split, "refsegrs"
        if not self.root.is_dir():
            raise DatasetFileNotFoundError(f"dataset root (--refer_data_root) not found: {self.root}")
        if split not in REFSEGRS_SPLITS:
            raise DatasetError(f"unknown RefSegRS split {split!r}; valid: {', '.join(REFSEGRS_SPLITS)}")
        check_tokenizer_folder(tokenizer_dir)
        max_tokens = DEFAULT_MAX_TOKENS["refsegrs"] if max_tokens is None else max_tokens
        self.max_tokens = max_tokens
        self.phrase_file = self.root / f"output_phrase_{split}.txt"
        if not self.phrase_file.is_file():
            raise DatasetFileNotFoundError(f"RefSegRS phrase file not found: {self.phrase_file}")
        try:
            lines = self.phrase_file.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as exc:
            raise DatasetError(f"cannot read {self.phrase_file}: {exc}") from None

        samples, self.sample_ids = [], []
        skipped = 0
        for line_no, text in enumerate(lines):
            if not text.strip():
                continue  # a blank line (e.g. at the end of the file) is not a sample
            sample_id, _, sentence = text.partition(" ")
            if mode == "train" and not sentence.strip():
                skipped += 1  # an id without a sentence: nothing to ground
                continue
            image_path = str(self.root / "images" / f"{sample_id}.tif")
            samples.append(Sample(-1, line_no, 0, sentence.strip(), image_path, "", len(samples)))
            self.sample_ids.append(sample_id)
        warn_empty_sentences(f"refsegrs {split}", skipped, 0)
        if not samples:
            raise DatasetError(f"split {split!r} has no samples in {self.phrase_file}")

        features = build_text_features(
            [s.sentence for s in samples], tokenizer_dir, DATASET_CLASSES["refsegrs"], max_tokens,
            cache_dirs=_cache_dirs(self.root, cache_dir), name=f"refsegrs-{split}-{max_tokens}",
            word_masks=word_masks, pos_tagger=pos_tagger,
        )
        self._setup(samples, features, img_size=img_size, mode=mode, eval_protocol=eval_protocol, seed=seed)

    def mask_path(self, sample_index: int) -> Path:
        return self.root / "masks" / f"{self.sample_ids[sample_index]}.tif"

    def original_mask(self, sample_index: int) -> np.ndarray:
        return read_refsegrs_mask(self.mask_path(sample_index))


class _LatinPlainUnpickler(_PlainUnpickler):
    """The REFER restricted unpickler (every global refused) reading Python 2 strings as latin-1."""

    def __init__(self, file: Any, path: Path):
        pickle.Unpickler.__init__(self, file, encoding="latin1")
        self._path = path


_PLAIN_VALUES = _SCALAR_TYPES | {bytes}  # RLE counts may be bytes in a Python 3 pickle


def load_plain_pickle(path: str | Path) -> Any:
    """Read a pickle that may hold only plain dict / list / tuple / str / bytes / numbers / None.

    Any global (a class, a function such as ``os.system``, a numpy array) is refused before it is
    built, so loading cannot run code; Python 2 ``str`` values are decoded as latin-1.
    """
    path = Path(path)
    if not path.is_file():
        raise DatasetFileNotFoundError(f"annotation file not found: {path}")
    try:
        with open(path, "rb") as f:
            obj = _LatinPlainUnpickler(f, path).load()
    except ReferError as exc:
        raise DatasetError(str(exc).replace("the refs file", "the annotation file")) from None
    except Exception as exc:  # truncated / not a pickle
        raise DatasetError(f"cannot read {path}: {type(exc).__name__}: {exc}") from None
    stack = [obj]
    while stack:  # the opcodes can still build sets, bytearrays ...: only plain values pass
        item = stack.pop()
        if type(item) in _PLAIN_VALUES:
            continue
        if type(item) not in _CONTAINER_TYPES:
            raise DatasetError(f"unexpected {type(item).__name__} value in {path}: the annotation file may only "
                               "contain plain dict/list/tuple/str/bytes/int/float/bool/None values")
        stack.extend((*item.keys(), *item.values()) if type(item) is dict else item)
    return obj


REFERIT_TRIS_SPLITS = ("train", "test")
REFERIT_TRIS_MIN_BOX = 0.05  # eval skips annotations whose box covers <= 5 % of the image


class ReferItTRISDataset(_GroundingDataset):
    """ReferIt in TRIS's own annotation format (Liu et al., "Referring Image Segmentation Using Text
    Supervision", ICCV 2023, Sec. 4.1 evaluates on its ReferIt test split).

    ``<root>/annotations/<split>.pickle`` is a dict keyed by image id; each value's ``annotations``
    list holds dicts with ``image_id``, ``query`` (the expression), ``bbox`` (a list of
    ``[x1, y1, x2, y2]`` pixel boxes, the first one the target's) and ``segmentation`` (COCO RLE:
    a list of parts decoded to ``(H, W, k)`` and summed over ``k``). Images: ``<root>/images/<id>.jpg``.

    Every annotation is one item with one sentence (``ref_id`` is its running index over the file,
    images in file order). The target is the union of the RLE parts (summed > 0). In eval mode an
    annotation is skipped unless its box area ``(x2 - x1) * (y2 - y1)`` exceeds 5 % of ``H * W``
    (the image size stored in the RLE, else read from the image header), as TRIS's ReferIt
    evaluation does; train mode keeps all annotations, as its training loader does.
    """

    def __init__(self, root: str | Path, split: str, tokenizer_dir: str | Path, *, img_size: int = 320,
                 max_tokens: int | None = 20, mode: str = "train", eval_protocol: str = "all", seed: int = 0,
                 cache_dir: str | Path | None = None, word_masks: bool = True, pos_tagger: str | None = None):
        self.root, self.split, self.dataset = Path(root), split, "referit_tris"
        if not self.root.is_dir():
            raise DatasetFileNotFoundError(f"dataset root (--refer_data_root) not found: {self.root}")
        self.annotation_file = self.root / "annotations" / f"{split}.pickle"
        if not self.annotation_file.is_file():
            raise DatasetFileNotFoundError(
                f"ReferIt (TRIS format) annotation file not found: {self.annotation_file} "
                f"(--split; the release has {', '.join(REFERIT_TRIS_SPLITS)})")
        check_tokenizer_folder(tokenizer_dir)
        max_tokens = DEFAULT_MAX_TOKENS["referit_tris"] if max_tokens is None else max_tokens
        self.max_tokens = max_tokens
        table = load_plain_pickle(self.annotation_file)
        where = self.annotation_file
        if not isinstance(table, dict):
            raise DatasetError(f"{where} must hold a dict keyed by image id, not a {type(table).__name__}")

        samples: list[Sample] = []
        self.annotations: list[dict] = []
        self.small_boxes_skipped = skipped = 0
        image_dir = self.root / "images"
        for key, entry in table.items():
            anns = entry.get("annotations") if isinstance(entry, dict) else None
            if not isinstance(anns, list):
                raise DatasetError(f"{where}: image {key!r} has no 'annotations' list")
            for k, ann in enumerate(anns):
                what = f"{where}: image {key!r} annotation {k}"
                if not isinstance(ann, dict) or not isinstance(ann.get("query"), str):
                    raise DatasetError(f"{what} has no 'query' string")
                image_path = str(image_dir / f"{ann.get('image_id', key)}.jpg")
                box = self._first_box(ann, what)
                if mode == "eval":
                    h, w = self._image_size(ann, image_path)
                    if (box[3] - box[1]) * (box[2] - box[0]) <= REFERIT_TRIS_MIN_BOX * h * w:
                        self.small_boxes_skipped += 1
                        continue
                elif not ann["query"].strip():
                    skipped += 1  # nothing to ground
                    continue
                samples.append(Sample(len(samples), -1, 0, ann["query"].strip(), image_path, "", len(samples)))
                self.annotations.append(ann)
        warn_empty_sentences(f"referit_tris {split}", skipped, 0)
        if not samples:
            raise DatasetError(f"split {split!r} of {where} has no annotations to use")

        features = build_text_features(
            [ann["query"] for ann in self.annotations], tokenizer_dir, (), max_tokens,
            cache_dirs=_cache_dirs(self.root, cache_dir), name=f"referit_tris-{split}-{max_tokens}",
            word_masks=word_masks, pos_tagger=pos_tagger,
        )
        self._setup(samples, features, img_size=img_size, mode=mode, eval_protocol=eval_protocol, seed=seed)

    @staticmethod
    def _first_box(ann: dict, what: str) -> list[float]:
        boxes = ann.get("bbox")
        box = boxes[0] if isinstance(boxes, (list, tuple)) and boxes else None
        if not isinstance(box, (list, tuple)) or len(box) != 4 or not all(
                isinstance(v, (int, float)) and not isinstance(v, bool) for v in box):
            raise DatasetError(f"{what}: 'bbox' must be a list of [x1, y1, x2, y2] boxes, got {boxes!r:.80}")
        return [float(v) for v in box]

    @staticmethod
    def _rle_size(ann: dict) -> tuple[int, int] | None:
        seg = ann.get("segmentation")
        part = seg[0] if isinstance(seg, list) and seg else seg
        size = part.get("size") if isinstance(part, dict) else None
        if isinstance(size, (list, tuple)) and len(size) == 2:
            return int(size[0]), int(size[1])
        return None

    def _image_size(self, ann: dict, image_path: str) -> tuple[int, int]:
        size = self._rle_size(ann)
        if size is not None:
            return size
        if not Path(image_path).is_file():
            raise DatasetFileNotFoundError(f"image not found: {image_path}")
        try:
            with Image.open(image_path) as image:  # the header only: PIL decodes lazily
                return image.height, image.width
        except Exception as exc:
            raise DatasetError(f"cannot read image {image_path}: {type(exc).__name__}: {exc}") from None

    def original_mask(self, sample_index: int) -> np.ndarray:
        ann = self.annotations[sample_index]
        size = self._rle_size(ann)
        if size is None:
            raise DatasetError(f"{self.annotation_file}: annotation of ref {sample_index} has no RLE 'size'")
        try:
            summed = decode_segmentation(ann.get("segmentation"), *size, where=f"{self.annotation_file} ref {sample_index}")
        except ReferError as exc:
            raise DatasetError(str(exc)) from None
        return (summed > 0).astype(np.uint8)

    def original_box(self, sample_index: int) -> list[float] | None:
        x1, y1, x2, y2 = self._first_box(self.annotations[sample_index], str(self.annotation_file))
        return [x1, y1, x2 - x1, y2 - y1]  # the COCO [x, y, w, h] the evaluation expects


def read_pseudo_mask(path: str | Path) -> np.ndarray:
    """A pseudo-mask PNG (mode L, 0/1 or 0/255) -> uint8 0/1 ``(H, W)``; one-line errors."""
    path = Path(path)
    if not path.is_file():
        raise DatasetFileNotFoundError(f"pseudo mask not found: {path}")
    try:
        with Image.open(path) as im:
            values = np.asarray(im.convert("L"))
    except Exception as exc:
        raise DatasetError(f"cannot read pseudo mask {path}: {type(exc).__name__}: {exc}") from None
    return (values > 0).astype(np.uint8)


def build_dataset(name: str, root: str | Path, split: str, tokenizer_dir: str | Path, **kwargs: Any) -> _GroundingDataset:
    """Dataset by ``--dataset`` name (one of ``DATASET_NAMES``); keyword arguments pass through.

    Common keywords: ``img_size``, ``max_tokens`` (None: the dataset's reference length), ``mode``,
    ``eval_protocol``, ``seed``, ``cache_dir``, ``word_masks``, ``pos_tagger``, ``mean`` / ``std``
    (image normalisation), ``pseudo_masks`` (a pseudo-mask folder: `use_pseudo_masks`),
    ``negative_samples`` (train mode: hard negative sentences per item, ``neg_text``); REFER datasets
    also take ``splitBy``. ``tokenizer_dir`` is a BERT folder or a CLIP tokenizer string (``data.tokenizer``).
    """
    mean, std = kwargs.pop("mean", None), kwargs.pop("std", None)
    negatives = int(kwargs.pop("negative_samples", 0) or 0)
    pseudo = kwargs.pop("pseudo_masks", None)
    if name == "rrsisd":
        ds: _GroundingDataset = RRSISDDataset(root, split, tokenizer_dir, **kwargs)
    elif name == "refsegrs":
        ds = RefSegRSDataset(root, split, tokenizer_dir, **kwargs)
    elif name == "referit_tris":
        ds = ReferItTRISDataset(root, split, tokenizer_dir, **kwargs)
    elif name in REFER_DATASETS:
        ds = ReferDataset(root, split, tokenizer_dir, dataset=name, **kwargs)
    else:
        raise DatasetError(f"--dataset {name!r} is not supported; valid: {', '.join(DATASET_NAMES)}")
    if mean is not None or std is not None:  # the model's image normalisation (its spec)
        ds.transform = SegmentationTransform(ds.transform.size, mean or IMAGENET_MEAN, std or IMAGENET_STD)
    if pseudo:
        ds.use_pseudo_masks(pseudo)
    if negatives:
        ds.set_negative_samples(negatives)
    return ds


def split_counts(dataset: _GroundingDataset) -> dict[str, int]:
    """Refs, sentences and distinct images of a dataset."""
    return {"refs": len(dataset.groups), "sentences": len(dataset.samples),
            "images": len({s.image_path for s in dataset.samples})}


def mask_file_stem(sample: Sample) -> str:
    """File stem for a sample's ground-truth export: shared by all sentences of a ref."""
    return f"ref_{sample.ref_id}" if sample.line < 0 else f"line_{sample.line}"
