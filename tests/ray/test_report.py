"""The run report (report.html) of a real 2-round tiny run, loaded in headless Chromium, and of unfinished runs.

The browser test drives Debian's chromium through Playwright (never a browser Playwright downloads): the page
loads from file:// with no request leaving it, every plot is an inline SVG that renders to a non-empty box with
drawn content, the tables are there and hold the run's numbers. A full-page screenshot is kept as a test
artifact in ``$MIDDO_TEST_ARTIFACTS`` (default: ``<repo>/test-artifacts/``).
"""

from __future__ import annotations

import io
import json
import os
import shutil
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from middo_ray.report import build_report

pytestmark = [pytest.mark.ray, pytest.mark.timeout(900)]

REPO = Path(__file__).resolve().parents[2]
CHROMIUM = os.environ.get("MIDDO_CHROMIUM", "/usr/bin/chromium")
# Background networking (updates, field trials, safe browsing) must be off on these machines.
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
HOSTILE = "<script>alert(1)</script>\x00\x1b[31m\u202eevil & \"quoted\""


def _artifacts() -> Path:
    out = Path(os.environ.get("MIDDO_TEST_ARTIFACTS") or REPO / "test-artifacts")
    out.mkdir(parents=True, exist_ok=True)
    return out


def _copy_run(run_dir: Path, dest: Path) -> Path:
    """A copy of the run without its models and caches (the report reads none of them)."""
    shutil.copytree(run_dir, dest, ignore=shutil.ignore_patterns("model", "ray_train", "cache", "embeddings"))
    return dest


def _expected_plots(rounds: int) -> list[str]:
    return ["eval", "dataset", "timings"] + [f"{p}-r{k}" for k in range(1, rounds + 1)
                                            for p in ("distributions", "loss-scatter")]


def _browser(playwright, profile: Path):
    if not Path(CHROMIUM).is_file():
        pytest.fail(f"headless Chromium not found at {CHROMIUM}: install it with "
                    "`apt-get install -y --no-install-recommends chromium` (`make test` does it)", pytrace=False)
    return playwright.chromium.launch_persistent_context(
        str(profile), executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS,
        viewport={"width": 1300, "height": 1000})


def test_report_renders_in_chromium(loop_run, tmp_path):
    """Every plot of the finished run's report renders in a real browser, offline, with the run's numbers."""
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.fail("playwright is not installed: `.venv/bin/pip install -e '.[dev]'` (`make test` does it)",
                    pytrace=False)
    from PIL import Image

    run_dir, summary, _ = loop_run
    assert (run_dir / "report.html").is_file(), "the loop writes report.html"
    run = _copy_run(run_dir, tmp_path / "run")
    t0 = time.monotonic()
    path = build_report(run)
    seconds = time.monotonic() - t0
    print(f"build_report of a {summary['rounds']}-round tiny run: {seconds:.1f} s")
    assert seconds < 120, f"build_report took {seconds:.0f} s (about 2 s on an idle 2-core machine)"
    page_html = path.read_text(encoding="utf-8")
    assert "<script" not in page_html.lower(), "the report needs no script"
    assert "could not be" not in page_html, "a section or plot failed"
    rounds = summary["rounds"]
    manifests = [json.loads((run / f"round_{k}" / "manifest.json").read_text()) for k in range(rounds + 1)]

    requests: list[str] = []
    errors: list[str] = []
    with sync_playwright() as p:
        ctx = _browser(p, tmp_path / "profile")
        try:
            page = ctx.new_page()
            page.on("request", lambda r: requests.append(r.url))
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
            response = page.goto(path.resolve().as_uri(), wait_until="load")
            assert response is None or response.ok
            shot = _artifacts() / "report.png"
            page.screenshot(path=str(shot), full_page=True)

            for name in _expected_plots(rounds):
                fig = page.locator(f"figure.plot[data-plot='{name}']")
                assert fig.count() == 1, f"plot {name} missing"
                svg = fig.locator("svg").first
                box = svg.bounding_box()
                assert box and box["width"] > 150 and box["height"] > 100, (name, box)
                drawn = svg.evaluate("s => s.querySelectorAll('path, rect, use, image, polyline, line').length")
                assert drawn > 20, (name, drawn)
                content = svg.evaluate("s => { const b = s.getBBox(); return [b.width, b.height]; }")
                assert content[0] > 100 and content[1] > 50, (name, content)
                img = Image.open(io.BytesIO(svg.screenshot())).convert("RGB")
                assert len(img.getcolors(maxcolors=1 << 16) or range(1 << 16)) > 8, f"plot {name} looks blank"

            for table in ["facts", "overview", "round-0"] + [f"round-{k}" for k in range(1, rounds + 1)]:
                assert page.locator(f"table[data-table='{table}']").count() == 1, f"table {table} missing"
            text = page.inner_text("body")
            assert f"Finished after {rounds} rounds" in text
            assert summary["stop_reason"] in text
            overview = page.inner_text("table[data-table='overview']")
            assert f"{summary['history'][0]['heldout_loss']:.4f}" in overview  # held-out loss of M0
            assert f"M{summary['best_round']} ★ best" in overview
            assert f"{summary['sizes'][-1]:,}" in overview
            for k in range(1, rounds + 1):
                cell = page.inner_text(f"table[data-table='round-{k}']")
                flags = manifests[k]["flags"]
                assert f"hard (complexity) {flags['complexity']}" in cell
                assert f"low quality {flags['quality']}" in cell
                assert f"loss_pre > {manifests[k]['thresholds']['complexity']['loss_pre']:.4g}" in cell
                assert "seconds per stage" in cell and "total" in cell
                ok = manifests[k]["stages"]["refine"]["ok"]
                assert f"{ok} of {manifests[k]['stages']['refine']['jobs']} accepted" in cell
            assert page.locator("#examples .ex").count() >= 1
        finally:
            ctx.close()
    assert errors == [], errors
    outside = [u for u in requests if not u.startswith(("file:", "data:", "about:"))]
    assert outside == [], f"the page fetched {outside}"
    assert shot.stat().st_size > 50_000
    print(f"screenshot: {shot}")


