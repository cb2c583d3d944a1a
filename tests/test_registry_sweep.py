"""Every registered model, through its spec and the model contract only (no name appears here):
adding a model to the registry adds it to these tests.

Per model, with its spec's tiny config: eval forward -> predict_mask / predict_scores shapes and
ranges; a training forward -> named loss terms -> backward, where every parameter the model does
not declare unused gets a gradient; save -> load through the loader test.py uses -> equal scores;
bf16 autocast forward; BatchNorm -> SyncBatchNorm exactly when the spec asks for it; and, for
models with a Swin backbone and BERT, that loading ImageNet-Swin + BERT weights leaves missing only
the keys the spec declares.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

import engine
import train as train_lib
from lib import registry
from lib.checkpoint import CheckpointMismatchError, save_checkpoint
from lib.swin import MultiModalSwin

SIZE = 64
NAMES = registry.available_models()


def _batch(spec, seed: int = 0) -> dict[str, torch.Tensor]:
    """Every input a registered model may take; the forward gets its spec's subset."""
    g = torch.Generator().manual_seed(seed)
    n = spec.text.context_length or 10
    text = torch.randint(5, 100, (2, n), generator=g)
    l_mask = torch.ones(2, n, dtype=torch.long)
    l_mask[1, n - 3:] = 0
    text[1, n - 3:] = 0
    t_mask = torch.zeros_like(l_mask)
    t_mask[:, 2] = 1
    p_mask = torch.zeros_like(l_mask)
    p_mask[:, 3:5] = 1
    target = (torch.rand(2, SIZE, SIZE, generator=g) > 0.6).long()
    image = torch.randn(2, 3, SIZE, SIZE, generator=g)
    return {"image": image, "text": text, "l_mask": l_mask, "t_mask": t_mask, "p_mask": p_mask, "target": target}


def _tiny(name: str) -> nn.Module:
    torch.manual_seed(0)
    return registry.build_model(registry.tiny_model_config(name, img_size=SIZE))


@pytest.fixture(scope="module", params=NAMES)
def built(request):
    name = request.param
    return name, _tiny(name)


def test_eval_forward_and_prediction_contract(built):
    name, model = built
    spec = model.spec
    batch = _batch(spec)
    model.eval()
    with torch.no_grad():
        outputs = model(**engine.model_inputs(batch, spec.inputs))
        mask = model.predict_mask(outputs, (SIZE, SIZE))
        scores = model.predict_scores(outputs, (SIZE, SIZE))
        bigger = model.predict_mask(outputs, (SIZE + 17, SIZE - 9))  # any output size (original resolution)
    assert mask.shape == (2, SIZE, SIZE) and mask.dtype == torch.bool
    assert bigger.shape == (2, SIZE + 17, SIZE - 9)
    assert scores.shape == (2, SIZE, SIZE) and torch.isfinite(scores).all()
    assert scores.min() >= 0 and scores.max() <= 1
    assert set(spec.inputs) <= set(spec.training_inputs)
    assert spec.recipe("rrsisd").lr > 0 and spec.val_protocol in ("all", "one-per-ref")


def test_training_loss_terms_and_gradients(built):
    name, model = built
    spec = model.spec
    batch = _batch(spec, seed=1)
    model.train()
    model.zero_grad(set_to_none=True)
    total, terms = engine.training_loss(model, batch, torch.device("cpu"), "off")
    assert terms and all(t.dtype == torch.float32 and t.dim() == 0 and torch.isfinite(t) for t in terms.values())
    assert torch.allclose(total, sum(terms.values()))
    total.backward()
    unused = set(model.unused_parameter_names()) if hasattr(model, "unused_parameter_names") else set()
    no_grad = [n for n, p in model.named_parameters() if n not in unused and p.requires_grad and p.grad is None]
    assert not no_grad, f"{name}: parameters without a gradient: {no_grad[:8]}"
    model.zero_grad(set_to_none=True)


def test_save_load_through_the_test_loader_gives_equal_scores(built, tmp_path):
    name, model = built
    model.eval()
    path = tmp_path / "checkpoint_best.pth"
    save_checkpoint(path, {"model": model.state_dict(), "config": model.config, "epoch": 0})
    ckpt = engine.read_checkpoint(str(path))
    loaded = engine.model_from_checkpoint(ckpt, str(path)).eval()
    batch = engine.model_inputs(_batch(model.spec, seed=2), model.spec.inputs)
    with torch.no_grad():
        a = model.predict_scores(model(**batch), (SIZE, SIZE))
        b = loaded.predict_scores(loaded(**batch), (SIZE, SIZE))
    assert torch.equal(a, b)
    assert loaded.spec is model.spec


