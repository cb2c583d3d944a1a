"""Train a referring segmentation model.

    python train.py --model fianet --dataset rrsisd ...                 # one process
    torchrun --nproc_per_node 4 train.py --model fianet ...             # DDP (gloo on CPU, NCCL on GPU)

The loop follows the references (data-train-eval.md §c): AdamW with the reference parameter groups,
a poly(0.9) schedule stepped every iteration, the reference loss of each model, validation after every
epoch and best-checkpoint selection on overall IoU (strictly greater). Differences that do not change
the maths: no per-step ``gc.collect`` / ``empty_cache`` / ``synchronize``; parameters the reference
never updates are frozen, so DDP runs without ``find_unused_parameters``; checkpoints are written
atomically with the optimiser, scheduler, scaler and RNG states, so ``--resume`` continues exactly.
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
from lib import losses, registry


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
    """The reference AdamW groups (data-train-eval.md §c.2), trainable parameters only:
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
# The run
# --------------------------------------------------------------------------------------------
def build_everything(args, info: utils.DistInfo):
    resume_ckpt = None
    if args.resume:
        resume_ckpt = engine.read_checkpoint(args.resume)
        stored = engine.checkpoint_model_name(resume_ckpt)
        if stored is None:
            raise UserError(f"--resume {args.resume} is not an OpenRRSIS training checkpoint "
                            f"(to fine-tune from an original checkpoint, evaluate it with test.py first)")
        if stored != args.model:
            raise UserError(f"--resume {args.resume} holds a '{stored}' model, but --model {args.model} was given")
        config = resume_ckpt["config"]
    else:
        config = engine.config_from_args(args)
    if args.grad_ckpt:
        config = {**config, "grad_ckpt": True}
    model = registry.build_model(config)
    if resume_ckpt is None:
        if args.pretrained_swin_weights:
            if not Path(args.pretrained_swin_weights).is_file():
                raise UserError(f"--pretrained_swin_weights {args.pretrained_swin_weights}: file not found")
            report = ckpt_lib.load_pretrained_swin(model, args.pretrained_swin_weights)
            if info.is_main:
                print(report)
        if ckpt_lib.has_bert_weights(args.ck_bert):
            ckpt_lib.load_pretrained_bert(model, args.ck_bert)
        elif info.is_main:
            print(f"[train] {args.ck_bert} has no weights: BERT starts from random initialisation")
    else:
        ckpt_lib.load_model_state(model, resume_ckpt["model"], strict=True)
    freeze_untrained_parameters(model, bert_pretrained=ckpt_lib.has_bert_weights(args.ck_bert))
    return model, config, resume_ckpt


