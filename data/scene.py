"""Scene-scale inference building blocks: a sentence over a whole (georeferenced) raster, in memory
bounded by one strip of tiles.

Nothing here knows about models: a *scorer* is any callable ``score(tiles, sentence) -> probs``
taking ``(B, h, w, 3)`` uint8 windows of the scene and returning ``(B, h, w)`` float32 foreground
probabilities in [0, 1] at the same size (it resamples to its own input size itself).

The steps, in the order ``predict.py`` uses them:

* :class:`SceneReader` -- windowed reads with rasterio. A window may stick out of the scene: the
  outside is filled by mirroring the scene (``numpy.pad(mode="symmetric")``) and marked invalid; the
  dataset mask (nodata values, internal / sidecar masks) marks invalid pixels inside.
* :func:`axis_origins` / :func:`tile_grid` -- tiles of ``tile`` pixels every ``tile - overlap``
  pixels; the last window of a row / column is pulled back inside the scene so the right and bottom
  edges are covered; a scene smaller than a tile gets one padded tile.
* :func:`blend_weights` -- per-tile weights, a ramp over the overlap on the sides that have a
  neighbour (``linear``, ``cosine`` = sin^2, or ``none``: a hard cut in the middle of the overlap),
  so that interior ramps of neighbouring tiles sum to one and scene borders keep full weight.
* :class:`StripAccumulator` -- weighted sums of probabilities over one strip of tiles (``tile`` rows
  by the scene width); rows no later tile can touch are handed on, final.
* :class:`BandWriter` / :class:`ComponentTracker` -- final rows are written through windowed, tiled,
  DEFLATE-compressed GeoTIFFs in whole block rows, thresholded once, and labelled into connected
  components (4-connectivity) that are merged across block borders with a union-find.
* :func:`select_components`, :func:`write_mask`, :func:`component_polygons`,
  :func:`write_geojson`, :func:`write_gpkg`, :func:`write_overview` -- referent selection
  (``all`` / ``best`` / ``topk``), the binary mask, polygons (``rasterio.features.shapes``,
  Douglas-Peucker simplification), the overview PNG.

Output encoding: the probability GeoTIFF stores ``round(254 * p)`` (0-254) and the mask GeoTIFF 0/1;
both use 255 as nodata, so "no data" stays distinct from "not the referent".
"""
from __future__ import annotations

import json
import math
import os
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

NODATA = 255
BLOCK = 256
BLENDS = ("none", "linear", "cosine")
MODES = ("all", "best", "topk")

Scorer = Callable[[np.ndarray, str], np.ndarray]


class SceneError(ValueError):
    """A problem with the scene or the tiling settings (one line, names the file or flag)."""


def _rasterio():
    try:
        import rasterio
    except ImportError:  # pragma: no cover - it is in requirements.txt
        raise SceneError("scene inference needs rasterio (pip install rasterio)") from None
    return rasterio


GDAL_CACHE_MB = 64


def gdal_env(cache_mb: int = GDAL_CACHE_MB):
    """A rasterio environment with GDAL's block cache capped (its default, 5 % of the RAM, would let
    the process grow with the scene on a large machine)."""
    return _rasterio().Env(GDAL_CACHEMAX=int(cache_mb) * 2 ** 20)  # rasterio passes an int as bytes


# --------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------
@dataclass
class SceneInfo:
    """What the outputs inherit from the scene, plus its scale."""

    path: str
    width: int
    height: int
    count: int
    dtype: str
    crs: Any                 # rasterio CRS or None
    transform: Any           # affine.Affine (identity for a non-georeferenced image)
    georeferenced: bool
    gsd: float | None        # metres per pixel (mean of x and y), None when unknown
    stretch: tuple[np.ndarray, np.ndarray] | None = None  # per-band (low, high) for non-uint8 scenes

    def crs_text(self) -> str | None:
        if self.crs is None:
            return None
        epsg = self.crs.to_epsg()
        return f"EPSG:{epsg}" if epsg else self.crs.to_wkt()


def ground_sample_distance(crs: Any, transform: Any, width: int, height: int) -> float | None:
    """Metres per pixel from the transform: projected CRS in its linear unit, geographic CRS
    approximated at the scene centre (one degree of latitude ~ 111,320 m)."""
    if crs is None:
        return None
    px, py = abs(transform.a) + abs(transform.b), abs(transform.e) + abs(transform.d)
    if crs.is_projected:
        factor = crs.linear_units_factor[1] if hasattr(crs, "linear_units_factor") else 1.0
        return float((px + py) / 2 * factor)
    if crs.is_geographic:
        lat = transform.f + transform.d * width / 2 + transform.e * height / 2
        m = 111_320.0
        return float((px * m * math.cos(math.radians(lat)) + py * m) / 2)
    return None


