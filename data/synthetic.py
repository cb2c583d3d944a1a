"""Synthetic, language-dependent stand-ins for RRSIS-D, RefSegRS, RefCOCO and ReferIt (no download needed).

``python -m data.synthetic --out DIR [--layouts rrsisd,refsegrs,refcoco,refclef]`` (or :func:`generate`)
writes these folders (all layouts by default):

* ``DIR/rrsisd/``   the RRSIS-D / REFER layout: ``rrsisd/refs(unc).p`` (a pickled list of plain
  ref dicts), ``rrsisd/instances.json`` (COCO style) and JPEG images under
  ``images/rrsisd/JPEGImages/``.  Use ``--refer_data_root DIR/rrsisd --dataset rrsisd``.
* ``DIR/refsegrs/`` the RefSegRS layout: ``images/<id>.tif`` (RGB), ``masks/<id>.tif`` (8-bit,
  0/255) and ``output_phrase_{train,val,test}.txt`` with lines ``ID word word ...``.
  Use ``--refer_data_root DIR/refsegrs --dataset refsegrs``.
* ``DIR/refcoco/``  the RefCOCO family in the REFER layout on one set of images:
  ``refcoco/refs(unc).p``, ``refcoco+/refs(unc).p``, ``refcocog/refs(umd).p`` and
  ``refcocog/refs(google).p``, each with ``instances.json``; JPEGs (a few greyscale, as in COCO)
  under ``images/mscoco/images/train2014/``; generic COCO-ish class names; several sentences
  per ref; splits train/val/testA/testB (unc), train/val/test (umd), train/val (google);
  RefCOCO+ sentences use no location words.  Use ``--refer_data_root DIR/refcoco --dataset
  refcoco`` (or ``refcoco+``, or ``refcocog --splitBy umd``).
* ``DIR/refclef/``  ReferIt (RefCLEF) in the REFER layout: ``refclef/refs(unc).p``,
  ``refclef/refs(berkeley).p`` and ``refclef/instances.json`` with every mask stored as RLE; JPEGs
  under ``images/saiapr_tc-12/<nn>/images/<id>.jpg`` as in SAIAPR TC-12; splits train/val/test;
  short article-less expressions, some refs with two.  Use ``--refer_data_root DIR/refclef
  --dataset refclef`` (``--splitBy unc`` or ``berkeley``).
* ``DIR/referit_tris/`` (opt-in: ``--layouts referit_tris``; not written by default) ReferIt in the
  annotation format released with TRIS: ``annotations/{train,test}.pickle`` (a dict keyed by image
  id; each value's ``annotations`` list holds ``image_id``, ``query``, ``bbox`` ``[[x1, y1, x2, y2]]``
  and ``segmentation``, a list of RLE dicts -- every third target split into two parts) and JPEGs
  ``images/<id>.jpg``; every image also shows a small square (its own annotation, a box under 5 %
  of the image, which the evaluation skips).  Use ``--refer_data_root DIR/referit_tris --dataset referit_tris``.
* ``DIR/bert/``     a tiny BERT folder (``config.json``, ``vocab.txt``, ``tokenizer_config.json``)
  whose vocabulary covers every caption; models build BERT from the config with random weights.

Each scene is an aerial-looking textured background with 3-5 non-overlapping objects drawn with
the datasets' real class names.  Every class has its own shape and a small palette of named
colours, so a small model can tell classes apart.  Each scene holds at least one class twice and
is described by several refs with different targets, so a model that ignores the sentence is
ambiguous: the captions single out their target by class, colour, size, position in the image or
relation to a landmark, and a caption only mentions what is true of its target (a distinguishing
cue is true of the target and of no other object of its class).  Repeated classes are mostly drawn
in different colours and a caption's distinguishing cue is drawn by kind (``CUE_WEIGHTS``: colour
and size more often than position and relation), so a small model trained for minutes can learn
the language; a model that ignores the sentence still scores at most about one third.

Object outlines are polygons (rectangles, ellipses and discs as 4-24-gons; a few classes are
made of several separate parts).  The pixel masks are rasterised from the very polygons that the
annotation stores, with pycocotools -- the decoder the REFER loader uses -- so the rendered
object and the decoded annotation agree pixel for pixel.  Parts of one object never overlap (the
REFER loader turns overlaps into holes) and objects keep a margin from each other.

The output is deterministic: the same arguments give byte-identical files.
"""
from __future__ import annotations

import argparse
import json
import math
import pickle
import re
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils

# ---------------------------------------------------------------------------------------------
# Class lists (the real datasets' names, as FIANet's word masks use them)
# ---------------------------------------------------------------------------------------------

RRSISD_CLASSES: tuple[str, ...] = (
    "airplane", "airport", "golf field", "expressway service area", "baseball field", "stadium",
    "ground track field", "storage tank", "basketball court", "chimney", "tennis court",
    "overpass", "train station", "ship", "expressway toll station", "dam", "harbor", "bridge",
    "vehicle", "windmill",
)
REFSEGRS_CLASSES: tuple[str, ...] = (
    "road", "vehicle", "car", "van", "building", "truck", "trailer", "bus", "road marking",
    "bikeway", "sidewalk", "tree", "low vegetation", "impervious surface",
)

SPLITS: tuple[str, ...] = ("train", "val", "test")

# Named colours (RGB).  A caption's colour word is the name of the colour the object was drawn in.
COLOURS: dict[str, tuple[int, int, int]] = {
    "white": (236, 236, 230),
    "grey": (150, 150, 152),
    "black": (30, 30, 36),
    "red": (200, 40, 36),
    "blue": (40, 80, 200),
    "green": (50, 165, 60),
    "dark green": (24, 80, 30),
    "light green": (150, 205, 100),
    "yellow": (230, 205, 40),
    "orange": (235, 125, 30),
    "brown": (120, 72, 40),
}


@dataclass(frozen=True)
class ClassStyle:
    """How a class looks: a shape name (see ``SHAPES``) and the colours it may be drawn in."""

    shape: str
    colours: tuple[str, ...]


RRSISD_STYLES: dict[str, ClassStyle] = {
    "airplane": ClassStyle("plane", ("white", "grey")),
    "airport": ClassStyle("tee", ("grey", "black")),
    "golf field": ClassStyle("blob", ("light green", "green")),
    "expressway service area": ClassStyle("ell", ("grey", "white")),
    "baseball field": ClassStyle("sector", ("brown", "orange")),
    "stadium": ClassStyle("ring", ("red", "green")),
    "ground track field": ClassStyle("capsule", ("red", "orange")),
    "storage tank": ClassStyle("disc", ("white", "grey")),
    "basketball court": ClassStyle("rect", ("orange", "green")),
    "chimney": ClassStyle("triangle", ("black", "grey")),
    "tennis court": ClassStyle("twin", ("green", "blue")),
    "overpass": ClassStyle("plus", ("grey", "white")),
    "train station": ClassStyle("you", ("brown", "grey")),
    "ship": ClassStyle("boat", ("white", "red", "grey")),
    "expressway toll station": ClassStyle("bars", ("grey", "yellow")),
    "dam": ClassStyle("arc", ("grey", "white")),
    "harbor": ClassStyle("comb", ("brown", "grey")),
    "bridge": ClassStyle("band", ("grey", "brown")),
    "vehicle": ClassStyle("rounded", ("red", "white", "blue", "black", "yellow")),
    "windmill": ClassStyle("star", ("white", "grey")),
}
REFSEGRS_STYLES: dict[str, ClassStyle] = {
    "road": ClassStyle("wideband", ("black", "grey")),
    "vehicle": ClassStyle("rounded", ("red", "white", "blue")),
    "car": ClassStyle("ellipse", ("red", "blue", "white", "black")),
    "van": ClassStyle("rect", ("white", "grey")),
    "building": ClassStyle("ell", ("red", "grey", "brown")),
    "truck": ClassStyle("truck", ("white", "orange")),
    "trailer": ClassStyle("long", ("white", "grey")),
    "bus": ClassStyle("capsule", ("yellow", "orange", "red")),
    "road marking": ClassStyle("dashes", ("white", "yellow")),
    "bikeway": ClassStyle("band", ("red", "green")),
    "sidewalk": ClassStyle("band", ("grey", "white")),
    "tree": ClassStyle("blob", ("dark green", "green")),
    "low vegetation": ClassStyle("blob", ("light green", "yellow")),
    "impervious surface": ClassStyle("patch", ("grey", "white")),
}

# Generic COCO-ish classes for the synthetic RefCOCO family (the pipeline uses no class list there).
COCO_STYLES: dict[str, ClassStyle] = {
    "person": ClassStyle("capsule", ("red", "blue", "green", "yellow", "white")),
    "car": ClassStyle("rounded", ("red", "white", "blue", "black")),
    "bus": ClassStyle("long", ("yellow", "orange", "red")),
    "dog": ClassStyle("blob", ("brown", "black", "white")),
    "chair": ClassStyle("you", ("brown", "grey")),
    "umbrella": ClassStyle("sector", ("red", "blue", "yellow")),
    "clock": ClassStyle("disc", ("white", "grey")),
    "donut": ClassStyle("ring", ("brown", "orange")),
    "kite": ClassStyle("triangle", ("red", "orange", "yellow")),
    "bench": ClassStyle("bars", ("brown", "grey")),
    "laptop": ClassStyle("rect", ("grey", "black")),
    "airplane": ClassStyle("plane", ("white", "grey")),
}

