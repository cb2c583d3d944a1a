"""Every command-line flag of train.py, test.py and demo.py, defined in one place.

The original repositories' flag names and meanings are kept (LAVT / RMSIN / FIANet ``args.py``), so
their README commands run unchanged apart from the launcher (``torchrun`` instead of
``python -m torch.distributed.launch``; ``--local_rank`` / ``--local-rank`` are accepted and
ignored). Flags whose reference default depends on the model or dataset (lr, epochs, batch size,
weight decay, seed, ``--num_tmem``, the token limit) default to ``None`` here and are filled in by
``resolve`` from the model's reference recipe (``ModelSpec.recipes``, declared in the model's file).
"""
from __future__ import annotations

import argparse
from typing import Any

AMP_CHOICES = ("auto", "off", "bf16", "fp16")
AMP_HELP = ("mixed precision (auto: bf16 on a GPU with bf16 and on a CPU with avx512_bf16 / amx_bf16, fp16 on an "
            "older GPU, off = float32 elsewhere; the resolved value is logged and stored; OPENRRSIS_AMP pins what "
            "auto picks)")
DATASETS = ("rrsisd", "refsegrs", "refcoco", "refcoco+", "refcocog", "refclef", "referit_tris")


def _add_common(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--model", default=None,
                   help="model name (lavt, lavt_one, fianet, rmsin, crossvlt, ...); test/demo: default from the "
                        "checkpoint; train: fianet")
    g.add_argument("--model_id", default="FIANet",
                   help="name tag of a run, kept for the originals' commands (it never chooses the model)")
    g.add_argument("--swin_type", default="base", choices=["tiny", "small", "base", "large"])
    g.add_argument("--window12", action="store_true", help="use window size 12 (needed at test time)")
    g.add_argument("--mha", default="", help="PWAM heads per stage 'a-b-c-d' (empty: 1-1-1-1)")
    g.add_argument("--fusion_drop", default=0.0, type=float, help="dropout in the language fusion modules")
    g.add_argument("--num_tmem", default=None, type=int, help="FIANet TMEM blocks (reference: 1 RefSegRS, 3 RRSIS-D)")
    g.add_argument("--img_size", default=None, type=int,
                   help="square input size (default: the model's, e.g. 480; test.py: the checkpoint's)")
    g.add_argument("--swin_embed_dim", default=None, type=int, help="override the Swin width (small test models)")
    g.add_argument("--swin_depths", default=None, help="override Swin depths, e.g. 2-2-2-2")
    g.add_argument("--swin_heads", default=None, help="override Swin heads per stage, e.g. 1-2-4-8")
    g.add_argument("--window_size", default=None, type=int, help="explicit Swin window size (overrides --window12)")
    g.add_argument("--drop_path_rate", default=None, type=float,
                   help="Swin stochastic depth rate (default: the reference 0.3; small models learn faster with 0)")
    g.add_argument("--tiny", action="store_true",
                   help="train.py: build the model's tiny variant (its spec's seconds-on-a-CPU options; tests, "
                        "quick pipeline runs)")
    g.add_argument("--grad_ckpt", action="store_true", help="activation checkpointing in the Swin stages")
    g.add_argument("--compile", action="store_true",
                   help="train.py: torch.compile the (DDP-wrapped) model; validation runs the plain model")
    g.add_argument("--compile_backend", default="inductor",
                   help="torch.compile backend for --compile: inductor (default; needs a C++ compiler, slow to "
                        "compile), aot_eager (no code generation: fast to start, tests), eager, ...")

    g = p.add_argument_group("weights")
    g.add_argument("--bert_tokenizer", default="./pretrained_weights/bert-base-uncased",
                   help="local folder with vocab.txt")
    g.add_argument("--clip_bpe", default=None,
                   help="CLIP models: a local bpe_simple_vocab_16e6.txt.gz (default: the copy shipped with open_clip_torch)")
    g.add_argument("--ck_bert", default="./pretrained_weights/bert-base-uncased",
                   help="local BERT folder (config.json, optional weights)")
    g.add_argument("--pretrained_swin_weights", default="",
                   help="official Swin checkpoint (its file name decides window 12, as in the original)")
    g.add_argument("--clip_weights", default="",
                   help="train.py, CLIP models: local CLIP weights for the backbone (a plain state_dict or an "
                        "open_clip file; OpenAI's RN50.pt archive needs --allow_torchscript)")
    g.add_argument("--allow_torchscript", "--clip_allow_torchscript", dest="allow_torchscript", action="store_true",
                   help="allow --clip_weights / --clip_vitb32 to be a TorchScript archive (OpenAI's RN50.pt / "
                        "ViT-B-32.pt): it is code, opened with torch.jit.load; use only files you trust")
    g.add_argument("--resume", default="", help="checkpoint to resume (train) or evaluate (test)")
    g.add_argument("--non_strict", action="store_true",
                   help="allow a partial checkpoint load (the missing/unexpected keys are printed)")

    g = p.add_argument_group("data")
    g.add_argument("--dataset", default="rrsisd", help=f"one of {', '.join(DATASETS)}")
    g.add_argument("--refer_data_root", default="./refer/data/", help="dataset root folder")
    g.add_argument("--splitBy", default=None,
                   help="REFER split file refs(<splitBy>).p: unc (default; refcocog: umd), umd, google or berkeley (refclef)")
    g.add_argument("--split", default="test",
                   help="split(s) evaluated by test.py: a name, a comma list (val,test) or 'all' (every split but train)")
    g.add_argument("--max_tokens", default=None, type=int,
                   help="token limit (reference: 22 for FIANet on RRSIS-D, else 20)")
    g.add_argument("--eval_protocol", default="all", choices=["all", "one-per-ref"],
                   help="evaluate every sentence of every ref, or one seeded random sentence per ref (FIANet)")
    g.add_argument("--cache_dir", default=None, help="where token ids and word masks are cached")
    g.add_argument("-j", "--workers", default=4, type=int, help="DataLoader workers")
    g.add_argument("--pin_mem", action="store_true", help="DataLoader pin_memory")

    g = p.add_argument_group("run")
    g.add_argument("--device", default="auto", help="cuda, cuda:N, cpu or auto")
    g.add_argument("--amp", default="auto", choices=AMP_CHOICES,
                   help=AMP_HELP)
    g.add_argument("--seed", default=None, type=int, help="random seed (default: the model's reference seed, e.g. 2401)")
    g.add_argument("--output-dir", "--output_dir", dest="output_dir", default="./checkpoints/",
                   help="checkpoints, logs and args.json")
    g.add_argument("--log_dir", default=None, help="TensorBoard folder (default: <output-dir>/tb)")
    g.add_argument("--print-freq", "--print_freq", dest="print_freq", default=10, type=int,
                   help="log (and check the loss for NaN) every N steps")
    g.add_argument("--eval_batch_size", default=8, type=int, help="batch size of validation / test")
    g.add_argument("--local_rank", "--local-rank", dest="local_rank", default=None, type=int,
                   help="accepted for the legacy launcher and ignored (torchrun sets LOCAL_RANK)")


