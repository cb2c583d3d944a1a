#!/usr/bin/env bash
# Run the test suite in the project's virtual environment (created on first use). CI runs exactly
# this (.ci/run). Extra arguments go to pytest, e.g. `bash scripts/test.sh -k checkpoint`.
#   OPENRRSIS_TEST_WORKERS  parallel pytest-xdist workers (default 2; 0 = no xdist)
#   OMP_NUM_THREADS         threads per worker (default 1: the workers share the cores)
source "$(dirname "${BASH_SOURCE[0]}")/_env.sh"
# Tests read the reference material in ../shared when it exists (CI always has it).
export NLTK_DATA="${NLTK_DATA:-$ROOT/../shared/nltk_data}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
WORKERS="${OPENRRSIS_TEST_WORKERS:-2}"
# What the numbers depend on, first: a failure report then says which CPU kind and build it was.
python - "$WORKERS" <<'PY'
import os, platform, sys
import torch
cpu = platform.processor() or platform.machine()
try:
    with open("/proc/cpuinfo") as f:
        cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
except OSError:
    pass
print(f"[test] torch {torch.__version__}, CPU capability {torch.backends.cpu.get_cpu_capability()}, "
      f"python {platform.python_version()}")
print(f"[test] CPU {cpu}: {os.cpu_count()} logical cores; {sys.argv[1]} pytest workers x "
      f"{torch.get_num_threads()} torch threads (OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')})")
PY
XDIST=()
# worksteal: an idle worker takes queued tests from a busy one, so the few long end-to-end tests do
# not leave one core idle at the end (measured 181 s vs 216 s for the default scheduling).
if [ "$WORKERS" != "0" ]; then XDIST=(-n "$WORKERS" --dist worksteal); fi
# Lint first (ruff, configured in pyproject.toml): seconds, and a failure stops the run.
python -m ruff check "$ROOT" || { echo "[test] error: ruff found problems (python -m ruff check --fix fixes most)" >&2; exit 1; }
set +e
python -m pytest -q -p no:cacheprovider "${XDIST[@]}" --durations=15 tests "$@"
rc=$?
set -e
if [ "$rc" -eq 5 ]; then
  echo "[test] error: pytest collected no tests (exit code 5): counted as a failure" >&2
  exit 1
fi
exit "$rc"
