"""Shared test set-up: tfdlrm first (it sets TF_USE_LEGACY_KERAS), then TensorFlow."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import tfdlrm  # noqa: F401  (must precede tensorflow)
import tensorflow as tf  # noqa: E402

REPO = Path(__file__).resolve().parent.parent


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


@pytest.fixture(autouse=True)
def _seeded():
    tf.keras.utils.set_random_seed(1234)
    yield
    tf.keras.backend.clear_session()


@pytest.fixture
def criteo_dir() -> Path:
    """The real Criteo rows in ../shared (skips the test where they are absent)."""
    if not (SHARED_CRITEO / "kaggle_split" / "train.txt").is_file():
        pytest.skip("../shared/data/criteo is not present")
    return SHARED_CRITEO


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
