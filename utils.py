"""Shared utilities: evaluation metrics, distributed helpers, seeding and logging.

Metrics follow the reference ``test.py`` of LAVT, RMSIN and FIANet exactly:

* per (ref, sentence) pair, on the evaluation grid: ``I = |pred ∧ gt|``, ``U = |pred ∨ gt|``,
  ``iou = I / U`` and ``iou = 0`` when ``U == 0``;
* overall IoU = ``ΣI / ΣU``; mean IoU = mean of the per-pair ``iou``;
* precision@t = fraction of pairs with ``iou >= t`` for t in 0.5 … 0.9.

All sums are kept as tensors on the evaluation device (no host synchronisation per batch) and can
be all-reduced across ranks. Values are returned as fractions in [0, 1]; the paper-style table
prints them as percentages.
"""
from __future__ import annotations

import datetime
import json
import os
import random
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import numpy as np
import torch
import torch.distributed as dist

PRECISION_THRESHOLDS: tuple[float, ...] = (0.5, 0.6, 0.7, 0.8, 0.9)


# --------------------------------------------------------------------------------------------
# Metrics
# --------------------------------------------------------------------------------------------
def intersection_union(pred: torch.Tensor, gt: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample intersection and union of binary masks.

    Args:
        pred: (B, H, W) predicted mask (bool or 0/1 integers).
        gt: (B, H, W) ground-truth mask (bool or 0/1 integers).
    Returns:
        ``(I, U)``, each int64 of shape (B,).
    """
    if pred.shape != gt.shape:
        raise ValueError(f"prediction shape {tuple(pred.shape)} != ground-truth shape {tuple(gt.shape)}")
    p = pred.bool().flatten(1)
    g = gt.bool().flatten(1)
    inter = (p & g).sum(1)
    union = (p | g).sum(1)
    return inter, union


def sample_iou(inter: torch.Tensor, union: torch.Tensor) -> torch.Tensor:
    """IoU per sample with the reference rule ``iou = 0`` when the union is empty."""
    inter = inter.double()
    union = union.double()
    return torch.where(union > 0, inter / union.clamp(min=1), torch.zeros_like(inter))


class SegMetrics:
    """Accumulates the reference metrics over batches, optionally per category.

    ``update`` takes predictions and ground truths of shape (B, H, W); it keeps running sums on the
    tensors' device. ``all_reduce`` sums them over the distributed group, ``summary`` returns the
    numbers as a plain dict.
    """

    def __init__(self, device: torch.device | str = "cpu") -> None:
        self.device = torch.device(device)
        # [ΣI, ΣU, Σiou, count, prec@0.5 … prec@0.9]
        self._totals = torch.zeros(4 + len(PRECISION_THRESHOLDS), dtype=torch.float64, device=self.device)
        self._per_cat: dict[str, torch.Tensor] = {}

    def _row(self, inter: torch.Tensor, union: torch.Tensor) -> torch.Tensor:
        iou = sample_iou(inter, union)
        thr = torch.tensor(PRECISION_THRESHOLDS, dtype=torch.float64, device=iou.device)
        prec = (iou[:, None] >= thr[None, :]).double().sum(0)
        head = torch.stack([inter.double().sum(), union.double().sum(), iou.sum(),
                            torch.tensor(float(iou.numel()), dtype=torch.float64, device=iou.device)])
        return torch.cat([head, prec])

    def update(self, pred: torch.Tensor, gt: torch.Tensor, categories: Sequence[str] | None = None) -> torch.Tensor:
        """Add a batch; returns the per-sample IoU (float64, on the device) for callers that log it."""
        inter, union = intersection_union(pred, gt)
        self._totals += self._row(inter, union).to(self.device)
        if categories is not None:
            for cat in sorted(set(categories)):
                if not cat:
                    continue
                sel = torch.tensor([c == cat for c in categories], device=inter.device)
                row = self._row(inter[sel], union[sel]).to(self.device)
                if cat not in self._per_cat:
                    self._per_cat[cat] = torch.zeros_like(row)
                self._per_cat[cat] += row
        return sample_iou(inter, union)

    def all_reduce(self) -> None:
        """Sum the accumulated counts over all ranks (no-op without torch.distributed)."""
        if not is_dist():
            return
        dist.all_reduce(self._totals)
        # Categories may differ between ranks: agree on the union of names first.
        names = sorted(self._per_cat)
        gathered: list[list[str]] = [[] for _ in range(dist.get_world_size())]
        dist.all_gather_object(gathered, names)
        all_names = sorted({n for part in gathered for n in part})
        for n in all_names:
            if n not in self._per_cat:
                self._per_cat[n] = torch.zeros_like(self._totals)
            dist.all_reduce(self._per_cat[n])

    @staticmethod
    def _summarise(row: torch.Tensor) -> dict[str, float]:
        v = row.tolist()
        cum_i, cum_u, sum_iou, count = v[:4]
        out = {f"P@{t}": (v[4 + k] / count if count else 0.0) for k, t in enumerate(PRECISION_THRESHOLDS)}
        out["oIoU"] = cum_i / cum_u if cum_u else 0.0
        out["mIoU"] = sum_iou / count if count else 0.0
        out["num_samples"] = int(count)
        return out

    def summary(self) -> dict[str, Any]:
        """Plain dict: ``P@0.5`` … ``P@0.9``, ``oIoU``, ``mIoU`` (fractions), ``num_samples``, ``per_category``."""
        out: dict[str, Any] = self._summarise(self._totals)
        out["per_category"] = {
            name: {k: s[k] for k in ("oIoU", "mIoU", "num_samples")}
            for name, s in ((n, self._summarise(r)) for n, r in sorted(self._per_cat.items()))
        }
        return out


def format_results_table(summary: dict[str, Any], title: str = "") -> str:
    """Paper-style table (percentages, two decimals), plus per-category IoU when present."""
    keys = [f"P@{t}" for t in PRECISION_THRESHOLDS] + ["oIoU", "mIoU"]
    head = " | ".join(f"{k:>7}" for k in keys)
    vals = " | ".join(f"{100 * summary[k]:7.2f}" for k in keys)
    lines = []
    if title:
        lines.append(title)
    note = " at the images' original resolution" if summary.get("resolution") == "original" else ""
    lines += [head, "-" * len(head), vals, f"({summary['num_samples']} samples{note})"]
    if "PointM" in summary:  # point metrics of the score map's arg-max (TRIS)
        lines.append(f"Hit (arg-max in the GT box) {100 * summary['Hit']:.2f} | "
                     f"PointM (arg-max on the GT mask) {100 * summary['PointM']:.2f}")
    per_cat = summary.get("per_category") or {}
    if per_cat:
        width = max(len(n) for n in per_cat)
        lines.append("")
        lines.append(f"{'category':<{width}} | {'oIoU':>7} | {'mIoU':>7} | {'samples':>7}")
        for name, s in per_cat.items():
            lines.append(f"{name:<{width}} | {100 * s['oIoU']:7.2f} | {100 * s['mIoU']:7.2f} | {s['num_samples']:7d}")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# Distributed helpers
# --------------------------------------------------------------------------------------------
@dataclass
class DistInfo:
    """Where this process runs: rank, world size, local rank and its device."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def is_dist() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    return dist.get_rank() if is_dist() else 0


def get_world_size() -> int:
    return dist.get_world_size() if is_dist() else 1


def is_main_process() -> bool:
    return get_rank() == 0


class DeviceUnavailableError(ValueError):
    """``--device`` names a device this machine does not have (one line, no traceback)."""


def resolve_device(requested: str | None) -> torch.device:
    """``cuda``/``cuda:N``/``cpu``; ``None`` or ``auto`` picks CUDA when available."""
    if requested in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(requested)
    except RuntimeError:
        raise DeviceUnavailableError(f"--device {requested}: not a device name (cuda, cuda:N, cpu or auto)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise DeviceUnavailableError(f"--device {requested}: CUDA is not available on this machine (use --device cpu)")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise DeviceUnavailableError(f"--device {requested}: this machine has {torch.cuda.device_count()} GPU(s)")
    return dev


def init_distributed(device: str | None = None) -> DistInfo:
    """Initialise torch.distributed from torchrun's environment, or fall back to one process.

    Reads ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK`` (set by torchrun, and by the legacy launcher
    together with ``--local_rank``). Uses NCCL on GPUs and gloo on CPU.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    dev = resolve_device(device)
    if dev.type == "cuda":
        # One GPU per process: the local rank picks it, whatever index --device named.
        dev = torch.device("cuda", local if world > 1 else (dev.index or 0))
        torch.cuda.set_device(dev)
    if world > 1 and not is_dist():
        backend = "nccl" if dev.type == "cuda" else "gloo"
        kwargs: dict[str, Any] = {"backend": backend, "init_method": "env://",
                                  "timeout": datetime.timedelta(minutes=30)}
        if dev.type == "cuda":
            kwargs["device_id"] = dev
        dist.init_process_group(**kwargs)
    return DistInfo(rank=rank, world_size=world, local_rank=local, device=dev)


def barrier() -> None:
    if is_dist():
        dist.barrier()


def cleanup_distributed() -> None:
    if is_dist():
        dist.destroy_process_group()


# --------------------------------------------------------------------------------------------
# Mixed precision: what --amp auto becomes on this machine
# --------------------------------------------------------------------------------------------
# CPU flags (as /proc/cpuinfo spells them) that decide or explain mixed-precision speed.
CPU_FLAGS_OF_INTEREST: tuple[str, ...] = ("sse4_2", "avx", "avx2", "fma", "f16c", "avx_vnni", "avx512f", "avx512bw",
                                          "avx512vl", "avx512_vnni", "avx512_bf16", "avx512_fp16", "amx_tile",
                                          "amx_bf16", "amx_int8", "amx_fp16")
BF16_CPU_FLAGS: tuple[str, ...] = ("avx512_bf16", "amx_bf16")
# Environment variables that cap the instruction set the CPU kernels use (e.g. to emulate an
# AVX2-only machine on an AVX-512 one).
ISA_ENV_VARS: tuple[str, ...] = ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS")
# oneDNN ISA caps below which its GEMMs and convolutions have no bf16 instructions.
_ONEDNN_WITHOUT_BF16 = {"SSE41", "AVX", "AVX2", "AVX2_VNNI", "AVX2_VNNI_2", "AVX512_CORE", "AVX512_CORE_VNNI"}
# The measurement behind the warning: FIANet training step, paper setting, 2-core AVX2-only AMD
# EPYC: > 170 s with --amp bf16 against 44.1 s in float32 (BENCHMARKS.md, "CPU: hardware, ...").
BF16_WITHOUT_HARDWARE_SLOWDOWN = "about 4x slower per FIANet training step on a 2-core AVX2-only AMD EPYC"
AMP_CHOICES: tuple[str, ...] = ("auto", "off", "bf16", "fp16")


class AmpError(DeviceUnavailableError):
    """A bad ``OPENRRSIS_AMP`` value (one line, no traceback)."""


def cpu_features() -> dict[str, Any]:
    """What this CPU offers for mixed precision.

    Returns ``{"model", "flags" (the present ones of CPU_FLAGS_OF_INTEREST, sorted), "source"
    ("cpuinfo" on Linux, else "torch"), "capability" (``torch.backends.cpu.get_cpu_capability()``),
    "isa_env" (the ISA-capping environment variables that are set)}``. Without /proc/cpuinfo the
    flags come from ``torch.cpu``'s probes (AVX2, AVX-512, AVX512-BF16, AMX tiles)."""
    import platform

    model, flags, source = "", set(), "torch"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            key = key.strip()
            if key == "model name" and not model:
                model = value.strip()
            elif key in ("flags", "Features") and not flags:
                flags = set(value.split())
                source = "cpuinfo"
    except OSError:
        pass
    if source != "cpuinfo":
        probes = {"avx2": "_is_avx2_supported", "avx512f": "_is_avx512_supported",
                  "avx512_bf16": "_is_avx512_bf16_supported", "amx_tile": "_is_amx_tile_supported",
                  "avx512_vnni": "_is_vnni_supported"}
        for flag, name in probes.items():
            probe = getattr(torch.cpu, name, None)
            try:
                if probe is not None and probe():
                    flags.add(flag)
            except RuntimeError:
                pass
        if "amx_tile" in flags:
            flags.add("amx_bf16")  # every CPU with AMX tiles so far has AMX-BF16
    try:
        capability = torch.backends.cpu.get_cpu_capability()
    except (AttributeError, RuntimeError):
        capability = "unknown"
    return {"model": model or platform.processor() or platform.machine(),
            "flags": sorted(f for f in flags if f in CPU_FLAGS_OF_INTEREST), "source": source,
            "capability": capability, "isa_env": {k: os.environ[k] for k in ISA_ENV_VARS if os.environ.get(k)}}


def cpu_bf16(features: dict[str, Any]) -> tuple[bool, str]:
    """``(usable, why)``: do the CPU kernels run bf16 with bf16 instructions? Needs the hardware
    (``avx512_bf16`` or ``amx_bf16``) and no ISA cap below it (``ONEDNN_MAX_CPU_ISA`` under
    AVX512_CORE_BF16, ``ATEN_CPU_CAPABILITY`` avx2 / default)."""
    flags = set(features.get("flags", ()))
    have = [f for f in BF16_CPU_FLAGS if f in flags]
    if not have:
        return False, "CPU without bf16 instructions (no avx512_bf16 / amx_bf16)"
    env = features.get("isa_env") or {}
    onednn = str(env.get("ONEDNN_MAX_CPU_ISA", "")).upper()
    aten = str(env.get("ATEN_CPU_CAPABILITY", "")).lower()
    if onednn in _ONEDNN_WITHOUT_BF16:
        return False, f"bf16 instructions disabled by ONEDNN_MAX_CPU_ISA={env['ONEDNN_MAX_CPU_ISA']}"
    if aten in ("default", "avx2"):
        return False, f"bf16 instructions disabled by ATEN_CPU_CAPABILITY={env['ATEN_CPU_CAPABILITY']}"
    return True, f"CPU with {' / '.join(have)}"


def amp_decision(requested: str, device: torch.device, features: dict[str, Any] | None = None) -> tuple[str, str]:
    """``(value, why)`` of an ``--amp`` request on ``device``.

    ``auto``: bf16 on a CUDA GPU that supports it (Ampere and later), fp16 on an older GPU (its
    tensor cores; training then uses the gradient scaler), bf16 on a CPU with bf16 instructions
    (`cpu_bf16`), off (float32) elsewhere -- bf16 emulated without those instructions is several
    times slower than float32. The environment variable ``OPENRRSIS_AMP`` (off / bf16 / fp16)
    replaces what ``auto`` picks (tests and CI pin it). Explicit values are kept as given."""
    if requested not in AMP_CHOICES:
        raise AmpError(f"--amp {requested}: choose one of {', '.join(AMP_CHOICES)}")
    if requested != "auto":
        return requested, "as requested"
    pinned = os.environ.get("OPENRRSIS_AMP", "").strip()
    if pinned:
        if pinned not in AMP_CHOICES[1:]:
            raise AmpError(f"OPENRRSIS_AMP={pinned}: choose one of {', '.join(AMP_CHOICES[1:])}")
        return pinned, f"auto, pinned by OPENRRSIS_AMP={pinned}"
    device = torch.device(device)
    if device.type == "cuda":
        if torch.cuda.is_bf16_supported():
            return "bf16", "auto: CUDA GPU with bf16"
        return "fp16", "auto: CUDA GPU without bf16"
    if device.type == "cpu":
        usable, why = cpu_bf16(cpu_features() if features is None else features)
        return ("bf16" if usable else "off"), f"auto: {why}"
    return "off", f"auto: no mixed precision chosen for {device.type}"


def resolve_amp(requested: str, device: torch.device, features: dict[str, Any] | None = None,
                log_prefix: str | None = None) -> str:
    """The ``--amp`` value a run uses (`amp_decision`). With ``log_prefix`` (the main process of
    an entry point) one line ``<prefix> --amp <requested> -> <value> (why)`` goes to stdout and,
    when bf16 is forced on a CPU whose kernels lack bf16 instructions, ONE warning line to stderr
    naming the measured slowdown; the run proceeds either way."""
    import sys

    value, why = amp_decision(requested, device, features)
    if log_prefix is None:
        return value
    print(f"{log_prefix} --amp {requested} -> {value} ({why})", flush=True)
    if value == "bf16" and torch.device(device).type == "cpu" and requested == "bf16":
        usable, reason = cpu_bf16(cpu_features() if features is None else features)
        if not usable:
            print(f"warning: --amp bf16 on this CPU ({reason}): bf16 is emulated and much slower than --amp off "
                  f"({BF16_WITHOUT_HARDWARE_SLOWDOWN}); proceeding", file=sys.stderr, flush=True)
    return value


# --------------------------------------------------------------------------------------------
# CPU allocator
# --------------------------------------------------------------------------------------------
MALLOC_ENV = "OPENRRSIS_MALLOC"          # "default": leave glibc's malloc settings alone
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4  # glibc's mallopt parameter numbers (malloc.h)
_TRIM_THRESHOLD = 2**31 - 1              # the largest value mallopt's int takes: never trim


def keep_freed_memory(device: torch.device | str, log_prefix: str | None = None) -> str:
    """On a CPU under glibc (train.py, test.py, predict.py), keep freed buffers in the process
    instead of returning them to the OS: ``mallopt(M_MMAP_MAX, 0)`` and ``mallopt(M_TRIM_THRESHOLD,
    2^31 - 1)``, the runtime form of ``MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=...``.

    Why: glibc serves every block above its mmap threshold (128 KiB, rising to at most 32 MiB) with
    a fresh ``mmap`` and unmaps it on free, so each of a step's large activations (a Swin stage-1
    attention map is 66 MB) is page-faulted and zeroed again at every step; kept, the FIANet
    paper-setting CPU training step went from 9.11 to 8.11 s and the eval forward from 2.75 to
    2.43 s (peak RSS +3-8 %; BENCHMARKS.md, "CPU allocator"). Returns what was done: ``"kept"``, or why not
    (``"not cpu"``, ``"not glibc"``, ``"OPENRRSIS_MALLOC=default"``, ``"MALLOC_* set"`` when the user
    already chose glibc settings through the environment). With ``log_prefix`` one line is printed
    when it acts."""
    import ctypes
    import sys

    if torch.device(device).type != "cpu":
        return "not cpu"
    if os.environ.get(MALLOC_ENV, "") == "default":
        return f"{MALLOC_ENV}=default"
    if any(k in os.environ for k in ("MALLOC_MMAP_MAX_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_")):
        return "MALLOC_* set"
    if not sys.platform.startswith("linux"):
        return "not glibc"
    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version  # noqa: B018 - present only in glibc (musl has mallopt too)
        ok = libc.mallopt(_M_MMAP_MAX, 0) == 1 and libc.mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD) == 1
    except (OSError, AttributeError):
        ok = False
    if not ok:
        return "not glibc"
    if log_prefix is not None:
        print(f"{log_prefix} CPU: glibc malloc keeps freed buffers (no per-step page faults; "
              f"{MALLOC_ENV}=default turns this off)", flush=True)
    return "kept"


class ShardSampler(torch.utils.data.Sampler[int]):
    """Sequential evaluation sampler that splits indices ``rank::world`` without padding.

    Unlike ``DistributedSampler`` it never repeats samples, so summed metrics stay exact.
    """

    def __init__(self, length: int, rank: int = 0, world_size: int = 1) -> None:
        self.indices = list(range(rank, length, world_size))

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


# --------------------------------------------------------------------------------------------
# Seeding and RNG state
# --------------------------------------------------------------------------------------------
def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (CPU and CUDA)."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def get_rng_state() -> dict[str, Any]:
    """All RNG states as plain data / tensors (safe for ``torch.load(weights_only=True)``)."""
    py_state = random.getstate()
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "python": [py_state[0], list(py_state[1]), py_state[2]],
        "numpy": [np_state[0], torch.from_numpy(np_state[1].copy()), int(np_state[2]), int(np_state[3]),
                  float(np_state[4])],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    npst = state["numpy"]
    np.random.set_state((npst[0], npst[1].numpy().astype(np.uint32), npst[2], npst[3], npst[4]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# --------------------------------------------------------------------------------------------
# Logging
# --------------------------------------------------------------------------------------------
class SmoothedValue:
    """Running window median/average of a scalar, as the reference MetricLogger keeps it."""

    def __init__(self, window: int = 20) -> None:
        self.window = window
        self.values: list[float] = []
        self.total = 0.0
        self.count = 0

    def update(self, value: float, n: int = 1) -> None:
        self.values.append(value)
        if len(self.values) > self.window:
            self.values.pop(0)
        self.total += value * n
        self.count += n

    @property
    def avg(self) -> float:
        return float(np.mean(self.values)) if self.values else 0.0

    @property
    def global_avg(self) -> float:
        return self.total / self.count if self.count else 0.0


class MetricLogger:
    """Named smoothed scalars with a compact ``str`` for progress bars and logs."""

    def __init__(self) -> None:
        self.meters: dict[str, SmoothedValue] = defaultdict(SmoothedValue)

    def update(self, **values: float) -> None:
        for k, v in values.items():
            self.meters[k].update(float(v))

    def averages(self) -> dict[str, float]:
        return {k: m.global_avg for k, m in self.meters.items()}

    def __str__(self) -> str:
        return "  ".join(f"{k}: {m.avg:.4g}" for k, m in self.meters.items())


def progress(iterable: Iterable, enabled: bool = True, **kwargs: Any):
    """tqdm progress bar on the main process only (plain iterable elsewhere)."""
    if not enabled:
        return iterable
    from tqdm import tqdm

    return tqdm(iterable, dynamic_ncols=True, **kwargs)


class JsonlLogger:
    """Appends one JSON object per line (epoch logs, benchmark results)."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, record: dict[str, Any]) -> None:
        record = {"time": time.strftime("%Y-%m-%dT%H:%M:%S"), **record}
        with self.path.open("a") as fh:
            fh.write(json.dumps(record) + "\n")


# --------------------------------------------------------------------------------------------
# Pictures: masks over images
# --------------------------------------------------------------------------------------------
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def denormalize(image: torch.Tensor) -> np.ndarray:
    """(3, H, W) normalised tensor -> (H, W, 3) uint8 picture."""
    mean = torch.tensor(IMAGENET_MEAN, dtype=torch.float32).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD, dtype=torch.float32).view(3, 1, 1)
    pic = (image.detach().float().cpu() * std + mean).clamp(0, 1)
    return (pic.permute(1, 2, 0).numpy() * 255 + 0.5).astype(np.uint8)


def mask_contour(mask: np.ndarray, width: int = 1) -> np.ndarray:
    """Boolean outline of a binary mask (pixels of the mask whose neighbourhood leaves it)."""
    from scipy import ndimage

    m = mask.astype(bool)
    if not m.any():
        return m
    inner = ndimage.binary_erosion(m, iterations=width, border_value=0)
    return m & ~inner


def overlay(picture: np.ndarray, mask: np.ndarray, color: tuple[int, int, int] = (255, 40, 40),
            alpha: float = 0.45, contour: bool = True) -> np.ndarray:
    """Tint ``mask`` over an (H, W, 3) uint8 picture and draw its contour."""
    out = picture.astype(np.float32).copy()
    m = mask.astype(bool)
    col = np.array(color, dtype=np.float32)
    out[m] = (1 - alpha) * out[m] + alpha * col
    if contour:
        width = max(1, round(min(mask.shape) / 160))
        out[mask_contour(m, width)] = col
    return out.clip(0, 255).astype(np.uint8)


# The JET colour map as piecewise-linear (position, value) knots per channel (matplotlib's "jet").
_JET_KNOTS = (
    ((0.0, 0.0), (0.35, 0.0), (0.66, 1.0), (0.89, 1.0), (1.0, 0.5)),
    ((0.0, 0.0), (0.125, 0.0), (0.375, 1.0), (0.64, 1.0), (0.91, 0.0), (1.0, 0.0)),
    ((0.0, 0.5), (0.11, 1.0), (0.34, 1.0), (0.65, 0.0), (1.0, 0.0)),
)


def jet(values: np.ndarray) -> np.ndarray:
    """(H, W) values in [0, 1] (clipped) -> (H, W, 3) uint8 RGB of the JET colour map: dark blue
    at 0, green-yellow in the middle, dark red at 1."""
    v = np.clip(np.nan_to_num(np.asarray(values, dtype=np.float64)), 0.0, 1.0)
    channels = [np.interp(v, [p for p, _ in knots], [c for _, c in knots]) for knots in _JET_KNOTS]
    return (np.stack(channels, -1) * 255 + 0.5).astype(np.uint8)


def heatmap_overlay(picture: np.ndarray, scores: np.ndarray, image_weight: float = 0.6) -> np.ndarray:
    """A score map drawn over an (H, W, 3) uint8 picture: ``image_weight * picture + (1 -
    image_weight) * jet(scores)`` (TRIS's demo blends 0.6 / 0.4)."""
    if picture.shape[:2] != scores.shape[:2]:
        raise ValueError(f"picture {picture.shape[:2]} and score map {scores.shape[:2]} differ in size")
    out = image_weight * picture.astype(np.float32) + (1 - image_weight) * jet(scores).astype(np.float32)
    return (out + 0.5).clip(0, 255).astype(np.uint8)


def side_by_side(*pictures: np.ndarray, gap: int = 4) -> np.ndarray:
    """Concatenate equally tall (H, W, 3) pictures horizontally with a white gap."""
    h = pictures[0].shape[0]
    spacer = np.full((h, gap, 3), 255, dtype=np.uint8)
    parts: list[np.ndarray] = []
    for k, pic in enumerate(pictures):
        if k:
            parts.append(spacer)
        parts.append(pic)
    return np.concatenate(parts, axis=1)


# --------------------------------------------------------------------------------------------
# Evaluation at the original resolution and point metrics (TRIS, Liu et al., ICCV 2023, experiments: mIoU and PointM)
# --------------------------------------------------------------------------------------------
def resize_to_original(pred: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """A prediction map at the ground truth's ``size = (H, W)``: bilinear, align_corners=True.

    ``pred``: (h, w), (B, h, w) or (B, C, h, w); returned in the same rank as float32 (unchanged
    values when already at ``size``). This is TRIS's protocol: the network sees the image resized
    to 320 x 320, the ground truth stays at the original resolution, the prediction is upsampled.
    """
    from lib.spec import resize_logits  # the decoders' upsampling rule, written once

    rank = pred.dim()
    if rank not in (2, 3, 4):
        raise ValueError(f"prediction must be (h, w), (B, h, w) or (B, C, h, w), got shape {tuple(pred.shape)}")
    lead = (1, 1) if rank == 2 else (pred.shape[0], 1) if rank == 3 else tuple(pred.shape[:2])
    out = resize_logits(pred.reshape(*lead, *pred.shape[-2:]), tuple(int(s) for s in size))
    return out.reshape(*pred.shape[:-2], *out.shape[-2:])


def mask_box(mask: torch.Tensor) -> tuple[int, int, int, int] | None:
    """The tight box ``(x1, y1, x2, y2)`` (inclusive pixels) of an (H, W) mask, None when empty:
    the box of Hit for datasets without annotated boxes."""
    m = torch.as_tensor(mask).bool()
    if not bool(m.any()):
        return None
    rows = torch.nonzero(m.any(1)).flatten()
    cols = torch.nonzero(m.any(0)).flatten()
    return int(cols[0]), int(rows[0]), int(cols[-1]), int(rows[-1])


def argmax_point(score: torch.Tensor) -> tuple[int, int]:
    """``(row, col)`` of the maximum of an (H, W) map; ties go to the first in row-major order
    (``np.argmax``), so an all-zero map gives (0, 0)."""
    if score.dim() != 2:
        raise ValueError(f"score map must be (H, W), got shape {tuple(score.shape)}")
    idx = int(torch.argmax(score.reshape(-1)))
    return idx // score.shape[1], idx % score.shape[1]


def coco_box_to_xyxy(box: Sequence[float]) -> tuple[int, int, int, int]:
    """A COCO ``[x, y, w, h]`` box as the TRIS loaders convert it: each value truncated to an
    integer, then ``(x1, y1, x1 + w, y1 + h)`` (inclusive pixel bounds for `point_in_box`)."""
    x, y, w, h = (int(v) for v in box)
    return x, y, x + w, y + h


def point_in_box(point: tuple[int, int], box: Sequence[float] | torch.Tensor) -> bool:
    """Whether ``point = (row, col)`` lies in ``box = (x1, y1, x2, y2)`` (pixels, both ends
    included), or in any row of a (K, 4) array of boxes."""
    boxes = torch.as_tensor(box, dtype=torch.float64).reshape(-1, 4)
    r, c = point
    inside = (boxes[:, 0] <= c) & (c <= boxes[:, 2]) & (boxes[:, 1] <= r) & (r <= boxes[:, 3])
    return bool(inside.any())


def point_hits(score: torch.Tensor, box: Sequence[float] | torch.Tensor | None = None,
               mask: torch.Tensor | None = None) -> dict[str, bool | tuple[int, int]]:
    """The point metrics of one (H, W) map at the ground truth's resolution.

    ``hit``: its arg-max lies in the ground-truth box (TRIS's "Hit"); ``hit_mask``: it lies on the
    ground-truth mask (``PointM`` / "HitM", the localisation metric the paper proposes). Entries
    whose ground truth is not given are left out.
    """
    point = argmax_point(score)
    out: dict[str, bool | tuple[int, int]] = {"point": point}
    if box is not None:
        out["hit"] = point_in_box(point, box)
    if mask is not None:
        if tuple(mask.shape) != tuple(score.shape):
            raise ValueError(f"mask shape {tuple(mask.shape)} != score shape {tuple(score.shape)}")
        out["hit_mask"] = bool(mask[point])
    return out


class PointMetrics:
    """Accumulates Hit (arg-max in the box) and PointM (arg-max in the mask) over samples, as
    fractions in [0, 1]; ``all_reduce`` sums the counts over ranks."""

    def __init__(self, device: torch.device | str = "cpu") -> None:
        # [hits, boxes seen, mask hits, masks seen]
        self._totals = torch.zeros(4, dtype=torch.float64, device=torch.device(device))

    def update(self, score: torch.Tensor, box: Sequence[float] | torch.Tensor | None = None,
               mask: torch.Tensor | None = None) -> dict[str, bool | tuple[int, int]]:
        """Add one (H, W) map; returns `point_hits` of it."""
        res = point_hits(score, box, mask)
        if "hit" in res:
            self._totals[0] += float(res["hit"])
            self._totals[1] += 1
        if "hit_mask" in res:
            self._totals[2] += float(res["hit_mask"])
            self._totals[3] += 1
        return res

    def all_reduce(self) -> None:
        if is_dist():
            dist.all_reduce(self._totals)

    def summary(self) -> dict[str, float | int]:
        hits, boxes, mhits, masks = self._totals.tolist()
        return {"Hit": hits / boxes if boxes else 0.0, "PointM": mhits / masks if masks else 0.0,
                "num_points": int(max(boxes, masks))}


def evaluate_at_original_resolution(pred: torch.Tensor, gt_mask: torch.Tensor,
                                    box: Sequence[float] | torch.Tensor | None = None,
                                    threshold: float = 0.0) -> dict[str, Any]:
    """One sample evaluated as TRIS does: ``pred`` ((h, w) or (1, h, w) map at the network's input
    size: a stage-1 response or stage-2 logits) is upsampled to ``gt_mask``'s (H, W) (bilinear,
    align_corners=True); foreground = value > ``threshold`` (0: positive response / logit > 0,
    i.e. sigmoid > 0.5). Returns ``mask`` (H, W) bool, ``inter``, ``union``, ``iou`` (0 for an
    empty union) and the point metrics of the upsampled map (``point``, ``hit`` with a box,
    ``hit_mask``)."""
    if pred.dim() == 3:
        if pred.shape[0] != 1:
            raise ValueError(f"one sample at a time: got a prediction of shape {tuple(pred.shape)}")
        pred = pred[0]
    score = resize_to_original(pred, gt_mask.shape[-2:])
    mask = score > threshold
    inter, union = intersection_union(mask[None], gt_mask.bool()[None])
    out: dict[str, Any] = {"mask": mask, "inter": int(inter[0]), "union": int(union[0]),
                           "iou": float(sample_iou(inter, union)[0])}
    out.update(point_hits(score, box, gt_mask.bool()))
    return out
