"""docs/published.json, and tools.report's bootstrap intervals, paired comparison and tables."""
from __future__ import annotations

import copy
import json
import re

import numpy as np
import pytest

from tools import published, report
from tools.results import METRICS, ResultsError, build_record, dumps_record, load_record


# --------------------------------------------------------------------------------------------
# Published numbers
# --------------------------------------------------------------------------------------------
def test_published_json_parses_without_duplicates_and_in_range():
    rows = published.load()
    assert len(rows) > 100
    keys = [r.key() for r in rows]
    assert len(keys) == len(set(keys))
    for r in rows:
        assert 0.0 <= r.value <= 100.0 and r.metric in published.METRICS and r.origin in published.ORIGINS
        assert r.source.strip() and r.model and r.split
    # Within one source, P@X cannot rise with the threshold.
    cells: dict[tuple, dict[str, float]] = {}
    for r in rows:
        cells.setdefault((r.model, r.variant, r.dataset, r.split_by, r.split, r.source), {})[r.metric] = r.value
    for cell, vals in cells.items():
        ps = [vals[f"P@{t}"] for t in (0.5, 0.6, 0.7, 0.8, 0.9) if f"P@{t}" in vals]
        assert ps == sorted(ps, reverse=True), cell


def test_published_lookup_prefers_the_authors_own_number():
    rows = published.load()
    ref = published.best_reference(rows, "rmsin", "rrsisd", "test")
    assert ref["oIoU"].value == 77.79 and ref["oIoU"].origin == "own"
    assert ref["P@0.5"].value == 74.26 and ref["P@0.5"].origin == "unclear"
    # RefCOCO-family rows carry their split file; G-Ref (UMD) is the default of refcocog.
    assert published.best_reference(rows, "lavt", "refcocog", "val")["oIoU"].value == 61.24
    assert published.best_reference(rows, "lavt", "refcocog", "val", "google")["oIoU"].value == 60.50
    # Cells nobody could read are absent, never guessed (CrossVLT's G-Ref test row repeats LAVT's).
    assert set(published.best_reference(rows, "crossvlt", "refcocog", "test")) == {"oIoU"}


@pytest.mark.parametrize("change,expect", [
    (lambda rows: rows.append(dict(rows[0])), "duplicate"),
    (lambda rows: rows[0].update(value=101.0), "percentage"),
    (lambda rows: rows[0].update(metric="gIoU"), "metric"),
    (lambda rows: rows[0].pop("source"), "missing"),
])
def test_published_loader_rejects_bad_rows(change, expect, tmp_path):
    doc = json.loads(published.PUBLISHED_JSON.read_text())
    change(doc["rows"])
    bad = tmp_path / "p.json"
    bad.write_text(json.dumps(doc))
    with pytest.raises(published.PublishedError, match=expect):
        published.load(bad)


# --------------------------------------------------------------------------------------------
# Bootstrap intervals on known distributions
# --------------------------------------------------------------------------------------------
def _expressions(ious, unions=None, refs=None) -> list[dict]:
    unions = np.full(len(ious), 1000.0) if unions is None else unions
    refs = np.arange(len(ious)) if refs is None else refs
    sent: dict[int, int] = {}
    out = []
    for k, (q, u, r) in enumerate(zip(ious, unions, refs)):
        s = sent[int(r)] = sent.get(int(r), -1) + 1
        out.append({"index": k, "ref_id": int(r), "sent_index": s, "I": float(q * u), "U": float(u), "IoU": float(q)})
    return out


def _coverage(draw, truth: dict[str, float], trials: int = 300, resamples: int = 600) -> dict[str, float]:
    hits = {m: 0 for m in truth}
    for seed in range(trials):
        ci = report.bootstrap_ci(draw(np.random.default_rng(1000 + seed)), resamples=resamples, seed=seed)
        for m, t in truth.items():
            hits[m] += ci[m][0] <= t <= ci[m][1]
    return {m: h / trials for m, h in hits.items()}


def test_bootstrap_ci_covers_the_true_value_at_the_stated_rate():
    # IoU ~ Beta(2, 3), union size independent of it: E[IoU] = 0.4 = ΣI/ΣU in expectation,
    # P(IoU >= 0.5) = 1 - I_0.5(2, 3) = 0.3125 (regularised incomplete beta, by hand).
    def draw(rng):
        return _expressions(rng.beta(2, 3, 150), rng.uniform(100, 1000, 150))

    cov = _coverage(draw, {"mIoU": 0.4, "oIoU": 0.4, "P@0.5": 0.3125})
    # 300 trials: the binomial standard error of a 95 % rate is 1.3 points.
    for m, c in cov.items():
        assert 0.91 <= c <= 0.985, (m, c)


