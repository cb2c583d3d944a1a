"""What train.py, test.py and demo.py share: building a model from flags or from a checkpoint,
building datasets, moving a batch to the model, and the batched evaluation loop.

Every entry point builds models through ``lib.registry`` and loads weights through
``lib.checkpoint``, so they cannot disagree on how a checkpoint is read.
"""
from __future__ import annotations

import argparse
import contextlib
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
from torch import nn

import args as args_lib
import utils
from args import parse_int_list
from lib import checkpoint as ckpt_lib
from lib import registry
from lib.spec import ModelSpec


class UserError(Exception):
    """A problem with the user's input: printed as one line, without a traceback."""


# --------------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------------
def swin_overrides(args: argparse.Namespace) -> dict[str, Any] | None:
    """Overrides of the Swin table from --swin_embed_dim / --swin_depths / --swin_heads (small
    models) and --drop_path_rate."""
    out: dict[str, Any] = {}
    if getattr(args, "swin_embed_dim", None):
        out["embed_dim"] = int(args.swin_embed_dim)
    rate = getattr(args, "drop_path_rate", None)
    if rate is not None:
        if not 0.0 <= rate < 1.0:
            raise UserError(f"--drop_path_rate must be in [0, 1), got {rate}")
        out["drop_path_rate"] = float(rate)
    depths = parse_int_list(getattr(args, "swin_depths", None), "--swin_depths")
    heads = parse_int_list(getattr(args, "swin_heads", None), "--swin_heads")
    if depths:
        out["depths"] = depths
    if heads:
        out["num_heads"] = heads
    return out or None


def window_size_from_args(args: argparse.Namespace) -> int | None:
    if getattr(args, "window_size", None):
        return int(args.window_size)
    if getattr(args, "window12", False):
        return 12
    return None  # registry applies the reference rule (file name of the Swin weights, else 7)


