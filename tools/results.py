"""Evaluation result records: what ``test.py`` writes per split and ``tools.report`` reads.

A record is one JSON object per (checkpoint, dataset, split). It keeps the summary keys test.py has
always written at the top level (``P@0.5`` … ``P@0.9``, ``oIoU``, ``mIoU`` as fractions,
``num_samples``, ``per_category``) and adds what a comparison needs:

* ``metric_definitions`` — the formulas (oIoU = ΣI/ΣU, mIoU = mean per-expression IoU, P@X), as in
  LAVT (Yang et al., CVPR 2022, Sec. 4.1), whose test script the later papers reuse;
* ``protocol`` — every sentence of every ref, or one seeded sentence per ref (FIANet's protocol);
* ``img_size``, ``checkpoint`` (path and SHA-256 of the weights file), the model ``config`` and the
  training arguments stored in the checkpoint;
* ``expressions`` — one entry per evaluated expression: dataset item ``index``, ``ref_id`` (REFER
  datasets) or ``line`` (RefSegRS), ``sent_index``, intersection ``I`` and union ``U`` in pixels at
  the evaluation size, and its ``IoU``. The bootstrap of ``tools.report`` resamples these.
"""
from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

SCHEMA = "openrrsis-results-v1"
THRESHOLDS = (0.5, 0.6, 0.7, 0.8, 0.9)
METRICS = tuple(f"P@{t}" for t in THRESHOLDS) + ("oIoU", "mIoU")
FORMULAS = {
    "oIoU": "sum over expressions of I / sum over expressions of U (overall IoU; some papers call it gIoU)",
    "mIoU": "mean over expressions of I/U, with IoU = 0 when U = 0",
    "P@X": "fraction of expressions with IoU >= X, X in 0.5, 0.6, 0.7, 0.8, 0.9",
    "I, U": "pixels of prediction AND / OR ground truth at the evaluation size (argmax of the logits)",
}
PROTOCOLS = {
    "all": "every sentence of every ref",
    "one-per-ref": "one sentence per ref, drawn once with a seeded generator",
}
# Evaluation splits in the order papers print them; anything else follows alphabetically.
_SPLIT_ORDER = ("val", "test", "testA", "testB", "testC")


class ResultsError(ValueError):
    """A bad --split value or an unreadable / malformed result file (one-line message)."""


# --------------------------------------------------------------------------------------------
# Which splits
# --------------------------------------------------------------------------------------------
def _ordered(splits: Iterable[str]) -> list[str]:
    uniq = list(dict.fromkeys(splits))
    known = [s for s in _SPLIT_ORDER if s in uniq]
    return known + sorted(s for s in uniq if s not in _SPLIT_ORDER)


def available_splits(dataset: str, root: str | Path, split_by: str | None = None, refer: Any = None) -> list[str]:
    """The evaluation splits (every split but ``train``) a dataset folder holds."""
    from data import datasets

    root = Path(root)
    if dataset == "refsegrs":
        found = [s for s in datasets.REFSEGRS_SPLITS if s != "train" and (root / f"output_phrase_{s}.txt").is_file()]
    elif dataset == "referit_tris":
        found = [s for s in datasets.REFERIT_TRIS_SPLITS if s != "train" and (root / "annotations" / f"{s}.pickle").is_file()]
    else:
        if refer is None:
            refer = datasets.load_refer(root, dataset, split_by or datasets.SPLIT_BY[dataset][0])
        found = [str(ref["split"]) for ref in refer.Refs.values() if ref["split"] != "train"]
    if not found:
        raise ResultsError(f"--split all: no evaluation split (val, test, ...) found in {root} for {dataset}")
    return _ordered(found)


