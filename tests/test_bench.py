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
    cpu = rec["machine"]["cpu_info"]  # the CPU's features and float32 peak in every record
    assert cpu["threads"] == rec["threads"] and cpu["cores_used"] >= 1 and cpu["fp32_fma_lanes"] in (4, 8, 16)
    assert set(cpu["isa_env"]) == {"ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS"}
    assert cpu["capability"] and cpu["clock_source"] and cpu["fma_units_per_core"] == 2
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
                         (["--setting", "tiny", "--what", "fit", "--compile"], "--compile"),
                         (["--setting", "tiny", "--what", "profile", "--profile-parts", "backward"], "--profile-parts")):
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


# --------------------------------------------------------------------------------------------
# CPU description and peak, --what profile, --vs-original
# --------------------------------------------------------------------------------------------
def test_cpu_peak_from_cores_lanes_and_clock(monkeypatch):
    """Peak = cores used x fp32 FMA lanes x 2 x 2 FMA units x clock, capped by an emulated ISA,
    halved when the two threads are SMT siblings of one core."""
    import _common

    import utils

    avx512 = {"model": "Xeon", "flags": ["avx2", "fma", "avx512f"], "capability": "AVX512", "isa_env": {},
              "source": "cpuinfo"}
    monkeypatch.setattr(utils, "cpu_features", lambda: avx512)
    for var in utils.ISA_ENV_VARS:
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(_common, "_lscpu", lambda: {"Thread(s) per core": "1", "Core(s) per socket": "2",
                                                    "Socket(s)": "1", "CPU max MHz": "2600.0000"})
    hw = _common.cpu_hardware(2)
    assert hw["clock_source"] == "lscpu CPU max MHz" and hw["cores_used"] == 2 and hw["fp32_fma_lanes"] == 16
    assert hw["peak_fp32_gflops"] == pytest.approx(2 * 16 * 2 * 2 * 2.6) and not hw["emulated"]
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")  # AVX2 emulated on the AVX-512 machine
    hw = _common.cpu_hardware(2)
    assert hw["fp32_fma_lanes"] == 8 and hw["emulated"] and "ONEDNN_MAX_CPU_ISA" in hw["lanes_source"]
    assert hw["peak_fp32_gflops"] == pytest.approx(2 * 8 * 2 * 2 * 2.6)
    # a 2-vCPU VM whose vCPUs are SMT siblings of one core: two threads get one core's peak
    monkeypatch.setattr(_common, "_lscpu", lambda: {"Thread(s) per core": "2", "Core(s) per socket": "1",
                                                    "Socket(s)": "1", "CPU max MHz": "3000"})
    hw = _common.cpu_hardware(2)
    assert hw["cores_used"] == 1 and hw["threads_share_cores"]
    assert hw["peak_fp32_gflops"] == pytest.approx(1 * 8 * 2 * 2 * 3.0)


def test_operator_table_shares_and_rates():
    import _profile

    class Event:
        def __init__(self, key, count, self_us, total_us, flops=0):
            self.key, self.count, self.self_cpu_time_total, self.cpu_time_total, self.flops = (
                key, count, self_us, total_us, flops)

    events = [Event("aten::copy_", 10, 300.0, 300.0), Event("aten::mm", 4, 500.0, 500.0, flops=10 ** 9),
              Event("aten::conv2d", 2, 0.0, 200.0, flops=4 * 10 ** 8), Event("aten::mkldnn_convolution", 2, 200.0, 200.0)]
    t = _profile.operator_table(events, top=2)
    assert t["total_self_ms"] == 1.0 and t["gemm_conv_share"] == pytest.approx(0.7)
    assert [r["name"] for r in t["top"]] == ["aten::mm", "aten::copy_"]
    assert t["top"][0]["self_pct"] == 50.0 and t["top"][0]["gflops_per_s"] == pytest.approx(2000.0)
    assert "flops" not in t["top"][1]
    # the convolution's FLOPs sit on conv2d, its time in the child: the rate uses the inclusive time
    assert [r["name"] for r in t["flop_ops"]] == ["aten::mm", "aten::conv2d"]
    assert t["flop_ops"][1]["gflops_per_s"] == pytest.approx(2000.0)
    assert not _profile.is_gemm_conv("aten::add") and _profile.is_gemm_conv("aten::convolution_backward")


def test_profile_at_the_tiny_setting(tmp_path):
    results = tmp_path / "r.jsonl"
    proc = bench("--setting", "tiny", "--model", "lavt", "--what", "profile", "--threads", "1", "--top", "5",
                 "--results", str(results))
    (rec,) = records(proc)
    assert json.loads(results.read_text()) == rec and rec["what"] == "profile"
    assert rec["command"] == "python bench/run.py --model lavt --what profile --setting tiny --threads 1 --top 5"
    for what in ("forward", "train"):
        sec = rec["profile"][what]
        assert len(sec["top"]) == 5 and sum(r["self_pct"] for r in sec["top"]) <= 100.0
        assert [r["self_ms"] for r in sec["top"]] == sorted((r["self_ms"] for r in sec["top"]), reverse=True)
        assert 0.0 < sec["gemm_conv_share"] < 1.0 and sec["flops"] > 1e6
        assert sec["achieved_gflops_per_s"] == pytest.approx(sec["flops"] / sec["plain_s"] / 1e9, rel=0.01, abs=0.1)
        assert sec["peak_fp32_gflops"] == rec["machine"]["cpu_info"]["peak_fp32_gflops"]
        assert any(r["name"] in ("aten::addmm", "aten::mm") for r in sec["flop_ops"])
    assert rec["profile"]["train"]["flops"] > 2 * rec["profile"]["forward"]["flops"]  # backward ~ 2x forward
    assert "| operator | calls | self ms | % self | GFLOP/s |" in proc.stderr  # the tables, for people


