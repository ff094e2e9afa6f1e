"""Another process holding a directory's lock (tfdlrm/locks.py), for the lock and export tests."""
from __future__ import annotations

import os
import signal
import subprocess
import sys

from tests.helpers import REPO

# A process that holds DIR's lock, or the lock file PATH.lock, (exclusive, or "shared") until it is killed.
HOLDER = """
import sys, time
from pathlib import Path
from tfdlrm.locks import acquire, hold
take = acquire if sys.argv[1].endswith(".lock") else hold
lock = take(Path(sys.argv[1]), shared=sys.argv[2] == "shared")
print("held", flush=True)
time.sleep(600)
"""


def env() -> dict:
    """The environment of a ``python -m tfdlrm`` child (as tests.helpers.run_cli sets it)."""
    full = dict(os.environ)
    full.pop("TF_USE_LEGACY_KERAS", None)
    full["PYTHONPATH"] = str(REPO)
    return full


def start_holder(directory, mode: str = "exclusive") -> subprocess.Popen:
    """A process holding ``directory``'s lock (or the lock file ``directory``, ``*.lock``), once this returns."""
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(directory), mode], cwd=REPO, env=env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    assert line.strip() == "held", proc.stderr.read()
    return proc


def kill(proc: subprocess.Popen) -> None:
    """SIGKILL: the kernel drops its locks; its lock file stays."""
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    for stream in (proc.stdout, proc.stderr):
        if stream is not None:
            stream.close()
