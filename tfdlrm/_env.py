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
import tempfile

KERAS_MISMATCH = (
    "tfdlrm needs Keras 2 (tf_keras), but TensorFlow was already imported with "
    "Keras 3 as tf.keras (something used tf.keras before tfdlrm was imported). Import "
    "tfdlrm before using tf.keras, or start with: import os; "
    "os.environ['TF_USE_LEGACY_KERAS'] = '1'"
)


def _tensorflow_uses_keras3(tf_module) -> bool:
    """True when an already-imported TensorFlow has resolved tf.keras to Keras 3.

    TensorFlow resolves ``tf.keras`` lazily, on first use, from ``TF_USE_LEGACY_KERAS``
    as it is then: ``import tensorflow`` before ``import tfdlrm`` is fine as long as
    nothing touched ``tf.keras`` in between.
    """
    keras = tf_module.__dict__.get("keras")
    if keras is None or getattr(keras, "_tfll_initialized", None) is False:
        return False
    version = keras.__dict__.get("_tfll_keras_version")
    if version is not None:
        return version != "tf_keras"
    return not getattr(keras, "__name__", "tf_keras").startswith("tf_keras")


# TFDLRM_TF_LOGS=1: TensorFlow's own log lines as TensorFlow prints them (hidden otherwise)
TF_LOGS = "TFDLRM_TF_LOGS"


def tf_logs_wanted() -> bool:
    return os.environ.get(TF_LOGS, "") not in ("", "0")


def configure() -> None:
    """Set the environment for tf_keras, or fail if it is too late to do so."""
    os.environ["TF_USE_LEGACY_KERAS"] = "1"
    # TensorFlow's C++ INFO/WARNING lines drown the progress bars; errors still show.
    if not tf_logs_wanted():
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    tf_module = sys.modules.get("tensorflow")
    if tf_module is not None and _tensorflow_uses_keras3(tf_module):
        raise ImportError(KERAS_MISMATCH)


def import_tensorflow_quietly() -> None:
    """Import TensorFlow with its native start-up chatter (oneDNN, CUDA probes) hidden.

    Those lines are written to file descriptor 2 by C++ before logging is set up,
    so ``TF_CPP_MIN_LOG_LEVEL`` cannot silence them; they are replayed if the import
    fails.  With ``TFDLRM_TF_LOGS=1`` TensorFlow is imported as it is, every line shown.
    """
    if "tensorflow" in sys.modules:
        return
    if tf_logs_wanted():
        import tensorflow  # noqa: F401

        return
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as captured:
        os.dup2(captured.fileno(), 2)
        try:
            import tensorflow as tf

            tf.config.list_physical_devices()
        except BaseException:
            os.dup2(saved, 2)
            captured.seek(0)
            sys.stderr.write(captured.read().decode(errors="replace"))
            raise
        finally:
            os.dup2(saved, 2)
            os.close(saved)


# -- tfdlrm.pipelines and tfdlrm.baselines in a checkout ----------------------------------------------------------
# The repository keeps pipelines/ and baselines/ beside tfdlrm/; an installed tfdlrm has them
# inside as tfdlrm/pipelines and tfdlrm/baselines (pyproject.toml maps the folders), so no
# generic top-level name is claimed.  In a checkout this finder gives the same module names.
SIBLING_PACKAGES = ("pipelines", "baselines")


class _SiblingFinder:
    def __init__(self, package: str, root: str):
        self.package, self.root = package, root

    def find_spec(self, fullname, path=None, target=None):
        head, _, tail = fullname.rpartition(".")
        if head != self.package or tail not in SIBLING_PACKAGES:
            return None
        import importlib.util

        folder = os.path.join(self.root, tail)
        init = os.path.join(folder, "__init__.py")
        if not os.path.isfile(init):
            return None
        return importlib.util.spec_from_file_location(fullname, init, submodule_search_locations=[folder])


def map_sibling_packages(package: str, package_path) -> None:
    """Make ``<package>.pipelines`` and ``<package>.baselines`` the checkout's sibling folders,
    unless they are inside the package already (an installed tfdlrm)."""
    here = os.path.abspath(list(package_path)[0])
    if all(os.path.isdir(os.path.join(here, name)) for name in SIBLING_PACKAGES):
        return
    root = os.path.dirname(here)
    if not any(isinstance(f, _SiblingFinder) and f.root == root for f in sys.meta_path):
        sys.meta_path.append(_SiblingFinder(package, root))


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