def test_vs_original_unavailable_is_one_line_and_the_rest_runs(tmp_path):
    import utils

    proc = bench("--setting", "tiny", "--model", "lavt", "--what", "forward", "--threads", "1", "--passes", "2",
                 "--amp", "auto", "--vs-original", "--ref-harness", str(tmp_path / "missing"), "--no-save")
    lines = proc.stderr.strip().splitlines()
    assert lines == [f"comparison with the original unavailable: no harness script "
                     f"{tmp_path / 'missing' / 'ref_fianet_step.sh'}"]
    (rec,) = records(proc)
    assert rec["what"] == "forward" and rec["amp_requested"] == "auto"
    assert rec["amp"] == utils.amp_decision("auto", __import__("torch").device("cpu"))[0]
    # requests the harness cannot match (it runs FIANet at the paper setting, batch 2, 2 threads, CPU)
    import _original

    _original.comparable(["fianet", "lavt"], ["forward", "fit"], "paper", 2, 2, "cpu")
    for bad, why in (((["lavt"], ["forward"], "paper", 2, 2, "cpu"), "FIANet only"),
                     ((["fianet"], ["eval"], "paper", 2, 2, "cpu"), "forward and train only"),
                     ((["fianet"], ["train"], "tiny", 2, 2, "cpu"), "paper setting"),
                     ((["fianet"], ["train"], "paper", 2, 1, "cpu"), "2 threads"),
                     ((["fianet"], ["train"], "paper", 2, 2, "cuda"), "on the CPU")):
        with pytest.raises(_original.HarnessError, match=why):
            _original.comparable(*bad)


def fake_harness(tmp_path, body: str):
    script = tmp_path / "ref_fianet_step.sh"
    script.write_text("#!/bin/bash\n" + body)
    return script


def test_harness_output_parsing_and_failures(tmp_path):
    import _original

    script = fake_harness(tmp_path, 'echo "forward 1: 9.9 s (warm-up)"; echo "args=$* steps=$REF_STEPS '
                                    'warmup=$REF_WARMUP threads=$OMP_NUM_THREADS" >&2\n'
                                    '[ "$1" = --forward ] && [ "$REF_STEPS" = 3 ] && [ "$REF_WARMUP" = 1 ] || exit 7\n'
                                    'echo 1.5\n')
    assert _original.run_harness(script, "forward", passes=4, warmup=1) == 1.5
    with pytest.raises(_original.HarnessError, match="exited 7"):
        _original.run_harness(script, "train", passes=4, warmup=1)  # no --forward: the fake exits 7
    missing_mirror = fake_harness(tmp_path, 'echo "ERROR: FIANet source not extracted and the bare mirror X is '
                                            'missing" >&2; echo "   more" >&2; exit 1\n')
    with pytest.raises(_original.HarnessError, match="exited 1: ERROR: FIANet source not extracted"):
        _original.run_harness(missing_mirror, "train", passes=2, warmup=1)
    garbage = fake_harness(tmp_path, "echo done\n")
    with pytest.raises(_original.HarnessError, match="not the median"):
        _original.run_harness(garbage, "train", passes=2, warmup=1)
    assert _original.find_harness(str(tmp_path)) == tmp_path / "ref_fianet_step.sh"
    with pytest.raises(_original.HarnessError, match="no harness script"):
        _original.find_harness(str(tmp_path / "nowhere"))


def test_vs_original_interleaves_and_reports_the_ratio(tmp_path, monkeypatch, capsys):
    """ours, original, ours, original, ... with our runs at --loss ce --amp off; medians and the
    ratio original / ours in one comparison record (fake harness, our runs faked)."""
    import _original
    import run as bench_run

    calls = []
    ours_times = iter([2.0, 4.0, 3.0])

    def fake_measurement(args, argv, model, what, extra=()):
        calls.append(("ours", model, what, extra))
        return [{"median_s": next(ours_times), "adamw": "fused", "machine": {"load_avg": [1, 1, 1]}}]

    monkeypatch.setattr(bench_run, "run_measurement", fake_measurement)
    real = _original.run_harness
    monkeypatch.setattr(_original, "run_harness", lambda *a, **k: (calls.append(("original",)), real(*a, **k))[1])
    script = fake_harness(tmp_path, 'echo "step 1: 7 s"; echo "# REF_STEPS=$REF_STEPS"; echo 4.5\n')
    argv = ["--model", "fianet", "--what", "train", "--passes", "3", "--no-save"]
    args = bench_run.get_parser().parse_args(argv)
    ok, kept = bench_run.vs_original(args, argv, "train", script)
    assert ok and kept == script
    assert [c[0] for c in calls] == ["ours", "original"] * 3
    assert all(c[3] == ("--amp", "off", "--loss", "ce") for c in calls if c[0] == "ours")
    rec = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert rec["comparison"] == "vs_original" and rec["order"] == ["ours", "original"] * 3
    assert len(rec["load_avg_at_start"]) == 6
    assert rec["ours_s"] == [2.0, 4.0, 3.0] and rec["original_s"] == [4.5] * 3
    assert rec["ours_median_s"] == 3.0 and rec["ratio_original_over_ours"] == 1.5 and rec["passes"] == 3
    # the original failing in the first round: one line, our measurement stands
    calls.clear()
    ours_times = iter([2.0])
    broken = fake_harness(tmp_path, "exit 3\n")
    ok, kept = bench_run.vs_original(args, argv, "train", broken)
    err = capsys.readouterr().err.strip().splitlines()
    assert ok and kept is None and len(err) == 1 and err[0].startswith("comparison with the original unavailable: ")
    assert [c[0] for c in calls] == ["ours", "original"]
