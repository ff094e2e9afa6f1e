"""``python -m tfdlrm``: see :mod:`tfdlrm.cli`."""
from tfdlrm.cli.main import console

console()
