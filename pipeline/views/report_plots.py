"""The report's plots: matplotlib figures as inline SVG text (no files, no network, text kept as text).

Each function takes numbers report_figures computed and returns one `<svg>` element.
"""

from __future__ import annotations

import io
from typing import Any

STYLE = {
    "svg.fonttype": "none",  # text stays text: smaller pages, searchable labels
    "svg.hashsalt": "sstoken",  # stable element ids: the same numbers give the same page
    "text.parse_math": False,  # a token such as "$x$" is shown as it is
    "font.size": 9,
    "axes.spines.top": False,
    "axes.spines.right": False,
}
KEPT, DROPPED, LINE = "#e8590c", "#8aa1b9", "#1c4e80"


def _svg(figure: Any) -> str:
    import matplotlib.pyplot as plt

    buffer = io.StringIO()
    figure.savefig(buffer, format="svg", bbox_inches="tight")
    plt.close(figure)
    text = buffer.getvalue()
    return text[text.index("<svg"):]


def _figure(columns: int = 1, width: float = 9.0, height: float = 2.6) -> tuple[Any, Any]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with matplotlib.rc_context(STYLE):
        figure, axes = plt.subplots(1, columns, figsize=(width, height), squeeze=False)
    return figure, axes[0]


def _bars(axis: Any, histogram: dict[str, list[float]], colour: str, label: str | None = None, bottom: Any = None) -> None:
    edges = histogram["edges"]
    if not edges:
        axis.text(0.5, 0.5, "no targets", ha="center", transform=axis.transAxes)
        return
    widths = [b - a for a, b in zip(edges, edges[1:])]
    axis.bar(edges[:-1], histogram["counts"], width=widths, align="edge", color=colour, label=label, bottom=bottom,
             linewidth=0)


def distributions(figures: dict[str, Any]) -> str:
    """REL and attention over all targets; the score split into kept and dropped targets."""
    import matplotlib

    with matplotlib.rc_context(STYLE):
        figure, (rel, attn, score) = _figure(3)
        _bars(rel, figures["histograms"]["rel"], LINE)
        rel.set_title("REL (excess loss)")
        _bars(attn, figures["histograms"]["attn"], LINE)
        attn.set_title("attention importance")
        _bars(score, figures["score_by_keep"]["dropped"], DROPPED, "dropped")
        _bars(score, figures["score_by_keep"]["kept"], KEPT, "kept")
        score.set_title("score (kept / dropped)")
        score.legend(frameon=False)
        for axis in (rel, attn, score):
            axis.set_ylabel("targets")
        return _svg(figure)


def kept_per_sample(figures: dict[str, Any]) -> str:
    import matplotlib

    with matplotlib.rc_context(STYLE):
        figure, (axis,) = _figure(1, width=4.4)
        _bars(axis, figures["kept_ratio_per_sample"], KEPT)
        axis.set_xlabel("kept share of the sample's targets")
        axis.set_ylabel("samples")
        axis.set_title("kept ratio per sample")
        return _svg(figure)


def sample_rollups(figures: dict[str, Any], labels: dict[str, str]) -> str:
    """One histogram per per-sample roll-up (`labels`: column -> title); a roll-up the folder lacks says so."""
    import matplotlib

    with matplotlib.rc_context(STYLE):
        figure, axes = _figure(len(labels), width=2.4 * len(labels))
        for axis, (name, label) in zip(axes, labels.items()):
            rollup = figures["rollups"][name]
            if rollup["samples"]:
                _bars(axis, rollup["histogram"], LINE)
            else:
                axis.text(0.5, 0.5, "not stored", ha="center", transform=axis.transAxes)
            axis.set_title(label)
            axis.set_ylabel("samples")
        return _svg(figure)


def kept_by_position(rounds: list[dict[str, Any]]) -> str:
    """One line per round: the kept share of targets along the response (0 its start, 1 its end)."""
    import matplotlib

    with matplotlib.rc_context(STYLE):
        figure, (axis,) = _figure(1, width=4.4)
        for figures in rounds:
            curve = figures["position"]
            axis.plot(curve["centres"], curve["kept_ratio"], marker="o", markersize=3, label=f"r{figures['round']:03d}")
        axis.set_xlim(0, 1)
        axis.set_ylim(0, 1.02)
        axis.set_xlabel("relative position in the response")
        axis.set_ylabel("kept share")
        axis.set_title("kept ratio by position")
        if len(rounds) > 1:
            axis.legend(frameon=False)
        return _svg(figure)


def kept_by_source(figures: dict[str, Any], most: int = 25) -> str:
    import matplotlib

    sources = sorted(figures["sources"], key=lambda s: (-s["samples"], str(s["source"])))[:most][::-1]
    with matplotlib.rc_context(STYLE):
        figure, (axis,) = _figure(1, width=4.4, height=max(1.6, 0.28 * len(sources) + 0.8))
        names = [f"{s['source']} ({s['samples']:,})" for s in sources]
        axis.barh(names, [s["kept_ratio"] or 0 for s in sources], color=KEPT)
        axis.set_xlim(0, 1)
        axis.set_xlabel("kept share of targets")
        axis.set_title("kept ratio by source (samples)")
        return _svg(figure)


def _label(text: str) -> str:
    return repr(text)[1:-1] if text.strip() == text and text else repr(text)


def token_bars(figures: dict[str, Any]) -> str:
    """The token strings most often dropped, and most often kept, with their counts."""
    import matplotlib

    with matplotlib.rc_context(STYLE):
        tokens = figures["tokens"]
        rows = max(len(tokens["dropped"]), len(tokens["kept"]), 1)
        figure, (dropped, kept) = _figure(2, height=0.22 * rows + 0.9)
        for axis, key, colour in ((dropped, "dropped", DROPPED), (kept, "kept", KEPT)):
            entries = tokens[key][::-1]
            axis.barh([_label(e["text"]) for e in entries], [e[key] for e in entries], color=colour)
            for index, entry in enumerate(entries):
                axis.text(entry[key], index, f" {entry[key]:,} of {entry['targets']:,}", va="center", fontsize=7)
            axis.set_title(f"most often {key}")
            axis.set_xlabel("targets")
            axis.margins(x=0.25)
        return _svg(figure)


def loss_curves(curves: list[dict[str, Any]]) -> str:
    """Training loss per optimizer step, one line per round (steps counted over the whole run)."""
    import matplotlib

    with matplotlib.rc_context(STYLE):
        figure, (axis,) = _figure(1, width=5.5)
        by_round: dict[int, list[dict[str, Any]]] = {}
        for point in curves:
            by_round.setdefault(point["round"], []).append(point)
        for round, points in sorted(by_round.items()):
            axis.plot([p["step"] for p in points], [p["loss"] for p in points], label=f"r{round:03d}")
        axis.set_xlabel("optimizer step")
        axis.set_ylabel("loss (kept tokens)")
        axis.set_title("training loss by round")
        axis.legend(frameon=False)
        return _svg(figure)