def add_inference_flags(p: argparse.ArgumentParser) -> None:
    """The inference options of test.py, demo.py and predict.py (one group, defined once)."""
    g = p.add_argument_group("inference (test.py, demo.py, predict.py)")
    g.add_argument("--quantize", default="off", choices=["off", "int8"],
                   help="int8: dynamic int8 quantisation of the nn.Linear layers (qint8 weights, activations "
                        "quantised per batch) after the checkpoint is loaded; CPU only; changes the numbers "
                        "slightly (BENCHMARKS.md, 'CPU inference options')")
    g.add_argument("--channels_last", default="auto", choices=["auto", "on", "off"],
                   help="channels-last (NHWC) decoder layout: auto = CUDA only, on / off force it (LAVT-family "
                        "decoders only); the numbers stay the same up to float rounding")
    g.add_argument("--inference_mode", default="on", choices=["on", "off"],
                   help="on: run under torch.inference_mode; off: torch.no_grad (same numbers)")


def get_parser() -> argparse.ArgumentParser:
    """The parser shared by train.py and test.py (test.py adds `add_inference_flags`: `get_test_parser`)."""
    p = argparse.ArgumentParser(description="OpenRRSIS training and evaluation", allow_abbrev=False)
    _add_common(p)
    g = p.add_argument_group("training")
    g.add_argument("--epochs", default=None, type=int, help="epochs (reference recipe per model/dataset)")
    g.add_argument("--lr", default=None, type=float, help="learning rate (reference recipe per model/dataset)")
    g.add_argument("--wd", "--weight-decay", dest="weight_decay", default=None, type=float,
                   help="weight decay (reference recipe per model/dataset: 1e-2)")
    g.add_argument("--amsgrad", action="store_true", help="AdamW amsgrad")
    g.add_argument("-b", "--batch-size", "--batch_size", dest="batch_size", default=None, type=int,
                   help="batch size per process (reference recipe per model)")
    g.add_argument("--val_split", default="val",
                   help="split validated after every epoch for best-checkpoint selection "
                        "(the FIANet reference used 'test')")
    g.add_argument("--max_steps", default=None, type=int,
                   help="stop each epoch after N steps (quick experiments)")
    g.add_argument("--time_limit", default=None, type=float,
                   help="stop training after this many minutes (checkpoint kept, resumable)")
    g.add_argument("--no_val", action="store_true", help="skip the per-epoch validation")
    g.add_argument("--pseudo_path", default=None,
                   help="train on pseudo masks (a tools.pseudo_masks folder) instead of the ground truth: the "
                        "training split's masks are never read (TRIS stage 2)")
    g.add_argument("--lr_multi", default=None, type=float,
                   help="learning-rate factor of the backbone parameter groups (those a model scales below 1; "
                        "default: the model's own, e.g. TRIS 0.1)")
    g.add_argument("--negative_samples", default=None, type=int,
                   help="hard negative sentences per training sample (default: the model's recipe, TRIS stage 1: 3; "
                        "0 = none)")
    for flag, term, default in (("--w4", "text-as-class loss", 5.0), ("--w1", "positive calibration loss", 1.0),
                                ("--w5", "negative calibration loss", 2.0)):
        g.add_argument(flag, default=None, type=float,
                       help=f"TRIS stage 1: weight of the {term} (the reference's {flag}, default {default:g}; "
                            "0 drops the term, and with --w1 0 --w5 0 no calibrator is built)")
    g.add_argument("--clip_vitb32", default="",
                   help="TRIS stage 1: the frozen CLIP ViT-B/32 of the calibration losses, a local file (plain "
                        "state_dict / open_clip; OpenAI's ViT-B-32.pt archive needs --allow_torchscript)")
    g = p.add_argument_group("evaluation outputs")
    g.add_argument("--save_json", default=None,
                   help="test.py: write metrics and per-expression IoUs to this JSON file (several splits: a folder "
                        "of <split>.json)")
    g.add_argument("--save_masks", default=None, help="test.py: write every predicted mask (PNG) here")
    g.add_argument("--vis", default=0, type=int, help="test.py: write N overlay images (image | truth | prediction)")
    return p


