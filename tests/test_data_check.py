"""``python -m data.check``: counts, counted warnings, --export round trip, one-line errors."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from test_datasets import RRSISD_REFS, all_sentences, write_refsegrs, write_rrsisd, write_vocab

from data import check

pytestmark = pytest.mark.usefixtures("nltk_data_dir")

ROOT = Path(__file__).resolve().parents[1]
EXPORT_KEYS_REFER = {"ref_id", "sent_index", "sentence", "input_ids", "attention_mask", "target_mask",
                     "position_mask", "mask_png"}


@pytest.fixture()
def env(tmp_path):
    write_vocab(tmp_path / "tok", all_sentences() + ["the ship"])
    return {"rrsisd": write_rrsisd(tmp_path / "rr"), "refsegrs": write_refsegrs(tmp_path / "rs"),
            "tok": tmp_path / "tok", "tmp": tmp_path}


def args_for(env, dataset, split, *extra):
    return ["--dataset", dataset, "--refer_data_root", str(env[dataset]), "--split", split,
            "--bert_tokenizer", str(env["tok"]), "--cache_dir", str(env["tmp"] / "cache"), *extra]


def test_counts_and_export_round_trip_rrsisd(env, capsys):
    out = env["tmp"] / "export"
    assert check.main(args_for(env, "rrsisd", "val", "--export", str(out))) == 0
    printed = capsys.readouterr().out
    assert "rrsisd val: refs 3, sentences 8, images 3" in printed and "no warnings" in printed
    records = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert len(records) == 8
    assert all(set(r) == EXPORT_KEYS_REFER for r in records)
    assert [(r["ref_id"], r["sent_index"]) for r in records] == [
        (11, 0), (11, 1), (11, 2), (12, 0), (12, 1), (13, 0), (13, 1), (13, 2)]
    first = records[0]
    assert first["sentence"] == "the airplane at the top"
    assert len(first["input_ids"]) == 22 and first["attention_mask"] == [1] * 7 + [0] * 15
    assert [i for i, v in enumerate(first["target_mask"]) if v] == [2]
    assert [i for i, v in enumerate(first["position_mask"]) if v] == [3, 4, 5]
    assert records[1]["mask_png"] == first["mask_png"] == "masks/ref_11.png"
    mask = np.array(Image.open(out / first["mask_png"]))
    assert mask.shape == (40, 50) and set(np.unique(mask).tolist()) == {0, 255}  # original resolution
    assert mask[5, 5] == 255 and mask[15, 25] == 0  # overlap of the two polygons is a hole
    assert len(list((out / "masks").glob("*.png"))) == 3


def test_export_refsegrs_uses_line_numbers(env, capsys):
    out = env["tmp"] / "export_rs"
    assert check.main(args_for(env, "refsegrs", "train", "--export", str(out))) == 0
    assert "refsegrs train: refs 3, sentences 3, images 3" in capsys.readouterr().out
    records = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert [r["line"] for r in records] == [0, 1, 3]
    assert all("ref_id" not in r and len(r["input_ids"]) == 20 for r in records)
    assert records[2]["mask_png"] == "masks/line_3.png"
    mask = np.array(Image.open(out / "masks" / "line_3.png"))
    assert mask.shape == (20, 24) and mask[:10].max() == 0 and mask[10:].min() == 255


def test_counted_warnings(env, capsys):
    refs = dict(RRSISD_REFS)
    refs[30] = ("test", ["the ship"], [], (50, 40), False)  # empty segmentation -> empty mask
    refs[31] = ("test", ["the vehicle on the left of the bridge near the ship at the top of the harbor"],
                [[1, 1, 9, 1, 9, 9, 1, 9]], (50, 40), False)
    write_vocab(env["tok"], all_sentences() + [s for r in refs.values() for s in r[1]])
    root = write_rrsisd(env["tmp"] / "warn", refs)
    images = root / "images" / "rrsisd" / "JPEGImages"
    (images / "1020.png").unlink()                                  # missing
    (images / "1030.png").write_bytes(b"garbage")                   # unreadable
    Image.new("RGB", (8, 8)).save(images / "1031.png")              # size differs from annotation
    env = {**env, "rrsisd": root}
    assert check.main(args_for(env, "rrsisd", "test", "--max_tokens", "12")) == 0
    printed = capsys.readouterr().out
    assert "rrsisd test: refs 3, sentences 3, images 3" in printed
    assert "missing images: 1" in printed and "1020.png" in printed
    assert "unreadable images: 1" in printed and "1030.png" in printed
    assert "images whose size differs from the annotation: 1" in printed
    assert "empty masks: 1 (e.g. ref_30)" in printed
    assert "sentences truncated at 12 tokens: 1" in printed
    assert "word-mask flags clipped at 12 tokens: 1" in printed


@pytest.mark.parametrize("mutate,needle", [
    (lambda a, e: a.__setitem__(3, str(e["tmp"] / "nowhere")), "nowhere"),
    (lambda a, e: a.__setitem__(5, "bogus"), "bogus"),
    (lambda a, e: a.__setitem__(7, str(e["tmp"])), "--bert_tokenizer"),
    (lambda a, e: a.__setitem__(5, "val,test") or a.extend(["--export", str(e["tmp"] / "x")]), "exactly one split"),
    (lambda a, e: a.__setitem__(1, "referit"), "invalid choice"),
    (lambda a, e: a.__setitem__(1, "refcoco"), "refcoco/refs(unc).p"),
    (lambda a, e: a.__delitem__(slice(6, 8)), "--bert_tokenizer"),
])
def test_bad_input_exit_2_one_line(env, capsys, mutate, needle):
    argv = args_for(env, "rrsisd", "val")
    mutate(argv, env)
    code = _run_main(argv)
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1 and needle in err and "Traceback" not in err


def _run_main(argv):
    try:
        return check.main(argv)
    except SystemExit as exc:  # argparse errors
        return exc.code


def test_cli_subprocess_error_has_no_traceback(env):
    env_vars = {**os.environ, "NLTK_DATA": os.environ.get("NLTK_DATA", "")}
    proc = subprocess.run([sys.executable, "-m", "data.check", *args_for(env, "refsegrs", "testB")],
                          cwd=ROOT, capture_output=True, text=True, env=env_vars, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and "testB" in proc.stderr and "Traceback" not in proc.stderr
