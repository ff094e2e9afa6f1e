"""Process set-up that must happen before TensorFlow is imported.

tensorflow-recommenders is written against Keras 2, so tfdlrm runs on tf_keras:
``TF_USE_LEGACY_KERAS=1`` makes ``tf.keras`` resolve to ``tf_keras``.  That switch
is read when TensorFlow is imported (and when ``tf.keras`` is first touched), so
it has to be set before the first ``import tensorflow`` anywhere in the process.
A model that mixes Keras 3 layers into a tf_keras model fails silently (layers are
not tracked, weights never train), hence the hard error below.
"""
from __future__ import annotations

import os
import sys

KERAS_MISMATCH = (
    "tfdlrm needs Keras 2 (tf_keras), but TensorFlow was already imported with "
    "Keras 3 as tf.keras. Import tfdlrm before tensorflow, or set "
    "TF_USE_LEGACY_KERAS=1 in the environment before Python starts."
)


def _tensorflow_uses_keras3(tf_module) -> bool:
    """True when an already-imported TensorFlow routes tf.keras to Keras 3."""
    if not getattr(tf_module, "_tf_uses_legacy_keras", True):
        return True
    loader = tf_module.__dict__.get("keras")
    if loader is not None and getattr(loader, "_tfll_initialized", False):
        return getattr(loader, "_tfll_keras_version", None) == "keras_3"
    return False


def configure() -> None:
    """Set the environment for tf_keras, or fail if it is too late to do so."""
    os.environ["TF_USE_LEGACY_KERAS"] = "1"
    # TensorFlow's C++ INFO/WARNING lines drown the progress bars; errors still show.
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    tf_module = sys.modules.get("tensorflow")
    if tf_module is not None and _tensorflow_uses_keras3(tf_module):
        raise ImportError(KERAS_MISMATCH)


# -- transparent huge pages -----------------------------------------------------------------------------------------
# Embedding lookups and row updates touch rows all over tables of hundreds of MB: with
# 4 KiB pages nearly every row costs a TLB miss.  glibc (2.35+) can ask the kernel for
# transparent huge pages (2 MiB) on the memory malloc maps (``madvise(MADV_HUGEPAGE)``)
# when the tunable below is set, which it reads only when the process starts.
HUGETLB_TUNABLE = "glibc.malloc.hugetlb=1"
THP_ENABLED = "/sys/kernel/mm/transparent_hugepage/enabled"


def transparent_huge_pages() -> str:
    """The kernel's THP mode: ``always``, ``madvise``, ``never`` or ``unknown``."""
    try:
        with open(THP_ENABLED) as f:
            text = f.read()
    except OSError:
        return "unknown"
    start, end = text.find("["), text.find("]")
    return text[start + 1:end] if 0 <= start < end else "unknown"


def huge_pages_active() -> bool:
    """Does malloc in this process get transparent huge pages for large blocks?"""
    return transparent_huge_pages() == "always" or (
        transparent_huge_pages() == "madvise" and HUGETLB_TUNABLE in os.environ.get("GLIBC_TUNABLES", ""))


def huge_pages_environment() -> "dict | None":
    """The environment in which to start this command again so that malloc asks for huge
    pages, or None when that is already so or cannot be (not Linux with glibc 2.35+, THP
    not in ``madvise`` mode, or glibc's hugetlb tunable already set)."""
    import platform

    if not sys.platform.startswith("linux") or transparent_huge_pages() != "madvise":
        return None
    libc, version = platform.libc_ver()
    try:
        if libc != "glibc" or tuple(int(p) for p in version.split(".")[:2]) < (2, 35):
            return None
    except ValueError:
        return None
    tunables = os.environ.get("GLIBC_TUNABLES", "")
    if "glibc.malloc.hugetlb" in tunables:
        return None
    env = dict(os.environ)
    env["GLIBC_TUNABLES"] = f"{tunables}:{HUGETLB_TUNABLE}" if tunables else HUGETLB_TUNABLE
    return env


def restart_with_huge_pages(argv: list) -> None:
    """Replace this process by ``python -m tfdlrm ARGV`` with huge pages on (see
    :func:`huge_pages_environment`); return if there is nothing to do."""
    env = huge_pages_environment()
    if env is None or "tensorflow" in sys.modules:
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, "-m", "tfdlrm", *argv], env)


def restart_without_huge_pages(argv: list) -> None:
    """Replace this process by ``python -m tfdlrm ARGV`` without glibc's hugetlb tunable
    (``--huge-pages off`` when it was inherited, say from ``bench train --suite``);
    return if it is not set."""
    tunables = os.environ.get("GLIBC_TUNABLES", "")
    if "glibc.malloc.hugetlb" not in tunables or "tensorflow" in sys.modules:
        return
    env = dict(os.environ)
    kept = [t for t in tunables.split(":") if t and not t.startswith("glibc.malloc.hugetlb")]
    if kept:
        env["GLIBC_TUNABLES"] = ":".join(kept)
    else:
        env.pop("GLIBC_TUNABLES")
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, "-m", "tfdlrm", *argv], env)
