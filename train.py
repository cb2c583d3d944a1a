"""Train a referring segmentation model.

    python train.py --model fianet --dataset rrsisd ...                 # one process
    torchrun --nproc_per_node 4 train.py --model fianet ...             # DDP (gloo on CPU, NCCL on GPU)

The loop follows the reference implementations: AdamW with the reference parameter groups (a
group's ``lr_scale`` multiplies ``--lr``), a poly(0.9) schedule over iterations x epochs stepped every
iteration (or once per epoch where the spec says so), the reference loss of each model, validation after every
epoch and best-checkpoint selection on overall IoU (strictly greater). Differences that do not change
the maths: no per-step ``gc.collect`` / ``empty_cache`` / ``synchronize``; parameters the reference
never updates are frozen, so DDP runs without ``find_unused_parameters``; checkpoints are written
atomically with the optimiser, scheduler, scaler and RNG states and the frozen-parameter list, so
``--resume`` continues exactly.

Everything model-specific (recipe, loss, SyncBN, validation protocol, inputs) comes from the
model's `ModelSpec` and its ``loss`` method; `train` is a sequence of named steps in the shape of
the torchvision reference scripts.
"""
from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

import args as args_lib
import engine
import utils
from engine import UserError
from lib import checkpoint as ckpt_lib
from lib import registry


class TrainingDiverged(UserError):
    pass


# --------------------------------------------------------------------------------------------
# Optimisation
# --------------------------------------------------------------------------------------------
BERT_TRAINED_LAYERS = 10  # the references optimise BERT encoder layers 0..9 only


def _bert_layer_index(name: str) -> int | None:
    parts = name.split(".")
    if "layer" in parts:
        i = parts.index("layer")
        if i + 1 < len(parts) and parts[i + 1].isdigit():
            return int(parts[i + 1])
    return None