# ReferIt-style classes (names from the SAIAPR TC-12 vocabulary) for the synthetic refclef layout.
REFCLEF_STYLES: dict[str, ClassStyle] = {
    "man": ClassStyle("capsule", ("red", "blue", "green", "yellow", "white")),
    "tree": ClassStyle("blob", ("dark green", "green")),
    "rock": ClassStyle("ellipse", ("grey", "brown", "black")),
    "building": ClassStyle("ell", ("red", "grey", "brown")),
    "car": ClassStyle("rounded", ("red", "white", "blue", "black")),
    "boat": ClassStyle("boat", ("white", "red", "blue")),
    "sign": ClassStyle("triangle", ("yellow", "red", "white")),
    "window": ClassStyle("rect", ("white", "black", "blue")),
    "bush": ClassStyle("patch", ("light green", "green")),
    "cloud": ClassStyle("disc", ("white", "grey")),
}

# Backgrounds: (base colour, colour of the tracks drawn across it as bands).
BACKGROUNDS: tuple[tuple[tuple[int, int, int], tuple[int, int, int]], ...] = (
    ((100, 122, 78), (170, 158, 125)),   # green fields, dirt tracks
    ((168, 152, 118), (120, 112, 100)),  # dry fields, dark tracks
    ((118, 118, 112), (88, 88, 86)),     # urban grey, asphalt roads
    ((112, 96, 74), (165, 150, 120)),    # bare soil, light tracks
)

NEW_COLOUR_PROB = 0.9  # chance that a repeated class is drawn in a colour not used yet for it
MIN_CONTRAST = 70.0  # least RGB distance between an object's colour and the background base

# Object-count patterns: how many instances of each chosen class.  Every scene has a class twice
# (its two instances need a cue beyond the class name); most also have a class only once.
LAYOUTS: tuple[tuple[int, ...], ...] = ((2, 1),) * 6 + ((2, 1, 1),) * 3 + ((2, 2), (2, 2, 1), (3, 1, 1))


class SyntheticDataError(ValueError):
    """Bad arguments or an output folder that must not be overwritten."""


# ---------------------------------------------------------------------------------------------
# Shapes: each builder returns the object's polygons (arrays (n, 2) of x, y) in a local frame
# of about [-1, 1]^2.  Several polygons = several separate parts, with gaps between them.
# ---------------------------------------------------------------------------------------------

Polygon = np.ndarray


def _arc(radius_x: float, radius_y: float, start: float, stop: float, n: int) -> Polygon:
    """``n`` points on an ellipse arc from angle ``start`` to ``stop`` (radians, inclusive)."""
    t = np.linspace(start, stop, n)
    return np.stack([radius_x * np.cos(t), radius_y * np.sin(t)], axis=1)


def _ellipse(radius_x: float, radius_y: float, n: int = 20) -> Polygon:
    t = np.arange(n) * (2 * math.pi / n)
    return np.stack([radius_x * np.cos(t), radius_y * np.sin(t)], axis=1)


def _box(x0: float, y0: float, x1: float, y1: float) -> Polygon:
    return np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1]], dtype=np.float64)


def _rounded_box(half_w: float, half_h: float, radius: float, per_corner: int = 5) -> Polygon:
    """A rounded rectangle as a ``4 * per_corner``-gon."""
    corners = ((half_w - radius, half_h - radius, 0.0), (-half_w + radius, half_h - radius, 0.5),
               (-half_w + radius, -half_h + radius, 1.0), (half_w - radius, -half_h + radius, 1.5))
    pts = [np.array([cx, cy]) + _arc(radius, radius, q * math.pi, (q + 0.5) * math.pi, per_corner)
           for cx, cy, q in corners]
    return np.concatenate(pts, axis=0)


def _mirror_outline(upper: Sequence[tuple[float, float]]) -> Polygon:
    """Close a left-right symmetric outline given its upper half (from +x end to -x end)."""
    up = np.array(upper, dtype=np.float64)
    low = up[::-1].copy()
    low[:, 1] *= -1
    keep = low[:, 1] != 0  # points on the axis are already in the upper half
    return np.concatenate([up, low[keep]], axis=0)


def _shape_plane(rng: np.random.Generator) -> list[Polygon]:
    return [_mirror_outline([(1.0, 0.0), (0.8, 0.24), (0.4, 0.24), (-0.05, 1.0), (-0.5, 1.0),
                             (-0.35, 0.24), (-0.62, 0.24), (-0.85, 0.6), (-1.0, 0.6), (-0.96, 0.2)])]


def _shape_boat(rng: np.random.Generator) -> list[Polygon]:
    return [_mirror_outline([(1.0, 0.0), (0.75, 0.24), (0.4, 0.36), (-0.9, 0.36), (-1.0, 0.22)])]


def _shape_star(rng: np.random.Generator) -> list[Polygon]:
    """Three blades around a hub (a windmill seen from above)."""
    pts = []
    for k in range(3):
        a = k * 2 * math.pi / 3
        for r, da in ((0.42, -0.62), (1.0, -0.27), (1.0, 0.27), (0.42, 0.62), (0.38, math.pi / 3)):
            pts.append((r * math.cos(a + da), r * math.sin(a + da)))
    return [np.array(pts)]


def _shape_disc(rng: np.random.Generator) -> list[Polygon]:
    return [_ellipse(1.0, 1.0, 24)]


def _shape_ellipse(rng: np.random.Generator) -> list[Polygon]:
    return [_ellipse(1.0, 0.6, 20)]


def _shape_triangle(rng: np.random.Generator) -> list[Polygon]:
    return [np.array([(1.0, 0.0), (-0.8, 0.95), (-0.8, -0.95)])]


def _shape_rect(rng: np.random.Generator) -> list[Polygon]:
    return [_box(-1.0, -0.6, 1.0, 0.6)]


def _shape_long(rng: np.random.Generator) -> list[Polygon]:
    return [_box(-1.0, -0.4, 1.0, 0.4)]


def _shape_rounded(rng: np.random.Generator) -> list[Polygon]:
    return [_rounded_box(1.0, 0.55, 0.25)]


def _shape_capsule(rng: np.random.Generator) -> list[Polygon]:
    r = 0.5
    return [np.concatenate([np.array([0.5, 0.0]) + _arc(r, r, -math.pi / 2, math.pi / 2, 10),
                            np.array([-0.5, 0.0]) + _arc(r, r, math.pi / 2, 1.5 * math.pi, 10)])]


def _shape_band(rng: np.random.Generator) -> list[Polygon]:
    return [_box(-1.0, -0.36, 1.0, 0.36)]


def _shape_wideband(rng: np.random.Generator) -> list[Polygon]:
    return [_box(-1.0, -0.45, 1.0, 0.45)]


def _shape_plus(rng: np.random.Generator) -> list[Polygon]:
    w = 0.4
    return [np.array([(1, w), (w, w), (w, 1), (-w, 1), (-w, w), (-1, w), (-1, -w), (-w, -w),
                      (-w, -1), (w, -1), (w, -w), (1, -w)], dtype=np.float64)]


def _shape_tee(rng: np.random.Generator) -> list[Polygon]:
    return [np.array([(-1, 1), (-1, 0.3), (-0.3, 0.3), (-0.3, -1), (0.3, -1), (0.3, 0.3),
                      (1, 0.3), (1, 1)], dtype=np.float64)]


def _shape_ell(rng: np.random.Generator) -> list[Polygon]:
    return [np.array([(-1, -1), (0.0, -1), (0.0, 0.0), (1, 0.0), (1, 1), (-1, 1)],
                     dtype=np.float64)]


def _shape_you(rng: np.random.Generator) -> list[Polygon]:
    return [np.array([(-1, -1), (-0.4, -1), (-0.4, 0.2), (0.4, 0.2), (0.4, -1), (1, -1),
                      (1, 1), (-1, 1)], dtype=np.float64)]


def _shape_comb(rng: np.random.Generator) -> list[Polygon]:
    """A quay with three piers."""
    return [np.array([(-1, 1), (-1, -1), (-0.55, -1), (-0.55, 0.2), (-0.22, 0.2), (-0.22, -1),
                      (0.22, -1), (0.22, 0.2), (0.55, 0.2), (0.55, -1), (1, -1), (1, 1)],
                     dtype=np.float64)]


def _shape_sector(rng: np.random.Generator) -> list[Polygon]:
    return [np.concatenate([np.array([[-0.7, 0.7]]),
                            np.array([-0.7, 0.7]) + _arc(1.6, 1.6, -math.pi / 2, 0.0, 12)])]


def _shape_arc(rng: np.random.Generator) -> list[Polygon]:
    outer = _arc(1.0, 1.0, 1.2 * math.pi, 1.8 * math.pi, 12)
    inner = _arc(0.4, 0.4, 1.8 * math.pi, 1.2 * math.pi, 8)
    return [np.concatenate([outer, inner]) + np.array([0.0, 0.6])]


def _shape_ring(rng: np.random.Generator) -> list[Polygon]:
    """An annulus split into two halves with a gap (a multi-part object)."""
    gap = 0.12
    a_out, a_in = math.asin(gap / 1.0), math.asin(gap / 0.45)
    halves = []
    for sign in (1.0, -1.0):
        outer = _arc(1.0, 1.0, a_out, math.pi - a_out, 12)
        inner = _arc(0.45, 0.45, math.pi - a_in, a_in, 8)
        half = np.concatenate([outer, inner])
        half[:, 1] *= sign
        halves.append(half)
    return halves


def _shape_twin(rng: np.random.Generator) -> list[Polygon]:
    return [_box(-1.0, -0.6, -0.12, 0.6), _box(0.12, -0.6, 1.0, 0.6)]


def _shape_truck(rng: np.random.Generator) -> list[Polygon]:
    return [_box(-1.0, -0.45, 0.3, 0.45), _box(0.55, -0.4, 1.0, 0.4)]


def _shape_bars(rng: np.random.Generator) -> list[Polygon]:
    return [_box(-1.0, y - 0.24, 1.0, y + 0.24) for y in (-0.76, 0.0, 0.76)]


