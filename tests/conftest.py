"""Shared fixtures: tfdlrm first (it sets TF_USE_LEGACY_KERAS), then TensorFlow.  Helpers the
tests import live in ``tests.helpers``."""
from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from pathlib import Path

import pytest


def _share_xla_compilations() -> None:
    """One XLA compilation cache for the whole run, empty at its start: the in-process tests and the
    ``python -m tfdlrm`` processes they start compile the same small programs many times over (the
    tiny preset's step).  ``TF_XLA_FLAGS`` is read when TensorFlow first uses XLA, so it is set here,
    before the import below; the pytest-xdist workers and every process a test starts inherit it (a
    worker finds it set by the controller; a cache directory of the caller's own is kept as given)."""
    flags = os.environ.get("TF_XLA_FLAGS", "")
    if "--tf_xla_persistent_cache_directory" in flags:
        return
    directory = tempfile.mkdtemp(prefix="tfdlrm-tests-xla-cache-")
    atexit.register(shutil.rmtree, directory, ignore_errors=True)
    os.environ["TF_XLA_FLAGS"] = f"{flags} --tf_xla_persistent_cache_directory={directory}".strip()


_share_xla_compilations()

import tfdlrm  # noqa: F401  (must precede tensorflow)  # isort: skip
import tensorflow as tf  # noqa: E402  # isort: skip

from tests.helpers import SHARED_CRITEO  # noqa: E402


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