def get_test_parser() -> argparse.ArgumentParser:
    """test.py: `get_parser` plus the inference options."""
    p = get_parser()
    add_inference_flags(p)
    return p


def get_prms_parser() -> argparse.ArgumentParser:
    """``python -m tools.prms``: the TRIS stage-1 response map of every ref, selected by the frozen
    CLIP ViT-B/32 (positive response map selection), written for the pseudo-mask step."""
    p = argparse.ArgumentParser(description="TRIS positive response map selection (PRMS)", allow_abbrev=False)
    _add_common(p)
    p.set_defaults(split="train")
    g = p.add_argument_group("PRMS")
    g.add_argument("--out", required=True, help="output folder (index.jsonl, maps/*.npy, config.json, summary.json)")
    g.add_argument("--clip_vitb32", default="",
                   help="local CLIP ViT-B/32 weights scoring the maps (default: the calibrator the stage-1 model "
                        "was trained with; a tiny model's is its seeded random ViT)")
    g.add_argument("--no_diagnostic", action="store_true",
                   help="do not compare the selected maps with the ground truth (PointM / mIoU in summary.json)")
    return p


def get_pipeline_parser() -> argparse.ArgumentParser:
    """``python -m tools.tris_pipeline``: stage 1 -> PRMS -> pseudo masks -> stage 2 -> test.
    Flags it does not know are passed to both train.py runs."""
    p = argparse.ArgumentParser(description="The TRIS weakly supervised pipeline, one command", allow_abbrev=False)
    p.add_argument("--out", required=True, help="pipeline folder: one sub-folder per step")
    p.add_argument("--dataset", default="refcoco", help=f"one of {', '.join(DATASETS)}")
    p.add_argument("--refer_data_root", default="./refer/data/", help="dataset root folder")
    p.add_argument("--splitBy", default=None, help="REFER split file (see train.py)")
    p.add_argument("--eval_splits", default="all",
                   help="splits test.py evaluates at the end: a name, a comma list or 'all' (every split but train)")
    p.add_argument("--method", default="irnet", choices=["irnet", "threshold", "threshold+crf"],
                   help="pseudo-mask refinement of the selected maps (tools.pseudo_masks; irnet is the paper's)")
    p.add_argument("--tiny", action="store_true", help="the models' tiny configs (seconds on a CPU; tests)")
    p.add_argument("--clip_weights", default="", help="CLIP RN50 weights for both stages (train.py --clip_weights)")
    p.add_argument("--clip_vitb32", default="", help="CLIP ViT-B/32 weights (stage-1 calibration and PRMS)")
    p.add_argument("--allow_torchscript", action="store_true", help="the CLIP files may be OpenAI TorchScript archives")
    p.add_argument("--stage1_flags", default="", help="extra train.py flags for stage 1 only (one quoted string)")
    p.add_argument("--stage2_flags", default="", help="extra train.py flags for stage 2 only (one quoted string)")
    p.add_argument("--pseudo_flags", default="", help="extra tools.pseudo_masks flags (one quoted string)")
    p.add_argument("--test_flags", default="", help="extra test.py flags (one quoted string)")
    p.add_argument("--img_size", default=None, type=int, help="input size of both stages (default: the model's, 320)")
    p.add_argument("--seed", default=None, type=int, help="seed of every step (default: the recipe's, 1234)")
    p.add_argument("--device", default="auto", help="cuda, cuda:N, cpu or auto")
    p.add_argument("-j", "--workers", default=4, type=int, help="DataLoader workers")
    p.add_argument("--cache_dir", default=None, help="where token ids are cached")
    p.add_argument("--clip_bpe", default=None, help="a local bpe_simple_vocab_16e6.txt.gz")
    p.add_argument("--no_diagnostic", action="store_true",
                   help="skip the ground-truth diagnostics of the PRMS maps and pseudo masks")
    p.add_argument("--stop_after", default=None, choices=["1_stage1", "2_prms", "3_pseudo", "4_stage2", "5_test"],
                   help="stop after this step")
    return p