def _shape_dashes(rng: np.random.Generator) -> list[Polygon]:
    return [_box(x - 0.25, -0.4, x + 0.25, 0.4) for x in (-0.75, 0.0, 0.75)]


def _shape_blob(rng: np.random.Generator) -> list[Polygon]:
    """An irregular rounded outline (trees, vegetation, golf courses): a wobbly 24-gon."""
    t = np.arange(24) * (2 * math.pi / 24)
    r = np.ones_like(t)
    for k in (2, 3, 5):
        r += rng.uniform(0.04, 0.12) * np.cos(k * t + rng.uniform(0, 2 * math.pi))
    return [np.stack([r * np.cos(t), r * np.sin(t)], axis=1)]


def _shape_patch(rng: np.random.Generator) -> list[Polygon]:
    """An irregular convex quadrilateral (paved areas)."""
    corners = [(1, 1), (-1, 1), (-1, -1), (1, -1)]
    return [np.array([(x * rng.uniform(0.75, 1.0), y * rng.uniform(0.75, 1.0)) for x, y in corners])]


SHAPES: dict[str, Callable[[np.random.Generator], list[Polygon]]] = {
    "plane": _shape_plane, "boat": _shape_boat, "star": _shape_star, "disc": _shape_disc,
    "ellipse": _shape_ellipse, "triangle": _shape_triangle, "rect": _shape_rect, "long": _shape_long,
    "rounded": _shape_rounded, "capsule": _shape_capsule, "band": _shape_band,
    "wideband": _shape_wideband, "plus": _shape_plus, "tee": _shape_tee, "ell": _shape_ell,
    "you": _shape_you, "comb": _shape_comb, "sector": _shape_sector, "arc": _shape_arc,
    "ring": _shape_ring, "twin": _shape_twin, "truck": _shape_truck, "bars": _shape_bars,
    "dashes": _shape_dashes, "blob": _shape_blob, "patch": _shape_patch,
}
# Long thin shapes follow the long side of the space they are placed in.
ELONGATED = frozenset({"band", "wideband", "long", "boat", "capsule", "dashes", "truck"})
# Shapes that still look like themselves when stretched a little to fill their space.
STRETCHABLE = frozenset({"rect", "rounded", "tee", "ell", "you", "comb", "sector", "twin", "bars",
                         "blob", "patch", "plus", "ellipse"})
ROUND = frozenset({"disc", "ring"})


# ---------------------------------------------------------------------------------------------
# Geometry: layout, placement and rasterisation
# ---------------------------------------------------------------------------------------------

Box = tuple[float, float, float, float]  # x0, y0, x1, y1


def split_regions(rng: np.random.Generator, size: int, count: int) -> list[Box]:
    """Cut the image into ``count`` boxes: split the largest box across its long side (40-60 %), repeat."""
    def area(box: Box) -> float:
        return (box[2] - box[0]) * (box[3] - box[1])

    regions: list[Box] = [(0.0, 0.0, float(size), float(size))]
    while len(regions) < count:
        x0, y0, x1, y1 = regions.pop(max(range(len(regions)), key=lambda k: area(regions[k])))
        f = rng.uniform(0.4, 0.6)
        if (x1 - x0) > (y1 - y0) or ((x1 - x0) == (y1 - y0) and rng.random() < 0.5):
            xm = x0 + f * (x1 - x0)
            regions += [(x0, y0, xm, y1), (xm, y0, x1, y1)]
        else:
            ym = y0 + f * (y1 - y0)
            regions += [(x0, y0, x1, ym), (x0, ym, x1, y1)]
    order = rng.permutation(len(regions))
    return [regions[k] for k in order]


def place_shape(rng: np.random.Generator, shape: str, region: Box, margin: float) -> list[Polygon]:
    """Rotate, scale and move a shape's polygons so that they fill most of ``region`` (minus a margin).

    Shapes are turned by a multiple of 90 degrees plus a small tilt (long shapes along the long
    side of the region) and stretched a little to fit it (not at all if ``ROUND``, up to 1.5x if
    ``STRETCHABLE``, else up to 1.2x).
    """
    polys = SHAPES[shape](rng)
    x0, y0, x1, y1 = region[0] + margin, region[1] + margin, region[2] - margin, region[3] - margin
    w, h = x1 - x0, y1 - y0
    if shape in ELONGATED:
        quarter = (0 if w >= h else 1) + 2 * int(rng.integers(2))
    else:
        quarter = int(rng.integers(4))
    angle = quarter * math.pi / 2 + rng.uniform(-0.3, 0.3)
    rot = np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
    polys = [p @ rot.T for p in polys]
    pts = np.concatenate(polys)
    lo, hi = pts.min(axis=0), pts.max(axis=0)
    fill = rng.uniform(0.85, 1.0)
    sx, sy = fill * w / (hi[0] - lo[0]), fill * h / (hi[1] - lo[1])
    stretch = 1.0 if shape in ROUND else 1.5 if shape in STRETCHABLE else 1.2
    sx, sy = min(sx, stretch * sy), min(sy, stretch * sx)
    scale = np.array([sx, sy])
    ext = (hi - lo) * scale
    offset = np.array([x0 + rng.uniform(0, w - ext[0]), y0 + rng.uniform(0, h - ext[1])])
    # Two decimals, as stored in the annotation: the masks are rasterised from these numbers.
    return [np.round((p - lo) * scale + offset, 2) for p in polys]


def rasterise(polygons: Sequence[Polygon], size: int) -> np.ndarray:
    """Per-part masks ``(n_parts, size, size)`` uint8, rasterised by pycocotools like the loader does."""
    rles = mask_utils.frPyObjects([[float(v) for v in p.reshape(-1)] for p in polygons], size, size)
    return np.ascontiguousarray(np.transpose(mask_utils.decode(rles), (2, 0, 1)))


def _erode(mask: np.ndarray) -> np.ndarray:
    """4-neighbour binary erosion (pixels outside the image count as background)."""
    m = np.pad(mask.astype(bool), 1)
    return m[1:-1, 1:-1] & m[:-2, 1:-1] & m[2:, 1:-1] & m[1:-1, :-2] & m[1:-1, 2:]


# ---------------------------------------------------------------------------------------------
# Rendering
# ---------------------------------------------------------------------------------------------

def _smooth_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """Low-frequency noise in about [-1, 1]: a random ``cells x cells`` grid, bilinearly upsampled."""
    grid = rng.uniform(-1, 1, (cells, cells))
    pos = (np.arange(size) + 0.5) * (cells - 1) / size
    i0 = np.clip(np.floor(pos).astype(int), 0, cells - 2)
    frac = pos - i0
    interp = np.zeros((size, cells))
    interp[np.arange(size), i0] = 1 - frac
    interp[np.arange(size), i0 + 1] = frac
    return interp @ grid @ interp.T


