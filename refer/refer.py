"""REFER annotation API for REFER-layout datasets (RRSIS-D, RefCOCO, RefCOCO+, RefCOCOg, ReferIt).

Layout read (``data_root`` is ``--refer_data_root``)::

    <data_root>/<dataset>/refs(<splitBy>).p     pickle: list of ref dicts
    <data_root>/<dataset>/instances.json        COCO-style images / annotations / categories
    <data_root>/images/rrsisd/JPEGImages/       images of rrsisd
    <data_root>/images/mscoco/images/train2014/ images of the RefCOCO family
    <data_root>/images/saiapr_tc-12/            images of refclef (ReferIt; the instances'
                                                ``file_name`` is ``<nn>/images/<id>.jpg``)

Behaviour that decides what a dataset contains follows the reference REFER API
(as the LAVT family uses it): refs keep their pickle order; ``train``/``val`` select by
equality, ``test`` every split containing "test", ``testA``/``testB``/``testC`` by their last
letter; ``getMask`` sums the decoded parts of a segmentation (overlaps sum to 2+).
Fixed relative to the reference: a bare RLE dict and uncompressed RLE (``counts`` as a list)
are accepted, and the refs pickle is read with a restricted unpickler that builds plain
containers only, so a hostile file cannot run code.
"""
from __future__ import annotations

import io
import json
import pickle
import warnings
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["REFER", "ReferError", "ReferFileNotFoundError", "load_refs_pickle", "IMAGE_DIRS", "SPLIT_NAMES"]

# Image folder of each REFER dataset, relative to the data root.
IMAGE_DIRS = {
    "rrsisd": Path("images/rrsisd/JPEGImages"),
    "refcoco": Path("images/mscoco/images/train2014"),
    "refcoco+": Path("images/mscoco/images/train2014"),
    "refcocog": Path("images/mscoco/images/train2014"),
    "refclef": Path("images/saiapr_tc-12"),  # ReferIt (Kazemzadeh et al., EMNLP 2014) on SAIAPR TC-12
}

SPLIT_NAMES = ("train", "val", "test", "testA", "testB", "testC", "testAB", "testBC", "testAC")

_SCALAR_TYPES = frozenset((str, int, float, bool, type(None)))
_CONTAINER_TYPES = frozenset((dict, list, tuple))


class ReferError(ValueError):
    """Bad REFER annotation content or argument (message is one line)."""


class ReferFileNotFoundError(FileNotFoundError):
    """A REFER annotation file is missing (message names the path)."""


class _PlainUnpickler(pickle.Unpickler):
    """Unpickler that refuses every global: only plain containers and scalars can be built.

    dict / list / tuple / str / int / float / bool / None are encoded with dedicated opcodes
    and never reach ``find_class``; anything else (classes, functions such as ``os.system``)
    does and is refused, so loading cannot execute code.
    """

    def __init__(self, file: io.BufferedIOBase, path: Path):
        super().__init__(file)
        self._path = path

    def find_class(self, module: str, name: str) -> Any:  # noqa: D401 - pickle hook
        raise ReferError(
            f"refusing to unpickle {module}.{name} from {self._path}: the refs file may only contain "
            "plain dict/list/tuple/str/int/float/bool/None values"
        )

    def persistent_load(self, pid: Any) -> Any:
        raise ReferError(f"refusing persistent id in {self._path}: the refs file may only contain plain values")


def _check_plain(obj: Any, path: Path) -> None:
    """Raise ReferError if ``obj`` holds anything but plain containers and scalars.

    Works a container at a time (``set(map(type, ...))`` runs in C), so a 17k-ref file takes
    a few tens of milliseconds.
    """
    stack = [obj]
    if type(obj) not in _CONTAINER_TYPES:
        stack = [[obj]]
    while stack:
        item = stack.pop()
        children = (*item.keys(), *item.values()) if type(item) is dict else item
        kinds = set(map(type, children))
        if kinds <= _SCALAR_TYPES:
            continue
        bad = kinds - _SCALAR_TYPES - _CONTAINER_TYPES
        if bad:
            name = sorted(k.__name__ for k in bad)[0]
            raise ReferError(
                f"unexpected {name} value in {path}: the refs file may only contain "
                "plain dict/list/tuple/str/int/float/bool/None values"
            )
        stack.extend(child for child in children if type(child) in _CONTAINER_TYPES)


