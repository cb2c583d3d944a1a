"""tools.export: safetensors folders that load without pickle to the same logits."""
from __future__ import annotations

import json
import pickle

import pytest
import torch

import engine
from lib import checkpoint as ckpt_lib
from lib import registry
from lib.lavt import TINY_BERT
from tools import export

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def _inputs(model: torch.nn.Module, img: int, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    vocab = int(model.config["bert"]["vocab_size"])
    text = torch.randint(1, vocab, (2, 12), generator=g)
    mask = torch.ones(2, 12, dtype=torch.int64)
    mask[1, 8:] = 0
    out = {"image": torch.randn(2, 3, img, img, generator=g), "text": text, "l_mask": mask}
    if model.spec.text.word_masks:
        out["t_mask"] = (torch.rand(2, 12, generator=g) > 0.7).long()
        out["p_mask"] = (torch.rand(2, 12, generator=g) > 0.7).long()
    return out


def _logits(model: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        out = model(**inputs)
    return out[0] if isinstance(out, tuple) else out


class _NoPickle:
    """Makes every pickle / torch.load entry point fail while active."""

    def __init__(self, monkeypatch):
        def refuse(*a, **k):
            raise AssertionError("pickle used while loading an exported folder")

        for mod, name in ((torch, "load"), (pickle, "load"), (pickle, "loads"), (pickle, "Unpickler")):
            monkeypatch.setattr(mod, name, refuse)


@pytest.mark.parametrize("name", ["fianet", "lavt", "rmsin", "crossvlt"])
def test_exported_folder_gives_bit_identical_logits_without_pickle(name, tmp_path, monkeypatch):
    torch.manual_seed(0)
    cfg = registry.tiny_model_config(name, img_size=64)
    model = registry.build_model(cfg).eval()
    # Some buffers / parameters away from their init values, as after training.
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    ckpt = tmp_path / "checkpoint_best.pth"
    ckpt_lib.save_checkpoint(ckpt, {"format": "openrrsis-checkpoint-v1", "model": model.state_dict(), "config": cfg,
                                    "optimizer": {"state": {}}, "epoch": 3, "args": {"dataset": "rrsisd", "lr": 1e-3}})
    out = export.run([str(ckpt), str(tmp_path / "exported")])
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "config.json", "model.safetensors"]
    meta = json.loads((out / "config.json").read_text())
    assert meta["config"]["model"] == name and meta["args"]["lr"] == 1e-3 and meta["source"]["layout"].endswith("epoch 3")
    assert "epochs" not in (out / "README.md").read_text() and "lr 0.001" in (out / "README.md").read_text()

    inputs = _inputs(model, 64)
    expected = _logits(model, inputs)
    with monkeypatch.context() as m:
        _NoPickle(m)
        loaded = engine.read_checkpoint(str(out))
        again = engine.model_from_checkpoint(loaded, str(out))
    assert torch.equal(_logits(again, inputs), expected)


@pytest.mark.parametrize("fixture", ["fianet_a", "lavt_a", "rmsin_a", "crossvlt_a"])
def test_original_layout_checkpoints_convert(fixture, fixtures_dir, tmp_path, monkeypatch):
    fx = ckpt_lib.safe_torch_load(fixtures_dir / f"{fixture}.pt")
    cfg = registry.config_from_fixture(fx["config"])
    sd = fx["state_dict"]
    # The layouts the originals ship: LAVT's two-part file, DDP-prefixed {'model'}, CrossVLT's raw state_dict.
    if fixture == "lavt_a":
        payload = ckpt_lib.split_lavt_checkpoint(sd)
        cfg = dict(cfg, model="lavt")
    elif fixture == "crossvlt_a":
        payload = dict(sd)
    else:
        payload = {"model": {f"module.{k}": v for k, v in sd.items()}, "optimizer": {}, "epoch": 39}
    original = tmp_path / "model_best.pth"
    torch.save(payload, original)
    out = export.export_checkpoint(str(original), tmp_path / "exported", config=cfg)

    direct = registry.build_model(cfg)
    ckpt_lib.load_model_state(direct, ckpt_lib.extract_state_dict(payload), strict=True)
    inputs = {k: (v.float() if k == "image" else v) for k, v in fx["inputs"].items()}
    inputs = {k: inputs[k] for k in ("image", "text", "l_mask", "t_mask", "p_mask")
              if k in inputs and k in direct.spec.inputs}
    with monkeypatch.context() as m:
        _NoPickle(m)
        loaded = engine.model_from_checkpoint(engine.read_checkpoint(str(out)), str(out))
    logits = _logits(loaded, inputs)
    assert torch.equal(logits, _logits(direct, inputs))
    tol = float(fx.get("tolerance", {}).get("outputs", 1e-4))
    assert (logits - fx["outputs"].float()).abs().max().item() <= tol
    assert "original checkpoint" in (out / "README.md").read_text()


def test_original_checkpoint_from_model_flags_and_bad_inputs(tmp_path):
    bert = tmp_path / "bert"
    bert.mkdir()
    (bert / "config.json").write_text(json.dumps({**TINY_BERT, "model_type": "bert"}))
    flags = ["--model", "lavt_one", "--swin_embed_dim", "8", "--swin_depths", "1-1-1-1", "--swin_heads", "1-1-2-2",
             "--window_size", "4", "--img_size", "48", "--ck_bert", str(bert)]
    cfg = engine.config_from_args(engine.resolve_args(export.args_lib.get_parser().parse_args(flags), "lavt_one"))
    model = registry.build_model(cfg)
    original = tmp_path / "orig.pth"
    torch.save({"model": model.state_dict()}, original)
    out = export.run([str(original), str(tmp_path / "exp"), *flags])
    again = engine.model_from_checkpoint(engine.read_checkpoint(str(out)), str(out))
    inputs = _inputs(model, 48)
    assert torch.equal(_logits(again, inputs), _logits(model, inputs))

    with pytest.raises(engine.UserError, match="original checkpoint: pass --model"):
        export.run([str(original), str(tmp_path / "exp2")])
    (out / "config.json").unlink()
    with pytest.raises(engine.UserError, match="without config.json"):
        engine.read_checkpoint(str(out))
    with pytest.raises(engine.UserError, match="without model.safetensors"):
        engine.read_checkpoint(str(tmp_path))