def render_background(rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
    """An aerial-looking field texture ``(size, size, 3)`` float and its base colour ``(3,)``."""
    base_rgb, track_rgb = BACKGROUNDS[rng.integers(len(BACKGROUNDS))]
    base = np.array(base_rgb, dtype=np.float64) + rng.uniform(-8, 8, 3)
    img = np.broadcast_to(base, (size, size, 3)).copy()
    img += 16 * _smooth_noise(rng, size, int(rng.integers(3, 7)))[..., None]
    yy, xx = (np.mgrid[0:size, 0:size] + 0.5) / size
    a = rng.uniform(0, 2 * math.pi)
    img += 12 * ((xx - 0.5) * math.cos(a) + (yy - 0.5) * math.sin(a))[..., None]
    for _ in range(int(rng.integers(0, 4))):  # field parcels with a slightly different tint
        x0, y0 = rng.uniform(0, 0.8, 2)
        x1, y1 = x0 + rng.uniform(0.2, 0.6), y0 + rng.uniform(0.2, 0.6)
        parcel = (xx >= x0) & (xx < x1) & (yy >= y0) & (yy < y1)
        img[parcel] += rng.uniform(-14, 14, 3)
    for _ in range(int(rng.integers(0, 3))):  # tracks / roads as straight bands
        a = rng.uniform(0, math.pi)
        px, py = rng.uniform(0.2, 0.8, 2)
        dist = np.abs((xx - px) * -math.sin(a) + (yy - py) * math.cos(a)) * size
        img[dist < rng.uniform(1.0, 2.2)] = np.array(track_rgb) + rng.uniform(-6, 6, 3)
    img += rng.normal(0, 5, img.shape)
    return img, base


def paint_object(rng: np.random.Generator, img: np.ndarray, mask: np.ndarray, colour: str) -> None:
    """Paint an object in place: its colour with jitter, shading, grain and a darker rim."""
    region = mask.astype(bool)
    ys, xs = np.nonzero(region)
    rgb = np.array(COLOURS[colour], dtype=np.float64) + rng.uniform(-10, 10, 3)
    a = rng.uniform(0, 2 * math.pi)
    span = max(np.ptp(xs), np.ptp(ys), 1)
    shade = 10 * ((xs - xs.mean()) * math.cos(a) + (ys - ys.mean()) * math.sin(a)) / span
    img[ys, xs] = rgb + shade[:, None] + rng.normal(0, 4, (len(xs), 3))
    rim = region & ~_erode(region)
    img[rim] *= 0.7  # a dark rim keeps the outline visible whatever the background


# ---------------------------------------------------------------------------------------------
# Scenes
# ---------------------------------------------------------------------------------------------

@dataclass
class SceneObject:
    """One drawn object: class, colour, its polygons (image coordinates) and its pixel mask."""

    name: str
    colour: str
    polygons: list[Polygon]
    mask: np.ndarray            # (H, W) uint8 0/1, the union of the parts
    rle: bool = False           # store the annotation as compressed RLE instead of polygons
    area: int = field(init=False)
    cx: float = field(init=False)
    cy: float = field(init=False)

    def __post_init__(self) -> None:
        ys, xs = np.nonzero(self.mask)
        self.area = int(len(xs))
        self.cx, self.cy = float(xs.mean() + 0.5), float(ys.mean() + 0.5)

    def bbox(self) -> list[int]:
        """COCO box ``[x, y, w, h]`` of the mask."""
        ys, xs = np.nonzero(self.mask)
        return [int(xs.min()), int(ys.min()), int(np.ptp(xs) + 1), int(np.ptp(ys) + 1)]


@dataclass
class Scene:
    image: np.ndarray           # (H, W, 3) uint8
    objects: list[SceneObject]


def sample_scene(rng: np.random.Generator, size: int, styles: dict[str, ClassStyle],
                 rle_prob: float = 0.0) -> Scene:
    """Draw one image: background plus 3-5 non-overlapping objects (at least one class twice)."""
    # Only classes with a colour that stands out from the background (redrawn if too few do).
    def visible(c: str) -> list[str]:
        return [k for k in styles[c].colours if np.linalg.norm(np.array(COLOURS[k]) - base) >= MIN_CONTRAST]
    for _ in range(50):
        img, base = render_background(rng, size)
        usable = [c for c in styles if visible(c)]
        if len(usable) >= 2:
            break
    else:
        raise SyntheticDataError(f"classes {', '.join(styles)}: too few stand out from any background")
    fitting = [c for c in LAYOUTS if len(c) <= len(usable)]
    counts = fitting[rng.integers(len(fitting))]
    names = [usable[i] for i in rng.choice(len(usable), size=len(counts), replace=False)]
    instances = [n for n, c in zip(names, counts) for _ in range(c)]
    regions = split_regions(rng, size, len(instances))
    margin = max(1.0, size / 64)  # objects keep at least 2 margins apart
    objects: list[SceneObject] = []
    for name, region in zip(instances, regions):
        shape = styles[name].shape
        for _ in range(20):
            polys = place_shape(rng, shape, region, margin)
            parts = rasterise(polys, size)
            part_areas = parts.reshape(len(parts), -1).sum(axis=1)
            # Every part visible and no pixel in two parts (the loader would make it a hole).
            if part_areas.min() >= 3 and parts.sum(axis=0).max() <= 1:
                break
        else:  # pragma: no cover - the shapes above always fit at the supported sizes
            raise RuntimeError(f"could not place a {shape!r} in {region} at image size {size}")
        colours = visible(name)
        # A repeated class mostly gets a new colour: colour is a cue a small model learns fast,
        # while absolute position is slow to learn for these encoders (no position embedding).
        drawn = {o.colour for o in objects if o.name == name}
        fresh = [c for c in colours if c not in drawn]
        if fresh and drawn and rng.random() < NEW_COLOUR_PROB:
            colours = fresh
        colour = colours[rng.integers(len(colours))]
        mask = parts.sum(axis=0).astype(np.uint8)
        objects.append(SceneObject(name, colour, polys, mask, rle=bool(rng.random() < rle_prob)))
        paint_object(rng, img, mask, colour)
    return Scene(np.clip(np.rint(img), 0, 255).astype(np.uint8), objects)


# ---------------------------------------------------------------------------------------------
# Captions
# ---------------------------------------------------------------------------------------------

# Position descriptors: (vertical third, horizontal third); None = that axis is not constrained.
POSITION_PHRASES: dict[tuple[str | None, str | None], tuple[str, ...]] = {
    ("top", "left"): ("at the top left", "in the top left corner", "in the upper left"),
    ("top", "right"): ("at the top right", "in the top right corner", "in the upper right"),
    ("bottom", "left"): ("at the bottom left", "in the bottom left corner", "in the lower left"),
    ("bottom", "right"): ("at the bottom right", "in the bottom right corner", "in the lower right"),
    ("top", None): ("at the top", "on the top"),
    ("bottom", None): ("at the bottom", "on the bottom"),
    (None, "left"): ("on the left", "on the left side"),
    (None, "right"): ("on the right", "on the right side"),
    ("middle", "middle"): ("in the middle", "in the center"),
}
THIRDS = {"top": 0, "left": 0, "middle": 1, "bottom": 2, "right": 2}
RELATION_PHRASES: dict[str, tuple[str, ...]] = {
    "near": ("near the {}", "next to the {}", "beside the {}"),
    "left": ("to the left of the {}", "on the left of the {}"),
    "right": ("to the right of the {}", "on the right of the {}"),
    "above": ("above the {}",),
    "below": ("below the {}",),
}
SIZE_WORDS = {"large": ("large", "big"), "small": ("small", "little")}
# How often each kind of distinguishing cue is chosen when several single out the target (per
# kind, not per cue: there are many position phrases but one colour).
CUE_WEIGHTS = {"colour": 6.0, "size": 3.0, "position": 1.0, "relation": 1.0}
SIZE_RATIO = 1.6       # "large"/"small" only when the areas differ at least this much
POSITION_MARGIN = 0.04  # fraction of the image: centroids this close to a third line are "unsure"


def _in_third(value: float, third: int, size: int, slack: float) -> bool:
    """Is ``value`` inside third ``third`` of ``[0, size)`` grown by ``slack`` pixels (shrunk if < 0)?"""
    return third * size / 3 - slack <= value < (third + 1) * size / 3 + slack


def position_holds(obj: SceneObject, key: tuple[str | None, str | None], size: int, sure: bool) -> bool:
    """Does descriptor ``key`` hold for ``obj``?  ``sure``: clearly inside; otherwise: possibly inside."""
    slack = -POSITION_MARGIN * size if sure else POSITION_MARGIN * size
    v, h = key
    return ((v is None or _in_third(obj.cy, THIRDS[v], size, slack))
            and (h is None or _in_third(obj.cx, THIRDS[h], size, slack)))


def relation_holds(obj: SceneObject, kind: str, mark: SceneObject, size: int, sure: bool) -> bool:
    """Does ``obj`` stand in relation ``kind`` (left/right/above/below) to landmark ``mark``?

    ``sure``: clearly (a fifth of the image away, roughly level); otherwise: possibly.
    """
    dx, dy = obj.cx - mark.cx, obj.cy - mark.cy
    along, across = {"left": (-dx, dy), "right": (dx, dy), "above": (-dy, dx), "below": (dy, dx)}[kind]
    if sure:
        return along >= 0.2 * size and abs(across) <= 0.3 * size
    return along >= 0.05 * size and abs(across) <= 0.4 * size


def _distance(a: SceneObject, b: SceneObject) -> float:
    return math.hypot(a.cx - b.cx, a.cy - b.cy)


@dataclass
class Cues:
    """What can be said about a target: ``unique`` cues single it out among its own class,
    ``true`` cues merely hold for it.  Entries are (kind, value) pairs."""

    unique: list[tuple[str, object]]
    true: list[tuple[str, object]]


def target_cues(scene: Scene, index: int, size: int) -> Cues:
    """Colour, size, position and landmark-relation cues of object ``index`` in ``scene``."""
    t = scene.objects[index]
    same = [o for i, o in enumerate(scene.objects) if i != index and o.name == t.name]
    landmarks = [o for o in scene.objects
                 if o.name != t.name and sum(p.name == o.name for p in scene.objects) == 1]
    unique: list[tuple[str, object]] = []
    true: list[tuple[str, object]] = [("colour", t.colour)]
    if same and all(o.colour != t.colour for o in same):
        unique.append(("colour", t.colour))
    if same and all(t.area >= SIZE_RATIO * o.area for o in same):
        unique.append(("size", "large"))
    if same and all(o.area >= SIZE_RATIO * t.area for o in same):
        unique.append(("size", "small"))
    for key in POSITION_PHRASES:
        if position_holds(t, key, size, sure=True):
            true.append(("position", key))
            if same and not any(position_holds(o, key, size, sure=False) for o in same):
                unique.append(("position", key))
    for mark in landmarks:
        d = _distance(t, mark)
        if d <= 0.55 * size:
            true.append(("relation", ("near", mark.name)))
            if same and all(_distance(o, mark) >= SIZE_RATIO * d for o in same):
                unique.append(("relation", ("near", mark.name)))
        for kind in ("left", "right", "above", "below"):
            if relation_holds(t, kind, mark, size, sure=True):
                true.append(("relation", (kind, mark.name)))
                if same and not any(relation_holds(o, kind, mark, size, sure=False) for o in same):
                    unique.append(("relation", (kind, mark.name)))
    if same:  # a unique size word is also a true one
        true += [c for c in unique if c[0] == "size"]
    return Cues(unique, true)


def _pick(rng: np.random.Generator, items: Sequence):
    return items[rng.integers(len(items))]


def _pick_cue(rng: np.random.Generator, cues: Sequence[tuple[str, object]]) -> tuple[str, object]:
    """A cue drawn by kind (``CUE_WEIGHTS``), then uniformly among the cues of that kind."""
    kinds = sorted({kind for kind, _ in cues}, key=list(CUE_WEIGHTS).index)
    weights = np.array([CUE_WEIGHTS[k] for k in kinds], dtype=np.float64)
    kind = kinds[rng.choice(len(kinds), p=weights / weights.sum())]
    return _pick(rng, [c for c in cues if c[0] == kind])


def compose_caption(rng: np.random.Generator, name: str, cues: Cues, needs_cue: bool,
                    bare_prob: float = 0.0) -> str | None:
    """One lower-case caption for a target of class ``name``.

    When other objects share the class (``needs_cue``), one unique cue is always used; further
    (merely true) attributes may be added.  Returns None when the target cannot be singled out.
    """
    if needs_cue and not cues.unique:
        return None
    adjectives: dict[str, str] = {}
    tail: str | None = None

    def phrase(kind: str, value) -> str:
        if kind == "position":
            return _pick(rng, POSITION_PHRASES[value])
        relation, mark = value
        return _pick(rng, RELATION_PHRASES[relation]).format(mark)

    if needs_cue:
        kind, value = _pick_cue(rng, cues.unique)
        if kind in ("colour", "size"):
            adjectives[kind] = value if kind == "colour" else _pick(rng, SIZE_WORDS[value])
        else:
            tail = phrase(kind, value)
    if "colour" not in adjectives and rng.random() < (0.25 if needs_cue else 0.35):
        colour = next((v for k, v in cues.true if k == "colour"), None)  # none for greyscale images
        if colour is not None:
            adjectives["colour"] = colour
    if tail is None and rng.random() < (0.35 if needs_cue else 0.65):
        places = [c for c in cues.true if c[0] in ("position", "relation")]
        if places:
            tail = phrase(*_pick(rng, places))
    r = rng.random()
    det = "" if r < bare_prob else ("a" if r < bare_prob + 0.15 else "the")
    words = [det, adjectives.get("size", ""), adjectives.get("colour", ""), name, tail or ""]
    return " ".join(w for w in words if w)


@dataclass
class Ref:
    """A described target: index of the object in its scene and one or more captions."""

    target: int
    sentences: list[str]


def describe_scene(rng: np.random.Generator, scene: Scene, size: int, refs_per_image: int,
                   second_sentence_prob: float = 0.0, bare_prob: float = 0.0) -> list[Ref]:
    """Pick up to ``refs_per_image`` targets -- two of one repeated class first, so the image
    alone never tells which object is meant -- and caption each."""
    captions: dict[int, list[str]] = {}
    for i, obj in enumerate(scene.objects):
        cues = target_cues(scene, i, size)
        needs_cue = sum(o.name == obj.name for o in scene.objects) > 1
        text = compose_caption(rng, obj.name, cues, needs_cue, bare_prob)
        if text is not None:
            captions[i] = [text]
            if rng.random() < second_sentence_prob:
                for _ in range(5):
                    other = compose_caption(rng, obj.name, cues, needs_cue, bare_prob)
                    if other is not None and other != text:
                        captions[i].append(other)
                        break
    groups: dict[str, list[int]] = {}
    for i in captions:
        groups.setdefault(scene.objects[i].name, []).append(i)
    repeated = [g for g in groups.values() if len(g) > 1]
    chosen: list[int] = []
    if repeated:
        group = _pick(rng, repeated)
        chosen += [int(i) for i in rng.permutation(group)[:2]]
    rest = [i for i in captions if i not in chosen]
    # Prefer targets of classes not yet chosen, then anything else.
    fresh = [i for i in rest if scene.objects[i].name not in {scene.objects[c].name for c in chosen}]
    others = [i for i in rest if i not in fresh]
    chosen += [int(i) for i in rng.permutation(fresh)] + [int(i) for i in rng.permutation(others)]
    chosen = chosen[:refs_per_image]
    order = rng.permutation(len(chosen))
    refs = [Ref(chosen[k], captions[chosen[k]]) for k in order]
    seen: set[str] = set()
    for ref in refs:  # a caption singles out one object, so no two targets can share one
        assert not seen & set(ref.sentences), "duplicate caption within one image"
        seen |= set(ref.sentences)
    return refs


def sample_described_scene(rng: np.random.Generator, size: int, styles: dict[str, ClassStyle],
                           refs_per_image: int, rle_prob: float = 0.0, second_sentence_prob: float = 0.0,
                           bare_prob: float = 0.0, tries: int = 20) -> tuple[Scene, list[Ref]]:
    """A scene with its refs; resampled until two targets share a class and enough refs exist."""
    for _ in range(tries):
        scene = sample_scene(rng, size, styles, rle_prob)
        refs = describe_scene(rng, scene, size, refs_per_image, second_sentence_prob, bare_prob)
        names = [scene.objects[r.target].name for r in refs]
        enough = len(refs) >= min(refs_per_image, len(scene.objects))
        shared_class = refs_per_image < 2 or len(set(names)) < len(names)
        if enough and shared_class:
            break
    return scene, refs


# ---------------------------------------------------------------------------------------------
# Writers
# ---------------------------------------------------------------------------------------------

def _word_tokens(text: str) -> list[str]:
    """Words and punctuation marks, as BERT's basic tokenizer splits a lower-case sentence."""
    return re.findall(r"\w+|[^\w\s]", text.lower())


def _encode_rle(mask: np.ndarray) -> dict:
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode("ascii")}


