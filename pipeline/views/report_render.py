"""`sstoken report`'s page: totals, plots, token heatmaps and rounds of a selection, or an eval folder's tables.

    text = render_report(ReportInputs(stats, figures, views, ...))    # the run/scores/masks page
    text = render_eval(folder)                                         # the eval page (eval.json, eval.svg)

The numbers come from report_figures (over every sample), the plots from report_plots, the page's
frame and script from report_page; this module lays the sections out.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.eval.records import Spread, read_eval
from pipeline.loop.run_folder import RunRecord
from pipeline.views import report_plots as plots
from pipeline.views.report_figures import ROLLUP_LEVELS, ROLLUPS, rejected_rows
from pipeline.views.report_page import escape, figure, legend, number, page, sample_json, svg_image, table
from pipeline.views.score_colours import RAMP
from pipeline.views.stats import SampleView, Stats

GROUPS = ("highest score", "lowest score", "middle score", "random")
MAX_TOKENS_PER_SAMPLE = 4096


@dataclass(frozen=True)
class ReportInputs:
    """What the page shows; `figures` one entry per round (report_figures.round_figures), oldest first."""

    stats: Stats
    folder: Path
    figures: list[dict[str, Any]]
    views: list[SampleView]
    curves: list[dict[str, Any]] = field(default_factory=list)  # round, step, loss
    agreements: list[dict[str, Any]] = field(default_factory=list)  # first, second + compare.mask_agreement figures
    flipped: list[dict[str, Any]] = field(default_factory=list)  # first, second + report_figures.flipped_tokens
    token_source: Path | None = None
    corpus: Path | None = None  # the prepared corpus whose rejected.parquet to show (default: the last round's data)


def _totals(inputs: ReportInputs) -> str:
    rows = []
    for figures in inputs.figures:
        totals, part = figures["totals"], inputs.stats.part(figures["round"])
        selection = part.selection
        rows.append([f"r{figures['round']:03d}", figure(totals["samples"]), figure(totals["tokens"]),
                     figure(totals["trainable"]), figure(totals["kept"]),
                     figure(totals["kept"] / totals["trainable"] if totals["trainable"] else None),
                     selection.get("method", "sstoken"), figure(selection.get("ratio")), selection.get("granularity", "-")])
    header = ["round", "samples", "tokens", "targets", "kept", "kept ratio", "method", "ratio", "granularity"]
    corpus = inputs.corpus or inputs.stats.parts[-1].tokenized
    rejected = rejected_rows(corpus)
    reasons = (table(["reason", "rows"], [[reason, figure(count)] for reason, count in rejected["by_reason"].items()])
               if rejected["total"] else "<p class=\"muted\">no rejected rows</p>")
    examples = (table(["input", "where", "sample id", "reason", "detail"],
                      [[r["input_file"], r["locator"], r["sample_id"] or "-", r["reason"], r["detail"]] for r in rejected["examples"]])
                if rejected["examples"] else "")
    return (f"<h2 id=\"totals\">Totals</h2>{table(header, rows)}<h3>Rejected rows ({figure(rejected['total'])}, when the "
            f"corpus was prepared: {escape(corpus)})</h3>{reasons}<details><summary>first rejected rows</summary>{examples}</details>"
            f"{_provenance(inputs)}")


def _short(fingerprint: Any) -> str:
    return str(fingerprint)[:12] if fingerprint else "-"


def _provenance(inputs: ReportInputs) -> str:
    part = inputs.stats.parts[-1]
    manifest, tokenized = part.masks_manifest, part.tokenized_manifest
    checkpoints = manifest.get("checkpoints", {})
    rows = [["masks", str(part.masks)], ["signals", str(part.signals or "-")], ["tokenized data", str(part.tokenized)],
            ["made at", manifest.get("created_at", "-")], ["code version", manifest.get("code_version", "-")],
            ["tokenizer", f"{tokenized.get('tokenizer', {}).get('name_or_path', '-')} "
                          f"({_short(tokenized.get('tokenizer', {}).get('fingerprint'))})"],
            ["token texts from", str(inputs.token_source or "no tokenizer found: ids shown")]]
    rows += [[f"{role} checkpoint", f"{entry.get('path')} ({_short(entry.get('fingerprint'))})"]
             for role, entry in checkpoints.items()]
    record = inputs.stats.record
    if record is not None:
        rows.append(["history policy", ", ".join(f"{k} {v}" for k, v in _history(record).items())])
    config = record.config if record is not None else manifest.get("config")
    details = "".join(
        f"<details><summary>{escape(name)}</summary><pre>{escape(json.dumps(value, indent=2, default=str))}</pre></details>"
        for name, value in (("config", config), ("selection", manifest.get("selection")), ("masks manifest", manifest))
        if value)
    return f"<h3>Provenance (last round)</h3>{table(['', ''], rows)}{details}"


def _plots(inputs: ReportInputs) -> str:
    last = inputs.figures[-1]
    items = [plots.distributions(last), plots.kept_per_sample(last), plots.kept_by_position(inputs.figures),
             plots.kept_by_source(last), plots.token_bars(last)]
    cells = "".join(f'<div class="plot">{svg}</div>' for svg in items)
    tokens = last["tokens"]
    listing = "".join(
        f"<div><h3>most often {key}</h3>"
        + table(["token", key, "targets", "kept ratio"],
                [[repr(e["text"]), figure(e[key]), figure(e["targets"]), figure(e["kept_ratio"])] for e in tokens[key]])
        + "</div>" for key in ("dropped", "kept"))
    return (f"<h2 id=\"plots\">Plots (r{last['round']:03d}, every target)</h2><div class=\"plots\">{cells}</div>"
            f"<details><summary>token counts as tables</summary><div class=\"plots\">{listing}</div></details>")


def _share(part: int, whole: int) -> str:
    return figure(part / whole if whole else None)


def _sample_filter(sample_filter: dict[str, Any] | None) -> str:
    """What a two-level selection's sample filter removed, over the round and per source."""
    if sample_filter is None:
        return "<p class=\"muted\">no sample filter: every sample was selected from (select --sample-ratio 1)</p>"
    counts, cut = sample_filter["samples"], sample_filter.get("sample_cut") or {}
    rows = [[name, figure(c["samples"]), figure(c["dropped"]), _share(c["dropped"], c["samples"]), figure(c["targets"]),
             figure(c["dropped_targets"]), _share(c["dropped_targets"], c["targets"])]
            for name, c in [("all sources", counts), *sorted(counts["by_source"].items())]]
    return (f"<h3>Sample filter: kept {figure(sample_filter['sample_ratio'])} of the samples by "
            f"{escape(sample_filter['sample_by'])} (last kept: {escape(cut.get('sample_id', '-'))}, roll-up "
            f"{figure(cut.get('value'))})</h3>"
            + table(["source", "samples", "dropped", "dropped share", "targets", "targets dropped", "targets dropped share"],
                    rows))