def bert_folder(path: str, flag: str = "--ck_bert") -> str:
    folder = Path(path)
    if not (folder / "config.json").is_file():
        raise UserError(f"{flag} {path}: no config.json there (expected a local BERT folder, "
                        f"e.g. ./pretrained_weights/bert-base-uncased)")
    import json

    try:
        json.loads((folder / "config.json").read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise UserError(f"{flag} {path}: config.json is not valid JSON ({e})") from None
    return str(folder)


def model_options(args: argparse.Namespace) -> dict[str, Any]:
    """The model flags of args.py as `ModelSpec.build_config` options (a builder ignores the ones
    it has no use for)."""
    # Only a BERT-side model needs the BERT folder (a CLIP model such as TRIS has none).
    needs_bert = registry.model_spec(args.model).text.tokenizer == "bert"
    return dict(
        swin_type=args.swin_type,
        window_size=window_size_from_args(args),
        pretrained_swin=args.pretrained_swin_weights or "",
        img_size=args.img_size,
        mha=args.mha,
        fusion_drop=args.fusion_drop,
        num_tmem=args.num_tmem,
        bert=bert_folder(args.ck_bert) if needs_bert else "",
        swin_overrides=swin_overrides(args),
        loss_weight_flags={k: getattr(args, k, None) for k in ("w4", "w1", "w5")},  # TRIS stage 1
    )


def config_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """The model config (plain data) that the flags describe."""
    try:
        if getattr(args, "tiny", False):  # the spec's seconds-on-a-CPU variant (tests, quick pipelines)
            options = {k: v for k, v in model_options(args).items() if v is not None}
            return registry.tiny_model_config(args.model, **options)
        return registry.model_config(args.model, **model_options(args))
    except (ValueError, KeyError) as e:
        raise UserError(str(e).strip().splitlines()[0]) from None


def spec_of(model: nn.Module) -> ModelSpec:
    """The `ModelSpec` of a built model (through DDP / torch.compile wrappers)."""
    return _unwrapped(model).spec


def load_pretrained(model: nn.Module, swin_path: str, bert_dir: str, verbose: bool = True, clip_path: str = "",
                    allow_torchscript: bool = False) -> list[str]:
    """ImageNet backbone weights (``--pretrained_swin_weights``), language weights (a BERT
    folder with weights) and CLIP weights (``--clip_weights``, through the model's
    ``load_pretrained_clip``) into a freshly built model. With Swin and BERT given, or with CLIP
    weights, every key left at its random initialisation must be one the model's spec expects to
    stay missing (else a key report). Returns the loaded keys."""
    loaded: list[str] = []
    if clip_path:
        hook = getattr(_unwrapped(model), "load_pretrained_clip", None)
        if not callable(hook):
            name = getattr(_unwrapped(model), "config", {}).get("model", type(model).__name__)
            raise UserError(f"--clip_weights {clip_path}: the {name} model has no CLIP backbone to load it into")
        if not Path(clip_path).is_file():
            raise UserError(f"--clip_weights {clip_path}: file not found")
        try:
            loaded += hook(clip_path, allow_torchscript=allow_torchscript)
        except ckpt_lib.CheckpointError as e:
            raise UserError(f"--clip_weights {clip_path}: {str(e).strip().splitlines()[0]}") from None
        if not swin_path:  # a CLIP model has no other pretrained part: check its coverage now
            ckpt_lib.check_pretrained_coverage(model, loaded, spec_of(model).unexpected_missing)
    if swin_path:
        if not Path(swin_path).is_file():
            raise UserError(f"--pretrained_swin_weights {swin_path}: file not found")
        try:
            loaded += ckpt_lib.load_pretrained_swin(model, swin_path)
        except ckpt_lib.CheckpointError as e:
            raise UserError(f"--pretrained_swin_weights {swin_path}: {str(e).splitlines()[0]}") from None
    has_bert = bool(bert_dir) and ckpt_lib.has_bert_weights(bert_dir)
    if has_bert:
        try:
            loaded += ckpt_lib.load_pretrained_bert(model, bert_dir)
        except Exception as e:  # transformers / torch.load raise many types for a corrupt file
            raise UserError(f"--ck_bert {bert_dir}: its BERT weights are not readable (corrupt or another "
                            f"format: {type(e).__name__})") from None
    elif verbose and bert_dir:
        print(f"[train] {bert_dir} has no weights: the language encoder starts from random initialisation")
    if swin_path and has_bert:
        ckpt_lib.check_pretrained_coverage(model, loaded, spec_of(model).unexpected_missing)
    return loaded


def resolve_args(args: argparse.Namespace, name: str) -> argparse.Namespace:
    """Check ``--model`` / ``--dataset`` and fill the flags left unset from the model's reference
    recipe for the dataset (one-line errors)."""
    try:
        name = args_lib.resolve_model_name(argparse.Namespace(model=name), registry.available_models()) or name
        spec = registry.model_spec(name)
        if getattr(args, "img_size", None) is None:
            args.img_size = spec.default_img_size
        return args_lib.resolve(args, name, spec.recipe(args.dataset).as_flags())
    except ValueError as e:
        raise UserError(str(e)) from None


def checkpoint_model_name(ckpt: dict[str, Any]) -> str | None:
    cfg = ckpt.get("config")
    return cfg.get("model") if isinstance(cfg, dict) else None


def read_checkpoint(path: str) -> dict[str, Any]:
    """Load a checkpoint file safely (weights_only with an allow-list) or an exported folder
    (safetensors, no pickle); one-line errors."""
    if not path:
        raise UserError("--resume: no checkpoint given (pass --resume PATH)")
    if not Path(path).exists():
        raise UserError(f"--resume {path}: file not found")
    try:
        ckpt = ckpt_lib.read_checkpoint_file_or_folder(path)  # a .pth file or an exported folder
    except Exception as e:  # corrupt or hostile file
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"--resume {path}: cannot be read ({msg})") from None
    if not isinstance(ckpt, dict):
        raise UserError(f"--resume {path}: not a checkpoint dictionary")
    return ckpt