def _split_counts(num_images: int, num_val: int | None, num_test: int | None) -> dict[str, int]:
    counts = {"train": num_images,
              "val": max(1, round(num_images / 6)) if num_val is None else num_val,
              "test": max(1, round(num_images / 4)) if num_test is None else num_test}
    for split, n in counts.items():
        flag = "--num_images" if split == "train" else f"--num_{split}"
        if int(n) != n or n < 1:
            raise SyntheticDataError(f"{flag} must be a positive integer, got {n!r}")
    return counts


def write_rrsisd(root: Path, rng: np.random.Generator, counts: dict[str, int], size: int,
                 refs_per_image: int, styles: dict[str, ClassStyle] = RRSISD_STYLES) -> dict[str, dict[str, int]]:
    """Write the REFER-layout dataset under ``root``; returns per-split image/ref/sentence counts."""
    image_dir = root / "images" / "rrsisd" / "JPEGImages"
    ann_dir = root / "rrsisd"
    image_dir.mkdir(parents=True)
    ann_dir.mkdir(parents=True)
    category_id = {name: i + 1 for i, name in enumerate(RRSISD_CLASSES)}
    images, annotations, refs = [], [], []
    stats = {s: {"images": 0, "refs": 0, "sentences": 0} for s in SPLITS}
    image_id = ann_id = sent_id = 0
    for split in SPLITS:
        for _ in range(counts[split]):
            scene, scene_refs = sample_described_scene(
                rng, size, styles, refs_per_image, rle_prob=0.1, second_sentence_prob=0.05)
            image_id += 1
            file_name = f"{image_id:05d}.jpg"
            Image.fromarray(scene.image).save(image_dir / file_name, quality=95, subsampling=0)
            images.append({"id": image_id, "file_name": file_name, "height": size, "width": size})
            ann_ids = []
            for obj in scene.objects:
                ann_id += 1
                ann_ids.append(ann_id)
                if obj.rle:
                    segmentation: list = [_encode_rle(obj.mask)]
                else:
                    segmentation = [[float(v) for v in p.reshape(-1)] for p in obj.polygons]
                annotations.append({"id": ann_id, "image_id": image_id,
                                    "category_id": category_id[obj.name],
                                    "segmentation": segmentation, "area": float(obj.area),
                                    "bbox": [float(v) for v in obj.bbox()], "iscrowd": 0})
            for ref in scene_refs:
                obj = scene.objects[ref.target]
                sentences = []
                for text in ref.sentences:
                    sentences.append({"tokens": _word_tokens(text), "raw": text, "sent_id": sent_id,
                                      "sent": text})
                    sent_id += 1
                refs.append({"ref_id": len(refs), "ann_id": ann_ids[ref.target],
                             "image_id": image_id, "category_id": category_id[obj.name],
                             "split": split, "sent_ids": [s["sent_id"] for s in sentences],
                             "sentences": sentences, "file_name": file_name})
                stats[split]["sentences"] += len(sentences)
            stats[split]["images"] += 1
            stats[split]["refs"] += len(scene_refs)
    instances = {"images": images, "annotations": annotations,
                 "categories": [{"id": i, "name": n} for n, i in category_id.items()]}
    (ann_dir / "instances.json").write_text(json.dumps(instances))
    with open(ann_dir / "refs(unc).p", "wb") as f:
        pickle.dump(refs, f, protocol=2)
    return stats


def write_refsegrs(root: Path, rng: np.random.Generator, counts: dict[str, int], size: int,
                   refs_per_image: int, styles: dict[str, ClassStyle] = REFSEGRS_STYLES) -> dict[str, dict[str, int]]:
    """Write the RefSegRS layout: one sample id (own image and mask file) per phrase line."""
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir(parents=True)
    stats = {s: {"images": 0, "refs": 0, "sentences": 0} for s in SPLITS}
    sample_id = 0
    for split in SPLITS:
        lines = []
        for _ in range(counts[split]):
            scene, scene_refs = sample_described_scene(rng, size, styles, refs_per_image,
                                                       bare_prob=0.15)
            for ref in scene_refs:
                Image.fromarray(scene.image).save(root / "images" / f"{sample_id}.tif")
                mask = scene.objects[ref.target].mask * np.uint8(255)
                Image.fromarray(mask).save(root / "masks" / f"{sample_id}.tif")
                lines.append(f"{sample_id} {ref.sentences[0]}\n")
                sample_id += 1
            stats[split]["images"] += 1
            stats[split]["refs"] += len(scene_refs)
            stats[split]["sentences"] += len(scene_refs)
        (root / f"output_phrase_{split}.txt").write_text("".join(lines))
    return stats


# The synthetic RefCOCO family: one set of images and annotations, three annotation sets.
# (dataset, splitBy) -> split of each image's unc split (as in the real files: unc has
# train/val/testA/testB, umd train/val/test, google train/val).
REFCOCO_FILES: dict[tuple[str, str], dict[str, str]] = {
    ("refcoco", "unc"): {"train": "train", "val": "val", "testA": "testA", "testB": "testB"},
    ("refcoco+", "unc"): {"train": "train", "val": "val", "testA": "testA", "testB": "testB"},
    ("refcocog", "umd"): {"train": "train", "val": "val", "testA": "test", "testB": "test"},
    ("refcocog", "google"): {"train": "train", "val": "val", "testA": "train", "testB": "val"},
}
# Cue kinds per dataset: RefCOCO+ forbids location words; greyscale images lose the colour cue.
REFCOCO_CUES = {"refcoco": ("colour", "size", "position", "relation"), "refcoco+": ("colour", "size"),
                "refcocog": ("colour", "size", "position", "relation")}
