#!/usr/bin/env bash
# Reproduce a paper's table: train MODEL on DATASET with its reference recipe (torchrun), evaluate the
# best checkpoint on every evaluation split, and print our numbers beside the published ones with
# 95 % bootstrap confidence intervals (python -m tools.report).
#
#   bash scripts/reproduce.sh MODEL DATASET [GPUS] [-- EXTRA FLAGS]
#   bash scripts/reproduce.sh fianet rrsisd                 # 1 GPU x batch 8, 40 epochs, lr 3e-5
#   bash scripts/reproduce.sh rmsin rrsisd 2                # total batch kept at 8: 2 GPUs x 4
#
# GPUS defaults to the reference's GPU count. The reference TOTAL batch is kept: the per-process
# batch is TOTAL / GPUS (a count that does not divide it is refused). Extra flags after `--` go to
# both train.py and test.py and override the recipe (later flags win), e.g. `-- --val_split test`
# for FIANet's own checkpoint selection on the test split, or a tiny recipe for a smoke test.
#
# Environment: DATA_ROOT (dataset root; default ./refer/data, ./data/RefSegRS for refsegrs),
# WEIGHTS (default ./pretrained_weights: the Swin-B 22k file and bert-base-uncased),
# REPRODUCE_DIR (default runs/reproduce/MODEL_DATASET). Outputs: train/ (checkpoints, logs),
# results/<split>.json (test.py records with per-expression IoUs) and table.md.
# Relative paths are relative to the current directory. A virtual environment that is already
# active is used as it is; otherwise scripts/_env.sh creates or reuses .venv.
set -euo pipefail
HERE="$(pwd)"
if [ -z "${VIRTUAL_ENV:-}" ]; then
  source "$(dirname "${BASH_SOURCE[0]}")/_env.sh"
  cd "$HERE"
fi
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

usage() { echo "usage: bash scripts/reproduce.sh MODEL DATASET [GPUS] [-- EXTRA FLAGS]" >&2; exit 2; }
[ $# -ge 2 ] || usage
MODEL="$1"; DATASET="$2"; shift 2
GPUS=""
if [ $# -gt 0 ] && [ "$1" != "--" ]; then
  [[ "$1" =~ ^[1-9][0-9]*$ ]] || { echo "error: GPUS must be a positive integer, got '$1'" >&2; exit 2; }
  GPUS="$1"; shift
fi
if [ $# -gt 0 ]; then
  [ "$1" = "--" ] || usage
  shift
fi
EXTRA=("$@")

# Reference GPU count, total batch (per-process batch x GPUs) and test protocol of the model's
# recipe (its ModelSpec); lr, epochs, TMEM blocks and token limit are filled in by train.py.
RECIPE="$(python "$ROOT/tools/recipe.py" "$MODEL" "$DATASET")" || exit 2
eval "$RECIPE"
case "$DATASET" in
  rrsisd|refcoco|refcoco+|refcocog) DEFAULT_ROOT=./refer/data ;;
  refsegrs) DEFAULT_ROOT=./data/RefSegRS ;;
  *) echo "error: DATASET '$DATASET' is not one of rrsisd, refsegrs, refcoco, refcoco+, refcocog" >&2; exit 2 ;;
esac
GPUS="${GPUS:-$REF_GPUS}"
if [ $((TOTAL % GPUS)) -ne 0 ]; then
  echo "error: GPUS $GPUS does not divide the reference total batch $TOTAL of $MODEL (pass -- -b N to choose)" >&2
  exit 2
fi
BATCH=$((TOTAL / GPUS))
DATA_ROOT="${DATA_ROOT:-$DEFAULT_ROOT}"
W="${WEIGHTS:-./pretrained_weights}"
OUT="${REPRODUCE_DIR:-runs/reproduce/${MODEL}_${DATASET}}"
mkdir -p "$OUT"

COMMON=(--dataset "$DATASET" --refer_data_root "$DATA_ROOT" --bert_tokenizer "$W/bert-base-uncased"
        --ck_bert "$W/bert-base-uncased" --img_size "$IMG_SIZE")
LAUNCH=(python -m torch.distributed.run --standalone --nproc_per_node "$GPUS")

echo "[reproduce] $MODEL on $DATASET: $GPUS process(es) x batch $BATCH (reference total $TOTAL) -> $OUT"
"${LAUNCH[@]}" "$ROOT/train.py" --model "$MODEL" "${COMMON[@]}" -b "$BATCH" \
  --pretrained_swin_weights "$W/swin_base_patch4_window12_384_22k.pth" --output-dir "$OUT/train" "${EXTRA[@]}"

echo "[reproduce] evaluating $OUT/train/checkpoint_best.pth on every split ($PROTOCOL protocol)"
rm -rf "$OUT/results"
EVAL=("${LAUNCH[@]}")
[ "$GPUS" -gt 1 ] || EVAL=(python)  # one process needs no launcher
"${EVAL[@]}" "$ROOT/test.py" --resume "$OUT/train/checkpoint_best.pth" "${COMMON[@]}" --split all \
  --eval_protocol "$PROTOCOL" --save_json "$OUT/results" --output-dir "$OUT" "${EXTRA[@]}"

echo "[reproduce] table (also in $OUT/table.md)"
python "$ROOT/tools/report.py" "$OUT/results" --out "$OUT/table.md"
