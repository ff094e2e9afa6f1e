"""``tfdlrm cluster``: a parameter-server cluster on one host, for a first try, tests and benchmarks.

The launcher moves itself into a private network namespace (tfdlrm/parallel/netns.py) unless told
to accept open ports, picks a free port for each task on 127.0.0.1, starts every parameter server
and worker as its own ``tfdlrm server`` process (each with its TF_CONFIG, in its own session, under
the memory cap, and killed by the kernel if the launcher dies), waits until each serves, then
runs the chief's ``train --parallel ps`` and streams the servers' output prefixed with their
names. When the chief ends, or on Ctrl-C / SIGTERM (forwarded to the chief first, so it writes
its checkpoint), every process is stopped with bounded waits: none is left behind.
Nothing here imports TensorFlow.
"""
from __future__ import annotations

import ctypes
import json
import os
import select
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Optional, Sequence, TextIO

from tfdlrm.errors import UserError
from tfdlrm.parallel.devices import MEMORY_ENV, NETWORK_ENV
from tfdlrm.parallel.netns import NoPrivateNetwork, enter_private_network

HOST = "127.0.0.1"
STOP_WAIT = 20.0  # seconds the processes get after SIGTERM before SIGKILL
PR_SET_PDEATHSIG = 1
THREAD_STACK = 2 << 20  # RLIMIT_STACK of capped processes: their threads' (and main thread's) stack size
OPEN_PORTS_FLAG = "--open-ports"


@dataclass
class Task:
    name: str  # "ps 0", "worker 1", "chief"
    address: str
    popen: subprocess.Popen
    pending: bytes = b""
    last_line: str = ""
    ready: bool = False
    closed: bool = False


def cluster_spec(workers: int, ps: int, host: str = HOST) -> dict:
    """``{"chief": [...], "worker": [...], "ps": [...]}`` with a distinct free port on ``host`` for each
    task (all ports held open together while they are chosen, so no two are the same)."""
    if workers < 1 or ps < 1:
        raise UserError(f"a cluster needs at least one worker and one ps, got --workers {workers} --ps {ps}")
    held = []
    try:
        for _ in range(1 + workers + ps):
            s = socket.socket()
            s.bind((host, 0))
            held.append(s)
        addresses = [f"{host}:{s.getsockname()[1]}" for s in held]
    finally:
        for s in held:
            s.close()
    return {"chief": addresses[:1], "worker": addresses[1:1 + workers], "ps": addresses[1 + workers:]}


def _child_setup(memory: Optional[int]):
    """What each child runs between fork and exec: its own session (Ctrl-C at the terminal reaches the
    launcher, which stops the chief before the servers), the memory cap (RLIMIT_DATA), and death
    with the launcher (PR_SET_PDEATHSIG), so a killed launcher leaves no process behind."""
    import resource

    libc = ctypes.CDLL(None, use_errno=True)  # loaded before fork: the child only calls it
    parent = os.getpid()

    def setup():
        os.setsid()
        if memory:
            resource.setrlimit(resource.RLIMIT_DATA, (memory, memory))
            # Thread stacks count against RLIMIT_DATA: TensorFlow's ~100 threads at glibc's default of
            # RLIMIT_STACK (8 MiB) would take 0.75 GiB of the cap for stacks they never use.
            soft, hard = resource.getrlimit(resource.RLIMIT_STACK)
            if soft == resource.RLIM_INFINITY or soft > THREAD_STACK:
                resource.setrlimit(resource.RLIMIT_STACK, (THREAD_STACK, hard))
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        if os.getppid() != parent:  # the launcher died before prctl
            os._exit(1)

    return setup


def _pump(tasks: Sequence[Task], timeout: float, out: TextIO) -> None:
    """Wait up to ``timeout`` s for output of the servers and print it line by line, prefixed."""
    open_tasks = {t.popen.stdout.fileno(): t for t in tasks if not t.closed}
    if not open_tasks:
        time.sleep(timeout)
        return
    readable, _, _ = select.select(list(open_tasks), [], [], timeout)
    for fd in readable:
        task = open_tasks[fd]
        chunk = os.read(fd, 65536)
        if not chunk:
            task.closed = True
            chunk = b"\n" if task.pending else b""
        *lines, task.pending = (task.pending + chunk).split(b"\n")
        for raw in lines:
            line = raw.decode("utf-8", "replace").rstrip()
            if line:
                task.last_line = line
                task.ready = task.ready or "serving at" in line
                print(f"[{task.name}] {line}", file=out, flush=True)


def _wait_ready(tasks: Sequence[Task], timeout: float, signals: list, out: TextIO, memory: Optional[int]) -> None:
    deadline = time.monotonic() + timeout
    while not all(t.ready for t in tasks):
        if signals:
            raise _Interrupted(signals[0])
        for task in tasks:
            if not task.ready and task.popen.poll() is not None:
                while not task.closed:
                    _pump([task], 1.0, out)
                code = task.popen.returncode
                status = f"signal {-code}" if code < 0 else f"status {code}"
                said = f": {task.last_line[:300]}" if task.last_line else ""
                if memory:
                    status += f"; each process is capped at {memory:,} bytes by --memory-per-process"
                raise UserError(f"the {task.name} server exited at start ({status}){said}")
        if time.monotonic() > deadline:
            late = ", ".join(t.name for t in tasks if not t.ready)
            raise UserError(f"the cluster did not start within {timeout:.0f} s (still starting: {late})")
        _pump(tasks, 0.5, out)


