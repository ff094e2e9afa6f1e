"""The training layer: build, compile, fit, evaluate, checkpoint; manual: docs/training.md.

``compile`` builds models and optimizers, ``loop.train`` runs ``python -m tfdlrm train``,
``rundir`` is the run directory's layout, ``checkpoints``/``stream``/``callbacks`` make a
run resumable (docs/fault-tolerance.md).
"""
from tfdlrm.training.compile import build_model, compile_model, make_optimizer
from tfdlrm.training.evaluate import evaluate, predict_with_labels
from tfdlrm.training.inputs import standardize_dense
from tfdlrm.training.loop import train
from tfdlrm.training.rundir import load_run
from tfdlrm.training.spec import RunResult, TrainSpec

__all__ = ["build_model", "compile_model", "make_optimizer", "evaluate",
           "predict_with_labels", "train", "load_run", "RunResult", "TrainSpec", "standardize_dense"]
