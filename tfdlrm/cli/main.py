"""``python -m tfdlrm``: parse, run one command, and turn every known failure into one line.

Exit 0 on success, 2 for bad input (``error: ...``), 141 for a closed pipe, 143 (130) for training
stopped by SIGTERM (SIGINT) after a checkpoint.
"""
from __future__ import annotations

import errno
import os
import sys
from typing import Optional, Sequence

from tfdlrm._env import import_tensorflow_quietly, tf_logs_wanted
from tfdlrm.cli.args import EXIT_BROKEN_PIPE, EXIT_LOST_TASK, EXIT_USAGE
from tfdlrm.cli.parser import build_parser
from tfdlrm.errors import Stopped, UserError


def tensorflow_error_message(error: BaseException) -> Optional[str]:
    """The readable part of a TensorFlow runtime error caused by bad data, or None."""
    message = getattr(error, "message", None) or str(error)
    marker = message.find("tfdlrm: ")
    if marker >= 0:
        text = message[marker + len("tfdlrm: "):]
        return text.split("\n")[0].rstrip("'\"]")
    return None


def lost_task_message(error: BaseException) -> Optional[str]:
    """For TensorFlow's ``UnavailableError`` (or a cluster error naming a task) under ``--parallel ps``:
    one line naming the parameter server or worker that cannot be reached; None for any other error."""
    if not type(error).__module__.startswith("tensorflow") or type(error).__name__ not in (
            "UnavailableError", "AbortedError", "CancelledError", "UnknownError", "InternalError"):
        return None
    import re

    text = getattr(error, "message", None) or str(error)
    tasks = re.findall(r"/job:(ps|worker|chief)/replica:\d+/task:(\d+)", text)
    if not tasks or (type(error).__name__ != "UnavailableError" and "Socket closed" not in text
                     and "Connection reset" not in text and "failed to connect" not in text.lower()):
        return None
    # the task whose address the failed connection names, else the first ps or worker the error names
    # (the chief is this process: a remote task names it when its own link to the lost one broke)
    ports = set(re.findall(r"ipv[46]:\[?[0-9a-fA-F.:]+?\]?:(\d+)", text))
    lost = next((f"{job} {i}" for job, i, port in cluster_tasks() if port in ports), None)
    others = [" ".join(t) for t in tasks if t[0] != "chief"]
    name = lost or (others[0] if others else "parameter servers or workers")
    why = re.search(r"grpc_message:\s*\"([^\"]+)\"", text)
    why = why.group(1).rsplit(": ", 1)[-1] if why else type(error).__name__  # "... host: Connection refused"
    return (f"lost the cluster's {name} ({why}): "
            f"training stopped. Restart that process and rerun the same command: a run with --out resumes from "
            f"its last checkpoint")


def _quiet_remote_executors(default):
    """An unraisable hook that drops TensorFlow's errors from destructors (a remote executor waiting on
    a lost task raises again as it is collected: "Exception ignored in ... Executor.__del__") and
    passes every other one to ``default``."""
    def hook(unraisable):
        if not type(unraisable.exc_value).__module__.startswith("tensorflow"):
            default(unraisable)

    return hook


def cluster_tasks() -> list:
    """``(job, index, port)`` of every ps and worker in TF_CONFIG's cluster (none when unreadable)."""
    from tfdlrm.parallel.devices import tf_config_part

    cluster = tf_config_part("cluster")
    return [(job, str(i), str(address).rpartition(":")[2]) for job in ("ps", "worker")
            for i, address in enumerate(cluster.get(job) or [])]


def data_loss_message(error: BaseException) -> Optional[str]:
    """For TensorFlow's ``DataLossError`` (a damaged file: a record or checkpoint failing its
    checksum), one line; None for any other error.  ``train`` names the damaged shard itself
    (pipelines/sources.py ``damaged_data_named``); this covers the rest."""
    if type(error).__name__ != "DataLossError" or not type(error).__module__.startswith("tensorflow"):
        return None
    import re

    text = getattr(error, "message", None) or str(error)
    text = re.sub(r"\{\{[^}]*\}\}\s*|\s*\[\[[^]]*\]\]|\s*\[Op:[^]]*\].*", "", text)
    lines = [line.strip() for line in text.splitlines()  # the graph trace: indented, or these headings
             if line.strip() and not line.startswith((" ", "\t", "Graph execution error", "Detected at node"))]
    return f"a file is damaged: {lines[0] if lines else type(error).__name__} (restore or recreate it)"


def out_of_memory_message(error: BaseException, command: Optional[str] = None) -> Optional[str]:
    """For TensorFlow's ``ResourceExhaustedError`` or Python's ``MemoryError``, one line with
    what could not be allocated, the run's memory estimate when one was made
    (tfdlrm/training/memory.py) and what to make smaller; None for any other error."""
    tensorflow = type(error).__name__ == "ResourceExhaustedError" and type(error).__module__.startswith("tensorflow")
    if not (tensorflow or isinstance(error, MemoryError)):
        return None
    import re

    message = getattr(error, "message", None) or str(error)
    oom = re.search(r"OOM when allocating tensor with shape\[([^\]]*)\] and type (\w+)", message)
    if oom:  # TensorFlow's, also inside Keras's "Exception encountered when calling layer ..."
        what = f"cannot allocate a {oom.group(2)} tensor of shape [{oom.group(1)}]"
    else:
        from tfdlrm.errors import io_error_text

        what = io_error_text(error) if message.strip() else type(error).__name__
    text = f"out of memory: {what}"
    memory = sys.modules.get("tfdlrm.training.memory")
    estimate = getattr(memory, "last_estimate", None)
    if estimate is not None and command in ("train", "compare"):
        text += f" (the run's estimated peak: {memory.format_bytes(estimate.total)})"
    if command == "export":
        return text + "; the export holds the run's whole model: export on a machine with more memory"
    return (text + "; use smaller tables (--rows; --hash-buckets or a larger --min-frequency for raw Criteo data), "
            "a smaller --batch-size or --eval-batch-size, or sgd (no optimizer slots)")