def _curation(inputs: ReportInputs) -> str:
    """The per-sample roll-ups of the last round (what `select --sample-by` ranks) and what a sample filter removed."""
    last = inputs.figures[-1]
    rollups = last["rollups"]
    header = ["per sample", "samples"] + ["min" if v == 0 else "max" if v == 100 else f"p{v}" for v in ROLLUP_LEVELS]
    rows = [[label, figure(rollups[name]["samples"]), *(figure(v) for v in rollups[name]["percentiles"] or
                                                        [None] * len(ROLLUP_LEVELS))]
            for name, label in ROLLUPS.items()]
    plot = plots.sample_rollups(last, {k: v for k, v in ROLLUPS.items() if k != "kept_share"})
    return (f"<h2 id=\"curation\">Samples by roll-up (r{last['round']:03d})</h2><p class=\"muted\">each sample's mean over "
            "its targets; a sample filter drops the lowest by one of them</p>"
            f"{table(header, rows)}<div class=\"plot\">{plot}</div>{_sample_filter(last['sample_filter'])}")


def _samples(inputs: ReportInputs) -> tuple[str, dict[str, Any]]:
    last = inputs.figures[-1]
    samples = last["samples"]
    means = dict(zip(samples["sample_id"].to_list(), samples["mean_score"].to_list()))
    data = {
        "palette": list(RAMP), "scale": last["score_scale"], "folder": str(inputs.folder),
        "samples": [sample_json(view, means.get(view.sample_id), MAX_TOKENS_PER_SAMPLE) for view in inputs.views],
        "index": {"ids": samples["sample_id"].to_list(), "kept": samples["n_kept"].to_list(),
                  "targets": samples["n_trainable"].to_list(),
                  "mean_score": [number(v) for v in samples["mean_score"].to_list()]},
    }
    groups = "".join(f'<h3>{escape(group)}</h3><div data-group="{escape(group)}"></div>' for group in GROUPS)
    html = (f"<h2 id=\"samples\">Samples (r{last['round']:03d}: {len(inputs.views)} of {samples.height:,} embedded)</h2>"
            f"{legend(last['score_scale'])}<p>Find a sample by id: <input id=\"search\" placeholder=\"sample id\"></p>"
            f"<div id=\"found\"></div>{groups}")
    return html, data


