"""The errors the command line turns into one line (no traceback).

``UserError`` is anything wrong with what the user asked for or gave; ``TrainingDiverged``
is a loss or weight that became NaN or infinite.  See docs/fault-tolerance.md.
"""
from __future__ import annotations

from typing import Optional


class UserError(Exception):
    """A problem with what the user asked for or gave us (flags, files, data).

    The CLI prints ``error: <message>`` and exits with status 2; no traceback.
    Messages name the offending thing (flag, file and line, feature) and, where
    there is one, the fix.
    """


def io_error_text(error: BaseException) -> str:
    """The readable part of a file error (an ``OSError``, or TensorFlow's ``OpError`` from
    its file system): ``PATH: No space left on device``, in one line."""
    import re

    if isinstance(error, OSError):
        what = error.strerror or str(error) or type(error).__name__
        return f"{error.filename}: {what}" if error.filename is not None else what
    text = getattr(error, "message", None) or str(error) or type(error).__name__
    text = re.sub(r"\{\{[^}]*\}\}\s*", "", text)
    text = re.sub(r"\s*\[Op:\w+\]", "", text)
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[0] if lines else type(error).__name__


class TrainingDiverged(UserError):
    """The training loss became NaN or infinite."""

    def __init__(self, step: int, epoch: int, last_checkpoint: Optional[str],
                 what: str = "the loss became NaN or infinite"):
        self.step, self.epoch, self.last_checkpoint = step, epoch, last_checkpoint
        where = f"last good checkpoint: {last_checkpoint}" if last_checkpoint else "no checkpoint was saved before it"
        super().__init__(f"training diverged: {what} at step {step} (epoch {epoch}); {where}; try a lower --lr")


class Stopped(Exception):
    """Training stopped by SIGTERM or SIGINT (tfdlrm/training/preemption.py), after writing a
    checkpoint at ``step`` when the run has a directory.  The command line prints the message and
    exits with ``exit_status``, 128 + the signal's number, as a shell reports a process it killed."""

    def __init__(self, signal_name: str, signal_number: int, step: int, checkpoint: Optional[str]):
        self.signal_name, self.step, self.checkpoint = signal_name, step, checkpoint
        self.exit_status = 128 + int(signal_number)
        saved = (f"checkpoint {checkpoint} written; rerun the same command to resume" if checkpoint
                 else "nothing saved (no run directory, --out)")
        super().__init__(f"stopped by {signal_name} at step {step}; {saved}")
