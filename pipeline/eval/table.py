"""The eval's table: cells' measures aggregated over seeds into eval.json, eval.md (Markdown) and eval.svg (a plot).

    write_eval(config, measures, wall_s=..., cells_run=..., max_new_tokens=...) -> eval.json's content, typed

eval.json (`schemas/eval.v2.schema.json`; `sstoken report EVAL_DIR` reads it through `pipeline.eval.records`):
    {"kind": "eval", "schema_version": 2, "config": {...}, "methods": [...],
     "measures": [{"key", "label", "higher_is_better"}, ...],
     "table": [{"method", "values": {KEY: {"mean", "std", "n"}}}, ...],
     "power": [{"key", "label", "seeds", "difference", "spread", "threshold", "passes", "verdict"}, ...],
     "spread_definition": "...", "verdict": "...", "ranking": {KEY: [rows best first]},
     "selection_by_round": [{"method", "round", "selection", "measured", "drop_share": {...}, ...}, ...]}
`std` is the sample standard deviation over the seeds (0 with one seed); a measure a row has no
value for (the drop share of `full`, which drops nothing) has mean and std null and n 0. The row
`base` is the model before any training, for scale. The power gate (`pipeline.eval.power`) decides
which outcome measures may rank the rows: `ranking` holds only those, and the verdict says so.
"""

from __future__ import annotations

import json
import math
import os
import statistics
from pathlib import Path
from typing import Any

from pipeline.eval.config import EvalConfig
from pipeline.eval.power import GATE_FACTOR, SPREAD_DEFINITION, overall_verdict, power_gates
from pipeline.eval.records import EVAL_RECORD, EVAL_VERSION, CellMeasures, EvalReport, check_eval
from pipeline.eval.rows import ORACLE

BASE_ROW = "base"
SELECTION = ("corrupted_dropped", "drop_share", "auroc_within", "auroc_pooled")
COUNTED = "the first pass's slices after the warm-up slice 0"
# key, label, higher is better (None: a count, neither), and the corpora it applies to.
MEASURES: tuple[tuple[str, str, bool | None, tuple[str, ...]], ...] = (
    ("heldout_nll", "held-out NLL", False, ("task", "natural")),
    ("exact_match", "exact match", True, ("task",)),
    ("auroc_within", "AUROC within corrupted samples", True, ("task",)),
    ("drop_share", "corrupted dropped / oracle's", True, ("task",)),
    ("corrupted_dropped", "corrupted dropped", True, ("task",)),
    ("auroc_pooled", "pooled AUROC (global selection)", True, ("task",)),
    ("kept_tokens", "kept tokens", None, ("task", "natural")),
    ("steps", "optimizer steps", None, ("task", "natural")),
    ("score_s", "scoring s", False, ("task", "natural")),
    ("train_s", "training s", False, ("task", "natural")),
)


def spread(values: list[float | None]) -> dict[str, Any]:
    """{"mean", "std", "n"} over the values that are there (std: sample standard deviation, 0 for one value)."""
    present = [float(v) for v in values if v is not None and math.isfinite(v)]
    if not present:
        return {"mean": None, "std": None, "n": 0}
    std = statistics.stdev(present) if len(present) > 1 else 0.0
    return {"mean": statistics.fmean(present), "std": std, "n": len(present)}


def _kinds(measures: list[CellMeasures]) -> list[str]:
    """The corruption kinds the cells measured `auroc_within:KIND` for, in their first order."""
    kinds: dict[str, None] = {}
    for cell in measures:
        kinds |= {key.split(":", 1)[1]: None for key in cell.values if key.startswith("auroc_within:")}
    return list(kinds)


def _ranking(table: list[dict[str, Any]], keys: dict[str, bool | None], gates: list[dict[str, Any]]) -> dict[str, list[str]]:
    """Rows best first on each measure that passes the power gate (rows without a value left out)."""
    ranking = {}
    for gate in gates:
        if not gate["passes"]:
            continue
        key, higher = gate["key"], keys[gate["key"]]
        rows = [(r["values"][key]["mean"], r["method"]) for r in table
                if r["method"] != BASE_ROW and r["values"].get(key, {}).get("mean") is not None]
        ranking[key] = [method for _, method in sorted(rows, key=lambda p: -p[0] if higher else p[0])]
    return ranking


