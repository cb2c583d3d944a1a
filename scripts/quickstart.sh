#!/usr/bin/env bash
# The main job on the built-in synthetic data, on CPU, with no download:
#   1. generate a small language-dependent dataset (RRSIS-D layout) and a tiny BERT folder,
#   2. check it with `python -m data.check`,
#   3. train a small FIANet for a few minutes (train.py),
#   4. evaluate it on the synthetic test split (test.py),
#   5. segment one test image with two different sentences (demo.py),
# and end with one line: quickstart: mIoU=<x> oIoU=<y> overlay=<path>
#
# Environment: QUICKSTART_DIR (default runs/quickstart), QUICKSTART_MINUTES (training time limit, default 7).
source "$(dirname "${BASH_SOURCE[0]}")/_env.sh"

OUT="${QUICKSTART_DIR:-runs/quickstart}"
MINUTES="${QUICKSTART_MINUTES:-7}"
DATA="$OUT/data"
mkdir -p "$OUT"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-$(nproc)}"

# FIANet's word masks use NLTK's POS tagger: use installed data, the reference copy next to the
# checkout, or download it; without any, the documented built-in tagger is used (with a warning).
if ! python -c "import nltk; nltk.data.find('taggers/averaged_perceptron_tagger_eng')" 2>/dev/null; then
  if [ -d "$ROOT/../shared/nltk_data/taggers" ]; then
    export NLTK_DATA="$ROOT/../shared/nltk_data"
  else
    mkdir -p "$VENV/nltk_data"
    timeout 60 python -m nltk.downloader -q -d "$VENV/nltk_data" averaged_perceptron_tagger_eng >/dev/null 2>&1 || true
    export NLTK_DATA="$VENV/nltk_data"
  fi
  if ! python -c "import nltk; nltk.data.find('taggers/averaged_perceptron_tagger_eng')" 2>/dev/null; then
    echo "[quickstart] NLTK's tagger data is not available (no internet?): using the built-in tagger"
    echo "[quickstart] (OPENRRSIS_POS_TAGGER=builtin; its position masks differ from NLTK's on a few captions)"
    export OPENRRSIS_POS_TAGGER=builtin
  fi
fi

echo "[quickstart] 1/5 synthetic data -> $DATA"
# RRSIS-D layout only, 8 of its classes; 2,000 training scenes (6,000 refs) so that minutes of
# training see each sentence only a few times and the model has to learn the words, not the pictures.
python -m data.synthetic --out "$DATA" --seed 0 --layouts rrsisd --num_images 2000 --num_val 100 --num_test 200 \
  --classes "airplane,storage tank,ship,vehicle,stadium,basketball court,tennis court,windmill"

echo "[quickstart] 2/5 dataset check"
python -m data.check --dataset rrsisd --refer_data_root "$DATA/rrsisd" --split test --bert_tokenizer "$DATA/bert"

COMMON=(--dataset rrsisd --refer_data_root "$DATA/rrsisd" --bert_tokenizer "$DATA/bert" --ck_bert "$DATA/bert"
        --img_size 64 --device cpu --workers 1 --cache_dir "$OUT/cache")
# A small FIANet (Swin width 32, depths 2-2-2-2, window 4, 64x64 input). No stochastic depth: the
# reference's 0.3 regularises a Swin-B for 40 epochs; a tiny model trained for minutes underfits.
MODEL=(--model fianet --num_tmem 1 --swin_embed_dim 32 --swin_depths 2-2-2-2 --swin_heads 1-2-4-8 --window_size 4
       --drop_path_rate 0)

# 4 epochs x 375 steps of batch 16 (about 7 minutes on 2 CPU cores, validation included);
# --time_limit stops a slower machine after $MINUTES minutes with the best checkpoint so far.
echo "[quickstart] 3/5 training a small FIANet for about 7 minutes"
python train.py "${MODEL[@]}" "${COMMON[@]}" --epochs 4 --lr 1e-3 -b 16 --val_split val \
  --time_limit "$MINUTES" --print-freq 25 --output-dir "$OUT/train"

echo "[quickstart] 4/5 evaluating on the synthetic test split"
python test.py --resume "$OUT/train/checkpoint_best.pth" "${COMMON[@]}" --split test \
  --save_json "$OUT/test.json" --vis 6 --output-dir "$OUT"

echo "[quickstart] 5/5 demo: one test image, two sentences"
mapfile -t PICK < <(python - "$DATA/rrsisd" <<'EOF'
import json, pickle, sys
from pathlib import Path
root = Path(sys.argv[1])
refs = pickle.loads((root / "rrsisd" / "refs(unc).p").read_bytes())  # our own generated file
images = {im["id"]: im["file_name"] for im in json.loads((root / "rrsisd" / "instances.json").read_text())["images"]}
by_image = {}
for r in refs:
    if r["split"] == "test":
        by_image.setdefault(r["image_id"], []).append(r["sentences"][0]["raw"])
image_id, caps = next((i, c) for i, c in by_image.items() if len(c) >= 2)
print(root / "images" / "rrsisd" / "JPEGImages" / images[image_id]); print(caps[0]); print(caps[1])
EOF
)
python demo.py --resume "$OUT/train/checkpoint_best.pth" --img "${PICK[0]}" --text "${PICK[1]}" --text "${PICK[2]}" \
  --out "$OUT/demo" --device cpu

python - "$OUT" <<'EOF'
import json, sys
from pathlib import Path
import numpy as np
from PIL import Image
out = Path(sys.argv[1])
res = json.loads((out / "test.json").read_text())
demo = json.loads((out / "demo" / "demo.json").read_text())
a, b = (np.array(Image.open(d["mask"])) > 127 for d in demo[:2])
union = (a | b).sum()
overlap = (a & b).sum() / union if union else 1.0
print(f"[quickstart] the two sentences' masks overlap by IoU {overlap:.2f} "
      f"({'different objects' if overlap < 0.5 else 'similar masks'}): {demo[0]['sentence']!r} vs {demo[1]['sentence']!r}")
print(f"quickstart: mIoU={res['mIoU']:.3f} oIoU={res['oIoU']:.3f} overlay={demo[0]['overlay']}")
EOF