class SceneReader:
    """A scene opened for windowed reads of its first three bands as RGB uint8.

    ``read(x0, y0, w, h)`` returns ``(h, w, 3)`` uint8 and a ``(h, w)`` bool validity mask; the part
    of the window outside the scene is mirrored from inside and marked invalid. Scenes that are not
    uint8 are stretched linearly per band between the 2nd and 98th percentile of a decimated read.
    """

    def __init__(self, path: str | os.PathLike, flag: str = "--scene") -> None:
        rasterio = _rasterio()
        from rasterio.errors import NotGeoreferencedWarning, RasterioIOError

        self.flag = flag
        p = Path(path)
        if not p.is_file():
            raise SceneError(f"{flag} {path}: file not found")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", NotGeoreferencedWarning)
            try:
                self.ds = rasterio.open(p)
            except RasterioIOError as e:
                raise SceneError(f"{flag} {path}: not a readable raster ({str(e).splitlines()[0]})") from None
        ds = self.ds
        if ds.count < 3:
            self.close()
            raise SceneError(f"{flag} {path}: has {ds.count} band(s); an RGB scene needs at least 3")
        identity = ds.transform.is_identity
        crs = ds.crs
        if crs is not None and not (crs.is_projected or crs.is_geographic):
            self.close()
            raise SceneError(f"{flag} {path}: unknown CRS (neither projected nor geographic): {crs.to_wkt()[:80]}")
        if crs is None and not identity:
            self.close()
            raise SceneError(f"{flag} {path}: has a geotransform but an unknown CRS (none stored)")
        georef = crs is not None
        if not georef:
            warnings.warn(f"{flag} {path} is not georeferenced: outputs are in pixel coordinates", stacklevel=2)
        self.info = SceneInfo(str(p), ds.width, ds.height, ds.count, ds.dtypes[0], crs, ds.transform, georef,
                              ground_sample_distance(crs, ds.transform, ds.width, ds.height))
        if ds.dtypes[0] != "uint8":
            self.info.stretch = self._stretch()

    def _stretch(self) -> tuple[np.ndarray, np.ndarray]:
        small = self.read_decimated(1024, raw=True)
        data, valid = small
        lows, highs = [], []
        for b in range(3):
            values = data[..., b][valid] if valid.any() else data[..., b].ravel()
            lo, hi = np.percentile(values, [2, 98]) if values.size else (0.0, 1.0)
            lows.append(lo)
            highs.append(hi if hi > lo else lo + 1)
        return np.asarray(lows, np.float64), np.asarray(highs, np.float64)

    def _to_uint8(self, data: np.ndarray) -> np.ndarray:
        if self.info.stretch is None:
            return data.astype(np.uint8, copy=False)
        lo, hi = self.info.stretch
        return np.clip((data - lo) / (hi - lo) * 255 + 0.5, 0, 255).astype(np.uint8)

    def read(self, x0: int, y0: int, w: int, h: int) -> tuple[np.ndarray, np.ndarray]:
        from rasterio.windows import Window

        W, H = self.info.width, self.info.height
        ix0, iy0, ix1, iy1 = max(x0, 0), max(y0, 0), min(x0 + w, W), min(y0 + h, H)
        if ix1 <= ix0 or iy1 <= iy0:
            raise ValueError(f"window ({x0}, {y0}, {w}, {h}) lies outside the scene")
        win = Window(ix0, iy0, ix1 - ix0, iy1 - iy0)
        data = np.moveaxis(self.ds.read((1, 2, 3), window=win), 0, -1)
        valid = self.ds.dataset_mask(window=win) > 0
        pads = ((iy0 - y0, y0 + h - iy1), (ix0 - x0, x0 + w - ix1))
        if any(v for pair in pads for v in pair):
            data = np.pad(data, pads + ((0, 0),), mode="symmetric")
            valid = np.pad(valid, pads, constant_values=False)
        return self._to_uint8(data), valid

    def read_decimated(self, max_side: int, raw: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """The whole scene at most ``max_side`` pixels per side (GDAL decimation / overviews)."""
        W, H = self.info.width, self.info.height
        scale = min(1.0, max_side / max(W, H))
        shape = (max(1, round(H * scale)), max(1, round(W * scale)))
        data = np.moveaxis(self.ds.read((1, 2, 3), out_shape=(3, *shape)), 0, -1)
        valid = self.ds.read_masks(1, out_shape=shape) > 0
        return (data if raw else self._to_uint8(data)), valid

    def close(self) -> None:
        self.ds.close()


# --------------------------------------------------------------------------------------------
# Tiling and blending
# --------------------------------------------------------------------------------------------
def axis_origins(size: int, tile: int, stride: int) -> list[int]:
    """Window starts along one axis: every ``stride`` pixels, the last pulled back to ``size - tile``
    so the far edge is covered; ``[0]`` (a padded window) when the scene is not larger than a tile."""
    if tile < 1 or stride < 1:
        raise ValueError(f"tile ({tile}) and stride ({stride}) must be positive")
    if size <= tile:
        return [0]
    starts = list(range(0, size - tile + 1, stride))
    if starts[-1] != size - tile:
        starts.append(size - tile)
    return starts


@dataclass(frozen=True)
class Tile:
    index: int
    row: int       # strip number
    x0: int
    y0: int


def tile_grid(width: int, height: int, tile: int, overlap: int) -> tuple[list[int], list[int]]:
    """Row and column window starts for a scene (see :func:`axis_origins`)."""
    stride = tile - overlap
    return axis_origins(height, tile, stride), axis_origins(width, tile, stride)


def iter_tiles(rows: Sequence[int], cols: Sequence[int]) -> Iterator[Tile]:
    k = 0
    for r, y0 in enumerate(rows):
        for x0 in cols:
            yield Tile(k, r, x0, y0)
            k += 1


def ramp(length: int, kind: str) -> np.ndarray:
    """Weights of the ``length`` pixels from a tile edge inward (``length`` = the overlap).

    ``linear`` (i + 0.5) / length and ``cosine`` sin^2(pi/2 (i + 0.5) / length) sum to one with the
    mirrored ramp of a neighbour at the nominal overlap and are never zero; ``none`` keeps the pixels
    from the middle of the overlap inward (a hard cut, both tiles kept on the middle pixel of an odd
    overlap)."""
    t = (np.arange(length, dtype=np.float64) + 0.5) / max(length, 1)
    if kind == "linear":
        w = t
    elif kind == "cosine":
        w = np.sin(0.5 * np.pi * t) ** 2
    elif kind == "none":
        w = (t >= 0.5).astype(np.float64)
    else:
        raise ValueError(f"blend {kind!r}: choose one of {', '.join(BLENDS)}")
    return w.astype(np.float32)


def axis_weights(tile: int, overlap: int, kind: str, before: bool, after: bool) -> np.ndarray:
    """1-D weights of one tile: ramps only on the sides that have a neighbour (``before`` / ``after``)."""
    w = np.ones(tile, np.float32)
    if overlap > 0:
        r = ramp(overlap, kind)
        if before:
            w[:overlap] *= r
        if after:
            w[tile - overlap:] *= r[::-1]
    return w


def blend_weights(tile: int, overlap: int, kind: str, neighbours: tuple[bool, bool, bool, bool]) -> np.ndarray:
    """``(tile, tile)`` float32 weights; ``neighbours`` = (top, bottom, left, right) has a neighbour."""
    top, bottom, left, right = neighbours
    return np.outer(axis_weights(tile, overlap, kind, top, bottom), axis_weights(tile, overlap, kind, left, right))


class StripAccumulator:
    """Weighted probability sums over rows ``[top, top + rows)`` of the full scene width.

    ``add`` accumulates a tile (its part inside the scene); ``pop(until)`` returns the rows
    ``[top, until)`` as final probabilities ``(n, r, W)`` float32 and a ``(r, W)`` validity mask
    (a valid pixel that some tile covered), and moves the window down. Memory: ``(n + 1) * rows * W``
    float32, independent of the scene height.
    """

    def __init__(self, width: int, rows: int, channels: int, top: int = 0) -> None:
        self.width, self.rows, self.top = width, rows, top
        self.sum = np.zeros((channels, rows, width), np.float32)
        self.weight = np.zeros((rows, width), np.float32)
        self.valid = np.zeros((rows, width), bool)

    def add(self, x0: int, y0: int, probs: np.ndarray, weights: np.ndarray, valid: np.ndarray,
            height: int) -> None:
        h, w = weights.shape
        # Rows above ``top`` are final already (a resumed run re-scores the strips reaching below).
        ry0, ry1 = max(y0, 0, self.top), min(y0 + h, height)
        rx0, rx1 = max(x0, 0), min(x0 + w, self.width)
        if ry1 > self.top + self.rows:
            raise ValueError(f"tile rows {ry0}..{ry1} outside the strip {self.top}..{self.top + self.rows}")
        sy, sx = slice(ry0 - y0, ry1 - y0), slice(rx0 - x0, rx1 - x0)
        dy, dx = slice(ry0 - self.top, ry1 - self.top), slice(rx0, rx1)
        wt = weights[sy, sx] * valid[sy, sx]
        self.sum[:, dy, dx] += probs[:, sy, sx] * wt
        self.weight[dy, dx] += wt
        self.valid[dy, dx] |= valid[sy, sx]

    def pop(self, until: int) -> tuple[np.ndarray, np.ndarray]:
        k = until - self.top
        if k < 0 or k > self.rows:
            raise ValueError(f"cannot pop to row {until} from a strip starting at {self.top}")
        wsum = self.weight[:k]
        ok = self.valid[:k] & (wsum > 0)
        probs = np.where(ok, self.sum[:, :k] / np.where(ok, wsum, 1), 0).astype(np.float32)
        if k:
            for a in (self.sum, self.weight, self.valid):
                rows_axis = a.ndim - 2  # shift the rows up by k, clear the freed tail
                src = a[(slice(None),) * rows_axis + (slice(k, None),)].copy()
                a[(slice(None),) * rows_axis + (slice(0, self.rows - k),)] = src
                a[(slice(None),) * rows_axis + (slice(self.rows - k, None),)] = 0
        self.top = until
        return probs, ok


# --------------------------------------------------------------------------------------------
# Writing and components
# --------------------------------------------------------------------------------------------
def geotiff_profile(info: SceneInfo, dtype: str, nodata: int | None) -> dict[str, Any]:
    """A tiled, DEFLATE-compressed single-band GeoTIFF on the scene's grid (CRS and transform)."""
    block = BLOCK if min(info.width, info.height) >= BLOCK else None
    profile: dict[str, Any] = dict(driver="GTiff", width=info.width, height=info.height, count=1, dtype=dtype,
                                   crs=info.crs, transform=info.transform, compress="deflate", BIGTIFF="IF_SAFER")
    if nodata is not None:
        profile["nodata"] = nodata
    if block:
        profile.update(tiled=True, blockxsize=block, blockysize=block)
    return profile


def open_geotiff(path: Path, info: SceneInfo, dtype: str, nodata: int | None, resume: bool = False):
    rasterio = _rasterio()
    from rasterio.errors import NotGeoreferencedWarning

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NotGeoreferencedWarning)
        if resume:
            return rasterio.open(path, "r+")
        return rasterio.open(path, "w", **geotiff_profile(info, dtype, nodata))