def build_report(config: EvalConfig, measures: list[CellMeasures], wall_s: float, cells_run: int,
                 max_new_tokens: dict[str, int | None] | None = None) -> dict[str, Any]:
    """eval.json's content from the cells' measures files."""
    keys = [(key, label, better) for key, label, better, corpora in MEASURES if config.corpus in corpora]
    kinds = _kinds(measures) if config.corpus == "task" else []
    rows = [BASE_ROW, *config.methods]
    table = []
    for method in rows:
        cells = [m for m in measures if m.method == method]
        names = [key for key, _, _ in keys] + [f"auroc_within:{kind}" for kind in kinds]
        values = {key: spread([c.values.get(key) for c in cells]) for key in names}
        table.append({"method": method, "values": {k: v for k, v in values.items() if v["n"] or method != BASE_ROW}})
    by_round = []
    for method in config.methods:
        cells = [m for m in measures if m.method == method]
        for index in sorted({r.round for c in cells for r in c.selection_by_round}):
            entries = [r for c in cells for r in c.selection_by_round if r.round == index]
            by_round.append({"method": method, "round": index, "selection": entries[0].selection,
                             "measured": entries[0].measured}
                            | {name: spread([getattr(e, name) for e in entries]) for name in SELECTION})
    gates = power_gates(measures, {key: label for key, label, _ in keys}) if ORACLE in config.methods else []
    return {
        "kind": "eval",
        "schema_version": EVAL_VERSION,
        "config": config.resolved(),
        "corpus": config.corpus,
        "seeds": list(config.seeds),
        "methods": list(config.methods),
        "rows": rows,
        "measures": [{"key": k, "label": label, "higher_is_better": better} for k, label, better in keys],
        "table": table,
        "power": gates,
        "spread_definition": SPREAD_DEFINITION,
        "verdict": overall_verdict(gates, has_oracle=ORACLE in config.methods),
        "ranking": _ranking(table, {k: better for k, _, better in keys}, gates),
        "kinds": kinds,
        "max_new_tokens": dict(max_new_tokens or {}),
        "selection_by_round": by_round,
        "wall_s": round(wall_s, 1),
        # Every cell's own wall time (reference and base included), summed: the eval's cost across resumed calls.
        "cells_wall_s": round(sum(m.wall_s for m in measures), 1),
        "cells_run": cells_run,
    }


def _cell(value: dict[str, Any], key: str) -> str:
    if value is None or value["mean"] is None:
        return "—"
    digits = 0 if key in ("kept_tokens", "steps") else 1 if key.endswith("_s") else 3
    mean, std = value["mean"], value["std"]
    return f"{mean:,.{digits}f} ± {std:,.{digits}f}"


def _figure(value: float | None, sign: bool = False) -> str:
    return "—" if value is None else f"{value:+.4f}" if sign else f"{value:.4f}"


def _power_lines(report: dict[str, Any]) -> list[str]:
    if not report["power"]:
        return []
    lines = ["", f"Power gate: oracle − full against {GATE_FACTOR:g} × the seed spread, where the spread is the "
             f"{report['spread_definition']}.", "",
             "| measure | oracle − full (mean over seeds) | spread | 3 × spread | seeds | tells methods apart |",
             "|---|---:|---:|---:|---:|---|"]
    for gate in report["power"]:
        lines.append(f"| {gate['label']} | {_figure(gate['difference'], sign=True)} | {_figure(gate['spread'])} | "
                     f"{_figure(gate['threshold'])} | {gate['seeds']} | {'yes' if gate['passes'] else '**no**'} |")
    lines += [""] + [f"- {gate['verdict']}" for gate in report["power"]]
    return lines


def markdown(report: dict[str, Any]) -> str:
    """The verdict, the power gate, the table (mean ± std over seeds), the AUROC per corruption kind, a ranking
    (only on measures that pass the gate) and the selection per round, as Markdown."""
    measures = report["measures"]
    generation = ", ".join(f"seed {s}: {n}" for s, n in report["max_new_tokens"].items() if n is not None)
    lines = [
        f"**{report['verdict']}**",
        "",
        f"Corpus: {report['corpus']}; seeds {', '.join(map(str, report['seeds']))} (mean ± sample std over seeds); "
        f"model {report['config']['model']}; cells' wall time {report['cells_wall_s']:,.0f} s "
        f"(this call {report['wall_s']:,.0f} s)."
        + (f" Exact match generates up to {generation} tokens ("
           + ("max_new_tokens" if report["config"].get("max_new_tokens") else "the longest held-out answer + a margin")
           + ")." if generation else ""),
        *_power_lines(report),
        "",
        "| method | " + " | ".join(m["label"] + (" ↓" if m["higher_is_better"] is False else " ↑" if m["higher_is_better"] else "")
                                   for m in measures) + " |",
        "|---|" + "---:|" * len(measures),
    ]
    for row in report["table"]:
        lines.append(f"| {row['method']} | " + " | ".join(_cell(row["values"].get(m["key"]), m["key"]) for m in measures) + " |")
    if report["corpus"] == "task":
        lines += ["", f"Selection measures pool {COUNTED} (the same samples for every row but full_tokens, each scored "
                  "by a model that has not trained on it). AUROC within: clean vs corrupted tokens of each corrupted sample, averaged "
                  "(0.5 chance, the oracle 1); corrupted dropped / oracle's: what the oracle could drop with the same "
                  "kept budget (per sample, or per round for a global selection); pooled AUROC for global selection only."]
    if report["kinds"]:
        lines += ["", "AUROC within corrupted samples, by corruption kind:", "",
                  "| method | " + " | ".join(report["kinds"]) + " |", "|---|" + "---:|" * len(report["kinds"])]
        for row in report["table"]:
            if row["method"] != BASE_ROW:
                lines.append(f"| {row['method']} | " + " | ".join(
                    _cell(row["values"].get(f"auroc_within:{kind}"), "auroc_within") for kind in report["kinds"]) + " |")
    labels = {m["key"]: m["label"] for m in measures}
    for key, order in report["ranking"].items():
        lines += ["", f"Ranking by {labels[key]} (the power gate passed), best first: {', '.join(order)}."]
    if report["selection_by_round"]:
        lines += ["", "Selection per round (a warm-up round selects as its method starts: attention, or every token; "
                  "counted: pooled in the table):", "",
                  "| method | round | selection | counted | corrupted dropped ↑ | dropped / oracle's ↑ | AUROC within ↑ | "
                  "pooled AUROC ↑ |", "|---|---:|---|---|---:|---:|---:|---:|"]
        for entry in report["selection_by_round"]:
            lines.append(f"| {entry['method']} | {entry['round']} | {entry['selection']} | "
                         f"{'yes' if entry['measured'] else 'no'} | "
                         + " | ".join(_cell(entry[name], name) for name in SELECTION) + " |")
    return "\n".join(lines) + "\n"


