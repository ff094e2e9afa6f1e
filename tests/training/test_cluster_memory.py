"""Memory caps: a process's own (RLIMIT_DATA, its cgroup) in the one-process check, and the estimate per
process of a ``--parallel ps`` run (tfdlrm/training/cluster_memory.py) checked against each cap."""
import json
import subprocess
import sys

import pytest

from tests.helpers import REPO, assert_clean_error
from tfdlrm.errors import UserError
from tfdlrm.parallel.devices import MEMORY_ENV
from tfdlrm.presets import get_preset
from tfdlrm.training import cluster_memory, memory
from tfdlrm.training.spec import TrainSpec

GIB = 1 << 30


def div_shards(rows: int, servers: int) -> list[int]:
    """ParameterServerStrategy's "div" partition, written out: the first rows % n shards one row longer."""
    n = min(servers, rows)
    return [rows // n + (1 if i < rows % n else 0) for i in range(n)]


def test_each_server_is_counted_its_largest_shards_and_their_slots():
    config = get_preset("tiny").replace(table_rows=(10, 7, 3, 1), embedding_dim=4, bottom_mlp=(13, 32, 4))
    for optimizer, slots in (("sgd", 0), ("adagrad", 1)):
        e = cluster_memory.estimate_cluster_memory("dlrm", config, optimizer, None, 256, 1024, 2048, 3, 2)
        shard_rows = sum(max(div_shards(r, 3)) for r in config.table_rows)  # 4 + 3 + 1 + 1
        assert shard_rows == 9
        assert e.shards == int(shard_rows * 4 * 4 * (1 + slots) * cluster_memory.SHARD_FACTOR)
        assert e.servers == 3 and e.workers == 2
        assert e.server > cluster_memory.SERVER_BYTES + e.shards  # and the dense weights
    # more servers, smaller shards; a worker's and the chief's estimates do not depend on the tables
    big = get_preset("kaggle").replace(table_rows=(3_700_000,) * 26)
    three = cluster_memory.estimate_cluster_memory("dlrm", big, "sgd", None, 2048, 4096, 4096, 3, 2)
    four = cluster_memory.estimate_cluster_memory("dlrm", big, "sgd", None, 2048, 4096, 4096, 4, 2)
    assert three.shards == int(26 * 1_233_334 * 16 * 4 * cluster_memory.SHARD_FACTOR)
    assert four.shards < three.shards and (four.worker, four.chief) == (three.worker, three.chief)


def test_the_cluster_check_prints_each_process_and_refuses_what_a_cap_cannot_hold(monkeypatch):
    config = get_preset("kaggle").replace(table_rows=(3_700_000,) * 26)
    monkeypatch.setenv("TF_CONFIG", json.dumps({"cluster": {"chief": ["127.0.0.1:1"], "worker": ["127.0.0.1:2"] * 2,
                                                            "ps": ["127.0.0.1:3"] * 3}}))
    monkeypatch.setattr(cluster_memory, "memory_caps", lambda: [])
    lines = []
    sgd = TrainSpec(model="dlrm", optimizer="sgd", batch_size=2048, parallel="ps")
    monkeypatch.setenv(MEMORY_ENV, str(3 * GIB))  # tfdlrm cluster --memory-per-process 3GiB
    e = cluster_memory.check_cluster_memory(sgd, config, 4096, lines.append)
    assert e.server < 3 * GIB and "each of 3 ps up to" in lines[0] and "cap 3.0 GiB" in lines[0]
    adagrad = TrainSpec(model="dlrm", optimizer="adagrad", batch_size=2048, parallel="ps")  # slots: twice the shards
    with pytest.raises(UserError, match=r"each parameter server needs an estimated 4\.\d GiB .*more than 3\.0 GiB "
                                        r"\(tfdlrm cluster --memory-per-process\); use more parameter servers"):
        cluster_memory.check_cluster_memory(adagrad, config, 4096)
    huge = TrainSpec(model="dlrm", optimizer="sgd", batch_size=65536, parallel="ps")  # a worker's activations
    small = get_preset("kaggle").replace(table_rows=(1000,) * 26)
    e = cluster_memory.estimate_cluster_memory("dlrm", small, "sgd", None, 65536, huge.eval_batch_size, 4096, 3, 2)
    assert e.worker > e.chief > e.server
    huge.memory_limit = (e.worker + e.chief) // 2
    with pytest.raises(UserError, match=r"each worker needs .* \(--memory-limit\); use a smaller --batch-size"):
        cluster_memory.check_cluster_memory(huge, small, 4096)
    monkeypatch.delenv(MEMORY_ENV)  # a multi-host cluster: only the chief's own caps are known
    monkeypatch.setattr(cluster_memory, "memory_caps", lambda: [(GIB, "RLIMIT_DATA (ulimit -d)")])
    with pytest.raises(UserError, match=r"the chief needs .* more than 1\.0 GiB \(the chief's RLIMIT_DATA"):
        cluster_memory.check_cluster_memory(adagrad, config, 4096)


def test_one_process_is_refused_by_its_own_caps(monkeypatch):
    config = get_preset("kaggle").replace(table_rows=(3_700_000,) * 26)
    spec = TrainSpec(model="dlrm", optimizer="sgd", batch_size=2048)
    monkeypatch.setattr(memory, "memory_caps", lambda: [(3 * GIB, "its cgroup's memory limit")])
    with pytest.raises(UserError, match=r"needs an estimated \d+\.\d GiB .* more than this process's its cgroup's "
                                        r"memory limit of 3\.0 GiB"):
        memory.check_training_memory(spec, config, 4096, available=100 * GIB)
    monkeypatch.setattr(memory, "memory_caps", lambda: [(100 * GIB, "RLIMIT_DATA (ulimit -d)")])
    assert memory.check_training_memory(spec, config, 4096, available=100 * GIB) is not None


def test_the_cgroup_limit_is_read_from_the_process_own_group(tmp_path, monkeypatch):
    real_open = open

    def fake_open(path, *args, **kwargs):
        mapping = {"/proc/self/cgroup": tmp_path / "cgroup", "/sys/fs/cgroup/job/memory.max": tmp_path / "max"}
        return real_open(mapping.get(str(path), path), *args, **kwargs)

    monkeypatch.setattr("builtins.open", fake_open)
    (tmp_path / "cgroup").write_text("0::/job\n")
    (tmp_path / "max").write_text("3221225472\n")
    assert memory.cgroup_memory_limit() == 3 * GIB
    (tmp_path / "max").write_text("max\n")
    assert memory.cgroup_memory_limit() is None


def test_the_same_tables_in_one_process_under_a_3_gib_data_cap_are_one_line():
    """The parameter-server benchmark's tables (26 x 3.7M rows, dim 16) in one process under the cap each
    of its processes has: refused before any variable, naming RLIMIT_DATA."""
    proc = subprocess.run(["prlimit", f"--data={3 * GIB}", sys.executable, "-m", "tfdlrm", "train", "--preset",
                           "kaggle", "--rows", "3700000", "--optimizer", "sgd", "--batch-size", "2048",
                           "--train-examples", "8192", "--eval-examples", "4096"],
                          cwd=REPO, capture_output=True, text=True, timeout=120,
                          env={**__import__("os").environ, "PYTHONPATH": str(REPO)})
    assert_clean_error(proc, "embedding tables 6.", "more than this process's RLIMIT_DATA (ulimit -d) of 3.0 GiB")
    assert proc.returncode == 2