def freeze_untrained_parameters(model: nn.Module, bert_pretrained: bool = True) -> list[str]:
    """Freeze what the reference never updates: parameters its forward never uses (the model lists
    them) and the BERT embeddings and encoder layers >= 10, which are not in its optimiser.

    Freezing them changes no number the optimiser produces, and lets DDP run without
    ``find_unused_parameters``. When BERT starts from random weights (no pretrained folder, e.g. the
    synthetic quick start) its embeddings and all layers are trained: frozen random embeddings
    would only handicap the text branch.
    """
    frozen: list[str] = []
    unused = set(model.unused_parameter_names()) if hasattr(model, "unused_parameter_names") else set()
    for name, p in model.named_parameters():
        bert_layer = _bert_layer_index(name) if name.startswith("text_encoder.") else None
        in_bert_opt = (name.startswith("text_encoder.encoder.layer.") and bert_layer is not None
                       and bert_layer < BERT_TRAINED_LAYERS)
        if name in unused or (bert_pretrained and name.startswith("text_encoder.") and not in_bert_opt):
            p.requires_grad_(False)
            frozen.append(name)
    return frozen


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """The reference AdamW groups (identical in LAVT, RMSIN and FIANet), trainable parameters only:
    backbone norms / bias tables without decay, other backbone, decoder, BERT layers 0..9."""
    if hasattr(model, "parameter_groups"):
        return model.parameter_groups(weight_decay)
    no_decay, backbone, decoder, bert, other = [], [], [], [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if name.startswith("backbone."):
            if any(k in name for k in ("norm", "absolute_pos_embed", "relative_position_bias_table")):
                no_decay.append(p)
            else:
                backbone.append(p)
        elif name.startswith("classifier."):
            decoder.append(p)
        elif name.startswith("text_encoder."):
            bert.append(p)
        else:
            other.append(p)
    groups = [{"params": no_decay, "weight_decay": 0.0}, {"params": backbone, "weight_decay": weight_decay},
              {"params": decoder, "weight_decay": weight_decay}, {"params": bert, "weight_decay": weight_decay}]
    if other:
        groups.append({"params": other, "weight_decay": weight_decay})
    return [g for g in groups if g["params"]]


def poly_schedule(total_iters: int):
    """Learning-rate factor ``(1 - it / total) ** 0.9`` per iteration, no warm-up."""
    total = max(1, total_iters)
    return lambda it: max(0.0, 1.0 - it / total) ** 0.9


# --------------------------------------------------------------------------------------------
# The run, step by step
# --------------------------------------------------------------------------------------------
def check_flags(args) -> None:
    """Flag values that would make a run do nothing or misbehave: one line each."""
    if args.epochs is not None and args.epochs < 1:
        raise UserError(f"--epochs {args.epochs}: nothing to train (give at least 1 epoch)")
    if args.batch_size is not None and args.batch_size < 1:
        raise UserError(f"--batch-size {args.batch_size}: must be a positive number of samples per process")
    if args.max_steps is not None and args.max_steps < 1:
        raise UserError(f"--max_steps {args.max_steps}: must be >= 1 (0 would save untrained weights as the best)")
    if args.eval_batch_size < 1:
        raise UserError(f"--eval_batch_size {args.eval_batch_size}: must be >= 1")
    if args.lr is not None and not args.lr > 0:
        raise UserError(f"--lr {args.lr}: must be positive")


def prepare_output_dir(args, info: utils.DistInfo) -> Path:
    out_dir = Path(args.output_dir)
    if info.is_main:
        if out_dir.exists() and not out_dir.is_dir():
            raise UserError(f"--output-dir {out_dir}: exists and is not a directory")
        try:
            out_dir.mkdir(parents=True, exist_ok=True)
            probe = out_dir / ".write_test"
            probe.write_text("")
            probe.unlink()
        except OSError as e:
            raise UserError(f"--output-dir {out_dir}: not writable ({e.strerror or e})") from None
        (out_dir / "args.json").write_text(json.dumps(vars(args), indent=2, default=str))
    return out_dir


def read_resume_checkpoint(args) -> dict[str, Any] | None:
    if not args.resume:
        return None
    ckpt = engine.read_checkpoint(args.resume)
    stored = engine.checkpoint_model_name(ckpt)
    if stored is None or "optimizer" not in ckpt:
        raise UserError(f"--resume {args.resume} is not an OpenRRSIS training checkpoint "
                        f"(to fine-tune from an original checkpoint, evaluate it with test.py first)")
    if stored != args.model:
        raise UserError(f"--resume {args.resume} holds a '{stored}' model, but --model {args.model} was given")
    return ckpt


def build_model(args, info: utils.DistInfo, resume_ckpt: dict[str, Any] | None) -> tuple[nn.Module, list[str]]:
    """The model with its starting weights (pretrained files, or the resumed checkpoint) and its
    frozen parameters: decided once at the start of a run and stored in its checkpoints, so a
    resume freezes the same parameters whatever ``--ck_bert`` says now."""
    config = resume_ckpt["config"] if resume_ckpt is not None else engine.config_from_args(args)
    if args.grad_ckpt:
        config = {**config, "grad_ckpt": True}
    model = registry.build_model(config)
    frozen = None
    if resume_ckpt is None:
        engine.load_pretrained(model, args.pretrained_swin_weights, args.ck_bert, verbose=info.is_main,
                               clip_path=args.clip_weights, allow_torchscript=args.allow_torchscript)
    else:
        ckpt_lib.load_model_state(model, resume_ckpt["model"], strict=True)
        frozen = resume_ckpt.get("frozen")  # None in checkpoints written before the list was stored
    if frozen is None:
        frozen = freeze_untrained_parameters(model, bert_pretrained=ckpt_lib.has_bert_weights(args.ck_bert))
    else:
        names = set(frozen)
        for name, p in model.named_parameters():
            p.requires_grad_(name not in names)
    prepare = getattr(model, "prepare_training", None)
    if callable(prepare):  # frozen helpers the loss needs (TRIS's CLIP ViT calibrator): fail before the first step
        try:
            prepare(calibrator=getattr(args, "clip_vitb32", "") or "", allow_torchscript=args.allow_torchscript)
        except ValueError as e:  # CheckpointError included
            raise UserError(str(e).strip().splitlines()[0]) from None
    return model, list(frozen)


def build_loader(ds, args, info: utils.DistInfo):
    sampler = torch.utils.data.DistributedSampler(ds, num_replicas=info.world_size, rank=info.rank,
                                                  shuffle=True, seed=args.seed)
    loader = torch.utils.data.DataLoader(ds, batch_size=args.batch_size, sampler=sampler, num_workers=args.workers,
                                         pin_memory=args.pin_mem, drop_last=True, persistent_workers=False)
    if len(loader) == 0:
        raise UserError(f"--batch-size {args.batch_size} is larger than the training split "
                        f"({len(ds)} samples per process): nothing to train on")
    return sampler, loader


def scaled_parameter_groups(model: nn.Module, lr: float, weight_decay: float,
                            lr_multi: float | None = None) -> list[dict[str, Any]]:
    """`parameter_groups` with each group's learning rate set: ``lr * lr_scale`` (a model's group may
    carry ``lr_scale``, default 1; TRIS's CLIP groups 0.1). ``lr_multi`` (``--lr_multi``) replaces the
    scale of the groups a model scales below 1 (the references' backbone factor)."""
    groups = parameter_groups(model, weight_decay)
    for g in groups:
        scale = float(g.get("lr_scale", 1.0))
        if lr_multi is not None and scale < 1.0:
            scale = float(lr_multi)
        g["lr_scale"] = scale
        g["lr"] = lr * scale  # LambdaLR multiplies each group's own base lr
    return groups


def build_optimiser(model: nn.Module, args, device: torch.device, total_iters: int):
    lr_multi = getattr(args, "lr_multi", None)
    if lr_multi is not None and not lr_multi > 0:
        raise UserError(f"--lr_multi {lr_multi}: must be positive")
    groups = scaled_parameter_groups(model, args.lr, args.weight_decay, lr_multi)
    optimizer = torch.optim.AdamW(groups, lr=args.lr, weight_decay=args.weight_decay, amsgrad=args.amsgrad,
                                  fused=device.type == "cuda")
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, poly_schedule(total_iters))
    scaler = torch.amp.GradScaler(device.type, enabled=args.amp == "fp16")
    return optimizer, scheduler, scaler


