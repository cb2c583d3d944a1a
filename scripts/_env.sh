# Sourced by the other scripts: create or reuse a virtual environment and install requirements.txt.
# OPENRRSIS_VENV chooses the folder (default: .venv in the checkout). A stamp file holding the hash
# of requirements.txt makes a second run skip pip entirely.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${OPENRRSIS_VENV:-$ROOT/.venv}"
REQ_HASH="$(sha256sum "$ROOT/requirements.txt" | cut -c1-16)"
PYTHON_BIN="${PYTHON:-python3}"
if [ ! -x "$VENV/bin/python" ]; then
  echo "[env] creating virtual environment in $VENV"
  "$PYTHON_BIN" -m venv "$VENV"
fi
if [ "$(cat "$VENV/.requirements-hash" 2>/dev/null || true)" != "$REQ_HASH" ]; then
  echo "[env] installing requirements.txt into $VENV (first run: a few minutes)"
  "$VENV/bin/python" -m pip install -q --upgrade pip
  "$VENV/bin/python" -m pip install -q -r "$ROOT/requirements.txt"
  echo "$REQ_HASH" > "$VENV/.requirements-hash"
fi
export PATH="$VENV/bin:$PATH"
cd "$ROOT"
