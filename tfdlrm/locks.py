"""Locks on the directories a process writes: a run directory, a comparison's ``--out``, an
export base, a conversion cache entry.  See docs/fault-tolerance.md#one-writer-per-directory.

A lock is an OS file lock (``fcntl.flock``) on a lock file, ``DIR/.lock``: exclusive for a
writer, shared for a reader.  The kernel drops it when its process ends, however it ends
(SIGKILL, power cut), so a lock of a dead process is no lock: the next process simply takes
it.  The file holds who holds it (pid, host, command, since) for the refusal message; the
holder removes it when it lets go, so a directory that is not in use holds no lock file.
A process killed while holding leaves it behind; the next holder reuses it.
"""
from __future__ import annotations

import datetime
import errno
import json
import os
import socket
import sys
from pathlib import Path
from typing import Callable, Optional

from tfdlrm.errors import UserError

LOCK_FILE = ".lock"
_INFO_BYTES = 512  # one fixed-size record: concurrent readers overwrite each other whole


def pid_alive(pid: int) -> bool:
    """Whether a process ``pid`` exists on this host (one of another user counts)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def command_line() -> str:
    """This process's command, shortened: ``tfdlrm train --out runs/x ...``."""
    argv = list(sys.argv) or ["python"]
    head = "tfdlrm" if argv[0].endswith(("__main__.py", "tfdlrm")) else os.path.basename(argv[0]) or "python"
    text = " ".join([head, *argv[1:]])
    return text if len(text) <= 200 else text[:197] + "..."


class Lock:
    """A lock held by this process; ``release()`` (or leaving ``with``) lets it go."""

    def __init__(self, path: Path, fd: Optional[int], shared: bool):
        self.path, self.fd, self.shared = path, fd, shared

    def release(self) -> None:
        if self.fd is None:
            return
        import fcntl

        fd, self.fd = self.fd, None
        try:
            # The last holder removes the file: a reader only when no other reader holds it.
            # Whoever opened it meanwhile finds, once it has the lock, that the path no longer
            # names its file, and opens the path again (acquire).
            if self.shared:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            if _same_file(self.path, fd):
                self.path.unlink()
        except OSError:
            pass
        finally:
            os.close(fd)

    def __enter__(self) -> "Lock":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def _same_file(path: Path, fd: int) -> bool:
    try:
        st, mine = os.stat(path), os.fstat(fd)
    except OSError:
        return False
    return (st.st_dev, st.st_ino) == (mine.st_dev, mine.st_ino)


def holder(path: Path) -> Optional[dict]:
    """What the lock file ``path`` says of its holder (pid, host, command, since, mode), or None."""
    try:
        text = Path(path).read_text(errors="replace")
        info = json.loads(text.split("\n", 1)[0])
        return info if isinstance(info, dict) and isinstance(info.get("pid"), int) else None
    except (OSError, ValueError):
        return None


def describe_holder(path: Path) -> str:
    """``pid 4242 (tfdlrm train ...), since ...`` of the lock file ``path``, as well as it is known."""
    info = holder(path)
    here = socket.gethostname()
    if info is None or (info.get("host") == here and not pid_alive(info["pid"])):
        return "another process (its pid is not recorded yet)"
    where = f" on host {info['host']}" if info.get("host") not in (None, here) else ""
    since = f", since {info['since']}" if info.get("since") else ""
    return f"pid {info['pid']}{where} ({info.get('command', '?')}){since}"


def acquire(path: Path, *, shared: bool = False, what: str = "", hint: str = "", wait: bool = False,
            on_wait: Optional[Callable[[str], None]] = None) -> Lock:
    """Lock the lock file ``path`` (made if missing).  Held by another process: a ``UserError``
    ``WHAT is being written by pid N (COMMAND), since ...; HINT``, or with ``wait`` block until
    it is free (``on_wait`` is told who holds it first).  A reader (``shared``) that may not
    create the file (a read-only run directory) reads without a lock (an empty ``Lock``)."""
    try:
        import fcntl
    except ImportError:  # no POSIX locks (Windows): one writer per directory is up to the user
        return Lock(path, None, shared)
    path = Path(path)
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            if shared and e.errno in (errno.EACCES, errno.EROFS, errno.EPERM):
                try:
                    fd = os.open(path, os.O_RDONLY)
                except OSError:
                    return Lock(path, None, shared)
            else:
                raise UserError(f"cannot lock {what or path.parent}: {path}: {e.strerror or e}") from None
        mode = fcntl.LOCK_SH if shared else fcntl.LOCK_EX
        try:
            fcntl.flock(fd, mode | fcntl.LOCK_NB)
        except BlockingIOError:
            if not wait:
                os.close(fd)
                reading = not shared and (holder(path) or {}).get("mode") == "shared"
                raise UserError(f"{what or path.parent} is being {'read' if reading else 'written'} by "
                                f"{describe_holder(path)}" + (f"; {hint}" if hint else "")) from None
            if on_wait is not None:
                on_wait(describe_holder(path))
            fcntl.flock(fd, mode)
        except OSError:  # a file system without locks (ENOLCK): one writer is up to the user there
            os.close(fd)
            return Lock(path, None, shared)
        if _same_file(path, fd):  # else the holder removed the file as it let go: open it again
            break
        os.close(fd)
    _record(fd, shared)
    return Lock(path, fd, shared)


def _record(fd: int, shared: bool) -> None:
    """Write who holds the lock into the file (a reader may fail to: the lock holds all the same)."""
    info = {"pid": os.getpid(), "host": socket.gethostname(), "mode": "shared" if shared else "exclusive",
            "since": datetime.datetime.now().astimezone().isoformat(timespec="seconds"), "command": command_line()}
    data = (json.dumps(info) + "\n").encode()
    if len(data) > _INFO_BYTES:
        info["command"] = info["command"][: max(0, len(info["command"]) - (len(data) - _INFO_BYTES) - 3)] + "..."
        data = (json.dumps(info) + "\n").encode()
    try:
        os.pwrite(fd, data.ljust(_INFO_BYTES), 0)
    except OSError:
        pass


def hold(directory: str | os.PathLike, *, shared: bool = False, what: Optional[str] = None, hint: str = "",
         wait: bool = False, on_wait: Optional[Callable[[str], None]] = None) -> Lock:
    """Lock the existing ``directory`` (its ``.lock``): exclusive to write it, ``shared`` to read it."""
    directory = Path(directory)
    return acquire(directory / LOCK_FILE, shared=shared, what=what or str(directory), hint=hint, wait=wait,
                   on_wait=on_wait)


def is_free(path: Path) -> bool:
    """Whether nobody holds the lock file ``path`` (a missing file is free)."""
    try:
        import fcntl
    except ImportError:
        return True
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return True
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # flock needs no write access
        return True
    except BlockingIOError:
        return False
    finally:
        os.close(fd)
