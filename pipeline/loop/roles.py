"""Which model plays which role in a round: the score stage's current and history, the model training starts from.

Pure: paths in, paths out; `pipeline.loop.rounds` builds what they name (an EMA history) and runs the stages.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from pipeline.loop.run_config import RunConfig
from pipeline.loop.run_folder import RunFolder
from pipeline.selection.select_settings import SelectSettings


@dataclass(frozen=True)
class RoundRoles:
    """current/history: the score stage's checkpoints; train_from: where this round's training starts.

    ema_parts: (past history, current) that `history` is averaged from (history ema), else None.
    selection: the round's selection (the warm-up's in round 0 when REL is 0 and the method needs it).
    warmup: the note that says so (None when the round selects as configured).
    """

    current: Path
    history: Path
    train_from: Path
    selection: SelectSettings
    ema_parts: tuple[Path, Path] | None = None
    warmup: str | None = None


def _policy_history(config: RunConfig, folder: RunFolder, index: int, base: Path) -> tuple[Path, tuple[Path, Path] | None]:
    """The history model of the ssToken family's methods under the run's policy (and its EMA parts)."""
    if config.history == "base" or index == 0:
        return base, None
    if config.history == "previous":
        return (base if index == 1 else folder.checkpoint(index - 2)), None
    past = base if index == 1 else folder.ema_history(index - 1)
    return folder.ema_history(index), (past, folder.checkpoint(index - 1))


def warmup_selection(config: RunConfig) -> SelectSettings:
    """Round 0's selection when REL is 0: attention only (the paper's start) or every trainable token."""
    select = config.select
    return SelectSettings(method=config.warmup, ratio=select.ratio, granularity=select.granularity)


def round_roles(config: RunConfig, folder: RunFolder, index: int, base: Path, reference: Path | None) -> RoundRoles:
    """The roles of round `index` (see `RunConfig`'s docstring for the rule per method)."""
    before = base if index == 0 else folder.checkpoint(index - 1)
    method, ema_parts = config.select.method, None
    if method == "rho1":
        assert reference is not None
        current, history = before, reference
    elif method == "tokencleaning":
        current, history = (reference if reference is not None else before), base
    else:
        current = before
        history, ema_parts = _policy_history(config, folder, index, base)
    if Path(current).resolve() != Path(history).resolve() or not config.select.needs_rel:
        return RoundRoles(current, history, before, config.select, ema_parts)
    what = "attention-only selection" if config.warmup == "attn" else "every trainable token"
    ranked = f"select.method {method}" if config.select.uses_rel else "select.sample_by rel"
    note = (
        f"r{index:03d}: current == history ({current}), so REL is 0 and {ranked} has no signal: "
        f"warmup {config.warmup} trains on the {what}"
    )
    return RoundRoles(current, history, before, warmup_selection(config), ema_parts, warmup=note)
