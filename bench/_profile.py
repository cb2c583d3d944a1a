"""``--what profile``: where the time of one eval forward and one training step goes.

For each of the two (the forward: ``eval()`` + ``no_grad``; the training step: bench/_model.py's,
``--loss`` / ``--adamw`` as there) on the fixed inputs of bench/_model.py: ``--warmup`` warm-up
passes (at least one), one plain timed pass, then one pass under ``torch.profiler`` (CPU
activity, ``with_flops``). Reported per pass:

* the top ``--top`` operators by self CPU time: name, calls, self time, share of the summed self
  time, and -- where the profiler's ``with_flops`` gives FLOPs (matmuls, ``conv2d``) -- FLOPs and
  achieved GFLOP/s over the operator's inclusive time (a convolution's work is in its child
  ``mkldnn_convolution``, so its self time is ~0);
* the share of self time in GEMMs, convolutions and attention kernels (`GEMM_CONV`) vs the rest;
* the pass's FLOPs by ``FlopCounterMode`` (bench/_common.count_flops: matmuls, convolutions and
  attention, forward and backward; not the optimiser) over the plain pass's time, next to the
  CPU's float32 peak (bench/_common.cpu_hardware).
"""
from __future__ import annotations

import re
import time
from typing import Any, Callable

from _common import Options, base_record, count_flops, peak_memory, prepare_torch, synchronizer
from _model import build, children_params, training_step_fn

# Operators whose self time is matrix-multiply / convolution / attention work.
GEMM_CONV = re.compile(r"conv|(^|::|_)(mm|addmm|bmm|baddbmm|addbmm|matmul|linear)(_|$)|mkldnn_|scaled_dot_product|"
                       r"flash_attention")


def is_gemm_conv(name: str) -> bool:
    return bool(GEMM_CONV.search(name))


def operator_table(events: Any, top: int) -> dict[str, Any]:
    """Summary of ``prof.key_averages()``: the ``top`` operators by self CPU time, the operators
    with FLOPs, the GEMM / convolution share."""
    rows = []
    for e in events:
        rows.append({"name": e.key, "calls": int(e.count), "self_ms": e.self_cpu_time_total / 1e3,
                     "total_ms": e.cpu_time_total / 1e3, "flops": int(getattr(e, "flops", 0) or 0)})
    total_self = sum(r["self_ms"] for r in rows) or 1e-9

    def finish(r: dict[str, Any]) -> dict[str, Any]:
        out = {"name": r["name"], "calls": r["calls"], "self_ms": round(r["self_ms"], 3),
               "self_pct": round(100 * r["self_ms"] / total_self, 2), "total_ms": round(r["total_ms"], 3)}
        if r["flops"]:
            out["flops"] = r["flops"]
            out["gflops_per_s"] = round(r["flops"] / (r["total_ms"] * 1e6), 1) if r["total_ms"] > 0 else None
        return out

    by_self = sorted(rows, key=lambda r: r["self_ms"], reverse=True)
    gemm = sum(r["self_ms"] for r in rows if is_gemm_conv(r["name"]))
    return {"total_self_ms": round(total_self, 2), "gemm_conv_self_ms": round(gemm, 2),
            "gemm_conv_share": round(gemm / total_self, 4),
            "top": [finish(r) for r in by_self[:top]],
            "flop_ops": [finish(r) for r in sorted(rows, key=lambda r: r["flops"], reverse=True) if r["flops"]][:top]}


def profile_pass(run: Callable[[], Any], flops_fn: Callable[[], Any], warmup: int, top: int, device,
                 after_flops: Callable[[], Any] | None = None) -> dict[str, Any]:
    """Warm-up, one plain timed pass, one profiled pass of ``run``; FLOPs of ``flops_fn``."""
    from torch.profiler import ProfilerActivity, profile

    sync = synchronizer(device)
    for _ in range(max(1, warmup)):
        run()
    sync()
    t0 = time.perf_counter()
    run()
    sync()
    plain = time.perf_counter() - t0
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities, with_flops=True, record_shapes=False) as prof:
        t0 = time.perf_counter()
        run()
        sync()
        profiled = time.perf_counter() - t0
    table = operator_table(prof.key_averages(), top)
    flops = count_flops(flops_fn)
    if after_flops is not None:
        after_flops()
    return {"plain_s": round(plain, 4), "profiled_s": round(profiled, 4), "flops": flops,
            "achieved_gflops_per_s": round(flops / plain / 1e9, 1), **table}


