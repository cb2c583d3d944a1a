"""The TRIS weakly supervised pipeline in one command (Liu et al., "Referring Image Segmentation
Using Text Supervision", ICCV 2023, Sec. 3): no mask is ever used for training.

    python -m tools.tris_pipeline --out runs/tris_refcoco --dataset refcoco --refer_data_root DATA \\
        --clip_weights RN50.pt --clip_vitb32 ViT-B-32.pt --allow_torchscript \\
        --pseudo_flags "--irn_backbone resnet50.pth" [train.py flags for both stages ...]
    python -m tools.tris_pipeline --out /tmp/tris --tiny --dataset refcoco --refer_data_root SYNTH ...

Steps, each in its own folder under ``--out`` with its ``config.json`` (the exact commands), a
completion marker (``done.json``), ``log.txt`` and what its tool writes in ``output/``:

1. ``1_stage1``: train.py --model tris_stage1 (its recipe: text-as-class loss + CLIP calibration);
2. ``2_prms``: tools.prms on the train split (one selected response map per ref);
3. ``3_pseudo``: tools.pseudo_masks (``--method irnet`` by default) -> one pseudo mask per ref;
4. ``4_stage2``: train.py --model tris_stage2 --pseudo_path 3_pseudo (the training split's ground
   truth is never read);
5. ``5_test``: test.py of both checkpoints on ``--eval_splits`` (stage 2 is the final model).

A step whose marker exists and whose config matches is skipped; a step folder holding another
configuration is refused (choose another ``--out``); a crashed training step resumes from its
``checkpoint_last.pth``. Per-epoch validation (checkpoint_best selection) uses the ground truth of
the VAL split only, as the reference does. With ground truth at hand the pipeline also reports the
PRMS maps' PointM / mIoU and the pseudo masks' mIoU (``3_pseudo/diagnostic.json``): diagnostics
written after their step finished, never an input of a later step. Flags the pipeline does not
know go to both train.py runs; ``--stage1_flags`` / ``--stage2_flags`` / ``--pseudo_flags`` /
``--test_flags`` take quoted strings for one step only.
"""
from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Sequence

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import args as args_lib  # noqa: E402
import engine  # noqa: E402
from engine import UserError  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
MARKER = "done.json"
OUTPUT = "output"


def _data_flags(a: Any) -> list[str]:
    flags = ["--dataset", a.dataset, "--refer_data_root", a.refer_data_root, "--device", a.device,
             "--workers", str(a.workers)]
    for name in ("splitBy", "cache_dir", "clip_bpe"):
        if getattr(a, name):
            flags += [f"--{name}", str(getattr(a, name))]
    return flags


def _train_flags(a: Any) -> list[str]:
    flags = _data_flags(a)
    if a.tiny:
        flags.append("--tiny")
    if a.img_size is not None:
        flags += ["--img_size", str(a.img_size)]
    if a.seed is not None:
        flags += ["--seed", str(a.seed)]
    if a.clip_weights:
        flags += ["--clip_weights", a.clip_weights]
    if a.allow_torchscript:
        flags.append("--allow_torchscript")
    return flags