def model_from_checkpoint(ckpt: dict[str, Any], path: str, args: argparse.Namespace | None = None, *,
                          strict: bool = True) -> nn.Module:
    """Build the model a checkpoint holds: ours (config inside) or an original one (config from flags).

    Raises ``UserError`` with one line for a checkpoint of another model than ``--model`` or a key
    mismatch (e.g. a wrong ``--num_tmem`` or window size).
    """
    requested = getattr(args, "model", None) if args is not None else None
    stored = checkpoint_model_name(ckpt)
    if stored is not None:
        if requested and requested != stored:
            raise UserError(f"--resume {path} holds a '{stored}' model, but --model {requested} was given")
        config = ckpt["config"]
    else:
        if args is None or not requested:
            raise UserError(f"--resume {path} is not an OpenRRSIS checkpoint (no config inside): "
                            f"pass --model and the model flags it was trained with")
        config = config_from_args(args)
    try:
        model = registry.build_model(config)
    except (ValueError, KeyError) as e:
        raise UserError(f"--resume {path}: its model config cannot be built ({str(e).splitlines()[0]})") from None
    try:
        state = ckpt_lib.extract_state_dict(ckpt)
        # Keys an original checkpoint carries that the model deliberately does not hold
        # (CrossVLT's never-optimised `temp` in the reference's training files).
        for key in getattr(model, "checkpoint_ignored_keys", ()):
            state.pop(key, None)
        report = ckpt_lib.load_model_state(model, state, strict=strict, source=path)
    except ckpt_lib.NonFiniteWeightsError as e:
        raise UserError(f"--resume {e}") from None
    except ckpt_lib.CheckpointMismatchError as e:
        first = str(e).strip().splitlines()
        hint = " (check --num_tmem, --window12, --swin_type and --model)" if stored is None else ""
        raise UserError(f"--resume {path} does not match the model{hint}: " + " | ".join(first[:6])) from None
    if not strict and utils.is_main_process():
        print(report)
    return model


# --------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------
def tokenizer_name(spec: ModelSpec, bert_tokenizer: str | None, clip_bpe: str | None = None) -> str | None:
    """The data side's tokenizer for a model: its BERT folder (``--bert_tokenizer``) or CLIP's BPE
    (``--clip_bpe``, default the vocabulary shipped with open_clip_torch)."""
    from data.tokenizer import clip_name

    if spec.text.tokenizer == "clip":
        return clip_name(clip_bpe)
    return bert_tokenizer


def build_dataset(args: argparse.Namespace, split: str, mode: str, eval_protocol: str = "all"):
    from data import datasets

    spec = registry.model_spec(args.model)

    kwargs: dict[str, Any] = dict(img_size=args.img_size, max_tokens=args.max_tokens, mode=mode,
                                  eval_protocol=eval_protocol, seed=args.seed, cache_dir=args.cache_dir,
                                  # NLTK word masks only for the models that read them (FIANet)
                                  word_masks=spec.text.word_masks, mean=spec.mean, std=spec.std)
    if args.dataset in datasets.REFER_DATASETS and args.splitBy:
        kwargs["splitBy"] = args.splitBy
    if mode == "train" and getattr(args, "pseudo_path", None):
        kwargs["pseudo_masks"] = args.pseudo_path  # targets = pseudo masks; the training GT becomes unreadable
    negatives = getattr(args, "negative_samples", None)  # the model's recipe (TRIS stage 1: 3) or the flag
    if mode == "train" and negatives:
        if negatives < 0:
            raise UserError(f"--negative_samples {negatives}: must be >= 0")
        kwargs["negative_samples"] = int(negatives)
    try:
        tokenizer = tokenizer_name(spec, args.bert_tokenizer, getattr(args, "clip_bpe", None))
        ds = datasets.build_dataset(args.dataset, args.refer_data_root, split, tokenizer, **kwargs)
    except (FileNotFoundError, ValueError, KeyError, OSError) as e:
        raise UserError(str(e).strip().splitlines()[0] if str(e).strip() else repr(e)) from None
    if len(ds) == 0:
        raise UserError(f"--split {split}: no samples in {args.refer_data_root} for dataset {args.dataset}")
    return ds


def check_image_files(ds, split: str) -> None:
    """A stat pass over every image a dataset reads (seconds at RRSIS-D scale): a missing or empty
    file is reported with one line before the first step, not as a crash mid-epoch."""
    import os

    missing, empty = [], []
    for path in sorted({s.image_path for s in getattr(ds, "samples", ())}):
        try:
            if os.stat(path).st_size == 0:
                empty.append(path)
        except OSError:
            missing.append(path)
    if missing or empty:
        first = missing[0] if missing else empty[0]
        raise UserError(f"--split {split}: {len(missing)} image file(s) missing and {len(empty)} empty, e.g. {first} "
                        f"(python -m data.check lists them all)")


