"""Shared fixtures: tfdlrm first (it sets TF_USE_LEGACY_KERAS), then TensorFlow.  Helpers the
tests import live in ``tests.helpers``."""
from __future__ import annotations

from pathlib import Path

import pytest

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
