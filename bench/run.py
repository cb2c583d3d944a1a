#!/usr/bin/env python
"""OpenRRSIS benchmarks: one entry point for every number in BENCHMARKS.md.

    python bench/run.py --model fianet,lavt --what forward,train --setting paper [--amp bf16] [--device cuda]
    python bench/run.py --model fianet --what fit,eval --setting paper --batch 2
    python bench/run.py --model fianet,lavt,rmsin --what flops --setting paper
    python bench/run.py --what data --text masks,ids,builtin
    python bench/run.py --report                       # markdown table of the latest results

What (``--what``, comma list; every (model, what) runs in its own fresh process):

* ``forward``: eval forward (``no_grad``) on fixed random inputs; ``train``: one training step
  (``--loss ce`` plain cross-entropy as the original's measurement, ``--loss model`` the model's
  own objective, e.g. CrossVLT's alignment loss) -- see bench/_model.py for the protocol;
* ``fit`` / ``eval``: the full training / evaluation loop (data loader included) on generated
  synthetic data at the setting's image size, images/s -- bench/_loop.py;
* ``data``: dataset construction at RRSIS-D scale, first vs cached start -- bench/_data.py;
* ``flops``: forward FLOPs per image (``torch.utils.flop_counter``; training ~ 3x);
* ``profile``: ``torch.profiler`` over one eval forward and one training step after the warm-up:
  the top ``--top`` operators by self CPU time (tables on stderr, also in the JSON record),
  GEMM / convolution share, achieved GFLOP/s against the CPU's float32 peak -- bench/_profile.py.

Settings (``--setting``): ``paper`` = Swin-B window 12, 480x480, BERT-base config with random
weights, 20 tokens (CrossVLT 21), FIANet ``num_tmem`` 3; ``tiny`` = a seconds-long smoke test.

Each measurement prints one JSON line (median / min / max after ``--warmup`` warm-up passes,
the machine with its load average, torch version, threads, batch, image size, tokens, peak
memory -- max RSS on CPU, ``torch.cuda.max_memory_allocated`` on GPU -- and the command that
reproduces it) and appends it to ``--results`` (default bench/results.jsonl). ``--flops on``
(default on CUDA) adds FLOPs per image and the MFU against ``--peak-tflops`` (default 989: H200
dense bf16).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent
if str(BENCH) not in sys.path:
    sys.path.insert(0, str(BENCH))

from _common import RESULTS, ROOT, SETTINGS, BenchError, Options, append_results, child_env, ensure_importable  # noqa: E402

ensure_importable()

WHATS = ("forward", "train", "fit", "eval", "data", "flops", "profile")
DEFAULT_PASSES = {"forward": 4, "train": 4, "fit": 5, "eval": 5, "flops": 1}
# Flags that do not change what is measured: left out of the reproducing command.
NOT_IN_COMMAND = {"model", "what", "setting", "results", "no_save", "child", "construct", "report", "vs_original",
                  "ref_harness", "rounds"}
# Flags that only matter to some measurements.
ONLY_FOR = {"loss": ("train", "profile"), "adamw": ("train", "profile"), "compile": ("forward", "train"),
            "workers": ("fit", "eval"), "text": ("data",), "top": ("profile",), "profile_parts": ("profile",),
            "repeats": ("data",), "passes": ("forward", "train", "fit", "eval"),
            "warmup": ("forward", "train", "fit", "eval", "profile"),
            "flops": ("forward", "train", "fit", "eval"), "peak_tflops": ("forward", "train", "fit", "eval"),
            "quantize": ("forward", "eval")}


def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    p.add_argument("--model", default=None, help="comma-separated registry names (default fianet)")
    p.add_argument("--what", default=None, help=f"comma-separated: {', '.join(WHATS)} (default forward,train)")
    p.add_argument("--setting", choices=SETTINGS, default=None, help="paper (default) or tiny")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    p.add_argument("--amp", choices=["off", "bf16", "auto"], default="off",
                   help="off (float32, the default: every recorded number stays comparable), bf16, or auto: what "
                        "train.py's --amp auto picks on this machine (bf16 with bf16 instructions or a bf16 GPU); "
                        "records hold the resolved value and amp_requested")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--threads", type=int, default=2, help="intra-op threads (and OMP_NUM_THREADS)")
    p.add_argument("--passes", type=int, default=None,
                   help="passes / iterations including warm-up (default: 4 forward/train, 5 fit/eval)")
    p.add_argument("--warmup", type=int, default=1, help="leading passes left out of the statistics")
    p.add_argument("--loss", choices=["ce", "model"], default="ce", help="train: plain CE or the model's own loss")
    p.add_argument("--adamw", choices=["fused", "default"], default="fused",
                   help="train: fused AdamW or PyTorch's default implementation (for-loop on CPU)")
    p.add_argument("--grad-ckpt", action="store_true", help="activation checkpointing of the Swin blocks")
    p.add_argument("--plain-attention", action="store_true",
                   help="fast paths off (SDPA window attention, GEMM 1x1 projections, channels-last decoder)")
    p.add_argument("--reference-ops", action="store_true", help="same-machine proxy of the original: the reference "
                   "op order (no fast paths), three separate BERT passes, PyTorch's default AdamW")
    p.add_argument("--channels-last", choices=["auto", "on", "off"], default="auto",
                   help="decoder layout (auto: channels-last on CUDA only)")
    p.add_argument("--compile", action="store_true",
                   help="forward / train: torch.compile the model (inductor); the first pass compiles and is "
                        "the warm-up")
    p.add_argument("--top", type=int, default=15, help="profile: operators listed by self CPU time")
    p.add_argument("--profile-parts", default="forward,train",
                   help="profile: forward, train or both (a training step under the profiler needs ~14 GiB at the "
                        "paper setting)")
    p.add_argument("--quantize", choices=["off", "int8"], default="off",
                   help="forward / eval: dynamic int8 nn.Linear layers (engine.quantize_int8, as test.py --quantize "
                        "int8); CPU only")
    p.add_argument("--workers", type=int, default=0, help="fit/eval: DataLoader workers (0: loading in the loop)")
    p.add_argument("--text", default=None, help="data: text variants masks,ids,builtin (default: the model's)")
    p.add_argument("--repeats", type=int, default=3, help="data: cached starts to time")
    p.add_argument("--flops", choices=["auto", "on", "off"], default="auto",
                   help="count FLOPs per image and report MFU (auto: on CUDA only)")
    p.add_argument("--peak-tflops", type=float, default=989.0, help="device peak for MFU (H200 dense bf16: 989)")
    p.add_argument("--vs-original", action="store_true",
                   help="forward / train of FIANet: ours and the ORIGINAL implementation interleaved (ours, original, "
                        "... each in a fresh process; ours with --loss ce --amp off), medians and the ratio "
                        "original / ours (needs the reference harness; bench/_original.py)")
    p.add_argument("--ref-harness", default=None,
                   help="--vs-original: ref_fianet_step.sh or its folder (default: OPENRRSIS_REF_HARNESS, else "
                        "../shared/harness)")
    p.add_argument("--rounds", type=int, default=3, help="--vs-original: rounds of (ours, original)")
    p.add_argument("--results", default=str(RESULTS), help="JSON-lines file the results are appended to")
    p.add_argument("--no-save", action="store_true", help="print only, append nothing")
    p.add_argument("--report", action="store_true",
                   help="print a markdown table of the latest result per configuration in --results "
                        "(filtered by --model / --what / --setting when given explicitly)")
    p.add_argument("--child", nargs=2, metavar=("MODEL", "WHAT"), help=argparse.SUPPRESS)
    p.add_argument("--construct", nargs=4, metavar=("ROOT", "TOKENIZER", "CACHE", "VARIANT"), help=argparse.SUPPRESS)
    return p


def options(args: argparse.Namespace) -> Options:
    return Options(device=args.device, amp=args.amp, batch=args.batch, threads=args.threads,
                   plain_attention=args.plain_attention, reference_ops=args.reference_ops, grad_ckpt=args.grad_ckpt,
                   channels_last=args.channels_last, loss=args.loss, adamw=args.adamw, compile=args.compile,
                   quantize=args.quantize)


def command_for(args: argparse.Namespace, model: str, what: str) -> str:
    """The command that reproduces one measurement: its model and what, plus every non-default flag."""
    parser = get_parser()
    parts = ["python bench/run.py", "--model", model, "--what", what, "--setting", args.setting or "paper"]
    for action in parser._actions:
        dest = action.dest
        if dest in NOT_IN_COMMAND or dest == "help" or not action.option_strings or what not in ONLY_FOR.get(dest, (what,)):
            continue
        value = getattr(args, dest)
        if value == action.default:
            continue
        flag = action.option_strings[0]
        parts += [flag] if value is True else [flag, str(value)]
    return " ".join(parts)


def run_child(args: argparse.Namespace) -> int:
    """One measurement in this (fresh) process; prints its JSON line(s)."""
    model, what = args.child
    args.setting = args.setting or "paper"
    import utils

    requested = args.amp
    try:
        args.amp = utils.resolve_amp(requested, utils.resolve_device(args.device))
    except utils.DeviceUnavailableError as e:
        raise BenchError(str(e)) from None
    opts = options(args)
    passes = args.passes or DEFAULT_PASSES.get(what, 1)
    flops = args.flops == "on" or (args.flops == "auto" and opts.device.startswith("cuda"))
    if what == "profile":
        import _profile

        records = [_profile.measure(model, args.setting, opts, args.warmup, args.top, profile_parts(args))]
    elif what in ("forward", "train", "flops"):
        import _model

        records = [_model.measure(model, what, args.setting, opts, passes, args.warmup, flops, args.peak_tflops)]
    elif what in ("fit", "eval"):
        import _loop

        records = [_loop.measure(model, what, args.setting, opts, passes, args.warmup, args.workers, flops,
                                 args.peak_tflops)]
    else:
        import _data

        from lib.registry import model_spec

        # --what data without --text: the text the model's dataset builds (word masks for FIANet)
        default_text = "masks" if model_spec(model).text.word_masks else "ids"
        variants = [v.strip() for v in (args.text or default_text).split(",") if v.strip()]
        records = _data.measure(args.setting, variants, opts, args.repeats)
        for rec in records:
            rec["model"] = model
    for rec in records:
        rec["amp_requested"] = requested
        print(json.dumps(rec), flush=True)
    return 0


def profile_parts(args: argparse.Namespace) -> tuple[str, ...]:
    parts = tuple(x.strip() for x in args.profile_parts.split(",") if x.strip())
    if not parts or set(parts) - {"forward", "train"}:
        raise BenchError(f"--profile-parts {args.profile_parts!r}: choose forward, train or forward,train")
    return parts


def measure_all(args: argparse.Namespace, argv: list[str]) -> int:
    models = [m.strip() for m in (args.model or "fianet").split(",") if m.strip()]
    whats = [w.strip() for w in (args.what or "forward,train").split(",") if w.strip()]
    bad = [w for w in whats if w not in WHATS]
    if bad or not whats:
        raise BenchError(f"--what {args.what!r}: choose from {', '.join(WHATS)}")
    for what in whats:
        passes = args.passes or DEFAULT_PASSES.get(what, 1)
        if what in ONLY_FOR["passes"] and (args.warmup < 0 or passes <= args.warmup):
            raise BenchError(f"--passes {passes} leaves no timed pass after --warmup {args.warmup} ({what})")
    if "profile" in whats:
        profile_parts(args)
    if args.compile and set(whats) - set(ONLY_FOR["compile"]):
        raise BenchError(f"--compile applies to --what forward,train only, got --what {args.what}")
    if args.quantize != "off" and (set(whats) - set(ONLY_FOR["quantize"]) or not args.device.startswith("cpu")):
        raise BenchError(f"--quantize {args.quantize}: applies to --what forward,eval on --device cpu only, got "
                         f"--what {args.what or 'forward,train'} --device {args.device}")
    if args.batch < 1 or args.threads < 1:
        raise BenchError(f"--batch and --threads must be positive, got {args.batch} and {args.threads}")
    from lib.registry import available_models

    unknown = [m for m in models if m not in available_models()]
    if unknown:
        raise BenchError(f"--model: unknown {', '.join(unknown)}; valid: {', '.join(available_models())}")
    script = None
    if args.vs_original:
        import _original

        try:
            script = _original.find_harness(args.ref_harness)
            _original.comparable(models, whats, args.setting or "paper", args.batch, args.threads, args.device)
            if args.rounds < 1:
                raise _original.HarnessError(f"--rounds {args.rounds}: at least one round is needed")
        except _original.HarnessError as e:
            print(_original.UNAVAILABLE + str(e), file=sys.stderr, flush=True)
            script = None
    status = 0
    for model in models:
        for what in whats:
            if script is not None and _original.covers(model, what):
                ok, script = vs_original(args, argv, what, script)
                status = status or (0 if ok else 1)
                continue
            status = status or (0 if run_measurement(args, argv, model, what) else 1)
    return status


def run_measurement(args: argparse.Namespace, argv: list[str], model: str, what: str,
                    extra: tuple[str, ...] = ()) -> list[dict] | None:
    """One (model, what) in a fresh process: its records printed and appended (None: it failed)."""
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), *argv, *extra, "--child", model, what],
                          capture_output=True, text=True, env=child_env(args.threads), cwd=ROOT)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    command_args = get_parser().parse_args([*argv, *extra]) if extra else args
    if proc.returncode != 0 or not lines:
        sys.stderr.write(proc.stderr[-4000:])
        print(json.dumps({"bench": "run", "model": model, "what": what, "error": proc.returncode,
                          "command": command_for(command_args, model, what)}), flush=True)
        return None
    records = [json.loads(ln) for ln in lines]
    for rec in records:
        rec["command"] = command_for(command_args, model, what)
        if what == "profile":  # the tables for people; stdout stays one JSON line per record
            import _profile

            print(_profile.format_tables(rec), file=sys.stderr, flush=True)
        print(json.dumps(rec), flush=True)
    if not args.no_save:
        append_results(Path(args.results), records)
    return records


def vs_original(args: argparse.Namespace, argv: list[str], what: str, script: Path) -> tuple[bool, Path | None]:
    """``--rounds`` x (ours, original) for FIANet ``what`` (bench/_original.py); one comparison
    record. Returns ``(ours ran, the harness if it still works)``; when the original fails, ONE
    line says so and ours' measurements stand."""
    import _original

    passes = args.passes or DEFAULT_PASSES[what]
    last: dict = {}

    def ours(k: int) -> float:
        records = run_measurement(args, argv, "fianet", what, ("--amp", "off", "--loss", "ce"))
        if records is None:
            raise BenchError(f"our FIANet {what} failed in round {k + 1} of --vs-original")
        last.update(records[-1])
        return float(records[-1]["median_s"])

    def original(k: int) -> float:
        return _original.run_harness(script, what, passes, args.warmup)

    try:
        result = _original.interleave(args.rounds, ours, original)
    except _original.HarnessError as e:
        print(_original.UNAVAILABLE + str(e), file=sys.stderr, flush=True)
        return bool(last), None
    except BenchError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return False, script
    rec = {"bench": "run", "comparison": "vs_original", "model": "fianet", "what": what, "setting": "paper",
           "device": "cpu", "amp": "off", "batch": 2, "threads": args.threads, "loss": "ce", "adamw": last.get("adamw"),
           "passes": passes, "warmup": args.warmup, "harness": str(script), **result,
           "ref_mirror": os.environ.get("REF_MIRROR"), "torch": last.get("torch"), "machine": last.get("machine"),
           "time": last.get("time"),
           "command": f"python bench/run.py --model fianet --what {what} --vs-original --passes {passes} "
                      f"--warmup {args.warmup} --rounds {args.rounds}"}
    print(json.dumps(rec), flush=True)
    if not args.no_save:
        append_results(Path(args.results), [rec])
    return True, script


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = get_parser().parse_args(argv)
    try:
        if args.construct:  # one dataset construction in this fresh process (--what data)
            import _data

            print(json.dumps(_data.construct(*args.construct)), flush=True)
            return 0
        if args.child:
            return run_child(args)
        if args.report:
            import _report

            print(_report.table(Path(args.results), args.model, args.what, args.setting))
            return 0
        return measure_all(args, argv)
    except BenchError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
