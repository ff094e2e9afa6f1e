"""Running ``python -m tfdlrm`` for tests: in this process (TensorFlow already imported, so
fast), or in a fresh one with limits (a maximum file size, stdout on a full device)."""
from __future__ import annotations

import contextlib
import io
import os
import subprocess
import sys
from dataclasses import dataclass
from typing import Optional, Sequence

from tests.helpers import REPO


@dataclass
class Completed:
    returncode: int
    stdout: str
    stderr: str


def run_main(argv: Sequence[str]) -> Completed:
    """``tfdlrm.cli.main(argv)`` with stdout and stderr captured; an exception that escapes
    ``main`` (a traceback on the command line) propagates."""
    import tensorflow as tf

    from tfdlrm.cli.main import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(list(argv))
        except SystemExit as e:
            code = e.code
    tf.keras.backend.clear_session()
    return Completed(code, out.getvalue(), err.getvalue())


def run_process(argv: Sequence[str], *, max_file_bytes: Optional[int] = None, stdout_path: Optional[str] = None,
                env: Optional[dict] = None, timeout: float = 600) -> Completed:
    """``python -m tfdlrm ARGV`` in a fresh process.  ``max_file_bytes`` sets RLIMIT_FSIZE, so
    that writing past it fails with EFBIG as on a full disk (Python ignores SIGXFSZ);
    ``stdout_path`` sends stdout there (``/dev/full``: every write fails with ENOSPC)."""
    full_env = dict(os.environ)
    full_env.pop("TF_USE_LEGACY_KERAS", None)
    full_env["PYTHONPATH"] = str(REPO)
    full_env.update(env or {})

    def limit():
        if max_file_bytes is not None:
            import resource

            resource.setrlimit(resource.RLIMIT_FSIZE, (max_file_bytes, max_file_bytes))

    stdout = open(stdout_path, "w") if stdout_path else subprocess.PIPE
    try:
        proc = subprocess.run([sys.executable, "-m", "tfdlrm", *argv], cwd=REPO, env=full_env, stdout=stdout,
                              stderr=subprocess.PIPE, text=True, timeout=timeout, preexec_fn=limit)
    finally:
        if stdout_path:
            stdout.close()
    return Completed(proc.returncode, proc.stdout or "", proc.stderr)
