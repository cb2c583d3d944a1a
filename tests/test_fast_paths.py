"""Fast paths that must not change the numbers: the decoders' channels-last layout and
``train.py --compile`` under DDP (two CPU processes, gloo)."""
from __future__ import annotations

import json

import pytest
import torch
from test_entrypoints import TINY, data_args, load, run, synth, torchrun  # noqa: F401  (synth: the session fixture)

from lib.decoder import SimpleDecoding
from lib.registry import build_model, tiny_model_config

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


# --------------------------------------------------------------------------------------------
# channels_last decoders
# --------------------------------------------------------------------------------------------
def _inputs(cfg: dict, size: int, batch: int = 2) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    n = 10
    ids = torch.randint(1, cfg["bert"]["vocab_size"], (batch, n), generator=g)
    l_mask = torch.ones(batch, n, dtype=torch.long)
    l_mask[1, 7:] = 0
    t_mask = torch.zeros_like(l_mask)
    t_mask[:, 1:3] = 1
    p_mask = torch.zeros_like(l_mask)
    p_mask[:, 3:5] = 1
    return [torch.randn(batch, 3, size, size, generator=g), ids, l_mask, t_mask, p_mask]


# FIANet's decoder is LAVT's SimpleDecoding; RMSIN's has rotated convs that hand back NCHW maps.
@pytest.mark.parametrize("name,size", [("lavt", 64), ("rmsin", 64)])
def test_channels_last_decoder_equals_plain_path(name, size):
    torch.manual_seed(0)
    model = build_model(tiny_model_config(name, img_size=size))
    inputs = _inputs(model.config, size)
    if not model.spec.text.word_masks:
        inputs = inputs[:3]
    target = torch.randint(0, 2, (2, size, size), generator=torch.Generator().manual_seed(2))

    # Eval forward: the same logits; the decoder really ran NHWC and handed back NCHW.
    model.eval()
    outs, layouts = {}, {}
    model.classifier.conv1_4.register_forward_hook(
        lambda m, i, o: layouts.__setitem__(flag, i[0].is_contiguous(memory_format=torch.channels_last)))
    for flag in (False, True):
        model.set_channels_last(flag)
        with torch.no_grad():
            outs[flag] = model(*inputs)
        assert outs[flag].is_contiguous()
    assert layouts == {False: False, True: True}
    torch.testing.assert_close(outs[True], outs[False], rtol=0, atol=1e-5)

    # Training step: the same loss and decoder gradients.
    model.train()
    grads, losses = {}, {}
    for flag in (False, True):
        model.set_channels_last(flag)
        model.zero_grad(set_to_none=True)
        torch.manual_seed(3)  # the same dropout / drop-path draws in both passes
        loss = torch.nn.functional.cross_entropy(model(*inputs), target)
        loss.backward()
        losses[flag] = loss.detach()
        grads[flag] = {k: p.grad.clone() for k, p in model.classifier.named_parameters() if p.grad is not None}
    torch.testing.assert_close(losses[True], losses[False], rtol=0, atol=1e-5)
    assert grads[True].keys() == grads[False].keys() and len(grads[True]) > 10
    for k, g in grads[False].items():
        torch.testing.assert_close(grads[True][k], g, rtol=1e-4, atol=1e-5, msg=k)


def test_channels_last_defaults():
    dec = SimpleDecoding(64)
    assert dec.channels_last == "auto"
    assert dec.uses_channels_last(torch.zeros(1))  # CPU float32: the Winograd path computes in NHWC
    dec.winograd = 0
    assert not dec.uses_channels_last(torch.zeros(1))  # CPU, direct convs: measured no faster (BENCHMARKS.md)
    assert build_model(tiny_model_config("lavt_one")).classifier.channels_last == "auto"
    cfg = tiny_model_config("lavt_one")
    cfg["channels_last"] = True
    assert build_model(cfg).classifier.channels_last is True
    cfg["fused_attn"] = False  # the reference op order keeps the plain layout too
    model = build_model(cfg)
    assert model.classifier.channels_last is False
    model.set_fast_paths(True)
    assert model.classifier.channels_last is True
    with pytest.raises(ValueError, match="channels_last"):
        model.set_channels_last("yes")


# --------------------------------------------------------------------------------------------
# --compile with DDP
# --------------------------------------------------------------------------------------------
def test_compile_with_ddp_matches_eager(synth, tmp_path):
    """``torchrun --nproc_per_node 2 train.py --compile`` (aot_eager: the same dynamo + DDP
    graph splitting as inductor, without code generation) trains like the eager run."""
    common = ["--model", "lavt_one", *data_args(synth), *TINY, "--epochs", "1", "-b", "2", "--max_steps", "2",
              "--lr", "1e-3", "--no_val", "--print-freq", "1"]
    ckpts, logs = {}, {}
    for compiled in (False, True):
        out = tmp_path / ("compiled" if compiled else "eager")
        flags = ["--compile", "--compile_backend", "aot_eager"] if compiled else []
        run("train.py", *common, "--output-dir", str(out), *flags, launcher=torchrun(2))
        ckpts[compiled] = load(out / "checkpoint_last.pth")
        logs[compiled] = json.loads((out / "log.jsonl").read_text().splitlines()[-1])
    assert ckpts[True]["iteration"] == 2 and ckpts[True]["args"]["compile"] is True
    # Mean of the per-step losses (--print-freq 1); the second step runs on the updated weights.
    # Measured |d| 0 (AVX-512) and 1.2e-7 (AVX2 emulation), one thread per process.
    assert logs[True]["train_loss"] == pytest.approx(logs[False]["train_loss"], abs=1e-4)
    # The checkpoint holds the plain model's keys (no `_orig_mod.` / `module.` prefixes).
    eager, compiled = ckpts[False]["model"], ckpts[True]["model"]
    assert compiled.keys() == eager.keys()
    # Weight matrices / kernels took the same AdamW steps (lr 1e-3). AdamW's first step moves every
    # entry by about +-lr whatever the size of its gradient, so an entry whose true gradient is zero
    # up to round-off (biases in front of an InstanceNorm, a bias-table entry a softmax cancels)
    # moves by +-lr either way depending on the CPU's summation order: vectors are left out, and
    # a few matrix entries may differ by up to 2 steps of ~lr. A wrong gradient (e.g. one not
    # all-reduced) flips the sign of a large share of all entries. Measured entries over 1e-4:
    # 0 of 286,374 on AVX-512 and under AVX2 emulation; one bias-table entry on an AVX2-only EPYC.
    matrices = [k for k, v in eager.items() if v.is_floating_point() and v.dim() >= 2]
    assert len(matrices) > 50
    total = sum(eager[k].numel() for k in matrices)
    off = {k: int(((compiled[k] - eager[k]).abs() > 1e-4).sum()) for k in matrices}
    assert sum(off.values()) <= 1e-4 * total, {k: n for k, n in off.items() if n}
    for k in matrices:
        torch.testing.assert_close(compiled[k], eager[k], rtol=0, atol=4e-3, msg=lambda m, k=k: f"{k}: {m}")
