"""TRIS stage-1 training (Liu et al., ICCV 2023): the calibration losses with the frozen CLIP ViT,
the calibrator's isolation from the trained network, hard negatives in the datasets, the
parameter-group learning rates and the stage-2 per-epoch schedule, and train.py end to end on
generated data (tiny configs, a seeded random ViT calibrator)."""
from __future__ import annotations

import argparse
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import args as args_lib
import engine
import train as train_lib
from lib import registry, tris
from lib.clip import FrozenCLIP, clip_config

SIZE = 64


def _tiny(name: str = "tris_stage1", **options) -> torch.nn.Module:
    torch.manual_seed(0)
    return registry.build_model(registry.tiny_model_config(name, img_size=SIZE, **options))


def _batch(b: int = 2, k: int = 3, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)

    def ids(*shape):  # SOT, body, EOT (the largest id), zero padding, as clip.tokenize()[:20]
        t = torch.zeros(*shape, 20, dtype=torch.long)
        t[..., 0] = 49406
        t[..., 1:6] = torch.randint(300, 40000, (*shape, 5), generator=g)
        t[..., 6] = 49407
        return t

    return {"image": torch.randn(b, 3, SIZE, SIZE, generator=g), "text": ids(b), "neg_text": ids(b, k)}


# --------------------------------------------------------------------------------------------
# Loss terms
# --------------------------------------------------------------------------------------------
def test_calibration_loss_terms_match_a_hand_computation():
    model = _tiny().train()
    batch = _batch()
    out = model(batch["image"], batch["text"])
    terms = model.loss(out, batch)
    assert set(terms) == {"loss_cls", "loss_pos", "loss_neg"}
    assert all(t.dtype == torch.float32 and t.dim() == 0 for t in terms.values())

    calib = model.calibrator
    with torch.no_grad():  # the reference's computation, one sample at a time
        cam = F.interpolate(out["sigmoid_map"], size=(224, 224), mode="bilinear", align_corners=True)
        img = F.interpolate(batch["image"], size=(224, 224), mode="bilinear", align_corners=True)
        pos, neg = [], []
        for i in range(2):
            e = calib.encode_image(cam[i:i + 1] * img[i:i + 1])
            e = e / e.norm(dim=-1, keepdim=True)
            t = calib.encode_text(batch["text"][i:i + 1])[1]
            pos.append((e * (t / t.norm(dim=-1, keepdim=True))).sum())
            tn = calib.encode_text(batch["neg_text"][i])[1]
            s_neg = e @ (tn / tn.norm(dim=-1, keepdim=True)).t()  # (1, K)
            neg.append(-torch.log(1 - s_neg).mean())
        l_pos = -torch.log(torch.stack(pos).clamp(1e-4, 0.9999)).mean()
        l_neg = torch.stack(neg).sum() / 2
        l_cls = F.multilabel_soft_margin_loss(out["cls"], torch.eye(2))
    assert abs(terms["loss_pos"].item() - 1.0 * l_pos.item()) < 1e-5
    assert abs(terms["loss_neg"].item() - 2.0 * l_neg.item()) < 1e-5
    assert abs(terms["loss_cls"].item() - 5.0 * l_cls.item()) < 1e-5
    assert all(torch.isfinite(t) for t in terms.values())

    # clip_similarity: (B, T) -> (B,), (B, K, T) -> (B, K), the same numbers
    with torch.no_grad():
        s1 = tris.clip_similarity(calib, batch["image"], out["sigmoid_map"], batch["text"])
        sk = tris.clip_similarity(calib, batch["image"], out["sigmoid_map"], batch["neg_text"])
        sk0 = tris.clip_similarity(calib, batch["image"], out["sigmoid_map"], batch["neg_text"][:, 0])
    assert s1.shape == (2,) and sk.shape == (2, 3)
    assert torch.allclose(s1, torch.stack(pos), atol=1e-6) and torch.allclose(sk[:, 0], sk0, atol=1e-6)


def test_loss_weights_drop_terms_and_negatives_need_neg_text():
    model = _tiny().train()
    batch = _batch()
    out = model(batch["image"], batch["text"])
    no_neg = {k: v for k, v in batch.items() if k != "neg_text"}
    assert set(model.loss(out, no_neg)) == {"loss_cls", "loss_pos"}  # the reference: negatives only if > 0
    model.config["loss_weights"] = {"cls": 5.0, "pos": 0.0, "neg": 2.0}
    assert set(model.loss(out, batch)) == {"loss_cls", "loss_neg"}
    with pytest.raises(ValueError, match="neg_text must be"):
        model.loss(out, {**batch, "neg_text": batch["neg_text"][:, :, :10]})