def train(args) -> int:
    info = utils.init_distributed(args.device)
    utils.seed_everything(args.seed)  # the same seed on every rank, as the references
    device = info.device
    out_dir = Path(args.output_dir)
    if info.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "args.json").write_text(json.dumps(vars(args), indent=2, default=str))

    train_ds = engine.build_dataset(args, "train", mode="train")
    val_ds = None if args.no_val else engine.build_dataset(args, args.val_split, mode="eval",
                                                           eval_protocol="one-per-ref")
    model, config, resume_ckpt = build_everything(args, info)
    model.to(device)
    criterion = losses.build_criterion(config["model"])

    sampler = torch.utils.data.DistributedSampler(train_ds, num_replicas=info.world_size, rank=info.rank,
                                                  shuffle=True, seed=args.seed)
    loader = torch.utils.data.DataLoader(train_ds, batch_size=args.batch_size, sampler=sampler,
                                         num_workers=args.workers, pin_memory=args.pin_mem, drop_last=True,
                                         persistent_workers=False)
    if len(loader) == 0:
        raise UserError(f"--batch-size {args.batch_size} is larger than the training split "
                        f"({len(train_ds)} samples per process): nothing to train on")
    iters_per_epoch = len(loader) if args.max_steps is None else min(len(loader), args.max_steps)
    total_iters = iters_per_epoch * args.epochs

    groups = parameter_groups(model, args.weight_decay)
    optimizer = torch.optim.AdamW(groups, lr=args.lr, weight_decay=args.weight_decay, amsgrad=args.amsgrad,
                                  fused=device.type == "cuda")
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, poly_schedule(total_iters))
    scaler = torch.amp.GradScaler(device.type, enabled=args.amp == "fp16")

    start_epoch, best, iteration = 0, -0.1, 0
    if resume_ckpt is not None:
        optimizer.load_state_dict(resume_ckpt["optimizer"])
        scheduler.load_state_dict(resume_ckpt["lr_scheduler"])
        if "scaler" in resume_ckpt and resume_ckpt["scaler"]:
            scaler.load_state_dict(resume_ckpt["scaler"])
        start_epoch = int(resume_ckpt["epoch"]) + 1
        best = float(resume_ckpt.get("best_oIoU", best))
        iteration = int(resume_ckpt.get("iteration", 0))
        utils.set_rng_state(resume_ckpt["rng"])
        if info.is_main:
            print(f"[train] resumed from {args.resume}: epoch {start_epoch}, best oIoU {best:.4f}")
        del resume_ckpt

    net: nn.Module = model
    if info.distributed:
        if device.type == "cuda" and config["model"] in ("lavt", "lavt_one", "rmsin"):
            net = nn.SyncBatchNorm.convert_sync_batchnorm(net)  # the references use SyncBN under DDP
        net = nn.parallel.DistributedDataParallel(net, device_ids=[device.index] if device.type == "cuda" else None)
    if args.compile:
        # DDP first, then compile (PyTorch's recommended order): dynamo sees the DDP wrapper and its
        # DDPOptimizer splits the graph at the gradient-bucket boundaries, so each bucket's all-reduce
        # still overlaps the rest of the backward. Compiling the bare model inside DDP would instead
        # hand DDP one opaque compiled backward with every all-reduce at its end. Only the training
        # forward is compiled: validation calls the plain `model` (eval mode, other batch sizes would
        # only trigger recompilations).
        net = torch.compile(net, backend=args.compile_backend)

    writer = None
    if info.is_main:
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(log_dir=args.log_dir or str(out_dir / "tb"))
    epoch_log = utils.JsonlLogger(out_dir / "log.jsonl") if info.is_main else None
    word_masks = engine.uses_word_masks(model)
    aux_from_target = engine.forward_takes_target(model)
    started = time.time()

    for epoch in range(start_epoch, args.epochs):
        net.train()
        sampler.set_epoch(epoch)
        meters = utils.MetricLogger()
        nonfinite = torch.zeros((), dtype=torch.bool, device=device)
        bar = utils.progress(loader, enabled=info.is_main, total=iters_per_epoch, desc=f"epoch {epoch}")
        for step, batch in enumerate(bar):
            if step >= iters_per_epoch:
                break
            inputs = engine.model_inputs(batch, device, word_masks)
            target = batch["target"].to(device, non_blocking=True)
            loss = engine.training_loss(net, inputs, target, criterion, aux_from_target, device, args.amp)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            iteration += 1
            nonfinite |= ~torch.isfinite(loss.detach())
            if step % args.print_freq == 0 or step == iters_per_epoch - 1:
                value = loss.item()  # the only host sync of the step, every --print-freq steps
                if not math.isfinite(value) or nonfinite.item():
                    raise TrainingDiverged(
                        f"loss became {value} at epoch {epoch}, step {step}: stopped; the last good checkpoint "
                        f"in {out_dir} is kept (lower --lr or use --amp off)")
                lr = optimizer.param_groups[0]["lr"]
                meters.update(loss=value, lr=lr)
                if info.is_main:
                    bar.set_postfix(loss=f"{value:.4f}", lr=f"{lr:.2e}")
                    writer.add_scalar("train/loss", value, iteration)
                    writer.add_scalar("train/lr", lr, iteration)
        if nonfinite.item():
            raise TrainingDiverged(f"a non-finite loss occurred in epoch {epoch}: stopped; the last good "
                                   f"checkpoint in {out_dir} is kept")

        record: dict[str, Any] = {"epoch": epoch, "iteration": iteration, **{f"train_{k}": v for k, v in
                                                                             meters.averages().items()}}
        improved = False
        if val_ds is not None:
            val_loader = engine.eval_loader(val_ds, args.eval_batch_size, args.workers, args.pin_mem, info)
            summary = engine.evaluate(model, val_loader, device, args.amp, desc=f"val {epoch}")
            record.update({f"val_{k}": v for k, v in summary.items() if k != "per_category"})
            improved = summary["oIoU"] > best
            if improved:
                best = summary["oIoU"]
            if info.is_main:
                print(f"[epoch {epoch}] val oIoU {100 * summary['oIoU']:.2f}  mIoU {100 * summary['mIoU']:.2f}  "
                      f"P@0.5 {100 * summary['P@0.5']:.2f}  (best oIoU {100 * best:.2f})")
                for k in ("oIoU", "mIoU", "P@0.5"):
                    writer.add_scalar(f"val/{k}", summary[k], epoch)
        if info.is_main:
            payload = {
                "format": "openrrsis-checkpoint-v1",
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "lr_scheduler": scheduler.state_dict(),
                "scaler": scaler.state_dict() if args.amp == "fp16" else {},
                "epoch": epoch,
                "iteration": iteration,
                "best_oIoU": best,
                "rng": utils.get_rng_state(),
                "config": config,
                "args": json.loads(json.dumps(vars(args), default=str)),
            }
            ckpt_lib.save_checkpoint(out_dir / "checkpoint_last.pth", payload)
            if improved or val_ds is None:
                ckpt_lib.save_checkpoint(out_dir / "checkpoint_best.pth", payload)
            record["best_oIoU"] = best
            record["elapsed_s"] = round(time.time() - started, 1)
            epoch_log.write(record)
        last_epoch = epoch == args.epochs - 1
        out_of_time = (not last_epoch and args.time_limit is not None
                       and time.time() - started > args.time_limit * 60)
        if info.distributed:  # all ranks must leave the loop together: rank 0's clock decides
            flag = torch.tensor([float(out_of_time)], device=device)
            torch.distributed.broadcast(flag, src=0)
            out_of_time = bool(flag.item())
        if out_of_time:
            if info.is_main:
                print(f"[train] --time_limit {args.time_limit} min reached after epoch {epoch}; "
                      f"resume with --resume {out_dir / 'checkpoint_last.pth'}")
            break
    if writer is not None:
        writer.close()
    return 0


def main() -> int:
    args = args_lib.get_parser().parse_args()
    try:
        name = args_lib.resolve_model_name(args, registry.available_models()) or "fianet"
        args_lib.resolve(args, name)
    except ValueError as e:
        raise UserError(str(e)) from None
    return train(args)


if __name__ == "__main__":
    engine.cli_main(main)