def get_demo_parser() -> argparse.ArgumentParser:
    """demo.py: one image, one or more sentences."""
    p = argparse.ArgumentParser(description="Segment the object a sentence refers to", allow_abbrev=False)
    p.add_argument("--resume", required=True, help="checkpoint (ours, or an original one with --model ...)")
    p.add_argument("--img", required=True, help="input image")
    p.add_argument("--text", action="append", required=True, help="referring sentence (repeat for several)")
    p.add_argument("--out", default="./demo_out", help="output folder")
    p.add_argument("--bert_tokenizer", default=None, help="tokenizer folder (default: the one used in training)")
    p.add_argument("--ck_bert", default=None, help="BERT folder (original checkpoints only)")
    p.add_argument("--model", default=None, help="model name (original checkpoints only)")
    p.add_argument("--dataset", default=None,
                   help="class vocabulary for FIANet word masks: rrsisd or refsegrs (default: the training dataset)")
    p.add_argument("--num_tmem", default=None, type=int)
    p.add_argument("--window12", action="store_true")
    p.add_argument("--swin_type", default="base", choices=["tiny", "small", "base", "large"])
    p.add_argument("--img_size", default=None, type=int)
    p.add_argument("--max_tokens", default=None, type=int)
    p.add_argument("--device", default="auto")
    p.add_argument("--amp", default="auto", choices=AMP_CHOICES,
                   help=AMP_HELP)
    p.add_argument("--heatmap", action="store_true",
                   help="also write the model's score map (predict_scores) as a JET overlay (*_heatmap.png)")
    add_inference_flags(p)
    return p