def load_refs_pickle(path: str | Path) -> list[dict]:
    """Read a ``refs(<splitBy>).p`` file safely; returns the list of ref dicts in file order."""
    path = Path(path)
    if not path.is_file():
        raise ReferFileNotFoundError(f"REFER refs file not found: {path}")
    with open(path, "rb") as f:
        try:
            refs = _PlainUnpickler(f, path).load()
        except ReferError:
            raise
        except Exception as exc:  # truncated / not a pickle
            raise ReferError(f"cannot read REFER refs file {path}: {type(exc).__name__}: {exc}") from None
    _check_plain(refs, path)
    if not isinstance(refs, list) or not all(isinstance(r, dict) for r in refs):
        raise ReferError(f"REFER refs file {path} must hold a list of ref dicts")
    return refs


def _as_list(ids: Any) -> list:
    """Accept a single id or an iterable of ids (the reference API accepts both)."""
    if ids is None:
        return []
    if isinstance(ids, (list, tuple, set, frozenset, np.ndarray)):
        return list(ids)
    return [ids]


class REFER:
    """Index over one REFER dataset: refs, annotations, images, categories.

    Attributes mirror the reference API: ``Refs``, ``Anns``, ``Imgs``, ``Cats`` (id -> record),
    ``Sents`` (sent_id -> sentence dict), ``imgToRefs``, ``imgToAnns``, ``refToAnn``,
    ``annToRef``, ``catToRefs``, ``sentToRef``; ``data['refs']`` is the ref list in pickle order.
    """

    def __init__(self, data_root: str | Path, dataset: str = "rrsisd", splitBy: str = "unc"):
        self.data_root = Path(data_root)
        self.dataset = dataset
        self.split_by = splitBy
        if not self.data_root.is_dir():
            raise ReferFileNotFoundError(f"REFER data root not found: {self.data_root}")
        if dataset not in IMAGE_DIRS:
            raise ReferError(f"unknown REFER dataset {dataset!r}; valid: {', '.join(IMAGE_DIRS)}")
        self.data_dir = self.data_root / dataset
        self.image_dir = self.data_root / IMAGE_DIRS[dataset]
        self.ref_file = self.data_dir / f"refs({splitBy}).p"
        self.instances_file = self.data_dir / "instances.json"

        refs = load_refs_pickle(self.ref_file)
        if not self.instances_file.is_file():
            raise ReferFileNotFoundError(f"REFER instances file not found: {self.instances_file}")
        try:
            with open(self.instances_file, "rb") as f:
                instances = json.load(f)
        except (ValueError, UnicodeDecodeError) as exc:
            raise ReferError(f"cannot parse {self.instances_file}: {exc}") from None
        if not isinstance(instances, dict):
            raise ReferError(f"{self.instances_file} must hold a JSON object with images/annotations/categories")
        self.data = {
            "refs": refs,
            "images": instances.get("images", []),
            "annotations": instances.get("annotations", []),
            "categories": instances.get("categories", []),
        }
        self._create_index()

    # ------------------------------------------------------------------ index
    def _create_index(self) -> None:
        try:
            self.Anns = {ann["id"]: ann for ann in self.data["annotations"]}
            self.Imgs = {img["id"]: img for img in self.data["images"]}
            self.Cats = {cat["id"]: cat["name"] for cat in self.data["categories"]}
        except (KeyError, TypeError) as exc:
            raise ReferError(f"malformed record in {self.instances_file}: missing field {exc}") from None
        self.imgToAnns: dict[Any, list] = {}
        for ann in self.data["annotations"]:
            self.imgToAnns.setdefault(ann.get("image_id"), []).append(ann)

        self.Refs: dict[Any, dict] = {}
        self.imgToRefs: dict[Any, list] = {}
        self.refToAnn: dict[Any, dict] = {}
        self.annToRef: dict[Any, dict] = {}
        self.catToRefs: dict[Any, list] = {}
        self.Sents: dict[Any, dict] = {}
        self.sentToRef: dict[Any, dict] = {}
        for ref in self.data["refs"]:
            missing = [key for key in ("ref_id", "ann_id", "image_id", "split", "sentences") if key not in ref]
            if missing:
                raise ReferError(f"ref without field {missing[0]!r} in {self.ref_file}")
            ref_id, ann_id, image_id, sentences = ref["ref_id"], ref["ann_id"], ref["image_id"], ref["sentences"]
            self.Refs[ref_id] = ref
            self.imgToRefs.setdefault(image_id, []).append(ref)
            self.catToRefs.setdefault(ref.get("category_id"), []).append(ref)
            self.refToAnn[ref_id] = self.Anns.get(ann_id)
            self.annToRef[ann_id] = ref
            for sent in sentences:
                if isinstance(sent, dict) and "sent_id" in sent:
                    self.Sents[sent["sent_id"]] = sent
                    self.sentToRef[sent["sent_id"]] = ref

    # ------------------------------------------------------------------ queries
    @staticmethod
    def _filter_split(refs: list[dict], split: str) -> list[dict]:
        if split in ("testA", "testB", "testC"):
            return [r for r in refs if split[-1] in r["split"]]
        if split in ("testAB", "testBC", "testAC"):
            return [r for r in refs if r["split"] == split]
        if split == "test":
            return [r for r in refs if "test" in r["split"]]
        if split in ("train", "val"):
            return [r for r in refs if r["split"] == split]
        raise ReferError(f"no such split {split!r}; valid: {', '.join(SPLIT_NAMES)}")

    def getRefIds(self, image_ids: Any = (), cat_ids: Any = (), ref_ids: Any = (), split: str = "") -> list:
        """Ref ids (pickle order) matching every given filter."""
        image_ids, cat_ids, ref_ids = _as_list(image_ids), _as_list(cat_ids), _as_list(ref_ids)
        if image_ids:
            refs = [ref for image_id in image_ids for ref in self.imgToRefs.get(image_id, [])]
        else:
            refs = self.data["refs"]
        if cat_ids:
            wanted = set(cat_ids)
            refs = [r for r in refs if r.get("category_id") in wanted]
        if ref_ids:
            wanted = set(ref_ids)
            refs = [r for r in refs if r["ref_id"] in wanted]
        if split:
            refs = self._filter_split(refs, split)
        return [r["ref_id"] for r in refs]

    def getAnnIds(self, image_ids: Any = (), cat_ids: Any = (), ref_ids: Any = ()) -> list:
        """Annotation ids matching the filters (all annotations when none is given)."""
        image_ids, cat_ids, ref_ids = _as_list(image_ids), _as_list(cat_ids), _as_list(ref_ids)
        if image_ids:
            anns = [ann for image_id in image_ids for ann in self.imgToAnns.get(image_id, [])]
        else:
            anns = self.data["annotations"]
        if cat_ids:
            wanted = set(cat_ids)
            anns = [a for a in anns if a.get("category_id") in wanted]
        ann_ids = [a["id"] for a in anns]
        if ref_ids:
            ref_anns = {self.Refs[r]["ann_id"] for r in ref_ids if r in self.Refs}
            ann_ids = [a for a in ann_ids if a in ref_anns]
        return ann_ids

    def getImgIds(self, ref_ids: Any = ()) -> list:
        """Image ids of the given refs (first-seen order, unique), or all image ids."""
        ref_ids = _as_list(ref_ids)
        if not ref_ids:
            return list(self.Imgs)
        return list(dict.fromkeys(self.Refs[r]["image_id"] for r in ref_ids))

    def getCatIds(self) -> list:
        return list(self.Cats)

    def loadRefs(self, ref_ids: Any = ()) -> list[dict]:
        return [self.Refs[r] for r in _as_list(ref_ids)]

    def loadAnns(self, ann_ids: Any = ()) -> list[dict]:
        return [self.Anns[a] for a in _as_list(ann_ids)]

    def loadImgs(self, image_ids: Any = ()) -> list[dict]:
        return [self.Imgs[i] for i in _as_list(image_ids)]

    def loadCats(self, cat_ids: Any = ()) -> list[str]:
        return [self.Cats[c] for c in _as_list(cat_ids)]

    def getRefBox(self, ref_id: Any) -> list:
        return self.refToAnn[ref_id]["bbox"]

    def image_path(self, image_id: Any) -> Path:
        """Path of an image file (the reference hard-wires the folder per dataset)."""
        return self.image_dir / self.Imgs[image_id]["file_name"]

    # ------------------------------------------------------------------ masks
    def getMask(self, ref: dict) -> np.ndarray:
        """Summed mask of a ref's annotation: uint8 ``(h, w)``, 1 inside one part, 2+ on overlaps."""
        ann = self.refToAnn.get(ref["ref_id"])
        if ann is None:
            raise ReferError(f"ref {ref['ref_id']}: annotation {ref.get('ann_id')!r} not in {self.instances_file}")
        image = self.Imgs.get(ref["image_id"])
        if image is None:
            raise ReferError(f"ref {ref['ref_id']}: image {ref['image_id']!r} not in {self.instances_file}")
        try:
            height, width = int(image["height"]), int(image["width"])
        except (KeyError, TypeError, ValueError):
            raise ReferError(f"image {ref['image_id']!r} in {self.instances_file} lacks height/width") from None
        return decode_segmentation(ann.get("segmentation"), height, width, where=f"annotation {ann.get('id')!r}")


