"""Workspace fixtures for pipeline tests: a copy of the repository on the smoke profile, with its own git repo.

The copy holds what `git ls-files --cached --others --exclude-standard` lists (what a clone plus the working
changes would have), so runs never touch the developer's data/ or results/.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def run(cmd: list[str] | str, cwd: Path, check: bool = True, env: dict | None = None, timeout: int = 900):
    """Run a command in the workspace with the venv first on PATH; returns the CompletedProcess."""
    full_env = {
        **os.environ,
        "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
        "DVC_NO_ANALYTICS": "1",
        "HF_HUB_OFFLINE": "1",
        **(env or {}),
    }
    p = subprocess.run(
        cmd, cwd=cwd, shell=isinstance(cmd, str), capture_output=True, text=True, env=full_env, timeout=timeout
    )
    if check and p.returncode != 0:
        raise AssertionError(
            f"{cmd} exited {p.returncode}\n--- stdout\n{p.stdout[-6000:]}\n--- stderr\n{p.stderr[-6000:]}"
        )
    return p


def make_workspace(dest: Path, profile: str = "smoke") -> Path:
    files = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split("\0")
    for rel in filter(None, files):
        src = REPO / rel
        if src.is_file() and not rel.startswith(("data/", "results/")):
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)
    (dest / "data").mkdir(exist_ok=True)
    run([str(BIN / "restok"), "profile", profile], dest)
    run("git init -q -b main && git add -A && git -c user.email=t@t -c user.name=t commit -qm ws", dest)
    return dest


@pytest.fixture(scope="module")
def smoke_ws(module_tmp) -> Path:
    """One smoke workspace shared by the tests of a module (they run in file order)."""
    return make_workspace(module_tmp("ws"))