def measure(model_name: str, setting: str, opts: Options, warmup: int, top: int,
            parts: tuple[str, ...] = ("forward", "train")) -> dict[str, Any]:
    """The ``profile`` record: ``profile.forward`` and / or ``profile.train`` (``parts``; see the
    module docstring)."""
    import torch

    import engine

    device = prepare_torch(opts)
    model, cfg, size, tokens, inputs, target = build(model_name, setting, opts, device)
    rec = base_record(model_name, "profile", setting, opts, size, tokens)
    rec["params"] = sum(p.numel() for p in model.parameters())
    rec["params_by_child"] = children_params(model)
    peak = (rec["machine"].get("cpu_info") or {}).get("peak_fp32_gflops") if device.type == "cpu" else None

    def forward():
        with torch.no_grad(), engine.autocast(device, opts.amp):
            model(**inputs)

    sections = {}
    if "forward" in parts:
        model.eval()
        sections["forward"] = profile_pass(forward, forward, warmup, top, device)
    if "train" in parts:
        model.train()
        step, forward_backward, zero_grad = training_step_fn(model_name, model, inputs, target, opts, device)
        sections["train"] = profile_pass(step, forward_backward, warmup, top, device, after_flops=zero_grad)
    for sec in sections.values():
        sec["peak_fp32_gflops"] = peak
        sec["pct_of_fp32_peak"] = round(100 * sec["achieved_gflops_per_s"] / peak, 1) if peak else None
    rec["profile"] = sections
    rec["top"] = top
    rec["unit"] = "s/pass (plain_s: unprofiled pass after the warm-up)"
    rec.update(peak_memory(device))
    return rec


def format_tables(rec: dict[str, Any]) -> str:
    """The human-readable tables of a profile record (bench/run.py prints them to stderr)."""
    lines = []
    cpu = (rec.get("machine") or {}).get("cpu_info") or {}
    for what, sec in rec["profile"].items():
        peak = sec.get("peak_fp32_gflops")
        lines.append(f"## {rec['model']} {what}, setting {rec['setting']}, amp {rec['amp']}, batch {rec['batch']}, "
                     f"threads {rec['threads']}, CPU capability {cpu.get('capability')}"
                     + (" (emulated)" if cpu.get("emulated") else ""))
        lines.append(f"pass {sec['plain_s']:.3f} s (profiled {sec['profiled_s']:.3f} s); "
                     f"{sec['flops'] / 1e9:.1f} GFLOP -> {sec['achieved_gflops_per_s']:.1f} GFLOP/s achieved"
                     + (f" vs fp32 peak {peak:.1f} GFLOP/s ({sec['pct_of_fp32_peak']:.1f} %)" if peak else "")
                     + f"; GEMM/conv/attention {100 * sec['gemm_conv_share']:.1f} % of self time, rest "
                       f"{100 * (1 - sec['gemm_conv_share']):.1f} %")
        lines.append("| operator | calls | self ms | % self | GFLOP/s |")
        lines.append("|---|---|---|---|---|")
        for r in sec["top"]:
            rate = r.get("gflops_per_s")
            lines.append(f"| {r['name']} | {r['calls']} | {r['self_ms']:.1f} | {r['self_pct']:.1f} | "
                         f"{rate if rate is not None else '-'} |")
        if sec["flop_ops"]:
            lines.append("operators with FLOPs (with_flops; inclusive time):")
            lines.append("| operator | calls | GFLOP | ms (incl.) | GFLOP/s |")
            lines.append("|---|---|---|---|---|")
            for r in sec["flop_ops"]:
                lines.append(f"| {r['name']} | {r['calls']} | {r['flops'] / 1e9:.2f} | {r['total_ms']:.1f} | "
                             f"{r.get('gflops_per_s')} |")
        lines.append("")
    return "\n".join(lines)
