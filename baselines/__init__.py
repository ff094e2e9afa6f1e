"""Baseline models compared against DLRM (the paper's Deep & Cross Network)."""
import tfdlrm  # noqa: F401  (sets TF_USE_LEGACY_KERAS before TensorFlow is imported)
