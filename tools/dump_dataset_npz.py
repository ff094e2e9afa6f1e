"""Write a Criteo dataset's train and held-out splits, as tfdlrm's reader yields them, to .npz.

Usage (from the repository root): .venv/bin/python -m tools.dump_dataset_npz DATA [--eval-data HELDOUT] [--min-frequency T |
       --hash-buckets N] --out FILE.npz
"""
import argparse

import numpy as np

import tfdlrm  # noqa: F401  (selects Keras 2 before tf.keras is first used)
from tfdlrm.pipelines.sources import open_data
from tfdlrm.presets import get_preset


def collect(dataset):
    dense, sparse, labels = [], [], []
    for x, y in dataset:
        dense.append(x["dense"].numpy())
        sparse.append(x["sparse"].numpy())
        labels.append(y.numpy())
    return np.concatenate(dense), np.concatenate(sparse), np.concatenate(labels)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("data")
    p.add_argument("--eval-data")
    p.add_argument("--min-frequency", type=int)
    p.add_argument("--hash-buckets", type=int)
    p.add_argument("--out", required=True)
    args = p.parse_args()
    source = open_data(args.data, get_preset("kaggle"), eval_data=args.eval_data,
                       min_frequency=args.min_frequency, hash_buckets=args.hash_buckets)
    train = collect(source.train_dataset(4096))  # no seed: file order
    held_out = collect(source.eval_dataset(4096))
    np.savez(args.out, tr_dense=train[0], tr_sparse=train[1], tr_y=train[2],
             te_dense=held_out[0], te_sparse=held_out[1], te_y=held_out[2], rows=np.array(source.config.table_rows))
    print(f"{args.out}: {len(train[2])} train, {len(held_out[2])} held-out rows, "
          f"{sum(source.config.table_rows):,} table rows")


if __name__ == "__main__":
    main()
