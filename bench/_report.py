"""``bench/run.py --report``: a markdown table of the latest result per configuration.

A configuration is (model, what, setting, device, amp, batch, options); the latest record of a
configuration is the last one in the results file. Records written by the former
``bench/model.py`` (``"bench": "model"``) are read too: they lack the load average and the
newer options, which then take their defaults.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterable

from _common import BenchError

HEADER = ("model", "what", "setting", "device", "amp", "batch", "options", "median s (min-max)", "images/s",
          "peak GiB", "load (1 min)", "date")


def options_label(rec: dict[str, Any]) -> str:
    """The non-default switches of a record, e.g. ``reference-ops, loss=model``."""
    out = []
    if rec.get("reference_ops"):
        out.append("reference-ops")
    elif rec.get("fused_attn") is False:
        out.append("plain-attention")
    if rec.get("grad_ckpt"):
        out.append("grad-ckpt")
    if rec.get("compile"):
        out.append("compile")
    if rec.get("channels_last", "auto") != "auto":
        out.append(f"channels-last={rec['channels_last']}")
    if rec.get("what") == "train":  # fit always uses the model's loss and train.py's optimiser
        if rec.get("loss", "ce") != "ce":
            out.append(f"loss={rec['loss']}")
        if rec.get("adamw", "fused") != "fused":
            out.append(f"adamw={rec['adamw']}")
    if rec.get("what") in ("fit", "eval") and rec.get("workers"):
        out.append(f"workers={rec['workers']}")
    if rec.get("what") == "data":
        out.append(f"text={rec.get('text')}")
    cpu = (rec.get("machine") or {}).get("cpu_info") or {}
    if cpu.get("emulated"):  # ISA-capping environment variables: an older CPU emulated
        out.append("emulated " + "/".join(sorted({str(v) for v in cpu.get("isa_env", {}).values() if v})))
    if rec.get("threads", 2) != 2:
        out.append(f"threads={rec['threads']}")
    return ", ".join(out) or "-"


def key(rec: dict[str, Any]) -> tuple:
    return (rec.get("model"), rec.get("what"), rec.get("setting"), rec.get("device"), rec.get("amp"),
            rec.get("batch"), options_label(rec))


def read(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        raise BenchError(f"--results {path}: file not found")
    records = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            raise BenchError(f"--results {path}: line {n} is not JSON") from None
        if "error" not in rec and "median_s" in rec:
            records.append(rec)
    return records


def _selected(value: Any, wanted: str | None) -> bool:
    return wanted is None or str(value) in {w.strip() for w in wanted.split(",")}


def latest(records: Iterable[dict[str, Any]], model: str | None = None, what: str | None = None,
           setting: str | None = None) -> list[dict[str, Any]]:
    """The last record of every configuration, in order of first appearance."""
    out: dict[tuple, dict[str, Any]] = {}
    for rec in records:
        if _selected(rec.get("model"), model) and _selected(rec.get("what"), what) and _selected(rec.get("setting"), setting):
            k = key(rec)
            out.pop(k, None)
            out[k] = rec
    return sorted(out.values(), key=lambda r: (str(r.get("setting")), str(r.get("model")), str(r.get("what"))))


def _fmt(x: Any, digits: int = 3) -> str:
    if x is None:
        return "-"
    return f"{x:.{digits}g}" if isinstance(x, float) else str(x)


def row(rec: dict[str, Any]) -> list[str]:
    times = rec.get("times_s") or []
    kept = times[rec.get("warmup", 1):] or times
    lo, hi = rec.get("min_s", min(kept) if kept else None), rec.get("max_s", max(kept) if kept else None)
    load = (rec.get("machine") or {}).get("load_avg")
    ips = rec.get("images_per_s")
    if ips is None and rec.get("batch") and rec.get("what") in ("forward", "train"):
        ips = rec["batch"] / rec["median_s"]
    return [str(rec.get("model")), str(rec.get("what")), str(rec.get("setting")), str(rec.get("device")),
            str(rec.get("amp")) + (" (auto)" if rec.get("amp_requested") == "auto" else ""), _fmt(rec.get("batch")),
            options_label(rec),
            f"{_fmt(rec['median_s'])} ({_fmt(lo)}-{_fmt(hi)})", _fmt(ips),
            f"{rec['peak_mem_mib'] / 1024:.1f}" if rec.get("peak_mem_mib") else "-",
            _fmt(load[0]) if load else "-", str(rec.get("time", "-"))[:10]]


def table(path: Path, model: str | None = None, what: str | None = None, setting: str | None = None) -> str:
    rows = [row(r) for r in latest(read(path), model, what, setting)]
    lines = ["| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)