def restore(ckpt: dict[str, Any], optimizer, scheduler, scaler) -> tuple[int, float, int]:
    """Optimiser, schedule, scaler and RNG states of a resumed run: ``(start_epoch, best, iteration)``."""
    optimizer.load_state_dict(ckpt["optimizer"])
    scheduler.load_state_dict(ckpt["lr_scheduler"])
    if ckpt.get("scaler"):
        scaler.load_state_dict(ckpt["scaler"])
    utils.set_rng_state(ckpt["rng"])
    return int(ckpt["epoch"]) + 1, float(ckpt.get("best_oIoU", -0.1)), int(ckpt.get("iteration", 0))


def wrap_sync_bn(model: nn.Module, sync_bn: bool, device: torch.device) -> nn.Module:
    """BatchNorm -> SyncBatchNorm when the spec asks for it (the references under DDP). SyncBN
    runs on accelerators only, so CPU (gloo) runs keep per-process BatchNorm."""
    if sync_bn and device.type != "cpu":
        return nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return model


def wrap(model: nn.Module, args, info: utils.DistInfo) -> nn.Module:
    """DDP (with SyncBN where the spec asks for it), then torch.compile.

    DDP first, then compile (PyTorch's recommended order): dynamo sees the DDP wrapper and its
    DDPOptimizer splits the graph at the gradient-bucket boundaries, so each bucket's all-reduce
    still overlaps the rest of the backward. Only the training forward is compiled: validation
    calls the plain model (eval mode, other batch sizes would only trigger recompilations)."""
    net = model
    device = info.device
    if info.distributed:
        spec = engine.spec_of(model)
        if spec.sync_bn and device.type == "cpu" and info.is_main:
            print("[train] note: this model's reference uses SyncBatchNorm under DDP; on CPU (gloo) BatchNorm "
                  "statistics stay per process")
        net = wrap_sync_bn(net, spec.sync_bn, device)
        net = nn.parallel.DistributedDataParallel(net, device_ids=[device.index] if device.type == "cuda" else None)
    if args.compile:
        net = torch.compile(net, backend=args.compile_backend)
    return net


