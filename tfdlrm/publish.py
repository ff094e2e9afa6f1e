"""Putting a finished directory in place, and what killed writers leave behind.

A writer builds its output in ``.NAME.partial-PID-HEX`` beside ``NAME`` (a converted
dataset, an export version) and renames it into place.  Replacing an existing ``NAME``
swaps the two in one step where the file system can (``renameat2(RENAME_EXCHANGE)``:
Linux on ext4, xfs, btrfs, tmpfs, ...), so ``NAME`` is complete at every instant; elsewhere
it takes two renames (``NAME`` -> ``.NAME.ASIDE-PID-HEX``, partial -> ``NAME``), and the next
writer finishes or rolls back a swap a kill interrupted (``recover``).  See
docs/fault-tolerance.md#leftovers-of-killed-runs.
"""
from __future__ import annotations

import errno
import os
import re
import shutil
import sys
import uuid
from pathlib import Path
from typing import Callable, Optional

from tfdlrm.locks import LOCK_FILE, Lock, acquire, is_free, pid_alive

_AT_FDCWD = -100
_RENAME_EXCHANGE = 2
# What renameat2 answers where the exchange cannot be done; anything else is a real failure.
_NO_EXCHANGE = {errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EPERM}


def token() -> str:
    """``PID-HEX``: names this process's partial and aside directories."""
    return f"{os.getpid()}-{uuid.uuid4().hex[:8]}"


def exchange(a: Path, b: Path) -> None:
    """Swap the directories ``a`` and ``b`` atomically; ``OSError`` (``ENOSYS``, ``EINVAL``)
    where the system or file system cannot."""
    if not sys.platform.startswith("linux"):
        raise OSError(errno.ENOSYS, "no renameat2 on this system")
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    renameat2 = getattr(libc, "renameat2", None)
    if renameat2 is None:  # glibc before 2.28
        raise OSError(errno.ENOSYS, "no renameat2 in this C library")
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code), str(a), None, str(b))


def replace_dir(new: Path, final: Path, aside: Path) -> None:
    """Put the complete directory ``new`` at ``final`` (which exists), deleting the old one.

    In one exchange where possible; otherwise ``final`` -> ``aside``, ``new`` -> ``final``,
    a window in which a kill leaves both beside a missing ``final`` for ``recover``."""
    try:
        exchange(new, final)  # final is the new one; new holds the old
    except OSError as e:
        if e.errno not in _NO_EXCHANGE:
            raise
        os.rename(final, aside)
        try:
            os.rename(new, final)
        except OSError:
            os.rename(aside, final)
            raise
        shutil.rmtree(aside, ignore_errors=True)
    else:
        shutil.rmtree(new, ignore_errors=True)


def make_partial(parent: Path, name: str, tag: str = "partial", lock: bool = False, parents: bool = False
                 ) -> tuple[Path, Optional[Lock]]:
    """A new ``parent/.NAME.TAG-PID-HEX`` directory (mode from the umask; ``parents`` made too),
    and with ``lock`` a lock held on its ``.lock`` while it is being written (``writer_gone``)."""
    path = Path(parent) / f".{name}.{tag}-{token()}"
    path.mkdir(parents=parents)
    held = acquire(path / LOCK_FILE, what=str(path), wait=True) if lock else None
    return path, held


def _pid_of(path: Path) -> Optional[int]:
    match = re.search(r"-(\d+)-[0-9a-f]+$", path.name)
    return int(match.group(1)) if match else None


def writer_gone(path: Path) -> bool:
    """Whether the process that wrote the leftover ``path`` has ended: the lock inside it (if
    any) is free, and the pid in its name runs on this host no longer.  Either sign of life
    keeps it (a lock of another host; the moment between making the directory and locking it)."""
    if not is_free(path / LOCK_FILE):
        return False
    pid = _pid_of(path)
    return pid is None or not pid_alive(pid)


def _remove(path: Path) -> bool:
    shutil.rmtree(path, ignore_errors=True)
    return not path.exists()


def recover(parent: Path, name_pattern: str, complete: Callable[[Path], bool], *, partial: str = "partial",
            aside: str = "aside", stale: Callable[[Path], bool] = writer_gone) -> list[str]:
    """Clean up after killed writers in ``parent``: for a name matching ``name_pattern``
    (a regular expression), an interrupted swap is finished (its ``.NAME.PARTIAL-T`` is
    ``complete``: renamed into place) or rolled back (``.NAME.ASIDE-T`` renamed back); then
    ``.NAME.PARTIAL-*`` and ``.NAME.ASIDE-*`` of writers that are ``stale`` are deleted.
    Returns what it did, one line each."""
    leftover = re.compile(rf"^\.({name_pattern})\.({re.escape(partial)}|{re.escape(aside)})-([\w.-]+)$")
    try:
        entries = sorted(Path(parent).iterdir())
    except OSError:
        return []
    found = [(p, m) for p in entries if (m := leftover.match(p.name)) and p.is_dir() and stale(p)]
    done = []
    for path, match in found:
        if match.group(2) != aside:
            continue
        name, tok = match.group(1), match.group(3)
        final, new = path.parent / name, path.parent / f".{name}.{partial}-{tok}"
        try:
            if final.exists():
                continue  # the swap finished: only deleting the old copy is left
            if new.is_dir() and complete(new):
                os.rename(new, final)
                done.append(f"finished replacing {final} (interrupted by a killed process)")
            else:
                os.rename(path, final)
                done.append(f"restored {final} (its replacement was interrupted by a killed process)")
        except OSError:
            continue  # another process recovering it at the same time
    for path, _ in found:
        if path.exists() and _remove(path):
            done.append(f"removed {path}, left by a killed process")
    return done


def recover_beside(out: Path, complete: Callable[[Path], bool], aside: str = "aside",
                   log: Optional[Callable[[str], None]] = None) -> list[str]:
    """``recover`` for the one output ``out``: its interrupted replacement, the partial
    directories of its killed writers (never a live one's: ``writer_gone``); each told to ``log``."""
    done = recover(out.parent, re.escape(out.name), complete, aside=aside)
    for line in done if log is not None else ():
        log(line)
    return done