class ComponentTracker:
    """Connected components (4-connectivity) of a mask that arrives in horizontal bands.

    Each band is labelled with ``scipy.ndimage.label``; labels touching the previous band's last row
    are merged with a union-find, so a component crossing any tile or band border is one component.
    Per provisional label it keeps the pixel count, the sum of probabilities (and of an optional
    context prior) and the bounding box; :meth:`components` resolves them per root.
    """

    def __init__(self, width: int) -> None:
        self.width = width
        self.count = 0
        self.parent = np.zeros(1, np.int64)
        self.area = np.zeros(1, np.int64)
        self.psum = np.zeros(1, np.float64)
        self.csum = np.zeros(1, np.float64)
        self.bbox = np.zeros((1, 4), np.int64)  # x0, y0, x1, y1 (exclusive)
        self.last = np.zeros(width, np.int32)

    def _find(self, a: int) -> int:
        p = self.parent
        root = a
        while p[root] != root:
            root = p[root]
        while p[a] != root:
            p[a], a = root, p[a]
        return root

    def add(self, y0: int, fg: np.ndarray, probs: np.ndarray, prior: np.ndarray | None = None) -> np.ndarray:
        """Label a band starting at scene row ``y0``; returns provisional labels ``(r, W)`` int32."""
        from scipy import ndimage

        lab, n = ndimage.label(fg)  # int32, 1..n; kept int32 (these bands span the scene width)
        if n:
            boxes = np.array([[s[1].start, s[0].start + y0, s[1].stop, s[0].stop + y0]
                              for s in ndimage.find_objects(lab)], np.int64)
            flat = lab.ravel()
            area = np.bincount(flat, minlength=n + 1)[1:]
            psum = np.bincount(flat, weights=probs.ravel(), minlength=n + 1)[1:]
            csum = (np.bincount(flat, weights=prior.ravel(), minlength=n + 1)[1:]
                    if prior is not None else np.zeros(n))
            lab[lab > 0] += self.count
            self.parent = np.concatenate([self.parent, np.arange(self.count + 1, self.count + n + 1)])
            self.area = np.concatenate([self.area, area])
            self.psum = np.concatenate([self.psum, psum])
            self.csum = np.concatenate([self.csum, csum])
            self.bbox = np.concatenate([self.bbox, boxes])
            self.count += n
        if lab.shape[0]:
            touch = (self.last > 0) & (lab[0] > 0)
            for a, b in set(zip(self.last[touch].tolist(), lab[0][touch].tolist())):
                ra, rb = self._find(a), self._find(b)
                if ra != rb:
                    self.parent[max(ra, rb)] = min(ra, rb)
            self.last = lab[-1].copy()
        return lab

    def roots(self) -> np.ndarray:
        """Root of every provisional label (index 0 = background stays 0)."""
        for a in range(1, self.count + 1):
            self._find(a)
        return self.parent.copy()

    def components(self) -> list[dict[str, Any]]:
        """One record per merged component: id (root), area (px), score (mean probability), prior
        (mean context prior), bbox (x0, y0, x1, y1) in scene pixels."""
        roots = self.roots()
        if self.count == 0:
            return []
        r = roots[1:]
        uniq, inv = np.unique(r, return_inverse=True)
        area = np.bincount(inv, weights=self.area[1:])
        psum = np.bincount(inv, weights=self.psum[1:])
        csum = np.bincount(inv, weights=self.csum[1:])
        boxes = self.bbox[1:]
        lo = np.full((len(uniq), 2), np.iinfo(np.int64).max, np.int64)
        hi = np.full((len(uniq), 2), -1, np.int64)
        np.minimum.at(lo, inv, boxes[:, :2])
        np.maximum.at(hi, inv, boxes[:, 2:])
        out = []
        for k, root in enumerate(uniq.tolist()):
            out.append({"id": int(root), "area": int(area[k]), "score": float(psum[k] / area[k]),
                        "prior": float(csum[k] / area[k]),
                        "bbox": [int(lo[k, 0]), int(lo[k, 1]), int(hi[k, 0]), int(hi[k, 1])]})
        return out

    def state(self) -> dict[str, np.ndarray]:
        return {"count": np.array(self.count), "parent": self.parent, "area": self.area, "psum": self.psum,
                "csum": self.csum, "bbox": self.bbox, "last": self.last}

    @classmethod
    def from_state(cls, width: int, state: dict[str, np.ndarray]) -> ComponentTracker:
        t = cls(width)
        t.count = int(state["count"])
        for k in ("parent", "area", "psum", "csum", "bbox", "last"):
            setattr(t, k, np.array(state[k]))
        return t


