"""LGFormer and TRIS through the entry points, on generated data (RefCOCO layout), with nothing
model-specific in train.py / test.py / demo.py: LGFormer trains with train.py's generic flags; a
tiny TRIS checkpoint (CLIP BPE tokens, no BERT folder needed) evaluates with test.py and runs in
demo.py."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import tiny_checkpoint
from PIL import Image
from test_entrypoints import TINY, data_args, run, synth  # noqa: F401  (session fixture)


@pytest.fixture(scope="module")
def lgformer_run(synth, tmp_path_factory):  # noqa: F811
    out = tmp_path_factory.mktemp("lgformer")
    run("train.py", "--model", "lgformer", *data_args(synth, "refcoco"), *TINY, "--epochs", "1", "-b", "4",
        "--output-dir", str(out))
    return out


def test_lgformer_train_test_demo_on_refcoco_layout(lgformer_run, synth, tmp_path):  # noqa: F811
    ck = torch.load(lgformer_run / "checkpoint_best.pth", weights_only=True)
    assert ck["config"]["model"] == "lgformer" and ck["frozen"] is not None
    log = [json.loads(x) for x in (lgformer_run / "log.jsonl").read_text().splitlines()]
    assert {"train_bce_0", "train_loss"} <= set(log[0])  # every decoder layer's mask loss, logged by name
    res = tmp_path / "res.json"
    run("test.py", "--resume", str(lgformer_run / "checkpoint_best.pth"), *data_args(synth, "refcoco"),
        "--workers", "0", "--device", "cpu", "--split", "val", "--save_json", str(res))
    summary = json.loads(res.read_text())
    assert summary["num_samples"] > 0 and 0.0 <= summary["mIoU"] <= 1.0
    img = next((synth["refcoco"] / "images").rglob("*.jpg"))
    out = tmp_path / "demo"
    run("demo.py", "--resume", str(lgformer_run / "checkpoint_best.pth"), "--img", str(img),
        "--text", "the red car on the left", "--out", str(out), "--device", "cpu")
    (mask_file,) = out.glob("*_mask.png")
    assert np.asarray(Image.open(mask_file)).shape == np.asarray(Image.open(img)).shape[:2]


@pytest.mark.parametrize("name", ["tris_stage1", "tris_stage2"])
def test_tris_checkpoint_evaluates_with_clip_tokens(name, synth, tmp_path):  # noqa: F811
    ckpt = tiny_checkpoint(name, tmp_path / f"{name}.pth", {"dataset": "refcoco", "img_size": 64})
    res = tmp_path / "res.json"
    # No --bert_tokenizer: the spec says CLIP BPE, read from the copy open_clip_torch ships.
    proc = run("test.py", "--resume", str(ckpt), "--dataset", "refcoco", "--refer_data_root", str(synth["refcoco"]),
               "--cache_dir", str(tmp_path / "cache"), "--workers", "0", "--device", "cpu", "--split", "val",
               "--save_json", str(res))
    summary = json.loads(res.read_text())
    assert summary["num_samples"] > 0 and "64x64" in proc.stdout
    img = next((synth["refcoco"] / "images").rglob("*.jpg"))
    out = tmp_path / "demo"
    run("demo.py", "--resume", str(ckpt), "--img", str(img), "--text", "the big ship", "--out", str(out),
        "--device", "cpu")
    assert len(list(out.glob("*_overlay.png"))) == 1
