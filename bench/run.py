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
* ``flops``: forward FLOPs per image (``torch.utils.flop_counter``; training ~ 3x).

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
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent
if str(BENCH) not in sys.path:
    sys.path.insert(0, str(BENCH))

from _common import RESULTS, ROOT, SETTINGS, BenchError, Options, append_results, child_env, ensure_importable  # noqa: E402

ensure_importable()

WHATS = ("forward", "train", "fit", "eval", "data", "flops")
DEFAULT_PASSES = {"forward": 4, "train": 4, "fit": 5, "eval": 5, "flops": 1}
# Flags that do not change what is measured: left out of the reproducing command.
NOT_IN_COMMAND = {"model", "what", "setting", "results", "no_save", "child", "construct", "report"}
# Flags that only matter to some measurements.
ONLY_FOR = {"loss": ("train",), "adamw": ("train",), "compile": ("forward", "train"), "workers": ("fit", "eval"), "text": ("data",),
            "repeats": ("data",), "passes": ("forward", "train", "fit", "eval"), "warmup": ("forward", "train", "fit", "eval"),
            "flops": ("forward", "train", "fit", "eval"), "peak_tflops": ("forward", "train", "fit", "eval"),
            "quantize": ("forward", "eval")}


def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    p.add_argument("--model", default=None, help="comma-separated registry names (default fianet)")
    p.add_argument("--what", default=None, help=f"comma-separated: {', '.join(WHATS)} (default forward,train)")
    p.add_argument("--setting", choices=SETTINGS, default=None, help="paper (default) or tiny")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    p.add_argument("--amp", choices=["off", "bf16"], default="off")
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
    p.add_argument("--quantize", choices=["off", "int8"], default="off",
                   help="forward / eval: dynamic int8 nn.Linear layers (engine.quantize_int8, as test.py --quantize "
                        "int8); CPU only")
    p.add_argument("--workers", type=int, default=0, help="fit/eval: DataLoader workers (0: loading in the loop)")
    p.add_argument("--text", default=None, help="data: text variants masks,ids,builtin (default: the model's)")
    p.add_argument("--repeats", type=int, default=3, help="data: cached starts to time")
    p.add_argument("--flops", choices=["auto", "on", "off"], default="auto",
                   help="count FLOPs per image and report MFU (auto: on CUDA only)")
    p.add_argument("--peak-tflops", type=float, default=989.0, help="device peak for MFU (H200 dense bf16: 989)")
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
    opts = options(args)
    passes = args.passes or DEFAULT_PASSES.get(what, 1)
    flops = args.flops == "on" or (args.flops == "auto" and opts.device.startswith("cuda"))
    if what in ("forward", "train", "flops"):
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
        print(json.dumps(rec), flush=True)
    return 0


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
    status = 0
    for model in models:
        for what in whats:
            proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), *argv, "--child", model, what],
                                  capture_output=True, text=True, env=child_env(args.threads), cwd=ROOT)
            lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
            if proc.returncode != 0 or not lines:
                sys.stderr.write(proc.stderr[-4000:])
                print(json.dumps({"bench": "run", "model": model, "what": what, "error": proc.returncode,
                                  "command": command_for(args, model, what)}), flush=True)
                status = 1
                continue
            records = [json.loads(ln) for ln in lines]
            for rec in records:
                rec["command"] = command_for(args, model, what)
                print(json.dumps(rec), flush=True)
            if not args.no_save:
                append_results(Path(args.results), records)
    return status


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