def resolve_model_name(args: argparse.Namespace, available: list[str]) -> str | None:
    """The ``--model`` flag, checked against the registry (None when not given)."""
    if args.model:
        if args.model not in available:
            raise ValueError(f"--model {args.model!r} is not a registered model; choose one of {', '.join(available)}")
        return args.model
    return None


def resolve(args: argparse.Namespace, model: str, recipe_flags: dict[str, Any]) -> argparse.Namespace:
    """Fill flags left at ``None`` from the model's reference recipe for ``--dataset``
    (``recipe_flags``: `Recipe.as_flags`); validate the rest."""
    if args.dataset not in DATASETS:
        raise ValueError(f"--dataset {args.dataset!r} is not supported; choose one of {', '.join(DATASETS)}")
    args.model = model
    for key, value in recipe_flags.items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    if getattr(args, "num_tmem", None) is None:
        args.num_tmem = 1
    if getattr(args, "num_tmem", 1) < 1:
        raise ValueError(f"--num_tmem must be >= 1, got {args.num_tmem}")
    if getattr(args, "seed", None) is None:
        args.seed = 2401
    if args.mha:
        parts = args.mha.split("-")
        if len(parts) != 4 or not all(x.isdigit() and int(x) > 0 for x in parts):
            raise ValueError(f"--mha {args.mha!r}: expected four positive integers like 4-4-4-4")
    return args


def parse_int_list(text: str | None, flag: str) -> list[int] | None:
    """'2-2-6-2' -> [2, 2, 6, 2] (None stays None)."""
    if text is None:
        return None
    try:
        values = [int(x) for x in str(text).replace(",", "-").split("-") if x != ""]
    except ValueError:
        raise ValueError(f"{flag} {text!r}: expected integers separated by '-'") from None
    if len(values) != 4:
        raise ValueError(f"{flag} {text!r}: expected four values, one per Swin stage")
    return values


def get_predict_parser() -> argparse.ArgumentParser:
    """predict.py: one or more sentences over a whole (georeferenced) scene, tile by tile."""
    p = argparse.ArgumentParser(description="Segment what a sentence refers to over a whole scene (GeoTIFF)",
                                allow_abbrev=False)
    p.add_argument("--resume", required=True, help="OpenRRSIS checkpoint (train.py's checkpoint_*.pth)")
    p.add_argument("--scene", required=True, help="scene raster (GeoTIFF or any GDAL format; first 3 bands = RGB)")
    p.add_argument("--text", action="append", required=True, help="referring sentence (repeat for several)")
    p.add_argument("--out", default="./predict_out", help="output folder")
    g = p.add_argument_group("tiling")
    g.add_argument("--tile", default=None, type=int,
                   help="window side in scene pixels (default: the model's input size at its training scale)")
    g.add_argument("--overlap", default=0.25, type=float, help="overlap between windows, fraction of --tile in [0, 0.5]")
    g.add_argument("--blend", default="cosine", choices=["none", "linear", "cosine"],
                   help="how overlapping probabilities are weighted (none: hard cut in the middle of the overlap)")
    g.add_argument("--scene_gsd", default=None, type=float,
                   help="scene metres per pixel (default: from the geotransform)")
    g.add_argument("--model_gsd", default=None, type=float,
                   help="metres per pixel of the training images (default: stored in the checkpoint or known for "
                        "the dataset, e.g. RefSegRS 0.13; else no resampling)")
    g.add_argument("-b", "--batch_size", "--batch-size", dest="batch_size", default=8, type=int,
                   help="tiles per forward pass")
    g = p.add_argument_group("selection and outputs")
    g.add_argument("--mode", nargs="+", default=["best"], metavar="MODE",
                   help="all (union of every component, class-like sentences), best (the best connected component) "
                        "or 'topk K' (K candidates with scores)")
    g.add_argument("--context_pass", action="store_true",
                   help="first score the whole scene downsampled to one model input and rank components by "
                        "their mean probability times that coarse prior (relative expressions)")
    g.add_argument("--threshold", default=0.5, type=float, help="probability threshold, applied once after blending")
    g.add_argument("--min_area", default=0.0, type=float,
                   help="drop components smaller than this, in CRS units squared (pixels if not georeferenced)")
    g.add_argument("--simplify", default=0.0, type=float,
                   help="Douglas-Peucker tolerance of the polygons in CRS units (pixels if not georeferenced)")
    g.add_argument("--overview_size", default=1024, type=int, help="longest side of the overview PNG")
    g.add_argument("--restart", action="store_true", help="ignore the sidecar tile index of an interrupted run")
    g.add_argument("--checkpoint_every", default=60.0, type=float, metavar="SECONDS",
                   help="seconds between on-disk checkpoints of the tiled pass (rasters flushed, tile index "
                        "saved), so that a killed run resumes; 0: after every 256-row block")
    g = p.add_argument_group("model")
    g.add_argument("--bert_tokenizer", default=None, help="tokenizer folder (default: the one used in training)")
    g.add_argument("--dataset", default=None,
                   help="class vocabulary for FIANet word masks: rrsisd or refsegrs (default: the training dataset)")
    g.add_argument("--max_tokens", default=None, type=int, help="token limit (default: the training one)")
    g.add_argument("--device", default="auto", help="cuda, cuda:N, cpu or auto")
    g.add_argument("--amp", default="auto", choices=AMP_CHOICES,
                   help=AMP_HELP)
    g.add_argument("--no_progress", action="store_true", help="no progress bar")
    add_inference_flags(p)
    return p


