"""``python -m tfdlrm``: see :mod:`tfdlrm.cli`."""
import sys

from tfdlrm.cli.main import main

sys.exit(main(restart=True))
