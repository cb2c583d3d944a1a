"""Benchmark: model eval-forward time, training-step time and peak memory.

    python bench/model.py --model fianet --what forward,train --setting paper [--amp bf16] [--device cpu]

Protocol (fixtures/README.md, "CPU speed of the original FIANet"): every measurement (model x
mode) runs in its OWN fresh process; inputs are drawn with ``torch.manual_seed(0)`` after
construction (token ids uniform in [1000, vocab), ``l_mask`` all ones, ``t_mask`` ones at tokens
1-2, ``p_mask`` ones at tokens 3-6, a uniform {0, 1} target); 4 passes, the first is a warm-up,
the median of the other 3 is reported; peak memory is the process's maximum RSS at the end (CPU)
or ``torch.cuda.max_memory_allocated`` (GPU). A training step is ``zero_grad``, forward,
cross-entropy (``--loss ce``, as the original's measurement; ``--loss model`` for the model's own
loss), backward and one AdamW step (lr 3e-5, weight decay 1e-2, PyTorch's fused implementation)
over all parameters.

``--reference-ops`` runs the reference op sequence (fast paths off, three separate BERT passes,
non-fused AdamW): a same-machine stand-in for the original code.

Settings: ``paper`` = Swin-B window 12, 480x480, full-size BERT-base config with random weights,
20 tokens, FIANet ``num_tmem`` 3; ``tiny`` = the registry's tiny config at 96x96 (a smoke test).
Prints one JSON line per measurement and appends it to bench/results.jsonl.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

RESULTS = ROOT / "bench" / "results.jsonl"
ORIGINAL_CPU = {"fianet": {"forward": 4.5, "train": 15.2}}  # seconds, fixtures/README.md


def _config(model: str, setting: str, args: argparse.Namespace) -> tuple[dict, int, int]:
    from lib.registry import model_config, tiny_model_config

    extra = {"fused_attn": not (args.plain_attention or args.reference_ops), "grad_ckpt": args.grad_ckpt}
    if args.reference_ops:
        extra["batched_text"] = False
    if model == "fianet":
        extra["num_tmem"] = 3 if setting == "paper" else 1
    if setting == "paper":
        return model_config(model, swin_type="base", window_size=12, bert="bert-base-uncased", **extra), 480, 20
    return tiny_model_config(model, **extra), 96, 12


def _inputs(cfg: dict, batch: int, size: int, n_tok: int, device):
    import torch

    torch.manual_seed(0)
    vocab = cfg["bert"]["vocab_size"]
    low = 1000 if vocab > 2000 else 1
    ids = torch.randint(low, vocab, (batch, n_tok))
    l_mask = torch.ones(batch, n_tok, dtype=torch.long)
    t_mask = torch.zeros_like(l_mask)
    t_mask[:, 1:3] = 1
    p_mask = torch.zeros_like(l_mask)
    p_mask[:, 3:7] = 1
    image = torch.randn(batch, 3, size, size)
    target = torch.randint(0, 2, (batch, size, size))
    return [t.to(device) for t in (image, ids, l_mask, t_mask, p_mask)], target.to(device)


def _peak_memory_mib(device) -> float:
    import torch

    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return rss / 1024


def measure(args: argparse.Namespace, model_name: str, what: str) -> dict:
    """One measurement in this process."""
    import torch
    import torch.nn.functional as F

    from lib.losses import build_criterion
    from lib.registry import build_model

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    cfg, size, n_tok = _config(model_name, args.setting, args)
    model = build_model(cfg).to(device)
    n_params = sum(p.numel() for p in model.parameters())
    inputs, target = _inputs(cfg, args.batch, size, n_tok, device)
    if not model.uses_word_masks:
        inputs = inputs[:3]
    amp = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.amp == "bf16")
    criterion = build_criterion(model_name) if args.loss == "model" else F.cross_entropy

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    times = []
    if what == "forward":
        model.eval()
        for _ in range(args.passes):
            sync()
            t0 = time.perf_counter()
            with torch.no_grad(), amp:
                model(*inputs)
            sync()
            times.append(time.perf_counter() - t0)
    else:
        model.train()
        opt = torch.optim.AdamW(model.parameters(), lr=3e-5, weight_decay=1e-2, fused=not args.reference_ops)
        for _ in range(args.passes):
            sync()
            t0 = time.perf_counter()
            opt.zero_grad(set_to_none=True)
            with amp:
                out = model(*inputs)
            loss = criterion(out.float(), target)
            loss.backward()
            opt.step()
            sync()
            times.append(time.perf_counter() - t0)
    rec = {
        "bench": "model", "model": model_name, "what": what, "setting": args.setting, "device": args.device,
        "amp": args.amp, "batch": args.batch, "threads": args.threads, "image": size, "tokens": n_tok,
        "fused_attn": not (args.plain_attention or args.reference_ops), "reference_ops": args.reference_ops,
        "grad_ckpt": args.grad_ckpt, "loss": args.loss,
        "median_s": round(statistics.median(times[1:] if len(times) > 1 else times), 4),
        "times_s": [round(t, 4) for t in times], "peak_mem_mib": round(_peak_memory_mib(device), 1),
        "params": n_params, "torch": torch.__version__, "cpu": platform.processor() or platform.machine(),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    ref = ORIGINAL_CPU.get(model_name, {}).get(what)
    if ref and args.setting == "paper" and args.device == "cpu" and args.threads == 2 and args.batch == 2:
        rec["original_s"] = ref
        rec["speedup_vs_original"] = round(ref / rec["median_s"], 2)
    return rec


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="fianet", help="comma-separated registry names (default fianet)")
    p.add_argument("--what", default="forward,train", help="forward, train or both (comma-separated)")
    p.add_argument("--setting", choices=["paper", "tiny"], default="paper")
    p.add_argument("--device", default="cpu")
    p.add_argument("--amp", choices=["off", "bf16"], default="off")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--passes", type=int, default=4)
    p.add_argument("--loss", choices=["ce", "model"], default="ce")
    p.add_argument("--grad-ckpt", action="store_true", help="activation checkpointing of the Swin blocks")
    p.add_argument("--plain-attention", action="store_true", help="disable the fast paths (SDPA window attention, "
                   "GEMM 1x1 projections)")
    p.add_argument("--reference-ops", action="store_true", help="same-machine proxy of the original: the "
                   "reference op order (no fast paths), three separate BERT passes, non-fused AdamW")
    p.add_argument("--no-save", action="store_true", help="do not append to bench/results.jsonl")
    p.add_argument("--child", nargs=2, metavar=("MODEL", "WHAT"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.child:  # one measurement in this (fresh) process
        print(json.dumps(measure(args, *args.child)), flush=True)
        return 0

    whats = [w.strip() for w in args.what.split(",") if w.strip()]
    if not set(whats) <= {"forward", "train"}:
        p.error(f"--what must be forward and/or train, got {args.what!r}")
    own = [a for a in (argv if argv is not None else sys.argv[1:])]
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
    status = 0
    for model_name in [m.strip() for m in args.model.split(",") if m.strip()]:
        for what in whats:
            proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), *own, "--child", model_name, what],
                                  capture_output=True, text=True, env=env, cwd=ROOT)
            lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
            if proc.returncode != 0 or not lines:
                sys.stderr.write(proc.stderr[-4000:])
                print(json.dumps({"bench": "model", "model": model_name, "what": what, "error": proc.returncode}))
                status = 1
                continue
            rec = json.loads(lines[-1])
            rec["command"] = "python bench/model.py " + " ".join(own)
            print(json.dumps(rec), flush=True)
            if not args.no_save:
                with open(RESULTS, "a", encoding="utf-8") as fh:
                    fh.write(json.dumps(rec) + "\n")
    return status


if __name__ == "__main__":
    sys.exit(main())
