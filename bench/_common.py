"""What every benchmark measurement shares: the settings (model config, image size, tokens), the
machine description, timing summaries, peak memory, FLOP counting and the results file.

Settings:

* ``paper``: Swin-B (embed 128, depths 2-2-18-2, heads 4-8-16-32), window 12, 480x480, the
  full-size BERT-base config with random weights, 20 tokens (CrossVLT: 21, its reference length),
  FIANet ``num_tmem`` 3.
* ``tiny``: the registry's tiny config (Swin embed 16, depths 2-2-2-2, a one-layer 32-wide BERT)
  at 96x96 and 12 tokens: a seconds-long smoke test of every code path.
"""
from __future__ import annotations

import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results.jsonl"
SETTINGS = ("paper", "tiny")


class BenchError(ValueError):
    """A bad benchmark request (printed as one line)."""


@dataclass(frozen=True)
class Options:
    """The switches that change what a measurement runs (everything but model / what / setting)."""

    device: str = "cpu"
    amp: str = "off"
    batch: int = 2
    threads: int = 2
    plain_attention: bool = False
    reference_ops: bool = False
    grad_ckpt: bool = False
    channels_last: str = "auto"  # decoder layout: auto (CUDA only), on, off
    loss: str = "ce"             # train: ce (plain cross-entropy, the original's protocol) or model
    adamw: str = "fused"         # train: "fused" AdamW or PyTorch's "default" choice (for-loop on CPU)
    compile: bool = False        # forward / train: torch.compile (inductor) the model; compiling = warm-up
    quantize: str = "off"        # forward / eval: "int8" = dynamic int8 nn.Linear layers (CPU)

    @property
    def fast_paths(self) -> bool:
        return not (self.plain_attention or self.reference_ops)


def setting_config(model: str, setting: str, opts: Options) -> tuple[dict[str, Any], int, int]:
    """``(model config, image size, tokens)`` of a setting."""
    from lib.registry import model_config, tiny_model_config

    if setting not in SETTINGS:
        raise BenchError(f"--setting must be one of {', '.join(SETTINGS)}, got {setting!r}")
    from lib.registry import model_spec

    spec = model_spec(model)
    extra: dict[str, Any] = {"fused_attn": opts.fast_paths, "grad_ckpt": opts.grad_ckpt}
    if opts.reference_ops:
        extra["batched_text"] = False
    if setting == "paper":
        # The paper setting: Swin-B (TRIS: CLIP RN50), the model's input size (480 px; TRIS 320),
        # the RRSIS-D recipe's model options (FIANet: 3 TMEM blocks), the model's usual sentence
        # length (CrossVLT 21, else 20).
        extra.update(spec.recipe("rrsisd").options)
        size, tokens = spec.default_img_size, spec.text.context_length or spec.recipe("*").max_tokens
        cfg = model_config(model, swin_type="base", window_size=12, bert="bert-base-uncased", img_size=size, **extra)
    else:
        size, tokens = 96, spec.text.context_length or 12
        cfg = tiny_model_config(model, img_size=size, **extra)  # RMSIN derives its CIM grid from img_size
    cfg["channels_last"] = {"auto": "auto", "on": True, "off": False}[opts.channels_last]
    return cfg, size, tokens


def check_model_options(model, opts: Options) -> None:
    """Refuse a switch the built model would silently ignore."""
    if opts.channels_last != "auto" and not hasattr(model, "set_channels_last"):
        raise BenchError(f"--channels-last {opts.channels_last}: {type(model).__name__} has no decoder layout switch "
                         f"(only 'auto' applies to it)")


def prepare_inference(model, opts: Options, device) -> None:
    """``--quantize int8``: the built model's nn.Linear layers quantised as test.py does."""
    if opts.quantize != "off":
        import engine

        engine.prepare_for_inference(model, device, quantize=opts.quantize)


# --------------------------------------------------------------------------------------------
# Machine, timing, memory
# --------------------------------------------------------------------------------------------
def cpu_model() -> str:
    """The CPU's model name (``utils.cpu_features``: /proc/cpuinfo, else the platform's name)."""
    ensure_importable()
    import utils

    return utils.cpu_features()["model"]


# fp32 lanes of one FMA instruction per instruction-set level, and what the ISA-capping environment
# variables (set to emulate an older CPU) leave of them.
FP32_LANES = {"avx512": 16, "avx2": 8, "sse": 4}
_CAP_LANES = {
    "ATEN_CPU_CAPABILITY": {"default": 4, "avx2": 8, "avx512": 16},
    "ONEDNN_MAX_CPU_ISA": {"SSE41": 4, "AVX": 8, "AVX2": 8, "AVX2_VNNI": 8, "AVX2_VNNI_2": 8},
    "MKL_ENABLE_INSTRUCTIONS": {"SSE4_2": 4, "AVX": 8, "AVX2": 8, "AVX512": 16, "AVX512_E1": 16},
}
FMA_UNITS_PER_CORE = 2  # an assumption (recorded): some AVX-512 parts have one 512-bit FMA unit per core


