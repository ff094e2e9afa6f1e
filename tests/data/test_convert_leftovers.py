"""What killed conversions leave behind (pipelines/convert.py, tfdlrm/publish.py): the next
conversion into the same output deletes the partial directories of dead writers and never a
live writer's (its pid runs here, or its lock is held, on this host or another), and finishes
or rolls back an ``--overwrite`` replacement a kill interrupted; one process converts a cache
entry at a time, the other waits and reuses it."""
import json
import shutil
import subprocess
import sys
import threading

import pytest

from tests.helpers.criteo_rows import numbered_lines, write_lines
from tests.helpers.holders import kill, start_holder
from tfdlrm.errors import UserError
from tfdlrm.pipelines.cache import cached_conversion
from tfdlrm.pipelines.convert import ConvertSpec, convert


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def convert_into(tmp_path, name="ds", **kwargs) -> list[str]:
    lines: list[str] = []
    convert(ConvertSpec(out=str(tmp_path / name), inputs=[str(tmp_path / "train.txt")], progress=False,
                        **{"hash_buckets": 10, **kwargs}), log=lines.append)
    return lines


def buckets(out) -> int:
    return json.loads((out / "manifest.json").read_text())["table_sizes"][0] - 1


def test_a_killed_conversions_partial_is_deleted_by_the_next_one_and_a_live_ones_kept(tmp_path):
    write_lines(tmp_path / "train.txt", numbered_lines(80))
    dead = tmp_path / f".ds.partial-{dead_pid()}-0badc0de"
    (dead / "vocabulary").mkdir(parents=True)
    (dead / "train-00000.tfrecord").write_bytes(b"x" * 4096)
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    live = tmp_path / f".ds.partial-{sleeper.pid}-00c0ffee"  # no lock yet: its pid says it lives
    live.mkdir()
    remote = tmp_path / f".ds.partial-{dead_pid()}-0000beef"  # a writer on another host: its lock says it lives
    remote.mkdir()
    other_output = tmp_path / f".other.partial-{dead_pid()}-0000abcd"
    other_output.mkdir()
    holder = start_holder(remote / ".lock")
    try:
        lines = convert_into(tmp_path)
        assert lines == [f"removed {dead}, left by a killed process"]
        assert not dead.exists() and live.is_dir() and remote.is_dir() and other_output.is_dir()
    finally:
        kill(holder)
        sleeper.kill()
        sleeper.wait()
    lines = convert_into(tmp_path, overwrite=True, hash_buckets=20)  # both writers are gone now
    assert sorted(lines) == sorted(f"removed {p}, left by a killed process" for p in (live, remote))
    assert sorted(p.name for p in tmp_path.iterdir()) == [other_output.name, "ds", "train.txt"]  # not ds's
    assert buckets(tmp_path / "ds") == 20


@pytest.mark.parametrize("new_complete", [True, False])
def test_an_overwrite_killed_between_its_renames_is_finished_or_rolled_back(tmp_path, new_complete):
    """Where the file system cannot exchange two directories, ``--overwrite`` renames the old
    dataset aside and the new one into place; a kill between leaves no dataset at --out."""
    write_lines(tmp_path / "train.txt", numbered_lines(80))
    convert_into(tmp_path, "ds", hash_buckets=10)
    convert_into(tmp_path, "new", hash_buckets=20)
    token = f"{dead_pid()}-00aa11bb"
    (tmp_path / "ds").rename(tmp_path / f".ds.old-{token}")
    (tmp_path / "new").rename(tmp_path / f".ds.partial-{token}")
    if not new_complete:  # killed before the manifest (written last): cannot be the swap's, but put right too
        (tmp_path / f".ds.partial-{token}" / "manifest.json").unlink()
    with pytest.raises(UserError, match="already exists"):  # the dataset is back, so without --overwrite: refused
        convert_into(tmp_path, "ds", hash_buckets=30)
    assert buckets(tmp_path / "ds") == (20 if new_complete else 10)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds", "train.txt"]


def test_a_second_process_waits_for_the_cache_entry_being_converted_and_reuses_it(tmp_path):
    train = write_lines(tmp_path / "train.txt", numbered_lines(200))
    test = write_lines(tmp_path / "test.txt", numbered_lines(50, start=200))
    out = cached_conversion(str(train), str(test), cache_dir=str(tmp_path / "cache"), hash_buckets=10,
                            log=lambda s: None)
    shutil.move(out, tmp_path / "converted")
    converter = start_holder(out.parent / f".{out.name}.lock")  # another process converting this entry

    def finish():  # it writes the entry and ends
        shutil.move(tmp_path / "converted", out)
        kill(converter)

    timer = threading.Timer(1.0, finish)
    timer.start()
    lines: list[str] = []
    try:
        assert cached_conversion(str(train), str(test), cache_dir=str(tmp_path / "cache"), hash_buckets=10,
                                 log=lines.append) == out
    finally:
        timer.join()
    assert lines[0].startswith("converting") and f"waiting for pid {converter.pid}" in lines[1]
    assert lines[2] == f"using the converted cache of {train}: {out}" and len(lines) == 3
    assert sorted(p.name for p in out.parent.iterdir()) == [out.name]
