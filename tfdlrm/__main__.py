"""``python -m tfdlrm``: see :mod:`tfdlrm.cli`."""
import sys

from tfdlrm.cli import main

sys.exit(main(restart=True))