def _rounds(inputs: ReportInputs) -> str:
    if len(inputs.figures) < 2 and not inputs.curves:
        return ""
    record = inputs.stats.record
    rows = []
    for entry in record.rounds if record is not None else []:
        summary = entry.summary
        rows.append([f"r{entry.round:03d}", entry.status, entry.selection.method if entry.selection else "-",
                     entry.history.policy if entry.history else record.history.policy,
                     figure(summary.kept_ratio if summary else None), figure(summary.train_loss if summary else None)])
    agreement_rows = [[f"r{a['first']:03d} → r{a['second']:03d}", figure(a["samples"]), figure(a["same_decision"]),
                       figure(a["kept_overlap"]), figure(a["kept_to_dropped"]), figure(a["dropped_to_kept"])]
                      for a in inputs.agreements]
    flips = "".join(
        f"<div><h3>r{f['first']:03d} → r{f['second']:03d}: {escape(label)}</h3>"
        + table(["token", "tokens"], [[repr(e["text"]), figure(e["count"])] for e in f[key]]) + "</div>"
        for f in inputs.flipped for key, label in (("kept_to_dropped", "kept, then dropped"), ("dropped_to_kept", "dropped, then kept")))
    curve = f'<div class="plot">{plots.loss_curves(inputs.curves)}</div>' if inputs.curves else "<p>no training metrics yet</p>"
    history = _history(record) if record is not None else {"policy": "-"}
    return (f"<h2 id=\"rounds\">Rounds</h2><p>history policy: <b>{escape(history['policy'])}</b>"
            f"{escape(''.join(f', {k} {v}' for k, v in history.items() if k != 'policy'))}</p>"
            + table(["round", "status", "selection", "history", "kept ratio", "train loss"], rows)
            + "<h3>How the masks changed (samples both rounds selected from)</h3>"
            + table(["rounds", "samples", "same decision", "kept overlap", "kept → dropped", "dropped → kept"], agreement_rows)
            + f"<div class=\"plots\">{flips}</div>{curve}")


def _history(record: RunRecord) -> dict[str, Any]:
    """The run's history policy and its settings (alpha of ema), as shown."""
    return record.history.model_dump(exclude_none=True)


def render_report(inputs: ReportInputs) -> str:
    """The whole page of a run, scores or masks folder."""
    header = (f"<h1>sstoken report</h1><p class=\"muted\">{escape(inputs.folder)} · {len(inputs.figures)} round(s) · "
              "<a href=\"#totals\">totals</a> · <a href=\"#plots\">plots</a> · <a href=\"#curation\">samples by roll-up</a> · "
              "<a href=\"#samples\">samples</a>"
              + (" · <a href=\"#rounds\">rounds</a>" if len(inputs.figures) > 1 else "") + "</p>")
    samples, data = _samples(inputs)
    return page(f"sstoken report: {inputs.folder}", [header, _totals(inputs), _plots(inputs), _curation(inputs), samples,
                                                         _rounds(inputs)], data)


def _measure_cell(value: Spread | None) -> str:
    if value is None or value.mean is None:
        return "-"
    return f"{value.mean:.4g} ± {value.std:.2g}" if value.std is not None else f"{value.mean:.4g}"


def _gate_figure(value: float | None) -> str:
    return "-" if value is None else f"{value:.4g}"


def render_eval(folder: Path) -> str:
    """The eval folder's page: the table of measures (mean ± std over seeds), the selection by round, eval.svg."""
    record = read_eval(folder)  # a malformed eval.json: one error naming the file and the field
    measures = record.measures
    header = ["method"] + [m.label + {True: " (↑)", False: " (↓)", None: ""}[m.higher_is_better] for m in measures]
    rows = [[entry.method] + [_measure_cell(entry.values.get(m.key)) for m in measures] for entry in record.table]
    gates = [[gate.label, _gate_figure(gate.difference), _gate_figure(gate.spread), _gate_figure(gate.threshold),
              str(gate.seeds), "yes" if gate.passes else "no"] for gate in record.power]
    selection = [[entry.method, f"r{entry.round:03d}", entry.selection, "yes" if entry.measured else "no",
                  _measure_cell(entry.corrupted_dropped), _measure_cell(entry.drop_share),
                  _measure_cell(entry.auroc_within), _measure_cell(entry.auroc_pooled)]
                 for entry in record.selection_by_round]
    svg_path = Path(folder) / "eval.svg"
    # The folder's file, not ours: shown as an image, which cannot script the page or fetch anything.
    plot = svg_image(svg_path.read_bytes(), "eval.svg: the measures by method") if svg_path.is_file() else ""
    sections = [
        f"<h1>sstoken eval</h1><p class=\"muted\">{escape(folder)} · methods: {escape(', '.join(record.methods))}</p>",
        f"<p><strong>{escape(record.verdict)}</strong></p>",
        "<h2>Power gate</h2>" + (f"<p class=\"muted\">spread: {escape(record.spread_definition)}</p>" + table(
            ["measure", "oracle − full", "spread", "3 × spread", "seeds", "tells methods apart"], gates)
            if gates else "<p class=\"muted\">no oracle row</p>"),
        "<h2>Measures (mean ± std over seeds)</h2>" + table(header, rows),
        "<h2>Selection by round</h2>" + (table(["method", "round", "selection", "counted", "corrupted dropped",
                                                "dropped / oracle's", "AUROC within", "pooled AUROC"], selection)
                                         if selection else "<p class=\"muted\">none recorded</p>"),
        f"<h2>Plot</h2><div class=\"plot\">{plot}</div>" if plot else "<p class=\"muted\">no eval.svg</p>",
        f"<details><summary>config</summary><pre>{escape(json.dumps(record.config, indent=2))}</pre></details>",
    ]
    return page(f"sstoken eval: {folder}", sections)