def plot(report: dict[str, Any], path: Path) -> None:
    """Methods x measures: one panel per measure, a bar per method with the spread over seeds as error bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    measures = report["measures"]
    columns = min(4, len(measures))
    rows = math.ceil(len(measures) / columns)
    figure, axes = plt.subplots(rows, columns, figsize=(3.6 * columns, 2.9 * rows), squeeze=False)
    names = [row["method"] for row in report["table"]]
    colours = plt.get_cmap("tab10")(range(len(names)))
    for axis, measure in zip(axes.flat, measures):
        values = [row["values"].get(measure["key"]) or {"mean": None, "std": None} for row in report["table"]]
        means = [v["mean"] if v["mean"] is not None else math.nan for v in values]
        stds = [v["std"] if v["std"] is not None else 0.0 for v in values]
        axis.bar(range(len(names)), means, yerr=stds, color=colours, capsize=3)
        arrow = " (lower better)" if measure["higher_is_better"] is False else " (higher better)" if measure["higher_is_better"] else ""
        axis.set_title(measure["label"] + arrow, fontsize=9)
        axis.set_xticks(range(len(names)), names, rotation=45, ha="right", fontsize=8)
        axis.tick_params(axis="y", labelsize=8)
        finite = [m for m in means if math.isfinite(m)]
        if finite and measure["key"] == "heldout_nll":  # differences are small against the level: zoom in
            low = min(m - s for m, s in zip(means, stds) if math.isfinite(m))
            high = max(m + s for m, s in zip(means, stds) if math.isfinite(m))
            axis.set_ylim(low - 0.1 * (high - low + 1e-9), high + 0.1 * (high - low + 1e-9))
    for axis in list(axes.flat)[len(measures):]:
        axis.axis("off")
    # The plot travels alone: it carries the gate's word, so nobody ranks bars the eval cannot tell apart.
    passing = [gate["label"] for gate in report["power"] if gate["passes"]]
    gate = (f"power gate passed on {', '.join(passing)}" if passing
            else "power gate failed: cannot tell methods apart at this size, do not rank")
    figure.suptitle(f"sstoken eval ({report['corpus']}, {len(report['seeds'])} seeds, mean ± std; {gate})", fontsize=10)
    figure.tight_layout()
    temporary = path.with_name(path.name + ".partial")
    figure.savefig(temporary, format="svg")
    plt.close(figure)
    os.replace(temporary, path)


def write_eval(config: EvalConfig, measures: list[CellMeasures], wall_s: float, cells_run: int,
               max_new_tokens: dict[str, int | None] | None = None) -> EvalReport:
    """eval.json (checked against its schema), eval.md and eval.svg in the eval folder (each written whole, then
    renamed)."""
    output = Path(config.output)
    report = build_report(config, measures, wall_s, cells_run, max_new_tokens)
    typed = check_eval(report, output / EVAL_RECORD)
    for name, text in ((EVAL_RECORD, json.dumps(report, indent=2, allow_nan=False) + "\n"), ("eval.md", markdown(report))):
        temporary = output / (name + ".partial")
        temporary.write_text(text)
        os.replace(temporary, output / name)
    plot(report, output / "eval.svg")
    return typed
