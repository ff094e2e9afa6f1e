"""Every benchmark (``python -m tfdlrm bench train|pipeline|parallel|serving``); figures: docs/benchmarks.md."""
