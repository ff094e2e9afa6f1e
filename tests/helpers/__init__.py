"""Shared helpers for the tests: the repository's paths, and running ``python -m tfdlrm`` in a
fresh process.  Modules beside this one: ``cli`` (the command in this process, or in a fresh one
with limits) and ``criteo_rows`` (raw Criteo lines and a plain-Python reading of them)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent.parent


def _shared_criteo() -> Path:
    """``shared/data/criteo`` beside the repository, or beside an ancestor (a git worktree
    under ``wt/``); ``$TFDLRM_SHARED_CRITEO`` overrides."""
    if os.environ.get("TFDLRM_SHARED_CRITEO"):
        return Path(os.environ["TFDLRM_SHARED_CRITEO"])
    for folder in REPO.parents:
        candidate = folder / "shared" / "data" / "criteo"
        if candidate.is_dir():
            return candidate
    return REPO.parent / "shared" / "data" / "criteo"


SHARED_CRITEO = _shared_criteo()


def run_cli(*args: str, timeout: float = 600, env: dict | None = None, cwd: Path = REPO):
    """Run ``python -m tfdlrm ARGS`` in a fresh process; returns CompletedProcess."""
    full_env = dict(os.environ)
    full_env.pop("TF_USE_LEGACY_KERAS", None)
    full_env["PYTHONPATH"] = str(REPO)
    if env:
        full_env.update(env)
    return subprocess.run([sys.executable, "-m", "tfdlrm", *args], cwd=cwd, env=full_env,
                          capture_output=True, text=True, timeout=timeout)


def assert_clean_error(proc, *fragments: str) -> None:
    """Non-zero exit, no traceback, and a message mentioning every fragment."""
    assert proc.returncode != 0, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    error_lines = [line for line in proc.stderr.splitlines() if "error:" in line]
    assert len(error_lines) == 1, proc.stderr
    for fragment in fragments:
        assert fragment in error_lines[0], proc.stderr