GREY_EVERY = 5           # every fifth COCO image is greyscale (real COCO has some)
REFCOCOG_WRAPS = (("", " in the picture"), ("there is ", ""), ("", " in this image"), ("this is ", ""))


def _captions_for(rng: np.random.Generator, scene: Scene, index: int, size: int, kinds: Sequence[str],
                  count: int, wrap: bool = False) -> list[str]:
    """Up to ``count`` distinct captions of object ``index`` using only cue ``kinds`` (RefCOCOg: ``wrap``
    adds a short prefix or suffix); empty when the target cannot be singled out with them."""
    full = target_cues(scene, index, size)
    cues = Cues([c for c in full.unique if c[0] in kinds], [c for c in full.true if c[0] in kinds])
    name = scene.objects[index].name
    needs_cue = sum(o.name == name for o in scene.objects) > 1
    out: list[str] = []
    for _ in range(3 * count):
        text = compose_caption(rng, name, cues, needs_cue)
        if text is None:
            break
        if wrap:
            head, tail = _pick(rng, REFCOCOG_WRAPS)
            if len(text.split()) + len((head + tail).split()) <= 16:
                text = head + text + tail
        if text not in out:
            out.append(text)
        if len(out) == count:
            break
    return out


# Caption form of ``colour_only`` (colour, class): one fixed form, so that the colour and class
# words are all that differs between sentences (a random tiny text tower is swayed by determiners).
COLOUR_ONLY_FORMS = ("the {} {}",)


def sample_colour_scene(rng: np.random.Generator, size: int, styles: dict[str, ClassStyle],
                        rle_prob: float = 0.0, tries: int = 500) -> tuple[Scene, list[Ref]]:
    """A scene of 3 objects in pairwise DIFFERENT colours, every object a target captioned by its
    colour and class only (``colour_only``: the easiest grounding, a colour word names one object)."""
    for _ in range(tries):
        scene = sample_scene(rng, size, styles, rle_prob)
        keep = [int(i) for i in rng.permutation(len(scene.objects))[:3]]  # a text-blind map hits <= 1/3-ish
        colours = [scene.objects[i].colour for i in keep]
        if len(set(colours)) == len(colours):
            break
    else:  # pragma: no cover - a few hundred draws always hold 3 differently coloured objects
        raise SyntheticDataError("colour_only: could not draw 3 objects of different colours")
    # Repaint only the kept objects on a fresh background against which each of them stands out.
    objects = [scene.objects[i] for i in keep]
    for _ in range(50):
        img, base = render_background(rng, size)
        if all(np.linalg.norm(np.array(COLOURS[o.colour]) - base) >= MIN_CONTRAST for o in objects):
            break
    for obj in objects:
        paint_object(rng, img, obj.mask, obj.colour)
    scene = Scene(np.clip(np.rint(img), 0, 255).astype(np.uint8), objects)
    refs = [Ref(i, [f.format(o.colour, o.name) for f in COLOUR_ONLY_FORMS]) for i, o in enumerate(objects)]
    return scene, [refs[k] for k in rng.permutation(len(refs))]


def write_refcoco(root: Path, rng: np.random.Generator, counts: dict[str, int], size: int,
                  refs_per_image: int, styles: dict[str, ClassStyle] = COCO_STYLES,
                  colour_only: bool = False) -> dict[str, dict[str, dict[str, int]]]:
    """Write ``refcoco``, ``refcoco+`` and ``refcocog`` (umd + google) in the REFER layout.

    Images (JPEG, every ``GREY_EVERY``-th one greyscale) go to ``images/mscoco/images/train2014``;
    each dataset folder gets the same ``instances.json``. Test images alternate between testA
    and testB. RefCOCO refs carry 2-3 sentences, RefCOCO+ 1-2 (colour and size words only),
    RefCOCOg 1-2 longer ones. ``colour_only``: `sample_colour_scene` instead (3 objects of
    different colours, no greyscale image, every caption "<det> <colour> <class>", the same
    sentences in all three datasets).
    """
    image_dir = root / "images" / "mscoco" / "images" / "train2014"
    image_dir.mkdir(parents=True)
    category_id = {name: i + 1 for i, name in enumerate(COCO_STYLES)}
    plan = ["train"] * counts["train"] + ["val"] * counts["val"]
    plan += ["testA" if k % 2 == 0 else "testB" for k in range(max(2, counts["test"]))]
    images, annotations = [], []
    refs: dict[tuple[str, str], list[dict]] = {key: [] for key in REFCOCO_FILES}
    sent_ids = dict.fromkeys(REFCOCO_CUES, 0)
    ann_id = 0
    for image_id, unc_split in enumerate(plan, start=1):
        if colour_only:
            scene, scene_refs = sample_colour_scene(rng, size, styles, rle_prob=0.1)
            scene_refs = scene_refs[:refs_per_image]
        else:
            scene, scene_refs = sample_described_scene(rng, size, styles, refs_per_image, rle_prob=0.1)
        grey = image_id % GREY_EVERY == 0 and not colour_only
        file_name = f"COCO_train2014_{image_id:012d}.jpg"
        picture = Image.fromarray(scene.image)
        (picture.convert("L") if grey else picture).save(image_dir / file_name, quality=95, subsampling=0)
        images.append({"id": image_id, "file_name": file_name, "height": size, "width": size})
        ann_ids = []
        for obj in scene.objects:
            ann_id += 1
            ann_ids.append(ann_id)
            segmentation = ([_encode_rle(obj.mask)] if obj.rle
                            else [[float(v) for v in p.reshape(-1)] for p in obj.polygons])
            annotations.append({"id": ann_id, "image_id": image_id, "category_id": category_id[obj.name],
                                "segmentation": segmentation, "area": float(obj.area),
                                "bbox": [float(v) for v in obj.bbox()], "iscrowd": 0})
        for ref in scene_refs:
            obj = scene.objects[ref.target]
            for dataset, kinds in REFCOCO_CUES.items():
                kinds = tuple(k for k in kinds if not (grey and k == "colour"))
                count = int(rng.integers(2, 4)) if dataset == "refcoco" else int(rng.integers(1, 3))
                texts = (ref.sentences[:count] if colour_only else
                         _captions_for(rng, scene, ref.target, size, kinds, count, wrap=dataset == "refcocog"))
                if not texts:
                    continue  # e.g. RefCOCO+ without a colour or size that singles the target out
                first = sent_ids[dataset]
                sent_ids[dataset] += len(texts)
                sentences = [{"tokens": _word_tokens(t), "raw": t, "sent_id": first + k, "sent": t}
                             for k, t in enumerate(texts)]
                for (name, split_by), splits in REFCOCO_FILES.items():
                    if name != dataset:
                        continue
                    refs[(name, split_by)].append({
                        "ref_id": len(refs[(name, split_by)]), "ann_id": ann_ids[ref.target], "image_id": image_id,
                        "category_id": category_id[obj.name], "split": splits[unc_split],
                        "sent_ids": [s["sent_id"] for s in sentences], "sentences": sentences,
                        "file_name": f"COCO_train2014_{image_id:012d}_{ann_ids[ref.target]}.jpg"})
    instances = json.dumps({"images": images, "annotations": annotations,
                            "categories": [{"id": i, "name": n, "supercategory": n} for n, i in category_id.items()]})
    stats: dict[str, dict[str, int]] = {}
    for (name, split_by), ref_list in refs.items():
        (root / name).mkdir(exist_ok=True)
        (root / name / "instances.json").write_text(instances)
        with open(root / name / f"refs({split_by}).p", "wb") as f:
            pickle.dump(ref_list, f, protocol=2)
        per_split = stats.setdefault(f"{name}({split_by})", {})
        for r in ref_list:
            split_stats = per_split.setdefault(r["split"], {"refs": 0, "sentences": 0})
            split_stats["refs"] += 1
            split_stats["sentences"] += len(r["sentences"])
    return stats


# The synthetic ReferIt (refclef): the unc split file and a berkeley one that partitions the same
# refs differently (the real berkeley split is another partition of the images).
REFCLEF_SPLIT_BYS: tuple[str, ...] = ("unc", "berkeley")
REFCLEF_FIRST_IMAGE_ID = 1000  # SAIAPR ids are numbers; images sit in folder <id // 1000 as 2 digits>
REFCLEF_ID_STEP = 337          # spreads a small set over several such folders
REFCLEF_BARE_EVERY = 7         # every 7th annotation stores one bare RLE dict instead of a list of them


def refclef_file_name(image_id: int) -> str:
    """SAIAPR TC-12 image path relative to ``images/saiapr_tc-12``: ``<nn>/images/<id>.jpg``."""
    return f"{image_id // 1000:02d}/images/{image_id}.jpg"


def _referit_style(text: str) -> str:
    """ReferIt expressions are short and mostly article-less ("man on left"): drop a leading "the "."""
    return text[4:] if text.startswith("the ") else text


