#!/usr/bin/env python
"""CrossVLT at the paper setting on this machine: parameter counts, eval forward, training step.

    python bench/crossvlt.py [--mode eval|train] [--repeats 4] [--batch 2] [--tokens 21] [--size 480]

Swin-B (embed 128, depths 2-2-18-2, heads 4-8-16-32, window 12), BERT-base widths split 6+1+1+1,
random weights, float32. Each pass: eval = forward under no_grad; train = zero_grad, forward with
the target (logits + alignment loss), 2 * weighted CE + alignment, backward, AdamW step over the
model's reference parameter groups. The first pass is a warm-up; the median of the others is
reported with the peak RSS of the process. Prints one JSON line.
"""
from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from lib.losses import weighted_cross_entropy
from lib.registry import build_model, model_config


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--mode", choices=("eval", "train"), default="eval")
    p.add_argument("--repeats", type=int, default=4)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--tokens", type=int, default=21)
    p.add_argument("--size", type=int, default=480)
    p.add_argument("--threads", type=int, default=0)
    a = p.parse_args(argv)
    if a.threads > 0:
        torch.set_num_threads(a.threads)

    torch.manual_seed(0)
    model = build_model(model_config("crossvlt", swin_type="base", window_size=12))
    parts = {"backbone": model.backbone, "lang_stage1": model.lang_stage1, "lang_stage2": model.lang_stage2,
             "lang_stage3": model.lang_stage3, "lang_stage4": model.lang_stage4, "classifier": model.classifier}
    params = {k: sum(t.numel() for t in m.parameters()) for k, m in parts.items()}
    params["total"] = sum(t.numel() for t in model.parameters())

    torch.manual_seed(0)
    img = torch.randn(a.batch, 3, a.size, a.size)
    ids = torch.randint(1000, 30522, (a.batch, a.tokens))
    mask = torch.ones(a.batch, a.tokens, dtype=torch.long)
    target = torch.randint(0, 2, (a.batch, a.size, a.size))

    times = []
    if a.mode == "eval":
        model.eval()
        for _ in range(a.repeats):
            t = time.perf_counter()
            with torch.no_grad():
                model(img, ids, mask)
            times.append(time.perf_counter() - t)
    else:
        model.train()
        for name in model.unused_parameter_names():
            model.get_parameter(name).requires_grad_(False)
        opt = torch.optim.AdamW(model.parameter_groups(1e-2), lr=3e-5, weight_decay=1e-2)
        for _ in range(a.repeats):
            t = time.perf_counter()
            opt.zero_grad(set_to_none=True)
            logits, aux = model(img, ids, mask, target=target)
            loss = 2 * weighted_cross_entropy(logits, target) + aux
            loss.backward()
            opt.step()
            times.append(time.perf_counter() - t)
    rss_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"mode": a.mode, "batch": a.batch, "tokens": a.tokens, "size": a.size,
                      "threads": torch.get_num_threads(), "params": params,
                      "times_s": [round(x, 3) for x in times],
                      "median_s": round(statistics.median(times[1:] or times), 3), "peak_rss_mib": round(rss_mib)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