def split_datasets(spec: str, dataset: str, root: str | Path, split_by: str | None,
                   build: Callable[[str], Any]) -> list[tuple[str, Any]]:
    """``--split`` (``test``, ``val,test`` or ``all``) -> ``[(split, build(split)), ...]``.

    For ``all`` the REFER index read to find the splits stays alive while the datasets are built, so
    the annotation files are read once for every split.
    """
    parts = [s.strip() for s in str(spec).split(",")]
    if not spec or any(not s for s in parts):
        raise ResultsError(f"--split {spec!r}: expected a split name, a comma-separated list or 'all'")
    refer = None
    if "all" in parts:
        if len(parts) > 1:
            raise ResultsError(f"--split {spec!r}: 'all' cannot be combined with other splits")
        if dataset not in ("refsegrs", "referit_tris"):
            try:
                from data import datasets

                refer = datasets.load_refer(Path(root), dataset, split_by or datasets.SPLIT_BY[dataset][0])
            except (OSError, ValueError, KeyError) as exc:
                raise ResultsError(f"--split all: {str(exc).strip().splitlines()[0] if str(exc).strip() else exc!r}") from None
        parts = available_splits(dataset, root, split_by, refer)
    out = [(s, build(s)) for s in dict.fromkeys(parts)]
    del refer
    return out


# --------------------------------------------------------------------------------------------
# Collecting per-expression numbers during evaluation
# --------------------------------------------------------------------------------------------
class ExpressionRecorder:
    """``engine.evaluate`` ``on_batch`` hook that keeps I, U and IoU of every expression.

    ``gather()`` merges the records of all ranks (a collective call under DDP: every rank calls
    it) and returns them sorted by dataset item index.
    """

    def __init__(self) -> None:
        self.records: list[dict[str, Any]] = []

    def __call__(self, batch: dict[str, Any], pred: Any, iou: Any) -> None:
        import utils

        inter, union = utils.intersection_union(pred, batch["target"].to(pred.device))
        for k, (i, u, v) in enumerate(zip(inter.tolist(), union.tolist(), iou.tolist())):
            rec: dict[str, Any] = {"index": int(batch["index"][k])}
            ref_id = int(batch["ref_id"][k])
            if ref_id >= 0:
                rec["ref_id"] = ref_id
            else:
                rec["line"] = int(batch["line"][k])
            rec.update(sent_index=int(batch["sent_index"][k]), I=int(i), U=int(u), IoU=float(v))
            self.records.append(rec)

    def gather(self) -> list[dict[str, Any]]:
        import utils

        records = list(self.records)
        if utils.is_dist():
            import torch.distributed as dist

            parts: list[list[dict[str, Any]]] = [[] for _ in range(dist.get_world_size())]
            dist.all_gather_object(parts, records)
            records = [r for part in parts for r in part]
        return sorted(records, key=lambda r: r["index"])


def chain(*hooks: Callable[..., None] | None) -> Callable[..., None]:
    """One ``on_batch`` hook calling each of ``hooks`` in turn."""
    active = [h for h in hooks if h is not None]

    def call(batch: dict[str, Any], pred: Any, iou: Any) -> None:
        for h in active:
            h(batch, pred, iou)

    return call


# --------------------------------------------------------------------------------------------
# Building and writing records
# --------------------------------------------------------------------------------------------
def sha256_of(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def checkpoint_info(path: str | Path) -> dict[str, Any]:
    """Path and SHA-256 of the weights: the file itself, or ``model.safetensors`` of an exported folder."""
    p = Path(path)
    weights = p / "model.safetensors" if p.is_dir() else p
    return {"path": str(path), "file": weights.name, "sha256": sha256_of(weights)}


def _plain(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))


