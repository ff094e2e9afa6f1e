"""A private network for a one-host cluster: a new Linux network namespace that holds only
loopback, so the ports of the processes started inside it cannot be reached from outside.

TensorFlow's gRPC servers listen on every interface and authenticate no one (whoever reaches
a port can run any TensorFlow op in that process). ``tfdlrm cluster`` and the tests' clusters
therefore call :func:`enter_private_network` before they start any server: the calling process
moves into a fresh network namespace (as root; otherwise through a user namespace, where the
kernel allows unprivileged ones), brings its loopback up, and every process it starts after
that inherits the namespace. Nothing here imports TensorFlow.
"""
from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import socket
import struct
import sys

CLONE_NEWNET = 0x40000000
CLONE_NEWUSER = 0x10000000
SIOCGIFFLAGS, SIOCSIFFLAGS, IFF_UP = 0x8913, 0x8914, 0x1


class NoPrivateNetwork(Exception):
    """This process cannot get a private network namespace; the message says why."""


def _unshare(flags: int) -> int:
    """``unshare(2)``: 0, or the errno it failed with."""
    libc = ctypes.CDLL(None, use_errno=True)
    return 0 if libc.unshare(flags) == 0 else ctypes.get_errno()


def _write(path: str, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)


def _loopback_up() -> None:
    """``ip link set lo up``, without needing the ip command: SIOCSIFFLAGS on lo."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        request = struct.pack("16sH22s", b"lo", 0, b"")
        flags = struct.unpack("16sH22s", fcntl.ioctl(s, SIOCGIFFLAGS, request))[1]
        fcntl.ioctl(s, SIOCSIFFLAGS, struct.pack("16sH22s", b"lo", flags | IFF_UP, b""))


def enter_private_network() -> str:
    """Move this process into a new network namespace with only loopback (up), and say how:
    ``"network namespace"`` (root) or ``"user and network namespaces"``. Processes started
    afterwards inherit it. Raises :class:`NoPrivateNetwork` when the kernel refuses both ways.

    Call it before this process starts threads: a user namespace needs a single-threaded caller.
    """
    if not sys.platform.startswith("linux"):
        raise NoPrivateNetwork(f"network namespaces are Linux's; this is {sys.platform}")
    failed = _unshare(CLONE_NEWNET)
    how = "network namespace"
    if failed:
        if failed != errno.EPERM:
            raise NoPrivateNetwork(f"unshare(CLONE_NEWNET) failed: {os.strerror(failed)}")
        uid, gid = os.getuid(), os.getgid()
        again = _unshare(CLONE_NEWUSER | CLONE_NEWNET)
        if again:
            raise NoPrivateNetwork(f"a network namespace needs root ({os.strerror(failed)}) and this kernel "
                                   f"refuses an unprivileged user namespace ({os.strerror(again)})")
        # The same user and group inside as outside: files written in the namespace are the caller's.
        _write("/proc/self/setgroups", "deny")
        _write("/proc/self/uid_map", f"{uid} {uid} 1")
        _write("/proc/self/gid_map", f"{gid} {gid} 1")
        how = "user and network namespaces"
    try:
        _loopback_up()
    except OSError as e:
        raise NoPrivateNetwork(f"cannot bring up loopback in the new network namespace: {e.strerror or e}") from None
    return how