class EpochLogger:
    """TensorBoard scalars and ``log.jsonl`` records on rank 0."""

    def __init__(self, out_dir: Path, args, info: utils.DistInfo):
        self.main = info.is_main
        self.writer = None
        self.jsonl = None
        if self.main:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=args.log_dir or str(out_dir / "tb"))
            self.jsonl = utils.JsonlLogger(out_dir / "log.jsonl")

    def scalars(self, prefix: str, values: dict[str, float], step: int) -> None:
        if self.writer is not None:
            for k, v in values.items():
                self.writer.add_scalar(f"{prefix}/{k}", v, step)

    def record(self, record: dict[str, Any]) -> None:
        if self.jsonl is not None:
            self.jsonl.write(record)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def train_one_epoch(net: nn.Module, loader, optimizer, scheduler, scaler, args, device: torch.device, epoch: int,
                    iteration: int, iters_per_epoch: int, log: EpochLogger, out_dir: Path,
                    has_checkpoint: bool, schedule_step: str = "iteration") -> tuple[int, dict[str, float]]:
    """One epoch of the reference loop: forward + the model's loss terms, backward, AdamW step,
    poly step per iteration (``schedule_step='epoch'``: once, after the epoch). Checks the loss for
    NaN / inf every ``--print-freq`` steps (the only host sync). Returns ``(iteration, averaged loss
    terms)``."""
    net.train()
    meters = utils.MetricLogger()
    nonfinite = torch.zeros((), dtype=torch.bool, device=device)
    bar = utils.progress(loader, enabled=log.main, total=iters_per_epoch, desc=f"epoch {epoch}")
    kept = (f"the last good checkpoint in {out_dir} is kept" if has_checkpoint
            else "no checkpoint was written yet")
    for step, batch in enumerate(bar):
        if step >= iters_per_epoch:
            break
        batch = engine.to_device(batch, device)
        loss, terms = engine.training_loss(net, batch, device, args.amp)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        if schedule_step == "iteration":
            scheduler.step()
        iteration += 1
        nonfinite |= ~torch.isfinite(loss.detach())
        if step % args.print_freq == 0 or step == iters_per_epoch - 1:
            value = loss.item()
            if not math.isfinite(value) or nonfinite.item():
                raise TrainingDiverged(f"loss became {value} at epoch {epoch}, step {step}: stopped; {kept} "
                                       f"(lower --lr or use --amp off)")
            lr = optimizer.param_groups[0]["lr"]
            values = {"loss": value, **{k: float(v.item()) for k, v in terms.items()}, "lr": lr}
            meters.update(**values)
            if log.main:
                bar.set_postfix(loss=f"{value:.4f}", lr=f"{lr:.2e}")
            log.scalars("train", values, iteration)
    if nonfinite.item():
        raise TrainingDiverged(f"a non-finite loss occurred in epoch {epoch}: stopped; {kept}")
    if schedule_step == "epoch":
        scheduler.step()  # before the checkpoint, so a resume continues with the next epoch's factor
    return iteration, meters.averages()


def checkpoint_payload(model, optimizer, scheduler, scaler, args, epoch: int, iteration: int, best: float,
                       frozen: list[str]) -> dict[str, Any]:
    return {
        "format": "openrrsis-checkpoint-v1",
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "lr_scheduler": scheduler.state_dict(),
        "scaler": scaler.state_dict() if args.amp == "fp16" else {},
        "epoch": epoch,
        "iteration": iteration,
        "best_oIoU": best,
        "rng": utils.get_rng_state(),
        "config": model.config,
        "frozen": frozen,
        "args": json.loads(json.dumps(vars(args), default=str)),
    }


def save(path: Path, payload: dict[str, Any]) -> None:
    """Atomic checkpoint write; a full disk is one line naming the file (the previous file stays)."""
    try:
        ckpt_lib.save_checkpoint(path, payload)
    except (OSError, RuntimeError) as e:
        msg = engine.disk_full_message(e, path)
        if msg is None:
            raise
        raise UserError(msg + f" (the previous {path.name}, if any, is intact)") from None


def out_of_time(args, started: float, last_epoch: bool, info: utils.DistInfo) -> bool:
    """``--time_limit`` reached after this epoch; under DDP rank 0's clock decides for all ranks."""
    flag = not last_epoch and args.time_limit is not None and time.time() - started > args.time_limit * 60
    if info.distributed:
        t = torch.tensor([float(flag)], device=info.device)
        torch.distributed.broadcast(t, src=0)
        flag = bool(t.item())
    return flag


