"""Exports never leave the base without the version being written or replaced, whenever the
process dies (tfdlrm/publish.py, tfdlrm/serving/export.py): ``--force`` swaps the versions in
one exchange; where two renames are needed, a kill between them is put right by the next
export, which also deletes killed exports' partial directories.  One export writes a base at
a time; the run is read under a shared lock."""
import errno
import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from tests.helpers import REPO
from tests.helpers.holders import env, kill, start_holder
from tfdlrm import publish
from tfdlrm.errors import UserError
from tfdlrm.serving.export import (
    EXPORT_INFO,
    EXTRA_DIR,
    export_run,
    is_complete,
    recover_base,
    versions,
)


def fake_version(path: Path, marker: str, complete: bool = True) -> Path:
    """A directory that counts as an export (saved_model.pb and assets.extra/export.json), or
    one cut short before export.json."""
    (path / EXTRA_DIR).mkdir(parents=True)
    (path / "saved_model.pb").write_text(marker)
    if complete:
        (path / EXTRA_DIR / EXPORT_INFO).write_text(json.dumps({"marker": marker}))
    return path


def marker(path: Path) -> str:
    return (path / "saved_model.pb").read_text()


def test_the_next_export_finishes_or_rolls_back_whatever_a_kill_left(tmp_path):
    base = tmp_path / "saved"
    # killed between the two renames: the new version complete, the old one aside
    fake_version(base / ".1.replaced-111-aa", "old 1")
    fake_version(base / ".1.partial-111-aa", "new 1")
    # the same, had the new one not been complete: put the old one back
    fake_version(base / ".2.replaced-222-bb", "old 2")
    fake_version(base / ".2.partial-222-bb", "new 2", complete=False)
    # killed after the second rename, before deleting the old copy
    fake_version(base / "3", "new 3")
    fake_version(base / ".3.replaced-333-cc", "old 3")
    # killed while writing a new version; and a partial directory of an older tfdlrm (no pid)
    fake_version(base / ".4.partial-444-dd", "new 4", complete=False)
    fake_version(base / ".5.partial-x1y2z3", "new 5")
    assert versions(base) == [3]  # what a server saw: versions 1 and 2 gone

    done = recover_base(base)
    assert sorted(p.name for p in base.iterdir()) == ["1", "2", "3"]
    assert [marker(base / v) for v in ("1", "2", "3")] == ["new 1", "old 2", "new 3"]
    assert all(is_complete(base / v) for v in ("1", "2", "3"))
    assert any("finished replacing" in line and line.endswith("killed process)") for line in done)
    assert any("restored" in line for line in done)
    assert sum("removed" in line for line in done) == 5  # .1 and .3.replaced, .2, .4 and .5.partial
    assert recover_base(base) == []


@pytest.mark.parametrize("exchange", ["renameat2", "two renames"])
def test_replacing_a_directory_never_loses_it(tmp_path, monkeypatch, exchange):
    if exchange == "two renames":
        def unsupported(a, b):
            raise OSError(errno.EINVAL, "not supported here")
        monkeypatch.setattr(publish, "exchange", unsupported)
    final = fake_version(tmp_path / "1", "v0")
    missing, stop = [], threading.Event()

    def watch():
        while not stop.is_set():
            if not (final / "saved_model.pb").is_file():
                missing.append(1)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        for i in range(1, 201):
            new = fake_version(tmp_path / f".1.partial-{os.getpid()}-{i:08x}", f"v{i}")
            publish.replace_dir(new, final, tmp_path / f".1.replaced-{os.getpid()}-{i:08x}")
    finally:
        stop.set()
        watcher.join()
    assert marker(final) == "v200" and sorted(p.name for p in tmp_path.iterdir()) == ["1"]
    if exchange == "renameat2":
        assert not missing  # one exchange: the version is there at every instant
    # (two renames leave a window, which is why a kill there is recovered by the next export)


def test_a_failed_second_rename_puts_the_old_version_back(tmp_path, monkeypatch):
    monkeypatch.setattr(publish, "exchange", lambda a, b: (_ for _ in ()).throw(OSError(errno.ENOSYS, "no")))
    final = fake_version(tmp_path / "1", "old")
    with pytest.raises(FileNotFoundError):
        publish.replace_dir(tmp_path / ".1.partial-1-aa", final, tmp_path / ".1.replaced-1-aa")
    assert marker(final) == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["1"]


