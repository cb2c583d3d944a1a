#!/usr/bin/env bash
# Run the test suite in the project's virtual environment (created on first use).
source "$(dirname "${BASH_SOURCE[0]}")/_env.sh"
# Tests read the reference material in ../shared when it exists (CI always has it).
export NLTK_DATA="${NLTK_DATA:-$ROOT/../shared/nltk_data}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-2}"
python -m pytest -q -p no:cacheprovider tests "$@"
