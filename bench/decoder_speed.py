"""Decoder-only A/B probe: `SimpleDecoding` at the paper setting's map sizes (Swin-B, 480 px:
1024x15x15, 512x30x30, 256x60x60, 128x120x120, batch 2), float32, direct vs Winograd 3x3
convolutions, the variants interleaved round by round in ONE process so that load on a shared
machine hits them alike. Prints one JSON line per variant (min / median CPU and wall seconds).

    python bench/decoder_speed.py --what forward --tiles 0,2,4 --rounds 5 --threads 1
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--what", choices=("forward", "train"), default="forward")
    ap.add_argument("--tiles", default="0,4", help="comma list of Winograd tile sizes (0 = direct); "
                    "a suffix 'cl' also turns on the decoder's channels-last layout, e.g. 4cl")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--batch", type=int, default=2)
    a = ap.parse_args()
    import torch

    from lib.decoder import SimpleDecoding

    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    dec = SimpleDecoding(1024)
    maps = [torch.randn(a.batch, c, s, s) for c, s in ((1024, 15), (512, 30), (256, 60), (128, 120))]
    tiles = a.tiles.split(",")
    if a.what == "forward":
        dec.eval()

        def run():
            with torch.no_grad():
                dec(*maps)
    else:
        dec.train()
        for t in maps:
            t.requires_grad_(True)

        def run():
            dec.zero_grad(set_to_none=True)
            dec(*maps).square().mean().backward()
    res: dict[str, tuple[list[float], list[float]]] = {t: ([], []) for t in tiles}
    for r in range(a.rounds + 1):
        for t in tiles:
            dec.winograd = int(t.removesuffix("cl"))
            dec.channels_last = t.endswith("cl")
            c0, w0 = time.process_time(), time.perf_counter()
            run()
            if r:  # round 0 is warm-up
                res[t][0].append(time.process_time() - c0)
                res[t][1].append(time.perf_counter() - w0)
    for t, (cpu, wall) in res.items():
        print(json.dumps({"bench": "decoder", "what": a.what, "winograd": t, "threads": a.threads,
                          "min_cpu_s": round(min(cpu), 3), "median_cpu_s": round(statistics.median(cpu), 3),
                          "min_wall_s": round(min(wall), 3), "median_wall_s": round(statistics.median(wall), 3)}))


if __name__ == "__main__":
    main()