def test_report_of_an_unfinished_run(loop_run, tmp_path):
    """A run cut off in round 2 after select (no summary, partial manifest, stages without _SUCCESS) still gets
    a report that says so and shows what exists; a hostile rewrite text is escaped; an almost empty run too."""
    run_dir, summary, _ = loop_run
    run = _copy_run(run_dir, tmp_path / "run")
    shutil.rmtree(run / "final")
    (run / "report.html").unlink(missing_ok=True)
    for stage in ("refine", "merge", "train", "eval"):
        (run / "round_2" / stage / "_SUCCESS").unlink()
    manifest_path = run / "round_2" / "manifest.json"
    m = json.loads(manifest_path.read_text())
    keep = ("diagnose", "select")
    partial = {"round": 2, "run_id": m["run_id"], "stages": {s: m["stages"][s] for s in keep},
               "timings": {s: m["timings"][s] for s in keep}, "resumed": [], "config": m["config"]}
    manifest_path.write_text(json.dumps(partial))
    # The tiny teacher writes random bytes: a rewrite's text must not be able to break the page.
    results = run / "round_1" / "refine" / "results" / "part-00000.parquet"
    table = pq.read_table(results)
    rows = table.to_pylist()
    first_ok = next(i for i, r in enumerate(rows) if r["status"] == "ok")
    rows[first_ok]["instruction"] = HOSTILE
    pq.write_table(pa.Table.from_pylist(rows, schema=table.schema), results)
    # Benchmark suites in the eval records (the history comes from them when there is no summary).
    for k, score in ((0, 0.1), (1, 0.2)):
        record = run / f"round_{k}" / "eval" / "stage.json"
        ev = json.loads(record.read_text())
        record.write_text(json.dumps({**ev, "gsm8k": score, "gsm8k_n": 10, "gsm8k_seconds": 3.0, "average": score}))

    page = build_report(run).read_text(encoding="utf-8")
    assert "<b>Interrupted</b>" in page                  # its _LOCK is free: no process runs there
    assert "not finished: refine, merge, train, eval" in page
    assert "could not be" not in page
    for name in ["eval", "dataset", "timings", "distributions-r1", "loss-scatter-r1", "distributions-r2",
                 "loss-scatter-r2"]:
        assert f"data-plot='{name}'" in page, name
    assert "data-table='round-2'" in page
    assert "<th>gsm8k</th>" in page and "<th>suite average</th>" in page and "gsm8k_n" not in page
    assert "gsm8k <b>0.2000</b> (n=10)" in page
    assert f"{summary['history'][1]['heldout_loss']:.4f}" in page
    assert "<script" not in page.lower() and "\x00" not in page and "\u202e" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;\\x00\\x1b[31m\\u202eevil &amp; &quot;quoted&quot;" in page

    # Only round 0's data stage finished: no model, no plots to draw but the report still builds.
    early = tmp_path / "early"
    early.mkdir()
    shutil.copy(run / "config.json", early / "config.json")
    shutil.copytree(run / "round_0" / "data", early / "round_0" / "data")
    page = build_report(early).read_text(encoding="utf-8")
    assert "Running or interrupted" in page and "not finished: train, eval" in page
    assert "could not be" not in page
    assert "data-plot='dataset'" in page

    empty = tmp_path / "empty"
    empty.mkdir()
    assert "No round has started yet" in build_report(empty).read_text(encoding="utf-8")
