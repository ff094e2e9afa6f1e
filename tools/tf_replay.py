"""Replays a run saved by torch_replay_dump.py in tfdlrm's DLRM: the same batches in the
same order, from the PyTorch run's initial weights (``--init torch``) or from tfdlrm's own
for the same seed (``--init tfdlrm``); prints both runs' losses at a few steps, the first
step where they differ by more than 1e-3, and both held-out AUCs.  Run with .venv/bin/python
from the repository root.

Usage (from the repository root): .venv/bin/python -m tools.tf_replay FILE.npz DUMP.npz [--init torch|tfdlrm] [--seed S]
"""
import argparse

import tfdlrm  # noqa: F401  (selects Keras 2 before tf.keras is first used)
from tfdlrm._env import import_tensorflow_quietly

import_tensorflow_quietly()  # TensorFlow's start-up log hidden (TFDLRM_TF_LOGS=1 shows it)
import numpy as np
import tensorflow as tf

from tfdlrm.metrics import exact_auc
from tfdlrm.presets import get_preset
from tfdlrm.training.compile import build_model, compile_model


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("npz")
    p.add_argument("dump")
    p.add_argument("--init", choices=("torch", "tfdlrm"), default="torch")
    p.add_argument("--seed", type=int, default=0, help="tfdlrm's seed with --init tfdlrm")
    args = p.parse_args()
    data, run = np.load(args.npz), np.load(args.dump)
    batch_size = int(run["batch_size"])
    tf.keras.utils.set_random_seed(args.seed)
    # the reference's regime: the raw log counts straight into the bottom MLP (--dense-norm none)
    model = build_model("dlrm", get_preset("kaggle", dense_norm="none").with_rows([int(r) for r in data["rows"]]))
    compile_model(model, "sgd", float(run["lr"]))
    x = {"dense": data["tr_dense"].astype("float32"), "sparse": data["tr_sparse"].astype("int64")}
    y = data["tr_y"].astype("float32").reshape(-1, 1)
    model({k: v[:2] for k, v in x.items()})
    if args.init == "torch":
        params = [run[f"p{i}"] for i in range(sum(k.startswith("p") for k in run.files))]
        for table, weights in zip(model.sparse_arch.tables, params):
            table.assign(weights)
        linear = iter(params[len(model.sparse_arch.tables):])
        for layer in model.dense_arch.dense_layers + model.over_arch.dense_layers:
            layer.kernel.assign(next(linear).T)
            layer.bias.assign(next(linear))
    losses = []
    for order in run["orders"]:
        for i in range(0, len(y), batch_size):
            idx = order[i:i + batch_size]
            out = model.train_on_batch({k: v[idx] for k, v in x.items()}, y[idx], return_dict=True)
            losses.append(float(out["loss"]))
    losses, theirs = np.array(losses), run["losses"]
    for step in sorted({0, 1, 10, 50, 100, len(losses) - 1}):
        print(f"step {step}: tfdlrm loss {losses[step]:.5f}, PyTorch {theirs[step]:.5f}")
    apart = np.flatnonzero(np.abs(losses - theirs) > 1e-3)
    print("first step differing by more than 1e-3:", int(apart[0]) if len(apart) else "none")
    scores = model.predict({"dense": data["te_dense"].astype("float32"),
                            "sparse": data["te_sparse"].astype("int64")}, batch_size=4096, verbose=0)
    print(f"held-out AUC: tfdlrm {exact_auc(data['te_y'].ravel(), scores.ravel()):.4f}, "
          f"PyTorch {float(run['auc']):.4f}")


if __name__ == "__main__":
    main()
