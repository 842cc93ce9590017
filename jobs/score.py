"""Entrypoint for `ray job submit`: the same code path as `sstoken score`.

    ray job submit --working-dir . -- python jobs/score.py --config jobs/configs/cluster.example.yaml \
        --data DIR --current MODEL --history MODEL --output DIR

The config file holds `sstoken score` settings (flags override them); the exit status is the CLI's
(0 done, 2 a user error on one line, 1 a bug with its traceback).

Inside a submitted job RAY_ADDRESS is set, so the stage joins that cluster instead of starting one.
"""

from __future__ import annotations

import sys
from pathlib import Path

try:
    import pipeline  # noqa: F401  (installed, or the working directory of the job)
except ImportError:  # run from a checkout: python jobs/score.py puts jobs/ first on sys.path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.cli import main

if __name__ == "__main__":
    raise SystemExit(main(["score", *sys.argv[1:]]))