def _lscpu() -> dict[str, str]:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10, env={**os.environ, "LC_ALL": "C"})
    except (OSError, subprocess.SubprocessError):
        return {}
    return {k.strip(): v.strip() for k, _, v in (ln.partition(":") for ln in out.stdout.splitlines()) if v}


def _read(path: str) -> str | None:
    try:
        return Path(path).read_text().strip()
    except OSError:
        return None


def cpu_clock_mhz(lscpu: dict[str, str]) -> tuple[float | None, str]:
    """``(MHz, source)``: lscpu's max MHz, else cpufreq's cpuinfo_max_freq, else /proc/cpuinfo's
    (current) ``cpu MHz``."""
    try:
        return float(lscpu["CPU max MHz"]), "lscpu CPU max MHz"
    except (KeyError, ValueError):
        pass
    khz = _read("/sys/devices/system/cpu/cpu0/cpufreq/cpuinfo_max_freq")
    if khz and khz.isdigit():
        return int(khz) / 1000, "/sys cpufreq cpuinfo_max_freq"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("cpu MHz"):
                return float(line.split(":", 1)[1]), "/proc/cpuinfo cpu MHz (the current clock, no max known)"
    except (OSError, ValueError):
        pass
    return None, "unknown"


def cpu_hardware(threads: int) -> dict[str, Any]:
    """The CPU a measurement ran on and its float32 peak for ``threads`` intra-op threads.

    Peak GFLOP/s = physical cores used (``min(threads, physical cores)``: two threads on two SMT
    siblings share one core) x fp32 lanes of an FMA (16 AVX-512, 8 AVX2, 4 below; capped by
    ``ATEN_CPU_CAPABILITY`` / ``ONEDNN_MAX_CPU_ISA`` / ``MKL_ENABLE_INSTRUCTIONS`` when they emulate
    an older ISA) x 2 (multiply + add) x ``FMA_UNITS_PER_CORE`` (assumed 2) x clock."""
    import utils

    feats = utils.cpu_features()
    flags = set(feats["flags"])
    ls = _lscpu()
    logical = os.cpu_count() or 1

    def num(key: str, default: int) -> int:
        try:
            return int(ls[key])
        except (KeyError, ValueError):
            return default

    per_core = num("Thread(s) per core", 1)
    physical = num("Core(s) per socket", 0) * num("Socket(s)", 1) or max(1, logical // per_core)
    cores_used = min(threads, physical)
    lanes = FP32_LANES["avx512"] if "avx512f" in flags else FP32_LANES["avx2"] if "avx2" in flags else FP32_LANES["sse"]
    lanes_source = f"hardware ({'avx512f' if lanes == 16 else 'avx2' if lanes == 8 else 'no avx2'})"
    env = {k: os.environ.get(k) for k in utils.ISA_ENV_VARS}
    for var, table in _CAP_LANES.items():
        value = env.get(var)
        cap = table.get(value.upper() if var != "ATEN_CPU_CAPABILITY" else value.lower()) if value else None
        if cap is not None and cap < lanes:
            lanes, lanes_source = cap, f"capped by {var}={value} (emulated)"
    mhz, clock_source = cpu_clock_mhz(ls)
    peak = cores_used * lanes * 2 * FMA_UNITS_PER_CORE * mhz / 1000 if mhz else None
    return {
        "model": feats["model"], "flags": feats["flags"], "capability": feats["capability"], "isa_env": env,
        "emulated": any(env.values()), "threads": threads, "logical_cpus": logical, "threads_per_core": per_core,
        "physical_cores": physical, "cpu0_thread_siblings": _read("/sys/devices/system/cpu/cpu0/topology/thread_siblings_list"),
        "threads_share_cores": threads > cores_used and per_core > 1, "cores_used": cores_used,
        "clock_mhz": mhz, "clock_source": clock_source, "fp32_fma_lanes": lanes, "lanes_source": lanes_source,
        "fma_units_per_core": FMA_UNITS_PER_CORE,
        "peak_fp32_gflops": round(peak, 1) if peak else None,
        "peak_formula": f"cores used x fp32 FMA lanes x 2 (mul+add) x {FMA_UNITS_PER_CORE} FMA units per core (assumed) "
                        f"x clock",
    }


def machine(device: str, threads: int | None = None) -> dict[str, Any]:
    """Where a measurement ran: CPU model and cores, the CPU's features and float32 peak for the
    measurement's threads (`cpu_hardware`), GPU name, load average (1/5/15 min)."""
    import torch

    info: dict[str, Any] = {"cpu": cpu_model(), "cores": os.cpu_count(), "load_avg": [round(x, 2) for x in os.getloadavg()],
                            "cpu_info": cpu_hardware(threads or torch.get_num_threads())}
    if device.startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(torch.device(device))
    return info


def summarise(times: Sequence[float], warmup: int) -> dict[str, Any]:
    """Median / min / max of the passes after the warm-up ones (all passes when there are no others)."""
    kept = list(times[warmup:]) or list(times)
    return {"median_s": round(statistics.median(kept), 4), "min_s": round(min(kept), 4), "max_s": round(max(kept), 4),
            "times_s": [round(t, 4) for t in times], "warmup": min(warmup, len(times) - 1)}


def peak_memory(device) -> dict[str, Any]:
    """Peak memory of this process: ``torch.cuda.max_memory_allocated`` on a GPU, max RSS on CPU."""
    import torch

    if device.type == "cuda":
        return {"peak_mem_mib": round(torch.cuda.max_memory_allocated(device) / 2 ** 20, 1),
                "peak_mem_kind": "cuda_max_memory_allocated"}
    rss_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return {"peak_mem_mib": round(rss_kib / 1024, 1), "peak_mem_kind": "process_max_rss"}


def synchronizer(device) -> Callable[[], None]:
    import torch

    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return lambda: None


MALLOC: dict[str, str] = {}  # what prepare_torch did to glibc's malloc, recorded by base_record


def prepare_torch(opts: Options):
    """Threads, TF32 off (float32 means float32), the device."""
    import torch

    torch.set_num_threads(opts.threads)
    device = torch.device(opts.device)
    # What train.py / test.py / predict.py do on a CPU (utils.keep_freed_memory); --reference-ops,
    # the stand-in for the original code, keeps glibc's defaults.
    ensure_importable()
    import utils

    MALLOC["state"] = ("default (--reference-ops)" if opts.reference_ops else utils.keep_freed_memory(device))
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise BenchError(f"--device {opts.device}: CUDA is not available on this machine")
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    return device


def count_flops(fn: Callable[[], Any]) -> int:
    """FLOPs of ``fn()`` by ``torch.utils.flop_counter.FlopCounterMode`` (matmuls, convolutions and
    attention; element-wise ops are not counted)."""
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils.flop_counter import flop_registry

    # FlopCounterMode's formulas without its per-module tracker: the tracker hooks module inputs
    # that require grad and fails on parameter views passed between modules under no_grad.
    class _Count(TorchDispatchMode):
        total = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            out = func(*args, **kwargs)
            packet = func._overloadpacket
            if packet in flop_registry:
                _Count.total += int(flop_registry[packet](*args, **kwargs, out_val=out))
            return out

    _Count.total = 0
    with _Count():
        fn()
    return _Count.total


def utilisation(flops_per_image: float | None, images_per_s: float | None, peak_tflops: float) -> float | None:
    """Model FLOPs utilisation: achieved FLOP/s over the device's peak (``--peak-tflops``)."""
    if not flops_per_image or not images_per_s or peak_tflops <= 0:
        return None
    return float(f"{flops_per_image * images_per_s / (peak_tflops * 1e12):.4g}")


def base_record(model: str, what: str, setting: str, opts: Options, image: int | None, tokens: int | None) -> dict[str, Any]:
    import torch

    return {
        "bench": "run", "model": model, "what": what, "setting": setting, "device": opts.device, "amp": opts.amp,
        "batch": opts.batch, "threads": opts.threads, "image": image, "tokens": tokens,
        "fused_attn": opts.fast_paths, "reference_ops": opts.reference_ops, "grad_ckpt": opts.grad_ckpt,
        "channels_last": opts.channels_last, "loss": opts.loss, "adamw": opts.adamw, "compile": opts.compile,
        "quantize": opts.quantize, "malloc": MALLOC.get("state", "default"),
        "torch": torch.__version__, "python": platform.python_version(), "machine": machine(opts.device, opts.threads),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }


def child_env(threads: int | None = None) -> dict[str, str]:
    """Environment of a measurement process: ``OMP_NUM_THREADS``; ``NLTK_DATA`` defaults to
    ``../shared/nltk_data`` when present (FIANet's word masks in fit / eval / data)."""
    env = dict(os.environ)
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)
    shared_nltk = ROOT.parent / "shared" / "nltk_data"
    if not env.get("NLTK_DATA") and shared_nltk.is_dir():
        env["NLTK_DATA"] = str(shared_nltk)
    return env


def append_results(path: Path, records: Sequence[dict[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as fh:
        for rec in records:
            fh.write(json.dumps(rec) + "\n")


def ensure_importable() -> None:
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