def _rle_list(segmentation: Any, height: int, width: int, where: str) -> list[dict]:
    """Turn any supported segmentation form into a list of compressed RLE dicts."""
    from pycocotools import mask as mask_utils  # local: only needed when masks are decoded

    if isinstance(segmentation, dict):
        segmentation = [segmentation]  # bare RLE dict: the reference would crash here
    if not isinstance(segmentation, list):
        raise ReferError(f"{where}: unsupported segmentation of type {type(segmentation).__name__}")
    if not segmentation:
        return []
    if isinstance(segmentation[0], list):
        # Polygons, converted exactly as the reference does (frPyObjects on the whole list).
        try:
            return mask_utils.frPyObjects(segmentation, height, width)
        except Exception as exc:
            raise ReferError(f"{where}: bad polygon segmentation ({exc})") from None
    rles = []
    for part in segmentation:
        if not isinstance(part, dict) or "counts" not in part or "size" not in part:
            raise ReferError(f"{where}: segmentation must be polygons or RLE dicts with 'counts' and 'size'")
        if [int(v) for v in part["size"]] != [height, width]:
            raise ReferError(f"{where}: RLE size {list(part['size'])} differs from image size {[height, width]}")
        if isinstance(part["counts"], list):  # uncompressed RLE
            rles.append(mask_utils.frPyObjects(part, height, width))
        else:
            counts = part["counts"]
            rles.append({"size": [height, width], "counts": counts.encode("ascii") if isinstance(counts, str) else counts})
    return rles


def decode_segmentation(segmentation: Any, height: int, width: int, where: str = "segmentation") -> np.ndarray:
    """Decode polygons / RLE list / bare RLE / uncompressed RLE and sum the parts: uint8 ``(h, w)``."""
    from pycocotools import mask as mask_utils

    rles = _rle_list(segmentation, height, width, where)
    if not rles:
        return np.zeros((height, width), dtype=np.uint8)
    try:
        with warnings.catch_warnings():  # pycocotools' numpy-2 "copy keyword" deprecation notice
            warnings.simplefilter("ignore", DeprecationWarning)
            parts = mask_utils.decode(rles)  # (h, w, n) uint8
    except Exception as exc:
        raise ReferError(f"{where}: cannot decode RLE ({exc})") from None
    summed = parts.sum(axis=2, dtype=np.uint32)
    return np.minimum(summed, 255).astype(np.uint8)

