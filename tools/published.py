"""Published numbers of referring segmentation papers, as data (``docs/published.json``).

One row per table cell: model, dataset (with ``split_by`` for the RefCOCO family), split, metric,
value in percent, source (paper + table, README or issue), and ``origin``:

* ``own`` — the model's authors' own number,
* ``re-run`` — another party trained / evaluated the model again,
* ``unclear`` — a later paper's comparison table that does not say whether it copied or re-ran it.

Cells nobody could read as text are absent. ``python -m tools.published [--model M] [--dataset D]``
lists rows.
"""
from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

PUBLISHED_JSON = Path(__file__).resolve().parents[1] / "docs" / "published.json"
METRICS = ("P@0.5", "P@0.6", "P@0.7", "P@0.8", "P@0.9", "oIoU", "mIoU")
ORIGINS = ("own", "re-run", "unclear")
# The split file each REFER dataset is read with when none is named (as data.datasets does).
DEFAULT_SPLIT_BY = {"refcoco": "unc", "refcoco+": "unc", "refcocog": "umd", "rrsisd": "unc"}
_REQUIRED = ("model", "dataset", "split", "metric", "value", "source", "origin")
_OPTIONAL = ("split_by", "variant", "note")


class PublishedError(ValueError):
    """docs/published.json is malformed (message names the row)."""


@dataclass(frozen=True)
class Row:
    model: str
    dataset: str
    split: str
    metric: str
    value: float  # percent
    source: str
    origin: str
    split_by: str | None = None
    variant: str | None = None
    note: str | None = None

    def key(self) -> tuple:
        """Identifies one claim: the same cell from the same source must appear once."""
        return (self.model, self.variant, self.dataset, self.split_by, self.split, self.metric, self.source)

    def cell(self) -> tuple:
        return (self.model, self.variant, self.dataset, self.split_by, self.split, self.metric)


def _row(raw: dict, where: str) -> Row:
    missing = [k for k in _REQUIRED if k not in raw]
    extra = [k for k in raw if k not in _REQUIRED + _OPTIONAL]
    if missing or extra:
        raise PublishedError(f"{where}: missing {missing} / unknown {extra} fields")
    if raw["metric"] not in METRICS:
        raise PublishedError(f"{where}: metric {raw['metric']!r} is not one of {', '.join(METRICS)}")
    if raw["origin"] not in ORIGINS:
        raise PublishedError(f"{where}: origin {raw['origin']!r} is not one of {', '.join(ORIGINS)}")
    value = raw["value"]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= float(value) <= 100.0:
        raise PublishedError(f"{where}: value {value!r} is not a percentage in [0, 100]")
    for k in ("model", "dataset", "split", "source"):
        if not isinstance(raw[k], str) or not raw[k].strip():
            raise PublishedError(f"{where}: {k} must be a non-empty string")
    return Row(**{**raw, "value": float(value)})


def load(path: str | Path = PUBLISHED_JSON) -> list[Row]:
    """All rows, validated: known fields, metrics and origins, values in [0, 100], no duplicate claim,
    and at most one ``own`` value per cell."""
    path = Path(path)
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise PublishedError(f"{path}: cannot be read as JSON ({exc})") from None
    rows = [_row(r, f"{path} row {i}") for i, r in enumerate(doc.get("rows", []))]
    seen: dict[tuple, int] = {}
    own: dict[tuple, float] = {}
    for i, r in enumerate(rows):
        if r.key() in seen:
            raise PublishedError(f"{path} row {i}: duplicate of row {seen[r.key()]} ({r.model} {r.dataset} {r.split} {r.metric})")
        seen[r.key()] = i
        if r.origin == "own":
            if r.cell() in own and own[r.cell()] != r.value:
                raise PublishedError(f"{path} row {i}: two different 'own' values for {r.cell()}")
            own[r.cell()] = r.value
    return rows


def _split_by(dataset: str, split_by: str | None) -> str | None:
    return split_by or DEFAULT_SPLIT_BY.get(dataset)


def lookup(rows: Iterable[Row], model: str, dataset: str, split: str, split_by: str | None = None) -> list[Row]:
    """Rows of one model / dataset / split, the authors' own first, then re-runs, then unclear ones."""
    want = _split_by(dataset, split_by)
    hits = [r for r in rows if r.model == model and r.dataset == dataset and r.split == split
            and _split_by(r.dataset, r.split_by) == want]
    return sorted(hits, key=lambda r: ORIGINS.index(r.origin))


def best_reference(rows: Iterable[Row], model: str, dataset: str, split: str,
                   split_by: str | None = None) -> dict[str, Row]:
    """One published value per metric to compare a result with: the authors' own number where it
    exists, else a re-run, else an unclear one (the first source listed)."""
    out: dict[str, Row] = {}
    for r in lookup(rows, model, dataset, split, split_by):
        if r.variant is None:
            out.setdefault(r.metric, r)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="List published numbers (docs/published.json)", allow_abbrev=False)
    p.add_argument("--model", default=None)
    p.add_argument("--dataset", default=None)
    a = p.parse_args(argv)
    for r in load():
        if (a.model and r.model != a.model) or (a.dataset and r.dataset != a.dataset):
            continue
        sb = f" ({r.split_by})" if r.split_by else ""
        print(f"{r.model:<12} {r.dataset}{sb} {r.split:<6} {r.metric:<6} {r.value:6.2f}  [{r.origin}] {r.source}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
