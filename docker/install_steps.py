"""Run a Dockerfile's install steps as a plain script, without a Docker engine (what CI does).

    python docker/install_steps.py docker/Dockerfile.cpu            # run them in a throwaway sandbox
    python docker/install_steps.py docker/Dockerfile.cpu --print    # only show the script

The Dockerfile is parsed (`parse_dockerfile`, also used by the tests), and its ENV, WORKDIR, COPY
and RUN instructions after FROM are replayed in order inside a sandbox folder: absolute paths
(WORKDIR, COPY targets, ENV values that are paths) are rebased under it, COPY copies from the
repository, and RUN lines run with bash in a throwaway virtual environment. That environment sees
the packages of the Python that runs this script (a `.pth` file), so the image's pins resolve
against what is already installed and nothing large is downloaded; pip installs the project into
the sandbox and never touches the outer environment (it does not uninstall outside its own). The
image's base (FROM, the Ray image) is not reproduced: only the steps this repository adds are run.
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Instruction:
    keyword: str  # FROM, RUN, COPY, ... in upper case
    arguments: str
    line: int  # 1-based line of the instruction's first line


def parse_dockerfile(text: str) -> list[Instruction]:
    """Instructions in order: comments and blank lines dropped, backslash continuations joined."""
    instructions: list[Instruction] = []
    pending: list[str] = []
    start = 0
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if pending and line.startswith("#"):
            continue  # a comment inside a continued instruction
        if not pending:
            start = number
        continued = line.endswith("\\")
        pending.append(line[:-1].rstrip() if continued else line)
        if not continued:
            keyword, _, arguments = " ".join(p for p in pending if p).partition(" ")
            instructions.append(Instruction(keyword.upper(), arguments.strip(), start))
            pending = []
    if pending:
        raise ValueError(f"the instruction starting at line {start} ends with a line continuation")
    return instructions


def environment_pairs(arguments: str) -> dict[str, str]:
    """ENV K=V K2="V 2" (the legacy `ENV K V` form too)."""
    words = shlex.split(arguments)
    if words and "=" not in words[0]:
        return {words[0]: " ".join(words[1:])}
    return dict(word.split("=", 1) for word in words)


def _rebased(sandbox: Path, path: str, workdir: Path) -> Path:
    return sandbox / path.lstrip("/") if path.startswith("/") else workdir / path


def _copy(sandbox: Path, arguments: str, workdir: Path, repo: Path) -> None:
    words = [w for w in shlex.split(arguments) if not w.startswith("--")]  # --chown and such: no owners here
    *sources, target = words
    destination = _rebased(sandbox, target, workdir)
    for source in sources:
        origin = repo / source
        into = destination / origin.name if target.endswith("/") or len(sources) > 1 else destination
        into.parent.mkdir(parents=True, exist_ok=True)
        if origin.is_dir():
            shutil.copytree(origin, into, symlinks=True, dirs_exist_ok=True)
        else:
            shutil.copy2(origin, into)


def _throwaway_venv(sandbox: Path) -> Path:
    """A venv that sees this interpreter's packages (so pins resolve to what is installed) and installs into itself."""
    venv = sandbox / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    site = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               check=True, capture_output=True, text=True).stdout.strip())
    (site / "outer-environment.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    pip = venv / "bin" / "pip"  # the outer pip, run by the venv's python: it installs into the venv
    pip.write_text('#!/bin/sh\nexec "$(dirname "$0")/python" -m pip "$@"\n')
    pip.chmod(0o755)
    return venv


def install_script(instructions: list[Instruction]) -> list[tuple[str, str]]:
    """The steps this repository adds after FROM, as (keyword, arguments), for printing."""
    after_from = [i for i, ins in enumerate(instructions) if ins.keyword == "FROM"]
    if not after_from:
        raise ValueError("the Dockerfile has no FROM")
    return [(i.keyword, i.arguments) for i in instructions[after_from[-1] + 1:]
            if i.keyword in ("ENV", "WORKDIR", "COPY", "RUN")]


def run_steps(dockerfile: Path, sandbox: Path, repo: Path = REPO, quiet: bool = True) -> list[tuple[str, float]]:
    """Replay the install steps in `sandbox`; returns each RUN line with its seconds. Raises on a failing step.
    `quiet`: pip prints warnings and errors only."""
    steps = install_script(parse_dockerfile(dockerfile.read_text()))
    venv = _throwaway_venv(sandbox)
    env = dict(os.environ)
    env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env['PATH']}"
    env["VIRTUAL_ENV"] = str(venv)
    env.pop("PYTHONPATH", None)  # the image has none: the installed package must be the one that runs
    if quiet:
        env.setdefault("PIP_QUIET", "1")
    workdir = sandbox
    timings: list[tuple[str, float]] = []
    for keyword, arguments in steps:
        if keyword == "ENV":
            for name, value in environment_pairs(arguments).items():
                env[name] = str(_rebased(sandbox, value, workdir)) if value.startswith("/") else value
        elif keyword == "WORKDIR":
            workdir = _rebased(sandbox, arguments, workdir)
            workdir.mkdir(parents=True, exist_ok=True)
        elif keyword == "COPY":
            _copy(sandbox, arguments, workdir, repo)
        else:
            started = time.monotonic()
            subprocess.run(["bash", "-euo", "pipefail", "-c", arguments], cwd=workdir, env=env, check=True)
            timings.append((arguments, time.monotonic() - started))
    return timings


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dockerfile", type=Path, nargs="+")
    parser.add_argument("--print", action="store_true", help="Show the steps instead of running them.")
    parser.add_argument("--verbose", action="store_true", help="Show pip's output.")
    arguments = parser.parse_args(argv)
    for dockerfile in arguments.dockerfile:
        if arguments.print:
            for keyword, step in install_script(parse_dockerfile(dockerfile.read_text())):
                print(f"{keyword} {step}")
            continue
        with tempfile.TemporaryDirectory(prefix="sstoken-image-") as sandbox:
            for step, seconds in run_steps(dockerfile, Path(sandbox), quiet=not arguments.verbose):
                print(f"{dockerfile.name}: {seconds:6.1f} s  RUN {step}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
