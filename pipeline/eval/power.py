"""The power gate: can this eval tell methods apart at all? Only if the oracle visibly beats `full`.

The oracle drops exactly the corrupted tokens a selection could hope to find (`pipeline.eval.rows`),
so oracle - full is the most any selection can gain on an outcome measure at this size. Per
outcome measure (held-out NLL, exact match), over the seeds that have both cells:

    d_s      = oracle_s - full_s                      (the paired per-seed difference)
    spread   = sample standard deviation of the d_s   (needs at least two seeds)
    passes   = |mean(d_s)| > 3 x spread, in the direction the measure calls better

Where a measure does not pass, no method's gain over another on it can be told from seed noise
(it is at most the oracle's), so the eval says it cannot tell methods apart on that measure at
this size instead of ranking them (`verdict`), in eval.md, eval.json and the CLI's summary.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from typing import Any

from pipeline.eval.rows import FULL, ORACLE

GATE_FACTOR = 3.0
SPREAD_DEFINITION = "sample standard deviation over seeds of the paired per-seed differences oracle - full"
# The measures a ranking would be read from (key -> higher is better).
OUTCOMES: dict[str, bool] = {"heldout_nll": False, "exact_match": True}


def gate(key: str, label: str, higher_is_better: bool, oracle: dict[int, float | None],
         full: dict[int, float | None]) -> dict[str, Any]:
    """The gate of one measure from per-seed values (seed -> value; None or NaN: missing)."""
    seeds = sorted(s for s in oracle.keys() & full.keys() if _present(oracle[s]) and _present(full[s]))
    differences = [float(oracle[s]) - float(full[s]) for s in seeds]
    mean = statistics.fmean(differences) if differences else None
    spread = statistics.stdev(differences) if len(differences) > 1 else None
    better = mean is not None and (mean > 0) == higher_is_better and mean != 0
    passes = spread is not None and better and abs(mean) > GATE_FACTOR * spread
    if len(differences) < 2:
        why = f"needs oracle and full on at least 2 seeds to measure the seed spread (has {len(differences)})"
    elif not better:
        why = f"the oracle is not better than full (oracle - full = {mean:+.4g})"
    elif not passes:
        why = f"oracle - full = {mean:+.4g} is within {GATE_FACTOR:g} x the seed spread {spread:.4g}"
    else:
        why = f"oracle - full = {mean:+.4g} exceeds {GATE_FACTOR:g} x the seed spread {spread:.4g}"
    verdict = (f"{label}: can tell methods apart at this size ({why})" if passes else
               f"{label}: cannot tell methods apart at this size ({why}); its rows are not ranked")
    return {"key": key, "label": label, "seeds": len(differences), "difference": mean, "spread": spread,
            "threshold": GATE_FACTOR * spread if spread is not None else None, "passes": passes, "verdict": verdict}


def _present(value: float | None) -> bool:
    return value is not None and math.isfinite(value)


def power_gates(cells: Sequence[Any], labels: dict[str, str]) -> list[dict[str, Any]]:
    """One gate per outcome measure present (`labels`: key -> label) from the cells' measures (`CellMeasures`)."""
    by_row: dict[str, dict[int, dict[str, Any]]] = {ORACLE: {}, FULL: {}}
    for cell in cells:
        if cell.method in by_row:
            by_row[cell.method][cell.seed] = cell.values
    return [
        gate(key, labels[key], higher,
             {seed: values.get(key) for seed, values in by_row[ORACLE].items()},
             {seed: values.get(key) for seed, values in by_row[FULL].items()})
        for key, higher in OUTCOMES.items() if key in labels
    ]


def overall_verdict(gates: Sequence[dict[str, Any]], has_oracle: bool) -> str:
    """One sentence for the top of eval.md and the CLI: which measures, if any, can rank the methods."""
    if not has_oracle:
        return ("No oracle (a natural corpus has no known corrupted tokens): this eval cannot say whether its size "
                "separates methods; do not rank the methods from this table.")
    passing = [g["label"] for g in gates if g["passes"]]
    if not passing:
        return (f"Power gate failed: on no outcome measure does oracle - full exceed {GATE_FACTOR:g} x the seed spread, "
                "so this eval cannot tell methods apart at this size; do not rank the methods from this table.")
    failing = [g["label"] for g in gates if not g["passes"]]
    return (f"Power gate passed on {', '.join(passing)}: methods can be ranked on it"
            + (f"; not on {', '.join(failing)} (cannot tell methods apart on it at this size)." if failing else "."))
