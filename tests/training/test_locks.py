"""One writer per directory (tfdlrm/locks.py): a second ``train`` or ``compare`` into a directory
another process is writing is refused with one line naming that process; a lock of a killed
process is no lock (the kernel drops it), so rerunning the command after a SIGKILL resumes;
readers share the lock; a released lock leaves no file behind."""
import json
import os
import subprocess
import sys
import threading
import time

import pytest

from tests.helpers import REPO, assert_clean_error
from tests.helpers.cli import run_main
from tests.helpers.holders import env, kill, start_holder
from tfdlrm.errors import UserError
from tfdlrm.locks import LOCK_FILE, acquire, hold, holder, is_free


def test_a_second_writer_is_refused_naming_the_holder_and_a_killed_holders_lock_is_taken_over(tmp_path):
    other = start_holder(tmp_path)
    try:
        with pytest.raises(UserError) as error:
            hold(tmp_path, hint="use another --out")
        message = str(error.value)
        assert f"{tmp_path} is being written by pid {other.pid} (" in message and "since " in message
        assert message.endswith("; use another --out") and "\n" not in message
        assert not is_free(tmp_path / LOCK_FILE)
    finally:
        kill(other)
    # SIGKILL: the file stays, naming a dead process, but the kernel dropped the lock
    assert holder(tmp_path / LOCK_FILE)["pid"] == other.pid and is_free(tmp_path / LOCK_FILE)
    with hold(tmp_path) as lock:
        assert holder(tmp_path / LOCK_FILE)["pid"] == os.getpid() and lock.fd is not None
        assert holder(tmp_path / LOCK_FILE)["mode"] == "exclusive"
    assert not (tmp_path / LOCK_FILE).exists()  # released: no file left behind


def test_readers_share_the_lock_and_keep_writers_out_until_the_last_one_leaves(tmp_path):
    reader = start_holder(tmp_path, "shared")
    try:
        with hold(tmp_path, shared=True):  # a second reader
            with pytest.raises(UserError, match=f"is being read by pid {os.getpid()}|is being read by pid {reader.pid}"):
                hold(tmp_path, what="run directory x")
        assert (tmp_path / LOCK_FILE).exists()  # the other reader still holds it
        with pytest.raises(UserError, match="is being read by"):
            hold(tmp_path)
    finally:
        kill(reader)
    with hold(tmp_path, shared=True):
        pass
    assert not (tmp_path / LOCK_FILE).exists()


def test_a_waiter_whose_lock_file_was_removed_locks_the_new_one(tmp_path):
    """The holder removes the file as it lets go; a process waiting on the old file must not
    count as holding the lock while another has locked the file now at that path."""
    path = tmp_path / LOCK_FILE
    first = acquire(path)
    told, got = [], {}
    waiter = threading.Thread(target=lambda: got.setdefault("lock", acquire(path, wait=True, on_wait=told.append)))
    waiter.start()
    time.sleep(0.3)
    assert "lock" not in got and told and f"pid {os.getpid()}" in told[0]
    first.release()
    waiter.join(10)
    lock = got["lock"]
    try:
        assert os.fstat(lock.fd).st_ino == os.stat(path).st_ino  # locked the file at the path, not the removed one
        with pytest.raises(UserError):
            acquire(path)
    finally:
        lock.release()


# -- train and compare ----------------------------------------------------------------------------------------------
RUN = ["train", "--preset", "tiny", "--data", "random", "--train-examples", "1024", "--eval-examples", "1024",
       "--batch-size", "256", "--epochs", "2", "--optimizer", "adagrad", "--lr", "0.05", "--checkpoint-every", "2",
       "--seed", "2"]


def test_two_trains_into_one_out_the_second_is_refused_and_the_first_resumes_after_a_kill(tmp_path):
    out = tmp_path / "run"
    first = subprocess.Popen([sys.executable, "-m", "tfdlrm", *RUN, "--out", str(out)], cwd=REPO, env=env(),
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    checkpoint = out / "checkpoints" / "step-00000002.json"
    give_up = time.monotonic() + 300  # only a guard against a hang
    while not checkpoint.exists() and first.poll() is None and time.monotonic() < give_up:
        time.sleep(0.02)
    try:
        assert checkpoint.exists(), "the first train never saved its first checkpoint"
        second = run_main([*RUN, "--lr", "0.5", "--out", str(out)])  # other settings, same --out, at once
        assert_clean_error(second, f"{out} is being written by pid {first.pid}", "tfdlrm train", "use another --out")
        assert second.returncode == 2
        assert json.loads((out / "run.json").read_text())["spec"]["lr"] == 0.05  # untouched by the second
    finally:
        first.kill()  # SIGKILL mid-run: its lock file stays, its lock does not
        first.wait()
    assert first.returncode == -9 and (out / LOCK_FILE).exists() and not (out / "metrics.json").exists()
    again = run_main([*RUN, "--out", str(out)])
    assert again.returncode == 0, again.stderr[-2000:]
    assert "resuming from" in again.stdout
    assert len(json.loads((out / "metrics.json").read_text())["history"]["loss"]) == 2
    assert not (out / LOCK_FILE).exists()


def test_a_second_compare_into_one_out_is_refused_before_training(tmp_path):
    out = tmp_path / "cmp"
    out.mkdir()
    other = start_holder(out)
    try:
        proc = run_main(["compare", "--models", "dlrm", "--train-examples", "2048", "--eval-examples", "1024",
                         "--batch-size", "512", "--out", str(out)])
        assert_clean_error(proc, f"{out} is being written by pid {other.pid}", "wait for that comparison")
        assert sorted(p.name for p in out.iterdir()) == [LOCK_FILE]  # nothing trained, no report
    finally:
        kill(other)


def test_a_train_that_fails_before_writing_leaves_no_directory(tmp_path):
    proc = run_main(["train", "--data", str(tmp_path / "no-such-data"), "--out", str(tmp_path / "run")])
    assert_clean_error(proc, "no-such-data")
    assert not (tmp_path / "run").exists()
