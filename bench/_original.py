"""``--vs-original``: our FIANet and the ORIGINAL implementation timed side by side, interleaved.

The original is timed by the reference harness ``ref_fianet_step.sh`` (``../shared/harness`` next
to the checkout, ``--ref-harness PATH`` or ``OPENRRSIS_REF_HARNESS``; it needs ``REF_MIRROR``, a
bare clone of github.com/Shaosifan/FIANet, unless its source is already extracted, and
``REF_PYTHON``). It builds the original at the paper setting (Swin-B window 12, 480x480, batch 2,
20 tokens, random BERT-base, float32, 2 threads) and prints as its last line the median seconds of
``REF_STEPS`` passes after ``REF_WARMUP`` warm-ups. Ours runs the same protocol
(``bench/run.py --what forward|train --loss ce --amp off``, same passes / warm-up).

Absolute CPU times differ severalfold between machines of one nominal kind and with the load of
the moment, so only a ratio measured in one run means anything: every round runs ours, then the
original, each in a fresh process, and the comparison reports the medians over the rounds and the
ratio original / ours (> 1: ours is faster).
"""
from __future__ import annotations

import os
import statistics
import subprocess
from pathlib import Path
from typing import Callable

from _common import ROOT, child_env

SCRIPT = "ref_fianet_step.sh"
# What the harness times: the original FIANet's eval forward and training step.
MODEL, WHATS = "fianet", ("forward", "train")
UNAVAILABLE = "comparison with the original unavailable: "


class HarnessError(RuntimeError):
    """The original cannot be timed here (the reason is the message)."""


def find_harness(path: str | None) -> Path:
    """The harness script: ``path`` (the script or its folder), else ``OPENRRSIS_REF_HARNESS``,
    else ``../shared/harness`` next to the checkout."""
    given = path or os.environ.get("OPENRRSIS_REF_HARNESS") or str(ROOT.parent / "shared" / "harness")
    p = Path(given)
    script = p / SCRIPT if p.is_dir() or not p.suffix else p
    if not script.is_file():
        raise HarnessError(f"no harness script {script}")
    return script


def comparable(models: list[str], whats: list[str], setting: str, batch: int, threads: int, device: str) -> None:
    """Refuse a request the harness cannot match (it runs FIANet at the paper setting only)."""
    if MODEL not in models:
        raise HarnessError(f"the original harness times FIANet only (--model {','.join(models)})")
    if not set(WHATS) & set(whats):
        raise HarnessError(f"the original harness times forward and train only (--what {','.join(whats)})")
    if setting != "paper" or batch != 2 or threads != 2 or not device.startswith("cpu"):
        raise HarnessError(f"the original runs at the paper setting, batch 2, 2 threads, on the CPU (got --setting "
                           f"{setting} --batch {batch} --threads {threads} --device {device})")


def covers(model: str, what: str) -> bool:
    """Whether the harness times this measurement (the others run as usual)."""
    return model == MODEL and what in WHATS


def run_harness(script: Path, what: str, passes: int, warmup: int, timeout: float | None = None) -> float:
    """Median seconds of the original's ``what`` (forward / train) in a fresh process."""
    env = child_env(2)
    env.update(REF_STEPS=str(passes - warmup), REF_WARMUP=str(warmup))
    cmd = ["bash", str(script)] + (["--forward"] if what == "forward" else [])
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise HarnessError(f"{script} did not run ({e})") from None
    if proc.returncode != 0:
        lines = [ln.strip() for ln in proc.stderr.splitlines() if ln.strip()]
        why = next((ln for ln in lines if "ERROR" in ln), lines[-1] if lines else "no message")
        raise HarnessError(f"{script.name} exited {proc.returncode}: {why}")
    last = (proc.stdout.strip().splitlines() or [""])[-1].strip()
    try:
        return float(last)
    except ValueError:
        raise HarnessError(f"{script.name}: its last line {last!r} is not the median in seconds") from None


def interleave(rounds: int, ours: Callable[[int], float], original: Callable[[int], float]) -> dict:
    """``rounds`` x (ours, original), in that order; each callable gets the round number and
    returns the median seconds of its fresh process. A `HarnessError` of the original ends the
    comparison (propagated)."""
    order, ours_s, original_s, loads = [], [], [], []
    for k in range(rounds):
        loads.append(round(os.getloadavg()[0], 2))  # the machine's 1-minute load as each run starts
        ours_s.append(ours(k))
        order.append("ours")
        loads.append(round(os.getloadavg()[0], 2))
        original_s.append(original(k))
        order.append("original")
    ours_med, orig_med = statistics.median(ours_s), statistics.median(original_s)
    return {"order": order, "rounds": rounds, "ours_s": ours_s, "original_s": original_s, "load_avg_at_start": loads,
            "ours_median_s": round(ours_med, 4), "original_median_s": round(orig_med, 4),
            "ratio_original_over_ours": round(orig_med / ours_med, 3) if ours_med > 0 else None}