def commands(a: Any, extra: Sequence[str]) -> dict[str, list[list[str]]]:
    """Every step's commands (argv lists, run from the repository root)."""
    root = Path(a.out).resolve()
    py = sys.executable

    def o(step: str) -> Path:  # what a step's tool writes (its own config.json, checkpoints ...)
        return root / step / OUTPUT
    cal = ["--clip_vitb32", a.clip_vitb32] if a.clip_vitb32 else []
    stage1 = [py, "train.py", "--model", "tris_stage1", *_train_flags(a), *cal, "--output-dir",
              str(o("1_stage1")), *extra, *shlex.split(a.stage1_flags)]
    prms = [py, "-m", "tools.prms", "--resume", str(o("1_stage1") / "checkpoint_best.pth"), *_data_flags(a),
            "--split", "train", "--out", str(o("2_prms")), *cal,
            *(["--allow_torchscript"] if a.allow_torchscript else []),
            *(["--no_diagnostic"] if a.no_diagnostic else [])]
    pseudo = [py, "-m", "tools.pseudo_masks", "--prms", str(o("2_prms")), "--out", str(o("3_pseudo")),
              "--method", a.method, "--device", a.device, *(["--tiny"] if a.tiny else []), "--no_progress",
              *shlex.split(a.pseudo_flags)]
    stage2 = [py, "train.py", "--model", "tris_stage2", *_train_flags(a), "--pseudo_path", str(o("3_pseudo")),
              "--output-dir", str(o("4_stage2")), *extra, *shlex.split(a.stage2_flags)]
    one = "," not in a.eval_splits and a.eval_splits != "all"
    tests = []
    for stage in ("stage1", "stage2"):
        folder = "1_stage1" if stage == "stage1" else "4_stage2"
        target = o("5_test") / (f"{stage}.json" if one else stage)
        tests.append([py, "test.py", "--resume", str(o(folder) / "checkpoint_best.pth"), *_data_flags(a),
                      "--split", a.eval_splits, "--save_json", str(target), "--output-dir", str(o("5_test")),
                      *shlex.split(a.test_flags)])
    return {"1_stage1": [stage1], "2_prms": [prms], "3_pseudo": [pseudo], "4_stage2": [stage2], "5_test": tests}


def _run(cmd: list[str], log: Path) -> None:
    """One command from the repository root, its output appended to ``log`` and echoed."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    with log.open("a") as f:
        f.write("$ " + shlex.join(cmd) + "\n")
        f.flush()
        proc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        lines = [x for x in log.read_text().splitlines() if x.strip()]
        errors = [x for x in lines if x.startswith("error:")]
        last = errors[-1] if errors else (lines[-1] if lines else "no output")
        raise UserError(f"step {log.parent.name} failed (exit {proc.returncode}): {last} (full log: {log})")


def run_step(folder: Path, cmds: list[list[str]], resumable: bool = False) -> tuple[bool, float]:
    """Run a step unless its marker says it is done with the same commands; returns (ran, seconds)."""
    folder.mkdir(parents=True, exist_ok=True)
    config = {"commands": [cmd[1:] for cmd in cmds]}   # without the interpreter path
    cfg_file, marker = folder / "config.json", folder / MARKER
    if cfg_file.is_file():
        old = json.loads(cfg_file.read_text())
        if old != config:
            raise UserError(f"--out: {folder} holds a run with other flags ({cfg_file}); remove that folder or "
                            f"choose another --out")
        if marker.is_file():
            return False, 0.0
    else:
        cfg_file.write_text(json.dumps(config, indent=2) + "\n")
    started = time.time()
    for cmd in cmds:
        last = folder / OUTPUT / "checkpoint_last.pth"
        if resumable and last.is_file():  # a crashed training run: continue it exactly
            cmd = [*cmd, "--resume", str(last)]
        _run(cmd, folder / "log.txt")
    seconds = round(time.time() - started, 1)
    marker.write_text(json.dumps({"seconds": seconds}) + "\n")
    return True, seconds


def _last_epoch(folder: Path) -> str:
    log = folder / OUTPUT / "log.jsonl"
    if not log.is_file():
        return ""
    lines = [json.loads(x) for x in log.read_text().splitlines() if x.strip()]
    if not lines:
        return ""
    last = lines[-1]
    keys = [k for k in ("train_loss", "val_mIoU", "val_PointM") if k in last]
    return ", ".join(f"{k} {last[k]:.4f}" for k in keys) + f" after epoch {last['epoch']}"


def _ground_truth(a: Any):
    """ref_id -> ground-truth mask of the train split (diagnostics only), or None without one."""
    ns = args_lib.get_parser().parse_args(["--model", "tris_stage1", *_data_flags(a)])
    engine.resolve_args(ns, "tris_stage1")
    try:
        ds = engine.build_dataset(ns, "train", mode="eval")
    except UserError:
        return None
    rows = {ds.samples[members[0]].ref_id: members[0] for members in ds.groups}
    return lambda ref_id: ds.original_mask(rows[int(ref_id)])


def pseudo_diagnostic(a: Any, folder: Path) -> dict[str, Any] | None:
    """The pseudo masks' mIoU against the ground truth (written to ``diagnostic.json``)."""
    from tools import pseudo_masks

    gt = _ground_truth(a)
    if gt is None:
        return None
    try:
        res = pseudo_masks.evaluate_against(folder / OUTPUT, gt)
    except (KeyError, ValueError, FileNotFoundError) as e:
        return {"error": f"{type(e).__name__}: {e}"}
    (folder / "diagnostic.json").write_text(json.dumps(res, indent=2) + "\n")
    return res


