"""Model-level measurements: eval forward, one training step, forward FLOPs.

Protocol (the one the CPU timings of the original FIANet were measured with): inputs drawn with
``torch.manual_seed(0)`` after construction (token ids uniform in [1000, vocab), ``l_mask`` all
ones, ``t_mask`` ones at tokens 1-2, ``p_mask`` ones at tokens 3-6, a uniform {0, 1} target);
``--passes`` passes (default 4), the first ``--warmup`` (1) are warm-up, median / min / max of
the others. Eval forward = ``eval()`` + ``no_grad``. A training step = ``zero_grad``, forward,
loss, backward and one AdamW step (lr 3e-5, weight decay 1e-2):

* ``--loss ce`` (default): plain cross-entropy over all parameters, as the original's measurement;
* ``--loss model``: the model's own training objective (CrossVLT: logits + alignment loss from
  the target, ``2 * weighted CE + alignment``) over train.py's parameter groups with the
  parameters the reference never updates frozen.

``--reference-ops`` runs the reference op sequence (fast paths off, three separate BERT passes
for FIANet, PyTorch's default AdamW): a same-machine stand-in for the original code.
"""
from __future__ import annotations

import time
from typing import Any

from _common import (
    BenchError,
    Options,
    base_record,
    check_model_options,
    count_flops,
    peak_memory,
    prepare_inference,
    prepare_torch,
    setting_config,
    summarise,
    synchronizer,
    utilisation,
)

INPUT_KEYS = ("image", "text", "l_mask", "t_mask", "p_mask")  # the inputs drawn; a model takes its spec's ``inputs``


def make_inputs(cfg: dict, batch: int, size: int, tokens: int, device) -> tuple[dict, Any]:
    """``({image, text, l_mask, t_mask, p_mask}, target)`` drawn after ``torch.manual_seed(0)``."""
    import torch

    torch.manual_seed(0)
    vocab = (cfg.get("bert") or cfg.get("clip") or {}).get("vocab_size", 100)  # the language side's vocabulary
    ids = torch.randint(1000 if vocab > 2000 else 1, vocab, (batch, tokens))
    l_mask = torch.ones(batch, tokens, dtype=torch.long)
    t_mask = torch.zeros_like(l_mask)
    t_mask[:, 1:3] = 1
    p_mask = torch.zeros_like(l_mask)
    p_mask[:, 3:7] = 1
    image = torch.randn(batch, 3, size, size)
    target = torch.randint(0, 2, (batch, size, size))
    tensors = (image, ids, l_mask, t_mask, p_mask)
    return {k: t.to(device) for k, t in zip(INPUT_KEYS, tensors)}, target.to(device)


def children_params(model) -> dict[str, int]:
    return {name: sum(p.numel() for p in child.parameters()) for name, child in model.named_children()}


def build(model_name: str, setting: str, opts: Options, device):
    import torch

    from lib.registry import build_model

    cfg, size, tokens = setting_config(model_name, setting, opts)
    torch.manual_seed(0)
    model = build_model(cfg).to(device)
    check_model_options(model, opts)
    prepare_inference(model, opts, device)
    inputs, target = make_inputs(cfg, opts.batch, size, tokens, device)
    inputs = {k: inputs[k] for k in model.spec.inputs}
    return model, cfg, size, tokens, inputs, target


def training_step_fn(model_name: str, model, inputs, target, opts: Options, device, net=None):
    """``(step(), forward_backward(), zero_grad())``: one full training step as the module
    docstring describes; ``net`` (default ``model``) runs the forward, e.g. a compiled ``model``."""
    import torch
    import torch.nn.functional as F

    import engine

    net = model if net is None else net
    if opts.loss == "model":
        import train as train_lib

        train_lib.freeze_untrained_parameters(model, bert_pretrained=False)
        params = train_lib.parameter_groups(model, 1e-2)
        batch = {**inputs, "target": target}
        extra = {k: batch[k] for k in model.spec.training_inputs if k not in inputs}

        def forward_backward():
            engine.training_loss(net, {**batch, **extra}, device, opts.amp)[0].backward()
    else:
        if not hasattr(model, "logits"):
            raise BenchError(f"--loss ce: {type(model).__name__} has no two-class logits; use --loss model")
        params = list(model.parameters())

        def forward_backward():  # the original's protocol: plain cross-entropy on the logits
            with engine.autocast(device, opts.amp):
                outputs = net(**inputs)
            F.cross_entropy(model.logits(outputs).float(), target).backward()
    opt = torch.optim.AdamW(params, lr=3e-5, weight_decay=1e-2, fused=opts.adamw == "fused" and not opts.reference_ops)

    def step():
        opt.zero_grad(set_to_none=True)
        forward_backward()
        opt.step()

    return step, forward_backward, lambda: opt.zero_grad(set_to_none=True)


def measure(model_name: str, what: str, setting: str, opts: Options, passes: int, warmup: int,
            flops: bool, peak_tflops: float) -> dict[str, Any]:
    """One ``forward`` / ``train`` / ``flops`` measurement in this process."""
    import torch

    import engine

    device = prepare_torch(opts)
    model, cfg, size, tokens, inputs, target = build(model_name, setting, opts, device)
    sync = synchronizer(device)
    rec = base_record(model_name, what, setting, opts, size, tokens)
    rec["params"] = sum(p.numel() for p in model.parameters())
    rec["params_by_child"] = children_params(model)

    # FLOPs are always counted on the eager model (the counter sees aten ops, not compiled kernels).
    net = torch.compile(model) if opts.compile and what != "flops" else model

    def forward(m=net):
        with torch.no_grad(), engine.autocast(device, opts.amp):
            m(**inputs)

    if what == "flops":
        model.eval()
        per_image = count_flops(forward) / opts.batch
        rec.update({"flops_per_image": per_image, "gflops_per_image": round(per_image / 1e9, 2),
                    "train_flops_per_image_est": 3 * per_image, "note": "forward only; training ~ 3x forward"})
        rec.update(peak_memory(device))
        return rec

    times = []
    if what == "forward":
        model.eval()
        run = forward
    else:
        model.train()
        run, forward_backward, zero_grad = training_step_fn(model_name, model, inputs, target, opts, device, net)
    for _ in range(passes):
        sync()
        t0 = time.perf_counter()
        run()
        sync()
        times.append(time.perf_counter() - t0)
    rec.update(summarise(times, warmup))
    rec["unit"] = "s/pass"
    rec["images_per_s"] = round(opts.batch / rec["median_s"], 4)
    rec.update(peak_memory(device))
    if flops:  # counted after the timing (and the memory peak), on the same batch
        if what == "forward":
            per_image = count_flops(lambda: forward(model)) / opts.batch
        else:
            eager_fb = training_step_fn(model_name, model, inputs, target, opts, device)[1]
            per_image = count_flops(eager_fb) / opts.batch
            zero_grad()
        rec["flops_per_image"] = per_image
        rec["peak_tflops"] = peak_tflops
        rec["mfu"] = utilisation(per_image, rec["images_per_s"], peak_tflops)
    return rec