def test_negative_cosine_of_one_is_not_clamped():
    """As the reference: -log(1 - s) without a clamp, so s = 1 is +inf (train.py's finite check stops)."""
    cos = torch.tensor([[1.0, 0.5]])
    value = -torch.log(1 - cos).mean()
    assert torch.isinf(value)
    model = _tiny().train()
    batch = _batch(k=1)
    out = model(batch["image"], batch["text"])

    class Aligned(torch.nn.Module):  # the image embedding equals every text embedding
        visual = model.calibrator.visual

        def encode_image(self, x):
            return torch.ones(x.shape[0], 4) + 0 * x.sum()

        def encode_text(self, ids):
            return None, torch.ones(ids.shape[0], 4)

    object.__setattr__(model, "_calibrator", Aligned())
    terms = model.loss(out, batch)
    assert not torch.isfinite(terms["loss_neg"])
    assert torch.isfinite(terms["loss_pos"])  # the positive term is clamped


# --------------------------------------------------------------------------------------------
# The calibrator's isolation
# --------------------------------------------------------------------------------------------
def test_calibrator_gets_no_gradient_no_state_dict_entry_no_optimiser_slot():
    model = _tiny().train()
    keys_before = set(model.state_dict())
    calib = model.calibrator
    assert isinstance(calib, FrozenCLIP) and set(model.state_dict()) == keys_before
    assert not any(p is q for p in calib.parameters() for q in model.parameters())
    assert all(not p.requires_grad for p in calib.parameters()) and not calib.training
    batch = _batch()
    out = model(batch["image"], batch["text"])
    terms = model.loss(out, batch)
    (terms["loss_pos"] + terms["loss_neg"]).backward()
    assert all(p.grad is None for p in calib.parameters())
    assert model.vis_project.weight.grad is not None and model.vis_project.weight.grad.abs().sum() > 0
    assert model.backbone.visual.conv1.weight.grad.abs().sum() > 0  # through the map into the RN50
    model.train()
    calib.train()
    assert not calib.training and all(not m.training for m in calib.modules())
    args = argparse.Namespace(lr=1e-3, weight_decay=0.01, amsgrad=False, amp="off", lr_multi=None)
    optimizer, _, _ = train_lib.build_optimiser(model, args, torch.device("cpu"), 10)
    in_opt = {id(p) for g in optimizer.param_groups for p in g["params"]}
    assert not in_opt & {id(p) for p in calib.parameters()} and id(model.logit_scale) not in in_opt
    model.double()  # follows the model's device, stays float32
    assert model.calibrator is calib and calib.visual.conv1.weight.dtype == torch.float32


def test_random_calibrator_is_seeded_and_leaves_the_global_rng_alone():
    torch.manual_seed(123)
    state = torch.get_rng_state()
    a = tris.build_calibrator(tris.calibration_config(random_init=True))
    assert torch.equal(torch.get_rng_state(), state)
    b = _tiny().calibrator
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    cfg = registry.tiny_model_config("tris_stage1")
    assert cfg["calibration"]["random_init"] and "random" in cfg["calibration"]["note"]


@pytest.mark.filterwarnings("ignore:`torch.jit:FutureWarning")  # writing a TorchScript archive warns
def test_calibrator_from_a_file_and_one_line_errors(tmp_path):
    vit_cfg = clip_config("ViT-B/32", vision_layers=1, vision_width=64, embed_dim=32, transformer_width=64,
                          transformer_heads=1, transformer_layers=1)
    torch.manual_seed(5)
    src = FrozenCLIP(vit_cfg)
    path = tmp_path / "vit.pt"
    torch.save(src.state_dict(), path)
    model = _tiny()
    model.prepare_training(calibrator=str(path))
    assert model.config["calibration"]["weights"] == str(path) and not model.config["calibration"]["random_init"]
    got = model.calibrator.state_dict()
    assert all(torch.equal(v, got[k]) for k, v in src.state_dict().items())

    rn = tmp_path / "rn.pt"
    torch.save(FrozenCLIP(clip_config("RN50", vision_layers=[1, 1, 1, 1], vision_width=8, embed_dim=16,
                                      transformer_width=64, transformer_layers=1)).state_dict(), rn)
    with pytest.raises(tris.CalibratorUnavailableError, match="not a ViT"):
        _tiny().prepare_training(calibrator=str(rn))
    archive = tmp_path / "ViT-B-32.pt"  # a TorchScript archive is code: refused without the opt-in
    torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), str(archive))
    with pytest.raises(tris.CalibratorUnavailableError, match="TorchScript.*--allow_torchscript"):
        _tiny().prepare_training(calibrator=str(archive))
    with pytest.raises(tris.CalibratorUnavailableError, match="file not found"):
        _tiny().prepare_training(calibrator=str(tmp_path / "missing.pt"))
    # a config without a calibrator (the real size): training says which flag to give
    real = registry.build_model(tris.build_config("tris_stage1", **{**tris._TINY, "calibrator": ""}))
    with pytest.raises(tris.CalibratorUnavailableError, match="--clip_vitb32") as exc:
        real.prepare_training()
    assert "\n" not in str(exc.value)
    real.eval()
    b = _batch()
    with torch.no_grad():  # evaluation never needs it
        assert real(b["image"], b["text"]).shape == (2, 1, SIZE, SIZE)


