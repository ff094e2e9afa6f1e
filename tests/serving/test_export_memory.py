"""An export whose model cannot fit one process is refused in one line before anything is loaded
(tfdlrm/serving/export.py ``check_export_memory``): TF Serving holds every table whole in one process,
whatever the run trained with (``--parallel ps`` keeps no table whole anywhere)."""
import json

from tests.helpers import assert_clean_error
from tests.helpers.cli import run_main
from tfdlrm.presets import get_preset
from tfdlrm.serving import export
from tfdlrm.training import memory


def fake_run(path, rows):
    path.mkdir()
    config = get_preset("kaggle").replace(table_rows=(rows,) * 26)
    (path / "run.json").write_text(json.dumps({"model": "dlrm", "config": config.to_dict()}))
    return path


def test_tables_larger_than_the_machine_are_one_line_before_loading(tmp_path, monkeypatch):
    run = fake_run(tmp_path / "run", 40_000_000)  # 62 GiB of tables: no checkpoint needed to refuse
    monkeypatch.setattr(memory, "available_memory", lambda: 20 << 30)
    monkeypatch.setattr(memory, "memory_caps", lambda: [])
    proc = run_main(["export", str(run), "--out", str(tmp_path / "saved")])
    assert_clean_error(proc, "exporting dlrm needs an estimated 13", "its tables 62.0 GiB, whole in one process",
                       "this machine has for it")
    assert not (tmp_path / "saved").exists() or not any((tmp_path / "saved").iterdir())


def test_a_cap_on_the_export_process_counts(tmp_path, monkeypatch):
    run = fake_run(tmp_path / "run", 3_700_000)  # 5.7 GiB of tables: the cluster benchmark's
    monkeypatch.setattr(memory, "available_memory", lambda: 100 << 30)
    monkeypatch.setattr(memory, "memory_caps", lambda: [(3 << 30, "RLIMIT_DATA (ulimit -d)")])
    proc = run_main(["export", str(run), "--out", str(tmp_path / "saved")])
    assert_clean_error(proc, "its tables 5.7 GiB", "more than this process's RLIMIT_DATA (ulimit -d) of 3.0 GiB")
    monkeypatch.setattr(memory, "memory_caps", lambda: [(64 << 30, "RLIMIT_DATA (ulimit -d)")])
    export.check_export_memory(run / "run.json")  # fits: nothing said
