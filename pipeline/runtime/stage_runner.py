"""The one stage runner: every stage that writes goes through it, and only it knows the protocol.

    run = run_stage(
        Stage("scores", output, identity={...}, inputs=[data, model], overwrite=False),
        work,                 # work(out, ready) -> the manifest; commits its files with out.done / out.commit
        ready=session,        # optional: a context entered before anything is written (refusals, a Ray session)
        complete=check,       # optional: complete(out, manifest) -> a finished output is reused only when True
        reuse=True,           # False: never reused whole; the work runs and its files skip themselves (score)
    )
    run.manifest, run.reused

As datatrove's executor does for its steps, the runner does the same things in the same order for
every stage, and a stage supplies only what it is (kind, identity, inputs, its fixed entries) and
its work:
1. refuse an output that overlaps an input (either inside the other; models count as inputs);
2. look at the folder, take its lock, look again: files the stage did not write, a finished output of
   another identity (without --overwrite), an unreadable manifest or one naming files outside the
   folder are refused by name, before anything is written;
3. skip if done: a finished output of this identity whose files check out is returned as it is;
4. enter `ready`: the stage's own refusals and its session; nothing of the output is touched before;
5. begin: the manifest goes, temporaries of killed writes go, the stage's entries are claimed;
6. `work(out, ready's value)`: the stage's own work, which returns its manifest;
7. finish: every listed file checked against its record, our files the manifest no longer lists and
   the scratch entries removed, the manifest written last (its presence means "complete").

A stage whose output is one file (the report page) goes through `run_file_stage`: the same overlap
refusal, and an existing file is replaced only when it carries the stage's mark (or --overwrite).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.runtime.files import ArtifactError, write_text_atomic
from pipeline.runtime.stage_output import StageOutput, refuse_overlap

# The stage's work: (the output it writes through, what `ready` gave) -> its manifest (None: the stage
# keeps its own record and writes no manifest, as the run folder keeps run.json).
Work = Callable[[StageOutput, Any], "dict[str, Any] | None"]


@dataclass(frozen=True)
class Stage:
    """What one stage run is: where it writes, what kind of artifact, what it is made from.

    identity: what the output depends on (settings, input and checkpoint fingerprints); None for an
    output that is rewritten in place (select) or keeps its own identity (the run folder).
    inputs: every folder or file the stage reads, models included. entries: fixed names the stage
    writes besides its committed files (checkpoint/, metrics.jsonl); scratch: entries removed once
    the output is complete (resumable state).
    """

    kind: str
    output: Path
    identity: dict[str, Any] | None = None
    inputs: Sequence[Path] = ()
    overwrite: bool = False
    entries: Sequence[str] = ()
    scratch: Sequence[str] = ()


@dataclass(frozen=True)
class StageRun:
    """What the runner did: the manifest written (or found complete), and whether the output was reused."""

    manifest: dict[str, Any] | None
    reused: bool


def run_stage(
    stage: Stage,
    work: Work,
    *,
    ready: Callable[[], AbstractContextManager[Any]] | None = None,
    complete: Callable[[StageOutput, dict[str, Any]], bool] | None = None,
    reuse: bool = True,
) -> StageRun:
    """Run one stage exactly once into `stage.output`; see the module docstring for the steps. reuse=False: a
    finished output is never returned whole, the work always runs (its files skip themselves)."""
    output = StageOutput(
        stage.output, stage.kind, identity=stage.identity, overwrite=stage.overwrite, inputs=stage.inputs,
        entries=stage.entries, scratch=stage.scratch,
    )
    with output as out:
        finished = out.up_to_date() if reuse else None
        if finished is not None and (complete is None or complete(out, finished)):
            return StageRun(finished, reused=True)
        with (ready() if ready is not None else nullcontext()) as prepared:
            out.begin()
            manifest = work(out, prepared)
        return StageRun(out.finish(manifest), reused=False)


def local_inputs(*paths: str | Path | None) -> list[Path]:
    """The given paths that exist on this machine (a tokenizer or model may also be a hub name, read elsewhere)."""
    return [Path(path) for path in paths if path is not None and Path(path).exists()]


def run_file_stage(
    kind: str, output: Path, make: Callable[[], str], *, mark: str, overwrite: bool, inputs: Sequence[Path] = ()
) -> int:
    """A stage whose output is one text file (the `report` page): refuse a folder there, an output that overlaps
    an input, and an existing file without `mark` in its first 2 KiB (not ours) unless `overwrite`, all before
    `make()` runs; then write it atomically. Returns its size in bytes."""
    output = Path(output)
    if output.is_dir():
        raise ArtifactError(f"--output {output} is a folder; name the file to write, e.g. {output / 'report.html'}")
    refuse_overlap(output, inputs)
    if output.exists() and not overwrite and not _carries(output, mark):
        raise ArtifactError(f"{output} exists and is not an sstoken {kind}; choose another --output or pass --overwrite")
    text = make()
    write_text_atomic(text, output)
    return len(text.encode())


def _carries(path: Path, mark: str) -> bool:
    with open(path, "rb") as handle:
        return mark in handle.read(2048).decode("utf-8", "replace")
