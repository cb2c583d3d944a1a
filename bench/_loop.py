"""Full-loop throughput on generated synthetic data: ``fit`` (training) and ``eval`` (evaluation).

The data: ``data.synthetic.generate`` writes a small RRSIS-D-layout dataset (JPEG scenes of
``SOURCE_SIZE`` pixels, the tiny tokenizer folder) into a temporary folder; the datasets are
built exactly as train.py / test.py build them (`engine.build_dataset` with the model's recipe
flags), so images are decoded and resized to the setting's size, captions tokenised and (FIANet)
word masks computed, at the setting's token count. Construction is not timed.

* ``fit``: train.py's loop: DataLoader (shuffled, ``drop_last``) -> `engine.model_inputs` ->
  forward under `engine.autocast` -> the model's loss (`lib.losses`, plus CrossVLT's alignment
  term) -> backward -> AdamW over train.py's parameter groups (frozen: what the reference never
  updates; fused on CUDA only, as train.py) -> poly LR step. Each iteration is timed from the end
  of the previous one, so data loading is included.
* ``eval``: `engine.evaluate` (test.py's loop: loader, forward, argmax, metric update) over
  ``passes * batch`` samples of the validation split; each batch is timed from the end of the
  previous one (the ``on_batch`` hook).

The first ``--warmup`` iterations are warm-up; images/s = batch / median iteration time
(``images_per_s``) and batch x iterations / their total time (``images_per_s_mean``).
"""
from __future__ import annotations

import math
import shutil
import tempfile
import time
from pathlib import Path
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
from _model import children_params

SOURCE_SIZE = {"paper": 256, "tiny": 64}  # pixels of the generated scenes (resized to the setting's size)
REFS_PER_IMAGE = 3


def make_dataset(workdir: Path, model_name: str, setting: str, size: int, tokens: int, split: str, samples: int,
                 workers: int):
    """The train (``mode='train'``) or val (``mode='eval'``) dataset of a fresh synthetic folder."""
    import args as args_lib
    import engine
    from data.synthetic import generate

    images = math.ceil(samples / REFS_PER_IMAGE) + 1
    paths = generate(workdir / "data", seed=0, num_images=images, num_val=images, num_test=1,
                     image_size=SOURCE_SIZE[setting], refs_per_image=REFS_PER_IMAGE, layouts=("rrsisd",))
    argv = ["--model", model_name, "--dataset", "rrsisd", "--refer_data_root", str(paths["rrsisd"]),
            "--bert_tokenizer", str(paths["bert"]), "--ck_bert", str(paths["bert"]), "--img_size", str(size),
            "--max_tokens", str(tokens), "--cache_dir", str(workdir / "cache"), "--workers", str(workers)]
    args = engine.resolve_args(args_lib.get_parser().parse_args(argv), model_name)
    if split == "train":
        ds = engine.build_dataset(args, "train", mode="train")
    else:
        ds = engine.build_dataset(args, "val", mode="eval", eval_protocol="all")
    if len(ds) < samples:
        raise BenchError(f"synthetic {split} split has {len(ds)} samples, {samples} needed")
    vocab = sum(1 for _ in open(paths["bert"] / "vocab.txt", encoding="utf-8"))
    return ds, args, vocab


