"""The command line: ``python -m tfdlrm`` (argparse only: parse, call one function, report)."""
from tfdlrm.cli.main import main

__all__ = ["main"]
