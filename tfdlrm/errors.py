"""The one exception type that the command line turns into a one-line message."""


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