def write_refclef(root: Path, rng: np.random.Generator, counts: dict[str, int], size: int,
                  refs_per_image: int, styles: dict[str, ClassStyle] = REFCLEF_STYLES) -> dict[str, dict[str, int]]:
    """Write the ReferIt (refclef) REFER layout: ``refclef/refs(unc).p``, ``refclef/refs(berkeley).p``,
    ``refclef/instances.json`` and JPEGs ``images/saiapr_tc-12/<nn>/images/<id>.jpg``.

    Every segmentation is RLE (as in the real refclef annotations): a list holding one compressed
    RLE dict, or on every ``REFCLEF_BARE_EVERY``-th annotation the bare dict. About a third of the
    refs carry a second sentence, so "every sentence of every ref" differs from "one per ref".
    The berkeley file holds the same refs with the images assigned to splits in reverse order.
    """
    image_root = root / "images" / "saiapr_tc-12"
    ann_dir = root / "refclef"
    ann_dir.mkdir(parents=True)
    category_id = {name: i + 1 for i, name in enumerate(REFCLEF_STYLES)}
    plan = [split for split in SPLITS for _ in range(counts[split])]
    images, annotations, refs = [], [], []
    image_ids = []
    ann_id = sent_id = 0
    for k, split in enumerate(plan):
        scene, scene_refs = sample_described_scene(rng, size, styles, refs_per_image, second_sentence_prob=0.3)
        image_id = REFCLEF_FIRST_IMAGE_ID + REFCLEF_ID_STEP * k
        image_ids.append(image_id)
        file_name = refclef_file_name(image_id)
        (image_root / file_name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(scene.image).save(image_root / file_name, quality=95, subsampling=0)
        images.append({"id": image_id, "file_name": file_name, "height": size, "width": size})
        ann_ids = []
        for obj in scene.objects:
            ann_id += 1
            ann_ids.append(ann_id)
            rle = _encode_rle(obj.mask)
            annotations.append({"id": ann_id, "image_id": image_id, "category_id": category_id[obj.name],
                                "segmentation": rle if ann_id % REFCLEF_BARE_EVERY == 0 else [rle],
                                "area": float(obj.area), "bbox": [float(v) for v in obj.bbox()], "iscrowd": 0})
        for ref in scene_refs:
            obj = scene.objects[ref.target]
            texts = list(dict.fromkeys(_referit_style(t) for t in ref.sentences))
            sentences = [{"tokens": _word_tokens(t), "raw": t, "sent_id": sent_id + j, "sent": t}
                         for j, t in enumerate(texts)]
            sent_id += len(texts)
            refs.append({"ref_id": len(refs), "ann_id": ann_ids[ref.target], "image_id": image_id,
                         "category_id": category_id[obj.name], "split": split,
                         "sent_ids": [s["sent_id"] for s in sentences], "sentences": sentences,
                         "file_name": f"{image_id}_{ann_ids[ref.target]}.jpg"})
    instances = {"images": images, "annotations": annotations,
                 "categories": [{"id": i, "name": n, "supercategory": n} for n, i in category_id.items()]}
    (ann_dir / "instances.json").write_text(json.dumps(instances))
    berkeley = dict(zip(image_ids, reversed(plan)))
    stats = {f"refclef({split_by}) {split}": {"refs": 0, "sentences": 0}
             for split_by in REFCLEF_SPLIT_BYS for split in SPLITS}
    for split_by in REFCLEF_SPLIT_BYS:
        ref_list = refs if split_by == "unc" else [dict(r, split=berkeley[r["image_id"]]) for r in refs]
        with open(ann_dir / f"refs({split_by}).p", "wb") as f:
            pickle.dump(ref_list, f, protocol=2)
        for r in ref_list:
            stats[f"refclef({split_by}) {r['split']}"]["refs"] += 1
            stats[f"refclef({split_by}) {r['split']}"]["sentences"] += len(r["sentences"])
    return stats


REFERIT_TRIS_FIRST_IMAGE_ID = 3000  # ReferIt image ids are numbers; the pickle keys them as strings
REFERIT_TRIS_SPLIT_EVERY = 3        # every third target's RLE is stored as two parts (decoded H x W x 2)


def _split_rle(mask: np.ndarray) -> list[dict]:
    """A mask as two RLE parts (rows above / from its middle row): their sum is the mask again."""
    rows = np.nonzero(mask.any(axis=1))[0]
    middle = int(rows[len(rows) // 2])
    top, bottom = mask.copy(), mask.copy()
    top[middle:] = 0
    bottom[:middle] = 0
    return [_encode_rle(top), _encode_rle(bottom)]


def _add_speck(rng: np.random.Generator, scene: Scene, size: int) -> tuple[np.ndarray, str] | None:
    """Paint a small square (side ``size // 8``: under 2 % of the image) on free background, at least
    two pixels away from every object; returns its mask and caption (None where nothing fits)."""
    side = max(3, size // 8)
    taken = np.zeros((size, size), dtype=bool)
    for obj in scene.objects:
        taken |= obj.mask.astype(bool)
    free = [(r, c) for r in range(2, size - side - 2, 2) for c in range(2, size - side - 2, 2)
            if not taken[r - 2:r + side + 2, c - 2:c + side + 2].any()]
    if not free:
        return None
    r, c = free[int(rng.integers(len(free)))]
    colour = str(_pick(rng, ("red", "blue", "yellow", "white")))
    scene.image[r:r + side, c:c + side] = COLOURS[colour]
    mask = np.zeros((size, size), dtype=np.uint8)
    mask[r:r + side, c:c + side] = 1
    return mask, f"small {colour} square"


def write_referit_tris(root: Path, rng: np.random.Generator, counts: dict[str, int], size: int,
                       refs_per_image: int, styles: dict[str, ClassStyle] = REFCLEF_STYLES) -> dict[str, dict[str, int]]:
    """Write ReferIt in TRIS's annotation format: ``annotations/{train,test}.pickle`` and
    ``images/<id>.jpg`` (splits train and test; test has ``counts['test']`` images).

    Each ref becomes one annotation (its first sentence is the ``query``); ``bbox`` is
    ``[[x1, y1, x2, y2]]`` with ``x2 = x1 + w``. Every image also gets a small painted square
    (``_add_speck``) with its own annotation, so both splits hold boxes under 5 % of the image
    (kept for training, skipped by the evaluation). The pickles use protocol 2 with ``str`` RLE
    counts, like the Python 2 era release.
    """
    (root / "annotations").mkdir(parents=True)
    (root / "images").mkdir()
    stats: dict[str, dict[str, int]] = {}
    k = 0
    for split in ("train", "test"):
        table: dict[str, dict] = {}
        n_small = n_ann = 0
        for _ in range(counts[split]):
            scene, scene_refs = sample_described_scene(rng, size, styles, refs_per_image)
            image_id = REFERIT_TRIS_FIRST_IMAGE_ID + k
            k += 1
            anns = []
            for ref in scene_refs:
                obj = scene.objects[ref.target]
                x, y, w, h = obj.bbox()
                n_ann += 1
                rle = _split_rle(obj.mask) if n_ann % REFERIT_TRIS_SPLIT_EVERY == 0 else [_encode_rle(obj.mask)]
                n_small += w * h <= 0.05 * size * size
                anns.append({"image_id": str(image_id), "query": _referit_style(ref.sentences[0]),
                             "bbox": [[x, y, x + w, y + h]], "segmentation": rle})
            speck = _add_speck(rng, scene, size)
            Image.fromarray(scene.image).save(root / "images" / f"{image_id}.jpg", quality=95, subsampling=0)
            if speck is not None:
                ys, xs = np.nonzero(speck[0])
                box = [int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1]
                n_ann += 1
                n_small += 1
                anns.append({"image_id": str(image_id), "query": speck[1], "bbox": [box],
                             "segmentation": [_encode_rle(speck[0])]})
            table[str(image_id)] = {"annotations": anns}
        with open(root / "annotations" / f"{split}.pickle", "wb") as f:
            pickle.dump(table, f, protocol=2)
        stats[split] = {"images": counts[split], "refs": n_ann, "sentences": n_ann, "small_boxes": n_small}
    return stats


# No dropout: this BERT starts from random weights and is trained for minutes, not regularised.
BERT_CONFIG = {
    "architectures": ["BertModel"], "model_type": "bert", "hidden_size": 64,
    "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 128,
    "max_position_embeddings": 64, "type_vocab_size": 2, "hidden_act": "gelu",
    "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0, "layer_norm_eps": 1e-12,
    "initializer_range": 0.02, "pad_token_id": 0,
}
SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")


def build_vocab(captions: Sequence[str]) -> list[str]:
    """Specials, every caption word / punctuation mark (sorted), then single characters and
    ``##`` continuation characters so that any ASCII word still tokenizes without ``[UNK]``."""
    words = sorted({w for c in captions for w in _word_tokens(c)})
    chars = [chr(c) for c in range(ord("a"), ord("z") + 1)] + [str(d) for d in range(10)]
    extra = chars + [f"##{c}" for c in chars] + list(".,;:!?'\"-()/&")
    vocab = list(SPECIAL_TOKENS) + words
    known = set(vocab)
    vocab += sorted(t for t in set(extra) if t not in known)
    return vocab


def write_bert(root: Path, captions: Sequence[str]) -> int:
    """Write the tiny BERT folder; returns the vocabulary size."""
    root.mkdir(parents=True)
    vocab = build_vocab(captions)
    (root / "vocab.txt").write_text("".join(f"{t}\n" for t in vocab))
    config = dict(BERT_CONFIG, vocab_size=len(vocab))
    (root / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    tok = {"do_lower_case": True, "tokenizer_class": "BertTokenizer", "model_max_length": 64}
    (root / "tokenizer_config.json").write_text(json.dumps(tok, indent=2) + "\n")
    return len(vocab)


def _read_captions(paths: dict[str, Path]) -> list[str]:
    """Every caption written under the layouts in ``paths``."""
    ref_files = []
    if "rrsisd" in paths:
        ref_files.append(paths["rrsisd"] / "rrsisd" / "refs(unc).p")
    if "refcoco" in paths:
        ref_files += [paths["refcoco"] / name / f"refs({split_by}).p" for name, split_by in REFCOCO_FILES]
    if "refclef" in paths:
        ref_files += [paths["refclef"] / "refclef" / f"refs({split_by}).p" for split_by in REFCLEF_SPLIT_BYS]
    captions = []
    for ref_file in ref_files:
        with open(ref_file, "rb") as f:
            refs = pickle.load(f)  # our own file, written a moment ago
        captions += [s["raw"] for r in refs for s in r["sentences"]]
    if "referit_tris" in paths:
        for split in ("train", "test"):
            with open(paths["referit_tris"] / "annotations" / f"{split}.pickle", "rb") as f:
                table = pickle.load(f)  # our own file, written a moment ago
            captions += [a["query"] for entry in table.values() for a in entry["annotations"]]
    if "refsegrs" in paths:
        for split in SPLITS:
            for line in (paths["refsegrs"] / f"output_phrase_{split}.txt").read_text().splitlines():
                captions.append(line.split(" ", 1)[1])
    return captions


# ---------------------------------------------------------------------------------------------
# Entry points
# ---------------------------------------------------------------------------------------------

MARKER = "synthetic.json"  # written into DIR; lets a later run replace our own output safely
LAYOUTS_ALL: tuple[str, ...] = ("rrsisd", "refsegrs", "refcoco", "refclef")  # new layouts go last (seed streams)
# Written only when asked for (``layouts=("referit_tris",)``): the default output stays as it was.
LAYOUTS_OPT_IN: tuple[str, ...] = ("referit_tris",)
LAYOUTS_KNOWN: tuple[str, ...] = LAYOUTS_ALL + LAYOUTS_OPT_IN


LAYOUT_STYLES: dict[str, dict[str, ClassStyle]] = {
    "rrsisd": RRSISD_STYLES, "refsegrs": REFSEGRS_STYLES, "refcoco": COCO_STYLES, "refclef": REFCLEF_STYLES,
    "referit_tris": REFCLEF_STYLES}
MIN_CLASSES = 3  # the richest object-count pattern draws three different classes


def _class_styles(layouts: Sequence[str], classes: Sequence[str] | str | None) -> dict[str, dict[str, ClassStyle]]:
    """The class table of each layout, restricted to ``classes`` (names of that layout) when given."""
    if classes is None:
        return {name: LAYOUT_STYLES[name] for name in layouts}
    wanted = [c.strip() for c in (classes.split(",") if isinstance(classes, str) else classes) if c.strip()]
    known = {c for name in layouts for c in LAYOUT_STYLES[name]}
    unknown = [c for c in wanted if c not in known]
    if unknown:
        raise SyntheticDataError(f"--classes: unknown class(es) {', '.join(map(repr, unknown))} for layouts "
                                 f"{', '.join(layouts)}; known: {', '.join(sorted(known))}")
    out = {}
    for name in layouts:
        out[name] = {c: LAYOUT_STYLES[name][c] for c in wanted if c in LAYOUT_STYLES[name]}
        if len(out[name]) < MIN_CLASSES:
            raise SyntheticDataError(f"--classes leaves {len(out[name])} class(es) of the {name} layout; "
                                     f"it needs at least {MIN_CLASSES}")
    return out


def _check_layouts(layouts: Sequence[str] | str) -> tuple[str, ...]:
    if isinstance(layouts, str):
        layouts = [part.strip() for part in layouts.split(",") if part.strip()]
    unknown = [name for name in layouts if name not in LAYOUTS_KNOWN]
    if unknown or not layouts:
        raise SyntheticDataError(f"--layouts {','.join(layouts)!s}: choose one or more of {','.join(LAYOUTS_KNOWN)}")
    return tuple(name for name in LAYOUTS_KNOWN if name in layouts)


def generate(out_dir: str | Path, seed: int = 0, num_images: int = 120, image_size: int = 64,
             num_val: int | None = None, num_test: int | None = None, refs_per_image: int = 3,
             verbose: bool = False, layouts: Sequence[str] | str = LAYOUTS_ALL,
             classes: Sequence[str] | str | None = None, colour_only: bool = False) -> dict[str, Path]:
    """Write the synthetic RRSIS-D, RefSegRS, RefCOCO-family, ReferIt and tiny-BERT folders under ``out_dir``.

    ``num_images`` is the number of training images per dataset; validation and test default to
    a sixth and a quarter of it (RefCOCO: at least two test images, split into testA / testB).
    ``classes`` restricts every layout to those of its class names (e.g. a handful of classes for a
    quick run; at least three per layout).  ``layouts`` selects the datasets (default all four).
    ``colour_only`` (RefCOCO family only): 3 objects of different colours per image, each
    captioned by colour and class (`sample_colour_scene`), the quickest task to learn from text alone.
    Returns the written folders, e.g.
    ``{"rrsisd": ..., "refsegrs": ..., "refcoco": ..., "refclef": ..., "bert": ...}``.
    """
    if int(image_size) != image_size or image_size < 32:
        raise SyntheticDataError(f"--image_size must be an integer >= 32, got {image_size!r}")
    if int(refs_per_image) != refs_per_image or refs_per_image < 1:
        raise SyntheticDataError(f"--refs_per_image must be a positive integer, got {refs_per_image!r}")
    layouts = _check_layouts(layouts)
    counts = _split_counts(num_images, num_val, num_test)
    styles = _class_styles(layouts, classes)
    out = Path(out_dir)
    paths = {name: out / name for name in layouts}
    paths["bert"] = out / "bert"
    if out.exists() and not out.is_dir():
        raise SyntheticDataError(f"--out {out} exists and is not a folder")
    ours = (out / MARKER).is_file()
    for name in (*LAYOUTS_KNOWN, "bert"):  # also a layout left by an earlier run of ours with other --layouts
        p = out / name
        if p.exists() and (ours or name in paths):
            if not ours:
                raise SyntheticDataError(
                    f"--out {out}: {p} already exists and was not written by data.synthetic; "
                    "choose an empty folder")
            shutil.rmtree(p)
    out.mkdir(parents=True, exist_ok=True)
    settings = {"seed": int(seed), "num_images": counts, "image_size": int(image_size),
                "refs_per_image": int(refs_per_image), "layouts": list(layouts),
                "classes": {name: list(styles[name]) for name in layouts}, "colour_only": bool(colour_only)}
    (out / MARKER).write_text(json.dumps(settings, indent=2) + "\n")

    # One stream per layout (spawned children do not depend on how many are spawned), so each
    # layout's files are the same whichever other layouts are written.
    streams = dict(zip(LAYOUTS_KNOWN, np.random.SeedSequence(int(seed)).spawn(len(LAYOUTS_KNOWN))))
    writers = {"rrsisd": write_rrsisd, "refsegrs": write_refsegrs, "refcoco": write_refcoco, "refclef": write_refclef,
               "referit_tris": write_referit_tris}
    extra = {"refcoco": {"colour_only": True}} if colour_only else {}
    stats = {name: writers[name](paths[name], np.random.default_rng(streams[name]), counts, int(image_size),
                                 int(refs_per_image), styles[name], **extra.get(name, {})) for name in layouts}
    vocab_size = write_bert(paths["bert"], _read_captions(paths))
    if verbose:
        for name, per_split in stats.items():
            if name == "refclef":
                print("; ".join(f"{which} {v['refs']} refs / {v['sentences']} sentences" for which, v in per_split.items()))
                continue
            if name == "refcoco":
                for which, refs in per_split.items():
                    print(f"{which}: " + "; ".join(f"{s} {v['refs']} refs / {v['sentences']} sentences"
                                                   for s, v in refs.items()))
                continue
            parts = [f"{s} {v['images']} images / {v['refs']} refs / {v['sentences']} sentences"
                     for s, v in per_split.items()]
            print(f"{name}: " + "; ".join(parts))
        if "rrsisd" in paths:
            print(f"rrsisd:   --refer_data_root {paths['rrsisd']} --dataset rrsisd")
        if "refsegrs" in paths:
            print(f"refsegrs: --refer_data_root {paths['refsegrs']} --dataset refsegrs")
        if "refcoco" in paths:
            print(f"refcoco:  --refer_data_root {paths['refcoco']} --dataset refcoco|refcoco+ "
                  "(--splitBy unc) or refcocog (--splitBy umd|google)")
        if "referit_tris" in paths:
            print(f"referit_tris: --refer_data_root {paths['referit_tris']} --dataset referit_tris")
        if "refclef" in paths:
            print(f"refclef:  --refer_data_root {paths['refclef']} --dataset refclef (--splitBy unc|berkeley)")
        print(f"bert:     --bert_tokenizer {paths['bert']} (vocabulary of {vocab_size} tokens)")
    return paths


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m data.synthetic", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num_images", type=int, default=120, help="training images per dataset")
    parser.add_argument("--num_val", type=int, default=None, help="validation images (default num_images/6)")
    parser.add_argument("--num_test", type=int, default=None, help="test images (default num_images/4)")
    parser.add_argument("--image_size", type=int, default=64, help="image side in pixels (>= 32)")
    parser.add_argument("--refs_per_image", type=int, default=3, help="refs (targets) per image")
    parser.add_argument("--layouts", default=",".join(LAYOUTS_ALL),
                        help=f"datasets to write, comma-separated (default {','.join(LAYOUTS_ALL)}; "
                             f"opt-in: {','.join(LAYOUTS_OPT_IN)})")
    parser.add_argument("--classes", default=None,
                        help="draw only these classes, comma-separated (default: every class of each layout)")
    parser.add_argument("--colour_only", action="store_true",
                        help="RefCOCO family: 3 objects of different colours per image, captions '<colour> <class>'")
    args = parser.parse_args(argv)
    try:
        generate(args.out, seed=args.seed, num_images=args.num_images, image_size=args.image_size,
                 num_val=args.num_val, num_test=args.num_test, refs_per_image=args.refs_per_image,
                 verbose=True, layouts=args.layouts, classes=args.classes, colour_only=args.colour_only)
    except (SyntheticDataError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
