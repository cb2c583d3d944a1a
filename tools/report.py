"""Our results beside the published ones, with bootstrap confidence intervals.

    python -m tools.report RESULT.json [RESULTS_FOLDER ...] [--latex] [--resamples 2000] [--seed 0]
    python -m tools.report --paired A.json B.json          # paired difference of two checkpoints

Reads the records ``test.py --save_json`` writes (``tools.results``; a folder stands for its
``<split>.json`` files) and prints one Markdown table (LaTeX with ``--latex``) per checkpoint:
for every split our P@0.5 … P@0.9, oIoU and mIoU in percent, their 95 % confidence interval, the
published value of ``docs/published.json`` (the authors' own number where known) and the difference.

Confidence intervals are percentile bootstrap intervals (Efron & Tibshirani, *An Introduction to the
Bootstrap*, 1993, ch. 13) over the evaluated expressions. The resampling unit is the ref: when a ref
has several sentences (RefCOCO family) its sentences are drawn together (a cluster bootstrap), since
sentences of one object are not independent; RRSIS-D and RefSegRS have one expression per ref. Every
metric is recomputed on each resample from the per-expression I, U and IoU: oIoU = ΣI/ΣU,
mIoU = mean IoU, P@X = fraction with IoU >= X.

``--paired A B``: both results must hold the same expressions (same split, protocol and seed). The
same resampled refs are used for A and B, so the interval is that of the difference A − B; it is
"distinguishable from zero" when the interval excludes 0. A result paired with itself gives exactly 0.
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tools import published as published_lib  # noqa: E402
from tools.results import METRICS, THRESHOLDS, ResultsError, expand_paths, expression_key, group_key, load_record  # noqa: E402

# Columns of the per-ref statistics: ΣI, ΣU, ΣIoU, expressions, expressions with IoU >= X per threshold.
_I, _U, _IOU, _N = 0, 1, 2, 3
DEFAULT_RESAMPLES = 2000
DEFAULT_LEVEL = 0.95


# --------------------------------------------------------------------------------------------
# Statistics and the bootstrap
# --------------------------------------------------------------------------------------------
def group_stats(expressions: Sequence[dict[str, Any]]) -> tuple[np.ndarray, list[tuple]]:
    """Per-ref sums ``(G, 4 + len(THRESHOLDS))`` and the ref keys, in the order refs first appear."""
    index: dict[tuple, int] = {}
    rows: list[np.ndarray] = []
    for e in expressions:
        key = group_key(e)
        if key not in index:
            index[key] = len(rows)
            rows.append(np.zeros(4 + len(THRESHOLDS)))
        iou = float(e["IoU"])
        row = rows[index[key]]
        row[_I] += float(e["I"])
        row[_U] += float(e["U"])
        row[_IOU] += iou
        row[_N] += 1.0
        row[4:] += [iou >= t for t in THRESHOLDS]
    if not rows:
        raise ResultsError("no per-expression records: re-run test.py (this version saves them with --save_json)")
    return np.stack(rows), list(index)


def metrics_from_sums(sums: np.ndarray) -> dict[str, np.ndarray]:
    """Metrics (fractions) from column sums; ``sums`` is ``(..., K)``, every result is ``(...)``."""
    out = {f"P@{t}": sums[..., 4 + k] / sums[..., _N] for k, t in enumerate(THRESHOLDS)}
    with np.errstate(invalid="ignore", divide="ignore"):
        out["oIoU"] = np.where(sums[..., _U] > 0, sums[..., _I] / np.maximum(sums[..., _U], 1e-300), 0.0)
    out["mIoU"] = sums[..., _IOU] / sums[..., _N]
    return out


def resample_counts(n_groups: int, resamples: int, seed: int, chunk: int | None = None):
    """Yields ``(c, n_groups)`` arrays: how often each ref is drawn in each of ``c`` resamples
    (each resample draws ``n_groups`` refs with replacement)."""
    rng = np.random.default_rng(seed)
    chunk = chunk or max(1, min(resamples, 4_000_000 // max(n_groups, 1)))
    p = np.full(n_groups, 1.0 / n_groups)
    done = 0
    while done < resamples:
        c = min(chunk, resamples - done)
        yield rng.multinomial(n_groups, p, size=c).astype(np.float64)
        done += c


def bootstrap_metrics(stats: Sequence[np.ndarray], resamples: int = DEFAULT_RESAMPLES,
                      seed: int = 0) -> list[dict[str, np.ndarray]]:
    """Bootstrap replicates of every metric for one or more aligned per-ref tables (the same refs are
    drawn for all of them: a paired bootstrap). Returns one ``{metric: (resamples,)}`` per table."""
    n = stats[0].shape[0]
    if any(s.shape[0] != n for s in stats):
        raise ValueError("paired tables must have the same refs")
    parts: list[list[np.ndarray]] = [[] for _ in stats]
    for counts in resample_counts(n, resamples, seed):
        for k, s in enumerate(stats):
            parts[k].append(counts @ s)
    return [metrics_from_sums(np.concatenate(p)) for p in parts]


def percentile_interval(values: np.ndarray, level: float = DEFAULT_LEVEL) -> tuple[float, float]:
    alpha = (1.0 - level) / 2.0
    lo, hi = np.quantile(values, [alpha, 1.0 - alpha])
    return float(lo), float(hi)


def bootstrap_ci(expressions: Sequence[dict[str, Any]], resamples: int = DEFAULT_RESAMPLES, seed: int = 0,
                 level: float = DEFAULT_LEVEL) -> dict[str, tuple[float, float]]:
    """Percentile bootstrap interval (fractions) of every metric, resampling refs."""
    stats, _ = group_stats(expressions)
    (reps,) = bootstrap_metrics([stats], resamples, seed)
    return {m: percentile_interval(reps[m], level) for m in METRICS}


@dataclass
class PairedResult:
    metric: str
    a: float
    b: float
    diff: float
    lo: float
    hi: float
    p_value: float

    @property
    def distinguishable(self) -> bool:
        return self.lo > 0.0 or self.hi < 0.0


def _aligned(record: dict[str, Any], name: str) -> dict[tuple, dict[str, Any]]:
    out: dict[tuple, dict[str, Any]] = {}
    for e in record.get("expressions") or []:
        key = expression_key(e)
        if key in out:
            raise ResultsError(f"{record['_path']}: expression {key} appears twice")
        out[key] = e
    if not out:
        raise ResultsError(f"{record['_path']} ({name}): no per-expression records; re-run test.py with --save_json")
    return out


def paired_bootstrap(a: dict[str, Any], b: dict[str, Any], resamples: int = DEFAULT_RESAMPLES, seed: int = 0,
                     level: float = DEFAULT_LEVEL) -> list[PairedResult]:
    """Paired bootstrap of ``metric(A) − metric(B)`` over the refs both results evaluated."""
    for field in ("dataset", "split_by", "split"):
        if a.get(field) != b.get(field):
            raise ResultsError(f"--paired: {field} differs ({a.get(field)} in {a['_path']}, {b.get(field)} in {b['_path']})")
    ea, eb = _aligned(a, "A"), _aligned(b, "B")
    if set(ea) != set(eb):
        only_a, only_b = len(set(ea) - set(eb)), len(set(eb) - set(ea))
        raise ResultsError(f"--paired: the results hold different expressions ({only_a} only in {a['_path']}, "
                           f"{only_b} only in {b['_path']}; same split, --eval_protocol and --seed needed)")
    keys = sorted(ea)
    sa, ga = group_stats([ea[k] for k in keys])
    sb, gb = group_stats([eb[k] for k in keys])
    assert ga == gb
    point_a, point_b = metrics_from_sums(sa.sum(0)), metrics_from_sums(sb.sum(0))
    reps_a, reps_b = bootstrap_metrics([sa, sb], resamples, seed)
    out = []
    for m in METRICS:
        d = reps_a[m] - reps_b[m]
        lo, hi = percentile_interval(d, level)
        p = min(1.0, 2.0 * min(float(np.mean(d <= 0)), float(np.mean(d >= 0))))
        out.append(PairedResult(m, float(point_a[m]), float(point_b[m]), float(point_a[m] - point_b[m]), lo, hi, p))
    return out


# --------------------------------------------------------------------------------------------
# Tables
# --------------------------------------------------------------------------------------------
@dataclass
class SplitRow:
    split: str
    ours: dict[str, float]              # percent, from the result file's summary
    ci: dict[str, tuple[float, float]]  # percent
    published: dict[str, published_lib.Row]
    num_expressions: int
    num_refs: int


def _pct(x: float) -> str:
    return f"{100.0 * x:.2f}"


def _delta(x: float) -> str:
    return f"{x:+.2f}"


def analyse(record: dict[str, Any], rows: list[published_lib.Row], resamples: int, seed: int, level: float,
            published_model: str | None = None) -> SplitRow:
    exprs = record.get("expressions") or []
    ci: dict[str, tuple[float, float]] = {}
    n_refs = 0
    if exprs and resamples > 0:
        stats, groups = group_stats(exprs)
        n_refs = len(groups)
        point = metrics_from_sums(stats.sum(0))
        for m in METRICS:  # the records must describe the same numbers as the summary
            if abs(float(point[m]) - float(record[m])) > 1e-9:
                raise ResultsError(f"{record['_path']}: {m} of the summary ({record[m]}) disagrees with its "
                                   f"per-expression records ({float(point[m])})")
        (reps,) = bootstrap_metrics([stats], resamples, seed)
        ci = {m: percentile_interval(reps[m], level) for m in METRICS}
    pub = published_lib.best_reference(rows, published_model or str(record.get("model")), str(record.get("dataset")),
                                       str(record.get("split")), record.get("split_by"))
    return SplitRow(str(record.get("split")), {m: float(record[m]) for m in METRICS}, ci, pub,
                    int(record.get("num_samples", len(exprs))), n_refs)


def _title(record: dict[str, Any]) -> str:
    proto = record.get("protocol") or {}
    name = proto.get("name", "?")
    seed = f", seed {proto['seed']}" if proto.get("seed") is not None else ""
    ck = record.get("checkpoint") or {}
    sha = (ck.get("sha256") or "")[:12]
    ds = record.get("dataset")
    if record.get("split_by") and ds not in ("rrsisd",):
        ds = f"{ds} ({record['split_by']})"
    size = record.get("img_size")
    return (f"{record.get('model')} on {ds}: {name} protocol{seed}, {size}x{size}, "
            f"checkpoint {ck.get('file', '?')} (sha256 {sha}…)")


def _sources(rows: list[SplitRow]) -> list[str]:
    lines = []
    for r in rows:
        by_source: dict[tuple, list[str]] = {}
        for m, pub in r.published.items():
            by_source.setdefault((pub.source, pub.origin), []).append(m)
        for (source, origin), metrics in by_source.items():
            lines.append(f"{r.split} {', '.join(metrics)}: {source} [{origin}]")
    return lines


def markdown_table(record: dict[str, Any], rows: list[SplitRow], level: float) -> str:
    head = "| split | | " + " | ".join(METRICS) + " |"
    out = [f"**{_title(record)}**", "", head, "|---|---|" + "---:|" * len(METRICS)]
    for r in rows:
        out.append(f"| {r.split} | ours ({r.num_expressions} expr.) | " + " | ".join(_pct(r.ours[m]) for m in METRICS) + " |")
        if r.ci:
            out.append(f"| | {100 * level:g} % CI ({r.num_refs} refs) | "
                       + " | ".join(f"{_pct(r.ci[m][0])}–{_pct(r.ci[m][1])}" for m in METRICS) + " |")
        if r.published:
            out.append("| | published | " + " | ".join(f"{r.published[m].value:.2f}" if m in r.published else "–"
                                                      for m in METRICS) + " |")
            out.append("| | Δ ours − published | " + " | ".join(
                _delta(100 * r.ours[m] - r.published[m].value) if m in r.published else "–" for m in METRICS) + " |")
    sources = _sources(rows)
    out.append("")
    out += [f"Published: {s}" for s in sources] if sources else ["Published: no number recorded for these splits."]
    return "\n".join(out)


def _tex(text: str) -> str:
    for a, b in (("\\", r"\textbackslash{}"), ("&", r"\&"), ("%", r"\%"), ("_", r"\_"), ("#", r"\#"),
                 ("Σ", r"$\Sigma$"), ("…", r"\ldots{}"), ("−", "-"), ("–", "--")):
        text = text.replace(a, b)
    return text


def latex_table(record: dict[str, Any], rows: list[SplitRow], level: float) -> str:
    cols = " & ".join(_tex(m) for m in METRICS)
    out = [f"% {_tex(_title(record))}", r"\begin{tabular}{ll" + "r" * len(METRICS) + "}", r"\toprule",
           f"split & & {cols} \\\\", r"\midrule"]
    for r in rows:
        out.append(f"{_tex(r.split)} & ours & " + " & ".join(_pct(r.ours[m]) for m in METRICS) + r" \\")
        if r.ci:
            out.append(f" & {100 * level:g}\\,\\% CI & " + " & ".join(
                f"{_pct(r.ci[m][0])}--{_pct(r.ci[m][1])}" for m in METRICS) + r" \\")
        if r.published:
            out.append(" & published & " + " & ".join(f"{r.published[m].value:.2f}" if m in r.published else "--"
                                                      for m in METRICS) + r" \\")
            out.append(r" & $\Delta$ & " + " & ".join(
                f"${_delta(100 * r.ours[m] - r.published[m].value)}$" if m in r.published else "--"
                for m in METRICS) + r" \\")
    out += [r"\bottomrule", r"\end{tabular}"]
    out += [f"% published: {_tex(s)}" for s in _sources(rows)]
    return "\n".join(out)


def paired_markdown(a: dict[str, Any], b: dict[str, Any], results: list[PairedResult], resamples: int,
                    seed: int, level: float) -> str:
    n = int(a.get("num_samples", 0))
    out = [f"**Paired bootstrap: A = {a['_path']} vs B = {b['_path']}** on {a.get('dataset')} {a.get('split')} "
           f"({n} expressions, {resamples} resamples of the refs, seed {seed})", "",
           f"| metric | A | B | A − B | {100 * level:g} % CI of A − B | p (two-sided) | distinguishable from 0 |",
           "|---|---:|---:|---:|---:|---:|---|"]
    for r in results:
        out.append(f"| {r.metric} | {_pct(r.a)} | {_pct(r.b)} | {_delta(100 * r.diff)} | "
                   f"{_delta(100 * r.lo)} to {_delta(100 * r.hi)} | {r.p_value:.3f} | {'yes' if r.distinguishable else 'no'} |")
    return "\n".join(out)


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------
def _group(records: list[dict[str, Any]]) -> list[list[dict[str, Any]]]:
    """Records of one checkpoint / dataset / protocol / size share a table."""
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for r in records:
        ck = (r.get("checkpoint") or {}).get("sha256")
        proto = json.dumps(r.get("protocol"), sort_keys=True)
        groups.setdefault((r.get("model"), r.get("dataset"), r.get("split_by"), ck, proto, r.get("img_size")), []).append(r)
    return list(groups.values())


def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m tools.report", description=__doc__.split("\n\n")[0],
                                allow_abbrev=False)
    p.add_argument("results", nargs="*", help="result files of test.py --save_json, or folders of <split>.json")
    p.add_argument("--paired", nargs=2, metavar=("A", "B"), default=None,
                   help="paired bootstrap difference A − B of two results on the same expressions")
    p.add_argument("--latex", action="store_true", help="LaTeX tabular (booktabs) instead of Markdown")
    p.add_argument("--resamples", type=int, default=DEFAULT_RESAMPLES, help="bootstrap resamples (0: no intervals)")
    p.add_argument("--seed", type=int, default=0, help="bootstrap random seed")
    p.add_argument("--level", type=float, default=DEFAULT_LEVEL, help="confidence level of the intervals")
    p.add_argument("--published", default=str(published_lib.PUBLISHED_JSON), help="published numbers (JSON)")
    p.add_argument("--published_model", default=None,
                   help="compare with the published rows of this model (default: the result's model)")
    p.add_argument("--out", default=None, help="also write the table to this file")
    return p


def run(args: argparse.Namespace) -> str:
    if not 0.0 < args.level < 1.0:
        raise ResultsError(f"--level {args.level}: must be between 0 and 1")
    if args.resamples < 0:
        raise ResultsError(f"--resamples {args.resamples}: must be >= 0")
    if args.paired:
        if args.results:
            raise ResultsError("--paired A B takes exactly two result files and no others")
        if args.resamples < 1:
            raise ResultsError("--paired needs --resamples >= 1")
        a, b = (load_record(p) for p in args.paired)
        res = paired_bootstrap(a, b, args.resamples, args.seed, args.level)
        return paired_markdown(a, b, res, args.resamples, args.seed, args.level)
    if not args.results:
        raise ResultsError("no result file given (python -m tools.report RESULT.json [...] or --paired A B)")
    try:
        rows = published_lib.load(args.published)
    except published_lib.PublishedError as e:
        raise ResultsError(f"--published {e}") from None
    records = [load_record(p) for p in expand_paths(args.results)]
    tables = []
    for group in _group(records):
        split_rows = [analyse(r, rows, args.resamples, args.seed, args.level, args.published_model) for r in group]
        fmt = latex_table if args.latex else markdown_table
        tables.append(fmt(group[0], split_rows, args.level))
    return "\n\n".join(tables)


def main(argv: list[str] | None = None) -> int:
    args = get_parser().parse_args(argv)
    try:
        text = run(args)
    except ResultsError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
