"""Write a Criteo dataset's train and held-out splits, as tfdlrm's reader yields them, to .npz.

Usage (from the repository root): .venv/bin/python -m tools.dump_dataset_npz DATA [--eval-data HELDOUT] [--min-frequency T |
       --hash-buckets N] --out FILE.npz
"""
import argparse

import tfdlrm  # noqa: F401  (selects Keras 2 before tf.keras is first used)
from tfdlrm._env import import_tensorflow_quietly

import_tensorflow_quietly()  # TensorFlow's start-up log hidden (TFDLRM_TF_LOGS=1 shows it)
from tfdlrm.bench.reference import dump_rows
from tfdlrm.pipelines.sources import open_data
from tfdlrm.presets import get_preset


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
    counts = dump_rows(source, args.out)
    print(f"{args.out}: {counts['train_rows']} train, {counts['held_out_rows']} held-out rows, "
          f"{counts['table_rows']:,} table rows")


if __name__ == "__main__":
    main()