def train(args) -> int:
    check_flags(args)
    info = utils.init_distributed(args.device)
    utils.seed_everything(args.seed)  # the same seed on every rank, as the references
    device = info.device
    # --amp auto -> the value this hardware runs fastest; stored in args.json and the checkpoints.
    args.amp = utils.resolve_amp(args.amp, device, log_prefix="[train]" if info.is_main else None)
    utils.keep_freed_memory(device, log_prefix="[train]" if info.is_main else None)
    resume_ckpt = read_resume_checkpoint(args)
    if resume_ckpt is not None and int(resume_ckpt["epoch"]) + 1 >= args.epochs:
        if info.is_main:
            print(f"[train] --resume {args.resume}: already complete ({int(resume_ckpt['epoch']) + 1} of "
                  f"--epochs {args.epochs} epochs done); nothing to do")
        return 0
    out_dir = prepare_output_dir(args, info)
    spec = registry.model_spec(args.model)

    train_ds = engine.build_dataset(args, "train", mode="train")
    engine.check_image_files(train_ds, "train")
    val_ds = None if args.no_val else engine.build_dataset(args, args.val_split, mode="eval",
                                                           eval_protocol=spec.val_protocol)
    if val_ds is not None:
        engine.check_image_files(val_ds, args.val_split)
    model, frozen = build_model(args, info, resume_ckpt)
    model.to(device)
    sampler, loader = build_loader(train_ds, args, info)
    iters_per_epoch = len(loader) if args.max_steps is None else min(len(loader), args.max_steps)
    optimizer, scheduler, scaler = build_optimiser(model, args, device, iters_per_epoch * args.epochs)
    start_epoch, best, iteration = 0, -0.1, 0
    if resume_ckpt is not None:
        start_epoch, best, iteration = restore(resume_ckpt, optimizer, scheduler, scaler)
        if info.is_main:
            print(f"[train] resumed from {args.resume}: epoch {start_epoch}, best oIoU {best:.4f}")
        del resume_ckpt
    net = wrap(model, args, info)
    log = EpochLogger(out_dir, args, info)
    started = time.time()
    has_checkpoint = start_epoch > 0

    for epoch in range(start_epoch, args.epochs):
        sampler.set_epoch(epoch)
        iteration, averages = train_one_epoch(net, loader, optimizer, scheduler, scaler, args, device, epoch,
                                              iteration, iters_per_epoch, log, out_dir, has_checkpoint,
                                              schedule_step=spec.schedule_step)
        record: dict[str, Any] = {"epoch": epoch, "iteration": iteration,
                                  **{f"train_{k}": v for k, v in averages.items()}}
        improved = False
        if val_ds is not None:
            summary = validate(model, val_ds, args, info, epoch)
            record.update({f"val_{k}": v for k, v in summary.items() if k != "per_category"})
            improved = summary["oIoU"] > best
            best = max(best, summary["oIoU"])
            if info.is_main:
                print(f"[epoch {epoch}] val oIoU {100 * summary['oIoU']:.2f}  mIoU {100 * summary['mIoU']:.2f}  "
                      f"P@0.5 {100 * summary['P@0.5']:.2f}  (best oIoU {100 * best:.2f})")
            log.scalars("val", {k: summary[k] for k in ("oIoU", "mIoU", "P@0.5")}, epoch)
        if info.is_main:
            payload = checkpoint_payload(model, optimizer, scheduler, scaler, args, epoch, iteration, best, frozen)
            save(out_dir / "checkpoint_last.pth", payload)
            if improved or val_ds is None:
                save(out_dir / "checkpoint_best.pth", payload)
            log.record({**record, "best_oIoU": best, "elapsed_s": round(time.time() - started, 1)})
        has_checkpoint = True
        if out_of_time(args, started, epoch == args.epochs - 1, info):
            if info.is_main:
                print(f"[train] --time_limit {args.time_limit} min reached after epoch {epoch}; "
                      f"resume with --resume {out_dir / 'checkpoint_last.pth'}")
            break
    log.close()
    return 0


def validate(model: nn.Module, val_ds, args, info: utils.DistInfo, epoch: int) -> dict[str, Any]:
    """The per-epoch validation (the spec's protocol) on the plain, unwrapped model."""
    loader = engine.eval_loader(val_ds, args.eval_batch_size, args.workers, args.pin_mem, info)
    return engine.evaluate(model, loader, info.device, args.amp, desc=f"val {epoch}")


def main() -> int:
    args = args_lib.get_parser().parse_args()
    engine.resolve_args(args, args.model or "fianet")
    return train(args)


if __name__ == "__main__":
    engine.cli_main(main)