def test_bootstrap_resamples_refs_not_sentences():
    # Three sentences per ref that share the ref's difficulty: mean 0.5. Resampling refs keeps the
    # stated coverage; treating the sentences as independent (one ref each) is far too narrow.
    def draw(rng, independent=False):
        mu = rng.uniform(0.2, 0.8, 100)
        ious = np.repeat(mu, 3) + rng.uniform(-0.05, 0.05, 300)
        refs = np.arange(300) if independent else np.repeat(np.arange(100), 3)
        return _expressions(ious, refs=refs)

    clustered = _coverage(draw, {"mIoU": 0.5}, trials=200)["mIoU"]
    naive = _coverage(lambda rng: draw(rng, independent=True), {"mIoU": 0.5}, trials=200)["mIoU"]
    assert 0.90 <= clustered <= 0.99, clustered
    assert naive < 0.85, naive


# --------------------------------------------------------------------------------------------
# Paired comparison
# --------------------------------------------------------------------------------------------
def _record(exprs, tmp_path, name="a", model="fianet", split="test") -> dict:
    stats, _ = report.group_stats(exprs)
    point = report.metrics_from_sums(stats.sum(0))
    summary = {m: float(point[m]) for m in METRICS}
    summary.update(num_samples=len(exprs), per_category={})
    rec = build_record(summary, exprs, model=model, dataset="rrsisd", split=split, split_by="unc",
                       eval_protocol="all", seed=2401, img_size=480,
                       checkpoint={"path": f"{name}.pth", "file": f"{name}.pth", "sha256": name * 8})
    path = tmp_path / f"{name}.json"
    path.write_text(dumps_record(rec))
    return load_record(path)


def test_paired_comparison_with_itself_is_exactly_zero(tmp_path):
    rng = np.random.default_rng(0)
    a = _record(_expressions(rng.beta(2, 3, 200), rng.integers(50, 500, 200)), tmp_path)
    b = copy.deepcopy(a)
    for r in report.paired_bootstrap(a, b, resamples=500, seed=3):
        assert r.diff == 0.0 and r.lo == 0.0 and r.hi == 0.0 and r.p_value == 1.0
        assert not r.distinguishable


def test_paired_comparison_finds_a_small_consistent_gain(tmp_path):
    rng = np.random.default_rng(1)
    ious = rng.beta(2, 3, 300)
    a = _record(_expressions(np.clip(ious + 0.02, 0, 1)), tmp_path, "a")
    b = _record(_expressions(ious), tmp_path, "b")
    res = {r.metric: r for r in report.paired_bootstrap(a, b, resamples=500, seed=0)}
    assert res["mIoU"].distinguishable and res["mIoU"].lo > 0
    # The same gain is far inside the unpaired intervals: pairing is what detects it.
    ci_a, ci_b = (report.bootstrap_ci(r["expressions"], 500) for r in (a, b))
    assert ci_a["mIoU"][0] < ci_b["mIoU"][1]


def test_paired_comparison_refuses_different_expressions(tmp_path):
    a = _record(_expressions(np.linspace(0, 1, 20)), tmp_path, "a")
    b = _record(_expressions(np.linspace(0, 1, 21)), tmp_path, "b")
    with pytest.raises(ResultsError, match="different expressions"):
        report.paired_bootstrap(a, b, resamples=10)


# --------------------------------------------------------------------------------------------
# Tables
# --------------------------------------------------------------------------------------------
def _cells(table: str, label: str) -> list[str]:
    line = next(x for x in table.splitlines() if f"| {label}" in x)
    return [c.strip() for c in line.strip().strip("|").split("|")][2:]


def test_markdown_table_shows_ours_published_and_delta(tmp_path, capsys):
    rng = np.random.default_rng(2)
    rec = _record(_expressions(rng.beta(5, 2, 50)), tmp_path, "a")
    assert report.main([rec["_path"], "--resamples", "200"]) == 0
    table = capsys.readouterr().out
    ours = _cells(table, "ours")
    assert ours == [f"{100 * rec[m]:.2f}" for m in METRICS]
    pub = published.best_reference(published.load(), "fianet", "rrsisd", "test")
    assert _cells(table, "published") == [f"{pub[m].value:.2f}" for m in METRICS]
    assert _cells(table, "Δ") == [f"{100 * rec[m] - pub[m].value:+.2f}" for m in METRICS]
    for cell, m in zip(_cells(table, "95 %"), METRICS):
        lo, hi = map(float, re.split("–", cell))
        assert lo <= 100 * rec[m] <= hi
    assert "DiCoR" in table
    assert report.main([rec["_path"], "--latex", "--resamples", "0"]) == 0
    assert r"\begin{tabular}" in capsys.readouterr().out


def test_report_refuses_a_summary_that_disagrees_with_its_records(tmp_path, capsys):
    rec = _record(_expressions(np.linspace(0.1, 0.9, 30)), tmp_path, "a")
    doc = json.loads(open(rec["_path"]).read())
    doc["mIoU"] = 0.99
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(doc))
    assert report.main([str(bad)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and "mIoU" in err[0]
