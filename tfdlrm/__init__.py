"""tfdlrm: DLRM (Naumov et al., 2019) and the DCN baseline in TensorFlow / tf_keras.

Importing tfdlrm sets ``TF_USE_LEGACY_KERAS=1`` (tensorflow-recommenders needs
Keras 2) and refuses to run if TensorFlow was already imported with Keras 3.
TensorFlow itself is imported only when a name below that needs it is used, so
``python -m tfdlrm --help`` stays fast.

Python API (mirrors ``python -m tfdlrm train``)::

    import tfdlrm
    config = tfdlrm.get_preset("tiny")
    data = tfdlrm.open_data("synthetic", config, train_examples=100_000)
    model = tfdlrm.build_model("dlrm", data.config)
    tfdlrm.compile_model(model, optimizer="adagrad", lr=0.05)
    model.fit(data.train_dataset(batch_size=256, seed=1), epochs=1,
              validation_data=data.val_dataset(batch_size=1024))
    print(tfdlrm.evaluate(model, data.eval_dataset(batch_size=1024)))
"""
from tfdlrm import _env

_env.configure()
_env.map_sibling_packages(__name__, __path__)

from tfdlrm.errors import UserError  # noqa: E402
from tfdlrm.presets import PRESET_NAMES, ModelConfig, get_preset  # noqa: E402

__version__ = "0.1.0"

_LAZY = {
    "DLRM": "tfdlrm.models.dlrm",
    "DCN": "tfdlrm.baselines.dcn",
    "EmbeddingTables": "tfdlrm.layers",
    "MLP": "tfdlrm.layers",
    "DotInteraction": "tfdlrm.layers",
    "CatInteraction": "tfdlrm.layers",
    "build_model": "tfdlrm.training",
    "compile_model": "tfdlrm.training",
    "standardize_dense": "tfdlrm.training",
    "make_optimizer": "tfdlrm.training",
    "evaluate": "tfdlrm.training",
    "train": "tfdlrm.training",
    "TrainSpec": "tfdlrm.training",
    "load_run": "tfdlrm.training",
    "open_data": "tfdlrm.pipelines.sources",
}

__all__ = ["UserError", "ModelConfig", "get_preset", "PRESET_NAMES", *_LAZY]


def __getattr__(name):
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'tfdlrm' has no attribute {name!r}")
