"""`sstoken report`: the page of a run, a scores folder and an eval folder; opened in headless chromium when present.

The browser test skips when no chromium is found, and fails instead when SSTOKEN_REQUIRE_BROWSER=1 (CI sets it).
"""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
from pathlib import Path

import pytest

from pipeline.cli import main
from pipeline.views.report_page import GENERATOR
from pipeline.views.score_colours import score_level
from tests.pipeline.views.test_stats import NAN, literal_folders
from tests.score_factories import as_written_before, write_synthetic_run

EVAL = {
    "kind": "eval", "schema_version": 2, "config": {"seeds": [0, 1]}, "corpus": "task", "seeds": [0, 1],
    "methods": ["oracle", "full", "sstoken"], "rows": ["base", "oracle", "full", "sstoken"],
    "measures": [{"key": "heldout_nll", "label": "held-out NLL", "higher_is_better": False},
                 {"key": "steps", "label": "optimizer steps", "higher_is_better": None}],
    "table": [{"method": "full", "values": {"heldout_nll": {"mean": 1.234, "std": 0.05, "n": 2}}},
              {"method": "sstoken", "values": {"heldout_nll": {"mean": 1.111, "std": 0.02, "n": 2}}}],
    "power": [{"key": "heldout_nll", "label": "held-out NLL", "seeds": 2, "difference": -0.0123, "spread": 0.0456,
               "threshold": 0.1368, "passes": False, "verdict": "held-out NLL: cannot tell methods apart at this size"}],
    "spread_definition": "sample standard deviation over seeds of the paired per-seed differences oracle - full",
    "verdict": "Power gate failed: this eval cannot tell methods apart at this size.", "ranking": {}, "kinds": [],
    "max_new_tokens": {"0": 60, "1": 58},
    "selection_by_round": [{"method": "sstoken", "round": 1, "selection": "sstoken", "measured": True,
                            "corrupted_dropped": {"mean": 0.81, "std": 0.01, "n": 2},
                            "drop_share": {"mean": 0.9, "std": 0.02, "n": 2},
                            "auroc_within": {"mean": 0.77, "std": 0.03, "n": 2},
                            "auroc_pooled": {"mean": None, "std": None, "n": 0}}],
    "wall_s": 10.0, "cells_wall_s": 100.0, "cells_run": 4,
}


def browser() -> str | None:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None and Path("/usr/bin/chromium").exists():
        found = "/usr/bin/chromium"
    return found


@pytest.fixture(scope="module")
def run_page(tmp_path_factory, tokenizer_dir) -> Path:
    root = tmp_path_factory.mktemp("report")
    run = write_synthetic_run(root / "run", tokenizer_dir, samples=30, rounds=2)
    assert main(["report", str(run), "--output", str(root / "report.html")]) == 0
    return root / "report.html"


def embedded(page: Path) -> dict:
    text = page.read_text()
    return json.loads(re.search(r'<script type="application/json" id="report-data">(.*?)</script>', text, re.S).group(1))


def test_the_page_is_self_contained(run_page):
    text = run_page.read_text()
    assert not re.search(r'(src|href)="(https?:)?//', text)  # nothing fetched
    assert text.count("<svg") >= 6  # distributions, per sample, position, source, tokens, loss
    for heading in ("Totals", "Rejected rows (3", "Plots", "Samples", "Rounds", "history policy: <b>base</b>"):
        assert heading in text
    assert "duplicate</td><td>2" in text and "invalid_json</td><td>1" in text


def test_the_page_embeds_tokens_and_their_numbers(run_page):
    data = embedded(run_page)
    groups = {s["why"] for s in data["samples"]}
    assert {"highest score", "lowest score", "middle score", "random"} <= groups
    sample = data["samples"][0]
    assert len(sample["pieces"]) == len(sample["t"]) and sample["kept"] == sum(row[0] == 2 for row in sample["t"])
    assert len(data["index"]["ids"]) == 30
    highest = [s["mean_score"] for s in data["samples"] if s["why"] == "highest score"]
    assert highest == sorted(highest, reverse=True) and highest[0] == max(data["index"]["mean_score"])


