"""CPU inference options of test.py / demo.py / predict.py: ``--quantize int8`` (dynamic int8
nn.Linear layers), ``--channels_last`` and ``--inference_mode`` (on by default).

A random-initialised tiny FIANet checkpoint on a few generated synthetic images stands in for a
trained one (no training run): these tests check what the options do to a model and its numbers,
not how good the model is. The position word masks use the built-in POS tagger, so no NLTK data is
needed.
"""
from __future__ import annotations

import copy
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import ROOT
from PIL import Image
from torch import nn

import args as args_lib
import engine
from lib import registry
from lib.checkpoint import save_checkpoint

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

SIZE = 48
# Relative L2 error of int8 FIANet logits, ||int8 - fp32|| / ||fp32||. Measured on this machine
# (torch 2.14, x86 engine): random tiny FIANets 0.005-0.033 over four seeds (0.010 for the seed
# used below), lavt 0.0004-0.0014, rmsin 0.005-0.011; the QUICKSTART FIANet (trained) 0.002-0.007.
# Per-channel 8-bit weights (error <= range / 254 per output channel) and per-batch 8-bit inputs
# compound over the ~10 Linear layers of a block chain; 0.1 is 3x the worst measured case and
# leaves room for other CPUs' int8 kernels (AVX2 vs AVX-512 VNNI), while a broken quantisation
# (wrong scale, transposed weights) gives errors of order 1.
LOGIT_REL_TOL = 0.1
# Foreground probabilities of every registered tiny model: measured max |p_int8 - p_fp32| 0.001-0.019.
PROB_ABS_TOL = 0.1