class BandWriter:
    """Final rows of one sentence: probability GeoTIFF, provisional component labels (a temporary
    int32 GeoTIFF, -1 = nodata) and the component tracker. Rows are buffered and written in whole
    GeoTIFF block rows, so every compressed block is written once."""

    def __init__(self, info: SceneInfo, prob_path: Path, label_path: Path, threshold: float,
                 resume_state: dict[str, np.ndarray] | None = None, rows_done: int = 0) -> None:
        self.info, self.threshold = info, threshold
        self.prob_path, self.label_path = prob_path, label_path
        resume = resume_state is not None
        self.prob = open_geotiff(prob_path, info, "uint8", NODATA, resume)
        self.labels = open_geotiff(label_path, info, "int32", None, resume)
        self.tracker = (ComponentTracker.from_state(info.width, resume_state) if resume
                        else ComponentTracker(info.width))
        self.written = rows_done
        self.pending: list[tuple[np.ndarray, np.ndarray, np.ndarray | None]] = []
        self.pending_rows = 0

    def push(self, probs: np.ndarray, valid: np.ndarray, prior: np.ndarray | None = None, final: bool = False) -> None:
        if probs.shape[0]:
            self.pending.append((probs, valid, prior))
            self.pending_rows += probs.shape[0]
        while self.pending_rows >= BLOCK or (final and self.pending_rows):
            self._write(min(BLOCK, self.pending_rows))

    def _write(self, rows: int) -> None:
        from rasterio.windows import Window

        probs = np.concatenate([p for p, _, _ in self.pending])
        valid = np.concatenate([v for _, v, _ in self.pending])
        prior = (np.concatenate([c for _, _, c in self.pending]) if self.pending[0][2] is not None else None)
        head = (probs[:rows], valid[:rows], None if prior is None else prior[:rows])
        rest = (probs[rows:], valid[rows:], None if prior is None else prior[rows:])
        self.pending = [rest] if rest[0].shape[0] else []
        self.pending_rows -= rows
        p, v, c = head
        win = Window(0, self.written, self.info.width, rows)
        self.prob.write(np.where(v, np.rint(p * 254), NODATA).astype(np.uint8)[None], window=win)
        fg = v & (p > self.threshold)
        lab = self.tracker.add(self.written, fg, np.where(fg, p, 0), None if c is None else np.where(fg, c, 0))
        self.labels.write(np.where(v, lab, np.int32(-1)).astype(np.int32, copy=False)[None], window=win)
        self.written += rows

    def close(self) -> None:
        self.prob.close()
        self.labels.close()

    def reopen(self) -> None:
        """Close both rasters (GDAL writes out their blocks and directory) and open them again for
        update: after this the rows counted in ``written`` are on disk."""
        self.close()
        self.prob = open_geotiff(self.prob_path, self.info, "uint8", NODATA, resume=True)
        self.labels = open_geotiff(self.label_path, self.info, "int32", None, resume=True)


# --------------------------------------------------------------------------------------------
# The tiled pass
# --------------------------------------------------------------------------------------------
@dataclass
class TilingPlan:
    tile: int
    overlap: int
    blend: str
    batch_size: int = 8
    threshold: float = 0.5
    # Seconds between on-disk checkpoints of the pass (rasters closed, tile index saved), so that a
    # run killed outright (SIGKILL, out of memory, power) resumes too; 0: after every block row.
    checkpoint_every: float = 60.0

    def check(self) -> None:
        if self.tile < 1:
            raise SceneError(f"--tile {self.tile}: must be a positive number of pixels")
        if not 0 <= self.overlap <= self.tile // 2:
            raise SceneError(f"--overlap: {self.overlap} px is outside [0, tile/2] for a {self.tile} px tile")
        if self.blend not in BLENDS:
            raise SceneError(f"--blend {self.blend!r}: choose one of {', '.join(BLENDS)}")
        if self.batch_size < 1:
            raise SceneError(f"-b {self.batch_size}: must be >= 1")
        if not 0.0 < self.threshold < 1.0:
            raise SceneError(f"--threshold {self.threshold}: must be in (0, 1)")
        if not self.checkpoint_every >= 0:
            raise SceneError(f"--checkpoint_every {self.checkpoint_every}: must be >= 0 seconds")


@dataclass
class PassResult:
    tiles: int = 0
    scored: int = 0
    skipped: int = 0
    resumed_from_row: int = 0
    writers: list[BandWriter] = field(default_factory=list)


class TileIndex:
    """The sidecar of an interrupted run: settings fingerprint, rows written, tracker states.

    Saved (atomically) after the output files were closed, so the rows it claims are on disk; a
    resumed run re-scores only the strips that reach below those rows."""

    def __init__(self, path: Path, fingerprint: dict[str, Any]) -> None:
        self.path, self.fingerprint = path, fingerprint
        self.state_path = path.with_suffix(".npz")

    def load(self) -> tuple[int, list[dict[str, np.ndarray]]] | None:
        if not self.path.is_file() or not self.state_path.is_file():
            return None
        try:
            meta = json.loads(self.path.read_text())
            if meta.get("fingerprint") != self.fingerprint:
                return None
            with np.load(self.state_path) as z:
                # The two files are replaced one after the other: a kill between them leaves tracker
                # states of another row than the JSON claims, which must not be combined.
                if "rows_done" not in z.files or int(z["rows_done"]) != int(meta["rows_done"]):
                    return None
                states = [{k.split("/", 1)[1]: z[k] for k in z.files if k.startswith(f"{i}/")}
                          for i in range(meta["sentences"])]
        except (OSError, ValueError, KeyError, json.JSONDecodeError):
            return None  # unreadable sidecar (killed while written by an older version): start over
        return int(meta["rows_done"]), states

    def save(self, rows_done: int, tiles_done: int, trackers: Sequence[ComponentTracker]) -> None:
        arrays = {f"{i}/{k}": v for i, t in enumerate(trackers) for k, v in t.state().items()}
        arrays["rows_done"] = np.array(rows_done)
        tmp = self.state_path.with_name(self.state_path.stem + ".tmp.npz")
        np.savez(tmp, **arrays)
        os.replace(tmp, self.state_path)
        meta = {"fingerprint": self.fingerprint, "rows_done": rows_done, "tiles_done": tiles_done,
                "sentences": len(trackers)}
        tmpj = self.path.with_name(self.path.name + ".tmp")
        tmpj.write_text(json.dumps(meta, indent=1))
        os.replace(tmpj, self.path)

    def remove(self) -> None:
        for p in (self.path, self.state_path):
            p.unlink(missing_ok=True)


def run_tiled_pass(reader: SceneReader, score: Scorer, sentences: Sequence[str], plan: TilingPlan,
                   prob_paths: Sequence[Path], label_paths: Sequence[Path], index: TileIndex | None = None,
                   prior: np.ndarray | None = None, progress: Callable[[int], Any] | None = None) -> PassResult:
    """Score every tile for every sentence and stream the blended probabilities to disk.

    ``prior`` (optional, ``(n, h, w)`` float32 at any coarse size) is looked up per final pixel and
    summed per component (the context pass). ``progress(k)`` is called with the number of tiles
    just handled. Returns the open-then-closed writers whose trackers hold the components.
    """
    plan.check()
    info = reader.info
    W, H, T, ov = info.width, info.height, plan.tile, plan.overlap
    rows, cols = tile_grid(W, H, T, ov)
    n = len(sentences)
    resumed = index.load() if index is not None else None
    rows_done = resumed[0] if resumed else 0
    states = resumed[1] if resumed else [None] * n
    writers: list[BandWriter] = []
    try:
        for pp, lp, st in zip(prob_paths, label_paths, states):
            writers.append(BandWriter(info, pp, lp, plan.threshold, st, rows_done))
    except Exception as e:  # noqa: BLE001 - any GDAL error: the partial rasters cannot be updated
        for wr in writers:
            wr.close()
        if not resumed or index is None:  # only a resumed pass (which has an index) may start over
            raise
        warnings.warn(f"cannot resume from {index.path} ({type(e).__name__}: {e}); starting the pass again",
                      stacklevel=2)
        index.remove()
        for path in (*prob_paths, *label_paths):  # GDAL will not overwrite a file it cannot read
            Path(path).unlink(missing_ok=True)
        rows_done, states = 0, [None] * n
        writers = [BandWriter(info, pp, lp, plan.threshold) for pp, lp in zip(prob_paths, label_paths)]
    result = PassResult(tiles=len(rows) * len(cols), resumed_from_row=rows_done, writers=writers)
    first_strip = next((r for r, y0 in enumerate(rows) if y0 + T > rows_done), len(rows))
    acc = StripAccumulator(W, min(T, H), n, top=rows_done)
    weights_cache: dict[tuple[bool, ...], np.ndarray] = {}

    def prior_rows(y0: int, y1: int) -> np.ndarray | None:
        if prior is None:
            return None
        ph, pw = prior.shape[-2:]
        yi = np.minimum(((np.arange(y0, y1) + 0.5) * ph / H).astype(int), ph - 1)
        xi = np.minimum(((np.arange(W) + 0.5) * pw / W).astype(int), pw - 1)
        return prior[:, yi][:, :, xi]

    def flush(until: int, final: bool = False) -> None:
        if until > acc.top or final:
            y0 = acc.top
            probs, ok = acc.pop(max(until, acc.top))
            pr = prior_rows(y0, acc.top)
            for i, wr in enumerate(writers):
                wr.push(probs[i], ok, None if pr is None else pr[i], final=final)

    done_tiles = first_strip * len(cols)
    saved_rows, saved_at = rows_done, time.monotonic()

    def checkpoint() -> None:
        nonlocal saved_rows, saved_at
        written = min(wr.written for wr in writers)
        if index is None or written <= saved_rows or time.monotonic() - saved_at < plan.checkpoint_every:
            return
        for wr in writers:
            wr.reopen()
        index.save(written, done_tiles, [wr.tracker for wr in writers])
        saved_rows, saved_at = written, time.monotonic()

    try:
        for r in range(first_strip, len(rows)):
            y0 = rows[r]
            flush(max(y0, rows_done))
            checkpoint()
            strip = [Tile(r * len(cols) + c, r, x0, y0) for c, x0 in enumerate(cols)]
            for b in range(0, len(strip), plan.batch_size):
                batch = strip[b:b + plan.batch_size]
                reads = [reader.read(t.x0, t.y0, T, T) for t in batch]
                keep = [k for k, (_, v) in enumerate(reads) if v.any()]
                result.skipped += len(batch) - len(keep)
                if keep:
                    images = np.stack([reads[k][0] for k in keep])
                    per_sentence = np.stack([np.asarray(score(images, s), np.float32) for s in sentences])
                    if per_sentence.shape != (n, len(keep), T, T):
                        raise ValueError(f"scorer returned shape {per_sentence.shape[1:]}, expected "
                                         f"{(len(keep), T, T)}")
                    for j, k in enumerate(keep):
                        t = batch[k]
                        nb = (r > 0, r < len(rows) - 1, t.x0 > 0, t.x0 != cols[-1])
                        if nb not in weights_cache:
                            weights_cache[nb] = blend_weights(T, ov, plan.blend, nb)
                        acc.add(t.x0, t.y0, per_sentence[:, j], weights_cache[nb], reads[k][1], H)
                    result.scored += len(keep)
                done_tiles += len(batch)
                if progress is not None:
                    progress(len(batch))
        flush(H, final=True)
    finally:
        for wr in writers:
            wr.close()
        if index is not None:
            written = min(wr.written for wr in writers)
            if written < H:
                index.save(written, done_tiles, [wr.tracker for wr in writers])
            else:
                index.remove()
    return result


def context_prior(reader: SceneReader, score: Scorer, sentences: Sequence[str], size: int) -> np.ndarray:
    """The coarse pass: the whole scene squeezed into one ``size x size`` model input (as training
    resizes its images), scored once per sentence; returns ``(n, size, size)`` float32 probabilities,
    zero where the scene has no data. Lets relative expressions ("the largest ship on the left") be
    judged on the whole scene before the tiled pass ranks its components."""
    from rasterio.enums import Resampling

    data = np.moveaxis(reader.ds.read((1, 2, 3), out_shape=(3, size, size), resampling=Resampling.bilinear), 0, -1)
    valid = reader.ds.read_masks(1, out_shape=(size, size)) > 0
    image = reader._to_uint8(data)[None]
    return np.stack([np.asarray(score(image, s), np.float32)[0] * valid for s in sentences])


# --------------------------------------------------------------------------------------------
# Selection, mask, polygons, overview
# --------------------------------------------------------------------------------------------
def select_components(components: list[dict[str, Any]], mode: str, k: int = 1, min_area_px: float = 0,
                      use_prior: bool = False) -> list[dict[str, Any]]:
    """Candidates at least ``min_area_px`` large, ranked by score (times the context prior when
    ``use_prior``): ``all`` keeps them all, ``best`` the first, ``topk`` the first ``k``."""
    if mode not in MODES:
        raise SceneError(f"--mode {mode!r}: choose one of {', '.join(MODES)}")
    cands = [dict(c) for c in components if c["area"] >= min_area_px]
    for c in cands:
        c["rank_score"] = c["score"] * c["prior"] if use_prior else c["score"]
    # Scores equal to 1e-6 (float noise of the sums) rank by area, then by position.
    cands.sort(key=lambda c: (-round(c["rank_score"], 6), -c["area"], c["id"]))
    for rank, c in enumerate(cands, 1):
        c["rank"] = rank
    if mode == "best":
        return cands[:1]
    if mode == "topk":
        return cands[:max(1, k)]
    return cands


def write_mask(info: SceneInfo, label_path: Path, mask_path: Path, roots: np.ndarray, keep_ids: Sequence[int]) -> None:
    """The binary mask GeoTIFF (0/1, 255 nodata) of the kept components, block row by block row."""
    from rasterio.windows import Window

    keep = np.zeros(len(roots), bool)
    keep[list(keep_ids)] = True
    lut = keep[roots].astype(np.uint8)
    rasterio = _rasterio()
    with rasterio.open(label_path) as src, open_geotiff(mask_path, info, "uint8", NODATA) as dst:
        for y0 in range(0, info.height, BLOCK):
            win = Window(0, y0, info.width, min(BLOCK, info.height - y0))
            lab = src.read(1, window=win)
            out = np.where(lab < 0, NODATA, lut[np.maximum(lab, 0)]).astype(np.uint8)
            dst.write(out[None], window=win)


def _perp_distance(points: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    d = b - a
    norm = math.hypot(*d)
    if norm == 0:
        return np.hypot(*(points - a).T)
    return np.abs(d[0] * (points[:, 1] - a[1]) - d[1] * (points[:, 0] - a[0])) / norm


def simplify_ring(ring: np.ndarray, tolerance: float) -> np.ndarray:
    """Douglas-Peucker on a closed ring (first point == last); keeps at least a triangle."""
    if tolerance <= 0 or len(ring) <= 4:
        return ring
    pts = ring[:-1]
    # Split at the point farthest from the first, so the closed ring becomes two open chains.
    far = int(np.argmax(np.hypot(*(pts - pts[0]).T)))
    keep = np.zeros(len(pts), bool)
    keep[[0, far]] = True
    stack = [(0, far), (far, len(pts))]
    while stack:
        i, j = stack.pop()
        end = pts[j % len(pts)]
        if j - i < 2:
            continue
        d = _perp_distance(pts[i + 1:j], pts[i], end)
        m = int(np.argmax(d))
        if d[m] > tolerance:
            keep[i + 1 + m] = True
            stack += [(i, i + 1 + m), (i + 1 + m, j)]
    out = pts[keep]
    if len(out) < 3:
        return ring
    return np.vstack([out, out[:1]])


def ring_area(ring: np.ndarray) -> float:
    x, y = ring[:, 0], ring[:, 1]
    return 0.5 * float(np.abs(np.dot(x[:-1], y[1:]) - np.dot(x[1:], y[:-1])))


def component_polygons(info: SceneInfo, label_path: Path, roots: np.ndarray, selected: Sequence[dict[str, Any]],
                       simplify: float = 0.0, sentence: str | None = None) -> Iterator[dict[str, Any]]:
    """GeoJSON features (scene CRS coordinates) of the selected components, one at a time: each is
    read from the label raster inside its bounding box only and traced by ``rasterio.features.shapes``
    (4-connectivity, as the components), so memory does not grow with the number of objects."""
    rasterio = _rasterio()
    from rasterio.features import shapes
    from rasterio.windows import Window
    from rasterio.windows import transform as window_transform

    with rasterio.open(label_path) as src:
        for c in selected:
            x0, y0, x1, y1 = c["bbox"]
            win = Window(x0, y0, x1 - x0, y1 - y0)
            lab = src.read(1, window=win)
            m = (lab > 0) & (roots[np.maximum(lab, 0)] == c["id"])
            tr = window_transform(win, info.transform)
            for geom, _ in shapes(m.astype(np.uint8), mask=m, connectivity=4, transform=tr):
                rings = [simplify_ring(np.asarray(r, np.float64), simplify) for r in geom["coordinates"]]
                geom = {"type": "Polygon", "coordinates": [r.tolist() for r in rings]}
                area = ring_area(rings[0]) - sum(ring_area(r) for r in rings[1:])
                props = {"component": c["id"], "rank": c.get("rank"), "score": round(c["score"], 6),
                         "area": round(area, 6), "pixels": c["area"]}
                if sentence is not None:
                    props["sentence"] = sentence
                yield {"type": "Feature", "geometry": geom, "properties": props}


def write_geojson(path: Path, features: Iterable[dict[str, Any]], info: SceneInfo, sentence: str) -> int:
    """Stream a FeatureCollection (with the scene CRS as a named ``crs`` member when there is one);
    returns the number of features."""
    head: dict[str, Any] = {"type": "FeatureCollection", "name": sentence}
    if info.crs is not None:
        epsg = info.crs.to_epsg()
        name = f"urn:ogc:def:crs:EPSG::{epsg}" if epsg else info.crs.to_wkt()
        head["crs"] = {"type": "name", "properties": {"name": name}}
    count = 0
    with open(path, "w") as f:
        f.write(json.dumps(head)[:-1] + ', "features": [')
        for feat in features:
            f.write(("," if count else "") + "\n" + json.dumps(feat))
            count += 1
        f.write("\n]}\n")
    return count


def write_gpkg(path: Path, features: Iterable[dict[str, Any]], info: SceneInfo) -> str | None:
    """A GeoPackage through fiona when it is installed with the GPKG driver; returns why not otherwise."""
    try:
        import fiona
    except ImportError:
        return "fiona is not installed"
    if "GPKG" not in fiona.supported_drivers:
        return "GDAL's GPKG driver is not available"
    schema = {"geometry": "Polygon", "properties": {"component": "int", "rank": "int", "score": "float",
                                                    "area": "float", "pixels": "int", "sentence": "str"}}
    crs_wkt = info.crs.to_wkt() if info.crs is not None else ""
    with fiona.open(path, "w", driver="GPKG", schema=schema, crs_wkt=crs_wkt) as dst:
        for f in features:
            dst.write({"geometry": f["geometry"], "properties": f["properties"]})
    return None


def write_overview(path: Path, reader: SceneReader, mask_path: Path, max_side: int = 1024) -> tuple[int, int]:
    """A PNG of the scene decimated to ``max_side`` with the mask tinted red over it, its outline drawn,
    and nodata greyed."""
    from PIL import Image

    rasterio = _rasterio()
    from rasterio.enums import Resampling

    picture, valid = reader.read_decimated(max_side)
    with rasterio.open(mask_path) as src:
        mask = src.read(1, out_shape=picture.shape[:2], resampling=Resampling.nearest)
    m = mask == 1
    pic = picture.astype(np.float32)
    pic[m] = 0.55 * pic[m] + 0.45 * np.array([255, 40, 40], np.float32)
    inner = np.pad(m, 1)
    inner = inner[1:-1, 1:-1] & inner[:-2, 1:-1] & inner[2:, 1:-1] & inner[1:-1, :-2] & inner[1:-1, 2:]
    pic[m & ~inner] = (255, 40, 40)
    pic = pic.clip(0, 255).astype(np.uint8)
    nod = (mask == NODATA) | ~valid
    pic[nod] = (0.5 * pic[nod] + 64).astype(np.uint8)
    Image.fromarray(pic).save(path)
    return pic.shape[1], pic.shape[0]


# --------------------------------------------------------------------------------------------
# Synthetic scenes (tests and benchmarks; no download)
# --------------------------------------------------------------------------------------------
def synthetic_scene(path: str | os.PathLike, width: int, height: int, seed: int = 0, cell: int = 96,
                    density: float = 0.5, chip: int = 48, classes: Sequence[str] | None = None,
                    gsd: float = 0.5, crs: str | None = "EPSG:32633", gt_path: str | os.PathLike | None = None,
                    nodata_box: tuple[int, int, int, int] | None = None) -> list[str]:
    """Write a large RGB GeoTIFF made of the synthetic generator's objects on a smooth background,
    strip by strip (memory: one row of cells). Objects come from ``data.synthetic.sample_scene``
    chips of ``chip`` pixels and are pasted at most one per ``cell x cell`` cell.

    ``gt_path`` receives a uint8 GeoTIFF of class index + 1 per object pixel (0 = background);
    ``nodata_box`` = (x0, y0, x1, y1) is written as nodata 0 (all bands, and 0 in the truth).
    Returns the class names (index order). ``crs=None`` writes a non-georeferenced TIFF.
    """
    rasterio = _rasterio()
    from rasterio.transform import from_origin
    from rasterio.windows import Window

    from data import synthetic as syn

    styles = {k: v for k, v in syn.RRSISD_STYLES.items() if classes is None or k in classes}
    names = list(styles)
    rng = np.random.default_rng(seed)
    bank: list[tuple[int, np.ndarray, np.ndarray]] = []
    while len(bank) < 64:
        s = syn.sample_scene(rng, chip, styles)
        for o in s.objects:
            x, y, w, h = o.bbox()
            bank.append((names.index(o.name), s.image[y:y + h, x:x + w].copy(), o.mask[y:y + h, x:x + w].astype(bool)))
    base = np.array([110.0, 120.0, 90.0])
    coarse = np.random.default_rng(seed + 1).uniform(-1, 1, (height // 512 + 2, width // 512 + 2, 3))
    transform = from_origin(500_000.0, 4_200_000.0, gsd, gsd) if crs else rasterio.Affine.identity()
    profile = dict(driver="GTiff", width=width, height=height, count=3, dtype="uint8", crs=crs, transform=transform,
                   tiled=True, blockxsize=256, blockysize=256, compress="deflate", photometric="RGB")
    if nodata_box is not None:
        profile["nodata"] = 0
    gt_profile = {**profile, "count": 1, "photometric": "MINISBLACK"}
    gt_profile.pop("nodata", None)
    import contextlib

    with contextlib.ExitStack() as stack:
        dst = stack.enter_context(rasterio.open(path, "w", **profile))
        gt = stack.enter_context(rasterio.open(gt_path, "w", **gt_profile)) if gt_path else None
        for y0 in range(0, height, cell):
            h = min(cell, height - y0)
            yy = (np.arange(y0, y0 + h) + 0.5) / 512
            xx = (np.arange(width) + 0.5) / 512
            iy, ix = np.floor(yy).astype(int), np.floor(xx).astype(int)
            fy, fx = (yy - iy)[:, None, None], (xx - ix)[None, :, None]
            noise = ((1 - fy) * (1 - fx) * coarse[iy][:, ix] + (1 - fy) * fx * coarse[iy][:, ix + 1]
                     + fy * (1 - fx) * coarse[iy + 1][:, ix] + fy * fx * coarse[iy + 1][:, ix + 1])
            band_rng = np.random.default_rng([seed, y0])
            img = base + 18 * noise + band_rng.normal(0, 4, (h, width, 3))
            img = np.clip(np.rint(img), 1, 255).astype(np.uint8)
            truth = np.zeros((h, width), np.uint8)
            for x0 in range(0, width, cell):
                if band_rng.random() >= density:
                    continue
                k, pix, m = bank[int(band_rng.integers(len(bank)))]
                ph, pw = m.shape
                w = min(cell, width - x0)
                if ph > h or pw > w:
                    continue
                oy, ox = int(band_rng.integers(0, h - ph + 1)), int(band_rng.integers(0, w - pw + 1))
                region = img[oy:oy + ph, x0 + ox:x0 + ox + pw]
                region[m] = np.maximum(pix[m], 1)
                truth[oy:oy + ph, x0 + ox:x0 + ox + pw][m] = k + 1
            if nodata_box is not None:
                bx0, by0, bx1, by1 = nodata_box
                ys0, ys1 = max(by0 - y0, 0), min(by1 - y0, h)
                if ys1 > ys0:
                    img[ys0:ys1, bx0:bx1] = 0
                    truth[ys0:ys1, bx0:bx1] = 0
            win = Window(0, y0, width, h)
            dst.write(np.moveaxis(img, -1, 0), window=win)
            if gt is not None:
                gt.write(truth[None], window=win)
    return names
