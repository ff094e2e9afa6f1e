"""The one exception type that the command line turns into a one-line message."""


class UserError(Exception):
    """A problem with what the user asked for or gave us (flags, files, data).

    The CLI prints ``error: <message>`` and exits with status 2; no traceback.
    Messages name the offending thing (flag, file and line, feature) and, where
    there is one, the fix.
    """
