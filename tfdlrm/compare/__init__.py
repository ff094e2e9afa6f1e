"""Side-by-side comparison of models (``python -m tfdlrm compare``); manual: docs/training.md.

``run`` trains the runs (each resumable), ``report`` writes report.json/report.md with
AUC differences and their intervals, ``plots`` draws curves.png.
"""
from tfdlrm.compare.report import (
    CURVES_PNG,
    REPORT_JSON,
    REPORT_MD,
    Comparison,
    format_table,
)
from tfdlrm.compare.run import compare, export_best, lr_for

__all__ = ["CURVES_PNG", "REPORT_JSON", "REPORT_MD", "Comparison", "format_table", "compare", "export_best", "lr_for"]