# --------------------------------------------------------------------------------------------
# Optimiser and schedule
# --------------------------------------------------------------------------------------------
def test_group_learning_rates_follow_lr_scale_and_lr_multi():
    for name in ("tris_stage1", "tris_stage2"):
        model = _tiny(name)
        args = argparse.Namespace(lr=5e-5, weight_decay=0.01, amsgrad=False, amp="off", lr_multi=None)
        optimizer, scheduler, _ = train_lib.build_optimiser(model, args, torch.device("cpu"), 10)
        assert [g["lr"] for g in optimizer.param_groups] == pytest.approx([5e-6, 5e-5])
        assert scheduler.base_lrs == pytest.approx([5e-6, 5e-5])
        args.lr_multi = 0.5
        optimizer, _, _ = train_lib.build_optimiser(model, args, torch.device("cpu"), 10)
        assert [g["lr"] for g in optimizer.param_groups] == pytest.approx([2.5e-5, 5e-5])
    assert registry.model_spec("tris_stage2").schedule_step == "epoch"
    assert registry.model_spec("tris_stage1").schedule_step == "iteration"
    assert registry.model_spec("lavt").schedule_step == "iteration"


def test_recipes_are_the_reference_scripts(capsys):
    for name, negatives in (("tris_stage1", 3), ("tris_stage2", None)):
        r = registry.model_spec(name).recipe("refcocog")
        assert (r.lr, r.epochs, r.batch_size, r.gpus, r.weight_decay, r.seed) == (5e-5, 15, 48, 1, 0.01, 1234)
        assert r.as_flags().get("negative_samples") == negatives
    from tools import recipe

    for name in ("tris_stage1", "tris_stage2"):
        assert recipe.main([name, "refcoco"]) == 0
        assert capsys.readouterr().out.split() == ["REF_GPUS=1", "TOTAL=48", "PROTOCOL=all", "IMG_SIZE=320"]


# --------------------------------------------------------------------------------------------
# Hard negatives in the datasets
# --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    from data.synthetic import generate

    out = tmp_path_factory.mktemp("tris_synth")
    three = generate(out / "three", seed=1, num_images=4, num_val=2, num_test=2, image_size=48, layouts=["refcoco"])
    one = generate(out / "one", seed=2, num_images=4, num_val=2, num_test=2, image_size=48, layouts=["refcoco"],
                   refs_per_image=1)
    return {"three": three["refcoco"], "one": one["refcoco"], "cache": out / "cache"}


def _dataset(root, cache, negatives=3, mode="train"):
    from data.datasets import build_dataset

    return build_dataset("refcoco", root, "train", "clip", img_size=32, mode=mode, cache_dir=cache,
                         word_masks=False, negative_samples=negatives)


def _rows_of(ds, neg_text):
    """The sample rows whose token ids equal each negative (a set per negative)."""
    table = ds._text["text"]
    return [{int(r) for r in torch.nonzero((table == n).all(1)).flatten()} for n in neg_text]


def test_negatives_come_from_other_refs_of_the_same_image(synth):
    ds = _dataset(synth["three"], synth["cache"])
    assert all(ds._same_image)  # the generator describes every image with several refs
    np.random.seed(0)
    for index in range(len(ds)):
        item = ds[index]
        assert item["neg_text"].shape == (3, 20) and item["neg_text"].dtype == torch.int64
        for rows in _rows_of(ds, item["neg_text"]):
            assert rows, "a negative is not a sentence of the split"
            # some sample with these ids is another ref of the same image
            assert any(ds.samples[r].image_path == ds.samples[ds.groups[index][0]].image_path
                       and ds.samples[r].ref_id != item["ref_id"] for r in rows)
    np.random.seed(7)
    a = ds[1]["neg_text"]
    np.random.seed(7)
    assert torch.equal(a, ds[1]["neg_text"])  # deterministic under a seed
    assert "neg_text" not in _dataset(synth["three"], synth["cache"], negatives=0)[0]