def test_the_token_budget_bounds_the_page(tmp_path, tokenizer_dir):
    run = write_synthetic_run(tmp_path / "run", tokenizer_dir, samples=200, rounds=1)
    assert main(["report", str(run), "--output", str(tmp_path / "small.html"), "--embed-tokens", "1000"]) == 0
    data = embedded(tmp_path / "small.html")
    assert sum(len(s["pieces"]) for s in data["samples"]) <= 1000 + 4096 and len(data["index"]["ids"]) == 200


def test_a_slice_of_a_corpus_shows_the_rows_the_corpus_rejected(tmp_path, tokenizer_dir):
    from pipeline.runtime.files import read_manifest, write_manifest
    from tests.score_factories import write_synthetic_scores, write_synthetic_tokenized

    corpus = write_synthetic_tokenized(tmp_path / "corpus", tokenizer_dir, samples=4, mean_tokens=10)
    part = write_synthetic_tokenized(tmp_path / "slice", tokenizer_dir, samples=4, mean_tokens=10, rejected=False)
    write_manifest(part, read_manifest(part) | {"inputs": [{"kind": "tokenized", "path": str(corpus)}]})
    scores = write_synthetic_scores(tmp_path / "scores", part)
    assert main(["report", str(scores), "--output", str(tmp_path / "page.html")]) == 0
    assert f"Rejected rows (3, when the corpus was prepared: {corpus})" in (tmp_path / "page.html").read_text()


def test_an_eval_folder_renders_its_tables_and_plot(tmp_path):
    folder = tmp_path / "eval"
    folder.mkdir()
    (folder / "eval.json").write_text(json.dumps(EVAL))
    (folder / "eval.svg").write_text('<?xml version="1.0"?>\n<svg xmlns="http://www.w3.org/2000/svg"><text>plot</text></svg>')
    assert main(["report", str(folder), "--output", str(tmp_path / "eval.html")]) == 0
    text = (tmp_path / "eval.html").read_text()
    assert "held-out NLL (↓)" in text and "1.234 ± 0.05" in text and "1.111 ± 0.02" in text
    assert "0.81 ± 0.01" in text and "0.77 ± 0.03" in text
    assert b"<text>plot</text>" in shown_svg(text)
    # the power gate and its verdict: the page says the eval cannot rank the methods
    assert "Power gate failed: this eval cannot tell methods apart at this size." in text
    assert "-0.0123" in text and "0.1368" in text and "paired per-seed differences" in text


def shown_svg(page: str) -> bytes:
    """The one SVG the page shows as an image (a data: URL), decoded."""
    (encoded,) = re.findall(r'<img alt="[^"]*" src="data:image/svg\+xml;base64,([A-Za-z0-9+/=]+)">', page)
    return base64.b64decode(encoded)


HOSTILE_SVG = b"""<?xml version="1.0"?>
<svg xmlns="http://www.w3.org/2000/svg" xmlns:xlink="http://www.w3.org/1999/xlink" onload="alert('svg')">
<script>alert('script')</script>
<foreignObject><body xmlns="http://www.w3.org/1999/xhtml"><iframe src="https://example.com/frame"></iframe></body></foreignObject>
<image href="https://example.com/track.png" xlink:href="//example.com/other.png"/>
<a href="javascript:alert(1)"><text onclick="alert('text')">plot</text></a></svg>"""


def test_an_eval_svg_cannot_script_the_page_or_fetch_anything(tmp_path):
    folder = tmp_path / "eval"
    folder.mkdir()
    (folder / "eval.json").write_text(json.dumps(EVAL))
    (folder / "eval.svg").write_bytes(HOSTILE_SVG)
    assert main(["report", str(folder), "--output", str(tmp_path / "eval.html")]) == 0
    text = (tmp_path / "eval.html").read_text()
    # The file is shown as an <img> (which browsers never script and which loads nothing it references), as it is.
    assert shown_svg(text) == HOSTILE_SVG
    outside = re.sub(r'src="data:image/svg\+xml;base64,[^"]*"', "", text).lower()
    for marker in ("<script", "onload", "onclick", "foreignobject", "javascript:", "<iframe", "example.com"):
        assert marker not in outside, marker
    assert not re.search(r'(src|href)="(https?:)?//', text)


