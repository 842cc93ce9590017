"""The eval's table: cells' measures aggregated over seeds into eval.json, eval.md (Markdown) and eval.svg (a plot).

    write_eval(config, measures, wall_s=..., cells_run=...) -> the eval.json content, typed (`EvalReport`)

eval.json (`schemas/eval.v1.schema.json`; `sstoken report EVAL_DIR` reads it through `pipeline.eval.records`):
    {"kind": "eval", "schema_version": 1, "config": {...}, "methods": [...],
     "measures": [{"key", "label", "higher_is_better"}, ...],
     "table": [{"method", "values": {KEY: {"mean", "std", "n"}}}, ...],
     "selection_by_round": [{"method", "round", "corrupted_dropped": {...}, "clean_dropped": {...}, "auroc": {...}}, ...]}
`std` is the sample standard deviation over the seeds (0 with one seed); a measure a method has no
value for (the AUROC of `full`, whose score ranks nothing) has mean and std null and n 0. The
row `base` is the model before any training, for scale.
"""

from __future__ import annotations

import json
import math
import os
import statistics
from pathlib import Path
from typing import Any

from pipeline.eval.config import EvalConfig
from pipeline.eval.records import EVAL_RECORD, CellMeasures, EvalReport, check_eval

SCHEMA_VERSION = 1
BASE_ROW = "base"
SELECTION = ("corrupted_dropped", "clean_dropped", "auroc")
# key, label, higher is better (None: a check, neither), and the corpora it applies to.
MEASURES: tuple[tuple[str, str, bool | None, tuple[str, ...]], ...] = (
    ("heldout_nll", "held-out NLL", False, ("task", "natural")),
    ("exact_match", "exact match", True, ("task",)),
    ("corrupted_dropped", "corrupted dropped (last round)", True, ("task",)),
    ("clean_dropped", "clean dropped (last round)", False, ("task",)),
    ("auroc", "AUROC clean vs corrupted (last round)", True, ("task",)),
    ("score_s", "scoring s", False, ("task", "natural")),
    ("train_s", "training s", False, ("task", "natural")),
    ("kept_tokens", "kept tokens seen", None, ("task", "natural")),
)


def spread(values: list[float | None]) -> dict[str, Any]:
    """{"mean", "std", "n"} over the values that are there (std: sample standard deviation, 0 for one value)."""
    present = [float(v) for v in values if v is not None and math.isfinite(v)]
    if not present:
        return {"mean": None, "std": None, "n": 0}
    std = statistics.stdev(present) if len(present) > 1 else 0.0
    return {"mean": statistics.fmean(present), "std": std, "n": len(present)}


def build_report(config: EvalConfig, measures: list[CellMeasures], wall_s: float, cells_run: int) -> dict[str, Any]:
    """eval.json's content from the cells' measures files."""
    keys = [(key, label, better) for key, label, better, corpora in MEASURES if config.corpus in corpora]
    rows = [BASE_ROW, *config.methods]
    table = []
    for method in rows:
        cells = [m for m in measures if m.method == method]
        values = {key: spread([c.values.get(key) for c in cells]) for key, _, _ in keys}
        table.append({"method": method, "values": {k: v for k, v in values.items() if v["n"] or method != BASE_ROW}})
    by_round = []
    for method in config.methods:
        cells = [m for m in measures if m.method == method]
        for index in sorted({r.round for c in cells for r in c.selection_by_round}):
            entries = [r for c in cells for r in c.selection_by_round if r.round == index]
            by_round.append({"method": method, "round": index, "selection": entries[0].selection}
                            | {name: spread([getattr(e, name) for e in entries]) for name in SELECTION})
    return {
        "kind": "eval",
        "schema_version": SCHEMA_VERSION,
        "config": config.resolved(),
        "corpus": config.corpus,
        "seeds": list(config.seeds),
        "methods": list(config.methods),
        "rows": rows,
        "measures": [{"key": k, "label": label, "higher_is_better": better} for k, label, better in keys],
        "table": table,
        "selection_by_round": by_round,
        "wall_s": round(wall_s, 1),
        # Every cell's own wall time (reference and base included), summed: the eval's cost across resumed calls.
        "cells_wall_s": round(sum(m.wall_s for m in measures), 1),
        "cells_run": cells_run,
    }


def _cell(value: dict[str, Any], key: str) -> str:
    if value is None or value["mean"] is None:
        return "—"
    digits = 0 if key in ("kept_tokens",) else 1 if key.endswith("_s") else 3
    mean, std = value["mean"], value["std"]
    return f"{mean:,.{digits}f} ± {std:,.{digits}f}"


def markdown(report: dict[str, Any]) -> str:
    """The table (mean ± std over seeds) and the selection quality per round, as Markdown."""
    measures = report["measures"]
    lines = [
        f"Corpus: {report['corpus']}; seeds {', '.join(map(str, report['seeds']))} (mean ± sample std over seeds); "
        f"model {report['config']['model']}; cells' wall time {report['cells_wall_s']:,.0f} s "
        f"(this call {report['wall_s']:,.0f} s).",
        "",
        "| method | " + " | ".join(m["label"] + (" ↓" if m["higher_is_better"] is False else " ↑" if m["higher_is_better"] else "")
                                   for m in measures) + " |",
        "|---|" + "---:|" * len(measures),
    ]
    for row in report["table"]:
        lines.append(f"| {row['method']} | " + " | ".join(_cell(row["values"].get(m["key"]), m["key"]) for m in measures) + " |")
    if report["selection_by_round"]:
        lines += ["", "Selection quality per round (round 0 selects with the base model; a warm-up round selects by attention):", "",
                  "| method | round | selection | corrupted dropped ↑ | clean dropped ↓ | AUROC ↑ |", "|---|---:|---|---:|---:|---:|"]
        for entry in report["selection_by_round"]:
            lines.append(f"| {entry['method']} | {entry['round']} | {entry['selection']} | "
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
    figure.suptitle(f"sstoken eval ({report['corpus']}, {len(report['seeds'])} seeds, mean ± std)", fontsize=10)
    figure.tight_layout()
    temporary = path.with_name(path.name + ".partial")
    figure.savefig(temporary, format="svg")
    plt.close(figure)
    os.replace(temporary, path)


def write_eval(config: EvalConfig, measures: list[CellMeasures], wall_s: float, cells_run: int) -> EvalReport:
    """eval.json (checked against its schema), eval.md and eval.svg in the eval folder (each written whole, then
    renamed)."""
    output = Path(config.output)
    report = build_report(config, measures, wall_s, cells_run)
    typed = check_eval(report, output / EVAL_RECORD)
    for name, text in ((EVAL_RECORD, json.dumps(report, indent=2, allow_nan=False) + "\n"), ("eval.md", markdown(report))):
        temporary = output / (name + ".partial")
        temporary.write_text(text)
        os.replace(temporary, output / name)
    plot(report, output / "eval.svg")
    return typed