def os_error_message(error: OSError) -> str:
    """``PATH: No space left on device``, or the like, in one line."""
    from tfdlrm.errors import io_error_text

    text = io_error_text(error)
    return text if error.filename is not None else f"cannot read or write: {text}"


class StdoutError(OSError):
    """Writing to standard output failed (a full disk, a closed pipe)."""


class _GuardedStdout:
    """``sys.stdout`` while a command runs: its write errors become :class:`StdoutError`."""

    def __init__(self, stream):
        self._stream = stream

    def write(self, text):
        try:
            return self._stream.write(text)
        except OSError as e:
            raise StdoutError(e.errno, e.strerror) from None

    def flush(self):
        try:
            self._stream.flush()
        except OSError as e:
            raise StdoutError(e.errno, e.strerror) from None

    def __getattr__(self, name):
        return getattr(self._stream, name)


def _quiet_stdout(stream):
    """After stdout failed, a stand-in for it, so that the interpreter's last flush stays silent
    (the one line already said what happened)."""
    if stream is sys.__stdout__:
        try:
            return open(os.devnull, "w")
        except OSError:
            pass
    return stream


def main(argv: Optional[Sequence[str]] = None, restart: bool = False) -> int:
    """Run a command.  ``restart`` (``python -m tfdlrm`` sets it): a command with
    ``--huge-pages auto`` may first restart the process with huge pages on, and one
    with ``--huge-pages off`` without them (``tfdlrm._env``)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = list(argv) if argv is not None else sys.argv[1:]
    if not getattr(args, "func", None):
        parser.print_help()
        return EXIT_USAGE
    if restart and getattr(args, "huge_pages", None) in ("auto", "off"):
        from tfdlrm import _env

        if args.huge_pages == "auto":
            _env.restart_with_huge_pages(args.argv)
        else:
            _env.restart_without_huge_pages(args.argv)
    stdout, sys.stdout = sys.stdout, _GuardedStdout(sys.stdout)
    try:
        if args.command == "server":
            from tfdlrm.parallel.ps import prepare_server_environment

            prepare_server_environment()  # before TensorFlow loads
        quiet_cluster = getattr(args, "parallel", None) == "ps" and not tf_logs_wanted()
        if quiet_cluster and "tensorflow" not in sys.modules:
            # a lost server or worker is one line (lost_task_message), not TensorFlow's C++ error lines
            # repeated for every remote call in flight (TFDLRM_TF_LOGS=1 shows them)
            os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
        if args.command not in ("presets", "cluster"):  # the launcher starts processes; it needs no TensorFlow
            import_tensorflow_quietly()
        if quiet_cluster:  # nor the coordinator's Python log of each closure that failed
            import logging

            logging.getLogger("tensorflow").setLevel(logging.CRITICAL)
            sys.unraisablehook = _quiet_remote_executors(sys.unraisablehook)
        code = args.func(args)
        sys.stdout.flush()  # here, so that a full disk or a closed pipe is one line like any error
    except UserError as e:
        sys.stderr.write(f"error: {e}\n")
        return EXIT_USAGE
    except StdoutError as e:
        stdout = _quiet_stdout(stdout)
        if e.errno == errno.EPIPE:  # the reader went away (`| head`): stop quietly, as SIGPIPE would
            return EXIT_BROKEN_PIPE
        sys.stderr.write(f"error: cannot write to standard output: {e.strerror or e}\n")
        return EXIT_USAGE
    except OSError as e:  # files: missing, unreadable, not writable, disk full
        sys.stderr.write(f"error: {os_error_message(e)}\n")
        return EXIT_USAGE
    except Stopped as e:  # SIGTERM or SIGINT while training: a checkpoint, then this line
        sys.stderr.write(f"{e}\n")
        return e.exit_status
    except KeyboardInterrupt:
        sys.stderr.write("interrupted\n")
        return 130
    except Exception as e:  # TensorFlow reports bad data as runtime errors
        lost = lost_task_message(e)
        if lost is not None:
            sys.stderr.write(f"error: {lost}\n")
            return EXIT_LOST_TASK
        text = (tensorflow_error_message(e) or data_loss_message(e)
                or out_of_memory_message(e, getattr(args, "command", None)))
        if text is None:
            raise
        sys.stderr.write(f"error: {text}\n")
        return EXIT_USAGE
    finally:
        sys.stdout = stdout
    return code


def console() -> None:
    """The ``tfdlrm`` console script (pyproject.toml): the same as ``python -m tfdlrm``."""
    code = main(restart=True)
    if code == EXIT_LOST_TASK:
        # A cluster task is gone: TensorFlow's remote executors raise again in their destructors at
        # interpreter exit ("Exception ignored in ... Executor.__del__" and a traceback); the one line
        # is written, so end here.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)
