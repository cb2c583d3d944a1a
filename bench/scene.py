"""Peak memory of scene-scale inference: a 2,000 x 2,000 vs a 20,000 x 20,000 scene.

    python bench/scene.py [--sizes 2000,20000] [--tile 480] [--workdir DIR] [--keep]

Writes each synthetic scene once (``data.scene.synthetic_scene``: the generator's objects on a
smooth background, tiled DEFLATE GeoTIFF, EPSG:32633, 0.5 m), then, in a fresh process per size,
runs the model-free part of ``predict.py`` -- windowed reads, blending, the strip accumulator,
GeoTIFF writers, components, mask, polygons, overview -- with a colour-threshold scorer standing in
for the model (so the numbers are the pipeline's, not a network's). Prints one JSON line per size:
peak RSS of the measuring process (``ru_maxrss``), its RSS after imports (the baseline), seconds,
tiles. The model's own memory (one batch of tiles) comes on top and does not grow with the scene.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def measure(scene: str, out: str, tile: int) -> dict:
    import numpy as np

    from data import scene as sc

    base = rss_mb()

    def score(tiles, sentence):
        return np.where(tiles.max(-1) > 180, 0.9, 0.1).astype(np.float32)

    t0 = time.time()
    with sc.gdal_env():
        reader = sc.SceneReader(scene)
        info = reader.info
        outd = Path(out)
        plan = sc.TilingPlan(tile=tile, overlap=tile // 4, blend="cosine", batch_size=8)
        res = sc.run_tiled_pass(reader, score, ["s"], plan, [outd / "p.tif"], [outd / "l.tif"])
        tracker = res.writers[0].tracker
        roots = tracker.roots()
        comps = tracker.components()
        chosen = sc.select_components(comps, "all", min_area_px=20)
        sc.write_mask(info, outd / "l.tif", outd / "m.tif", roots, [c["id"] for c in chosen])
        polygons = sc.write_geojson(outd / "p.geojson", sc.component_polygons(info, outd / "l.tif", roots, chosen),
                                    info, "s")
        sc.write_overview(outd / "o.png", reader, outd / "m.tif")
        reader.close()
    return {"size": [info.width, info.height], "tiles": res.tiles, "components": len(comps),
            "polygons": polygons, "seconds": round(time.time() - t0, 1), "rss_after_imports_mb": round(base, 1),
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="2000,20000", help="scene sides in pixels, comma separated")
    p.add_argument("--tile", type=int, default=480, help="tile side in pixels (overlap: a quarter)")
    p.add_argument("--workdir", default=None, help="where scenes and outputs go (default: a temp folder)")
    p.add_argument("--keep", action="store_true", help="keep the written scenes and outputs")
    p.add_argument("--_measure", nargs=2, metavar=("SCENE", "OUT"), help=argparse.SUPPRESS)
    a = p.parse_args()
    if a._measure:
        print(json.dumps(measure(a._measure[0], a._measure[1], a.tile)))
        return 0
    from data import scene as sc

    work = Path(a.workdir or tempfile.mkdtemp(prefix="scene_bench_"))
    work.mkdir(parents=True, exist_ok=True)
    for side in [int(s) for s in a.sizes.split(",")]:
        scene = work / f"scene_{side}.tif"
        if not scene.is_file():
            t = time.time()
            sc.synthetic_scene(scene, side, side, seed=0, cell=96, density=0.5)
            print(f"[bench] wrote {scene} ({scene.stat().st_size / 2**20:.0f} MiB) in {time.time() - t:.0f} s",
                  file=sys.stderr)
        out = work / f"out_{side}"
        out.mkdir(exist_ok=True)
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        proc = subprocess.run([sys.executable, __file__, "--tile", str(a.tile), "--_measure", str(scene), str(out)],
                              env=env, capture_output=True, text=True, check=True)
        rec = json.loads(proc.stdout.strip().splitlines()[-1])
        rec.update(tile=a.tile, cpu=platform.processor() or platform.machine(), python=platform.python_version(),
                   loadavg=round(os.getloadavg()[0], 2))
        print(json.dumps(rec))
    if not a.keep and not a.workdir:
        import shutil

        shutil.rmtree(work)
    return 0


if __name__ == "__main__":
    sys.exit(main())