def eval_loader(ds, batch_size: int, workers: int, pin: bool, info: utils.DistInfo) -> torch.utils.data.DataLoader:
    sampler = utils.ShardSampler(len(ds), info.rank, info.world_size)
    return torch.utils.data.DataLoader(ds, batch_size=batch_size, sampler=sampler, num_workers=workers,
                                       pin_memory=pin, drop_last=False)


# --------------------------------------------------------------------------------------------
# Forward passes
# --------------------------------------------------------------------------------------------
def autocast(device: torch.device, amp: str) -> contextlib.AbstractContextManager:
    """bf16 / fp16 autocast on the device, or nothing for ``--amp off`` (``auto`` must have been
    resolved by `utils.resolve_amp` first)."""
    if amp not in ("off", "bf16", "fp16"):
        raise ValueError(f"amp {amp!r}: resolve --amp with utils.resolve_amp before running a model")
    if amp == "off":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if amp == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def _unwrapped(model: nn.Module) -> nn.Module:
    """The model inside a DDP and / or torch.compile wrapper."""
    inner = getattr(model, "_orig_mod", model)
    inner = getattr(inner, "module", inner)
    return getattr(inner, "_orig_mod", inner)


def to_device(batch: Mapping[str, Any], device: torch.device) -> dict[str, Any]:
    """The batch with every tensor moved to ``device`` (strings and lists stay)."""
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


