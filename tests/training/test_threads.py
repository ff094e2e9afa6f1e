"""TensorFlow's thread pools by batch size (tfdlrm/training/threads.py)."""
import subprocess
import sys

import pytest

from tests.helpers import REPO
from tfdlrm.errors import UserError
from tfdlrm.training.threads import SMALL_BATCH, cores, thread_pools


@pytest.fixture(autouse=True)
def no_pool_environment(monkeypatch):
    monkeypatch.delenv("TF_NUM_INTRAOP_THREADS", raising=False)
    monkeypatch.delenv("TF_NUM_INTEROP_THREADS", raising=False)


@pytest.mark.skipif(cores() < 2, reason="one core: TensorFlow's pools either way")
def test_small_batches_run_one_thread_an_op_and_an_op_a_core():
    assert thread_pools(128) == {"intra_op": 1, "inter_op": cores()}
    assert thread_pools(SMALL_BATCH) == {"intra_op": 1, "inter_op": cores()}
    assert thread_pools(SMALL_BATCH + 1) is None  # large batches: split each matmul (TensorFlow's default)
    assert thread_pools(2048) is None


def test_asked_for_or_set_elsewhere_tensorflow_keeps_its_pools(monkeypatch):
    assert thread_pools(128, "tf") is None
    assert thread_pools(128, parallel_mode="hybrid") is None
    monkeypatch.setenv("TF_NUM_INTRAOP_THREADS", "2")
    assert thread_pools(128) is None
    with pytest.raises(UserError, match="--threads must be one of auto, tf"):
        thread_pools(128, "many")


@pytest.mark.skipif(cores() < 2, reason="one core: TensorFlow's pools either way")
def test_the_pools_are_set_before_the_runtime_starts_and_not_after():
    """In a fresh process the pools take effect; once TensorFlow has run an op they cannot change,
    and the line says what the step runs on instead."""
    script = (
        "import tfdlrm, tensorflow as tf\n"
        "from tfdlrm.training.threads import use_thread_pools\n"
        "print(use_thread_pools(2048))\n"
        "print(use_thread_pools(128))\n"
        "print(tf.config.threading.get_intra_op_parallelism_threads(), tf.constant(1.0).numpy())\n"
        "print(use_thread_pools(2048))\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines() == [
        "threads: intra-op TensorFlow's default, inter-op TensorFlow's default",
        f"threads: intra-op 1, inter-op {cores()}",
        "1 1.0",
        f"threads: intra-op 1, inter-op {cores()}",  # what the runtime has, large batch or not
    ]
    late = ("import tfdlrm, tensorflow as tf\ntf.constant(1.0).numpy()\n"
            "from tfdlrm.training.threads import use_thread_pools\nprint(use_thread_pools(128))\n")
    proc = subprocess.run([sys.executable, "-c", late], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "(TensorFlow had started; threads: intra-op 1" in proc.stdout