def measure(model_name: str, what: str, setting: str, opts: Options, passes: int, warmup: int, workers: int,
            flops: bool, peak_tflops: float) -> dict[str, Any]:
    """One ``fit`` or ``eval`` measurement in this process."""
    import torch

    import engine
    import train as train_lib
    import utils
    from lib.registry import build_model

    device = prepare_torch(opts)
    sync = synchronizer(device)
    cfg, size, tokens = setting_config(model_name, setting, opts)
    work = Path(tempfile.mkdtemp(prefix="openrrsis-bench-loop-"))
    try:
        split = "train" if what == "fit" else "val"
        ds, args, vocab = make_dataset(work, model_name, setting, size, tokens, split, passes * opts.batch, workers)
        if "bert" in cfg and vocab > cfg["bert"]["vocab_size"]:  # the tiny BERT's vocabulary is smaller
            cfg["bert"] = dict(cfg["bert"], vocab_size=vocab)               # than the synthetic one
        torch.manual_seed(0)
        model = build_model(cfg).to(device)
        check_model_options(model, opts)
        prepare_inference(model, opts, device)
        rec = base_record(model_name, what, setting, opts, size, tokens)
        # fit: the model's own loss and train.py's AdamW (fused on CUDA only); eval: no loss.
        rec.update({"loss": "model" if what == "fit" else None,
                    "adamw": ("fused" if device.type == "cuda" else "default") if what == "fit" else None})
        rec.update({"params": sum(p.numel() for p in model.parameters()), "params_by_child": children_params(model),
                    "workers": workers, "source_image": SOURCE_SIZE[setting], "samples": passes * opts.batch})
        times: list[float] = []
        last: dict[str, Any] = {}

        if what == "fit":
            train_lib.freeze_untrained_parameters(model, bert_pretrained=False)
            optimizer = torch.optim.AdamW(train_lib.parameter_groups(model, args.weight_decay), lr=args.lr,
                                          weight_decay=args.weight_decay, fused=device.type == "cuda")
            scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, train_lib.poly_schedule(passes))
            loader = torch.utils.data.DataLoader(ds, batch_size=opts.batch, shuffle=True, num_workers=workers,
                                                 pin_memory=device.type == "cuda", drop_last=True,
                                                 generator=torch.Generator().manual_seed(0))

            def forward_backward(batch):
                loss = engine.training_loss(model, batch, device, opts.amp)[0]
                loss.backward()
                return loss

            model.train()
            t_prev = time.perf_counter()
            for step, batch in enumerate(loader):
                if step >= passes:
                    break
                batch = engine.to_device(batch, device)
                optimizer.zero_grad(set_to_none=True)
                forward_backward(batch)
                optimizer.step()
                scheduler.step()
                sync()
                now = time.perf_counter()
                times.append(now - t_prev)
                t_prev = now
                last = {"batch": batch}
        else:
            subset = torch.utils.data.Subset(ds, range(passes * opts.batch))
            loader = engine.eval_loader(subset, opts.batch, workers, device.type == "cuda", utils.DistInfo(device=device))
            clock = [0.0]
            seen = [0]

            def on_batch(batch, pred, iou):
                # Models evaluated at the original resolution call back once per sample: time whole batches.
                seen[0] += int(pred.shape[0])
                if seen[0] % opts.batch:
                    return
                sync()
                now = time.perf_counter()
                times.append(now - clock[0])
                clock[0] = now
                last["batch"] = batch

            clock[0] = time.perf_counter()
            summary = engine.evaluate(model, loader, device, opts.amp, on_batch=on_batch, show_progress=False)
            rec["eval_samples"] = summary.get("num_samples")

        if len(times) < passes:
            raise BenchError(f"{what}: only {len(times)} of {passes} iterations ran")
        rec.update(summarise(times, warmup))
        kept = times[rec["warmup"]:]
        rec.update({"unit": "s/iteration", "images_per_s": round(opts.batch / rec["median_s"], 4),
                    "images_per_s_mean": round(opts.batch * len(kept) / sum(kept), 4)})
        rec.update(peak_memory(device))
        if flops:
            if what == "fit":
                per_image = count_flops(lambda: forward_backward(last["batch"])) / opts.batch
                optimizer.zero_grad(set_to_none=True)
            else:
                inputs = engine.model_inputs(engine.to_device(last["batch"], device), model.spec.inputs)

                def forward():
                    with torch.no_grad(), engine.autocast(device, opts.amp):
                        model(**inputs)

                per_image = count_flops(forward) / len(last["batch"]["target"])
            rec.update({"flops_per_image": per_image, "peak_tflops": peak_tflops,
                        "mfu": utilisation(per_image, rec["images_per_s"], peak_tflops)})
        return rec
    finally:
        shutil.rmtree(work, ignore_errors=True)