def process_memory(pid: int) -> Optional[tuple]:
    """``(peak resident bytes so far (VmHWM), data segment bytes now (VmData, what RLIMIT_DATA caps))``
    of a process; None once it is gone."""
    found = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(("VmHWM:", "VmData:")):
                    found[line.split(":")[0]] = int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return (found["VmHWM"], found["VmData"]) if len(found) == 2 else None


def _track(peaks: dict, name: str, pid: int) -> None:
    now = process_memory(pid)
    if now is not None:
        old = peaks.get(name, (0, 0))
        peaks[name] = (max(old[0], now[0]), max(old[1], now[1]))


def _gib(n: int) -> str:
    return f"{n / 2 ** 30:.2f} GiB"


class _Interrupted(Exception):
    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


def _stop(popens: Sequence[subprocess.Popen]) -> None:
    """SIGTERM to each live process's session, SIGKILL to what is left after ``STOP_WAIT`` s."""
    live = [p for p in popens if p.poll() is None]
    for sig, wait in ((signal.SIGTERM, STOP_WAIT), (signal.SIGKILL, 10.0)):
        for p in live:
            try:
                os.killpg(p.pid, sig)
            except (ProcessLookupError, PermissionError):
                pass
        deadline = time.monotonic() + wait
        for p in live:
            try:
                p.wait(timeout=max(deadline - time.monotonic(), 0.1))
            except subprocess.TimeoutExpired:
                pass
        live = [p for p in live if p.poll() is None]
        if not live:
            return


def run_cluster(command: Sequence[str], workers: int, ps: int, memory: Optional[int] = None,
                open_ports: bool = False, ready_timeout: float = 300.0, out: TextIO = sys.stdout) -> int:
    """Start ``ps`` servers and ``workers`` workers on this host, run ``python -m tfdlrm COMMAND`` as the
    chief, stop them all; the chief's exit status (128 + N for signal N)."""
    if os.environ.get("TF_CONFIG"):
        raise UserError("tfdlrm cluster writes each process's TF_CONFIG itself; unset TF_CONFIG "
                        "(the environment names another cluster)")
    if open_ports:
        network = "open"
        where = "with its ports open on every interface (--open-ports)"
        print("tfdlrm cluster: warning: --open-ports: every server listens on all of this host's interfaces, "
              "unauthenticated, while the cluster runs (docs/parallelism.md, Security)", file=sys.stderr, flush=True)
    else:
        try:
            how = enter_private_network()
        except NoPrivateNetwork as e:
            raise UserError(f"cannot give the cluster a private network ({e}); without one its ports are open "
                            f"to whoever reaches this host, and TensorFlow's servers authenticate no one: pass "
                            f"{OPEN_PORTS_FLAG} to accept that (docs/parallelism.md, Security)") from None
        network = "private"
        where = f"in a private {how}: its ports are reachable from its own processes only"
    cluster = cluster_spec(workers, ps)
    env = dict(os.environ, **{NETWORK_ENV: network})
    env.pop(MEMORY_ENV, None)
    if memory:
        env[MEMORY_ENV] = str(memory)
    setup = _child_setup(memory)
    signals: list = []
    previous = {s: signal.signal(s, lambda signum, frame: signals.append(signum))
                for s in (signal.SIGINT, signal.SIGTERM)}
    tasks: list = []
    chief = None
    try:
        for job in ("ps", "worker"):
            for index, address in enumerate(cluster[job]):
                config = json.dumps({"cluster": cluster, "task": {"type": job, "index": index}})
                popen = subprocess.Popen([sys.executable, "-m", "tfdlrm", "server"], env=dict(env, TF_CONFIG=config),
                                         stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                         stderr=subprocess.STDOUT, preexec_fn=setup)
                tasks.append(Task(f"{job} {index}", address, popen))
        try:
            _wait_ready(tasks, ready_timeout, signals, out, memory)
        except _Interrupted as stop:
            print(f"tfdlrm cluster: stopped by {signal.Signals(stop.signum).name} while starting", file=out, flush=True)
            return 128 + stop.signum
        listing = ", ".join(f"{t.name} {t.address} (pid {t.popen.pid})" for t in tasks)
        print(f"tfdlrm cluster: {ps} ps and {workers} worker(s) on {HOST}, {where}; {listing}",
              file=out, flush=True)
        config = json.dumps({"cluster": cluster, "task": {"type": "chief", "index": 0}})
        chief = subprocess.Popen([sys.executable, "-m", "tfdlrm", *command], env=dict(env, TF_CONFIG=config),
                                 preexec_fn=setup)
        forwarded = 0
        peaks: dict = {}  # name: [peak RSS, largest VmData seen]
        while chief.poll() is None:
            for name, pid in [("chief", chief.pid)] + [(t.name, t.popen.pid) for t in tasks]:
                _track(peaks, name, pid)
            if len(signals) > forwarded:  # the first to the chief (it checkpoints), a second kills it
                if forwarded == 0:
                    chief.send_signal(signals[0])
                else:
                    chief.kill()
                forwarded = len(signals)
            _pump(tasks, 0.5, out)
        _pump(tasks, 0.0, out)
        for task in tasks:
            _track(peaks, task.name, task.popen.pid)
        if peaks:
            print("tfdlrm cluster: peak resident memory (largest data segment, sampled every 0.5 s) "
                  + ", ".join(f"{n} {_gib(rss)} ({_gib(data)})" for n, (rss, data) in peaks.items()),
                  file=out, flush=True)
        code = chief.returncode
        return 128 - code if code < 0 else code
    finally:
        _stop(([chief] if chief else []) + [t.popen for t in tasks])
        for s, handler in previous.items():
            signal.signal(s, handler)
