"""docker/: the Dockerfiles and the compose file, parsed (no Docker engine here), and the install-steps runner."""

from __future__ import annotations

import importlib.util
import re
import shlex
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
DOCKER = REPO / "docker"


def _load_runner():
    spec = importlib.util.spec_from_file_location("install_steps", DOCKER / "install_steps.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


steps = _load_runner()


def _instructions(name: str):
    return steps.parse_dockerfile((DOCKER / name).read_text())


def _ci_torch_pin() -> str:
    return re.search(r"torch==[\w.]+", (REPO / ".ci" / "run").read_text()).group(0)


@pytest.mark.parametrize("name, platform", [("Dockerfile.cpu", "cpu"), ("Dockerfile.gpu", "gpu")])
def test_each_image_is_the_official_ray_image_with_the_project_installed(name, platform):
    instructions = _instructions(name)
    keywords = [i.keyword for i in instructions]
    assert keywords.count("FROM") == 1 and "USER" not in keywords  # Ray's image runs as its own user, not root
    base = next(i.arguments for i in instructions if i.keyword == "ARG" and i.arguments.startswith("RAY_IMAGE="))
    assert re.fullmatch(rf"RAY_IMAGE=rayproject/ray:\d+\.\d+\.\d+-py3\d+-{platform}", base)
    assert next(i.arguments for i in instructions if i.keyword == "FROM") == "${RAY_IMAGE}"
    copied = {shlex.split(i.arguments)[-2] for i in instructions if i.keyword == "COPY"} | {
        s for i in instructions if i.keyword == "COPY" for s in shlex.split(i.arguments)[1:-1] if not s.startswith("--")}
    # What `pip install .` needs: the project file, its readme, the package and the schemas its symlink points to.
    assert {"pyproject.toml", "README.md", "pipeline", "schemas", "jobs"} <= copied
    assert (REPO / "pipeline" / "schemas").resolve() == (REPO / "schemas").resolve()
    runs = [i.arguments for i in instructions if i.keyword == "RUN"]
    assert runs[0].startswith("pip install") and _ci_torch_pin() in runs[0]  # torch first, the version CI tests
    assert ("download.pytorch.org/whl/cpu" in runs[0]) == (platform == "cpu")
    assert runs[1] == "pip install ." and runs[2].startswith("sstoken --help")
    exposed = {port for i in instructions if i.keyword == "EXPOSE" for port in i.arguments.split()}
    assert exposed == {"6379", "8265", "10001"}
    environment = {k: v for i in instructions if i.keyword == "ENV" for k, v in steps.environment_pairs(i.arguments).items()}
    assert environment["HF_HUB_OFFLINE"] == "1" and environment["SSTOKEN_CACHE"].startswith("/home/ray/")


def test_compose_starts_a_head_and_a_worker_reachable_only_from_loopback():
    compose = yaml.safe_load((DOCKER / "compose.yaml").read_text())
    head, worker = compose["services"]["ray-head"], compose["services"]["ray-worker"]
    head_command, worker_command = head["command"].split(), worker["command"].split()
    assert head_command[:3] == ["ray", "start", "--head"] and "--block" in head_command and "--port=6379" in head_command
    assert worker_command[:2] == ["ray", "start"] and "--address=ray-head:6379" in worker_command
    assert "--block" in worker_command and worker["depends_on"] == ["ray-head"]
    for service in (head, worker):
        assert (REPO / service["build"]["dockerfile"].split(":-")[-1].rstrip("}")).is_file()
        assert service["environment"]["RAY_AUTH_MODE"] == "token" and ":?" in service["environment"]["RAY_AUTH_TOKEN"]
        assert any(v.endswith(":/home/ray/.cache/sstoken") for v in service["volumes"])
    assert "ports" not in worker
    assert head["ports"] and all(port.startswith("127.0.0.1:") for port in head["ports"])
    assert {port.split(":")[1] for port in head["ports"]} == {"8265", "10001"}  # never the GCS port 6379


def test_the_parser_joins_continuations_and_drops_comments():
    text = "# a comment\nARG X=1\nFROM base\n\nRUN one \\\n    # inside\n    && two\nENV A=1 B=\"two words\"\n"
    instructions = steps.parse_dockerfile(text)
    assert [(i.keyword, i.arguments, i.line) for i in instructions] == [
        ("ARG", "X=1", 2), ("FROM", "base", 3), ("RUN", "one && two", 5), ("ENV", 'A=1 B="two words"', 8)]
    assert steps.environment_pairs('A=1 B="two words"') == {"A": "1", "B": "two words"}
    with pytest.raises(ValueError, match="line 1 ends with a line continuation"):
        steps.parse_dockerfile("RUN a \\\n")


def test_the_runner_replays_env_workdir_copy_and_run_inside_the_sandbox(tmp_path):
    repo = tmp_path / "repo"
    (repo / "pkg").mkdir(parents=True)
    (repo / "pkg" / "data.txt").write_text("payload")
    dockerfile = tmp_path / "Dockerfile"
    dockerfile.write_text(
        "FROM base\nENV OUT=/home/ray/out GREETING=hello\nWORKDIR /home/ray/app\nCOPY --chown=ray:users pkg ./pkg\n"
        'RUN mkdir -p "$OUT" && cat pkg/data.txt > "$OUT/copy.txt" && echo "$GREETING" > here.txt\n'
        "RUN python -c \"import sys, pyarrow; print(sys.prefix)\" > prefix.txt\n")
    sandbox = tmp_path / "sandbox"
    sandbox.mkdir()
    timings = steps.run_steps(dockerfile, sandbox, repo=repo)
    assert len(timings) == 2
    assert (sandbox / "home/ray/out/copy.txt").read_text() == "payload"  # ENV path and COPY rebased in the sandbox
    assert (sandbox / "home/ray/app/here.txt").read_text().strip() == "hello"
    # RUN runs in the throwaway venv, which sees this interpreter's packages (pyarrow) without installing them.
    assert (sandbox / "home/ray/app/prefix.txt").read_text().strip() == str(sandbox / "venv")
    dockerfile.write_text("FROM base\nRUN exit 3\n")
    with pytest.raises(Exception, match="exit status 3"):
        steps.run_steps(dockerfile, tmp_path / "again", repo=repo)