def _load_entry(name: str):
    spec = importlib.util.spec_from_file_location(f"openrrsis_{name}_entry", ROOT / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict[str, Path]:
    """Synthetic RRSIS-D (a few 48 px images) and a random tiny FIANet checkpoint in train.py's format."""
    from data.synthetic import generate

    out = tmp_path_factory.mktemp("infer_opts")
    paths = generate(out / "data", seed=2, num_images=2, num_val=1, num_test=2, image_size=SIZE, layouts=("rrsisd",))
    torch.manual_seed(0)
    config = registry.tiny_model_config("fianet", img_size=SIZE)
    vocab = sum(1 for _ in open(Path(paths["bert"]) / "vocab.txt", encoding="utf-8"))
    config["bert"] = dict(config["bert"], vocab_size=max(vocab, config["bert"]["vocab_size"]))
    model = registry.build_model(config)
    ckpt = out / "checkpoint_best.pth"
    save_checkpoint(ckpt, {"model": model.state_dict(), "config": model.config,
                           "args": {"img_size": SIZE, "dataset": "rrsisd", "max_tokens": 12,
                                    "bert_tokenizer": str(paths["bert"])}})
    return {"ckpt": ckpt, "root": Path(paths["rrsisd"]), "bert": Path(paths["bert"]), "out": out}


def _test_argv(tiny, *extra: str) -> list[str]:
    return ["--resume", str(tiny["ckpt"]), "--dataset", "rrsisd", "--refer_data_root", str(tiny["root"]),
            "--bert_tokenizer", str(tiny["bert"]), "--ck_bert", str(tiny["bert"]), "--workers", "0",
            "--device", "cpu", "--cache_dir", str(tiny["out"] / "cache"), "--split", "test", *extra]


def _model(tiny) -> nn.Module:
    return engine.model_from_checkpoint(engine.read_checkpoint(str(tiny["ckpt"])), str(tiny["ckpt"]), None).eval()


def _batch(spec, seed: int = 0, size: int = SIZE) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    n = spec.text.context_length or 10
    text = torch.randint(5, 100, (2, n), generator=g)
    l_mask = torch.ones(2, n, dtype=torch.long)
    l_mask[1, n - 3:] = 0
    t_mask = torch.zeros_like(l_mask)
    t_mask[:, 2] = 1
    p_mask = torch.zeros_like(l_mask)
    p_mask[:, 3:5] = 1
    batch = {"image": torch.randn(2, 3, size, size, generator=g), "text": text, "l_mask": l_mask,
             "t_mask": t_mask, "p_mask": p_mask}
    return {k: batch[k] for k in spec.inputs}


# --------------------------------------------------------------------------------------------
def test_int8_through_test_py_quantizes_and_records_the_options(tiny, tmp_path, monkeypatch):
    monkeypatch.setenv("OPENRRSIS_POS_TAGGER", "builtin")
    test_py = _load_entry("test")
    seen = []
    original = engine.quantize_int8

    def spy(model):
        counts = original(model)
        seen.append((model, counts))
        return counts

    monkeypatch.setattr(engine, "quantize_int8", spy)
    results = {}
    for mode in ("off", "int8"):
        path = tmp_path / f"{mode}.json"
        argv = _test_argv(tiny, "--quantize", mode, "--save_json", str(path), "--output-dir", str(tmp_path))
        assert test_py.run(args_lib.get_test_parser().parse_args(argv)) == 0
        results[mode] = json.loads(path.read_text())
    assert len(seen) == 1  # only the int8 run quantised
    model, counts = seen[0]
    dynamic = [m for m in model.modules() if isinstance(m, torch.ao.nn.quantized.dynamic.Linear)]
    assert counts["quantized"] == len(dynamic) > 50 and counts["kept_float"] == 0
    assert not [m for m in model.modules() if type(m) is nn.Linear]  # FIANet: every Linear replaced
    assert results["int8"]["inference"] == {"quantize": "int8", "channels_last": "auto", "inference_mode": "on"}
    assert results["off"]["inference"] == engine.INFERENCE_DEFAULTS
    assert results["int8"]["num_samples"] == results["off"]["num_samples"] > 0
    for key in ("mIoU", "oIoU"):
        assert 0.0 <= results["int8"][key] <= 1.0


def test_int8_logits_are_close_to_float32(tiny):
    fp32 = _model(tiny)
    int8 = engine.prepare_for_inference(copy.deepcopy(fp32), torch.device("cpu"), quantize="int8")
    batch = _batch(fp32.spec)
    with torch.inference_mode():
        a = fp32.logits(fp32(**batch))
        b = int8.logits(int8(**batch))
    rel = ((b - a).norm() / a.norm()).item()
    assert 1e-6 < rel < LOGIT_REL_TOL, rel  # changed (int8 really ran) but close


@pytest.mark.parametrize("name", registry.available_models())
def test_every_registered_model_survives_quantize_and_forward(name):
    torch.manual_seed(0)
    model = registry.build_model(registry.tiny_model_config(name, img_size=64)).eval()
    batch = _batch(model.spec, size=64)
    with torch.inference_mode():
        ref = model.predict_scores(model(**batch), (64, 64))
    keep = engine.float_linear_names(model)
    counts = engine.quantize_int8(model)
    assert counts["quantized"] > 0
    # The Linear layers whose weights a functional op reads (CLIP's attention pooling) stay float.
    modules = dict(model.named_modules())
    assert all(type(modules[k]) is nn.Linear for k in keep) and counts["kept_float"] == len(keep)
    with torch.inference_mode():
        out = model.predict_scores(model(**batch), (64, 64))
    assert out.shape == ref.shape and torch.isfinite(out).all()
    assert (out - ref).abs().max().item() < PROB_ABS_TOL


def test_quantize_on_cuda_is_refused_with_one_line(tiny):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", "OPENRRSIS_POS_TAGGER": "builtin"}
    argv = _test_argv(tiny, "--quantize", "int8", "--output-dir", str(tiny["out"] / "cuda"))
    argv[argv.index("--device") + 1] = "cuda"
    proc = subprocess.run([sys.executable, str(ROOT / "test.py"), *argv], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: --quantize int8:") and "CPU only" in lines[0], lines
    # The resolved device (--device auto on a GPU machine) is checked again on the loaded model.
    with pytest.raises(engine.UserError, match="--quantize int8: .*CPU only"):
        engine.prepare_for_inference(_model(tiny), torch.device("cuda"), quantize="int8")
    with pytest.raises(engine.UserError, match="--quantize int8"):
        engine.check_quantize_device("int8", "cuda:1")
    engine.check_quantize_device("int8", "cpu")
    engine.check_quantize_device("off", "cuda")


def test_inference_mode_gives_the_masks_of_no_grad(tiny, monkeypatch):
    monkeypatch.setenv("OPENRRSIS_POS_TAGGER", "builtin")
    args = engine.resolve_args(args_lib.get_test_parser().parse_args(_test_argv(tiny, "--img_size", str(SIZE))),
                               "fianet")
    ds = engine.build_dataset(args, "test", mode="eval")
    model = _model(tiny)
    masks = {}
    for flag in (True, False):
        preds: list[torch.Tensor] = []
        loader = torch.utils.data.DataLoader(ds, batch_size=4)
        summary = engine.evaluate(model, loader, torch.device("cpu"), on_batch=lambda b, p, i, out=preds: out.append(p),
                                  show_progress=False, inference_mode=flag)
        masks[flag] = (torch.cat(preds), summary)
    assert torch.equal(masks[True][0], masks[False][0])
    assert masks[True][1]["mIoU"] == masks[False][1]["mIoU"]
    # Afterwards the model still trains (nothing of the inference-mode pass was kept in it).
    model.train()
    batch = {k: v for k, v in next(iter(torch.utils.data.DataLoader(ds, batch_size=2))).items()}
    sum(t.float() for t in model.loss(model(**engine.model_inputs(batch, model.spec.training_inputs)),
                                      batch).values()).backward()
    assert model.classifier.conv1_1.weight.grad is not None


def test_demo_and_predict_scorer_agree_across_the_options(tiny, tmp_path, monkeypatch):
    monkeypatch.setenv("OPENRRSIS_POS_TAGGER", "builtin")
    demo = _load_entry("demo")
    img = next((tiny["root"] / "images").rglob("*.jpg"))
    masks = {}
    for flags in (["--inference_mode", "on"], ["--inference_mode", "off"], ["--channels_last", "on"]):
        out = tmp_path / "_".join(flags)
        argv = ["--resume", str(tiny["ckpt"]), "--img", str(img), "--text", "the ship", "--out", str(out),
                "--device", "cpu", *flags]
        assert demo.run(args_lib.get_demo_parser().parse_args(argv)) == 0
        rec = json.loads((out / "demo.json").read_text())[0]
        masks[tuple(flags)] = np.array(Image.open(rec["mask"]))
    first = masks[("--inference_mode", "on")]
    assert np.array_equal(first, masks[("--inference_mode", "off")])
    # channels-last changes only the convolutions' summation order: at most a few border pixels.
    assert (first != masks[("--channels_last", "on")]).mean() < 0.01

    import predict as predict_mod

    tiles = np.asarray(Image.open(img).convert("RGB").resize((SIZE, SIZE)))[None]
    scores = {}
    for mode in ("on", "off"):
        scorer = predict_mod.TileScorer(str(tiny["ckpt"]), torch.device("cpu"), "off", inference_mode=mode)
        first_call = scorer.scores(tiles, "the ship")
        again = scorer.scores(tiles, "the ship")  # the cached tile and text tensors are reused
        assert np.array_equal(first_call, again)
        scores[mode] = first_call
    assert np.array_equal(scores["on"], scores["off"])
    int8 = predict_mod.TileScorer(str(tiny["ckpt"]), torch.device("cpu"), "off", quantize="int8")
    assert np.abs(int8.scores(tiles, "the ship") - scores["on"]).max() < PROB_ABS_TOL


def test_channels_last_switch_is_applied_or_refused():
    torch.manual_seed(0)
    lavt = registry.build_model(registry.tiny_model_config("lavt_one", img_size=64))
    engine.prepare_for_inference(lavt, torch.device("cpu"), channels_last="on")
    assert lavt.classifier.channels_last is True and not lavt.training
    engine.prepare_for_inference(lavt, torch.device("cpu"), channels_last="off")
    assert lavt.classifier.channels_last is False
    tris = registry.build_model(registry.tiny_model_config("tris_stage1", img_size=64))
    assert not hasattr(tris, "set_channels_last")
    with pytest.raises(engine.UserError, match="--channels_last on: the tris_stage1 model has no channels-last"):
        engine.prepare_for_inference(tris, torch.device("cpu"), channels_last="on")
    engine.prepare_for_inference(tris, torch.device("cpu"), channels_last="auto")  # auto applies to every model


def test_flags_are_defined_once_for_the_three_entry_points():
    for parser in (args_lib.get_test_parser(), args_lib.get_demo_parser(), args_lib.get_predict_parser()):
        dests = {a.dest: a.default for a in parser._actions}
        assert {k: dests[k] for k in engine.INFERENCE_DEFAULTS} == engine.INFERENCE_DEFAULTS
    assert "quantize" not in {a.dest for a in args_lib.get_parser()._actions}  # train.py has no such option
    assert engine.inference_options(args_lib.get_parser().parse_args([])) == engine.INFERENCE_DEFAULTS



def test_bench_quantize_option_is_applied_recorded_and_refused_where_it_does_not_apply(capsys):
    bench_dir = ROOT / "bench"
    if str(bench_dir) not in sys.path:
        sys.path.insert(0, str(bench_dir))
    import _common
    import _model
    import _report

    spec = importlib.util.spec_from_file_location("openrrsis_bench_run", bench_dir / "run.py")
    bench_run = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench_run)
    args = bench_run.get_parser().parse_args(["--setting", "tiny", "--quantize", "int8"])
    opts = bench_run.options(args)
    assert opts.quantize == "int8" and "--quantize int8" in bench_run.command_for(args, "lavt_one", "forward")
    assert "--quantize" not in bench_run.command_for(args, "lavt_one", "data")  # only forward / eval take it
    model = _model.build("lavt_one", "tiny", opts, torch.device("cpu"))[0]
    assert not [m for m in model.modules() if type(m) is nn.Linear]
    assert [m for m in model.modules() if isinstance(m, torch.ao.nn.quantized.dynamic.Linear)]
    rec = _common.base_record("lavt_one", "forward", "tiny", opts, 96, 12)
    assert rec["quantize"] == "int8" and "quantize=int8" in _report.options_label(rec)
    for argv in (["--what", "train"], ["--what", "forward", "--device", "cuda"]):
        assert bench_run.main(["--setting", "tiny", "--quantize", "int8", "--no-save", *argv]) == 2
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: --quantize int8"), lines