def test_a_whole_model_pickles_and_deep_copies_with_its_spec(built):
    """``pickle`` / ``copy.deepcopy`` of the module itself (multiprocessing, EMA copies): same
    scores, and the registry's spec object, not a copy of it."""
    import copy
    import pickle

    name, model = built
    model.eval()
    batch = engine.model_inputs(_batch(model.spec, seed=3), model.spec.inputs)
    with torch.no_grad():
        ref = model.predict_scores(model(**batch), (SIZE, SIZE))
        for other in (pickle.loads(pickle.dumps(model)), copy.deepcopy(model)):
            assert other.spec is model.spec and other.config == model.config
            assert torch.equal(other.eval().predict_scores(other(**batch), (SIZE, SIZE)), ref)


def test_bf16_autocast_forward(built):
    name, model = built
    model.eval()
    batch = engine.model_inputs(_batch(model.spec, seed=3), model.spec.inputs)
    with torch.no_grad():
        ref = model.predict_scores(model(**batch), (SIZE, SIZE))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(**batch)
        scores = model.predict_scores(out, (SIZE, SIZE))
    assert torch.isfinite(scores).all()
    assert (scores - ref).abs().mean() < 0.1  # bf16 keeps ~3 significant digits


@pytest.mark.parametrize("name", NAMES)
def test_sync_bn_exactly_when_the_spec_asks(name):
    model = _tiny(name)
    has_bn = any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    wrapped = train_lib.wrap_sync_bn(model, model.spec.sync_bn, torch.device("cuda"))  # conversion needs no GPU
    synced = any(isinstance(m, nn.SyncBatchNorm) for m in wrapped.modules())
    assert synced == (model.spec.sync_bn and has_bn)
    on_cpu = train_lib.wrap_sync_bn(_tiny(name), model.spec.sync_bn, torch.device("cpu"))
    assert not any(isinstance(m, nn.SyncBatchNorm) for m in on_cpu.modules())  # SyncBN runs on accelerators only


def _swin_bert_models() -> list[str]:
    out = []
    for name in NAMES:
        model = _tiny(name)
        if isinstance(getattr(model, "backbone", None), MultiModalSwin) and hasattr(model, "text_encoder"):
            out.append(name)
    return out


def _imagenet_swin_file(model: nn.Module, path, drop: str | None = None) -> None:
    """An official-layout Swin classification file with the backbone's Swin weights (+ head)."""
    g = torch.Generator().manual_seed(5)
    sd = {}
    for k, v in model.backbone.state_dict().items():
        parts = k.split(".")
        is_swin = k.startswith("patch_embed.") or (parts[0] == "layers" and parts[2] in ("blocks", "downsample"))
        if is_swin and k != drop:
            sd[k] = torch.randn(v.shape, generator=g) if v.is_floating_point() else v.clone()
    last = model.backbone.num_features[-1]
    sd.update({"norm.weight": torch.ones(last), "norm.bias": torch.zeros(last), "head.weight": torch.zeros(10, last)})
    torch.save({"model": sd}, path)


@pytest.mark.parametrize("name", _swin_bert_models())
def test_pretrained_weights_leave_only_declared_keys_missing(name, tmp_path):
    from transformers import BertConfig, BertModel

    model = _tiny(name)
    bert_dir = tmp_path / "bert"
    BertModel(BertConfig(**model.config["bert"]), add_pooling_layer=True).save_pretrained(bert_dir)
    swin = tmp_path / "swin_tiny_patch4_window7_224.pth"
    _imagenet_swin_file(model, swin)
    loaded = engine.load_pretrained(model, str(swin), str(bert_dir), verbose=False)
    assert any(k.startswith("backbone.layers.0.blocks.") for k in loaded)
    assert any(k.startswith("text_encoder.encoder.") for k in loaded)
    # A file that lacks one block weight leaves an undeclared key missing: refused with the report.
    broken = tmp_path / "broken.pth"
    _imagenet_swin_file(model, broken, drop="layers.1.blocks.0.mlp.fc1.weight")
    with pytest.raises(CheckpointMismatchError, match="random initialisation"):
        engine.load_pretrained(_tiny(name), str(broken), str(bert_dir), verbose=False)
