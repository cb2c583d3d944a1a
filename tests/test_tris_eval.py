"""TRIS evaluated as its paper does (ground truth at the original resolution, Hit / PointM), the
--clip_weights / --allow_torchscript flags, and demo.py --heatmap.

The hand-computed case: a 3 x 3 logit map with 2.5 in the centre and -1 elsewhere, upsampled
bilinearly (align_corners=True), equals ``-1 + 3.5 * wy * wx`` with ``wy, wx`` the centre's
interpolation weights, so it is positive where ``wy * wx > 1 / 3.5`` and peaks at the centre.
"""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from conftest import tiny_checkpoint
from PIL import Image
from test_entrypoints import run, synth  # noqa: F401  (session fixture)
from torch import nn

import engine
import utils
from lib import registry
from lib.spec import ModelSpec, Recipe, resize_logits

pytestmark = pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning", "ignore:`torch.jit:FutureWarning")


def _spec(original: bool) -> ModelSpec:
    return ModelSpec(target="x:Y", build_config=lambda name, **o: {"model": name},
                     recipes={"*": Recipe(lr=1e-4, epochs=1, batch_size=2, max_tokens=20)},
                     inputs=("image",), eval_at_original_resolution=original)


class _PeakModel(nn.Module):
    """Every sample's output is the same (1, 3, 3) logit map: 2.5 in the centre, -1 elsewhere."""

    def __init__(self, original: bool):
        super().__init__()
        self.spec = _spec(original)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        m = torch.full((image.shape[0], 1, 3, 3), -1.0)
        m[:, :, 1, 1] = 2.5
        return m

    def predict_mask(self, outputs, size):
        return resize_logits(outputs, size)[:, 0] > 0

    def predict_scores(self, outputs, size):
        return torch.sigmoid(resize_logits(outputs, size)[:, 0])


class _Originals(torch.utils.data.Dataset):
    """Two items whose ground truth lives at (5, 9) and (9, 5); the input target is an unrelated 8 x 8."""

    def __init__(self):
        a = np.zeros((5, 9), np.uint8)
        a[1:4, 4:9] = 1  # 15 px, 7 of them on the 11-px prediction at (5, 9)
        b = np.zeros((9, 5), np.uint8)
        b[4, 0] = b[4, 4] = 1  # off the prediction; its tight box contains the arg-max (4, 2)
        self.masks = [a, b]
        self.boxes = [[0.0, 0.0, 3.0, 3.0], None]  # COCO x, y, w, h: misses the arg-max (2, 4)

    def __len__(self) -> int:
        return 2

    def __getitem__(self, i: int) -> dict:
        target = torch.zeros(8, 8, dtype=torch.int64)
        target[:4, :4] = 1
        return {"image": torch.zeros(3, 8, 8), "target": target, "index": i, "category": "thing",
                "ref_id": i, "line": -1, "sent_index": 0, "sentence": "s"}

    def sample_index(self, i: int) -> int:
        return i

    def original_mask(self, row: int) -> np.ndarray:
        return self.masks[row]

    def original_box(self, row: int):
        return self.boxes[row]


def _evaluate(original: bool, seen: list | None = None) -> dict:
    loader = torch.utils.data.DataLoader(_Originals(), batch_size=2)
    hook = (lambda batch, pred, iou: seen.append((batch, pred, iou))) if seen is not None else None
    return engine.evaluate(_PeakModel(original), loader, torch.device("cpu"), on_batch=hook, show_progress=False)


def test_original_resolution_metrics_hand_computed():
    seen: list = []
    s = _evaluate(True, seen)
    # (5, 9): prediction 5 + 3 + 3 = 11 px, GT 15, I = 7, U = 19. (9, 5): prediction 11 px, I = 0, U = 13.
    assert s["mIoU"] == pytest.approx((7 / 19 + 0) / 2) and s["oIoU"] == pytest.approx(7 / 32)
    assert s["P@0.5"] == 0.0 and s["num_samples"] == 2 and s["resolution"] == "original"
    # arg-max (2, 4) is on mask a but outside its annotated box; (4, 2) is off mask b but inside its tight box
    assert s["Hit"] == pytest.approx(0.5) and s["PointM"] == pytest.approx(0.5) and s["num_points"] == 2
    assert s["per_category"]["thing"]["num_samples"] == 2
    # on_batch: one call per sample, target and image at the original size, IoU of that sample
    assert [tuple(b["target"].shape) for b, _, _ in seen] == [(1, 5, 9), (1, 9, 5)]
    assert [tuple(b["image"].shape[-2:]) for b, _, _ in seen] == [(5, 9), (9, 5)]
    assert [tuple(p.shape) for _, p, _ in seen] == [(1, 5, 9), (1, 9, 5)]
    assert float(seen[0][2][0]) == pytest.approx(7 / 19) and int(seen[1][0]["index"][0]) == 1
    assert "Hit" in utils.format_results_table(s) and "original resolution" in utils.format_results_table(s)


def test_default_path_unchanged_at_input_size():
    s = _evaluate(False)
    # At 8 x 8: x = c * 2 / 7, positive where wy * wx > 1 / 3.5 -> rows / cols 2..5 with corners cut.
    pred = resize_logits(_PeakModel(False)(torch.zeros(1, 3, 8, 8)), (8, 8))[0, 0] > 0
    gt = torch.zeros(8, 8, dtype=torch.bool)
    gt[:4, :4] = True
    inter, union = int((pred & gt).sum()), int((pred | gt).sum())
    assert s["mIoU"] == pytest.approx(inter / union) and "Hit" not in s and "resolution" not in s


def test_mask_box_and_jet_heatmap():
    m = torch.zeros(6, 7, dtype=torch.bool)
    m[2, 3] = m[4, 5] = True
    assert utils.mask_box(m) == (3, 2, 5, 4) and utils.mask_box(torch.zeros(3, 3)) is None
    lut = utils.jet(np.array([[0.0, 0.5, 1.0, 7.0]]))[0]
    assert lut[0].tolist() == [0, 0, 128] and lut[2].tolist() == [128, 0, 0] and lut[3].tolist() == [128, 0, 0]
    assert lut[1][1] == 255 and lut[1][0] > 100 and lut[1][2] > 100  # green in the middle, cyan-yellow mix
    pic = np.full((1, 4, 3), 100, np.uint8)
    out = utils.heatmap_overlay(pic, np.array([[0.0, 1.0, 1.0, 0.0]]))
    assert out[0, 0].tolist() == [60, 60, round(60 + 0.4 * 128)] and out[0, 1].tolist() == [round(60 + 0.4 * 128), 60, 60]
    with pytest.raises(ValueError, match="differ in size"):
        utils.heatmap_overlay(pic, np.zeros((2, 2)))


# ------------------------------------------------------------------------------ --clip_weights
@pytest.fixture(scope="module")
def tiny_tris_and_clip_files(tmp_path_factory):
    from test_clip import _Traceable

    torch.manual_seed(1)
    model = registry.build_model(registry.tiny_model_config("tris_stage1"))
    torch.manual_seed(2)
    source = registry.build_model(registry.tiny_model_config("tris_stage1")).backbone.eval()
    d = tmp_path_factory.mktemp("clipw")
    torch.save(source.state_dict(), d / "plain.pt")
    archive = torch.jit.trace(_Traceable(source).eval(), torch.randn(1, 3, 64, 64))
    torch.jit.save(archive, str(d / "RN50.pt"))
    return model, source.state_dict(), d


def test_clip_weights_load_through_engine(tiny_tris_and_clip_files):
    model, expected, d = tiny_tris_and_clip_files
    for name, opt_in in (("plain.pt", False), ("RN50.pt", True)):
        for p in model.backbone.parameters():
            p.data.zero_()
        loaded = engine.load_pretrained(model, "", "", verbose=False, clip_path=str(d / name), allow_torchscript=opt_in)
        assert len(loaded) == len(expected) and all(k.startswith("backbone.") for k in loaded)
        got = model.backbone.state_dict()
        assert all(torch.equal(got[k], v) for k, v in expected.items()), name


def test_clip_weights_errors(tiny_tris_and_clip_files, tmp_path):
    model, _, d = tiny_tris_and_clip_files
    with pytest.raises(engine.UserError, match="TorchScript archive") as exc:
        engine.load_pretrained(model, "", "", clip_path=str(d / "RN50.pt"))
    assert "\n" not in str(exc.value) and str(exc.value).startswith(f"--clip_weights {d / 'RN50.pt'}")
    with pytest.raises(engine.UserError, match="file not found"):
        engine.load_pretrained(model, "", "", clip_path=str(tmp_path / "missing.pt"))
    with pytest.raises(engine.UserError, match="no CLIP backbone"):
        engine.load_pretrained(nn.Linear(2, 2), "", "", clip_path=str(d / "plain.pt"))
    other = registry.build_model(registry.tiny_model_config("tris_stage1", clip_overrides={
        "vision_layers": [1, 1, 1, 1], "transformer_width": 32, "transformer_heads": 1, "transformer_layers": 1}))
    with pytest.raises(engine.UserError, match="strict checkpoint load failed"):
        engine.load_pretrained(other, "", "", clip_path=str(d / "plain.pt"))


def test_train_py_reads_clip_weights_flag(tmp_path, synth):  # noqa: F811
    # no --ck_bert folder: a CLIP model needs none
    proc = run("train.py", "--model", "tris_stage1", "--dataset", "refcoco", "--refer_data_root",
               str(synth["refcoco"]), "--clip_weights", str(tmp_path / "nope.pt"), "--workers", "0",
               "--device", "cpu", "--epochs", "1", "--output-dir", str(tmp_path / "out"),
               "--cache_dir", str(tmp_path / "cache"), check=False)
    assert proc.returncode == 2 and f"--clip_weights {tmp_path / 'nope.pt'}: file not found" in proc.stderr


# ------------------------------------------------------------------------------ test.py and demo.py
def test_test_py_reports_hit_pointm_and_demo_heatmap(synth, tmp_path):  # noqa: F811
    ckpt = tiny_checkpoint("tris_stage2", tmp_path / "tris2.pth", {"dataset": "refcoco", "img_size": 96})
    model = engine.model_from_checkpoint(engine.read_checkpoint(str(ckpt)), str(ckpt))
    res = tmp_path / "res.json"
    common = ["--dataset", "refcoco", "--refer_data_root", str(synth["refcoco"]), "--cache_dir",
              str(tmp_path / "cache"), "--workers", "0", "--device", "cpu"]
    proc = run("test.py", "--resume", str(ckpt), *common, "--split", "val", "--save_json", str(res))
    assert "ground truth at the original resolution" in proc.stdout and "PointM" in proc.stdout
    rec = json.loads(res.read_text())
    assert rec["resolution"] == "original" and 0 <= rec["Hit"] <= 1 and 0 <= rec["PointM"] <= 1
    assert rec["num_points"] == rec["num_samples"]
    # per-expression I / U are counted at the original size (the synthetic images are 64 x 64, the input 96)
    cum_i, cum_u = sum(e["I"] for e in rec["expressions"]), sum(e["U"] for e in rec["expressions"])
    assert rec["oIoU"] == pytest.approx(cum_i / cum_u) and max(e["U"] for e in rec["expressions"]) > 0

    # An independent check of the first expression: upsampled main logits against the original mask.
    from data import datasets
    from data.tokenizer import clip_name

    ds = datasets.build_dataset("refcoco", synth["refcoco"], "val", clip_name(None), img_size=96, max_tokens=20,
                                mode="eval", word_masks=False, cache_dir=tmp_path / "cache",
                                mean=model.spec.mean, std=model.spec.std)
    item = ds[0]
    with torch.no_grad():
        logits = model.eval()(image=item["image"][None], text=torch.as_tensor(item["text"])[None])
    gt = torch.as_tensor(ds.get_original_mask(0))
    ref = utils.evaluate_at_original_resolution(model.main_logits(logits)[0], gt)
    first = rec["expressions"][0]
    assert first["index"] == 0 and math.isclose(first["IoU"], ref["iou"], abs_tol=0.02)

    img = next((synth["refcoco"] / "images").rglob("*.jpg"))
    out = tmp_path / "demo"
    run("demo.py", "--resume", str(ckpt), "--img", str(img), "--text", "the big ship", "--out", str(out),
        "--device", "cpu", "--heatmap")
    (heat,) = out.glob("*_heatmap.png")
    picture = np.asarray(Image.open(img).convert("RGB"))
    drawn = np.asarray(Image.open(heat))
    assert drawn.shape == picture.shape and not np.array_equal(drawn, picture)
    assert json.loads((out / "demo.json").read_text())[0]["heatmap"] == str(heat)


def test_tris_specs_ask_for_original_resolution():
    assert registry.model_spec("tris_stage1").eval_at_original_resolution
    assert registry.model_spec("tris_stage2").eval_at_original_resolution
    assert not registry.model_spec("fianet").eval_at_original_resolution


def test_clip_model_options_need_no_bert_folder(tmp_path):
    import args as args_lib

    a = args_lib.get_parser().parse_args(["--model", "tris_stage2", "--ck_bert", str(tmp_path / "none")])
    assert engine.model_options(a)["bert"] == ""
    a.model = "fianet"
    with pytest.raises(engine.UserError, match="no config.json"):
        engine.model_options(a)
