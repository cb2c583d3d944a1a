"""bench/run.py: every measurement kind at the tiny setting in fresh processes, valid JSON lines
with the documented fields, the results file, the reproducing command and the report table."""
from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys

import pytest
from conftest import ROOT

from lib.registry import available_models

BENCH = ROOT / "bench"
if str(BENCH) not in sys.path:
    sys.path.insert(0, str(BENCH))

COMMON_FIELDS = {"model", "what", "setting", "device", "amp", "batch", "threads", "image", "tokens", "median_s",
                 "min_s", "max_s", "times_s", "peak_mem_mib", "torch", "machine", "command", "time"}
# Built-in POS tagger: FIANet's word masks without the NLTK data (data/word_masks.py).
ENV = {**os.environ, "OPENRRSIS_POS_TAGGER": "builtin", "PYTHONWARNINGS": "ignore"}


def bench(*argv: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, str(BENCH / "run.py"), *argv], cwd=ROOT, env=ENV, capture_output=True,
                          text=True, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"bench/run.py failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def records(proc: subprocess.CompletedProcess) -> list[dict]:
    return [json.loads(line) for line in proc.stdout.splitlines() if line.strip()]


def check_common(rec: dict) -> None:
    assert COMMON_FIELDS <= set(rec), COMMON_FIELDS - set(rec)
    assert rec["setting"] == "tiny" and rec["device"] == "cpu" and rec["threads"] == 1
    assert rec["min_s"] <= rec["median_s"] <= rec["max_s"]
    assert rec["machine"]["cores"] >= 1 and rec["machine"]["cpu"] and len(rec["machine"]["load_avg"]) == 3
    assert rec["command"].startswith(f"python bench/run.py --model {rec['model']} --what {rec['what']} --setting tiny")


def test_every_measurement_kind_at_the_tiny_setting(tmp_path):
    results = tmp_path / "results.jsonl"
    proc = bench("--setting", "tiny", "--model", "fianet", "--what", "forward,train,eval,fit,data", "--threads", "1",
                 "--passes", "3", "--repeats", "1", "--results", str(results))
    recs = records(proc)
    assert [r["what"] for r in recs] == ["forward", "train", "eval", "fit", "data"]
    assert [json.loads(x) for x in results.read_text().splitlines()] == recs
    by = {r["what"]: r for r in recs}
    for what, rec in by.items():
        check_common(rec)
        if what != "data":
            assert rec["model"] == "fianet" and rec["batch"] == 2 and rec["image"] == 96 and rec["tokens"] == 12
            assert len(rec["times_s"]) == 3 and rec["warmup"] == 1
            assert sorted(rec["times_s"][1:])[0] == rec["min_s"] and rec["peak_mem_mib"] > 100
            assert rec["params"] == sum(rec["params_by_child"].values())
            assert rec["images_per_s"] == pytest.approx(2 / rec["median_s"], rel=1e-3)
    # Full loops: synthetic samples through the data loader; eval saw every sample.
    assert by["eval"]["eval_samples"] == by["eval"]["samples"] == 6 and by["fit"]["loss"] == "model"
    # Dataset construction: FIANet builds word masks; a cached start imports neither NLTK nor transformers.
    data = by["data"]
    assert data["text"] == "masks" and data["refs"] == sum(s["items"] for s in data["first_splits"].values())
    assert data["first_start_s"] > 0 and not data["cached_loads_transformers"] and not data["cached_loads_nltk"]
    # The recorded command reproduces the measurement's options.
    argv = shlex.split(by["train"]["command"])[2:]
    assert argv == ["--model", "fianet", "--what", "train", "--setting", "tiny", "--threads", "1", "--passes", "3"]


def test_forward_of_every_registered_model_with_flops(tmp_path):
    models = [m for m in available_models() if m != "fianet"]
    results = tmp_path / "r.jsonl"
    recs = records(bench("--setting", "tiny", "--model", ",".join(models), "--what", "forward", "--threads", "1",
                         "--passes", "2", "--flops", "on", "--peak-tflops", "1", "--results", str(results)))
    assert [r["model"] for r in recs] == models
    for rec in recs:
        check_common(rec)
        assert rec["flops_per_image"] > 1e6 and rec["peak_tflops"] == 1.0
        assert rec["mfu"] == pytest.approx(rec["flops_per_image"] * rec["images_per_s"] / 1e12, rel=1e-3)
    # RMSIN's CIM is built for the tiny setting's image size (its token-mixing layer fixes the grid).
    assert next(r for r in recs if r["model"] == "rmsin")["image"] == 96


def test_bad_requests_give_one_line():
    for argv, expect in ((["--what", "nosuch"], "--what"), (["--report", "--results", "/nonexistent/r.jsonl"], "not found"),
                         (["--setting", "tiny", "--what", "forward", "--passes", "1"], "--passes"),
                         (["--setting", "tiny", "--what", "fit", "--compile"], "--compile")):
        proc = bench(*argv, check=False)
        assert proc.returncode == 2 and proc.stderr.strip().startswith("error:") and expect in proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1


def test_report_keeps_the_latest_result_per_configuration(tmp_path):
    import _report

    def rec(what, median, **kw):
        return {"bench": "run", "model": "lavt", "what": what, "setting": "paper", "device": "cpu", "amp": "off",
                "batch": 2, "threads": 2, "median_s": median, "min_s": median, "max_s": median, "times_s": [median] * 2,
                "peak_mem_mib": 2048.0, "machine": {"load_avg": [1.5, 1, 1]}, "time": "2026-11-21T10:00:00", **kw}

    lines = [rec("forward", 5.0), rec("train", 17.0), rec("forward", 4.0), rec("forward", 9.0, reference_ops=True),
             # a record of the former bench/model.py: no load average, no newer options
             {"bench": "model", "model": "lavt", "what": "train", "setting": "paper", "device": "cpu", "amp": "bf16",
              "batch": 2, "threads": 2, "fused_attn": True, "reference_ops": False, "grad_ckpt": True, "loss": "ce",
              "median_s": 8.0, "times_s": [9.0, 8.0, 7.5, 8.5], "peak_mem_mib": 6144.0, "time": "2026-11-20T10:00:00"},
             {"bench": "run", "model": "lavt", "what": "forward", "error": 1}]
    path = tmp_path / "r.jsonl"
    path.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    out = bench("--report", "--results", str(path)).stdout.strip().splitlines()
    assert out[0].startswith("| model | what | setting |") and len(out) == 2 + 4
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in out[2:]]
    cells = {(r[1], r[4], r[6]): r for r in rows}
    assert cells[("forward", "off", "-")][7] == "4 (4-4)"  # the later of the two plain forward records
    assert cells[("forward", "off", "reference-ops")][7] == "9 (9-9)"
    old = cells[("train", "bf16", "grad-ckpt")]
    assert old[7] == "8 (7.5-8.5)" and old[8] == "0.25" and old[9] == "6.0" and old[10] == "-"
    assert cells[("train", "off", "-")][10] == "1.5"
    # Filters.
    assert len(_report.latest(_report.read(path), what="train")) == 2
    assert len(_report.latest(_report.read(path), model="fianet")) == 0
