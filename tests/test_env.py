"""tfdlrm must run on tf_keras (Keras 2) and refuse a TensorFlow already bound to Keras 3."""
import os
import subprocess
import sys

from tests.helpers import REPO


def python(code: str, **env):
    full_env = {k: v for k, v in os.environ.items() if k != "TF_USE_LEGACY_KERAS"}
    full_env.update(env, PYTHONPATH=str(REPO))
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=full_env, timeout=300)


def test_importing_tfdlrm_first_routes_tf_keras_to_keras2():
    proc = python("import tfdlrm, tensorflow as tf, tf_keras; "
                  "print(tf.keras.layers.Dense is tf_keras.layers.Dense, tf.keras.__name__)")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split()[0] == "True" and "tf_keras" in proc.stdout


def test_tensorflow_imported_with_keras3_first_is_refused_clearly():
    proc = python("import tensorflow as tf; tf.keras.layers; import tfdlrm")
    assert proc.returncode != 0
    assert "ImportError: tfdlrm needs Keras 2 (tf_keras)" in proc.stderr
    assert "os.environ['TF_USE_LEGACY_KERAS'] = '1'" in proc.stderr


def test_tensorflow_imported_first_without_touching_tf_keras_is_fine():
    # A notebook's first cell is often `import tensorflow as tf`: tf.keras is resolved only
    # when first used, so importing tfdlrm next still gets Keras 2.
    proc = python("import tensorflow as tf, tf_keras; import tfdlrm; from tfdlrm.models import DLRM; "
                  "m = DLRM(tfdlrm.get_preset('tiny')).build_from_config(); "
                  "print(isinstance(m, tf_keras.Model), tf.keras.layers.Dense is tf_keras.layers.Dense)")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["True", "True"]


def test_tensorflow_imported_first_with_the_variable_set_is_fine():
    proc = python("import tensorflow as tf; import tfdlrm; from tfdlrm.models import DLRM; print('ok')",
                  TF_USE_LEGACY_KERAS="1")
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr
