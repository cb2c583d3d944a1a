"""data/scene.py: tiling, blending, the strip accumulator, components, polygons, resume -- with
model-free scorers (functions of position or colour), so every expected value is known."""
from __future__ import annotations

import json
import os
import shutil
import sys

import numpy as np
import pytest

rasterio = pytest.importorskip("rasterio")
from rasterio.transform import from_origin

from data import scene as sc

pytestmark = [pytest.mark.filterwarnings("ignore::DeprecationWarning"),
              pytest.mark.filterwarnings("ignore::PendingDeprecationWarning")]

TR = from_origin(500_000.0, 4_200_000.0, 0.5, 0.5)


def write_rgb(path, img: np.ndarray, crs="EPSG:32633", transform=TR, nodata=None, count=3):
    h, w = img.shape[:2]
    prof = dict(driver="GTiff", width=w, height=h, count=count, dtype=str(img.dtype), crs=crs, transform=transform)
    if nodata is not None:
        prof["nodata"] = nodata
    with rasterio.open(path, "w", **prof) as d:
        d.write(np.moveaxis(img[..., :count], -1, 0))
    return path


def run_pass(tmp_path, scene_path, score, plan, sentences=("s",), index=None, prior=None):
    reader = sc.SceneReader(scene_path)
    n = len(sentences)
    probs = [tmp_path / f"p{i}.tif" for i in range(n)]
    labels = [tmp_path / f"l{i}.tif" for i in range(n)]
    try:
        res = sc.run_tiled_pass(reader, score, list(sentences), plan, probs, labels, index=index, prior=prior)
    finally:
        reader.close()
    return res, probs, labels


def read(path) -> np.ndarray:
    with rasterio.open(path) as d:
        return d.read(1)


def constant(value: float):
    return lambda tiles, s: np.full(tiles.shape[:3], value, np.float32)


def bright(tiles, s):
    """An 'object detector' that knows nothing of tiles: bright pixels are the referent."""
    return np.where(tiles[..., 0] > 150, 0.9, 0.1).astype(np.float32)


# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("size", [1, 47, 48, 49, 95, 96, 97, 130, 1000])
def test_axis_origins_cover_every_pixel_and_stay_inside(size):
    tile, stride = 48, 36
    starts = sc.axis_origins(size, tile, stride)
    covered = np.zeros(max(size, tile), bool)
    for s in starts:
        assert s >= 0 and (s + tile <= size or size <= tile)
        covered[s:s + tile] = True
    assert covered[:size].all()
    assert starts == sorted(set(starts))
    if size > tile:
        assert starts[-1] == size - tile  # pulled back inside, not padded


@pytest.mark.parametrize("kind", ["linear", "cosine"])
def test_ramps_sum_to_one_at_the_nominal_overlap_and_never_vanish(kind):
    r = sc.ramp(12, kind)
    assert (r > 0).all() and (r <= 1).all()
    np.testing.assert_allclose(r + r[::-1], 1.0, atol=1e-6)
    w = sc.blend_weights(48, 12, kind, (False, True, False, True))
    assert w[0, 0] == 1.0 and w[-1, -1] < 0.01  # full weight at the scene border, ramp inside


def test_hard_cut_keeps_each_overlap_pixel_from_one_tile():
    for ov in (8, 9):
        r = sc.ramp(ov, "none")
        both = r + r[::-1]
        assert both.min() >= 1 and both.max() <= 2
        assert (both == 2).sum() == ov % 2  # only the middle pixel of an odd overlap is shared


@pytest.mark.parametrize("w,h", [(48, 48), (49, 48), (48, 97), (30, 20), (131, 77)])
def test_right_and_bottom_edges_are_covered(tmp_path, w, h):
    img = np.full((h, w, 3), 100, np.uint8)
    scene = write_rgb(tmp_path / "s.tif", img)
    res, probs, _ = run_pass(tmp_path, scene, constant(0.8), sc.TilingPlan(tile=48, overlap=12, blend="cosine"))
    p = read(probs[0])
    assert p.shape == (h, w)
    assert (p == round(0.8 * 254)).all(), "a pixel was not covered (or weights do not normalise)"
    assert res.skipped == 0


def position_scorer(tile: int, rows, cols):
    """A smooth function of scene position plus a bias that grows across each tile (what a real
    model's border effects look like): stitched without blending it jumps at every seam."""
    origins = iter([])

    def score(tiles, s):
        nonlocal origins
        out = []
        for _ in range(len(tiles)):
            y0, x0 = next(origins)
            yy, xx = np.mgrid[y0:y0 + tile, x0:x0 + tile]
            smooth = 0.5 + 0.3 * np.sin(xx / 40.0) * np.cos(yy / 55.0)
            local = 0.15 * (np.arange(tile) / tile)[None, :]
            out.append((smooth + local).astype(np.float32))
        return np.stack(out)

    def reset():
        nonlocal origins
        origins = iter([(y, x) for y in rows for x in cols])
    return score, reset


def test_cosine_blending_leaves_no_seam_where_a_hard_cut_does(tmp_path):
    h, w, tile, ov = 120, 200, 64, 16
    scene = write_rgb(tmp_path / "s.tif", np.full((h, w, 3), 100, np.uint8))
    rows, cols = sc.tile_grid(w, h, tile, ov)
    jumps = {}
    for kind in ("none", "cosine"):
        score, reset = position_scorer(tile, rows, cols)
        reset()
        out = tmp_path / kind
        out.mkdir()
        _, probs, _ = run_pass(out, scene, score, sc.TilingPlan(tile=tile, overlap=ov, blend=kind, batch_size=3))
        p = read(probs[0]).astype(float) / 254
        jumps[kind] = np.abs(np.diff(p, axis=1)).max()
    # The smooth part changes by < 0.01 per pixel; the tile bias adds 0.15/64 per pixel.
    assert jumps["cosine"] < 0.025, jumps
    assert jumps["none"] > 0.1, jumps


def test_result_does_not_depend_on_the_batch_size(tmp_path):
    rng = np.random.default_rng(0)
    img = rng.integers(0, 255, (150, 170, 3), dtype=np.uint8)
    scene = write_rgb(tmp_path / "s.tif", img)
    outs = []
    for b in (1, 7):
        d = tmp_path / f"b{b}"
        d.mkdir()
        _, probs, labels = run_pass(d, scene, bright, sc.TilingPlan(tile=48, overlap=12, blend="linear", batch_size=b))
        outs.append((read(probs[0]), read(labels[0])))
    np.testing.assert_array_equal(outs[0][0], outs[1][0])
    np.testing.assert_array_equal(outs[0][1], outs[1][1])


def test_nodata_stays_nodata_and_empty_tiles_are_skipped(tmp_path):
    img = np.full((200, 200, 3), 200, np.uint8)
    img[:100, :100] = 0  # nodata = 0 on all bands: the top-left 100 x 100
    scene = write_rgb(tmp_path / "s.tif", img, nodata=0)
    res, probs, labels = run_pass(tmp_path, scene, constant(0.9), sc.TilingPlan(tile=48, overlap=0, blend="cosine"))
    p = read(probs[0])
    assert (p[:100, :100] == sc.NODATA).all()
    assert (p[100:, :] == round(0.9 * 254)).all() and (p[:, 100:] == round(0.9 * 254)).all()
    assert res.skipped == 4  # the 2 x 2 tiles inside the nodata corner
    assert (read(labels[0])[:100, :100] == -1).all()


def test_components_merge_across_tile_and_block_borders(tmp_path):
    h, w = 600, 300
    img = np.full((h, w, 3), 60, np.uint8)
    img[20:580, 140:160] = 220   # a long bar crossing many tiles and two 256-row blocks
    img[50:60, 20:30] = 220      # a small square
    scene = write_rgb(tmp_path / "s.tif", img)
    res, _, labels = run_pass(tmp_path, scene, bright, sc.TilingPlan(tile=64, overlap=16, blend="cosine"))
    tracker = res.writers[0].tracker
    comps = sorted(tracker.components(), key=lambda c: -c["area"])
    assert [c["area"] for c in comps] == [560 * 20, 100]
    assert comps[0]["bbox"] == [140, 20, 160, 580]
    assert comps[0]["score"] == pytest.approx(0.9, abs=1e-6)
    info = sc.SceneReader(scene).info
    roots = tracker.roots()
    best = sc.select_components(tracker.components(), "topk", 2)
    feats = list(sc.component_polygons(info, labels[0], roots, best))
    assert len(feats) == 2
    assert feats[0]["properties"]["area"] == pytest.approx(560 * 20 * 0.25)  # CRS m^2 (0.5 m pixels)
    sc.write_mask(info, labels[0], tmp_path / "m.tif", roots, [comps[1]["id"]])
    m = read(tmp_path / "m.tif")
    assert m.sum() == 100 and m[50:60, 20:30].all()


def test_polygons_rasterise_back_onto_the_mask_in_the_scene_crs(tmp_path):
    from rasterio.features import rasterize

    rng = np.random.default_rng(3)
    img = np.full((256, 320, 3), 60, np.uint8)
    yy, xx = np.mgrid[:256, :320]
    for _ in range(6):
        cy, cx, r = rng.integers(20, 236), rng.integers(20, 300), rng.integers(5, 18)
        img[(yy - cy) ** 2 + (xx - cx) ** 2 < r * r] = 220
    scene = write_rgb(tmp_path / "s.tif", img)
    res, _, labels = run_pass(tmp_path, scene, bright, sc.TilingPlan(tile=64, overlap=16, blend="cosine"))
    info = sc.SceneReader(scene).info
    t = res.writers[0].tracker
    feats = sc.component_polygons(info, labels[0], t.roots(), sc.select_components(t.components(), "all"))
    assert sc.write_geojson(tmp_path / "p.geojson", feats, info, "s") == 6
    fc = json.loads((tmp_path / "p.geojson").read_text())
    assert fc["crs"]["properties"]["name"].endswith("32633")
    burnt = rasterize([(f["geometry"], 1) for f in fc["features"]], out_shape=(256, 320), transform=TR)
    np.testing.assert_array_equal(burnt.astype(bool), img[..., 0] > 150)


def test_gpkg_holds_the_polygons_and_says_why_when_fiona_is_missing(tmp_path, monkeypatch):
    import fiona
    from rasterio.features import rasterize

    img = np.full((64, 96, 3), 60, np.uint8)
    img[10:30, 20:50] = 220
    img[40:60, 60:90] = 220
    scene = write_rgb(tmp_path / "s.tif", img)
    res, _, labels = run_pass(tmp_path, scene, bright, sc.TilingPlan(tile=32, overlap=8, blend="cosine"))
    info = sc.SceneReader(scene).info
    t = res.writers[0].tracker
    feats = list(sc.component_polygons(info, labels[0], t.roots(), sc.select_components(t.components(), "all"),
                                       sentence="bright things"))
    assert sc.write_gpkg(tmp_path / "p.gpkg", feats, info) is None
    with fiona.open(tmp_path / "p.gpkg") as layer:
        assert layer.crs.to_epsg() == 32633 and len(layer) == 2
        rows = list(layer)
    assert {r.properties["sentence"] for r in rows} == {"bright things"}
    burnt = rasterize([(dict(r.geometry), 1) for r in rows], out_shape=(64, 96), transform=TR)
    np.testing.assert_array_equal(burnt.astype(bool), img[..., 0] > 150)

    monkeypatch.setitem(sys.modules, "fiona", None)   # import fiona now raises ImportError
    assert sc.write_gpkg(tmp_path / "q.gpkg", feats, info) == "fiona is not installed"
    assert not (tmp_path / "q.gpkg").exists()


def test_simplify_ring_drops_collinear_points_and_stays_closed():
    ring = np.array([[0, 0], [1, 0], [2, 0], [2, 1], [2, 2], [1, 2.01], [0, 2], [0, 1], [0, 0]], float)
    out = sc.simplify_ring(ring, 0.1)
    assert (out[0] == out[-1]).all() and len(out) == 5
    assert sc.ring_area(out) == pytest.approx(4.0)


def test_interrupted_pass_resumes_to_the_same_result(tmp_path):
    h, w = 700, 260
    img = np.full((h, w, 3), 60, np.uint8)
    img[30:650, 100:130] = 220
    img[400:420, 10:40] = 220
    scene = write_rgb(tmp_path / "s.tif", img)
    plan = sc.TilingPlan(tile=64, overlap=16, blend="cosine", batch_size=2)
    straight = tmp_path / "straight"
    straight.mkdir()
    first, sp, _ = run_pass(straight, scene, bright, plan, index=sc.TileIndex(straight / "s.tiles.json", {"a": 1}))
    assert not (straight / "s.tiles.json").exists()  # removed once complete

    calls = {"n": 0}

    def flaky(tiles, s):
        calls["n"] += 1
        if calls["n"] == 40:
            raise RuntimeError("lost the device")
        return bright(tiles, s)

    split = tmp_path / "split"
    split.mkdir()
    with pytest.raises(RuntimeError):
        run_pass(split, scene, flaky, plan, index=sc.TileIndex(split / "s.tiles.json", {"a": 1}))
    meta = json.loads((split / "s.tiles.json").read_text())
    assert 0 < meta["rows_done"] < h and meta["rows_done"] % sc.BLOCK == 0 and meta["tiles_done"] > 0
    res, pp, _ = run_pass(split, scene, bright, plan, index=sc.TileIndex(split / "s.tiles.json", {"a": 1}))
    assert res.resumed_from_row == meta["rows_done"] and res.scored < first.scored  # done strips not re-run
    np.testing.assert_array_equal(read(sp[0]), read(pp[0]))
    a, b = res.writers[0].tracker.components(), first.writers[0].tracker.components()
    assert len(a) == 2 and sorted((c["area"], c["bbox"]) for c in a) == sorted((c["area"], c["bbox"]) for c in b)
    assert not (split / "s.tiles.json").exists()


def _killed_pass(out, scene, plan, kill_at: int) -> None:
    """A child process runs the pass and SIGKILLs itself at the ``kill_at``-th scorer call: no
    ``finally``, no flush, exactly what ``kill -9`` or the out-of-memory killer leave behind."""
    import multiprocessing as mp
    import signal

    def child() -> None:
        calls = {"n": 0}

        def dying(tiles, s):
            calls["n"] += 1
            if calls["n"] == kill_at:
                os.kill(os.getpid(), signal.SIGKILL)
            return bright(tiles, s)

        run_pass(out, scene, dying, plan, index=sc.TileIndex(out / "s.tiles.json", {"a": 1}))

    proc = mp.get_context("fork").Process(target=child)
    proc.start()
    proc.join(60)
    assert proc.exitcode == -signal.SIGKILL


def test_a_pass_killed_outright_resumes_from_its_last_checkpoint(tmp_path):
    h, w = 1100, 200
    img = np.full((h, w, 3), 60, np.uint8)
    img[30:1050, 80:110] = 220           # one component through every block row
    img[700:720, 10:40] = 220
    scene = write_rgb(tmp_path / "s.tif", img)
    plan = sc.TilingPlan(tile=64, overlap=16, blend="cosine", batch_size=2, checkpoint_every=0)
    straight = tmp_path / "straight"
    straight.mkdir()
    first, sp, _ = run_pass(straight, scene, bright, plan)

    killed = tmp_path / "killed"
    killed.mkdir()
    _killed_pass(killed, scene, plan, kill_at=40)   # 2 tiles a call, 4 per strip: strip ~20, row ~960
    meta = json.loads((killed / "s.tiles.json").read_text())
    assert meta["rows_done"] > 0 and meta["rows_done"] % sc.BLOCK == 0
    broken = tmp_path / "broken"           # the same, with its partial raster damaged
    shutil.copytree(killed, broken)
    (broken / "p0.tif").write_bytes((broken / "p0.tif").read_bytes()[:100])
    with pytest.warns(UserWarning, match="cannot resume from .*s.tiles.json.*starting the pass again"):
        res, pb, _ = run_pass(broken, scene, bright, plan, index=sc.TileIndex(broken / "s.tiles.json", {"a": 1}))
    assert res.resumed_from_row == 0 and res.scored == first.scored
    np.testing.assert_array_equal(read(sp[0]), read(pb[0]))
    res, pp, _ = run_pass(killed, scene, bright, plan, index=sc.TileIndex(killed / "s.tiles.json", {"a": 1}))
    assert res.resumed_from_row == meta["rows_done"] and res.scored < first.scored
    np.testing.assert_array_equal(read(sp[0]), read(pp[0]))
    a, b = res.writers[0].tracker.components(), first.writers[0].tracker.components()
    assert len(a) == 2 and sorted((c["area"], c["bbox"]) for c in a) == sorted((c["area"], c["bbox"]) for c in b)

    # Never checkpointed (a long interval): the kill leaves no index and the next run starts over.
    never = tmp_path / "never"
    never.mkdir()
    _killed_pass(never, scene, sc.TilingPlan(tile=64, overlap=16, blend="cosine", batch_size=2), kill_at=40)
    assert not (never / "s.tiles.json").exists()
    res, pn, _ = run_pass(never, scene, bright, plan, index=sc.TileIndex(never / "s.tiles.json", {"a": 1}))
    assert res.resumed_from_row == 0
    np.testing.assert_array_equal(read(sp[0]), read(pn[0]))


def test_a_sidecar_whose_two_files_disagree_or_are_broken_is_not_used(tmp_path):
    idx = sc.TileIndex(tmp_path / "s.tiles.json", {"tile": 64})
    idx.save(256, 10, [sc.ComponentTracker(8)])
    assert idx.load()[0] == 256
    states = dict(np.load(idx.state_path))
    idx.save(512, 20, [sc.ComponentTracker(8)])
    np.savez(idx.state_path, **states)   # killed between the two replaces: the npz is one row behind
    assert idx.load() is None
    idx.path.write_text("{")              # a truncated JSON
    assert idx.load() is None


def test_a_changed_setting_does_not_resume(tmp_path):
    idx = sc.TileIndex(tmp_path / "s.tiles.json", {"tile": 64})
    idx.save(256, 10, [sc.ComponentTracker(8)])
    assert idx.load() is not None
    assert sc.TileIndex(tmp_path / "s.tiles.json", {"tile": 48}).load() is None


def test_strip_accumulator_holds_one_strip_only():
    acc = sc.StripAccumulator(width=5000, rows=64, channels=2)
    assert acc.sum.shape == (2, 64, 5000) and acc.weight.shape == (64, 5000)
    w = np.ones((64, 64), np.float32)
    acc.add(0, 0, np.full((2, 64, 64), 0.5, np.float32), w, np.ones((64, 64), bool), height=10_000)
    probs, ok = acc.pop(16)
    assert probs.shape == (2, 16, 5000) and ok[:, :64].all() and not ok[:, 64:].any()
    assert acc.top == 16 and acc.weight[:48, :64].all() and not acc.weight[48:].any()


def test_ground_sample_distance_from_the_transform():
    from rasterio.crs import CRS

    assert sc.ground_sample_distance(CRS.from_epsg(32633), TR, 10, 10) == pytest.approx(0.5)
    geo = from_origin(10.0, 1.0, 1e-5, 1e-5)  # near the equator: 1e-5 degree ~ 1.11 m
    assert sc.ground_sample_distance(CRS.from_epsg(4326), geo, 10, 10) == pytest.approx(1.113, abs=0.01)
    assert sc.ground_sample_distance(None, TR, 10, 10) is None


def test_bad_scenes_give_one_line(tmp_path):
    img = np.full((40, 40, 3), 9, np.uint8)
    with pytest.raises(sc.SceneError, match="has 2 band"):
        sc.SceneReader(write_rgb(tmp_path / "two.tif", img, count=2))
    with pytest.raises(sc.SceneError, match="unknown CRS"):
        sc.SceneReader(write_rgb(tmp_path / "nocrs.tif", img, crs=None))
    with pytest.raises(sc.SceneError, match="file not found"):
        sc.SceneReader(tmp_path / "missing.tif")
    with pytest.warns(UserWarning, match="not georeferenced"):
        r = sc.SceneReader(write_rgb(tmp_path / "plain.tif", img, crs=None, transform=rasterio.Affine.identity()))
    assert r.info.gsd is None and not r.info.georeferenced
    r.close()


def test_a_16_bit_scene_is_stretched_to_8_bit_in_order(tmp_path):
    ramp16 = np.tile((np.arange(200, dtype=np.uint16) * 50 + 1000)[None, :, None], (50, 1, 3))
    scene = write_rgb(tmp_path / "u16.tif", ramp16)
    r = sc.SceneReader(scene)
    img, valid = r.read(0, 0, 200, 50)
    r.close()
    assert img.dtype == np.uint8 and valid.all()
    row = img[0, :, 0].astype(int)
    assert (np.diff(row) >= 0).all() and row[0] == 0 and row[-1] == 255  # 2-98 % stretch, clipped
