#!/usr/bin/env python
"""Multi-scale deformable attention alone: the grid_sample core vs the naive loop.

    python bench/deformable.py [--setting paper|fixture] [--batch 2] [--threads 2] [--repeat 5]
                               [--backward] [--device cpu|cuda]

``paper``: LGFormer's pixel decoder at 480 px: levels 15x15, 30x30, 60x60 (Lq = S = 4725 queries
on their own memory), 8 heads x 32 channels, 4 points. ``fixture``: the lgformer_a sizes (104x136
input: 4x5, 7x9, 13x17). Times ``ms_deform_attn_core`` (grid_sample, the path the model runs),
``ms_deform_attn_naive`` (per-sample / level / point loop with explicit bilinear gathers) and the
whole ``MSDeformAttn`` module (projections + core) on random inputs; prints the max difference of
the two cores and one JSON line per measurement (median / min / max of ``--repeat`` passes after
one warm-up). ``--backward`` adds a backward pass through each.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from _common import cpu_model  # noqa: E402

from lib.deformable import (  # noqa: E402
    MSDeformAttn,
    flatten_levels,
    level_reference_points,
    ms_deform_attn_core,
    ms_deform_attn_naive,
)

SETTINGS = {
    "paper": [(15, 15), (30, 30), (60, 60)],
    "fixture": [(4, 5), (7, 9), (13, 17)],
}


def _time(fn, repeat: int, device: torch.device) -> list[float]:
    fn()  # warm-up
    out = []
    for _ in range(repeat):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        out.append(time.perf_counter() - t)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--setting", choices=sorted(SETTINGS), default="paper")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--threads", type=int, default=0, help="intra-op threads (0: leave as is)")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--backward", action="store_true", help="time forward + backward")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--skip-naive", action="store_true", help="do not time the naive loop")
    args = ap.parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(0)
    shapes = SETTINGS[args.setting]
    d_model, heads, points = 256, 8, 4
    attn = MSDeformAttn(d_model, len(shapes), heads, points).to(device)
    with torch.no_grad():  # non-trivial offsets: many samples off the pixel grid and some off the map
        attn.sampling_offsets.weight.normal_(0, 0.02)
        attn.attention_weights.weight.normal_(0, 0.02)
    maps = [torch.randn(args.batch, d_model, h, w, device=device) for h, w in shapes]
    src, shapes, _ = flatten_levels(maps)
    src.requires_grad_(args.backward)
    b, s, _ = src.shape
    ref = level_reference_points(shapes, device)[:, :, None].expand(b, -1, len(shapes), -1)
    with torch.no_grad():
        value = attn.value_proj(src).view(b, s, heads, d_model // heads)
        off = attn.sampling_offsets(src).view(b, s, heads, len(shapes), points, 2)
        norm = torch.tensor([[w, h] for h, w in shapes], dtype=torch.float32, device=device)
        loc = ref[:, :, None, :, None, :] + off / norm[None, None, None, :, None, :]
        weights = attn.attention_weights(src).view(b, s, heads, -1).softmax(-1).view(b, s, heads, len(shapes), points)
    core_in = [t.detach().clone().requires_grad_(args.backward) for t in (value, loc, weights)]

    def run(fn):
        def step():
            with torch.set_grad_enabled(args.backward):
                out = fn()
                if args.backward:
                    out.float().sum().backward()
        return step

    cases = {
        "core (grid_sample)": run(lambda: ms_deform_attn_core(core_in[0], shapes, core_in[1], core_in[2])),
        "MSDeformAttn module": run(lambda: attn(src, ref, src, shapes)),
    }
    if not args.skip_naive:
        cases["naive loop"] = run(lambda: ms_deform_attn_naive(core_in[0], shapes, core_in[1], core_in[2]))
    with torch.no_grad():
        diff = (ms_deform_attn_core(value, shapes, loc, weights) - ms_deform_attn_naive(value, shapes, loc, weights)).abs().max().item()
    outside = ((loc < 0) | (loc > 1)).any(-1).float().mean().item()
    common = {"setting": args.setting, "levels": shapes, "queries": s, "batch": b, "heads": heads, "points": points,
              "backward": args.backward, "device": str(device), "cpu": cpu_model(), "threads": torch.get_num_threads(),
              "torch": torch.__version__, "loadavg": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
              "max_abs_diff_core_vs_naive": diff, "samples_off_map": round(outside, 4)}
    for name, fn in cases.items():
        t = _time(fn, args.repeat, device)
        print(json.dumps({"case": name, "median_s": statistics.median(t), "min_s": min(t), "max_s": max(t), **common}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