# -- real exports -------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def run(tmp_path_factory):
    from tfdlrm.training.loop import train
    from tfdlrm.training.spec import TrainSpec

    out = tmp_path_factory.mktemp("swap") / "run"
    # xla="off": the export is of the model, whichever step trained it
    train(TrainSpec(preset="tiny", data="random", train_examples=512, eval_examples=512, batch_size=256, epochs=1,
                    optimizer="adagrad", lr=0.05, out=str(out), verbose=0, xla="off"), log=lambda s: None)
    return out


# Dies (os._exit, as SIGKILL would leave it) right after moving the old version aside, on a
# file system that cannot exchange two directories.
KILLED_BETWEEN_RENAMES = """
import errno, os, sys
from tfdlrm import publish
from tfdlrm.serving.export import export_run

def unsupported(a, b):
    raise OSError(errno.EINVAL, "not supported here")

rename = os.rename
def rename_then_die(src, dst):
    rename(src, dst)
    if ".replaced-" in str(dst):
        os._exit(9)

publish.exchange = unsupported
os.rename = rename_then_die
export_run(sys.argv[1], out=sys.argv[2], version=1, force=True)
"""


def test_a_forced_export_killed_between_its_renames_is_finished_by_the_next_export(run, tmp_path):
    base = tmp_path / "saved"
    assert export_run(str(run), out=str(base)).version == 1
    (base / "1" / "marker").write_text("the old version 1")
    proc = subprocess.run([sys.executable, "-c", KILLED_BETWEEN_RENAMES, str(run), str(base)], cwd=REPO, env=env(),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 9, proc.stderr[-2000:]
    names = sorted(p.name for p in base.iterdir())
    assert versions(base) == [] and len(names) == 3, names  # issue's case 2: no loadable version left
    assert names[0].startswith(".1.partial-") and names[1].startswith(".1.replaced-") and names[2] == ".lock"

    reader = start_holder(run, "shared")  # another export reading the run: shared, no conflict
    try:
        lines: list[str] = []
        assert export_run(str(run), out=str(base), log=lines.append).version == 2
    finally:
        kill(reader)
    assert any(line.startswith(f"finished replacing {base / '1'}") for line in lines), lines
    assert sorted(p.name for p in base.iterdir()) == ["1", "2"]
    assert is_complete(base / "1") and not (base / "1" / "marker").exists()  # the forced export, finished
    assert json.loads((base / "1" / EXTRA_DIR / EXPORT_INFO).read_text())["version"] == 1


class Crash(BaseException):
    """Stands for the process dying."""


def test_a_forced_export_killed_after_its_exchange_leaves_the_new_version_in_place(run, tmp_path, monkeypatch):
    base = tmp_path / "saved"
    export_run(str(run), out=str(base))
    (base / "1" / "marker").write_text("the old version 1")

    def die(path, *args, **kwargs):
        raise Crash(path)

    monkeypatch.setattr(publish.shutil, "rmtree", die)  # the first step after the exchange
    with pytest.raises(Crash) as crash:
        export_run(str(run), out=str(base), version=1, force=True)
    monkeypatch.undo()
    assert Path(crash.value.args[0]).name.startswith(".1.partial-")  # holds the old version now
    assert (Path(crash.value.args[0]) / "marker").exists()
    assert versions(base) == [1] and is_complete(base / "1") and not (base / "1" / "marker").exists()


def test_a_run_being_trained_or_a_base_being_written_is_refused(run, tmp_path):
    trainer = start_holder(run)
    try:
        with pytest.raises(UserError) as error:
            export_run(str(run), out=str(tmp_path / "saved"))
        assert f"run directory {run} is being written by pid {trainer.pid}" in str(error.value)
        assert not (tmp_path / "saved").exists()
    finally:
        kill(trainer)
    base = tmp_path / "saved"
    base.mkdir()
    exporter = start_holder(base)
    try:
        with pytest.raises(UserError, match=f"export base {base} is being written by pid {exporter.pid}"):
            export_run(str(run), out=str(base))
        assert versions(base) == []
    finally:
        kill(exporter)
