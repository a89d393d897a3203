"""`run_audit` end to end on local Ray with the tiny model: real injection, real diagnosis and
selection, and a report whose figures are well-formed and whose row counts add up."""

import json

import pytest

from middo_ray.audit import DEFAULT_KINDS, run_audit
from middo_ray.config import build_config

pytestmark = [pytest.mark.ray, pytest.mark.timeout(300)]


def _unit_or_none(x):
    return x is None or 0.0 <= x <= 1.0


def test_run_audit_on_demo_subset(ray_local, tiny_model, tmp_path, capsys):
    """On 48 demo rows with 15% defects: audit.json has precision/recall/AUROC in [0, 1] (or null
    where undefined) for every axis and kind, every input row is accounted for, the rows file holds
    every audit row with its label, and the table is printed."""
    cfg = build_config({"data": {"path": "demo", "max_samples": 48, "cutoff_len": 96},
                        "model": {"base": "tiny"}, "run": {"output_dir": str(tmp_path)}})
    out = tmp_path / "audit"
    rep = run_audit(cfg, fraction=0.15, seed=0, out_dir=out)
    def no_nan(const):
        raise AssertionError(f"audit.json holds {const}; undefined figures must be null")

    saved = json.loads((out / "audit.json").read_text(), parse_constant=no_nan)
    assert saved["counts"] == rep["counts"] and saved["metrics"] == rep["metrics"]

    c = rep["counts"]
    assert c["rows_in"] == 230 and c["source_rows"] == 48
    assert c["rows_in"] == c["rejected"] + c["unused"] + c["source_rows"]
    assert sum(c["injected"].values()) == 7 and set(c["injected"]) == set(DEFAULT_KINDS)
    assert c["audit_rows"] == c["source_rows"] + c["added"] == c["clean"] + sum(c["injected"].values())
    assert c["added"] == c["injected"]["near_duplicate"]

    m = rep["metrics"]
    assert m["rows"] + m["excluded"] == c["audit_rows"] and m["excluded"] == c["known_defects_excluded"]
    assert m["defects"] == 7
    # the rows that planted near-duplicates copy are neither clean nor defect for the duplicate check only
    assert 0 < m["duplicate_partners"] <= c["added"]
    for axis in ("complexity", "diversity", "quality", "duplicate", "any"):
        e = m["axes"][axis]
        partners = m["duplicate_partners"] if axis == "duplicate" else 0
        assert e["n_defects"] == 7 and e["n_clean"] == m["rows"] - 7 - partners
        assert 0 <= e["hits"] <= e["flagged"] <= m["rows"]
        for key in ("precision", "recall", "false_positive_rate", "auroc"):
            assert _unit_or_none(e.get(key)), (axis, key, e.get(key))
    for axis in ("complexity", "diversity", "quality", "duplicate"):
        assert m["axes"][axis]["auroc"] is not None and m["axes"][axis]["n_nan"] == 0
    for kind, e in m["kinds"].items():
        assert kind in DEFAULT_KINDS and e["n"] == c["injected"][kind]
        for axis in m["axes"]:
            assert _unit_or_none(e[axis].get("recall")) and _unit_or_none(e[axis].get("auroc"))
    assert set(m["signals"]) >= {"loss_pre", "loss_cur", "knn_sim", "quality", "dup_sim"}
    # the demo's own known-bad rows are reported apart, each of them once
    assert m["excluded"] > 0 and sum(e["n"] for e in rep["known_defects"].values()) == m["excluded"]

    import pyarrow.parquet as pq

    table = pq.read_table(out / "rows.parquet").to_pylist()
    assert len(table) == c["audit_rows"]
    assert sum(r["kind"] is not None for r in table) == 7
    assert all("flag_complexity" in r and "loss_cur" in r for r in table)
    printed = capsys.readouterr().out
    assert "precision" in printed and "per defect kind" in printed
    assert (out / "audit.txt").read_text().strip() in printed