def summary_line(name: str, folder: Path, ran: bool, seconds: float) -> str:
    state = f"done in {seconds:.1f} s" if ran else "already done (skipped)"
    detail = ""
    if name in ("1_stage1", "4_stage2"):
        detail = _last_epoch(folder)
    elif name == "2_prms" and (folder / OUTPUT / "summary.json").is_file():
        s = json.loads((folder / OUTPUT / "summary.json").read_text())
        d = s.get("diagnostic")
        detail = f"{s.get('refs')} maps" + (f"; vs GT (diagnostic): PointM {100 * d['PointM']:.2f} mIoU "
                                            f"{100 * d['mIoU']:.2f}" if isinstance(d, dict) else "")
    elif name == "3_pseudo":
        d = folder / "diagnostic.json"
        if d.is_file():
            res = json.loads(d.read_text())
            detail = f"{res.get('n')} masks; vs GT (diagnostic): mIoU {100 * res['mIoU']:.2f}"
    elif name == "5_test":
        parts = []
        for f in sorted((folder / OUTPUT).rglob("*.json")):
            r = json.loads(f.read_text())
            split = r.get("split", f.stem)
            parts.append(f"{f.relative_to(folder / OUTPUT).parts[0].removesuffix('.json')} {split}: mIoU {100 * r.get('mIoU', 0):.2f} "
                         f"PointM {100 * r.get('PointM', 0):.2f}")
        detail = "; ".join(parts)
    return f"[tris_pipeline] {name}: {state}" + (f" ({detail})" if detail else "")


def run(argv: Sequence[str] | None = None) -> int:
    a, extra = args_lib.get_pipeline_parser().parse_known_args(argv)
    for name in ("out", "refer_data_root", "cache_dir", "clip_weights", "clip_vitb32", "clip_bpe"):
        if getattr(a, name):  # the steps run from the repository root: paths of the caller's directory
            setattr(a, name, str(Path(getattr(a, name)).expanduser().resolve()))
    for flag in ("--model", "--output-dir", "--output_dir", "--pseudo_path", "--resume"):
        if any(x == flag or x.startswith(flag + "=") for x in extra):
            raise UserError(f"{flag}: set by the pipeline itself for each step; remove it")
    out = Path(a.out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"--out {out}: cannot create it ({e.strerror or e})") from None
    steps = commands(a, extra)
    for name, cmds in steps.items():
        folder = out / name
        ran, seconds = run_step(folder, cmds, resumable=name in ("1_stage1", "4_stage2"))
        if name == "3_pseudo" and not a.no_diagnostic and (ran or not (folder / "diagnostic.json").is_file()):
            pseudo_diagnostic(a, folder)
        print(summary_line(name, folder, ran, seconds), flush=True)
        if name == a.stop_after:
            break
    return 0


def main() -> None:
    engine.cli_main(lambda: run(sys.argv[1:]))


if __name__ == "__main__":
    main()
