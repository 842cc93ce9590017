"""The validate stage: every check of every artifact folder at a path, as one summary; writes nothing.

    run_validate(ValidateConfig(folder=DIR)) -> StageSummary   # details["folders"]: one report per folder

The checks are `pipeline.validation.folder_checks`'s. counts: folders, checks, problems; the CLI exits
with EXIT_PROBLEMS_FOUND when there is any problem.
"""

from __future__ import annotations

import time
from pathlib import Path

from pipeline.runtime.files import ArtifactError
from pipeline.runtime.stage_output import StageSummary
from pipeline.validation.folder_checks import find_artifacts, report_as_dict, validate_folder
from pipeline.validation.validate_config import ValidateConfig

__all__ = ["ValidateConfig", "run_validate"]


def run_validate(config: ValidateConfig) -> StageSummary:
    """Validate `config.folder` (an artifact folder, or each one found under it)."""
    started = time.monotonic()
    root = Path(config.folder)
    if not root.is_dir():
        raise ArtifactError(f"{root} is not a folder; pass an artifact folder (tokenized, scores, masks, export, train) "
                            "or a run folder")
    folders = find_artifacts(root)
    if not folders:
        raise ArtifactError(f"{root} holds no sstoken artifact (no manifest.json in it or in its subfolders, no history "
                            "cache files); pass an artifact folder or a run folder")
    reports = [validate_folder(folder) for folder in folders]
    problems = sum(len(r.problems) for r in reports)
    return StageSummary(
        stage="validate",
        output=root,
        counts={"folders": len(reports), "checks": sum(len(r.findings) for r in reports), "problems": problems},
        timings={"total_s": round(time.monotonic() - started, 3)},
        details={"folders": [report_as_dict(r) for r in reports]},
    )