def build_record(summary: dict[str, Any], expressions: Sequence[dict[str, Any]], *, model: str, dataset: str,
                 split: str, split_by: str | None, eval_protocol: str, seed: int, img_size: int,
                 checkpoint: dict[str, Any], config: dict[str, Any] | None = None,
                 train_args: dict[str, Any] | None = None) -> dict[str, Any]:
    """The JSON record of one evaluated split (see the module docstring)."""
    if len(expressions) != summary.get("num_samples", len(expressions)):
        raise ResultsError(f"{len(expressions)} expression records for {summary.get('num_samples')} samples")
    protocol = {"name": eval_protocol, "description": PROTOCOLS.get(eval_protocol, eval_protocol)}
    protocol["seed"] = int(seed) if eval_protocol == "one-per-ref" else None
    record: dict[str, Any] = {"schema": SCHEMA, **summary,
                              "model": model, "dataset": dataset, "split_by": split_by, "split": split,
                              "metric_definitions": FORMULAS, "protocol": protocol, "img_size": int(img_size),
                              "checkpoint": checkpoint, "config": _plain(config or {}),
                              "train_args": _plain(train_args or {}), "expressions": list(expressions)}
    return record


def dumps_record(record: dict[str, Any]) -> str:
    """Indented JSON with one line per expression (readable and diff-able, not megabytes of indentation)."""
    head = {k: v for k, v in record.items() if k != "expressions"}
    text = json.dumps(head, indent=2)[:-2]
    lines = ",\n".join("    " + json.dumps(e) for e in record.get("expressions", []))
    return text + ',\n  "expressions": [\n' + lines + ("\n" if lines else "") + "  ]\n}\n"


def json_targets(save_json: str | Path, splits: Sequence[str]) -> list[Path]:
    """Where the records go: one split -> ``save_json`` is the file; several -> ``save_json`` is a
    folder holding ``<split>.json``. Checked before evaluating, so a bad path fails at once."""
    target = Path(save_json)
    if len(splits) == 1:
        if target.is_dir():
            raise ResultsError(f"--save_json {save_json}: is a folder; with one split it names the JSON file")
        return [target]
    if target.suffix == ".json" or target.is_file():
        raise ResultsError(f"--save_json {save_json}: with several splits it names a folder (gets <split>.json)")
    return [target / f"{s}.json" for s in splits]


def write_records(records: Sequence[dict[str, Any]], paths: Sequence[Path]) -> list[Path]:
    """Write ``records[i]`` to ``paths[i]`` (folders created)."""
    for path, record in zip(paths, records):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(dumps_record(record))
    return list(paths)


# --------------------------------------------------------------------------------------------
# Reading records back
# --------------------------------------------------------------------------------------------
def load_record(path: str | Path) -> dict[str, Any]:
    """Read and check one result file."""
    p = Path(path)
    try:
        record = json.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ResultsError(f"{p}: file not found") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ResultsError(f"{p}: not a readable JSON file ({exc})") from None
    if not isinstance(record, dict) or not all(k in record for k in METRICS):
        raise ResultsError(f"{p}: not a test.py result (needs {', '.join(METRICS)})")
    for k in METRICS:
        v = record[k]
        if not isinstance(v, (int, float)) or not (0.0 <= v <= 1.0) or math.isnan(v):
            raise ResultsError(f"{p}: {k} = {v!r} is not a fraction in [0, 1]")
    record["_path"] = str(p)
    return record


def expand_paths(paths: Iterable[str | Path]) -> list[Path]:
    """Files as given; a folder stands for its ``*.json`` files in split order."""
    out: list[Path] = []
    for raw in paths:
        p = Path(raw)
        if p.is_dir():
            files = {f.stem: f for f in p.glob("*.json")}
            if not files:
                raise ResultsError(f"{p}: folder holds no *.json result files")
            out += [files[s] for s in _ordered(files)]
        else:
            out.append(p)
    return out


def group_key(expression: dict[str, Any]) -> tuple[str, int]:
    """The resampling unit of an expression: its ref (REFER datasets) or its phrase line (RefSegRS)."""
    if "ref_id" in expression:
        return ("ref", int(expression["ref_id"]))
    if "line" in expression:
        return ("line", int(expression["line"]))
    raise ResultsError(f"expression record without ref_id or line: {expression}")


def expression_key(expression: dict[str, Any]) -> tuple[str, int, int]:
    return (*group_key(expression), int(expression.get("sent_index", 0)))