def test_negatives_fall_back_to_other_sentences_of_the_split(synth):
    ds = _dataset(synth["one"], synth["cache"])
    assert not any(ds._same_image)  # one ref per image
    # make half of the refs say the same as ref 0, so the string rejection has to work
    same = ds.samples[ds.groups[0][0]].sentence
    for g in range(0, len(ds.groups), 2):
        for r in ds.groups[g]:
            ds.samples[r] = ds.samples[r]._replace(sentence=same)
    np.random.seed(1)
    drawn = [r for _ in range(50) for r in ds._negative_rows(0, same)]
    assert len(drawn) == 150 and all(ds.samples[r].sentence != same for r in drawn)
    assert {ds.samples[r].group for r in drawn} <= set(range(1, len(ds.groups), 2))
    from data.datasets import DatasetError

    for r in range(len(ds.samples)):
        ds.samples[r] = ds.samples[r]._replace(sentence=same)
    with pytest.raises(DatasetError, match="no negative sentence"):
        ds.set_negative_samples(3)
    with pytest.raises(DatasetError, match="train mode only"):
        _dataset(synth["one"], synth["cache"], mode="eval")


# --------------------------------------------------------------------------------------------
# train.py end to end (tiny configs through the registry)
# --------------------------------------------------------------------------------------------
def _train(monkeypatch, root, cache, out, *extra):
    monkeypatch.setattr(engine, "config_from_args",
                        lambda a: registry.tiny_model_config(a.model, img_size=a.img_size))
    argv = ["--dataset", "refcoco", "--refer_data_root", str(root), "--cache_dir", str(cache), "--img_size",
            str(SIZE), "--workers", "0", "--device", "cpu", "-b", "4", "--max_steps", "2", "--no_val",
            "--print-freq", "1", "--output-dir", str(out), *extra]
    args = args_lib.get_parser().parse_args(argv)
    engine.resolve_args(args, args.model)
    return train_lib.train(args), args


def test_train_stage1_logs_the_three_terms_and_resumes(synth, tmp_path, monkeypatch):
    out = tmp_path / "s1"
    rc, args = _train(monkeypatch, synth["three"], synth["cache"], out, "--model", "tris_stage1", "--epochs", "1")
    assert rc == 0 and args.negative_samples == 3 and args.lr == 5e-5
    log = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]
    assert {"train_loss_cls", "train_loss_pos", "train_loss_neg"} <= set(log[0])
    ck = torch.load(out / "checkpoint_last.pth", weights_only=True)
    assert ck["lr_scheduler"]["last_epoch"] == 2  # stepped every iteration
    assert not any("calibrator" in k for k in ck["model"])
    assert set(ck["model"]) == set(_tiny().state_dict())
    rc, _ = _train(monkeypatch, synth["three"], synth["cache"], out, "--model", "tris_stage1", "--epochs", "2",
                   "--resume", str(out / "checkpoint_last.pth"))
    log = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]
    ck = torch.load(out / "checkpoint_last.pth", weights_only=True)
    assert rc == 0 and [r["epoch"] for r in log] == [0, 1] and ck["lr_scheduler"]["last_epoch"] == 4
    assert all(np.isfinite(r["train_loss_neg"]) for r in log)


def test_train_stage2_steps_the_schedule_once_per_epoch(synth, tmp_path, monkeypatch):
    out = tmp_path / "s2"
    rc, _ = _train(monkeypatch, synth["three"], synth["cache"], out, "--model", "tris_stage2", "--epochs", "1",
                   "--lr", "1e-3")
    assert rc == 0
    ck = torch.load(out / "checkpoint_last.pth", weights_only=True)
    assert ck["lr_scheduler"]["last_epoch"] == 1  # 2 iterations, one step after the epoch
    factor = (1 - 1 / 2) ** 0.9
    assert [g["lr"] for g in ck["optimizer"]["param_groups"]] == pytest.approx([1e-4 * factor, 1e-3 * factor])
    log = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]
    assert log[0]["train_lr"] == pytest.approx(1e-4)  # constant within the epoch
    assert "train_loss_neg" not in log[0]


def test_train_stage1_without_a_calibrator_is_one_line(monkeypatch):
    """What train.py does at the real size (a config naming no calibrator file), on the tiny network."""
    no_calibrator = tris.build_config("tris_stage1", **{**tris._TINY, "calibrator": ""})
    monkeypatch.setattr(engine, "config_from_args", lambda a: no_calibrator)
    args = args_lib.get_parser().parse_args(["--model", "tris_stage1", "--dataset", "refcoco", "--device", "cpu"])
    engine.resolve_args(args, args.model)
    info = argparse.Namespace(is_main=False)
    with pytest.raises(engine.UserError, match="--clip_vitb32") as exc:
        train_lib.build_model(args, info, None)
    assert "\n" not in str(exc.value)
