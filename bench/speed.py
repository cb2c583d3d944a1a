"""FIANet (or another LAVT-family model) fp32 speed probe for A/B decisions on a shared CPU.

One measurement per process: builds the paper (or tiny) setting as `bench/run.py` does, runs
``--passes`` eval forwards or training steps and prints one JSON line with the wall-clock and
process CPU times of every pass (CPU time is less sensitive to other jobs on the machine; with
one thread it is the decision metric). ``--profile N`` prints torch.profiler's top-N ops of the
last pass instead. ``--set name=value`` switches fast paths through ``model.set_fast_paths`` /
module attributes, e.g. ``--set winograd=0``.

    ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2 \\
        python bench/speed.py --what forward --threads 1 --passes 3
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="fianet")
    ap.add_argument("--what", choices=("forward", "train"), default="forward")
    ap.add_argument("--setting", choices=("paper", "tiny"), default="paper")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--passes", type=int, default=3)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--profile", type=int, default=0)
    ap.add_argument("--reference-ops", action="store_true")
    ap.add_argument("--shift-mask", type=float, default=None,
                    help="override lib.swin.FAST_SHIFT_MASK (e.g. -100: the reference value on the fast paths)")
    ap.add_argument("--set", action="append", default=[], help="module attribute name=value (0/1 = False/True), e.g. winograd=0")
    a = ap.parse_args()

    import torch
    from _common import Options
    from _model import build, training_step_fn

    if a.shift_mask is not None:
        import lib.swin

        lib.swin.FAST_SHIFT_MASK = a.shift_mask
    opts = Options(threads=a.threads, batch=a.batch, reference_ops=a.reference_ops)
    torch.set_num_threads(a.threads)
    device = torch.device("cpu")
    model, cfg, size, tokens, inputs, target = build(a.model, a.setting, opts, device)
    for item in a.set:  # e.g. winograd=0: every module with that attribute gets the value
        name, _, value = item.partition("=")
        val = {"0": False, "1": True}.get(value, value)
        hits = [m for m in model.modules() if hasattr(m, name)]
        if not hits:
            raise SystemExit(f"--set {item}: no module has an attribute {name!r}")
        for m in hits:
            setattr(m, name, int(val) if isinstance(val, str) and val.isdigit() else val)
    if a.what == "forward":
        model.eval()

        def run():
            with torch.no_grad():
                model(**inputs)
    else:
        model.train()
        run = training_step_fn(a.model, model, inputs, target, opts, device)[0]
    walls, cpus = [], []
    for i in range(a.passes):
        last = i == a.passes - 1
        prof = None
        if a.profile and last:
            prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU])
            prof.__enter__()
        t0, c0 = time.perf_counter(), time.process_time()
        run()
        walls.append(time.perf_counter() - t0)
        cpus.append(time.process_time() - c0)
        if prof is not None:
            prof.__exit__(None, None, None)
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=a.profile))
    rest_w, rest_c = sorted(walls[1:] or walls), sorted(cpus[1:] or cpus)
    print(json.dumps({"model": a.model, "what": a.what, "threads": a.threads, "set": a.set,
                      "shift_mask": a.shift_mask, "reference_ops": a.reference_ops,
                      "isa": os.environ.get("ATEN_CPU_CAPABILITY", "native"),
                      "wall_s": [round(t, 3) for t in walls], "cpu_s": [round(t, 3) for t in cpus],
                      "median_wall_s": rest_w[len(rest_w) // 2], "min_cpu_s": rest_c[0],
                      "median_cpu_s": rest_c[len(rest_c) // 2]}))


if __name__ == "__main__":
    main()
