"""scripts/reproduce.sh end to end on synthetic data (train -> every split -> table), and the
per-split records test.py writes."""
from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT

from tools import results as results_lib
from tools.results import METRICS

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

TINY = ["--pretrained_swin_weights", "", "--swin_embed_dim", "8", "--swin_depths", "1-1-1-1", "--swin_heads",
        "1-1-2-2", "--window_size", "4", "--img_size", "48", "--workers", "0", "--device", "cpu", "--epochs", "1",
        "-b", "4", "--lr", "1e-3", "--print-freq", "2"]


def _env(**extra: str) -> dict[str, str]:
    bindir = str(Path(sys.executable).parent)
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", "VIRTUAL_ENV": sys.prefix,
            "PATH": bindir + os.pathsep + os.environ.get("PATH", ""), **extra}


def _reproduce(*argv: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(ROOT / "scripts" / "reproduce.sh"), *argv], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def reproduced(tmp_path_factory, nltk_data_dir) -> dict[str, Path]:
    from data.synthetic import generate

    tmp = tmp_path_factory.mktemp("reproduce")
    paths = {k: Path(v) for k, v in generate(tmp / "data", seed=1, num_images=8, num_val=3, num_test=3,
                                             image_size=48).items()}
    data = ["--refer_data_root", str(paths["rrsisd"]), "--bert_tokenizer", str(paths["bert"]),
            "--ck_bert", str(paths["bert"]), "--cache_dir", str(tmp / "cache")]
    out = tmp / "run"
    proc = _reproduce("fianet", "rrsisd", "1", "--", *data, *TINY, env=_env(REPRODUCE_DIR=str(out)))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return {"out": out, "data_args": data, "log": proc.stdout,
            "bert": paths["bert"], "rrsisd": paths["rrsisd"]}


def _table_rows(table: str) -> dict[str, list[str]]:
    """``{split: [P@0.5 ... mIoU cells of its 'ours' row]}``."""
    rows = {}
    for line in table.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 2 + len(METRICS) and cells[1].startswith("ours"):
            rows[cells[0]] = cells[2:]
    return rows


def test_reproduce_trains_evaluates_every_split_and_prints_the_json_numbers(reproduced):
    out = reproduced["out"]
    assert (out / "train" / "checkpoint_best.pth").is_file() and (out / "train" / "log.jsonl").is_file()
    assert "1 process(es) x batch 8 (reference total 8)" in reproduced["log"]
    records = {p.stem: json.loads(p.read_text()) for p in (out / "results").glob("*.json")}
    assert sorted(records) == ["test", "val"]  # every evaluation split of the synthetic RRSIS-D
    sha = hashlib.sha256((out / "train" / "checkpoint_best.pth").read_bytes()).hexdigest()
    table = (out / "table.md").read_text()
    assert table.strip() in reproduced["log"]  # printed, and written to table.md
    rows = _table_rows(table)
    assert sorted(rows) == ["test", "val"]
    nonzero = 0
    for split, rec in records.items():
        assert rec["split"] == split and rec["protocol"] == {"name": "one-per-ref", "seed": 2401,
                                                             "description": results_lib.PROTOCOLS["one-per-ref"]}
        assert rec["checkpoint"]["sha256"] == sha and rec["config"]["model"] == "fianet" and rec["img_size"] == 48
        assert set(rec["metric_definitions"]) >= {"oIoU", "mIoU", "P@X"}
        assert rows[split] == [f"{100 * rec[m]:.2f}" for m in METRICS]
        nonzero += sum(rec[m] > 0 for m in METRICS)
        # The per-expression records are the numbers behind the summary.
        ex = rec["expressions"]
        assert len(ex) == rec["num_samples"] and all({"ref_id", "sent_index", "I", "U", "IoU"} <= set(e) for e in ex)
        cum_u = sum(e["U"] for e in ex)
        assert rec["oIoU"] == pytest.approx(sum(e["I"] for e in ex) / cum_u if cum_u else 0.0, abs=1e-12)
        assert rec["mIoU"] == pytest.approx(sum(e["IoU"] for e in ex) / len(ex), abs=1e-12)
    assert nonzero > 0, "all metrics are zero: the equality check above would be vacuous"
    # The published FIANet RRSIS-D test row sits beside ours.
    assert "| | published | 74.46 |" in table


def _load_test_py():
    spec = importlib.util.spec_from_file_location("openrrsis_test_entry", ROOT / "test.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_one_split_run_equals_its_part_of_the_all_splits_run(reproduced, tmp_path):
    test_py = _load_test_py()
    import args as args_lib

    res = tmp_path / "val.json"
    argv = ["--resume", str(reproduced["out"] / "train" / "checkpoint_best.pth"), "--dataset", "rrsisd",
            *reproduced["data_args"], *TINY, "--split", "val", "--eval_protocol", "one-per-ref",
            "--save_json", str(res), "--output-dir", str(tmp_path)]
    assert test_py.run(args_lib.get_parser().parse_args(argv)) == 0
    single = json.loads(res.read_text())
    together = json.loads((reproduced["out"] / "results" / "val.json").read_text())
    assert single["expressions"] == together["expressions"]
    for m in METRICS:
        assert single[m] == together[m]


def test_split_and_save_json_values_are_checked(tmp_path):
    with pytest.raises(results_lib.ResultsError, match="names a folder"):
        results_lib.json_targets(tmp_path / "r.json", ["val", "test"])
    assert results_lib.json_targets(tmp_path / "r", ["val", "test"]) == [tmp_path / "r" / "val.json",
                                                                       tmp_path / "r" / "test.json"]
    assert results_lib.json_targets(tmp_path / "r.json", ["val"]) == [tmp_path / "r.json"]
    for bad in ("", "val,", "all,test"):
        with pytest.raises(results_lib.ResultsError):
            results_lib.split_datasets(bad, "rrsisd", tmp_path, None, lambda s: s)
    assert results_lib.split_datasets("test,val,test", "rrsisd", tmp_path, None, lambda s: s.upper()) == \
        [("test", "TEST"), ("val", "VAL")]


@pytest.mark.parametrize("argv,expect", [
    (["nosuch", "rrsisd"], "no reference recipe"),
    (["fianet", "coco"], "is not one of"),
    (["rmsin", "rrsisd", "3"], "does not divide the reference total batch 8"),
    (["fianet", "rrsisd", "x"], "GPUS must be a positive integer"),
])
def test_reproduce_bad_arguments_give_one_line(argv, expect, tmp_path):
    proc = _reproduce(*argv, env=_env(REPRODUCE_DIR=str(tmp_path / "r")))
    err = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(err) == 1 and expect in err[0], proc.stderr