def pseudo_masks_parser() -> argparse.ArgumentParser:
    """tools/pseudo_masks.py: TRIS pseudo masks from PRMS maps (IRNet, or the reduced threshold
    variants). The IRNet flag names and defaults are those of IRNet's ``run_sample.py``."""
    p = argparse.ArgumentParser(description="Pseudo masks from PRMS response maps (IRNet or thresholding)",
                                allow_abbrev=False)
    p.add_argument("--prms", required=True, help="PRMS folder (index.jsonl + .npy maps)")
    p.add_argument("--out", required=True, help="output folder (index.jsonl, masks/, config.json, summary.json)")
    p.add_argument("--method", default="irnet", choices=["irnet", "threshold", "threshold+crf"],
                   help="irnet (seeds -> IRNet -> random walk) or the reduced variants: the map thresholded at "
                        "--conf_fg_thres, optionally refined by the dense CRF")
    p.add_argument("--crf", default="auto", choices=["auto", "dense", "approx"],
                   help="dense CRF back-end: dense = pydensecrf, approx = the built-in PyTorch approximation, "
                        "auto = dense when pydensecrf is importable")
    p.add_argument("--irn_backbone", default=None,
                   help="torchvision ResNet-50 ImageNet state_dict (.pth loaded weights_only, or .safetensors)")
    g = p.add_argument_group("IRNet (names and defaults of the original)")
    g.add_argument("--conf_fg_thres", default=0.3, type=float, help="background score of the foreground seed pass")
    g.add_argument("--conf_bg_thres", default=0.1, type=float, help="background score of the background seed pass")
    g.add_argument("--irn_crop_size", default=512, type=int, help="training crop side")
    g.add_argument("--irn_batch_size", default=32, type=int)
    g.add_argument("--irn_num_epoches", default=3, type=int)
    g.add_argument("--irn_learning_rate", default=0.1, type=float, help="boundary heads (displacement heads: 10x)")
    g.add_argument("--irn_weight_decay", default=1e-4, type=float)
    g.add_argument("--beta", default=10.0, type=float, help="power of the random-walk affinities")
    g.add_argument("--exp_times", default=8, type=int, help="the transition matrix is applied 2^exp_times times")
    g.add_argument("--ins_seg_bg_thres", default=0.25, type=float, help="background score of the instance masks")
    g = p.add_argument_group("run")
    g.add_argument("--tiny", action="store_true",
                   help="tests: a tiny random frozen backbone, crop 128, batch 4, 8 epochs (not a real result)")
    g.add_argument("--device", default="auto", help="cuda, cuda:N, cpu or auto")
    g.add_argument("--workers", default=0, type=int, help="data-loader workers for IRNet training")
    g.add_argument("--seed", default=0, type=int)
    g.add_argument("--no_progress", action="store_true", help="no progress bars")
    return p
