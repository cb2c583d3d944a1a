"""Print a model's reference recipe as shell assignments (for scripts/reproduce.sh).

    python -m tools.recipe MODEL DATASET
    REF_GPUS=1 TOTAL=8 PROTOCOL=one-per-ref IMG_SIZE=480
"""
from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lib.registry import UnknownModelError, model_spec  # noqa: E402
from lib.spec import UnknownRecipeError  # noqa: E402


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print("usage: python -m tools.recipe MODEL DATASET", file=sys.stderr)
        return 2
    model, dataset = argv
    try:
        spec = model_spec(model)
        recipe = spec.recipe(dataset)
    except (UnknownModelError, UnknownRecipeError) as e:
        print(f"error: MODEL {model!r} / DATASET {dataset!r}: no reference recipe ({e})", file=sys.stderr)
        return 2
    print(f"REF_GPUS={recipe.gpus} TOTAL={recipe.total_batch} PROTOCOL={spec.test_protocol} "
          f"IMG_SIZE={spec.default_img_size}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