def model_inputs(batch: Mapping[str, Any], keys: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """The keyword arguments of a model's forward: the batch entries its spec names."""
    missing = [k for k in keys if k not in batch]
    if missing:
        raise KeyError(f"the batch lacks {', '.join(missing)} (the model's forward takes {', '.join(keys)})")
    return {k: batch[k] for k in keys}


def training_loss(net: nn.Module, batch: Mapping[str, Any], device: torch.device,
                  amp: str) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One training forward under ``--amp`` autocast (inputs: the spec's ``training_inputs``) and
    the model's named loss terms in float32, outside autocast. Returns ``(total, terms)``; ``batch``
    must already be on ``device``."""
    model = _unwrapped(net)
    with autocast(device, amp):
        outputs = net(**model_inputs(batch, spec_of(model).training_inputs))
    terms = model.loss(outputs, batch)
    total = sum(t.float() for t in terms.values())
    return total, terms


def all_finite(outputs: Any) -> bool:
    """Whether every floating tensor in a model's outputs (tensor / list / tuple / dict) is finite.
    One host sync per call: evaluation checks every batch, so broken weights stop it at once."""
    if torch.is_tensor(outputs):
        return not outputs.is_floating_point() or bool(torch.isfinite(outputs).all())
    if isinstance(outputs, Mapping):
        return all(all_finite(v) for v in outputs.values())
    if isinstance(outputs, (list, tuple)):
        return all(all_finite(v) for v in outputs)
    return True


# --------------------------------------------------------------------------------------------
# Inference options (test.py / demo.py / predict.py: --quantize, --channels_last, --inference_mode)
# --------------------------------------------------------------------------------------------
# The defaults of the inference flags: the options that leave every number unchanged.
INFERENCE_DEFAULTS: dict[str, str] = {"quantize": "off", "channels_last": "auto", "inference_mode": "on"}

# Modules whose forward passes the weights of their nn.Linear children to a functional op
# (``F.multi_head_attention_forward(q_proj_weight=self.q_proj.weight, ...)``) instead of calling
# them: a dynamically quantised Linear has no float ``.weight`` tensor, so these stay float.
# Matched by class name so that engine need not import every model file.
FLOAT_LINEAR_OWNERS: tuple[str, ...] = ("AttentionPool2d",)  # CLIP RN50's attention pooling (TRIS)


def inference_options(args: argparse.Namespace) -> dict[str, str]:
    """The inference flags of a parsed command line (defaults for a namespace without them, e.g.
    one from `args.get_parser`), as recorded in test.py's results JSON."""
    return {k: str(getattr(args, k, None) or v) for k, v in INFERENCE_DEFAULTS.items()}


def float_linear_names(model: nn.Module) -> list[str]:
    """Qualified names of the nn.Linear modules `quantize_int8` keeps in float32: the Linear
    children of the modules in `FLOAT_LINEAR_OWNERS`."""
    names = []
    for owner_name, owner in model.named_modules():
        if type(owner).__name__ in FLOAT_LINEAR_OWNERS:
            for child_name, child in owner.named_children():
                if type(child) is nn.Linear:
                    names.append(f"{owner_name}.{child_name}" if owner_name else child_name)
    return names


def quantize_int8(model: nn.Module) -> dict[str, int]:
    """Dynamic int8 quantisation of the model's nn.Linear layers, in place (CPU inference only).

    ``torch.ao.quantization.quantize_dynamic``: every ``nn.Linear`` (the BERT layers, the Swin
    attention qkv / projection and MLP layers, the fusion modules' Linear layers) becomes a
    ``DynamicQuantizedLinear`` with qint8 weights (one scale per output channel) whose input is
    quantised to uint8 per batch from its observed range, and the int8 GEMM's result is returned
    in float32. Convolutions, LayerNorm / BatchNorm, attention products and the 1x1 projections
    written as convolutions stay float32; so do ``nn.MultiheadAttention``'s projections (PyTorch
    excludes its ``out_proj`` by type) and the Linear layers listed by `float_linear_names`.

    Returns ``{"quantized": n, "kept_float": m}`` (counts of Linear layers).
    """
    try:
        from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic
    except ImportError:  # torch.ao.quantization is deprecated and may leave a future torch
        raise UserError(f"--quantize int8: this torch ({torch.__version__}) has no "
                        f"torch.ao.quantization.quantize_dynamic; use --quantize off") from None
    keep = float_linear_names(model)
    total = sum(1 for m in model.modules() if type(m) is nn.Linear)
    spec: dict[Any, Any] = {nn.Linear: per_channel_dynamic_qconfig}
    spec.update({name: None for name in keep})  # a name entry overrides the type entry for that module
    import warnings

    with warnings.catch_warnings():
        # torch 2.10+ marks torch.ao.quantization (and quantised tensor creation) deprecated; the
        # eager API still works and is what this option documents.
        warnings.filterwarnings("ignore", message=r".*(torch\.ao\.quantization|quantize_per_tensor).*")
        quantize_dynamic(model, spec, dtype=torch.qint8, inplace=True)
    left = sum(1 for m in model.modules() if type(m) is nn.Linear)
    return {"quantized": total - left, "kept_float": left}


def prepare_for_inference(model: nn.Module, device: torch.device, *, quantize: str = "off",
                          channels_last: str = "auto") -> nn.Module:
    """A loaded model made ready for test.py / demo.py / predict.py: ``eval()``, the decoder
    layout of ``--channels_last`` (``auto``: the model's own default, i.e. channels-last on CUDA
    only; ``on`` / ``off`` force it) and ``--quantize int8`` (`quantize_int8`, CPU only). The
    model must already be on ``device``. One-line ``UserError`` for an option the model or the
    device cannot take. Returns the same module."""
    model.eval()
    inner = _unwrapped(model)
    name = getattr(inner, "config", {}).get("model", type(inner).__name__)
    if channels_last not in ("auto", "on", "off"):
        raise UserError(f"--channels_last {channels_last!r}: choose auto, on or off")
    if channels_last != "auto":
        switch = getattr(inner, "set_channels_last", None)
        if not callable(switch):
            raise UserError(f"--channels_last {channels_last}: the {name} model has no channels-last decoder "
                            f"switch (only 'auto' applies to it)")
        switch(channels_last == "on")
    check_quantize_device(quantize, device)
    if quantize == "int8":
        quantize_int8(inner)
    return model


def check_quantize_device(quantize: str, device: torch.device | str) -> None:
    """One-line ``UserError`` unless ``--quantize`` is off or the device is the CPU (PyTorch's
    dynamically quantised Linear has CPU kernels only). Entry points call it with the ``--device``
    flag before opening the device, and `prepare_for_inference` again with the resolved one
    (``--device auto`` on a GPU machine)."""
    if quantize not in ("off", "int8"):
        raise UserError(f"--quantize {quantize!r}: choose off or int8")
    kind = device.type if isinstance(device, torch.device) else str(device).split(":")[0]
    if quantize == "int8" and kind not in ("cpu", "auto"):
        raise UserError(f"--quantize int8: dynamic int8 quantisation runs on the CPU only, not on --device "
                        f"{device}; use --device cpu or --quantize off")


def inference_context(inference_mode: bool | str = True) -> contextlib.AbstractContextManager:
    """``torch.inference_mode()`` (``--inference_mode on``, the default) or ``torch.no_grad()``.
    Both compute the same numbers; inference mode also skips autograd's version counters and view
    tracking, and its tensors cannot enter autograd later."""
    on = inference_mode not in (False, "off")
    return torch.inference_mode() if on else torch.no_grad()


OnBatch = Callable[[dict[str, Any], torch.Tensor, torch.Tensor], None]


def evaluate(model: nn.Module, loader: torch.utils.data.DataLoader, device: torch.device, amp: str = "off",
             on_batch: OnBatch | None = None, show_progress: bool = True, desc: str = "eval",
             inference_mode: bool = True) -> dict[str, Any]:
    """`evaluate_batches` under ``torch.inference_mode`` (default) or ``torch.no_grad``
    (``inference_mode=False``): the same numbers either way."""
    with inference_context(inference_mode):
        return evaluate_batches(model, loader, device, amp, on_batch, show_progress, desc)


def evaluate_batches(model: nn.Module, loader: torch.utils.data.DataLoader, device: torch.device, amp: str = "off",
                     on_batch: OnBatch | None = None, show_progress: bool = True,
                     desc: str = "eval") -> dict[str, Any]:
    """Reference metrics over a loader (batched; sums stay on the device; reduced over ranks).

    ``on_batch(batch, pred, iou)`` receives every batch's predictions (B, H, W) and per-sample IoUs,
    e.g. to save masks or overlays.

    When the model's spec sets ``eval_at_original_resolution`` (TRIS, Liu et al., ICCV 2023, Sec. 4),
    the metrics compare ``predict_mask`` at each image's own size with the ground truth at that size
    (``loader.dataset.original_mask``), and the summary adds ``Hit`` / ``PointM``: the arg-max of
    ``predict_scores`` at that size inside the annotated box (else the mask's bounding box) / on the
    mask. ``on_batch`` is then called once per sample with that sample's slice of the batch, its
    ``target`` at the original size and its ``image`` resized to it.
    """
    model.eval()
    metrics = utils.SegMetrics(device)
    inner = _unwrapped(model)
    spec = spec_of(inner)
    keys = spec.inputs
    points = utils.PointMetrics(device) if spec.eval_at_original_resolution else None
    dataset = loader.dataset
    while isinstance(dataset, torch.utils.data.Subset):  # items carry the underlying dataset's index
        dataset = dataset.dataset
    if points is not None:
        for method in ("sample_index", "original_mask"):
            if not callable(getattr(dataset, method, None)):
                raise UserError(f"{desc}: the model is evaluated at the original resolution, but the dataset "
                                f"{type(dataset).__name__} has no {method}()")
    bar = utils.progress(loader, enabled=show_progress and utils.is_main_process(), desc=desc, leave=False)
    for step, batch in enumerate(bar):
        batch = to_device(batch, device)
        with autocast(device, amp):
            outputs = model(**model_inputs(batch, keys))
        if not all_finite(outputs):
            raise UserError(f"{desc}: the model's outputs became NaN / inf at batch {step}; its weights are broken "
                            f"or --amp {amp} overflows (try --amp off); no metrics written")
        if points is not None:
            _evaluate_at_original_resolution(inner, outputs, batch, dataset, metrics, points, on_batch)
            continue
        gt = batch["target"]
        pred = inner.predict_mask(outputs, gt.shape[-2:])  # the model's own rule (argmax, sigmoid > 0.5 ...)
        iou = metrics.update(pred, gt, list(batch.get("category", [])) or None)
        if on_batch is not None:
            on_batch(batch, pred, iou)
    metrics.all_reduce()
    summary = metrics.summary()
    if points is not None:
        points.all_reduce()
        summary.update(points.summary())
        summary["resolution"] = "original"  # I and U counted at each image's own size
    return summary


def _sample_of(batch: Mapping[str, Any], k: int) -> dict[str, Any]:
    """Item ``k`` of a collated batch as a batch of one (tensors and lists sliced)."""
    return {key: v[k:k + 1] if torch.is_tensor(v) or isinstance(v, (list, tuple)) else v for key, v in batch.items()}


def _evaluate_at_original_resolution(inner: nn.Module, outputs: Any, batch: Mapping[str, Any], ds: Any,
                                     metrics: utils.SegMetrics, points: utils.PointMetrics,
                                     on_batch: OnBatch | None) -> None:
    """One batch evaluated against the ground truth at each image's own size. The model's rules
    (``predict_mask`` / ``predict_scores``) run once per distinct size in the batch (they take the
    whole batch's outputs), and the rows of the samples of that size are kept."""
    device = batch["target"].device
    rows = [ds.sample_index(int(i)) for i in batch["index"]]
    gts = [torch.as_tensor(ds.original_mask(r)).to(device).bool() for r in rows]
    box_of = getattr(ds, "original_box", None)
    boxes = [box_of(r) if callable(box_of) else None for r in rows]
    categories = list(batch.get("category", []))
    by_size: dict[tuple[int, int], list[int]] = {}
    for k, gt in enumerate(gts):
        by_size.setdefault(tuple(gt.shape[-2:]), []).append(k)
    preds: dict[int, torch.Tensor] = {}
    ious: dict[int, torch.Tensor] = {}
    for size, members in by_size.items():
        sel = torch.tensor(members, device=device)
        pred = inner.predict_mask(outputs, size).index_select(0, sel)
        scores = inner.predict_scores(outputs, size).index_select(0, sel).float()
        iou = metrics.update(pred, torch.stack([gts[k] for k in members]), [categories[k] for k in members] or None)
        for j, k in enumerate(members):
            box = utils.coco_box_to_xyxy(boxes[k]) if boxes[k] is not None else utils.mask_box(gts[k])
            points.update(scores[j], box, gts[k])
            preds[k], ious[k] = pred[j], iou[j:j + 1]
    if on_batch is None:
        return
    for k, gt in enumerate(gts):
        sample = _sample_of(batch, k)
        sample["target"] = gt[None].long()
        if torch.is_tensor(sample.get("image")):
            sample["image"] = torch.nn.functional.interpolate(sample["image"].float(), size=tuple(gt.shape),
                                                              mode="bilinear", align_corners=False)
        on_batch(sample, preds[k][None], ious[k])


DISK_FULL_ERRNOS = {28, 27, 122}  # ENOSPC, EFBIG, EDQUOT


def disk_full_message(e: BaseException, path: str | Path | None = None) -> str | None:
    """One line for a write that failed for lack of space (None for other errors). ``torch.save``
    wraps the OSError in a RuntimeError, so the exception's context chain is searched."""
    seen = 0
    while e is not None and not (isinstance(e, OSError) and e.errno in DISK_FULL_ERRNOS) and seen < 8:
        e, seen = e.__cause__ or e.__context__, seen + 1
    if not isinstance(e, OSError) or e.errno not in DISK_FULL_ERRNOS:
        return None
    where = path or e.filename or "the output file"
    return f"{where}: no space left on device / file size limit reached ({e.strerror or e}); free space and resume"


def _worker_error_line(e: BaseException) -> str:
    """A DataLoader worker re-raises our one-line data errors wrapped in its traceback text: keep
    the original message (the last line)."""
    lines = [line for line in str(e).strip().splitlines() if line.strip()]
    last = lines[-1] if lines else type(e).__name__
    name = type(e).__name__ + ": "
    return last[len(name):] if last.startswith(name) else last


def cli_main(fn: Callable[[], int | None]) -> None:
    """Run an entry point: user errors become one line on stderr and exit code 2."""
    import sys

    from data.datasets import DatasetError, DatasetFileNotFoundError

    try:
        code = fn()
    except (UserError, utils.DeviceUnavailableError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except (DatasetError, DatasetFileNotFoundError) as e:
        print(f"error: {_worker_error_line(e)}", file=sys.stderr)
        sys.exit(2)
    except OSError as e:
        msg = disk_full_message(e)
        if msg is None:
            raise
        print(f"error: {msg}", file=sys.stderr)
        sys.exit(2)
    except ckpt_lib.CheckpointMismatchError as e:
        print("error: " + " | ".join(str(e).strip().splitlines()[:6]), file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    finally:
        utils.cleanup_distributed()
    sys.exit(code or 0)
