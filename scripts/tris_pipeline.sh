#!/usr/bin/env bash
# The TRIS weakly supervised pipeline in one command: stage 1 -> PRMS -> pseudo masks -> stage 2 -> test,
# one folder per step under --out (skipped when done, training resumed after a crash).
#
#   bash scripts/tris_pipeline.sh --out runs/tris_refcoco --dataset refcoco --refer_data_root DATA \
#       --clip_weights RN50.pt --clip_vitb32 ViT-B-32.pt --allow_torchscript --pseudo_flags "--irn_backbone R50.pth"
#
# Every flag goes to `python -m tools.tris_pipeline` (README: "TRIS weakly supervised pipeline"); relative
# paths are relative to the current directory. An active virtual environment is used as it is; otherwise
# scripts/_env.sh creates or reuses .venv.
set -euo pipefail
HERE="$(pwd)"
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [ -z "${VIRTUAL_ENV:-}" ]; then
  source "$ROOT/scripts/_env.sh"
  cd "$HERE"
fi
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
exec python -m tools.tris_pipeline "$@"