def test_ids_and_sources_cannot_break_the_embedded_json(tmp_path):
    hostile = ("<!--<script>", "x</script><script>alert(1)</script>&amp;")
    _, scores = literal_folders(tmp_path, ids=hostile, source="<!--<script ")
    assert main(["report", str(scores), "--output", str(tmp_path / "page.html")]) == 0
    text = (tmp_path / "page.html").read_text()
    raw = re.search(r'<script type="application/json" id="report-data">(.*?)</script>', text, re.S).group(1)
    # No "<" (nor ">" or "&") inside the element: the HTML parser cannot leave it early or enter its
    # double-escaped state, so the page's own script element after it stays a script.
    assert not set("<>&") & set(raw)
    data = json.loads(raw)
    assert sorted(data["index"]["ids"]) == sorted(hostile)
    assert {s["source"] for s in data["samples"]} == {"<!--<script " + i for i in hostile}
    assert text.count("<script") == 2 and text.endswith("})();\n</script></body></html>")


@pytest.mark.parametrize("case, message", [
    ("missing", "does not exist"), ("not an artifact", "is not an sstoken artifact folder"),
    ("bad eval", "eval.json does not match eval.v2.schema.json at (top level): 'schema_version' is a required"),
    ("foreign output", "exists and is not an sstoken report"),
    ("output folder", "is a folder"),
])
def test_bad_input_is_one_line_and_exit_2(tmp_path, capsys, case, message):
    _, scores = literal_folders(tmp_path)
    output = tmp_path / "page.html"
    folder = {"missing": tmp_path / "nothing", "not an artifact": tmp_path / "empty"}.get(case, scores)
    (tmp_path / "empty").mkdir()
    if case == "bad eval":
        folder = tmp_path / "eval"
        folder.mkdir()
        (folder / "eval.json").write_text('{"kind": "other"}')
    if case == "foreign output":
        output.write_text("my notes")
    if case == "output folder":
        output = tmp_path
    assert main(["report", str(folder), "--output", str(output)]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
    if case == "foreign output":
        assert output.read_text() == "my notes"


def test_a_report_replaces_its_own_page(tmp_path):
    _, scores = literal_folders(tmp_path)
    output = tmp_path / "page.html"
    output.write_text(f"<!DOCTYPE html><html><head><meta charset=\"utf-8\">{GENERATOR}</head>old page</html>")
    assert main(["report", str(scores), "--output", str(output)]) == 0
    assert "old page" not in output.read_text() and "sstoken report" in output.read_text()


ENTROPY = {"a": [NAN, NAN, 0.3, 0.6, 1.2], "b": [NAN, 2.0, NAN, 1.0]}


def _row(text: str, first: str) -> list[str]:
    """The cells of the page's table row whose first cell is `first`."""
    match = re.search(rf"<tr><td>{re.escape(first)}</td>(.*?)</tr>", text)
    assert match, first
    return [first, *re.findall(r"<td>(.*?)</td>", match.group(1))]


def _page(folder: Path, tmp_path: Path) -> str:
    """The report of `folder`, as text."""
    assert main(["report", str(folder), "--output", str(tmp_path / "page.html")]) == 0
    return (tmp_path / "page.html").read_text()


def test_the_page_shows_the_per_sample_roll_ups(tmp_path):
    # a: entropy 0.3, 0.6, 1.2 (mean 0.7), score mean 0.5, kept 2 of 3; b: entropy 2.0, 1.0 (1.5), score 0.5, 1 of 2
    _, scores = literal_folders(tmp_path, entropy=ENTROPY)
    text = _page(scores, tmp_path)
    assert "Samples by roll-up (r000)" in text
    # samples, min, p10, median, p90, max (linear percentiles of the two means)
    assert _row(text, "mean entropy") == ["mean entropy", "2", "0.7", "0.78", "1.1", "1.42", "1.5"]
    assert _row(text, "kept share") == ["kept share", "2", "0.5", "0.5167", "0.5833", "0.65", "0.6667"]
    assert _row(text, "mean REL") == ["mean REL", "2", "0", "0.125", "0.625", "1.125", "1.25"]
    assert "no sample filter" in text


def test_a_folder_scored_before_entropy_shows_no_mean_entropy(tmp_path):
    text = _page(as_written_before(literal_folders(tmp_path)[1], ("entropy_cur", "weight")), tmp_path)
    assert _row(text, "mean entropy") == ["mean entropy", "0", "-", "-", "-", "-", "-"] and "not stored" in text


def test_the_page_shows_what_the_sample_filter_removed_per_source(tmp_path):
    # mean entropy: a 0.7 (src-a, 3 targets), b 1.5 (src-b, 2 targets): keeping ceil(0.5 * 2) = 1 sample drops a
    _, scores = literal_folders(tmp_path, entropy=ENTROPY)
    masks = tmp_path / "masks"
    assert main(["select", "--scores", str(scores), "--output", str(masks), "--method", "loss", "--sample-ratio", "0.5",
                 "--sample-by", "entropy"]) == 0
    text = _page(masks, tmp_path)
    assert "Sample filter: kept 0.5 of the samples by entropy (last kept: b, roll-up 1.5)" in text
    # samples, dropped, dropped share, targets, targets dropped, targets dropped share
    assert _row(text, "all sources") == ["all sources", "2", "1", "0.5", "5", "3", "0.6"]
    assert _row(text, "src-a") == ["src-a", "1", "1", "1", "3", "3", "1"]
    assert _row(text, "src-b") == ["src-b", "1", "0", "0", "2", "0", "0"]


def test_score_levels_split_the_scale():
    assert [score_level(v, 0.0, 1.0) for v in (-1.0, 0.0, 0.5, 0.99, 2.0, float("nan"))] == [0, 0, 3, 6, 6, 0]


def test_the_page_in_headless_chromium(run_page, tmp_path):
    executable = browser()
    if executable is None:
        if os.environ.get("SSTOKEN_REQUIRE_BROWSER") == "1":
            pytest.fail("SSTOKEN_REQUIRE_BROWSER=1 but no chromium found (apt-get install chromium)")
        pytest.skip("no chromium found")
    if os.environ.get("SSTOKEN_REQUIRE_BROWSER") == "1":
        from playwright import sync_api
    else:
        sync_api = pytest.importorskip("playwright.sync_api")
    errors: list[str] = []
    with sync_api.sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=executable)
        page = chromium.new_page(viewport={"width": 1280, "height": 900})
        page.on("console", lambda message: errors.append(message.text) if message.type == "error" else None)
        page.on("pageerror", lambda error: errors.append(str(error)))
        page.route("**/*", lambda route: route.abort() if not route.request.url.startswith("file:") else route.continue_())
        page.goto(run_page.as_uri())
        assert page.locator("svg").count() >= 6
        assert page.locator('[data-group="highest score"] .sample').count() == 5
        assert page.locator(".t.k").count() > 0 and page.locator(".t.d").count() > 0 and page.locator(".t.c").count() > 0
        kept = page.locator('[data-group="highest score"] .t.k').first
        kept.hover()
        tip = page.locator("#tip")
        assert tip.is_visible()
        sample_id = page.locator('[data-group="highest score"] .sample').first.get_attribute("data-sample")
        data = embedded(run_page)
        sample = next(s for s in data["samples"] if s["id"] == sample_id)
        row = sample["t"][int(kept.get_attribute("data-i"))]
        text = tip.inner_text()
        assert "kept" in text
        for name, value in zip(("nll_cur", "nll_hist", "rel", "attn", "score"), row[1:]):
            assert re.search(rf"{name}\s+{re.escape(f'{value:.4g}'[:4])}", text), (name, value, text)
        page.fill("#search", data["index"]["ids"][-1])
        assert page.locator("#found").inner_text().strip()
        page.screenshot(path=str(tmp_path / "report.png"))
        chromium.close()
    assert errors == []
    assert (tmp_path / "report.png").stat().st_size > 10_000
