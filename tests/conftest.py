"""Shared test configuration.

Tests that need the reference material in ``../shared`` (fixtures, NLTK data) use the
``shared_dir`` fixture or the ``requires_shared`` marker: they skip with a clear reason in a
user's clone that has no ``shared/`` folder, and always run in CI, where it exists.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

SHARED = Path(os.environ.get("OPENRRSIS_SHARED", ROOT.parent / "shared")).resolve()
FIXTURES = SHARED / "fixtures"
NLTK_DIR = SHARED / "nltk_data"

# --amp auto would pick bf16 on CPUs with bf16 instructions: the suite pins float32 so that its numbers
# do not depend on the machine (tests of the resolver clear this).
os.environ.setdefault("OPENRRSIS_AMP", "off")

if NLTK_DIR.is_dir():
    # Point NLTK at the POS-tagger data shipped with the reference material.
    os.environ.setdefault("NLTK_DATA", str(NLTK_DIR))

requires_shared = pytest.mark.skipif(
    not SHARED.is_dir(), reason=f"reference material not found at {SHARED} (only CI and developers have ../shared)"
)


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    if not SHARED.is_dir():
        pytest.skip(f"reference material not found at {SHARED} (only CI and developers have ../shared)")
    return SHARED


@pytest.fixture(scope="session")
def fixtures_dir(shared_dir: Path) -> Path:
    return shared_dir / "fixtures"


@pytest.fixture(scope="session")
def nltk_data_dir(shared_dir: Path) -> Path:
    return shared_dir / "nltk_data"


def tiny_checkpoint(name: str, path: Path, train_args: dict | None = None, seed: int = 0) -> Path:
    """Save the registered model ``name`` in its tiny random config (``torch.manual_seed(seed)``)
    as a checkpoint at ``path`` whose stored train args are ``train_args``; returns ``path``."""
    import torch

    from lib import registry
    from lib.checkpoint import save_checkpoint

    torch.manual_seed(seed)
    model = registry.build_model(registry.tiny_model_config(name))
    save_checkpoint(path, {"model": model.state_dict(), "config": model.config, "epoch": 0,
                           "args": dict(train_args or {})})
    return path
